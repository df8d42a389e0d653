"""Launch the hybrid kernels: pick a config for M (decode or prefill), optionally autotune it once per
(layer shape, density, M bucket) on the GPU, and cache the choice on disk.

Decode (M <= 64) is memory bound. With 16-bit activations, M <= 16 (tuned: <= 32) and an sm_80+ GPU it runs on the
sparse tensor cores (mma_sp: 2:4 tiles as stored, no decompression); otherwise on the Triton kernel with
small BLOCK_M, BLOCK_N below the tile, and split-K so that enough programs stream weight bytes at once.
Prefill (M > 64) decompresses the layer into a transient dense weight and calls the vendor GEMM; up to
FUSED_MAX_M the tuner also tries the fused kernel.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from patchc.models import dtype_name

from . import mma_sp
from .kernels import decompress_kernel, hybrid_mm_kernel
from .schedule import Schedule

DECODE_MAX_M = 64
FUSED_MAX_M = 256


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    split_k: int        # 0 = decompress to a transient dense weight + vendor GEMM (prefill)
    num_warps: int
    num_stages: int
    group_m: int = 8
    engine: str = "triton"  # "mma_sp": the sparse-tensor-core decode kernel (block_n = rows a CTA, 16 or 32)
    staged: bool = False    # mma_sp: weights through shared memory by bulk copies (sm_90+)


def m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length()) if m <= 2048 else 4096


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def candidates(m: int, sched: Schedule, n_out: int, mma: bool = False, staged: bool = False,
               silu_mul: bool = False) -> list[KernelConfig]:
    """The configs the tuner tries for this M (a small set: every one costs a compile). Up to
    FUSED_MAX_M the fused split-K kernel competes; above DECODE_MAX_M, decompress + vendor GEMM too;
    with mma=True (mma_sp can run this call) the sparse-tensor-core kernel at 4/8/16 warps x 1/2 slices,
    and with staged=True (sm_90+) its staged variant at those and at its default warps."""
    t = sched.tile
    k_tiles = sched.k // t
    out = [KernelConfig(0, 16 * sl, 0, w, 1, engine="mma_sp", staged=stg) for stg in (False, True)
           for w in sorted({4, 8, 16, mma_sp.default_launch(m, n_out, 132, t, stg, silu_mul)[0]}) for sl in (1, 2)
           if mma and (staged or not stg) and mma_sp.launch_error(m, n_out, t, w, sl, stg, silu_mul) is None]
    if m <= FUSED_MAX_M:
        # BLOCK_M 128 with 2:4 tiles fails to compile in Triton 3.6 on Hopper ("Illegal shared layout", seen
        # on the H100 in the 7B-shape property tests): the fused kernel above DECODE_MAX_M uses 64 only, and
        # BLOCK_M 64 only with BLOCK_N <= 64 when the layer has 2:4 tiles (seen in the GPU property tests too).
        bms = [max(16, m_bucket(m))] if m <= DECODE_MAX_M else [64]
        for bm in bms:
            for bn in sorted({min(t, 32) if t < 64 else 64, min(t, 128)}):
                if n_out % bn or (bm >= 64 and bn > 64 and not sched.all_dense):
                    continue  # BLOCK_M 64 x BLOCK_N 128 with 2:4 tiles: the same Triton 3.6 layout error (H100)
                for split in (1, 2, 4, 8):
                    if split <= k_tiles:
                        for warps, stages in ((4, 2), (4, 3)):
                            out.append(KernelConfig(bm, bn, split, warps, stages))
    if m > DECODE_MAX_M:
        out.append(KernelConfig(0, 0, 0, 4, 1))  # split_k 0: decompress + vendor GEMM
    return out


def graph_time_ms(fns: list, reps: int = 10) -> float:
    """Median per-call time of cycling through `fns` captured in a CUDA graph (no launch gaps)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s), torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(g.replay, warmup=5, rep=50, return_mode="median")
    return ms / (reps * len(fns))


