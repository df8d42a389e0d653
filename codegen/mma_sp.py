"""The decode kernel on the sparse tensor cores: 2:4 tiles through mma.sp, dense tiles through mma.sync.

Triton has no sparse dot, and decompressing 2:4 tiles in registers made the Triton decode kernel
instruction bound (bench/NOTES.md, v4: ~8 instructions a weight, 1.9-2.7x the byte floor at 50%).
The packed format's 4-bit codes are exactly mma.sp's metadata, so this kernel (mma_sp.cu, CUDA C++
built once per machine with torch.utils.cpp_extension) feeds the stored values and codes to the
tensor cores as they lie. It serves 16-bit activations with M <= 32 on sm_80+ GPUs; everything else
keeps the Triton kernels. PATCHC_MMA_SP=0 turns it off. On sm_90+ a staged variant streams the weights
through shared memory with bulk copies (codegen/launch.py decides where; PATCHC_MMA_SP_STAGED=0 turns it off).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from patchc.config import settings

from .cuda_build import CudaKernel, inline_common
from .device import capability, pdl_enabled
from .schedule import Schedule

MAX_M = 32          # what the kernel runs
DEFAULT_MAX_M = 16  # what the untuned default sends to it (above, the Triton kernel was faster on the H100) ...
# ... except on layers of at most SHORT_N output rows, where it also takes M up to 32 (H100, 2:4 tiles at 25/50%,
# ab853d4:bench/results/mma_sp/mma_sp_vs_triton_m24_m32.log: 4096x4096 0.77-0.92x the Triton kernel's time at M=24-32,
# 4096x11008 0.90-0.94x at M=24 and 1.01x at M=32; on 11008x4096 Triton took 0.65-0.89x the mma.sp default's)
SHORT_N = 4096
SHORT_DEFAULT_MAX_M = 32
TILES = (64, 128)
SOURCE = Path(__file__).with_name("mma_sp.cu")


def source(text: str | None = None) -> str:
    """mma_sp.cu (or `text`, another version of it) with device_common.cuh pasted in: the text nvcc compiles."""
    return inline_common(SOURCE.read_text() if text is None else text)


_KERNEL = CudaKernel(
    "patchc_mma_sp", "mma.sp decode kernel", source,
    "void hybrid_mma_sp(torch::Tensor x, torch::Tensor dense, torch::Tensor values, torch::Tensor meta, "
    "torch::Tensor dense_col, torch::Tensor sparse_col, torch::Tensor dense_start, torch::Tensor sparse_start, "
    "c10::optional<torch::Tensor> bias, torch::Tensor y, int64_t tile, int64_t warps, int64_t slices, "
    "int64_t staged, int64_t silu_mul, int64_t pdl);",
    ["hybrid_mma_sp"], ["-O3"], "PATCHC_MMA_SP")


def enabled() -> bool:
    return settings().mma_sp


def extension():
    """The compiled extension, or None (with a warning naming the reason) if it cannot be built here."""
    return _KERNEL.extension()


def default_max_m(n_out: int) -> int:
    """The largest M the untuned default sends to this kernel for a layer of n_out output rows."""
    return SHORT_DEFAULT_MAX_M if n_out <= SHORT_N else DEFAULT_MAX_M


def x_aligned(x: torch.Tensor) -> bool:
    """x is a row-major [M, K] whose rows start on 16-byte boundaries (this kernel's 16-byte loads, and the TMA
    descriptors of codegen/launch.py and codegen/wgmma.cu)."""
    return (x.dim() == 2 and x.stride(1) == 1 and (x.stride(0) * x.element_size()) % 16 == 0
            and x.data_ptr() % 16 == 0)


def codes_aligned(meta: torch.Tensor | None) -> bool:
    """The 2:4 codes start on a 16-byte boundary (the staged kernel's bulk copies), or there are none."""
    return meta is None or meta.numel() == 0 or meta.data_ptr() % 16 == 0


def unsupported(x: torch.Tensor, w_dtype: torch.dtype, sched: Schedule, silu_mul: bool = False) -> str | None:
    """Why this call cannot run on the mma.sp kernel (None: it can). Cheap: no build, no sync."""
    if not enabled():
        return "PATCHC_MMA_SP=0"
    if not x.is_cuda:
        return "not a CUDA tensor"
    if capability(x.device) < (8, 0):
        return "needs sm_80+ (sparse tensor cores)"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {x.dtype} (16-bit only)"
    if w_dtype != x.dtype:
        return f"weights {w_dtype} differ from activations {x.dtype}"
    if not 1 <= x.shape[0] <= MAX_M:
        return f"M={x.shape[0]} outside 1..{MAX_M}"
    if sched.tile not in TILES:
        return f"tile {sched.tile} not in {TILES}"
    if not x_aligned(x):
        return "x is not 16-byte aligned row-major"
    return None


STAGES = 2                # buffers a warp streams its tiles through (mma_sp.cu STAGES)
SM_SMEM = 228 * 1024      # shared memory of an SM (sm_90), less 1 KB a resident CTA
MAX_SMEM = 227 * 1024     # dynamic shared memory one CTA may opt in to (sm_90)


def stage_bytes(tile: int, slices: int) -> int:
    """One buffer of the staged ring (mma_sp.cu Stage::SIZE): the CTA's rows of a dense tile, or of a 2:4
    tile's values and codes, as stored."""
    rows = 16 * slices
    return max(rows * 2 * tile, rows * tile + rows * tile // 8)


def smem_bytes(m: int, warps: int, slices: int, tile: int = 128, staged: bool = False) -> int:
    """Dynamic shared memory of a launch: the final cross-warp reduction's [warps, 8 * MB batch rows,
    16 * slices + 4 (padded rows)] fp32 partials, or for the staged kernel the ring they alias plus its mbarriers."""
    mb = 1 if m <= 8 else 2 if m <= 16 else 4
    partial = 4 * warps * 8 * mb * (16 * slices + 4)
    if not staged:
        return partial
    return max(partial, warps * STAGES * stage_bytes(tile, slices)) + warps * STAGES * 8


def staged_available(x: torch.Tensor, meta: torch.Tensor | None) -> bool:
    """The staged kernel (bulk copies into shared memory) needs sm_90+ and 16-byte aligned codes."""
    return (capability(x.device) >= (9, 0) and settings().mma_sp_staged
            and codes_aligned(meta))


@functools.lru_cache(maxsize=4096)  # a pure function of its arguments; every eager launch asks it
def launch_error(m: int, n_out: int, tile: int, warps: int, slices: int, staged: bool = False,
                 silu_mul: bool = False) -> str | None:
    """Why (m, n_out, tile, warps, slices, staged, silu_mul) is not a valid launch (None: it is)."""
    if not 1 <= m <= MAX_M:
        return f"M={m} outside 1..{MAX_M}"
    if tile not in TILES:
        return f"tile {tile} not in {TILES}"
    if slices not in (1, 2) or (slices == 2 and m > 16):
        return f"slices={slices}: 1, or 2 with M <= 16"
    if not 1 <= warps <= 16:
        return f"warps={warps} outside 1..16"
    if n_out % (16 * slices):
        return f"n_out={n_out} is not a multiple of {16 * slices}"
    if silu_mul and (warps % 2 or n_out % tile):
        return f"SiLU*up needs an even number of warps (got {warps}) and n_out a multiple of {tile} (got {n_out})"
    need, cap = smem_bytes(m, warps, slices, tile, staged), MAX_SMEM if staged else 48 * 1024
    if need > cap:
        return f"{warps} warps x {slices} slices at M={m} need {need} B of shared memory (max {cap})"
    return None


def default_launch(m: int, n_out: int, num_sms: int, tile: int = 128, staged: bool = False,
                   silu_mul: bool = False) -> tuple[int, int]:
    """(warps, slices) a CTA (_default_launch). SiLU*up: a CTA runs the gate and the up row-tiles of its rows
    with half its warps each, so it gets the warps two CTAs of the stacked [gate; up] launch would have had
    (rounded to even, fewer where shared memory or the slices rule forbid)."""
    if not silu_mul:
        return _default_launch(m, n_out, num_sms, tile, staged)
    warps, slices = _default_launch(m, 2 * n_out, num_sms, tile, staged)
    if n_out % (16 * slices):
        slices = 1
    warps = min(16, 2 * warps)
    while warps > 2 and launch_error(m, n_out, tile, warps, slices, staged, True):
        warps -= 2
    return warps, slices


def _default_launch(m: int, n_out: int, num_sms: int, tile: int = 128, staged: bool = False) -> tuple[int, int]:
    """(warps, slices) a CTA, fitted to what was fastest on an H100 (ab853d4:bench/results/mma_sp). M <= 16 gives each
    CTA two slices (one x load serves both) when that still leaves ~100+ CTAs. Direct loads: M <= 8 uses 16
    warps on one slice, else warps up to ~16 resident an SM. Staged: the most warps a CTA such that every CTA
    is resident at once (one wave), with at most 16 warps an SM."""
    slices = 2 if 8 < m <= 16 and n_out % 32 == 0 and n_out // 32 >= 96 else 1
    ctas = n_out // (16 * slices)
    if staged:
        for warps in range(16, 0, -1):
            smem = smem_bytes(m, warps, slices, tile, True)
            if smem > MAX_SMEM:
                continue
            per_sm = min(SM_SMEM // (smem + 1024), 16 // warps)
            if per_sm * num_sms >= ctas:
                return warps, slices
        return 1, slices
    if m <= 8:
        return 16, 1
    warps = 4
    while warps < 16 and 2 * warps * ctas <= 16 * num_sms:
        warps *= 2
    return warps, slices


def run(x: torch.Tensor, dense: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, sched: Schedule,
        bias: torch.Tensor | None, n_out: int, warps: int, slices: int = 1, poison: bool = False,
        staged: bool = False, silu_mul: bool = False, pdl: bool | None = None) -> torch.Tensor:
    """y [M, n_out] = x [M, K] @ W^T + bias on the sparse tensor cores, one CTA per `slices` x 16 output
    rows with `warps` warps splitting its K-tiles; staged=True streams the weights through shared memory with
    bulk copies (sm_90+, see staged_available). silu_mul=True: W is [gate; up] (2 * n_out rows) and
    y = SiLU(x @ gate^T + b_gate) * (x @ up^T + b_up), one launch. The caller checked `unsupported`.
    pdl: launch as a programmatic dependent (None: pdl_enabled). poison=True fills y with NaN first, so an
    element the kernel misses shows."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"the mma.sp kernel is unavailable: {_KERNEL.error}")
    m = x.shape[0]
    if staged and not staged_available(x, meta):
        raise ValueError("mma_sp.run: staged needs an sm_90+ GPU and 16-byte aligned codes (PATCHC_MMA_SP_STAGED=0 "
                         "turns it off)")
    why = launch_error(m, n_out, sched.tile, warps, slices, staged, silu_mul)
    if why:
        raise ValueError(f"mma_sp.run: {why}")
    for name, t, align in (("dense", dense, 16), ("values", values, 16), ("meta", meta, 8)):
        if t.numel() and t.data_ptr() % align:
            raise ValueError(f"packed {name} storage is not {align}-byte aligned")
    if pdl is None:
        pdl = pdl_enabled(x)
    elif pdl and capability(x.device) < (9, 0):
        raise ValueError("mma_sp.run: programmatic dependent launch needs an sm_90+ GPU")
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    y = torch.full((x.shape[0], n_out), float("nan"), dtype=x.dtype, device=x.device) if poison else \
        torch.empty((x.shape[0], n_out), dtype=x.dtype, device=x.device)
    ext.hybrid_mma_sp(x, dense, values, meta, sched.dense_col, sched.sparse_col, sched.dense_start,
                      sched.sparse_start, bias, y, sched.tile, warps, slices, int(staged), int(silu_mul),
                      int(pdl))
    return y
