"""Decode on the wgmma kernel (codegen/wgmma.cu, sm_90a: 16-token CTAs, K split over a thread-block cluster) and
its fused SiLU(gate) * up epilogue: float64 checks, then times against the decode default (the mma.sp kernel),
cuBLAS dense and the byte floor, at LLaMA-2-7B shapes.

    python bench/decode_wgmma_check.py [--out DIR] [--ms 16,1] [--sparsities 0,0.25,0.35,0.45,0.5] [--skip-checks]

1. checks: block_n 16 at every split 1..8 (at most the K-tiles), M 1 / 5 / 16, bf16 / fp16, bias, odd row-tile
   counts, 0 / 30 / 50% 2:4 tiles, NaN-poisoned outputs; silu_mul (stacked [gate; up]) at block_n 16 / 64 / 128,
   split 1 and 3, with a bias; a cluster launch captured in a CUDA graph and replayed after x changed.
2. decode sweep: per 7B shape, M and sparsity the mma.sp default, the wgmma kernel at each split, and cuBLAS on a
   dense weight of the shape, timed in alternation (ROUNDS rounds, medians) in CUDA graphs rotating over weight
   copies > L2; the byte floor = (packed + x + y bytes) / the 1 GiB copy bandwidth, and the fastest streaming
   read of the packed bytes (bench/decode_l2_pdl.py's read floor).
3. SiLU * up: the stacked [gate; up] of the 7B MLP (2 x 11008 x 4096) at M=16 (mma.sp fused vs wgmma fused) and
   M=2048 (wgmma + SiLU * up in torch, as launch ran it, vs wgmma fused).
One JSON line a case in decode_wgmma.jsonl as it goes; decode_wgmma.json and decode_wgmma.md at the end.
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
import triton

from decode_l2_pdl import read_floor_us  # bench/decode_l2_pdl.py
from kernel_bench import (SHAPES, copy_bandwidth, make_layer, rotating_copies, sweep_args,  # bench/kernel_bench.py
                     time_alternating)
from mma_sp_check import err  # bench/mma_sp_check.py
from report import save_results  # bench/report.py

from patchc.codegen import mma_sp, wgmma
from patchc.codegen.launch import get_config, launch

ROUNDS = 2
OLD = None   # --ab: an older build of wgmma.cu, timed beside the current one
SPLITS = (1, 2, 3, 4, 6, 8)


def splits_for(k: int) -> list[int]:
    return [s for s in SPLITS if s <= k // 128]


def build_old(path: str):
    """Another version of wgmma.cu, built under its own name: one from before the twelfth session, whose hybrid_wgmma
    has no pdl argument (bench/decode_pdl.py --ab builds versions with the current one)."""
    import hashlib

    from torch.utils.cpp_extension import load_inline

    src = wgmma.source(open(path).read())
    decl = ("void hybrid_wgmma(torch::Tensor x, torch::Tensor dense, torch::Tensor values, torch::Tensor meta, "
            "torch::Tensor slot, c10::optional<torch::Tensor> bias, torch::Tensor y, int64_t block_n, int64_t split, "
            "int64_t silu_mul);")
    name = f"patchc_wgmma_ab_{hashlib.sha256(src.encode()).hexdigest()[:12]}"
    return load_inline(name, cpp_sources=decl, cuda_sources=src, functions=["hybrid_wgmma"],
                       extra_cuda_cflags=wgmma._KERNEL.flags)


def checks(log) -> bool:
    ok = True

    def record(line: dict, y, ref) -> None:
        nonlocal ok
        r = err(y, ref)
        nan = int(torch.isnan(y).sum())
        good = nan == 0 and r < 1e-2
        ok &= good
        log.write(json.dumps({**line, "rel_err": r, "nan": nan, "ok": good}) + "\n")
        if not good:
            print(f"FAIL {line}: rel err {r:.2e} nan {nan}", flush=True)

    n_checks = 0
    for n, k in ((384, 1024), (512, 1024), (640, 2048)):
        for s in (0.0, 0.3, 0.5):
            for m in (1, 5, 16):
                for dt in (torch.bfloat16, torch.float16):
                    x, d, v, e, sched, ref, _ = make_layer(n, k, m, s, dtype=dt, seed=n + k + m + int(10 * s))
                    bias = (torch.randn(n, device="cuda") * 0.1).to(dt)
                    for split in splits_for(k) + [5, 7]:
                        if split > k // 128:
                            continue
                        use_bias = split % 2 == 1
                        y = wgmma.run(x, d, v, e, sched, bias if use_bias else None, poison=True, block_n=16,
                                      split=split)
                        record({"check": f"{n}x{k}", "s": s, "M": m, "dtype": str(dt)[6:], "split": split,
                                "bias": use_bias}, y, ref + (bias.double() if use_bias else 0))
                        n_checks += 1
    # SiLU(gate) * up: W = [gate; up], 2 x 512 rows (an even number of row-tiles per half)
    for m, bn in ((16, 16), (1, 16), (300, 64), (300, 128)):
        for split in (1, 3):
            if bn > 16 and split > 1:
                continue
            x, d, v, e, sched, ref, _ = make_layer(1024, 1024, m, 0.4, seed=m + split)
            bias = (torch.randn(1024, device="cuda") * 0.1).to(x.dtype)
            full = ref + bias.double()
            want = F.silu(full[:, :512]) * full[:, 512:]
            y = wgmma.run(x, d, v, e, sched, bias, poison=True, block_n=bn, split=split, silu_mul=True)
            record({"check": "silu 2x512x1024", "M": m, "block_n": bn, "split": split}, y, want)
            n_checks += 1
    # a cluster launch in a CUDA graph, replayed after x changed
    x, d, v, e, sched, ref, p = make_layer(4096, 4096, 16, 0.35, seed=3)
    wgmma.run(x, d, v, e, sched, None, block_n=16, split=8)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.Stream()), torch.cuda.graph(g):
        y = wgmma.run(x, d, v, e, sched, None, block_n=16, split=8)
    for rep in range(3):
        x2 = torch.randn_like(x)
        x.copy_(x2)
        g.replay()
        torch.cuda.synchronize()
        want = wgmma.run(x, d, v, e, sched, None, block_n=16, split=1)   # checked above against float64
        same = torch.equal(y, want) or err(y, want.double()) < 1e-2
        ok &= same
        log.write(json.dumps({"check": "graph replay 4096x4096 split 8", "rep": rep, "ok": same}) + "\n")
        n_checks += 1
    print(f"checks: {n_checks} {'passed' if ok else 'FAILED'}", flush=True)
    return ok


def bench(n, k, m, s, bw, log) -> dict:
    x, d, v, e, sched, ref, p = make_layer(n, k, m, s)
    packs = rotating_copies((d, v, e), p.nbytes)
    wd = torch.randn(n, k, device="cuda", dtype=x.dtype) * 0.02
    wds = [c for (c,) in rotating_copies((wd,), wd.nbytes)]
    warps, sl = mma_sp.default_launch(m, n, 132)
    cfg = get_config(x, d, v, e, sched, None, n, tune=False)      # what a user gets
    paths = {"cublas": [lambda w_=w_: F.linear(x, w_) for w_ in wds],
             "mma_sp": [lambda c=c: mma_sp.run(x, *c, sched, None, n, warps, sl) for c in packs],
             "default": [lambda c=c: launch(x, *c, sched, None, n, cfg) for c in packs]}
    row = {"N": n, "K": k, "M": m, "sparsity": s, "bytes": p.nbytes,
           "default_cfg": f"{cfg.engine} split {cfg.split_k}" if cfg.engine == "wgmma" else cfg.engine,
           "err_default": err(launch(x, d, v, e, sched, None, n, cfg, poison=True), ref),
           "floor_us": round((p.nbytes + x.nbytes + m * n * 2) / bw * 1e6, 2),
           "err_mma_sp": err(mma_sp.run(x, d, v, e, sched, None, n, warps, sl, poison=True), ref)}
    if OLD is not None:   # --ab: the older kernel at the splits the defaults use
        for split in (1, 2, 4, 6):
            def old_run(c, sp=split):
                y = torch.empty((m, n), dtype=x.dtype, device=x.device)
                OLD.hybrid_wgmma(x, *c, sched.slot, None, y, 16, sp, 0)
                return y
            row[f"err_old{split}"] = err(old_run((d, v, e)), ref)
            paths[f"old{split}"] = [lambda c=c, f=old_run: f(c) for c in packs]
    for split in splits_for(k):
        try:
            row[f"err_wg{split}"] = err(wgmma.run(x, d, v, e, sched, None, poison=True, block_n=16, split=split), ref)
        except Exception as ex:  # noqa: BLE001 - e.g. a cluster that cannot be scheduled: reported
            row[f"error_wg{split}"] = f"{type(ex).__name__}: {str(ex)[:160]}"
            continue
        if row[f"err_wg{split}"] < 1e-2:
            paths[f"wg{split}"] = [lambda c=c, sp=split: wgmma.run(x, *c, sched, None, block_n=16, split=sp)
                                   for c in packs]
    for name, ts in time_alternating(paths, ROUNDS).items():
        row[f"{name}_us"] = round(statistics.median(ts), 2)
    wgs = {name: row[f"{name}_us"] for name in paths if name.startswith("wg")}
    if wgs:
        best = min(wgs, key=wgs.get)
        row["best_split"] = int(best[2:])
        row["wg_us"] = wgs[best]
    row.update(read_floor_us(p.nbytes))
    log.write(json.dumps(row) + "\n")
    log.flush()
    del packs, wds
    torch.cuda.empty_cache()
    return row


def bench_silu(m, bw, log) -> dict:
    """The 7B MLP's stacked [gate; up] (22016 x 4096) at 35%: fused epilogues against what ran before."""
    n, k = 2 * 11008, 4096
    x, d, v, e, sched, ref, p = make_layer(n, k, m, 0.35, seed=11)
    want = F.silu(ref[:, :11008]) * ref[:, 11008:]
    packs = rotating_copies((d, v, e), p.nbytes)
    row = {"N": n, "K": k, "M": m, "sparsity": 0.35, "silu_mul": True,
           "floor_us": round((p.nbytes + x.nbytes + m * 11008 * 2) / bw * 1e6, 2)}
    if m <= 16:
        warps, sl = mma_sp.default_launch(m, 11008, 132, silu_mul=True)
        paths = {"mma_sp_fused": lambda c: mma_sp.run(x, *c, sched, None, 11008, warps, sl, silu_mul=True)}
        for split in (1, 2, 3, 4):
            paths[f"wg{split}_fused"] = lambda c, sp=split: wgmma.run(x, *c, sched, None, block_n=16, split=sp,
                                                                     silu_mul=True)
    else:
        bn = 128

        def stacked(c):
            y = wgmma.run(x, *c, sched, None, block_n=bn)
            return F.silu(y[:, :11008]) * y[:, 11008:]
        paths = {"wg_then_torch": stacked,
                 "wg_fused": lambda c: wgmma.run(x, *c, sched, None, block_n=bn, silu_mul=True)}
    for name, f in paths.items():
        row[f"err_{name}"] = err(f((d, v, e)), want)
    calls = {name: [lambda c=c, f=f: f(c) for c in packs] for name, f in paths.items()}
    for name, ts in time_alternating(calls, ROUNDS).items():
        row[f"{name}_us"] = round(statistics.median(ts), 2)
    log.write(json.dumps(row) + "\n")
    log.flush()
    del packs
    torch.cuda.empty_cache()
    return row


