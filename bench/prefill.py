"""The wgmma prefill kernel (codegen/wgmma.cu, sm_90a): float64 checks, then its time against cuBLAS dense and
the current default prefill path, at LLaMA-2-7B shapes.

    python bench/prefill.py [--ms 2048] [--sparsities 0,0.25,0.35,0.45,0.5] [--out DIR]

Checks first (small shapes, an odd number of row-tiles, bf16 and fp16, bias, M not a multiple of the block,
all-dense / mixed / all-2:4 bitmaps, NaN-poisoned outputs), then for each 7B shape, M and sparsity: the kernel,
the default path before this kernel (`prefill_default` without it: decompress + cuBLAS on mixed layers,
cuSPARSELt on all-2:4 layers) and
cuBLAS on a dense weight of the shape, timed in alternation (ROUNDS rounds, medians), each rotating over weight
copies that together exceed L2. One JSON line a case (prefill.jsonl, written as it goes) and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from report import machine_env, save_results  # bench/report.py
from kernel_sweep import SHAPES, err, make_layer, rotating_copies, sweep_args, time_alternating  # bench/kernel_sweep.py

from patchc.codegen import wgmma
from patchc.codegen import cusparselt
from patchc.codegen.launch import prefill_default, launch, tma_available

ROUNDS = 2


def checks(log) -> bool:
    ok = True
    cases = [(n, 512, s, m, dt, b) for n in (256, 384) for s in (0.0, 0.25, 0.5) for m in (1, 77, 300)
             for dt in (torch.bfloat16, torch.float16) for b in (False, True)]
    cases += [(640, 1024, 0.25, 2048, torch.bfloat16, True), (512, 2048, 0.35, 1000, torch.float16, False)]
    cases = [c + (bn,) for c in cases for bn in wgmma.PREFILL_BLOCK_NS]
    for n, k, s, m, dt, use_bias, bn in cases:
        x, d, v, e, sched, ref, _ = make_layer(n, k, m, s, dtype=dt, seed=n + m + int(100 * s))
        bias = (torch.randn(n, device="cuda") * 0.1).to(dt) if use_bias else None
        if bias is not None:
            ref = ref + bias.double()
        try:
            y = wgmma.run(x, d, v, e, sched, bias, poison=True, block_n=bn)
            torch.cuda.synchronize()
            r = err(y, ref)
            nan = int(torch.isnan(y).sum())
        except Exception as ex:  # noqa: BLE001 - reported
            r, nan = float("nan"), -1
            print(f"  error: {type(ex).__name__}: {ex}", flush=True)
        good = nan == 0 and r < 1e-2
        ok &= good
        line = {"check": f"{n}x{k}", "sparsity": s, "M": m, "block_n": bn, "dtype": str(dt)[6:], "bias": use_bias,
                "rel_err": r, "nan": nan, "ok": good}
        log.write(json.dumps(line) + "\n")
        if not good or m == 300:
            print(f"check {n}x{k} s={s} M={m} bn={bn} {str(dt)[6:]} bias={use_bias}: rel err {r:.2e} nan {nan} "
                  f"{'ok' if good else 'FAIL'}", flush=True)
    return ok


def bench(n, k, m, s, log) -> dict:
    x, d, v, e, sched, ref, p = make_layer(n, k, m, s)
    packs = rotating_copies((d, v, e), p.nbytes)
    wd = torch.randn(n, k, device="cuda", dtype=x.dtype) * 0.02
    wds = [c for (c,) in rotating_copies((wd,), wd.nbytes)]
    cfg = prefill_default(m, sched, n, torch.cuda.get_device_properties(0).multi_processor_count,
                          tma_available(x, sched), cusparselt.unsupported(x, v, sched) is None, wg=False)
    paths = {"cublas": [lambda w_=w_: F.linear(x, w_) for w_ in wds],
             "default": [lambda c=c: launch(x, *c, sched, None, n, cfg) for c in packs]}
    row = {"N": n, "K": k, "M": m, "sparsity": s, "default_engine": "decompress" if cfg.engine == "triton" else cfg.engine}
    for bn in wgmma.PREFILL_BLOCK_NS:
        row[f"err_wgmma{bn}"] = err(wgmma.run(x, d, v, e, sched, None, poison=True, block_n=bn), ref)
        if row[f"err_wgmma{bn}"] < 1e-2:
            paths[f"wgmma{bn}"] = [lambda c=c, bn=bn: wgmma.run(x, *c, sched, None, block_n=bn) for c in packs]
    row["err_default"] = err(launch(x, d, v, e, sched, None, n, cfg), ref)
    for name, ts in time_alternating(paths, ROUNDS).items():
        row[f"{name}_us"] = round(statistics.median(ts), 2)
        row[f"{name}_runs_us"] = [round(t, 2) for t in ts]
    for name in paths:
        if name != "cublas":
            row[f"{name}_vs_cublas"] = round(row["cublas_us"] / row[f"{name}_us"], 3)
    row["tflops_cublas"] = round(2 * m * n * k / row["cublas_us"] / 1e6, 1)
    log.write(json.dumps(row) + "\n")
    log.flush()
    del packs, wds
    torch.cuda.empty_cache()
    return row


def table(rows) -> str:
    out = ["| N x K | M | sparsity | cuBLAS us | previous default us (engine, vs cuBLAS) | wgmma 64 us (vs cuBLAS) |"
           " wgmma 128 us (vs cuBLAS) | best wgmma vs previous |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[f'wgmma{bn}_us']} ({r[f'wgmma{bn}_vs_cublas']}x)" if f"wgmma{bn}_us" in r
                 else f"err {r[f'err_wgmma{bn}']:.1e}" for bn in wgmma.PREFILL_BLOCK_NS]
        best = min((r[f"wgmma{bn}_us"] for bn in wgmma.PREFILL_BLOCK_NS if f"wgmma{bn}_us" in r), default=None)
        out.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['sparsity']} | {r['cublas_us']} | {r['default_us']} "
                   f"({r['default_engine']}, {r['default_vs_cublas']}x) | {' | '.join(cells)} | "
                   f"{round(r['default_us'] / best, 3) if best else '-'}x |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    sweep_args(ap, ms="2048", out="bench/results/prefill")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    ext = wgmma.extension()
    print(f"build/load {time.time() - t0:.1f} s", flush=True)
    if ext is None:
        sys.exit("the wgmma kernel did not build")
    rows = []
    with open(os.path.join(a.out, "prefill.jsonl"), "a") as log:
        if not a.skip_checks:
            ok = checks(log)
            print(f"checks {'passed' if ok else 'FAILED'} ({time.time() - t0:.1f} s)", flush=True)
        for n, k in SHAPES[a.shapes]:
            for m in map(int, a.ms.split(",")):
                for s in map(float, a.sparsities.split(",")):
                    rows.append(bench(n, k, m, s, log))
                    print(json.dumps({k_: v for k_, v in rows[-1].items() if "runs" not in k_}), flush=True)
    md = table(rows)
    env = machine_env("cuda", repeats=ROUNDS)
    save_results(a.out, "prefill", {"env": env, "rows": rows},
                 f"commit {env['commit']}, {env['device']}, torch {env['torch']}, triton {env['triton']}, "
                 f"{ROUNDS} repeats (medians; every run in *_runs_us)\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
