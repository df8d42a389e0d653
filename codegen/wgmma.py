"""The Hopper GEMM on warpgroup tensor cores: dense tiles through wgmma, 2:4 tiles through sparse wgmma, both
read in place from the packed format, one launch, no decompression. Prefill runs 64- or 128-token CTAs; decode
(M <= 16) 16-token CTAs with K split over a thread-block cluster, the partials summed in distributed shared
memory; either can fuse SiLU(gate) * up for a stacked [gate; up] weight.

Decompress + cuBLAS, the fallback for layers that mix dense and 2:4 tiles, has to write and read a
transient dense weight and then does the full dense FLOPs; Triton 3.6 has no sparse dot. wgmma.cu
(CUDA C++, built once per machine for sm_90a with torch.utils.cpp_extension) runs each 2:4 tile on the
sparse tensor cores at half a dense tile's tensor time. It serves 16-bit activations, tile 128, on
compute capability 9.0 exactly (sm_90a code runs nowhere else). PATCHC_WGMMA=0 turns it off.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from patchc.config import settings

from .cuda_build import CudaKernel, inline_common
from .device import capability, pdl_enabled
from .mma_sp import x_aligned
from .schedule import Schedule

SOURCE = Path(__file__).with_name("wgmma.cu")
TILE = 128
BLOCK_NS = (16, 64, 128)  # tokens a CTA (m64nBNk16 wgmma); a CTA covers 256 rows of W (two row-tiles)
PREFILL_BLOCK_NS = (64, 128)
DECODE_BLOCK_N = 16       # M <= 16, K split over a cluster
ROWS = (256, 64)          # rows of W a CTA: two row-tiles, or (decode only) half of one
MAX_SPLIT = 8             # CTAs of a cluster splitting K (portable cluster size)
MAX_K = 256 * TILE      # wgmma.cu MAX_C K-tiles a row
KIND_WORDS = 880          # wgmma.cu: a schedule's `kinds` up to this size travel in the launch's parameters
DTYPES = {torch.bfloat16: ("__nv_bfloat16", "bf16"), torch.float16: ("__half", "f16")}


def _wgmma_op(block_n: int, sparse: bool, ptx_type: str) -> str:
    """One wrapper: `wgmma.mma_async[.sp]` m64n{block_n}k{16|32} into block_n / 2 fp32 accumulators."""
    n = block_n // 2
    regs = ", ".join(f"%{i}" for i in range(n))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n))
    if sparse:
        sig, k, ins, ops, pred = "uint64_t a, uint64_t b, uint32_t e", 32, '"l"(a), "l"(b), "r"(e), "r"(1)', \
            f"%{n}, %{n + 1}, %{n + 2}, 0", n + 3   # sp-meta e, sparsity selector 0
    else:
        sig, k, ins, ops, pred = "uint64_t a, uint64_t b", 16, '"l"(a), "l"(b), "r"(1)', f"%{n}, %{n + 1}", n + 2
    return (f"  __device__ __forceinline__ static void {'sparse' if sparse else 'dense'}(float* d, {sig}) {{\n"
            f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{pred}, 0;\\n"\n'
            f'        "wgmma.mma_async{".sp" if sparse else ""}.sync.aligned.m64n{block_n}k{k}.f32.{ptx_type}.'
            f'{ptx_type} {{{regs}}}, {ops}, p, 1, 1, 0, 0;\\n}}\\n"\n'
            f"        : {outs}\n        : {ins});\n  }}\n")


def source(text: str | None = None) -> str:
    """wgmma.cu (or `text`, another version of it) with its wgmma wrappers generated (inline asm with 8, 32 or 64
    accumulator operands each) and device_common.cuh pasted in: the text nvcc compiles."""
    ops = []
    for block_n in BLOCK_NS:
        for c_type, ptx_type in DTYPES.values():
            ops.append(f"template <> struct Wgmma<{c_type}, {block_n}> {{\n{_wgmma_op(block_n, False, ptx_type)}"
                       f"{_wgmma_op(block_n, True, ptx_type)}}};\n")
    ops.append("#define PATCHC_WGMMA_BLOCK_NS " + " ".join(f"PATCHC_WGMMA_CASE({b})" for b in BLOCK_NS) + "\n")
    src = SOURCE.read_text() if text is None else text
    marker = "// @WGMMA_OPS@"
    assert marker in src, "wgmma.cu lost its @WGMMA_OPS@ marker"
    return inline_common(src.replace(marker, "".join(ops) + marker))


_KERNEL = CudaKernel(
    "patchc_wgmma", "wgmma kernel", source,
    "void hybrid_wgmma(torch::Tensor x, torch::Tensor dense, torch::Tensor values, torch::Tensor meta, "
    "torch::Tensor slot, torch::Tensor kinds, c10::optional<torch::Tensor> bias, torch::Tensor y, int64_t block_n, "
    "int64_t split, int64_t silu_mul, int64_t pdl, int64_t rows);\n"
    "int64_t wgmma_max_clusters(int64_t block_n, int64_t split);",
    ["hybrid_wgmma", "wgmma_max_clusters"], ["-O3", "-gencode=arch=compute_90a,code=sm_90a"], "PATCHC_WGMMA")


def enabled() -> bool:
    return settings().wgmma


def decode_enabled() -> bool:
    """Whether decode (M <= 16) may use the kernel's 16-token CTAs (PATCHC_WGMMA_DECODE=0: the mma.sp kernel)."""
    return settings().wgmma_decode