def staged_by_default(m: int, sched: Schedule) -> bool:
    """Whether the untuned mma_sp launch stages the weights through shared memory: at M <= 8 on layers with at
    least half their tiles dense (H100, bench/results/mma_sp/sweep_staged*.log, default launches: M=1 at 0%
    0.90-0.97x the time of direct loads on the 7B shapes, at 50% 1.02-1.17x; M=16 with 2:4 tiles, best
    launches, 1.03-1.17x)."""
    n_tiles = (sched.n // sched.tile) * (sched.k // sched.tile)
    return m <= 8 and sched.dense_col.numel() >= 0.5 * n_tiles


def default_config(m: int, sched: Schedule, n_out: int, num_sms: int = 132, mma: bool = False,
                   staged: bool = False, silu_mul: bool = False) -> KernelConfig:
    """The untuned choice. With mma=True (mma_sp can run this call): the sparse-tensor-core kernel, staged where
    staged=True (sm_90+) and staged_by_default says so.
    Else, fitted to what the tuner picked on an H100 (bench/results/kernels): decode uses BLOCK_N 64 for
    mostly-dense layers and the full tile for mostly-2:4 ones, and enough split-K for ~4 programs per SM
    (at most 8); prefill decompresses and calls the vendor GEMM."""
    t = sched.tile
    if mma and m <= mma_sp.DEFAULT_MAX_M:
        stg = staged and staged_by_default(m, sched)
        warps, slices = mma_sp.default_launch(m, n_out, num_sms, t, stg, silu_mul)
        return KernelConfig(0, 16 * slices, 0, warps, 1, engine="mma_sp", staged=stg)
    if m > DECODE_MAX_M:
        return KernelConfig(0, 0, 0, 4, 1)
    n_tiles = (sched.n // t) * (sched.k // t)
    mostly_dense = sched.dense_col.numel() >= 0.6 * n_tiles
    bn = min(t, 64 if mostly_dense and t >= 64 else 128)
    while n_out % bn:
        bn //= 2
    bm = max(16, m_bucket(m))
    if bm >= 64 and not sched.all_dense:
        bn = min(bn, 64)  # see candidates(): BLOCK_M 64 x BLOCK_N 128 with 2:4 tiles does not compile (Triton 3.6)
    programs = triton.cdiv(m, bm) * (n_out // bn)
    split = max(1, min(8, sched.k // t, _pow2_floor(max(1, 4 * num_sms // programs))))
    return KernelConfig(bm, bn, split, 4, 3 if mostly_dense else 2)


def launch(x: torch.Tensor, dense: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, sched: Schedule,
           bias: torch.Tensor | None, n_out: int, cfg: KernelConfig, silu_mul: bool = False,
           poison: bool = False) -> torch.Tensor:
    """y [M, n_out] = epilogue(x [M, K] @ W^T); W stacked as [2 * n_out, K] when silu_mul (gate; up).
    poison=True fills the output buffers with NaN first, so an element the kernel misses shows."""
    m, k = x.shape
    t = sched.tile
    assert k == sched.k and sched.n == (2 * n_out if silu_mul else n_out), (k, sched.k, sched.n, n_out)
    if cfg.engine == "mma_sp":
        return mma_sp.run(x, dense, values, meta, sched, bias, n_out, cfg.num_warps, cfg.block_n // 16, poison=poison,
                          staged=cfg.staged, silu_mul=silu_mul)
    if cfg.split_k == 0:  # prefill: decompress into a transient dense weight, then the vendor GEMM
        w = decompress(dense, values, meta, sched, x.dtype, poison=poison)
        y = torch.nn.functional.linear(x, w, bias)  # [M, K] @ [K, N]
        return torch.nn.functional.silu(y[:, :n_out]) * y[:, n_out:] if silu_mul else y
    fp32 = x.dtype == torch.float32
    grid = (triton.cdiv(m, cfg.block_m) * (n_out // cfg.block_n), cfg.split_k)
    if cfg.split_k == 1:
        out = torch.empty((m, n_out), device=x.device, dtype=x.dtype)
        s_os, s_om, s_on = 0, out.stride(0), out.stride(1)
    else:
        out = torch.empty((cfg.split_k, 2 if silu_mul else 1, m, n_out), device=x.device, dtype=torch.float32)
        s_os, s_om, s_on = out.stride(0), out.stride(2), out.stride(3)
    if poison:
        out.fill_(float("nan"))
    hybrid_mm_kernel[grid](
        x, dense, values, meta, sched.dense_col, sched.sparse_col, sched.dense_start, sched.sparse_start,
        bias if bias is not None else x, out,
        m, n_out, x.stride(0), x.stride(1), s_os, s_om, s_on,
        T=t, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SPLIT_K=cfg.split_k,
        HAS_DENSE=not sched.all_sparse, HAS_SPARSE=not sched.all_dense, HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul, GROUP_M=cfg.group_m, DOT_PRECISION="ieee" if fp32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if cfg.split_k == 1:
        return out
    acc = out.sum(0)  # [(2,) M, n_out] fp32
    if bias is not None:
        acc = acc + bias.float().reshape(2 if silu_mul else 1, 1, n_out)
    y = torch.nn.functional.silu(acc[0]) * acc[1] if silu_mul else acc[0]
    return y.to(x.dtype)


def decompress(dense, values, meta, sched: Schedule, dtype, poison: bool = False, block_n: int = 32) -> torch.Tensor:
    """The dense [N, K] weight W * M from packed tiles (memory bound: packed bytes in, dense bytes out)."""
    t = sched.tile
    w = torch.empty((sched.n, sched.k), device=values.device if values.numel() else dense.device, dtype=dtype)
    if poison:
        w.fill_(float("nan"))
    bn = min(block_n, t)
    decompress_kernel[(sched.n // bn,)](dense, values, meta, sched.dense_col, sched.sparse_col, sched.dense_start,
                                        sched.sparse_start, w, sched.k, T=t, BLOCK_N=bn, num_warps=4)
    return w


# ---------------------------------------------------------------------------------------------
# Autotuning with an on-disk cache
# ---------------------------------------------------------------------------------------------
_lock = threading.Lock()
_memory: dict[str, tuple[KernelConfig, bool]] = {}  # key -> (config, whether it was tuned)


def cache_file() -> Path:
    root = Path(os.environ.get("PATCHC_CACHE", Path.home() / ".cache" / "patchc"))
    gpu = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    return root / "kernels" / f"{gpu}-triton{triton.__version__}.json"


def _load_disk() -> dict:
    f = cache_file()
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}  # a corrupt cache is rebuilt, never trusted


def _save_disk(entries: dict) -> None:
    from patchc.io import write_json

    try:
        write_json(cache_file(), entries)
    except OSError:
        pass  # a read-only cache folder costs re-tuning, not correctness


def config_key(sched: Schedule, m: int, dtype: torch.dtype, silu_mul: bool, mma: bool = False,
               staged: bool = False) -> str:
    """Layers of one shape and similar density share a tuned config (tuning every bitmap separately
    would make a 200-layer model tune 200 times)."""
    n_tiles = (sched.n // sched.tile) * (sched.k // sched.tile)
    density = round(sched.dense_col.numel() / n_tiles, 1)
    return (f"{sched.n}x{sched.k}|T{sched.tile}|d{density}|{dtype_name(dtype)}|M{m_bucket(m)}"
            f"|silu{int(silu_mul)}|mma{int(mma)}" + ("|staged" if staged else ""))


def mma_available(x, dense, values, sched: Schedule, silu_mul: bool) -> bool:
    """Whether this call can run on the sparse-tensor-core kernel (building it on first use)."""
    if not x.is_cuda:
        return False
    w_dtype = values.dtype if values.numel() else dense.dtype
    return mma_sp.unsupported(x, w_dtype, sched, silu_mul) is None and mma_sp.extension() is not None


def autotune_enabled() -> bool:
    return os.environ.get("PATCHC_AUTOTUNE", "0").lower() in ("1", "true", "yes")


def get_config(x, dense, values, meta, sched: Schedule, bias, n_out: int, silu_mul: bool = False,
               tune: bool | None = None) -> KernelConfig:
    """The config for this layer shape, density and M bucket: a cached tuning result if there is one;
    else, with tuning on (tune=True or PATCHC_AUTOTUNE=1), tuned now (each candidate compiled and timed
    in a CUDA graph, then cached on disk); else the default. Tuning is off by default because the first
    call of every new shape would pay for it inside generate()."""
    tune = autotune_enabled() if tune is None else tune
    m = x.shape[0]
    mma = mma_available(x, dense, values, sched, silu_mul)
    staged = mma and mma_sp.staged_available(x, meta)
    key = config_key(sched, m, x.dtype, silu_mul, mma, staged)
    if key in _memory and (_memory[key][1] or not tune):  # the hot path: a few attribute checks and a dict lookup
        return _memory[key][0]
    with _lock:
        disk = _load_disk()
    if key in disk:
        _memory[key] = (KernelConfig(**disk[key]["config"]), True)
        return _memory[key][0]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 132
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if not tune or not x.is_cuda or capturing:
        _memory[key] = (default_config(m, sched, n_out, sms, mma, staged, silu_mul), False)
        return _memory[key][0]
    best, best_ms = None, float("inf")
    for cfg in candidates(m, sched, n_out, mma, staged, silu_mul):
        try:
            ms = graph_time_ms([lambda c=cfg: launch(x, dense, values, meta, sched, bias, n_out, c, silu_mul)])
        except Exception:  # noqa: BLE001 - a config that does not compile (e.g. out of shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    best = best or default_config(m, sched, n_out, sms, mma, staged, silu_mul)
    _memory[key] = (best, True)
    with _lock:
        disk = _load_disk()
        disk[key] = {"config": asdict(best), "ms": best_ms}
        _save_disk(disk)
    return best
