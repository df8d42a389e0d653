"""Where the mma.sp decode kernel's time goes at M=16: x's re-reads from L2 against the weights' stream (GPU).

Every CTA of the mma.sp kernel reads all of x (16 x K bf16) from L2 for its 16 * slices rows, so at M=16 the L2
serves x bytes = weight bytes (dense) / slices on top of the weights: at 50% 2:4 tiles and 2 slices, 0.9x the
packed bytes again. This times, per 7B shape and sparsity, in CUDA graphs rotating over weight copies > L2:
  A  the default launch (warps, slices) with a real x [16, K]
  B  the same launch with x = x[:1].expand(16, K) (row stride 0: every batch row is row 0, so x's L2 traffic is
     1/16; the output is wrong and only timed)
  C  the default warps with 1 slice (twice the x traffic of 2 slices)
  D  M=8 at the default M=16 launch (half the batch rows and half the MMAs)
and the read floor (bench/decode_l2_pdl.py). If B is much faster than A, x's traffic is what holds decode back.

    python bench/decode_xtraffic.py [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import triton

from decode_l2_pdl import read_floor_us  # bench/decode_l2_pdl.py
from kernel_bench import SHAPES, copy_bandwidth, make_layer, rotating_copies, time_alternating  # bench/kernel_bench.py
from mma_sp_check import err  # bench/mma_sp_check.py

from patchc.codegen import mma_sp


def case(n: int, k: int, s: float, bw: float) -> dict:
    x, d, v, e, sched, ref, p = make_layer(n, k, 16, s)
    packs = rotating_copies((d, v, e), p.nbytes)
    warps, sl = mma_sp.default_launch(16, n, 132)
    x0 = x[:1].expand(16, k)
    x8 = x[:8].contiguous()
    row = {"N": n, "K": k, "sparsity": s, "warps": warps, "slices": sl,
           "floor_us": round((p.nbytes + x.nbytes + 16 * n * 2) / bw * 1e6, 2),
           "err_A": err(mma_sp.run(x, d, v, e, sched, None, n, warps, sl, poison=True), ref)}
    paths = {"A": [lambda c=c: mma_sp.run(x, *c, sched, None, n, warps, sl) for c in packs],
             "B_x_stride0": [lambda c=c: mma_sp.run(x0, *c, sched, None, n, warps, sl) for c in packs],
             "C_1slice": [lambda c=c: mma_sp.run(x, *c, sched, None, n, warps, 1) for c in packs],
             "D_M8": [lambda c=c: mma_sp.run(x8, *c, sched, None, n, warps, sl) for c in packs]}
    for name, ts in time_alternating(paths, 3).items():
        row[f"{name}_us"] = round(statistics.median(ts), 2)
    row.update(read_floor_us(p.nbytes))
    del packs
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results/decode_xtraffic"))
    ap.add_argument("--sparsities", default="0,0.25,0.5")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    bw = copy_bandwidth()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "copy_GBps": round(bw / 1e9, 1), "date": time.strftime("%Y-%m-%d")}
    rows = []
    for n, k in SHAPES["llama2-7b"]:
        for s in map(float, a.sparsities.split(",")):
            rows.append(case(n, k, s, bw))
            print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(a.out, "decode_xtraffic.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=1)
    lines = [f"# mma.sp decode at M=16: x traffic ({env['gpu']}, torch {env['torch']}, copy {env['copy_GBps']} GB/s)",
             "", "| N x K | s | warps x slices | floor | read | A default | B x stride 0 | C 1 slice | D M=8 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['N']}x{r['K']} | {r['sparsity']} | {r['warps']}x{r['slices']} | {r['floor_us']} | "
                     f"{r['read_us']} | {r['A_us']} | {r['B_x_stride0_us']} | {r['C_1slice_us']} | {r['D_M8_us']} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "decode_xtraffic.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
