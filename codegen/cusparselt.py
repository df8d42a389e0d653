"""Prefill of all-2:4 layers on cuSPARSELt (the "cslt" engine), fed straight from the packed format.

At large M the hybrid layer is a compute-bound GEMM. Triton has no sparse dot, and decompressing the weight for
cuBLAS (the default prefill path) costs 0.85-0.92x cuBLAS on the dense weight (bench/results/kernels). For a
layer whose tiles are all 2:4, cuSPARSELt runs the GEMM on the sparse tensor cores, and the packed tiles already
hold everything its compressed weight needs: the kept values, and 4-bit codes that are mma.sp's metadata. So a
call here is three launches, with no dense intermediate and no second copy of the weight kept in memory:

    1. to_cusparselt_kernel: packed values + codes -> cuSPARSELt's compressed layout, one pass over the
       packed bytes (its layout was probed on an H100: ab853d4:bench/cslt_layout_probe.py, bench/NOTES.md);
    2. torch._cslt_sparse_mm(W_c, x^T) -> y^T [N, M], cuSPARSELt's fast output layout (asking it for y [M, N]
       directly ran 0.78-0.98x cuBLAS at M=2048: ab853d4:bench/results/cslt_probe);
    3. transpose_epilogue_kernel: y^T [N, M] -> y [M, N] row-major, + bias, and SiLU(gate) * up when gate and up
       are stacked, in one pass.

The output contract of the hybrid ops (y row-major) does not change. The engine serves CUDA tensors of 16-bit
activations, tiles that 64 divides, and layers with no dense tile; PATCHC_CSLT=0 turns it off. Mixed layers stay
on decompress + cuBLAS. It runs inside CUDA graphs only (torch.compile mode="reduce-overhead", or a graph the
user captures): torch._cslt_sparse_mm's per-call host setup makes eager calls slower than decompress + cuBLAS, so
an eager call configured for it runs decompress + cuBLAS instead (PATCHC_CSLT_EAGER=1 forces cuSPARSELt).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from patchc.config import settings

from .device import capability
from .schedule import Schedule

PAD_M = 16  # M is padded to a multiple of this for cuSPARSELt's dense operand (padding rows are zeros, dropped)


# ---------------------------------------------------------------------------------------------
# cuSPARSELt's compressed layout
# ---------------------------------------------------------------------------------------------
def nibble_position(r: torch.Tensor, q: torch.Tensor, k: int) -> torch.Tensor:
    """Index, among the metadata's nibbles (low nibble of each byte first), of row r's group q (columns
    4q..4q+3) of a [N, K] weight: 64-row x 32-column blocks, row blocks outermost, and inside a block the order
    of mma.sp's metadata fragments (fitted to ab853d4:bench/cslt_layout_probe.py's maps on an H100, exact at 6 shapes up
    to 2048 rows and columns)."""
    low = (r >> 3 & 1) | (q >> 2 & 1) << 1 | (q & 1) << 2 | (q >> 1 & 1) << 3
    return ((r >> 6) * (k // 32) + (q >> 3)) * 512 + (low | (r & 7) << 4 | (r >> 4 & 3) << 7)


def compressed_shape(n: int, k: int) -> tuple[int, int]:
    """cuSPARSELt's compressed 2:4 weight of an [N, K] layer: [N, K/2] kept values, then [N, K/16] of codes (4
    bits a group of 4, as 16-bit elements), viewed as one [N, K/2 + K/16]."""
    return n, k // 2 + k // 16


def to_cusparselt_reference(values: torch.Tensor, meta: torch.Tensor, n: int, k: int, tile: int) -> torch.Tensor:
    """The conversion in torch ops, from nibble_position (the reference the kernel is tested against).

    A packed all-2:4 layer (values [R*C, T, T/2], codes [R*C, T, T/8], tiles row-major) -> cuSPARSELt's
    compressed weight: a [N, K/2 + K/16] tensor of the values' dtype whose memory is flat, all N*K/2 kept values
    row-major first, then all N*K/8 metadata bytes (not each row's values followed by its codes)."""
    r, c, t = n // tile, k // tile, tile
    assert values.shape == (r * c, t, t // 2) and meta.shape == (r * c, t, t // 8), (values.shape, meta.shape)
    assert n % 64 == 0 and k % 32 == 0 and values.element_size() == 2, (n, k, values.dtype)
    vals = values.view(r, c, t, t // 2).permute(0, 2, 1, 3).reshape(n, k // 2)              # [N, K/2] row-major
    nib = torch.stack([meta & 0xF, meta >> 4], -1).view(r, c, t, t // 4)                     # [R, C, T, T/4]
    nib = nib.permute(0, 2, 1, 3).reshape(-1)                                                 # [N * K/4] row-major
    g = k // 4
    idx = torch.arange(n * g, device=meta.device)
    out = torch.empty_like(nib)
    out[nibble_position(idx // g, idx % g, k)] = nib
    codes = (out[0::2] | out[1::2] << 4).view(values.dtype).view(n, k // 16)                 # [N, K/16]
    return torch.cat([vals.reshape(-1), codes.reshape(-1)]).view(compressed_shape(n, k))


@triton.jit
def to_cusparselt_kernel(
    values_ptr, meta_ptr,              # packed: values [R*C, T, T/2] as int16, codes [R*C, T, T/8] uint8
    out_values_ptr, out_meta_ptr,      # cuSPARSELt's buffer: [N, K/2] int16, then [N*K/8] uint8
    K,
    TILE: tl.constexpr, C: tl.constexpr, COLS: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """One program: 64 rows x COLS tile columns of an all-2:4 layer, a tile column per loop step (pipelined).
    Copies the rows' kept values into row-major order, and writes their codes as the TILE/32 metadata blocks
    (64 rows x 32 columns, 256 bytes each) they fill: byte b of a block holds nibbles p = 2b and 2b + 1, i.e.
    rows r and r + 8 of the same group q, with r = (p>>4 & 7) | (p & 1) << 3 | (p>>7 & 3) << 4 and
    q = (p>>2 & 1) | (p>>3 & 1) << 1 | (p>>1 & 1) << 2 (nibble_position inverted inside a block)."""
    rb = tl.program_id(0)                               # 64-row block
    rt = rb * 64 // TILE                                # row-tile
    r_in = rb * 64 % TILE                               # first row of the block inside its tile
    rows = tl.arange(0, 64)[:, None]
    cols = tl.arange(0, TILE // 2)[None, :]
    j = tl.arange(0, TILE // 32)[:, None]                # metadata block inside the tile column
    b = tl.arange(0, 256)[None, :]                      # byte inside the block
    p = 2 * b
    r = ((p >> 4) & 7) | (((p >> 7) & 3) << 4)          # p's bit 0 is 0: rows r and r + 8
    q = ((p >> 2) & 1) | (((p >> 3) & 1) << 1) | (((p >> 1) & 1) << 2)
    grp = j * 8 + q                                     # group inside the tile row
    shift = (grp % 2) * 4
    for c in tl.range(tl.program_id(1) * COLS, tl.program_id(1) * COLS + COLS, num_stages=NUM_STAGES):
        tile_id = rt * C + c                            # all-2:4: the i-th tile is the i-th sparse tile
        # values: [64, TILE/2] from the tile's rows r_in.. to rows rb*64.. of the [N, K/2] output
        v = tl.load(values_ptr + (tile_id * TILE + r_in + rows).to(tl.int64) * (TILE // 2) + cols)
        src = meta_ptr + (tile_id * TILE + r_in + r).to(tl.int64) * (TILE // 8) + grp // 2
        lo = (tl.load(src) >> shift) & 0xF
        hi = (tl.load(src + 8 * (TILE // 8)) >> shift) & 0xF
        tl.store(out_values_ptr + (rb * 64 + rows).to(tl.int64) * (K // 2) + c * (TILE // 2) + cols, v)
        dst = out_meta_ptr + ((rb * (K // 32) + c * (TILE // 32) + j) * 256 + b).to(tl.int64)
        tl.store(dst, (lo | (hi << 4)).to(tl.uint8))


CONVERT_LAUNCH = (1, 4, 1)  # (tile columns a program, warps, pipeline stages); see ab853d4:bench/cslt_prefill_check.py


def to_cusparselt(values: torch.Tensor, meta: torch.Tensor, n: int, k: int, tile: int,
                  out: torch.Tensor | None = None, launch: tuple[int, int, int] | None = None) -> torch.Tensor:
    """A packed all-2:4 layer -> cuSPARSELt's compressed weight [N, K/2 + K/16] (see to_cusparselt_reference) in
    one launch: every value and code read once and written once. `out` (a flat buffer of n*k/2 + n*k/16
    elements of the values' dtype) is reused when given."""
    if n % 64 or k % 32 or tile % 64 or values.element_size() != 2:
        raise ValueError(f"cuSPARSELt conversion needs N % 64 == 0, K % 32 == 0, a tile that 64 divides and 16-bit "
                         f"values; got N={n}, K={k}, tile={tile}, {values.dtype}")
    r, c = n // tile, k // tile
    if values.shape != (r * c, tile, tile // 2) or meta.shape != (r * c, tile, tile // 8):
        raise ValueError(f"not an all-2:4 packed layer of {n}x{k} at tile {tile}: values {tuple(values.shape)}, "
                         f"codes {tuple(meta.shape)}")
    rows, width = compressed_shape(n, k)
    nv = n * k // 2
    if out is None:
        out = torch.empty(rows * width, dtype=values.dtype, device=values.device)
    flat_bytes = out.view(torch.uint8)
    cols, warps, stages = launch or CONVERT_LAUNCH
    while c % cols:
        cols //= 2
    to_cusparselt_kernel[(n // 64, c // cols)](values.view(torch.int16), meta, out[:nv].view(torch.int16),
                                               flat_bytes[2 * nv:], k, TILE=tile, C=c, COLS=cols,
                                               NUM_STAGES=stages, num_warps=warps)
    return out.view(rows, width)


# ---------------------------------------------------------------------------------------------
# y^T [N, M] -> y [M, N] (+ bias) (SiLU(gate) * up)
# ---------------------------------------------------------------------------------------------
@triton.jit
def transpose_epilogue_kernel(
    yt_ptr, bias_ptr, y_ptr,           # y^T [N_ROWS, M] (row stride S_YT), bias [N_ROWS], y [M, N_OUT] row-major
    M, N_OUT, S_YT,
    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program: a [BLOCK_N, BLOCK_M] block of y^T, loaded along M, written along N. With SILU_MUL, y^T
    stacks gate (rows 0..N_OUT-1) and up (rows N_OUT..2*N_OUT-1) and y = SiLU(gate) * up, in fp32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_n[:, None] < N_OUT) & (offs_m[None, :] < M)
    src = yt_ptr + offs_n[:, None].to(tl.int64) * S_YT + offs_m[None, :]                       # [BLOCK_N, BLOCK_M]
    acc = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N_OUT, other=0.0).to(tl.float32)[:, None]
    if SILU_MUL:
        up_src = yt_ptr + (offs_n[:, None].to(tl.int64) + N_OUT) * S_YT + offs_m[None, :]
        up = tl.load(up_src, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            up += tl.load(bias_ptr + N_OUT + offs_n, mask=offs_n < N_OUT, other=0.0).to(tl.float32)[:, None]
        acc = acc / (1.0 + tl.exp(-acc)) * up
    dst = y_ptr + offs_m[None, :].to(tl.int64) * N_OUT + offs_n[:, None]
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=mask)


def transpose_epilogue(yt: torch.Tensor, m: int, n_out: int, bias: torch.Tensor | None = None,
                       silu_mul: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [m, n_out] row-major from y^T [rows, >= m] (columns past m ignored; rows = 2 * n_out stacked gate; up
    when silu_mul): + bias [rows], then SiLU(gate) * up."""
    rows = 2 * n_out if silu_mul else n_out
    assert yt.dim() == 2 and yt.shape[0] == rows and yt.shape[1] >= m and yt.stride(1) == 1, (yt.shape, rows, m)
    y = out if out is not None else torch.empty((m, n_out), device=yt.device, dtype=yt.dtype)
    bm, bn = 64, 64
    transpose_epilogue_kernel[(triton.cdiv(m, bm), triton.cdiv(n_out, bn))](
        yt, bias if bias is not None else yt, y, m, n_out, yt.stride(0),
        HAS_BIAS=bias is not None, SILU_MUL=silu_mul, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return y


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------
def enabled() -> bool:
    return settings().cslt


def eager_enabled() -> bool:
    """Whether eager (uncaptured) calls run cuSPARSELt too. Off by default: torch._cslt_sparse_mm sets up its
    plan on the host at every call (400-530 us eagerly, bench/NOTES.md), which made an eager 7B prefill 3.1x
    slower (ab853d4:bench/results/e2e_cslt); inside CUDA graphs that cost is paid once at capture."""
    return settings().cslt_eager


def use_now(x: torch.Tensor) -> bool:
    """Whether a call configured for cuSPARSELt runs it now: while a CUDA graph is being captured (or when
    PATCHC_CSLT_EAGER=1, or on a CPU tensor, for the tests' stand-in); else the caller runs decompress + cuBLAS."""
    return not x.is_cuda or eager_enabled() or torch.cuda.is_current_stream_capturing()


def unsupported(x: torch.Tensor, values: torch.Tensor, sched: Schedule) -> str | None:
    """Why this call cannot run on cuSPARSELt (None: it can)."""
    if not enabled():
        return "PATCHC_CSLT=0"
    if not x.is_cuda:
        return "not a CUDA tensor"
    if not sched.all_sparse:
        return "the layer has dense tiles"
    if x.dtype not in (torch.float16, torch.bfloat16) or values.dtype != x.dtype:
        return f"needs 16-bit activations and weights of one dtype (got {x.dtype}, {values.dtype})"
    if sched.tile % 64 or sched.n % 64 or sched.k % 32:
        return f"needs a tile that 64 divides (tile {sched.tile})"
    if capability(x.device) < (8, 0):
        return "needs an sm_80+ GPU"
    if not hasattr(torch, "_cslt_sparse_mm") or not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt"
    return None


_algorithms: dict[tuple, int] = {}


def _algorithm_key(wc_shape: tuple, m_padded: int, dtype, device) -> tuple:
    return (tuple(wc_shape), 1 << (m_padded - 1).bit_length(), dtype, device)


def algorithm(wc: torch.Tensor, xt: torch.Tensor) -> int:
    """cuSPARSELt's fastest algorithm for this weight shape, dtype and M bucket: searched once (outside CUDA graph
    capture; while capturing, an unsearched bucket uses the default, 0) and remembered. On the H100 the search
    took 7B-shape layers at M=2048 from 84-246 us to 74-197 us (ab853d4:bench/results/cslt_prefill).
    PATCHC_CSLT_SEARCH=0 keeps the default algorithm."""
    key = _algorithm_key(wc.shape, xt.shape[1], wc.dtype, wc.device)
    alg = _algorithms.get(key)
    if alg is None:
        if not xt.is_cuda or torch.cuda.is_current_stream_capturing():
            return 0
        if not settings().cslt_search:
            alg = 0
        else:
            alg = _search(wc, xt)
        _algorithms[key] = alg
    return alg


def _search(wc: torch.Tensor, xt: torch.Tensor) -> int:
    """cuSPARSELt's algorithm search: torch._cslt_sparse_mm_search (torch 2.11 warns that it is deprecated; the
    warning is ours to handle, not the user's), or where a later torch has removed it, its successor
    torch._C._cusparselt.mm_search (compressed A, B, bias, alpha, out dtype, transpose_result) -> (alg_id, ...)."""
    old = getattr(torch, "_cslt_sparse_mm_search", None)
    if old is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*_cslt_sparse_mm_search is deprecated")
            found = old(wc, xt)
    else:
        found = torch._C._cusparselt.mm_search(wc, xt, None, None, None, False)
    return int(found[0] if isinstance(found, (tuple, list)) else found)


def padded_m(m: int) -> int:
    """The rows of x cuSPARSELt is given: M rounded up to a multiple of PAD_M."""
    return triton.cdiv(m, PAD_M) * PAD_M


def prepare(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, sched: Schedule) -> None:
    """On an eager call that will be captured later (the warm-up before CUDA-graph capture): search the algorithm
    for this shape and M bucket now, since the search cannot run while capturing. Once per (shape, bucket)."""
    m = padded_m(x.shape[0])
    key = _algorithm_key(compressed_shape(sched.n, sched.k), m, values.dtype, values.device)
    if key not in _algorithms and not torch.cuda.is_current_stream_capturing():
        xt = torch.empty((m, sched.k), device=x.device, dtype=x.dtype).normal_().t()
        algorithm(to_cusparselt(values, meta, sched.n, sched.k, sched.tile), xt)


def cslt_mm(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, sched: Schedule,
            bias: torch.Tensor | None, n_out: int, silu_mul: bool = False, poison: bool = False) -> torch.Tensor:
    """y [M, n_out] = epilogue(x [M, K] @ W^T) for an all-2:4 layer (W stacked gate; up as [2 * n_out, K] when
    silu_mul) on cuSPARSELt: convert, y^T = W_c @ x^T, transpose with the epilogue. poison=True fills the output
    with NaN first, so an element never written shows."""
    m, k = x.shape
    wc = to_cusparselt(values, meta, sched.n, k, sched.tile)                                  # [N, K/2 + K/16]
    mp = padded_m(m)
    if mp != m or not x.is_contiguous():
        x = F.pad(x, (0, 0, 0, mp - m)) if mp != m else x.contiguous()                       # [Mp, K]
    alg = algorithm(wc, x.t())
    yt = torch._cslt_sparse_mm(wc, x.t(), alg_id=alg) if alg else torch._cslt_sparse_mm(wc, x.t())  # [N, K] @ [K, Mp]
    out = torch.empty((m, n_out), device=x.device, dtype=x.dtype)
    if poison:
        out.fill_(float("nan"))
    return transpose_epilogue(yt, m, n_out, bias, silu_mul, out=out)
