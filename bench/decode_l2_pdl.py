"""Decode (mma.sp kernel): programmatic dependent launch, and the read floor of a decode layer's bytes.

One device call answers, at the LLaMA-2-7B shapes (bench/NOTES.md, "Eighth session"):
  1. correctness: plain and programmatic launches against float64 (tiles 64/128, bf16/fp16, M 1..32, bias,
     SiLU*up), and a captured two-layer chain with programmatic launches whose input changes between replays,
     compared bit for bit with the same chain launched plainly (a read of x before the previous kernel's writes
     shows);
  2. the sweep: default (warps, slices), pdl off / on, timed two ways in CUDA graphs rotating over weight copies
     > L2: "chain" (the kernel after itself, as bench/kernel_bench.py times it) and "after write" (each call preceded
     by an elementwise kernel writing its x, as in a model);
  3. the read floor: the fastest of several streaming-read kernels over the same packed bytes (and a copy of
     them), same rotation, to put the byte floor (bytes / 1 GiB-copy bandwidth) beside what a read of this
     size achieves.
(The first two calls also timed weights prefetched into L2 by the bulk copy engine, `l2_ahead`, since removed:
slower everywhere; results/decode_l2_pdl/call*.)
    python bench/decode_l2_pdl.py --out bench/results/decode_l2_pdl [--quick] [--no-check] [--cases N x K:M:s,...]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from patchc.codegen import mma_sp
from patchc.codegen.launch import graph_time_ms

from kernel_bench import copy_bandwidth, make_layer, rotating_copies  # bench/kernel_bench.py
from report import save_results  # bench/report.py

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]


def rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def check(quick: bool) -> list[dict]:
    """float64 checks of every variant, small shapes and one 7B shape; asserts, returns the rows."""
    rows = []
    cases = [(384, 640, 64), (512, 1024, 128), (4096, 4096, 128)]
    for n, k, tile in cases:
        for dtype in (torch.bfloat16, torch.float16):
            for m in ((1, 16) if quick else (1, 5, 16, 24, 32)):
                for s in (0.0, 0.3, 0.5):
                    x, d, v, e, sched, ref, p = make_layer(n, k, m, s, tile=tile, dtype=dtype, seed=m + n)
                    for pdl in (False, True):
                        warps, sl = mma_sp.default_launch(m, n, 132, tile)
                        y = mma_sp.run(x, d, v, e, sched, None, n, warps, sl, poison=True, pdl=pdl)
                        err = rel_err(y, ref)
                        assert err < 1.5e-2, (n, k, m, s, dtype, pdl, err)
                        rows.append({"N": n, "K": k, "tile": tile, "dtype": str(dtype), "M": m, "s": s,
                                     "pdl": pdl, "rel_err": err})
    # SiLU(gate) * up and bias
    n, k = 1024, 512
    x, d, v, e, sched, ref, p = make_layer(2 * n, k, 16, 0.4, seed=7)
    bias = torch.randn(2 * n, device="cuda", dtype=x.dtype)
    full = ref + bias.double()
    want = F.silu(full[:, :n]) * full[:, n:]
    warps, sl = mma_sp.default_launch(16, n, 132, 128, silu_mul=True)
    for pdl in (False, True):
        y = mma_sp.run(x, d, v, e, sched, bias, n, warps, sl, poison=True, silu_mul=True, pdl=pdl)
        err = rel_err(y, want)
        assert err < 1.5e-2, ("silu", pdl, err)
        rows.append({"N": n, "K": k, "silu_mul": True, "bias": True, "M": 16, "pdl": pdl, "rel_err": err})
    print(f"float64 checks: {len(rows)} passed, max rel err {max(r['rel_err'] for r in rows):.2e}", flush=True)
    return rows


def chain_check(replays: int = 20) -> dict:
    """y2 = L2(L1(x)) captured with programmatic launches, x changed before each replay: equal bit for bit to the
    plain launches (the second kernel must not read L1's output before L1 is done)."""
    m = 16
    x, d1, v1, e1, s1, _, _ = make_layer(11008, 4096, m, 0.5, seed=1)
    _, d2, v2, e2, s2, _, _ = make_layer(4096, 11008, m, 0.5, seed=2)
    w1, w2 = mma_sp.default_launch(m, 11008, 132), mma_sp.default_launch(m, 4096, 132)

    def fwd(pdl):
        h = mma_sp.run(x, d1, v1, e1, s1, None, 11008, *w1, pdl=pdl)
        return mma_sp.run(h, d2, v2, e2, s2, None, 4096, *w2, pdl=pdl)

    graphs, outs = {}, {}
    for pdl in (False, True):
        fwd(pdl)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs[pdl] = fwd(pdl)
        graphs[pdl] = g
    mismatches = 0
    for r in range(replays):
        x.copy_(torch.randn_like(x))
        for pdl in (False, True):
            graphs[pdl].replay()
        torch.cuda.synchronize()
        mismatches += int(not torch.equal(outs[False], outs[True]))
    assert mismatches == 0, f"programmatic chain differs from the plain one in {mismatches} of {replays} replays"
    print(f"chain check: {replays} replays, programmatic == plain bit for bit", flush=True)
    return {"replays": replays, "mismatches": mismatches}


@triton.jit
def _read_kernel(src, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Streams int32 words: each program sums ITERS blocks and writes one word (the read floor)."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    base = pid * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src + offs, mask=offs < n, other=0)
    tl.store(out + pid, tl.sum(acc, axis=0))


def read_floor_us(nbytes: int) -> dict:
    """Fastest streaming read (and a device copy) of nbytes, rotating over buffers > L2, in CUDA graphs."""
    words = nbytes // 4
    bufs = [b for (b,) in rotating_copies((torch.randint(-100, 100, (words,), device="cuda", dtype=torch.int32),),
                                          nbytes)]
    best, best_cfg = float("inf"), None
    for block in (2048, 4096):
        for iters in (2, 4, 8):
            for warps in (8,):
                grid = (triton.cdiv(words, block * iters),)
                out = torch.empty(grid[0], device="cuda", dtype=torch.int32)
                fns = [lambda b=b, o=out, bl=block, it=iters, w=warps: _read_kernel[grid](b, o, words, BLOCK=bl,
                                                                                      ITERS=it, num_warps=w)
                       for b in bufs]
                us = graph_time_ms(fns) * 1e3
                if us < best:
                    best, best_cfg = us, (block, iters, warps)
    dst = torch.empty_like(bufs[0])
    copy_us = graph_time_ms([lambda b=b: dst.copy_(b) for b in bufs]) * 1e3
    del bufs
    torch.cuda.empty_cache()
    return {"read_us": round(best, 2), "read_cfg": best_cfg, "copy_us": round(copy_us, 2)}


def time_variant(x, packs, sched, n, warps, sl, pdl, after_write: bool, xs=None) -> float:
    def call(c, i):
        if after_write:
            x.copy_(xs[i % len(xs)])  # what precedes a linear in a model: an elementwise kernel writing its x
        return mma_sp.run(x, *c, sched, None, n, warps, sl, pdl=pdl)
    return graph_time_ms([lambda c=c, i=i: call(c, i) for i, c in enumerate(packs)]) * 1e3


def sweep(cases, bw, out_rows: list, log_path: str | None = None) -> None:
    """cases: (N, K, M, sparsity); each row is also appended to log_path (JSON lines) as soon as it is measured."""
    for n, k, m, s in cases:
        x, d, v, e, sched, ref, p = make_layer(n, k, m, s)
        warps, sl = mma_sp.default_launch(m, n, 132)
        packs = rotating_copies((d, v, e), p.nbytes)
        xs = [torch.randn_like(x) for _ in range(4)]
        write_us = graph_time_ms([lambda i=i: x.copy_(xs[i]) for i in range(len(xs))]) * 1e3
        wd = torch.randn(n, k, device="cuda", dtype=x.dtype) * 0.02
        wds = [c for (c,) in rotating_copies((wd,), wd.nbytes)]
        cublas = graph_time_ms([lambda w_=w_: F.linear(x, w_) for w_ in wds]) * 1e3
        del wds
        floor = (p.nbytes + x.nbytes + m * n * 2) / bw * 1e6
        rf = read_floor_us(p.nbytes)
        row = {"N": n, "K": k, "M": m, "sparsity": s, "warps": warps, "slices": sl, "bytes": p.nbytes,
               "floor_us": round(floor, 2), **rf, "cublas_us": round(cublas, 2), "write_us": round(write_us, 2),
               "chain": {}, "after_write": {}}
        for rnd in range(2):  # two rounds, interleaved; the median of the rounds' times per variant
            for pdl in (False, True):
                key = f"pdl={int(pdl)}"
                row["chain"].setdefault(key, []).append(time_variant(x, packs, sched, n, warps, sl, pdl, False))
                row["after_write"].setdefault(key, []).append(
                    time_variant(x, packs, sched, n, warps, sl, pdl, True, xs))
        for mode in ("chain", "after_write"):
            row[mode] = {kk: round(statistics.median(vv), 2) for kk, vv in row[mode].items()}
        base = row["chain"]["pdl=0"]
        best = min(row["chain"], key=row["chain"].get)
        row["best_chain"] = best
        print("  chain       " + " ".join(f"{kk} {vv:.2f}" for kk, vv in row["chain"].items()), flush=True)
        print("  after write " + " ".join(f"{kk} {vv:.2f}" for kk, vv in row["after_write"].items()),
              flush=True)
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        print(f"{n}x{k} M={m} s={s} ({warps}w{sl}s) floor {floor:.2f} read {rf['read_us']:.2f} "
              f"copy {rf['copy_us']:.2f} cuBLAS {cublas:.2f} | chain base {base:.2f} best {best} "
              f"{row['chain'][best]:.2f} | after-write base {row['after_write']['pdl=0']:.2f} "
              f"best {min(row['after_write'].values()):.2f} (write {write_us:.2f})", flush=True)
        out_rows.append(row)
        del packs
        torch.cuda.empty_cache()


def table(env: dict, rows: list[dict]) -> str:
    """The markdown table of a sweep: floor, read floor, cuBLAS, the plain and programmatic launches."""
    lines = [f"# Decode: programmatic launch and the read floor ({env['gpu']}, torch {env['torch']}, triton "
             f"{env['triton']}, copy {env['copy_bandwidth_GBps']} GB/s, {env['date']})", "",
             "chain: the kernel after itself in a CUDA graph (as bench/kernel_bench.py times); after write: each call "
             "preceded by an elementwise kernel writing its x (as in a model). read: the fastest streaming read of "
             "the packed bytes.", "",
             "| N x K | M | s | floor us | read us (/floor) | cuBLAS us | plain us | plain/floor | plain/read | "
             "pdl chain us (/plain) | after write: plain us | pdl us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, w = r["chain"], r["after_write"]
        lines.append(f"| {r['N']}x{r['K']} | {r['M']} | {r['sparsity']} | {r['floor_us']} | {r['read_us']} "
                     f"({r['read_us'] / r['floor_us']:.2f}) | {r['cublas_us']} | {c['pdl=0']} | "
                     f"{c['pdl=0'] / r['floor_us']:.2f} | {c['pdl=0'] / r['read_us']:.2f} | {c['pdl=1']} "
                     f"({c['pdl=1'] / c['pdl=0']:.3f}) | {w['pdl=0']} | {w['pdl=1']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/decode_l2_pdl")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 and chain checks")
    ap.add_argument("--cases", default="", help="N x K:M:sparsity,... (default: the 7B shapes at M=16 25-50%%, M=1 50%%)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    mma_sp.extension()
    print(f"build/load {time.time() - t0:.1f}s", flush=True)
    bw = copy_bandwidth()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "copy_bandwidth_GBps": round(bw / 1e9, 1),
           "date": time.strftime("%Y-%m-%d")}
    print(env, flush=True)
    checks = [] if a.no_check else check(a.quick)
    chain = None if a.no_check else chain_check()
    if a.cases:
        cases = []
        for c in a.cases.split(","):
            nk, m, s = c.split(":")
            n, k = map(int, nk.split("x"))
            cases.append((n, k, int(m), float(s)))
    else:
        cases = [(n, k, m, s) for n, k in SHAPES
                 for m, ss in ([(16, (0.5,))] if a.quick else [(16, (0.25, 0.35, 0.45, 0.5)), (1, (0.5,))]) for s in ss]
    rows = []
    sweep(cases, bw, rows, os.path.join(a.out, "decode_l2_pdl.jsonl"))
    res = {"env": env, "checks": len(checks), "max_rel_err": max((r["rel_err"] for r in checks), default=None),
           "chain_check": chain, "sweep": rows}
    md = table(env, rows)   # the short table, last
    save_results(a.out, "decode_l2_pdl", res, md)
    print(md)
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
