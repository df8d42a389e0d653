"""Decode (small M) kernel variants, side by side on one GPU call: which way of feeding 2:4 tiles to the
tensor cores streams at the byte floor? Every variant is checked against float64 first.

Variants (constexpr switches of one experimental kernel):
  SWAP      0: acc[M, N] += x[M, T] @ w[N, T]^T (w is the B operand: decompressed registers go through
               shared memory);  1: acc[N, M] += w[N, T] @ x^T[T, M] (w is the A operand, which the
               tensor cores may read from registers; M = 16 is a legal wgmma N).
  DECOMP    0: v1 (reshape/split of values, 3-D where);  1: join (values read as one 32-bit word per
               group, four positions selected elementwise and joined: no split, in-thread reshapes).
  PREFETCH  1: the next tile's packed bytes are loaded before the current tile is used (a register
               double buffer), for loads the pipeliner cannot stage through shared memory.
    python bench/kernel_variants.py --out $OUT/variants [--ncu]
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from patchc import mask as hm
from patchc.codegen.kernels import _sparse_tile_split as _tile_v1  # the v1 (split/reshape) decompression
from patchc.codegen.kernels import _sparse_tile_words as _tile_words  # words: what codegen/kernels.py keeps
from patchc.codegen.launch import graph_time_ms
from patchc.codegen.schedule import build_schedule
from patchc.format import pack_layer

from kernel_bench import copy_bandwidth  # bench/kernel_bench.py


@triton.jit
def _load_words(values_ptr, meta_ptr, i, hi, rows, T: tl.constexpr):
    """Packed bytes of rows `rows` of 2:4 tile i: one int32 word a group (its two bf16 values) and
    the metadata bytes; nothing is read when i >= hi (a prefetch past the end)."""
    offs_g = tl.arange(0, T // 4)
    offs_e = tl.arange(0, T // 8)
    wp = values_ptr.to(tl.pointer_type(tl.int32))
    ok = (rows[:, None] * 0 + i) < hi                                # [BN, 1]
    wd = tl.load(wp + i * (T * (T // 4)) + rows[:, None] * (T // 4) + offs_g[None, :], mask=ok, other=0)
    e = tl.load(meta_ptr + i * (T * (T // 8)) + rows[:, None] * (T // 8) + offs_e[None, :], mask=ok, other=0)
    return wd, e


@triton.jit
def _expand_words(wd, e, T: tl.constexpr, OUT: tl.constexpr):
    lo = (wd & 0xFFFF).to(tl.int16).to(OUT, bitcast=True)      # first kept value of the group
    hi = (wd >> 16).to(tl.int16).to(OUT, bitcast=True)         # second
    nib = tl.reshape(tl.join(e & 0xF, e >> 4), [e.shape[0], T // 4])
    i0 = nib & 3
    i1 = nib >> 2
    z = tl.zeros_like(lo)
    w0 = tl.where(i0 == 0, lo, tl.where(i1 == 0, hi, z))
    w1 = tl.where(i0 == 1, lo, tl.where(i1 == 1, hi, z))
    w2 = tl.where(i0 == 2, lo, tl.where(i1 == 2, hi, z))
    w3 = tl.where(i0 == 3, lo, tl.where(i1 == 3, hi, z))
    # join(join(w0, w2), join(w1, w3))[n, g, a, b] = w[2a + b]: flattening gives input order
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [wd.shape[0], T])


@triton.jit
def _mac(acc, x_rows_ptr, stride_xk, mask_m, c, w, offs_t, T: tl.constexpr, SWAP: tl.constexpr):
    if SWAP:
        xt = tl.load(x_rows_ptr + (c * T + offs_t)[:, None] * stride_xk, mask=mask_m[None, :], other=0.0)  # [T, BM]
        acc += tl.dot(w, xt)                                                                                # [BN, BM]
    else:
        x = tl.load(x_rows_ptr + (c * T + offs_t)[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)   # [BM, T]
        acc += tl.dot(x, tl.trans(w))                                                                       # [BM, BN]
    return acc


@triton.jit
def variant_kernel(x_ptr, dense_ptr, values_ptr, meta_ptr, dense_col_ptr, sparse_col_ptr, dense_start_ptr,
                   sparse_start_ptr, out_ptr, M, N_OUT, stride_xm, stride_xk, stride_os, stride_om, stride_on,
                   T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
                   HAS_DENSE: tl.constexpr, HAS_SPARSE: tl.constexpr, SWAP: tl.constexpr, DECOMP: tl.constexpr,
                   PREFETCH: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n0 = pid_n * BLOCK_N
    rt = n0 // T
    rows = n0 % T + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, T)
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        x_rows = x_ptr + offs_m[None, :] * stride_xm
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        x_rows = x_ptr + offs_m[:, None] * stride_xm
    if HAS_DENSE:
        first = tl.load(dense_start_ptr + rt)
        count = tl.load(dense_start_ptr + rt + 1) - first
        lo = first + count * pid_k // SPLIT_K
        hi = first + count * (pid_k + 1) // SPLIT_K
        for i in range(lo, hi):
            c = tl.load(dense_col_ptr + i)
            w = tl.load(dense_ptr + i * (T * T) + rows[:, None] * T + offs_t[None, :])
            acc = _mac(acc, x_rows, stride_xk, mask_m, c, w, offs_t, T, SWAP)
    if HAS_SPARSE:
        first = tl.load(sparse_start_ptr + rt)
        count = tl.load(sparse_start_ptr + rt + 1) - first
        lo = first + count * pid_k // SPLIT_K
        hi = first + count * (pid_k + 1) // SPLIT_K
        if PREFETCH:
            c_nx = tl.load(sparse_col_ptr + tl.minimum(lo, hi - 1), mask=hi > lo, other=0)
            wd_nx, e_nx = _load_words(values_ptr, meta_ptr, lo, hi, rows, T)
            for i in range(lo, hi):
                c, wd, e = c_nx, wd_nx, e_nx
                c_nx = tl.load(sparse_col_ptr + tl.minimum(i + 1, hi - 1))
                wd_nx, e_nx = _load_words(values_ptr, meta_ptr, i + 1, hi, rows, T)
                w = _expand_words(wd, e, T, x_ptr.dtype.element_ty)
                acc = _mac(acc, x_rows, stride_xk, mask_m, c, w, offs_t, T, SWAP)
        else:
            for i in range(lo, hi):
                c = tl.load(sparse_col_ptr + i)
                if DECOMP == 0:
                    w = _tile_v1(values_ptr, meta_ptr, i, rows, T)
                elif DECOMP == 2:
                    w = _tile_words(values_ptr, meta_ptr, i, rows, T, x_ptr.dtype.element_ty)
                else:
                    wd, e = _load_words(values_ptr, meta_ptr, i, hi, rows, T)
                    w = _expand_words(wd, e, T, x_ptr.dtype.element_ty)
                acc = _mac(acc, x_rows, stride_xk, mask_m, c, w, offs_t, T, SWAP)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if SWAP:
        ptrs = out_ptr + pid_k * stride_os + offs_m[None, :] * stride_om + offs_n[:, None] * stride_on
        tl.store(ptrs, acc, mask=mask_m[None, :])
    else:
        ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(ptrs, acc, mask=mask_m[:, None])


VARIANTS = {  # name -> (SWAP, DECOMP, PREFETCH)
    "v1": (0, 0, 0), "v1-join": (0, 1, 0), "swap-v1": (1, 0, 0), "swap-join": (1, 1, 0),
    "swap-join-pf": (1, 1, 1), "join-pf": (0, 1, 1), "words": (0, 2, 0), "swap-words": (1, 2, 0),
}


def run_variant(x, p, sched, n, var, bn, split, warps, stages):
    swap, decomp, pf = VARIANTS[var]
    m, _ = x.shape
    bm = 16 if m <= 16 else 32
    out = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    grid = (n // bn, split, triton.cdiv(m, bm))
    variant_kernel[grid](x, p[0], p[1], p[2], sched.dense_col, sched.sparse_col, sched.dense_start, sched.sparse_start,
                         out, m, n, x.stride(0), x.stride(1), out.stride(0), out.stride(1), out.stride(2),
                         T=sched.tile, BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=split, HAS_DENSE=not sched.all_sparse,
                         HAS_SPARSE=not sched.all_dense, SWAP=swap, DECOMP=decomp, PREFETCH=pf,
                         num_warps=warps, num_stages=stages)
    return out.sum(0).to(x.dtype) if split > 1 else out[0].to(x.dtype)


def case(n, k, m, s, tile, bw, variants, configs, g, l2_bytes=200 << 20):
    dt = torch.bfloat16
    n_sparse = hm.sparse_tile_budget((n // tile) * (k // tile), s)
    bm = torch.ones((n // tile) * (k // tile), dtype=torch.bool)
    bm[torch.randperm(bm.numel(), generator=g)[:n_sparse]] = False
    bitmap = bm.reshape(n // tile, k // tile)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dt)
    pattern = torch.randint(0, 6, (n, k // 4), generator=g, dtype=torch.uint8)
    pk = pack_layer(w, bitmap, pattern, tile)
    sched = build_schedule(bitmap, tile).to("cuda")
    p = (pk.dense.cuda(), pk.values.cuda(), pk.meta.cuda())
    x = torch.randn(m, k, generator=g).to(dt).cuda()
    ref = x.double() @ hm.apply_hybrid(w.cuda().double(), bitmap.cuda(), hm.pattern_to_mask(pattern.cuda()), tile).T
    copies = max(2, math.ceil(l2_bytes / (pk.nbytes + 1)))
    packs = [tuple(t.clone() for t in p) for _ in range(copies)]
    floor = (pk.nbytes + x.nbytes + m * n * 2) / bw * 1e6
    wd = torch.randn(n, k, device="cuda", dtype=dt)
    dws = [wd.clone() for _ in range(max(2, math.ceil(l2_bytes / wd.nbytes)))]
    cublas = graph_time_ms([lambda t=t: torch.nn.functional.linear(x, t) for t in dws]) * 1e3
    rows = []
    for var in variants:
        best = None
        for bn, split, warps, stages in configs:
            if bn > tile or n % bn or split > k // tile:
                continue
            try:
                y = run_variant(x, p, sched, n, var, bn, split, warps, stages)
                err = ((y.double() - ref).norm() / ref.norm()).item()
                if not (err < 1.5e-2):
                    print(f"  WRONG {var} bn={bn} split={split}: rel err {err}", flush=True)
                    continue
                us = graph_time_ms([lambda q=q: run_variant(x, q, sched, n, var, bn, split, warps, stages)
                                    for q in packs]) * 1e3
            except Exception as ex:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                print(f"  FAIL {var} bn={bn} split={split} w={warps} st={stages}: {type(ex).__name__}: {str(ex)[:200]}",
                      flush=True)
                continue
            if best is None or us < best["us"]:
                best = {"variant": var, "us": round(us, 2), "bn": bn, "split": split, "warps": warps, "stages": stages,
                        "err": err}
        if best:
            best.update(N=n, K=k, M=m, sparsity=s, floor_us=round(floor, 2), cublas_us=round(cublas, 2),
                        over_floor=round(best["us"] / floor, 3), vs_cublas=round(cublas / best["us"], 3))
            rows.append(best)
            print(f"{n}x{k} M={m} s={s:.2f} {var:<13} {best['us']:7.2f}us floor {floor:6.2f} "
                  f"/floor {best['over_floor']:.2f} vs cuBLAS {best['vs_cublas']:.2f}x  "
                  f"(bn {bn} split {best['split']} w {best['warps']} st {best['stages']})", flush=True)
    del packs, dws
    torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/kernel_variants")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--ms", default="16")
    ap.add_argument("--sparsities", default="0,0.5")
    ap.add_argument("--bn", default="64,128")
    ap.add_argument("--split", default="2,4,8")
    ap.add_argument("--warps", default="4")
    ap.add_argument("--stages", default="2,4")
    ap.add_argument("--ncu", default=None, help="launch VARIANT a few times (for ncu) at 4096x4096 M=16 s=0.5")
    ap.add_argument("--ncu-config", default="128,4,4,3", help="BLOCK_N,SPLIT_K,warps,stages for --ncu")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    if a.ncu:
        n = k = 4096
        bitmap = torch.zeros(n // 128, k // 128, dtype=torch.bool)
        pk = pack_layer(torch.randn(n, k).bfloat16(), bitmap, torch.randint(0, 6, (n, k // 4), dtype=torch.uint8), 128)
        sched = build_schedule(bitmap, 128).to("cuda")
        x = torch.randn(16, k, device="cuda", dtype=torch.bfloat16)
        p = (pk.dense.cuda(), pk.values.cuda(), pk.meta.cuda())
        bn, split, warps, stages = map(int, a.ncu_config.split(","))
        for _ in range(3):
            run_variant(x, p, sched, n, a.ncu, bn, split, warps, stages)
        torch.cuda.synchronize()
        return
    bw = copy_bandwidth()
    print(f"copy {bw / 1e9:.0f} GB/s  {torch.cuda.get_device_name()} triton {triton.__version__}", flush=True)
    ints = lambda t: [int(v) for v in t.split(",")]  # noqa: E731
    configs = list(itertools.product(ints(a.bn), ints(a.split), ints(a.warps), ints(a.stages)))
    rows = []
    t0 = time.time()
    for n, k in [(4096, 4096), (11008, 4096), (4096, 11008)]:
        for m in map(int, a.ms.split(",")):
            for s in map(float, a.sparsities.split(",")):
                rows += case(n, k, m, s, 128, bw, a.variants.split(","), configs, g)
                print(f"  [{time.time() - t0:.0f}s]", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "variants.json").write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "triton": triton.__version__,
                                                   "copy_GBps": round(bw / 1e9, 1), "rows": rows}, indent=1))
    print("\n| shape | M | s | variant | us | /floor | vs cuBLAS | bn | split | stages |")
    for r in rows:
        print(f"| {r['N']}x{r['K']} | {r['M']} | {r['sparsity']} | {r['variant']} | {r['us']} | {r['over_floor']} | "
              f"{r['vs_cublas']} | {r['bn']} | {r['split']} | {r['stages']} |")


if __name__ == "__main__":
    main()
