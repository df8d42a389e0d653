"""The prefill GEMM on Hopper's warpgroup tensor cores: dense tiles through wgmma, 2:4 tiles through sparse
wgmma, both read in place from the packed format, one launch, no decompression.

Decompress + cuBLAS, the fallback for layers that mix dense and 2:4 tiles, has to write and read a
transient dense weight and then does the full dense FLOPs; Triton 3.6 has no sparse dot. wgmma.cu
(CUDA C++, built once per machine for sm_90a with torch.utils.cpp_extension) runs each 2:4 tile on the
sparse tensor cores at half a dense tile's tensor time. It serves 16-bit activations, tile 128, on
compute capability 9.0 exactly (sm_90a code runs nowhere else). PATCHC_WGMMA=0 turns it off.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .cuda_build import CudaKernel
from .device import capability
from .mma_sp import x_aligned
from .schedule import Schedule

SOURCE = Path(__file__).with_name("wgmma.cu")
TILE = 128
BLOCK_NS = (64, 128)    # tokens a CTA (m64n64 / m64n128 wgmma); a CTA covers 256 rows of W (two row-tiles)
MAX_K = 256 * TILE      # wgmma.cu MAX_C K-tiles a row
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


def source() -> str:
    """wgmma.cu with its wgmma wrappers generated (inline asm with 64 or 128 accumulator operands each)."""
    ops = []
    for block_n in BLOCK_NS:
        for c_type, ptx_type in DTYPES.values():
            ops.append(f"template <> struct Wgmma<{c_type}, {block_n}> {{\n{_wgmma_op(block_n, False, ptx_type)}"
                       f"{_wgmma_op(block_n, True, ptx_type)}}};\n")
    src = SOURCE.read_text()
    marker = "// @WGMMA_OPS@"
    assert marker in src, "wgmma.cu lost its @WGMMA_OPS@ marker"
    return src.replace(marker, "".join(ops) + marker)


_KERNEL = CudaKernel(
    "patchc_wgmma", "wgmma prefill kernel", source,
    "void hybrid_wgmma(torch::Tensor x, torch::Tensor dense, torch::Tensor values, torch::Tensor meta, "
    "torch::Tensor slot, c10::optional<torch::Tensor> bias, torch::Tensor y, int64_t block_n);",
    ["hybrid_wgmma"], ["-O3", "-gencode=arch=compute_90a,code=sm_90a"], "PATCHC_WGMMA")


def enabled() -> bool:
    return os.environ.get("PATCHC_WGMMA", "1").lower() not in ("0", "false", "no")


def extension():
    """The compiled extension, or None (with a warning naming the reason) if it cannot be built here."""
    return _KERNEL.extension()


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
        bias: torch.Tensor | None, poison: bool = False, block_n: int = 128) -> torch.Tensor:
    """y [M, sched.n] = x [M, K] @ W^T + bias: one CTA per (two row-tiles, block_n tokens). The caller checked
    `unsupported`. poison=True fills y with NaN first, so an element the kernel misses shows."""
    if block_n not in BLOCK_NS:
        raise ValueError(f"wgmma.run: block_n {block_n} not in {BLOCK_NS}")
    ext = extension()
    if ext is None:
        raise RuntimeError(f"the wgmma kernel is unavailable: {_KERNEL.error}")
    for name, t in (("dense", dense), ("values", values), ("meta", meta)):
        if t.numel() and (t.data_ptr() % 16 or not t.is_contiguous()):
            raise ValueError(f"packed {name} storage is not contiguous and 16-byte aligned")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    m = x.shape[0]
    y = torch.full((m, sched.n), float("nan"), dtype=x.dtype, device=x.device) if poison else \
        torch.empty((m, sched.n), dtype=x.dtype, device=x.device)
    if m:
        ext.hybrid_wgmma(x, dense, values, meta, sched.slot, bias, y, block_n)
    return y