def table(env, rows, silu_rows) -> str:
    out = [f"# Decode on the wgmma kernel ({env['gpu']}, torch {env['torch']}, triton {env['triton']}, copy "
           f"{env['copy_GBps']} GB/s, {env['date']})", "",
           "floor: (packed + x + y bytes) / copy bandwidth; read: the fastest streaming read of the packed bytes; "
           "wgmma: 16-token CTAs, K split over a cluster of `split` CTAs (best split shown, every split in the JSON).",
           "default: what get_config gives a user (the kernel and split in the last column).",
           "", "| N x K | M | s | floor us | read us | cuBLAS us | mma.sp us (/floor) | wgmma us (/floor) | split | "
           "wgmma / mma.sp | default us (/floor, vs cuBLAS, kernel) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wg = r.get("wg_us")
        out.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['sparsity']} | {r['floor_us']} | {r['read_us']} | "
                   f"{r['cublas_us']} | {r['mma_sp_us']} ({r['mma_sp_us'] / r['floor_us']:.2f}) | "
                   + (f"{wg} ({wg / r['floor_us']:.2f}) | {r['best_split']} | {wg / r['mma_sp_us']:.3f} | "
                      if wg else "- | - | - | ")
                   + f"{r['default_us']} ({r['default_us'] / r['floor_us']:.2f}, {r['cublas_us'] / r['default_us']:.2f}x, "
                     f"{r['default_cfg']}) |")
    if silu_rows:
        out += ["", "SiLU(gate) * up, stacked [gate; up] 22016 x 4096 at 35%:", "",
                "| M | paths (us) |", "|---|---|"]
        for r in silu_rows:
            out.append(f"| {r['M']} | " + ", ".join(f"{k[:-3]} {v}" for k, v in r.items() if k.endswith("_us"))
                       + " |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    sweep_args(ap, ms="16,1", out="bench/results/decode_wgmma")
    ap.add_argument("--no-silu", action="store_true")
    ap.add_argument("--ab", default=None, help="another version of codegen/wgmma.cu to time beside the current one")
    ap.add_argument("--build-only", action="store_true", help="with --ab: build that version and stop")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    if a.ab:
        global OLD
        OLD = build_old(a.ab)
        if a.build_only:
            return
    ext, ext2 = wgmma.extension(), mma_sp.extension()
    print(f"build/load {time.time() - t0:.1f} s", flush=True)
    if ext is None or ext2 is None:
        sys.exit("a kernel did not build")
    bw = copy_bandwidth()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "copy_GBps": round(bw / 1e9, 1), "date": time.strftime("%Y-%m-%d"),
           "max_clusters_bn16": {s: wgmma.max_clusters(0, 16, s) for s in range(1, wgmma.MAX_SPLIT + 1)}}
    print(env, flush=True)
    rows, silu_rows, ok = [], [], None
    with open(os.path.join(a.out, "decode_wgmma.jsonl"), "a") as log:
        if not a.skip_checks:
            ok = checks(log)
            print(f"({time.time() - t0:.1f} s)", flush=True)
        for m in map(int, a.ms.split(",")):
            for n, k in SHAPES[a.shapes]:
                for s in map(float, a.sparsities.split(",")):
                    if m == 1 and s not in (0.0, 0.5):
                        continue
                    rows.append(bench(n, k, m, s, bw, log))
                    r = rows[-1]
                    print(f"{n}x{k} M={m} s={s}: floor {r['floor_us']} read {r['read_us']} cuBLAS {r['cublas_us']} "
                          f"mma_sp {r['mma_sp_us']} default {r['default_us']} ({r['default_cfg']}) | "
                          + " ".join(f"old{sp} {r[f'old{sp}_us']}" for sp in (1, 2, 4, 6) if f"old{sp}_us" in r) + " | "
                          + " ".join(f"wg{sp} {r[f'wg{sp}_us']}" for sp in SPLITS
                                                                  if f"wg{sp}_us" in r), flush=True)
        if not a.no_silu:
            for m in (16, 2048):
                silu_rows.append(bench_silu(m, bw, log))
                print(json.dumps(silu_rows[-1]), flush=True)
    res = {"env": env, "checks_ok": ok, "decode": rows, "silu": silu_rows}
    md = table(env, rows, silu_rows)
    save_results(a.out, "decode_wgmma", res, md)
    print(md)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