def extension():
    """The compiled extension, or None (with a warning naming the reason) if it cannot be built here."""
    return _KERNEL.extension()


@functools.lru_cache(maxsize=None)
def max_clusters(device_index: int, block_n: int, split: int) -> int:
    """How many clusters of `split` CTAs of block_n tokens the GPU runs at once (cudaOccupancyMaxActiveClusters:
    a cluster's CTAs share one GPC, one CTA an SM), or 0 where the kernel is not built."""
    ext = extension()
    if ext is None:
        return 0
    with torch.cuda.device(device_index):
        return int(ext.wgmma_max_clusters(block_n, split))


def unsupported(x: torch.Tensor, w_dtype: torch.dtype, sched: Schedule) -> str | None:
    """Why this call cannot run on the wgmma kernel (None: it can). Cheap: no build, no sync."""
    if not enabled():
        return "PATCHC_WGMMA=0"
    if not x.is_cuda:
        return "not a CUDA tensor"
    if capability(x.device) != (9, 0):
        return "needs compute capability 9.0 (sm_90a: H100 / H200)"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (16-bit only)"
    if w_dtype != x.dtype:
        return f"weights {w_dtype} differ from activations {x.dtype}"
    if sched.tile != TILE:
        return f"tile {sched.tile} (the wgmma kernel takes {TILE})"
    if sched.k > MAX_K:
        return f"K={sched.k} above {MAX_K}"
    if not x_aligned(x):
        return "x is not 16-byte aligned row-major"
    return None


def run(x: torch.Tensor, dense: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, sched: Schedule,
        bias: torch.Tensor | None, poison: bool = False, block_n: int = 128, split: int = 1,
        silu_mul: bool = False, pdl: bool | None = None, rows: int = 256) -> torch.Tensor:
    """y [M, N] = x [M, K] @ W^T + bias (N = sched.n), or with silu_mul (W = [gate; up] stacked, bias likewise)
    y [M, N / 2] = SiLU(x @ gate^T + b_gate) * (x @ up^T + b_up). One CTA per (two row-tiles, block_n tokens,
    1 / split of K); split > 1 launches clusters of `split` CTAs. rows=64 (decode: block_n 16, no silu_mul): a CTA per
    half row-tile instead, four times the CTAs at one split. The caller checked `unsupported`.
    pdl: launch as a programmatic dependent (None: device.pdl_enabled, i.e. under CUDA graph capture on sm_90+).
    poison=True fills y with NaN first, so an element the kernel misses shows."""
    if block_n not in BLOCK_NS:
        raise ValueError(f"wgmma.run: block_n {block_n} not in {BLOCK_NS}")
    k_tiles = sched.k // TILE
    if not 1 <= split <= min(MAX_SPLIT, k_tiles):
        raise ValueError(f"wgmma.run: split {split} must be 1..{min(MAX_SPLIT, k_tiles)} (at most the {k_tiles} K-tiles)")
    if split > 1 and block_n != DECODE_BLOCK_N:
        raise ValueError(f"wgmma.run: K split over a cluster (split {split}) is for the {DECODE_BLOCK_N}-token decode "
                         f"CTAs, not block_n {block_n}")
    if rows not in ROWS:
        raise ValueError(f"wgmma.run: rows {rows} not in {ROWS}")
    if rows != 256 and (block_n != DECODE_BLOCK_N or silu_mul):
        raise ValueError(f"wgmma.run: rows {rows} (part of a row-tile a CTA) is for the {DECODE_BLOCK_N}-token decode "
                         "CTAs without silu_mul")
    if silu_mul and (sched.n // TILE) % 2:
        raise ValueError(f"wgmma.run: silu_mul needs an even number of row-tiles (gate and up), got N={sched.n}")
    ext = extension()
    if ext is None:
        raise RuntimeError(f"the wgmma kernel is unavailable: {_KERNEL.error}")
    for name, t in (("dense", dense), ("values", values), ("meta", meta)):
        if t.numel() and (t.data_ptr() % 16 or not t.is_contiguous()):
            raise ValueError(f"packed {name} storage is not contiguous and 16-byte aligned")
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    m = x.shape[0]
    n = sched.n // 2 if silu_mul else sched.n
    y = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device) if poison else \
        torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        ext.hybrid_wgmma(x, dense, values, meta, sched.slot, sched.kinds, bias, y, block_n, split, int(silu_mul),
                         int(pdl_enabled(x) if pdl is None else pdl), rows)
    return y
