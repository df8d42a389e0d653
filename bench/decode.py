"""Decode (M=16) with both CUDA kernels launched as programmatic dependents, as the runtime launches them under CUDA
graph capture: float64 and bit-for-bit checks, then times at LLaMA-2-7B shapes.

    python bench/decode.py [--out DIR] [--sparsities 0,0.25,0.35,0.45,0.5] [--skip-checks] [--splits 2,4,6,8]
                               [--ab NAME=OLD.cu ...] [--after-write-all] [--half-splits 1,2]

1. checks: the wgmma decode kernel launched plainly and as a programmatic dependent (splits 1..8, bf16 / fp16,
   bias, SiLU * up; two row-tiles or half of one a CTA) against float64; a captured chain of six launches (wgmma and
   mma.sp, each reading the output of the one before) replayed after its input changed, equal bit for bit to the same
   chain launched plainly.
2. per 7B shape and sparsity, timed in alternation (ROUNDS rounds, medians) in CUDA graphs rotating over weight
   copies > L2 (bench/kernel_sweep.py), every launch after another launch of the same path ("chain"):
   - `default` / `default_plain`: what launch() runs for a user, programmatic (as captured) / plain (PATCHC_PDL=0);
   - `ms{w}x{s}`: the mma.sp kernel with w warps and s slices a CTA, programmatic (the default is 16 x 2 on the
     4096-row layers: one CTA an SM by registers; 8 x 2 leaves room for the next launch's CTAs);
   - `wg{s}` / `wg{s}_plain`: the wgmma decode kernel at split s, programmatic / plain;
   - `wh{s}`: the wgmma decode kernel with half a row-tile a CTA (rows=64) at split s, programmatic (`_plain`:
     plainly), where its clusters all fit at once (H100_MAX_CLUSTERS);
   - `default_after_write`: the default after an elementwise kernel (not programmatic) that writes its x, as a linear
     after a norm runs in a model (with --after-write-all every `ms*` / `wg*` / `wh*` / --ab path too:
     `{name}_after_write`);
   - `{name}_{s}`: with --ab NAME=FILE (repeatable), another version of codegen/wgmma.cu (same entry point) at split
     s, programmatic, timed in the same rounds on the same weights;
   - cuBLAS dense, the byte floor ((packed + x + y bytes) / the 1 GiB copy bandwidth) and the fastest streaming read
     of the packed bytes (kernels.read_floor_us).
One JSON line a case in decode.jsonl as it goes; decode.json and decode.md at the end.
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

from kernel_sweep import SHAPES, copy_bandwidth, err, make_layer, read_floor_us, rotating_copies, sweep_args, time_alternating

from report import machine_env, save_results, stats  # bench/report.py

from patchc import config
from patchc.codegen import mma_sp, wgmma
from patchc.codegen.device import pdl_enabled
from patchc.codegen.launch import H100_MAX_CLUSTERS, get_config, launch

ROUNDS = 2
AB = {}     # --ab NAME=FILE: other builds of wgmma.cu by name
AFTER_WRITE_ALL = False   # --after-write-all: every kernel path also timed after an elementwise kernel writing x
MMA_SP_LAUNCHES = ((16, 2),)   # (warps, slices) on 4096-row layers (8 x 2 and 4 x 2: slower, twelfth session)
WG_SPLITS = (2, 4, 6, 8)
PLAIN_SPLITS = (2, 6)
HALF_SPLITS = (1, 2)   # --half-splits: rows=64 CTAs (half a row-tile each)


def plain(f):
    """f run with programmatic dependent launch off (PATCHC_PDL=0 while it launches, e.g. while it is captured)."""
    def g():
        with config.override(pdl=False):
            return f()
    return g


def checks(log) -> bool:
    ok, n_checks = True, 0

    def record(line: dict, good: bool, **extra) -> None:
        nonlocal ok, n_checks
        ok &= good
        n_checks += 1
        log.write(json.dumps({**line, **extra, "ok": good}) + "\n")
        if not good:
            print(f"FAIL {line} {extra}", flush=True)

    for n, k in ((512, 1024), (640, 2048)):
        for s in (0.0, 0.5):
            for dt in (torch.bfloat16, torch.float16):
                x, d, v, e, sched, ref, _ = make_layer(n, k, 16, s, dtype=dt, seed=n + k + int(10 * s))
                bias = (torch.randn(n, device="cuda") * 0.1).to(dt)
                for split in range(1, min(8, k // 128) + 1):
                    for pdl in (False, True):
                        for rows in wgmma.ROWS:
                            y = wgmma.run(x, d, v, e, sched, bias, poison=True, block_n=16, split=split, pdl=pdl,
                                          rows=rows)
                            r = err(y, ref + bias.double())
                            record({"check": f"{n}x{k}", "s": s, "dtype": str(dt)[6:], "split": split, "pdl": pdl,
                                    "rows": rows}, r < 1e-2 and not torch.isnan(y).any(), rel_err=r)
    x, d, v, e, sched, ref, _ = make_layer(1024, 1024, 16, 0.4, seed=5)
    bias = (torch.randn(1024, device="cuda") * 0.1).to(x.dtype)
    full = ref + bias.double()
    want = F.silu(full[:, :512]) * full[:, 512:]
    for split in (1, 3):
        y = wgmma.run(x, d, v, e, sched, bias, poison=True, block_n=16, split=split, silu_mul=True, pdl=True)
        r = err(y, want)
        record({"check": "silu 2x512x1024", "split": split, "pdl": True}, r < 1e-2, rel_err=r)
    # A chain in which every launch reads the previous one's output: 4096 -> 4096 (wgmma split 4) -> 11008 (wgmma
    # split 2) -> 4096 (mma.sp) -> 4096 (wgmma split 6) -> 4096 (mma.sp) -> 4096 (wgmma, half a row-tile a CTA, split
    # 2), captured with programmatic launches and replayed after x changed, against the same launches made plainly.
    steps = [(4096, 4096, 0.5, "wg", 4), (11008, 4096, 0.35, "wg", 2), (4096, 11008, 0.45, "ms", 0),
             (4096, 4096, 0.0, "wg", 6), (4096, 4096, 0.25, "ms", 0), (4096, 4096, 0.35, "wh", 2)]
    layers = [make_layer(n, k, 16, s, seed=40 + i)[1:5] for i, (n, k, s, _, _) in enumerate(steps)]
    x0 = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)

    def chain(pdl: bool):
        h = x0
        for (n, k, s, kind, split), (d, v, e, sched) in zip(steps, layers):
            if kind in ("wg", "wh"):
                h = wgmma.run(h, d, v, e, sched, None, block_n=16, split=split, pdl=pdl,
                              rows=64 if kind == "wh" else 256)
            else:
                warps, sl = mma_sp.default_launch(16, n, 132)
                h = mma_sp.run(h, d, v, e, sched, None, n, warps, sl, pdl=pdl)
        return h

    chain(True)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.Stream()), torch.cuda.graph(g):
        y = chain(True)
    for rep in range(5):
        x0.copy_(torch.randn_like(x0))
        g.replay()
        want = chain(False)
        torch.cuda.synchronize()
        record({"check": "programmatic chain of 6 launches, replay vs plain", "rep": rep},
               bool(torch.equal(y, want)), max_abs_diff=float((y.float() - want.float()).abs().max()))
    print(f"checks: {n_checks} {'passed' if ok else 'FAILED'}", flush=True)
    return ok


def bench(n, k, s, bw, log) -> dict:
    m = 16
    x, d, v, e, sched, ref, p = make_layer(n, k, m, s)
    packs = rotating_copies((d, v, e), p.nbytes)
    wd = torch.randn(n, k, device="cuda", dtype=x.dtype) * 0.02
    wds = [c for (c,) in rotating_copies((wd,), wd.nbytes)]
    xs = [torch.randn_like(x) for _ in range(4)]
    cfg = get_config(x, d, v, e, sched, None, n, tune=False)      # what a user gets

    def add_ab(name, split, rows, key):   # --ab build `name` at this split and rows a CTA, programmatic
        def ab_run(c, poison=False):
            y = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device) if poison else \
                torch.empty((m, n), dtype=x.dtype, device=x.device)
            AB[name].hybrid_wgmma(x, *c, sched.slot, sched.kinds, None, y, 16, split, 0, int(pdl_enabled(x)), rows)
            return y
        try:
            row[f"err_{key}"] = err(ab_run((d, v, e), poison=True), ref)
        except RuntimeError as ex:   # an older build without this CTA shape
            print(f"--ab {name}: {key} skipped ({str(ex).splitlines()[0]})", flush=True)
            return
        paths[key] = [lambda c=c: ab_run(c) for c in packs]

    def after_write(c, i):
        x.copy_(xs[i % len(xs)])   # an elementwise kernel (not programmatic) writing x, as a norm before a linear
        return launch(x, *c, sched, None, n, cfg)

    paths = {"cublas": [lambda w_=w_: F.linear(x, w_) for w_ in wds],
             "default": [lambda c=c: launch(x, *c, sched, None, n, cfg) for c in packs],
             "default_plain": [plain(lambda c=c: launch(x, *c, sched, None, n, cfg)) for c in packs],
             "default_after_write": [lambda c=c, i=i: after_write(c, i) for i, c in enumerate(packs)]}
    row = {"N": n, "K": k, "M": m, "sparsity": s, "bytes": p.nbytes,
           "default_cfg": f"{cfg.engine} split {cfg.split_k}{' rows 64' if cfg.block_m == 64 else ''}"
           if cfg.engine == "wgmma" else
           f"{cfg.engine} {cfg.num_warps}x{cfg.block_n // 16}",
           "floor_us": round((p.nbytes + x.nbytes + m * n * 2) / bw * 1e6, 2),
           "err_default": err(launch(x, d, v, e, sched, None, n, cfg, poison=True), ref)}
    for warps, sl in MMA_SP_LAUNCHES:
        if mma_sp.launch_error(m, n, 128, warps, sl) is None:
            name = f"ms{warps}x{sl}"
            row[f"err_{name}"] = err(mma_sp.run(x, d, v, e, sched, None, n, warps, sl, poison=True, pdl=False), ref)
            paths[name] = [lambda c=c, w=warps, q=sl: mma_sp.run(x, *c, sched, None, n, w, q) for c in packs]
    for split in WG_SPLITS:
        row[f"err_wg{split}"] = err(wgmma.run(x, d, v, e, sched, None, poison=True, block_n=16, split=split), ref)
        paths[f"wg{split}"] = [lambda c=c, sp=split: wgmma.run(x, *c, sched, None, block_n=16, split=sp)
                               for c in packs]
        if split in PLAIN_SPLITS:
            paths[f"wg{split}_plain"] = [lambda c=c, sp=split: wgmma.run(x, *c, sched, None, block_n=16, split=sp,
                                                                         pdl=False) for c in packs]
        for name in AB:
            add_ab(name, split, 256, f"{name}_{split}")
    for split in HALF_SPLITS:
        if 2 * (n // 128) > H100_MAX_CLUSTERS[split - 1]:
            continue
        row[f"err_wh{split}"] = err(wgmma.run(x, d, v, e, sched, None, poison=True, block_n=16, split=split, rows=64),
                                    ref)
        paths[f"wh{split}"] = [lambda c=c, sp=split: wgmma.run(x, *c, sched, None, block_n=16, split=sp, rows=64)
                               for c in packs]
        paths[f"wh{split}_plain"] = [lambda c=c, sp=split: wgmma.run(x, *c, sched, None, block_n=16, split=sp, rows=64,
                                                                     pdl=False) for c in packs]
        for name in AB:
            add_ab(name, split, 64, f"{name}_h{split}")
    if AFTER_WRITE_ALL:   # each path also after the write that precedes most linears in a model (nothing to overlap)
        for name in [p for p in paths if p.startswith(("ms", "wg", "wh", *AB)) and not p.endswith("_plain")]:
            paths[f"{name}_after_write"] = [lambda f=f, i=i: (x.copy_(xs[i % len(xs)]), f()) for i, f in
                                            enumerate(paths[name])]
    for name, ts in time_alternating(paths, ROUNDS).items():
        row[f"{name}_us"] = round(statistics.median(ts), 2)
        row[f"{name}_stats_us"] = stats(ts)
    row.update(read_floor_us(p.nbytes))
    log.write(json.dumps(row) + "\n")
    log.flush()
    del packs, wds
    torch.cuda.empty_cache()
    return row


def table(env, rows) -> str:
    f = lambda r, key: f"{r[key]} ({r[key] / r['floor_us']:.2f})" if key in r else "-"  # noqa: E731
    out = [f"# Decode M=16 with programmatic dependent launches ({env['gpu']}, torch {env['torch']}, triton "
           f"{env['triton']}, copy {env['copy_GBps']} GB/s, {env['date']})", "",
           "us (/ byte floor); every launch after another of the same path in a CUDA graph, rotating over weight copies > "
           "L2. default: what launch() runs, programmatic as under capture; plain: PATCHC_PDL=0; after write: after an "
           "elementwise kernel writing x. msWxS: mma.sp with W warps x S slices a CTA; wgS: wgmma split S, programmatic / "
           "plain (then --ab's builds by name, programmatic); whS: wgmma with half a row-tile a CTA, split S, programmatic "
           "(/ after write with --after-write-all).", "",
           "| N x K | s | floor | read | cuBLAS | default (kernel) | default plain | default after write | "
           + " | ".join(f"ms{w}x{s}" for w, s in MMA_SP_LAUNCHES) + " | "
           + " | ".join(f"wg{s} / plain" for s in WG_SPLITS) + " | "
           + " | ".join(f"wh{s}" for s in HALF_SPLITS) + " |",
           "|---|---|---|---|---|---|---|---|" + "---|" * (len(MMA_SP_LAUNCHES) + len(WG_SPLITS) + len(HALF_SPLITS))]
    for r in rows:
        out.append(f"| {r['N']}x{r['K']} | {r['sparsity']} | {r['floor_us']} | {r['read_us']} | {r['cublas_us']} | "
                   f"{f(r, 'default_us')} {r['default_cfg']} | {f(r, 'default_plain_us')} | "
                   f"{f(r, 'default_after_write_us')} | "
                   + " | ".join(f(r, f"ms{w}x{s}_us") for w, s in MMA_SP_LAUNCHES) + " | "
                   + " | ".join(f"{f(r, f'wg{s}_us')} / {r.get(f'wg{s}_plain_us', '-')}"
                                + "".join(f" / {name} {r[f'{name}_{s}_us']}" for name in AB if f"{name}_{s}_us" in r)
                                for s in WG_SPLITS) + " | "
                   + " | ".join(f(r, f"wh{s}_us") + (f" / {r[f'wh{s}_after_write_us']}" if f"wh{s}_after_write_us" in r
                                                     else "")
                                + "".join(f" / {name} {r[f'{name}_h{s}_us']}" for name in AB if f"{name}_h{s}_us" in r)
                                for s in HALF_SPLITS) + " |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    sweep_args(ap, ms="16", out="bench/results/decode")
    ap.add_argument("--splits", default="2,4,6,8", help="wgmma splits to time (the default path is timed anyway)")
    ap.add_argument("--half-splits", default="1,2", help="splits of the rows=64 (half a row-tile a CTA) wgmma decode")
    ap.add_argument("--after-write-all", action="store_true",
                    help="time every mma.sp / wgmma path also after an elementwise kernel writing x")
    ap.add_argument("--ab", action="append", default=[], metavar="NAME=FILE",
                    help="another version of codegen/wgmma.cu to time beside the current one (repeatable)")
    a = ap.parse_args()
    global WG_SPLITS, HALF_SPLITS, AFTER_WRITE_ALL
    WG_SPLITS = tuple(int(v) for v in a.splits.split(","))
    HALF_SPLITS = tuple(int(v) for v in a.half_splits.split(",") if v)
    AFTER_WRITE_ALL = a.after_write_all
    for spec in a.ab:
        name, _, path = spec.partition("=")
        if not (name.isidentifier() and path):
            sys.exit(f"--ab {spec!r}: want NAME=FILE, NAME an identifier")
        with open(path) as f:
            AB[name] = wgmma._KERNEL.build(wgmma.source(f.read()))
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    if wgmma.extension() is None or mma_sp.extension() is None:
        sys.exit("a kernel did not build")
    print(f"build/load {time.time() - t0:.1f} s", flush=True)
    bw = copy_bandwidth()
    env = machine_env("cuda", repeats=ROUNDS, copy_GBps=round(bw / 1e9, 1))
    print(env, flush=True)
    rows, ok = [], None
    with open(os.path.join(a.out, "decode.jsonl"), "a", buffering=1) as log:   # (line by line: a hang shows where)
        if not a.skip_checks:
            ok = checks(log)
        for n, k in SHAPES[a.shapes]:
            for s in map(float, a.sparsities.split(",")):
                rows.append(bench(n, k, s, bw, log))
                r = rows[-1]
                print(" ".join(f"{key}={val}" for key, val in r.items() if key.endswith("_us") or key in
                               ("N", "K", "sparsity", "default_cfg")), flush=True)
    md = table(env, rows)
    save_results(a.out, "decode", {"env": env, "checks_ok": ok, "decode": rows}, md)
    print(md)
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
