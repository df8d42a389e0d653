"""Feed cuSPARSELt from the packed format, for prefill of all-2:4 layers (an experiment, not the runtime).

    TRITON_INTERPRET=1 python bench/cslt_prefill_check.py --selftest   # CPU: both conversions against the formula
    python bench/cslt_prefill_check.py [--ms 2048,512]     # GPU: bytes equal to torch._cslt_compress, then timing

cuSPARSELt's compressed weight (torch._cslt_compress of a 2:4 [N, K]) is the kept values in row-major order,
then N*K/8 bytes of metadata holding patchc's own 4-bit codes in a permuted order (bench/NOTES.md, "cuSPARSELt's
compressed layout, probed"). `to_cusparselt` builds it from a packed all-2:4 layer by a copy and a nibble
permutation, with no dense intermediate. The GPU run checks it byte for byte against torch._cslt_compress and
the GEMM against float64, then times, in CUDA graphs, rotating over weight copies larger than L2: cuBLAS on the
dense weight, today's prefill path (decompress + cuBLAS), the one-pass Triton conversion alone, cuSPARSELt alone
(y [M, N] asked of it, and y^T [N, M] + a transposing copy), and the candidate path: conversion + cuSPARSELt's
y^T + the copy. The compressed buffer is flat: all N*K/2 values, then all N*K/8 metadata bytes.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def nibble_position(r: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """Index, among the metadata's nibbles (low nibble of each byte first), of row r's group q (columns
    4q..4q+3) of a [N, K] weight: 64-row x 32-column blocks, row blocks outermost, and inside a block the order
    of mma.sp's metadata fragments (fitted to bench/cslt_layout_probe.py's maps on an H100, exact at 5 shapes)."""
    low = (r >> 3 & 1) | (q >> 2 & 1) << 1 | (q & 1) << 2 | (q >> 1 & 1) << 3
    return ((r >> 6) * (k // 32) + (q >> 3)) * 512 + (low | (r & 7) << 4 | (r >> 4 & 3) << 7)


_positions: dict[tuple[int, int, str], torch.Tensor] = {}


def positions(n: int, k: int, device) -> torch.Tensor:
    """nibble_position of every (row, group), row-major [N * K/4], cached per shape and device."""
    key = (n, k, str(device))
    if key not in _positions:
        g = k // 4
        idx = torch.arange(n * g, device=device)
        _positions[key] = nibble_position(idx // g, idx % g, k)
    return _positions[key]


def to_cusparselt(values: torch.Tensor, meta: torch.Tensor, n: int, k: int, tile: int) -> torch.Tensor:
    """A packed all-2:4 layer (values [R*C, T, T/2], codes [R*C, T, T/8], tiles row-major) -> cuSPARSELt's
    compressed weight: a [N, K/2 + K/16] tensor of the values' dtype whose memory is flat, all N*K/2 values
    row-major first, then all N*K/8 metadata bytes (not each row's values followed by its codes)."""
    r, c, t = n // tile, k // tile, tile
    assert values.shape == (r * c, t, t // 2) and meta.shape == (r * c, t, t // 8), (values.shape, meta.shape)
    assert n % 64 == 0 and k % 32 == 0 and values.element_size() == 2, (n, k, values.dtype)
    vals = values.view(r, c, t, t // 2).permute(0, 2, 1, 3).reshape(n, k // 2)              # [N, K/2] row-major
    nib = torch.stack([meta & 0xF, meta >> 4], -1).view(r, c, t, t // 4)                     # [R, C, T, T/4]
    nib = nib.permute(0, 2, 1, 3).reshape(-1)                                                 # [N * K/4] row-major
    out = torch.empty_like(nib)
    out[positions(n, k, meta.device)] = nib
    codes = (out[0::2] | out[1::2] << 4).view(values.dtype).view(n, k // 16)                 # [N, K/16]
    return torch.cat([vals.reshape(-1), codes.reshape(-1)]).view(n, k // 2 + k // 16)


@triton.jit
def to_cusparselt_kernel(
    values_ptr, meta_ptr,              # packed: values [R*C, T, T/2] as int16, codes [R*C, T, T/8] uint8
    out_values_ptr, out_meta_ptr,      # cuSPARSELt's buffer: [N, K/2] int16, then [N*K/8] uint8
    K,
    TILE: tl.constexpr, C: tl.constexpr,
):
    """One program: 64 rows x one tile column of an all-2:4 layer. Copies the rows' kept values into row-major
    order, and writes their codes as the TILE/32 metadata blocks (64 rows x 32 columns, 256 bytes each) they
    fill: byte b of a block holds nibbles p = 2b and 2b + 1, i.e. rows r and r + 8 of the same group q, with
    r = (p>>4 & 7) | (p & 1) << 3 | (p>>7 & 3) << 4 and q = (p>>2 & 1) | (p>>3 & 1) << 1 | (p>>1 & 1) << 2
    (nibble_position inverted inside a block)."""
    rb = tl.program_id(0)                               # 64-row block
    c = tl.program_id(1)                                # tile column
    rt = rb * 64 // TILE                                # row-tile
    r_in = rb * 64 % TILE                               # first row of the block inside its tile
    tile_id = rt * C + c                                # all-2:4: the i-th tile is the i-th sparse tile
    # values: [64, TILE/2] from the tile's rows r_in.. to rows rb*64.. of the [N, K/2] output
    rows = tl.arange(0, 64)[:, None]
    cols = tl.arange(0, TILE // 2)[None, :]
    v = tl.load(values_ptr + (tile_id * TILE + r_in + rows).to(tl.int64) * (TILE // 2) + cols)
    tl.store(out_values_ptr + (rb * 64 + rows).to(tl.int64) * (K // 2) + c * (TILE // 2) + cols, v)
    # metadata: TILE/32 blocks of 256 bytes
    j = tl.arange(0, TILE // 32)[:, None]                # block inside the tile column
    b = tl.arange(0, 256)[None, :]                      # byte inside the block
    p = 2 * b
    r = ((p >> 4) & 7) | (((p >> 7) & 3) << 4)          # p's bit 0 is 0: rows r and r + 8
    q = ((p >> 2) & 1) | (((p >> 3) & 1) << 1) | (((p >> 1) & 1) << 2)
    grp = j * 8 + q                                     # group inside the tile row
    src = meta_ptr + (tile_id * TILE + r_in + r).to(tl.int64) * (TILE // 8) + grp // 2
    shift = (grp % 2) * 4
    lo = (tl.load(src) >> shift) & 0xF
    hi = (tl.load(src + 8 * (TILE // 8)) >> shift) & 0xF
    dst = out_meta_ptr + ((rb * (K // 32) + c * (TILE // 32) + j) * 256 + b).to(tl.int64)
    tl.store(dst, (lo | (hi << 4)).to(tl.uint8))


def to_cusparselt_triton(values: torch.Tensor, meta: torch.Tensor, n: int, k: int, tile: int,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """to_cusparselt in one Triton launch (every value and code read once, written once); `out` (a flat buffer
    of n*k/2 + n*k/16 elements of the values' dtype) is reused when given."""
    assert n % 64 == 0 and k % 32 == 0 and tile % 64 == 0 and values.element_size() == 2, (n, k, tile)
    nv = n * k // 2
    if out is None:
        out = torch.empty(nv + n * k // 16, dtype=values.dtype, device=values.device)
    flat_bytes = out.view(torch.uint8)
    to_cusparselt_kernel[(n // 64, k // tile)](values.view(torch.int16), meta, out[:nv].view(torch.int16),
                                               flat_bytes[2 * nv:], k, TILE=tile, C=k // tile)
    return out.view(n, k // 2 + k // 16)


def make_sparse_layer(n: int, k: int, tile: int, dtype, device, seed: int = 0):
    """A random all-2:4 packed layer: (values, codes, dense [N, K] weight with zeros where pruned, packed layer,
    keep mask [N, K])."""
    from patchc.format import pack_layer, unpack_layer
    from patchc.mask import pattern_to_mask

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    pattern = torch.randint(0, 6, (n, k // 4), generator=g, dtype=torch.uint8)
    p = pack_layer(w, torch.zeros(n // tile, k // tile, dtype=torch.bool), pattern, tile)
    return p.values.to(device), p.meta.to(device), unpack_layer(p).to(device), p, pattern_to_mask(pattern).bool()


def selftest() -> None:
    """CPU: the formula is a bijection onto the nibbles, and the conversion puts each value and code where the
    formula says (a scalar walk over every (row, group) of small layers); with a GPU or TRITON_INTERPRET=1 the
    one-pass Triton conversion writes the same bytes, at tiles 128 and 64."""
    run_triton = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    for n, k in ((128, 128), (256, 384), (384, 640)):
        pos = positions(n, k, "cpu")
        assert torch.equal(pos.sort().values, torch.arange(n * k // 4)), (n, k)
        values, meta, w, _, keep = make_sparse_layer(n, k, 128, torch.bfloat16, "cpu", seed=n + k)
        comp = to_cusparselt(values, meta, n, k, 128)
        assert comp.shape == (n, k // 2 + k // 16)
        flat = comp.reshape(-1)
        assert torch.equal(flat[: n * k // 2], w[keep])                        # all kept values first, row-major
        nib = flat[n * k // 2:].contiguous().view(torch.uint8).view(-1)      # then all the metadata
        nib = torch.stack([nib & 0xF, nib >> 4], 1).view(-1)
        for row in range(0, n, 7):
            for q in range(0, k // 4, 3):
                kept = keep[row, 4 * q: 4 * q + 4].nonzero().flatten().tolist()
                p = int(nibble_position(torch.tensor(row), torch.tensor(q), k))
                assert int(nib[p]) == kept[0] | kept[1] << 2, (n, k, row, q)
        if run_triton:
            assert torch.equal(to_cusparselt_triton(values, meta, n, k, 128).view(torch.int16),
                               comp.view(torch.int16)), (n, k)
    if run_triton:
        values, meta, *_ = make_sparse_layer(192, 320, 64, torch.float16, "cpu", seed=1)
        assert torch.equal(to_cusparselt_triton(values, meta, 192, 320, 64).view(torch.int16),
                           to_cusparselt(values, meta, 192, 320, 64).view(torch.int16)), "tile 64"
    print("selftest: OK")


def gpu(a) -> None:
    from patchc.codegen.launch import get_config, graph_time_ms, launch
    from patchc.codegen.schedule import build_schedule

    from kernels import rotating_copies  # bench/kernels.py

    print("N x K M | bytes == _cslt_compress (torch ops, Triton) | rel err | cuBLAS us | decompress+cuBLAS us | "
          "convert us | cslt y [M,N] us | cslt y^T + copy us | cslt y^T, x col-major us | "
          "convert + cslt y^T + copy us | that vs cuBLAS",
          flush=True)
    for nk in a.shapes.split(","):
        n, k = map(int, nk.split("x"))
        values, meta, w, p, _ = make_sparse_layer(n, k, 128, torch.bfloat16, "cuda")
        ref_comp = torch._cslt_compress(w).view(-1)
        comp = to_cusparselt_triton(values, meta, n, k, 128)
        same = (bool(torch.equal(to_cusparselt(values, meta, n, k, 128).view(-1), ref_comp)),
                bool(torch.equal(comp.view(-1), ref_comp)))
        sched = build_schedule(p.bitmap, 128).to("cuda")
        for m in map(int, a.ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xt = x.t()
            alg = torch._cslt_sparse_mm_search(comp, xt)
            alg = alg[0] if isinstance(alg, (tuple, list)) else alg
            y = torch._cslt_sparse_mm(comp, xt, alg_id=alg).t()                               # [M, N]
            xc = xt.contiguous()                                                               # x column-major
            alg_c = torch._cslt_sparse_mm_search(comp, xc)
            alg_c = alg_c[0] if isinstance(alg_c, (tuple, list)) else alg_c
            ref = x.double() @ w.double().t()
            err = ((y.double() - ref).norm() / ref.norm()).item()
            packs = rotating_copies((values, meta), values.nbytes + meta.nbytes)
            dense = [c for (c,) in rotating_copies((w,), w.nbytes)]
            comps = [to_cusparselt_triton(v, e, n, k, 128) for v, e in packs]
            buf = torch.empty_like(comp).view(-1)                                              # reused, as a runtime would
            cfg = get_config(x, p.dense.cuda(), values, meta, sched, None, n)
            t = {
                "cublas": graph_time_ms([lambda d=d: F.linear(x, d) for d in dense]),
                "decompress": graph_time_ms([lambda v=v, e=e: launch(x, p.dense.cuda(), v, e, sched, None, n, cfg)
                                             for v, e in packs]),
                "convert": graph_time_ms([lambda v=v, e=e: to_cusparselt_triton(v, e, n, k, 128, buf)
                                          for v, e in packs]),
                # transpose_result=True ran 1.4-1.9x the untransposed GEMM at M=2048 (fifth session's diagnosis)
                "cslt_t": graph_time_ms([lambda c=c: torch._cslt_sparse_mm(c, xt, alg_id=alg, transpose_result=True)
                                         for c in comps]),
                "cslt_copy": graph_time_ms([lambda c=c: torch._cslt_sparse_mm(c, xt, alg_id=alg).t().contiguous()
                                            for c in comps]),
                # no copy: y^T [N, M] returned as the column-major view y = y^T.t(), and x given column-major
                # too (x^T [K, M] row-major), as it would arrive from such a previous layer: the layout question
                # for keeping prefill activations transposed between cuSPARSELt layers
                "cslt_colmajor": graph_time_ms([lambda c=c: torch._cslt_sparse_mm(c, xc, alg_id=alg_c) for c in comps]),
                "path": graph_time_ms([lambda v=v, e=e: torch._cslt_sparse_mm(
                    to_cusparselt_triton(v, e, n, k, 128, buf), xt, alg_id=alg).t().contiguous() for v, e in packs]),
            }
            us = {key: v * 1e3 for key, v in t.items()}
            print(f"{n}x{k} M={m} | {same} | {err:.1e} | {us['cublas']:.1f} | {us['decompress']:.1f} | "
                  f"{us['convert']:.1f} | {us['cslt_t']:.1f} | {us['cslt_copy']:.1f} | {us['cslt_colmajor']:.1f} | {us['path']:.1f} | "
                  f"{us['cublas'] / us['path']:.2f}x", flush=True)
            del packs, dense, comps
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--selftest", action="store_true", help="CPU check of the conversion against the formula")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    ap.add_argument("--ms", default="2048,512")
    a = ap.parse_args()
    selftest() if a.selftest else gpu(a)


if __name__ == "__main__":
    main()
