"""Where a decode launch's time goes, from inside the kernels (GPU): builds of codegen/mma_sp.cu and wgmma.cu with
PATCHC_TRACE defined record the global timer and the SM clock at fixed points of every CTA's life (the points are
marked PATCHC_TRACE_AT in the sources), for the last launch of a CUDA graph that cycles over weight copies > L2, as
the timings of bench/kernel_bench.py do. Per case it prints the per-call time of the graph, and, measured from the first
CTA's start, the median and the latest CTA at each point; what the CTAs do not cover (per call minus the span from
the first CTA's start to the last CTA's end) is the launch gap between two kernels of the graph.

    mma.sp points: 0 start, 1 the schedule has arrived (the first tile's K column), 2 the first tile's MMAs are done,
                   3 warp 0's tiles are done, 4 all warps' (the reduction starts), 5 end (thread 0)
    wgmma points:  0 start, 1 slots and barriers ready, 2 the producer issued its last copy, 3 the first stage landed,
                   4 the consumer's last wgmma is done, 5 past the cluster barrier (every CTA's receive barrier is
                   initialised), 6 the other CTAs' partials have landed, 7 they are summed and this CTA's share of
                   y is stored (one loop since the fourteenth session), 8 the same point, 9 end: past the second
                   cluster barrier phase (thread 128)

    python bench/trace_decode.py [--out DIR] [--sparsities 0,0.5] [--pdl] [--cases 4096x4096:6,...] [--kernels wgmma]

Besides the summary (trace_decode.{json,md}), trace_decode_raw.json keeps every CTA's points (us after the first CTA's
start, the global timer) and the SM it ran on, for the timelines the summary hides (which CTAs start early, who waits
on whom).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton
from torch.utils.cpp_extension import load_inline

from kernel_bench import make_layer, rotating_copies  # bench/kernel_bench.py
from report import save_results  # bench/report.py

from patchc.codegen import mma_sp, wgmma
from patchc.codegen.launch import capture_graph

MMA_SP_POINTS = ("start", "schedule", "tile1", "warp0", "reduce", "end")
WGMMA_POINTS = ("start", "slots", "issued", "landed", "mainloop", "visible", "reduced", "summed", "stored", "end")
CASES = [(4096, 4096, 6), (11008, 4096, 2), (4096, 11008, 6)]   # N, K, the wgmma split timed


def build_traced(kernels=("wgmma", "mma_sp")):
    """The two extensions (those named in `kernels`; None for the others) with PATCHC_TRACE defined, under names of
    their own (each with its kernel's declarations and flags, plus the trace reader PATCHC_TRACE_HOST defines)."""
    def traced(kernel, source, prefix):
        extra = [f"{prefix}_trace_read", f"{prefix}_trace_clear"]
        return load_inline(f"{kernel.name}_trace", cpp_sources=kernel.decl + f"\ntorch::Tensor {extra[0]}();"
                           f"\nvoid {extra[1]}();", cuda_sources="#define PATCHC_TRACE\n" + source(),
                           functions=kernel.functions + extra, extra_cuda_cflags=kernel.flags)
    return (traced(wgmma._KERNEL, wgmma.source, "wgmma") if "wgmma" in kernels else None,
            traced(mma_sp._KERNEL, mma_sp.source, "mma_sp") if "mma_sp" in kernels else None)


def trace_graph(fns: list, clear, read, reps: int = 2) -> tuple[float, torch.Tensor]:
    """(us a call of the graph cycling through fns, the trace rows of its last launch)."""
    g = capture_graph(fns, reps)
    us = triton.testing.do_bench(g.replay, warmup=5, rep=50, return_mode="median") * 1e3 / (reps * len(fns))
    g.replay()
    torch.cuda.synchronize()
    clear()
    torch.cuda.synchronize()
    g.replay()
    torch.cuda.synchronize()
    return us, read()


def summarize(us: float, tr: torch.Tensor, names: tuple) -> dict:
    """Per point: the median and the latest CTA, us after the first CTA's start (global timer); per phase the SM
    clock's median cycles between consecutive points reached."""
    n = len(names)
    rows = tr[tr[:, 0] > 0]
    t0 = int(rows[:, 0].min())
    out = {"per_call_us": round(us, 2), "ctas": int(rows.shape[0])}
    last = 0
    for i, name in enumerate(names):
        col = rows[:, i]
        col = col[col > 0]
        if col.numel() == 0:
            continue
        rel = (col - t0).double() / 1e3
        out[f"{name}_med_us"] = round(float(rel.median()), 2)
        out[f"{name}_max_us"] = round(float(rel.max()), 2)
        last = max(last, float(rel.max()))
    out["span_us"] = round(last, 2)
    out["gap_us"] = round(us - last, 2)
    points = tr.shape[1] // 2   # device_common.cuh TRACE_POINTS: global timers, then SM clocks
    clk = rows[:, points:points + n]
    for i in range(1, n):
        ok = (clk[:, i] > 0) & (clk[:, i - 1] > 0)
        if ok.any():
            out[f"cyc_{names[i - 1]}_{names[i]}"] = int((clk[ok, i] - clk[ok, i - 1]).median())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/trace_decode"))
    ap.add_argument("--sparsities", default="0,0.5")
    ap.add_argument("--cases", default=",".join(f"{n}x{k}:{s}" for n, k, s in CASES),
                    help="N x K : the wgmma split (suffix h: half a row-tile a CTA, rows=64), comma-separated")
    ap.add_argument("--kernels", default="mma_sp,wgmma", help="which kernels to trace")
    ap.add_argument("--pdl", action="store_true", help="launch both kernels as programmatic dependents (each launch of "
                    "the graph may then start while the one before it drains: gaps can be negative)")
    a = ap.parse_args()
    pdl = int(a.pdl)
    os.makedirs(a.out, exist_ok=True)
    t = time.time()
    kernels = a.kernels.split(",")
    wg, ms = build_traced(kernels)
    print(f"built the traced kernels in {time.time() - t:.0f} s", flush=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "pdl": bool(pdl)}
    rows, raw = [], []
    cases = [(int(nk.split("x")[0]), int(nk.split("x")[1]), int(sp.rstrip("h")), 64 if sp.endswith("h") else 256)
             for nk, sp in (c.split(":") for c in a.cases.split(","))]
    for n, k, split, wg_rows in cases:
        for s in map(float, a.sparsities.split(",")):
            x, d, v, e, sched, ref, p = make_layer(n, k, 16, s)
            packs = rotating_copies((d, v, e), p.nbytes)
            warps, sl = mma_sp.default_launch(16, n, 132)
            y = torch.empty(16, n, dtype=x.dtype, device="cuda")

            def run_ms(c):
                ms.hybrid_mma_sp(x, *c, sched.dense_col, sched.sparse_col, sched.dense_start, sched.sparse_start,
                                 None, y, 128, warps, sl, 0, 0, pdl)

            def run_wg(c, sp):
                wg.hybrid_wgmma(x, *c, sched.slot, sched.kinds, None, y, 16, sp, 0, pdl, wg_rows)

            runs = []
            if ms is not None:
                run_ms((d, v, e))
                runs.append(("mma_sp", float((y.double() - ref).abs().max()), [lambda c=c: run_ms(c) for c in packs],
                             ms.mma_sp_trace_clear, ms.mma_sp_trace_read, MMA_SP_POINTS))
            if wg is not None:
                run_wg((d, v, e), split)
                runs.append((f"wgmma_s{split}{'h' if wg_rows == 64 else ''}", float((y.double() - ref).abs().max()),
                             [lambda c=c: run_wg(c, split) for c in packs], wg.wgmma_trace_clear, wg.wgmma_trace_read,
                             WGMMA_POINTS))
            for kernel, max_err, fns, clear, read, names in runs:
                us, tr = trace_graph(fns, clear, read)
                live = tr[tr[:, 0] > 0]
                t0 = int(live[:, 0].min())
                raw.append({"N": n, "K": k, "sparsity": s, "kernel": kernel, "per_call_us": round(us, 2),
                            "points": list(names) + ["sm"],
                            "ctas": [[round((int(v) - t0) / 1e3, 3) if v > 0 else None for v in r[:len(names)].tolist()]
                                     + [int(r[tr.shape[1] // 2 - 1])] for r in live]})
                row = {"N": n, "K": k, "sparsity": s, "kernel": kernel, "bytes": p.nbytes,
                       "max_abs_err": round(max_err, 4), **summarize(us, tr, names)}
                rows.append(row)
                print(json.dumps(row), flush=True)
            del packs
            torch.cuda.empty_cache()
    with open(os.path.join(a.out, "trace_decode_raw.json"), "w") as f:
        json.dump({"env": env, "launches": raw}, f)
    lines = [f"# Decode launches traced from inside ({env['gpu']}, torch {env['torch']}, M=16"
             f"{', programmatic dependent launches' if pdl else ''})", "",
             "us after the first CTA's start: median CTA / latest CTA at each point; gap = per call - span.", ""]
    for kernel, names in (("mma_sp", MMA_SP_POINTS), ("wgmma", WGMMA_POINTS)):
        lines += [f"## {kernel}", "", "| N x K | s | per call | span | gap | " + " | ".join(names) + " |",
                  "|---|---|---|---|---|" + "---|" * len(names)]
        for r in rows:
            if r["kernel"].startswith(kernel):
                cells = [f"{r.get(f'{p}_med_us', '-')} / {r.get(f'{p}_max_us', '-')}" for p in names]
                lines.append(f"| {r['N']}x{r['K']} ({r['kernel']}) | {r['sparsity']} | {r['per_call_us']} | "
                             f"{r['span_us']} | {r['gap_us']} | " + " | ".join(cells) + " |")
        lines.append("")
    md = "\n".join(lines)
    save_results(a.out, "trace_decode", {"env": env, "rows": rows}, md)
    print(md)


if __name__ == "__main__":
    main()
