"""Launch the hybrid kernels: pick a config for M (decode or prefill), optionally autotune it once per
(layer shape, density, M bucket) on the GPU, and cache the choice on disk.

Decode (M <= 64) is memory bound. On an H100 / H200 (sm_90a, tile 128, 16-bit) M <= WGMMA_DECODE_MAX_M on layers
of >= 4096 rows (wgmma_decodes) runs on the wgmma kernel with 16-token CTAs of two row-tiles or half of one, K split
over a cluster (wgmma_decode_default). Else, with 16-bit
activations, M <= 16 (32 on layers of at most 4096 output rows; tuned: <= 32) and an sm_80+ GPU it runs on the
sparse tensor cores (mma_sp: 2:4 tiles as stored, no decompression); otherwise on the Triton kernel with
small BLOCK_M, BLOCK_N below the tile, and split-K so that enough programs stream weight bytes at once.
Above that (M > 64): from M = WGMMA_MIN_M on an H100 / H200 (sm_90a, tile 128, 16-bit) the wgmma kernel
(codegen/wgmma.cu: dense tiles on wgmma, 2:4 tiles on sparse wgmma, both read in place); up to M=128 (M=256 on
layers taller than CHUNK_N) on sm_90+ the TMA kernel (the tile lists as a tensor-core GEMM, dense tiles read in
place, 2:4 tiles expanded in registers, split-K); else the layer is decompressed into a transient dense
weight (in CHUNK_N-row pieces for tall layers at M >= 1024) for the vendor GEMM, except that layers with no
dense tile run on cuSPARSELt from M = CSLT_MIN_M (codegen/cusparselt.py). The tuner also tries the
pointer-load fused kernel up to FUSED_MAX_M, the TMA kernel up to TMA_MAX_M and cuSPARSELt and the wgmma kernel
above DECODE_MAX_M.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

from patchc.config import settings

from . import cusparselt, mma_sp, wgmma
from .device import capability, sm_count
from .kernels import decompress_kernel, hybrid_mm_kernel, hybrid_mm_tma_kernel
from .schedule import Schedule

DECODE_MAX_M = 64
FUSED_MAX_M = 256
TMA_MAX_M = 1024        # the tuner tries the TMA kernel up to here; it is the default up to TMA_DEFAULT_MAX_M
TMA_DEFAULT_MAX_M = 256
CSLT_MIN_M = 256        # all-2:4 layers from here on run on cuSPARSELt by default (codegen/cusparselt.py): on the
                        # H100 it beat decompress + cuBLAS at M=256-4096 on every 7B shape (ab853d4:bench/results/cslt_prefill)
WGMMA_MIN_M = 256       # from here on the wgmma kernel is the default where it runs: on the H100 at M=256-4096 it
                        # beat decompress + cuBLAS and the TMA kernel on every 7B shape at 0-45% (ab853d4:bench/results/wgmma) ...
CSLT_OVER_WGMMA_M = 4096  # ... and cuSPARSELt on all-2:4 layers below here (M=512-1024: 1.02-1.20x the speed,
                        # M=2048: 0.98-1.07x; M=4096: 0.93-0.98x, so all-2:4 layers go to cuSPARSELt from here)
CHUNK_N = 4096          # decompress + GEMM: rows decompressed at a time for taller layers at M >= 1024
WGMMA_DECODE_MAX_M = 16  # up to here the wgmma kernel's 16-token CTAs are the decode default where it runs ...
WGMMA_DECODE_MIN_PAIRS = 16  # ... on layers of at least this many CTA row pairs (4096 rows). H100, M=16: 11008x4096
                        # 0.87-0.93x the mma.sp kernel's time, the stacked 2 x 11008 of SiLU * up 0.79x (ab853d4:
                        # bench/results/decode_wgmma); 4096-row layers on half-row-tile CTAs at split 2 (ab853d4:bench/results/decode_half):
                        # 4096x4096 0.80-0.85x its time after another hybrid linear (programmatic) and 0.95-1.0x after
                        # an elementwise kernel writing x (how o_proj runs, after attention), 4096x11008 0.79-0.84x /
                        # 0.88-0.93x. SiLU * up (no half-row-tile CTAs) keeps the two-row-tile rule below
WGMMA_PAIRS_MIN_PAIRS = 32   # two row-tiles a CTA only (SiLU * up fused, or PATCHC_WGMMA_HALF=0): layers of this many
WGMMA_PAIRS_LONG_K = 64      # pairs, or of 16 pairs with this many K-tiles (ab853d4:bench/results/decode_wgmma, decode_epilogue)
H100_MAX_CLUSTERS = (132, 66, 39, 30, 22, 17, 15, 15)  # clusters of 1..8 decode CTAs at once (measured, H100 SXM)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    split_k: int        # triton/tma: K split over programs; triton 0 = decompress + vendor GEMM (prefill)
    num_warps: int
    num_stages: int
    group_m: int = 8
    engine: str = "triton"  # "mma_sp": the sparse-tensor-core decode kernel (block_n = rows a CTA, 16 or 32);
                            # "wgmma": the Hopper GEMM (codegen/wgmma.cu, sm_90a; block_n = tokens a CTA, split_k
                            # = CTAs of a cluster splitting K, 0 or 1: none; block_m = rows of W a CTA at decode,
                            # 64, or 0: 256);
                            # "tma": the TMA-fed prefill GEMM over the tile lists (sm_90+, 16-bit);
                            # "cslt": prefill of an all-2:4 layer on cuSPARSELt (codegen/cusparselt.py)
    staged: bool = False    # mma_sp: weights through shared memory by bulk copies (sm_90+)
    block_k: int = 64       # tma: K-step (divides the tile)
    chunk_n: int = 0        # decompress + GEMM (split_k 0): rows decompressed at a time (0 = the whole weight)


def m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length()) if m <= 2048 else 4096


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def candidates(m: int, sched: Schedule, n_out: int, mma: bool = False, staged: bool = False,
               silu_mul: bool = False, tma: bool = False, cslt: bool = False,
               wg: bool = False) -> list[KernelConfig]:
    """The configs the tuner tries for this M (a small set: every one costs a compile). Up to
    FUSED_MAX_M the fused split-K kernel competes; above DECODE_MAX_M, decompress + vendor GEMM too;
    with mma=True (mma_sp can run this call) the sparse-tensor-core kernel at 4/8/16 warps x 1/2 slices,
    and with staged=True (sm_90+) its staged variant at those and at its default warps; with tma=True (sm_90+,
    16-bit) and M <= TMA_MAX_M the TMA kernel at a few block shapes and splits; with cslt=True (an all-2:4 layer
    cuSPARSELt can run) cuSPARSELt; with wg=True (the wgmma kernel can run this call) the wgmma kernel."""
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
    if wg and m <= WGMMA_DECODE_MAX_M:
        out += [wgmma_decode(split, rows) for rows in wgmma.ROWS
                for split in range(1, min(wgmma.MAX_SPLIT, k_tiles) + 1)]
    if m > DECODE_MAX_M:
        out.append(KernelConfig(0, 0, 0, 4, 1))  # split_k 0: decompress + vendor GEMM
        if cslt:
            out.append(KernelConfig(0, 0, 0, 4, 1, engine="cslt"))
        if wg:
            out += [WGMMA, WGMMA_64]
        if sched.n > CHUNK_N:
            out.append(KernelConfig(0, 0, 0, 4, 1, chunk_n=CHUNK_N))
        if tma and m <= TMA_MAX_M and t % 64 == 0:
            for bm, bn, split in ((64, 64, 1), (64, 64, 2), (64, 64, 4), (128, 64, 1), (128, 128, 1), (128, 128, 2)):
                if t % bn == 0 and split <= k_tiles:
                    out.append(KernelConfig(bm, bn, split, 4, 4, engine="tma", block_k=64))
    return out


def capture_graph(fns: list, reps: int = 10) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `reps` passes through `fns` (each called once first, outside the capture)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.Stream()), torch.cuda.graph(g):
        for _ in range(reps):
            for f in fns:
                f()
    torch.cuda.synchronize()
    return g


def graph_time_ms(fns: list, reps: int = 10) -> float:
    """Median per-call time of cycling through `fns` captured in a CUDA graph (no launch gaps)."""
    g = capture_graph(fns, reps)
    ms = triton.testing.do_bench(g.replay, warmup=5, rep=50, return_mode="median")
    return ms / (reps * len(fns))


def staged_by_default(m: int, sched: Schedule) -> bool:
    """Whether the untuned mma_sp launch stages the weights through shared memory: at M <= 8 on layers with at
    least half their tiles dense (H100, ab853d4:bench/results/mma_sp/sweep_staged*.log, default launches: M=1 at 0%
    0.90-0.97x the time of direct loads on the 7B shapes, at 50% 1.02-1.17x; M=16 with 2:4 tiles, best
    launches, 1.03-1.17x)."""
    n_tiles = (sched.n // sched.tile) * (sched.k // sched.tile)
    return m <= 8 and sched.dense_col.numel() >= 0.5 * n_tiles


WGMMA = KernelConfig(0, 128, 0, 12, 4, engine="wgmma")      # block_n: tokens a CTA
WGMMA_64 = KernelConfig(0, 64, 0, 12, 5, engine="wgmma")


def wgmma_decode(split: int, rows: int = 256) -> KernelConfig:
    """The wgmma kernel at decode: 16-token CTAs, K split over a cluster of `split` CTAs; a CTA covers `rows` rows
    of W (256: two row-tiles; 64: half of one), kept in block_m (0 for 256)."""
    return KernelConfig(0 if rows == 256 else rows, wgmma.DECODE_BLOCK_N, split, 12, 5, engine="wgmma")


def wgmma_decode_pairs(sched: Schedule, silu_mul: bool = False) -> int:
    """CTA row pairs of the wgmma kernel: two row-tiles a CTA, or with SiLU * up a gate and its up row-tile."""
    r = sched.n // sched.tile
    return r // 2 if silu_mul else triton.cdiv(r, 2)


def half_rows_enabled() -> bool:
    """Whether decode may use the wgmma kernel's half-row-tile CTAs (PATCHC_WGMMA_HALF=0: two row-tiles a CTA
    only, and 4096-row layers with K < 64 tiles on the mma.sp kernel, as before them)."""
    return settings().wgmma_half


def wgmma_decodes(sched: Schedule, silu_mul: bool = False) -> bool:
    """Whether M <= WGMMA_DECODE_MAX_M goes to the wgmma kernel's decode CTAs by default: layers of at least
    WGMMA_DECODE_MIN_PAIRS CTA row pairs (SiLU * up fused, or without half-row-tile CTAs: WGMMA_PAIRS_MIN_PAIRS, or
    16 with WGMMA_PAIRS_LONG_K K-tiles)."""
    pairs = wgmma_decode_pairs(sched, silu_mul)
    if silu_mul or not half_rows_enabled():
        return pairs >= WGMMA_PAIRS_MIN_PAIRS or (pairs >= 16 and sched.k // sched.tile >= WGMMA_PAIRS_LONG_K)
    return pairs >= WGMMA_DECODE_MIN_PAIRS


def wgmma_decode_default(sched: Schedule, silu_mul: bool = False,
                         max_clusters: tuple[int, ...] = H100_MAX_CLUSTERS) -> KernelConfig:
    """The CTA shape and split that stream with the most CTAs in one wave: for two row-tiles a CTA and (without
    silu_mul) half a row-tile a CTA, the largest split (at most the K-tiles) whose clusters all run at once
    (max_clusters[s - 1]: clusters of s CTAs the GPU holds; one CTA an SM, a cluster within one GPC), else 1; the
    half-row-tile CTAs where they make more CTAs. A decode CTA streamed at most ~60-100 GB/s on the H100, so more CTAs
    read faster, but a second wave of clusters costs more than it gains (ab853d4:bench/results/decode_wgmma: 16 pairs at split 8,
    15 clusters at once, took 1.2-1.5x the time of split 6); 4096-row layers: 128 CTAs of half a row-tile (split 2)
    took 0.81-0.94x the time of 96 of two row-tiles (split 6; ab853d4:bench/results/decode_half)."""
    top = max(1, min(wgmma.MAX_SPLIT, sched.k // sched.tile, len(max_clusters)))

    def best_split(units: int) -> int:   # clusters of `units` CTAs a split: the largest split that fits, 0 if none
        return max([s for s in range(1, top + 1) if units <= max_clusters[s - 1]], default=0)

    pairs = wgmma_decode_pairs(sched, silu_mul)
    halves = 2 * (sched.n // sched.tile)
    s_pair, s_half = best_split(pairs), 0 if silu_mul or not half_rows_enabled() else best_split(halves)
    if s_half and halves * s_half > pairs * s_pair:
        return wgmma_decode(s_half, rows=64)
    return wgmma_decode(max(1, s_pair))


def wgmma_default(m: int, sched: Schedule, num_sms: int = 132) -> KernelConfig:
    """128-token CTAs when they fill at least 0.6 of the SMs, else 64-token ones (H100, ab853d4:bench/results/wgmma: 64 won on
    4096-row layers at M=256-512, 1.17-1.50x; 128 won at M >= 1024 and on 11008-row layers from M=256, where
    86 CTAs of 128 tokens ran 1.27-1.48x faster than 172 of 64)."""
    ctas = triton.cdiv(m, 128) * triton.cdiv(sched.n // sched.tile, 2)
    return WGMMA if ctas >= 0.6 * num_sms else WGMMA_64


def _tma_config(c: "Call") -> KernelConfig:
    """The TMA kernel: 64-row blocks up to M=128, else 128; split-K for ~4 programs an SM (at most 4)."""
    bm = 64 if c.m <= 128 else 128
    programs = triton.cdiv(c.m, bm) * (c.sched.n // 64)
    split = max(1, min(4, c.sched.k // c.sched.tile, _pow2_floor(max(1, 4 * c.num_sms // programs))))
    return KernelConfig(bm, 64, split, 4, 4, engine="tma", block_k=64)


def _mma_sp_config(c: "Call") -> KernelConfig:
    """The mma.sp kernel at its fitted (warps, slices), staged where staged_by_default says so (sm_90+)."""
    stg = c.staged and staged_by_default(c.m, c.sched)
    warps, slices = mma_sp.default_launch(c.m, c.n_out, c.num_sms, c.sched.tile, stg, c.silu_mul)
    return KernelConfig(0, 16 * slices, 0, warps, 1, engine="mma_sp", staged=stg)


def _triton_decode_config(c: "Call") -> KernelConfig:
    """The Triton split-K decode kernel: BLOCK_N 64 for mostly-dense layers and the full tile for mostly-2:4 ones,
    enough split-K for ~4 programs an SM (at most 8)."""
    sched, t, m, n_out = c.sched, c.sched.tile, c.m, c.n_out
    n_tiles = (sched.n // t) * (sched.k // t)
    mostly_dense = sched.dense_col.numel() >= 0.6 * n_tiles
    bn = min(t, 64 if mostly_dense and t >= 64 else 128)
    while n_out % bn:
        bn //= 2
    bm = max(16, m_bucket(m))
    if bm >= 64 and not sched.all_dense:
        bn = min(bn, 64)  # see candidates(): BLOCK_M 64 x BLOCK_N 128 with 2:4 tiles does not compile (Triton 3.6)
    programs = triton.cdiv(m, bm) * (n_out // bn)
    split = max(1, min(8, sched.k // t, _pow2_floor(max(1, 4 * c.num_sms // programs))))
    return KernelConfig(bm, bn, split, 4, 3 if mostly_dense else 2)


@dataclass(frozen=True)
class Call:
    """What the untuned kernel choice depends on. mma / staged / tma / cslt / wg: whether that engine can run this
    call here (GPU, dtype, tile, alignment, switches: get_config works them out); max_clusters: the GPU's."""
    m: int
    sched: Schedule
    n_out: int
    num_sms: int = 132
    mma: bool = False
    staged: bool = False
    silu_mul: bool = False
    tma: bool = False
    cslt: bool = False
    wg: bool = False
    max_clusters: tuple[int, ...] | None = None

    @property
    def fused(self) -> bool:   # SiLU(gate) * up written by the wgmma kernel itself
        return self.silu_mul and wgmma_fuses_silu(self.sched)


@dataclass(frozen=True)
class Rule:
    """One row of the dispatch table: the first rule whose `when` holds picks the kernel."""
    engine: str
    m_range: str
    gpu: str
    layout: str
    evidence: str       # the measurement behind the rule (a results folder; `COMMIT:path` = in git history)
    when: object        # Call -> bool
    config: object      # Call -> KernelConfig


# Folders cited as `ab853d4:bench/results/...` left the tree when bench/ became a maintained suite; read them with
# `git show ab853d4:bench/results/<folder>/<file>` (git ls-tree ab853d4 bench/results/<folder>).
DISPATCH: tuple[Rule, ...] = (
    Rule("wgmma decode (codegen/wgmma.cu, 16-token CTAs, K split over a cluster)", "M <= 16",
         "sm_90a (H100 / H200)", "tile 128, 16-bit; >= 4096 rows (SiLU*up: 8192 stacked, or 4096 with K >= 8192)",
         "bench/results/decode; ab853d4:bench/ab853d4:bench/results/decode_wgmma, decode_half",
         lambda c: c.wg and c.m <= WGMMA_DECODE_MAX_M and wgmma_decodes(c.sched, c.fused),
         lambda c: wgmma_decode_default(c.sched, c.fused, c.max_clusters or H100_MAX_CLUSTERS)),
    Rule("mma.sp decode (codegen/mma_sp.cu; staged at M <= 8 on mostly-dense layers, sm_90+)",
         "M <= 16 (<= 32 on layers of <= 4096 rows)", "sm_80+", "tile 64 / 128, 16-bit",
         "ab853d4:bench/ab853d4:bench/results/mma_sp (sweep_staged*.log, mma_sp_vs_triton_m24_m32.log)",
         lambda c: c.mma and c.m <= mma_sp.default_max_m(c.n_out), _mma_sp_config),
    Rule("Triton split-K decode (codegen/kernels.py)", "M <= 64", "any (Triton)", "any",
         "bench/results/kernels",
         lambda c: c.m <= DECODE_MAX_M, _triton_decode_config),
    Rule("wgmma prefill (codegen/wgmma.cu, 128-token CTAs; 64 where 128 fill < 0.6 of the SMs)", "M >= 256",
         "sm_90a (H100 / H200)", "tile 128, 16-bit; not all-2:4 layers from M = 4096",
         "bench/results/prefill; ab853d4:bench/ab853d4:bench/results/wgmma (block_n_m256_m2048.md)",
         lambda c: c.wg and c.m >= WGMMA_MIN_M and not (c.cslt and c.m >= CSLT_OVER_WGMMA_M),
         lambda c: wgmma_default(c.m, c.sched, c.num_sms)),
    Rule("cuSPARSELt (codegen/cusparselt.py), inside CUDA graphs; eager: wgmma where it runs, else decompress + cuBLAS",
         "M >= 256",
         "sm_80+, torch with cuSPARSELt", "all tiles 2:4, tile % 64 == 0, 16-bit",
         "bench/results/prefill (50% rows); ab853d4:bench/ab853d4:bench/results/cslt_prefill",
         lambda c: c.cslt and c.m >= CSLT_MIN_M, lambda c: KernelConfig(0, 0, 0, 4, 1, engine="cslt")),
    Rule("TMA Triton GEMM over the tile lists (codegen/kernels.py)", "64 < M <= 128 (<= 256 on > 4096 rows)",
         "sm_90+", "tile % 64 == 0, 16-bit", "ab853d4:bench/results/prefill",
         lambda c: c.tma and c.sched.tile % 64 == 0 and (c.m <= 128 or (c.m <= TMA_DEFAULT_MAX_M and c.sched.n > CHUNK_N)),
         _tma_config),
    Rule("decompress + cuBLAS (4096 rows at a time on taller layers from M = 1024)", "M > 64", "any", "any",
         "ab853d4:bench/results/prefill; bench/results/kernels",
         lambda c: True,
         lambda c: KernelConfig(0, 0, 0, 4, 1, chunk_n=CHUNK_N if c.m >= 1024 and c.sched.n > CHUNK_N else 0)),
)
"""The untuned kernel choice, in order (ahead of it: a layer with no 2:4 tile is loaded as a plain dense weight and
runs F.linear, the vendor GEMM, at every M; patchc/lower.py). Rendered for the README by dispatch_markdown()."""


PREFILL_RULES = DISPATCH[3:]   # the rules for M > DECODE_MAX_M


def dispatch(c: Call, rules: tuple[Rule, ...] = DISPATCH) -> tuple[Rule, KernelConfig]:
    """The first rule of `rules` (default: DISPATCH) that holds for this call, and its config."""
    for rule in rules:
        if rule.when(c):
            return rule, rule.config(c)
    raise AssertionError("DISPATCH ends with a rule that always holds")


def dispatch_markdown() -> str:
    """DISPATCH as a markdown table (engine, M range, GPU, tile layout, evidence)."""
    rows = ["| engine | M | GPU | layout | measured in |", "|---|---|---|---|---|"]
    rows += [f"| {r.engine} | {r.m_range} | {r.gpu} | {r.layout} | {r.evidence} |" for r in DISPATCH]
    return "\n".join(rows) + "\n"


def prefill_default(m: int, sched: Schedule, n_out: int, num_sms: int = 132, tma: bool = False,
                    cslt: bool = False, wg: bool = False) -> KernelConfig:
    """M > DECODE_MAX_M: the prefill rules of DISPATCH (H100, 7B shapes: the TMA kernel up to M=128 ran 0.46-0.69x
    cuBLAS against 0.36-0.45x for decompress + cuBLAS; 11008x4096 at M=256 on it 0.46-0.52x against 0.39-0.40x;
    decompress + cuBLAS in 4096-row chunks at M=2048 0.81-0.86x against 0.76-0.79x whole; the wgmma kernel at M=2048
    1.00-1.26x cuBLAS dense at 25-45%; all-2:4 layers on cuSPARSELt from CSLT_OVER_WGMMA_M on)."""
    return dispatch(Call(m, sched, n_out, num_sms, tma=tma, cslt=cslt, wg=wg), PREFILL_RULES)[1]


def default_config(m: int, sched: Schedule, n_out: int, num_sms: int = 132, mma: bool = False,
                   staged: bool = False, silu_mul: bool = False, tma: bool = False,
                   cslt: bool = False, wg: bool = False, max_clusters: tuple[int, ...] | None = None) -> KernelConfig:
    """The untuned choice: the first rule of DISPATCH that holds. mma / staged / tma / cslt / wg: whether that
    engine can run this call; max_clusters: the GPU's (default the H100's)."""
    return dispatch(Call(m, sched, n_out, num_sms, mma, staged, silu_mul, tma, cslt, wg, max_clusters))[1]


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
    if cfg.engine == "cslt":
        if cusparselt.use_now(x):
            return cusparselt.cslt_mm(x, values, meta, sched, bias, n_out, silu_mul, poison)
        cusparselt.prepare(x, values, meta, sched)   # eager: search now for the capture that follows
        wg = wgmma_available(x, dense, values, sched)  # and run what runs where cuSPARSELt cannot
        cfg = prefill_default(m, sched, n_out, wg=wg, cslt=False)
    if cfg.engine == "wgmma":
        reason = wgmma.unsupported(x, weight_dtype(dense, values), sched)
        if reason:
            raise ValueError(f"the wgmma kernel cannot run this call: {reason}")
        rows = cfg.block_m or 256
        fused = silu_mul and rows == 256 and wgmma_fuses_silu(sched)
        y = wgmma.run(x, dense, values, meta, sched, bias, poison, cfg.block_n, max(1, cfg.split_k), fused, rows=rows)
        return torch.nn.functional.silu(y[:, :n_out]) * y[:, n_out:] if silu_mul and not fused else y
    if cfg.engine == "tma" or cfg.split_k == 0:  # all stacked rows, then SiLU(gate) * up in torch
        if cfg.engine == "tma":
            y = _launch_tma(x, dense, values, meta, sched, bias, cfg, poison)
        else:  # prefill: decompress into a transient dense weight, then the vendor GEMM
            y = decompress_mm(x, dense, values, meta, sched, bias, cfg.chunk_n, poison)
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


def tma_error(x: torch.Tensor, sched: Schedule, cfg: KernelConfig) -> str | None:
    """Why the TMA prefill kernel cannot run this call with cfg (None: it can)."""
    t = sched.tile
    if not tma_available(x, sched):
        return (f"the TMA kernel needs 16-bit activations (got {x.dtype}), a tile that 64 divides (got {t}) and an "
                "sm_90+ GPU (or Triton's interpreter)")
    if t % cfg.block_k or cfg.block_k % 64 or t % cfg.block_n:
        return f"block_k {cfg.block_k} / block_n {cfg.block_n} must divide the tile {t} (block_k a multiple of 64)"
    if not mma_sp.x_aligned(x):
        return "x must be row-contiguous and 16-byte aligned for TMA"
    return None


def _launch_tma(x, dense, values, meta, sched: Schedule, bias, cfg: KernelConfig, poison: bool = False):
    """y [M, N] = x @ W^T (+ bias) on hybrid_mm_tma_kernel (N = sched.n: all stacked rows)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if not mma_sp.x_aligned(x):
        x = x.clone(memory_format=torch.contiguous_format)                 # TMA wants 16-byte aligned rows
    reason = tma_error(x, sched, cfg)
    if reason:
        raise ValueError(reason)
    m, k = x.shape
    n_out = sched.n
    t, bm, bn, bk = sched.tile, cfg.block_m, cfg.block_n, cfg.block_k
    x_desc = TensorDescriptor(x, [m, k], [x.stride(0), 1], [bm, bk])
    d = dense.reshape(-1, t) if dense.numel() else torch.zeros(bn, bk, device=x.device, dtype=x.dtype)
    dense_desc = TensorDescriptor(d, list(d.shape), [d.shape[1], 1], [bn, bk])
    q = values.reshape(-1, t // 2).view(torch.int64) if values.numel() else \
        torch.zeros(bn, bk // 8, device=x.device, dtype=torch.int64)         # [n_sparse * T, T / 8] int64 words
    values_desc = TensorDescriptor(q, list(q.shape), [q.shape[1], 1], [bn, bk // 8])
    split = max(1, cfg.split_k)
    if split == 1:
        out = torch.empty((m, n_out), device=x.device, dtype=x.dtype)
        s_os, s_om = 0, out.stride(0)
    else:
        out = torch.empty((split, m, n_out), device=x.device, dtype=torch.float32)
        s_os, s_om = out.stride(0), out.stride(1)
    if poison:
        out.fill_(float("nan"))
    grid = (triton.cdiv(m, bm) * (n_out // bn), split)
    hybrid_mm_tma_kernel[grid](
        x_desc, dense_desc, values_desc, meta, sched.dense_col, sched.sparse_col, sched.dense_start,
        sched.sparse_start, bias if bias is not None else x, out, m, n_out, s_os, s_om,
        T=t, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, HAS_DENSE=not sched.all_sparse,
        HAS_SPARSE=not sched.all_dense, HAS_BIAS=bias is not None, GROUP_M=cfg.group_m, NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split == 1:
        return out
    acc = out.sum(0)                                                       # [M, n_out] fp32
    return (acc if bias is None else acc + bias.float()).to(x.dtype)


def decompress(dense, values, meta, sched: Schedule, dtype, poison: bool = False, block_n: int = 16,
               rows: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [r0, r1) (default: all) of the dense weight W * M from packed tiles, as [r1 - r0, K] (into `out`
    if given). Memory bound: packed bytes in, dense bytes out; split over the K-tiles so that ~8 programs
    an SM stream at once."""
    t = sched.tile
    r0, r1 = rows or (0, sched.n)
    assert r0 % t == 0 and r1 % t == 0 and 0 <= r0 < r1 <= sched.n, (rows, t, sched.n)
    dev = values.device if values.numel() else dense.device
    w = out if out is not None else torch.empty((r1 - r0, sched.k), device=dev, dtype=dtype)
    assert tuple(w.shape) == (r1 - r0, sched.k) and w.is_contiguous(), (tuple(w.shape), r1 - r0, sched.k)
    if poison:
        w.fill_(float("nan"))
    bn = min(block_n, t)
    programs = (r1 - r0) // bn
    sms = sm_count(dev) if w.is_cuda else 132
    split = max(1, min(sched.k // t, _pow2_floor(max(1, 8 * sms // programs))))
    decompress_kernel[(programs, split)](dense, values, meta, sched.dense_col, sched.sparse_col, sched.dense_start,
                                         sched.sparse_start, w, r0, sched.k, T=t, BLOCK_N=bn, SPLIT=split,
                                         num_warps=4)
    return w


def decompress_mm(x, dense, values, meta, sched: Schedule, bias, chunk: int = 0, poison: bool = False):
    """y [M, N] = x @ W^T (+ bias) with W decompressed `chunk` rows at a time (0: all at once) into one reused
    buffer of chunk x K (a chunk that fits in L2 can be read back from there by the vendor GEMM). On the H100
    it helped 11008-row layers at M=2048 and lost below M=1024 (bench/NOTES.md): see CHUNK_N."""
    n = sched.n
    chunk = n if chunk <= 0 or chunk >= n else chunk
    if chunk == n:
        w = decompress(dense, values, meta, sched, x.dtype, poison=poison)
        return torch.nn.functional.linear(x, w, bias)                       # [M, K] @ [K, N]
    assert chunk % sched.tile == 0, (chunk, sched.tile)
    y = torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype)
    buf = torch.empty((chunk, sched.k), device=x.device, dtype=x.dtype)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        w = decompress(dense, values, meta, sched, x.dtype, poison=poison, rows=(r0, r1), out=buf[: r1 - r0])
        if bias is None:
            torch.mm(x, w.T, out=y[:, r0:r1])                                # [M, K] @ [K, chunk]
        else:
            torch.addmm(bias[r0:r1], x, w.T, out=y[:, r0:r1])
    return y


# ---------------------------------------------------------------------------------------------
# Autotuning with an on-disk cache
# ---------------------------------------------------------------------------------------------
_lock = threading.Lock()
_memory: dict[str, tuple[KernelConfig, bool]] = {}  # key -> (config, whether it was tuned)


def cache_file() -> Path:
    root = settings().cache
    gpu = torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"
    return root / "kernels" / f"{gpu}-triton{triton.__version__}.json"


def _load_disk() -> dict:
    f = cache_file()
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}  # a corrupt cache is rebuilt, never trusted


def _save_disk(entries: dict) -> None:
    try:
        f = cache_file()
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")      # written whole, then renamed into place
        tmp.write_text(json.dumps(entries, indent=2) + "\n")
        os.replace(tmp, f)
    except OSError:
        pass  # a read-only cache folder costs re-tuning, not correctness


def config_key(sched: Schedule, m: int, dtype: torch.dtype, silu_mul: bool, mma: bool = False,
               staged: bool = False, tma: bool = False, cslt: bool = False, wg: bool = False) -> str:
    """Layers of one shape and similar density share a tuned config (tuning every bitmap separately
    would make a 200-layer model tune 200 times)."""
    n_tiles = (sched.n // sched.tile) * (sched.k // sched.tile)
    density = round(sched.dense_col.numel() / n_tiles, 1)
    return (f"{sched.n}x{sched.k}|T{sched.tile}|d{density}|{str(dtype).removeprefix('torch.')}|M{m_bucket(m)}"
            f"|silu{int(silu_mul)}|mma{int(mma)}" + ("|staged" if staged else "") + ("|tma" if tma else "")
            + ("|cslt" if cslt else "") + ("|wgmma" if wg else ""))


def weight_dtype(dense: torch.Tensor, values: torch.Tensor) -> torch.dtype:
    """The dtype of a packed layer's weights (one of its two fields may be empty)."""
    return values.dtype if values.numel() else dense.dtype


def mma_available(x, dense, values, sched: Schedule, silu_mul: bool) -> bool:
    """Whether this call can run on the sparse-tensor-core kernel (building it on first use)."""
    return (x.is_cuda and mma_sp.unsupported(x, weight_dtype(dense, values), sched, silu_mul) is None
            and mma_sp.extension() is not None)


def wgmma_available(x, dense, values, sched: Schedule) -> bool:
    """Whether this call can run on the wgmma prefill kernel (building it on first use)."""
    return (x.is_cuda and wgmma.unsupported(x, weight_dtype(dense, values), sched) is None
            and wgmma.extension() is not None)


def wgmma_fuses_silu(sched: Schedule) -> bool:
    """The wgmma kernel writes SiLU(gate) * up itself when gate and up have whole row-tiles each (a CTA pairs gate
    row-tile p with up row-tile p + R / 2)."""
    return (sched.n // sched.tile) % 2 == 0


def wgmma_clusters(device: torch.device) -> tuple[int, ...]:
    """Clusters of 1..MAX_SPLIT decode CTAs the GPU runs at once (queried once per device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(wgmma.max_clusters(index, wgmma.DECODE_BLOCK_N, s) for s in range(1, wgmma.MAX_SPLIT + 1))


def tma_available(x: torch.Tensor, sched: Schedule) -> bool:
    """Whether this call can run on the TMA kernel: 16-bit activations, a tile that 64 divides, and an sm_90+
    GPU (or Triton's interpreter, for the CPU tests)."""
    if x.dtype not in (torch.float16, torch.bfloat16) or sched.tile % 64:
        return False
    if x.is_cuda:
        return capability(x.device) >= (9, 0)
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_enabled() -> bool:
    return settings().autotune


_answered: dict[tuple, KernelConfig] = {}  # everything get_config's answer depends on -> its final answer


def get_config(x, dense, values, meta, sched: Schedule, bias, n_out: int, silu_mul: bool = False,
               tune: bool | None = None) -> KernelConfig:
    """The config for this layer shape, density and M bucket: a cached tuning result if there is one;
    else, with tuning on (tune=True or PATCHC_AUTOTUNE=1), tuned now (each candidate compiled and timed
    in a CUDA graph, then cached on disk); else the default. Tuning is off by default because the first
    call of every new shape would pay for it inside generate().
    Eager decode asks this for every layer at every step, so a final answer is remembered under everything
    it depends on (the schedule's content hash, shapes, the M bucket, dtypes, device, x's and the codes'
    alignment, the switches of patchc.config) and found again with one dict lookup. Keyed by the M bucket
    like the tuned configs, so a server seeing every prompt length keeps at most ~13 entries a layer."""
    tune = autotune_enabled() if tune is None else tune
    w = values if values is not None and values.numel() else dense
    fast = (sched.key, n_out, m_bucket(x.shape[0]), x.dtype, None if w is None else w.dtype,  # key: bitmap + shape
            x.device, bool(silu_mul), tune, mma_sp.x_aligned(x), mma_sp.codes_aligned(meta),
            settings())
    cfg = _answered.get(fast)
    if cfg is None:
        cfg, final = _get_config(x, dense, values, meta, sched, bias, n_out, silu_mul, tune)
        if final:
            _answered[fast] = cfg
    return cfg


def _get_config(x, dense, values, meta, sched: Schedule, bias, n_out: int, silu_mul: bool,
                tune: bool) -> tuple[KernelConfig, bool]:
    """get_config's answer, and whether it is final (not an untuned stand-in while tuning is asked for)."""
    m = x.shape[0]
    mma = mma_available(x, dense, values, sched, silu_mul)
    staged = mma and mma_sp.staged_available(x, meta)
    tma = m > DECODE_MAX_M and tma_available(x, sched)
    cslt = m > DECODE_MAX_M and cusparselt.unsupported(x, values, sched) is None
    wg = (m > DECODE_MAX_M or (m <= WGMMA_DECODE_MAX_M and wgmma.decode_enabled())) and \
        wgmma_available(x, dense, values, sched)
    key = config_key(sched, m, x.dtype, silu_mul, mma, staged, tma, cslt, wg)
    if key in _memory and (_memory[key][1] or not tune):
        return _memory[key][0], True
    with _lock:
        disk = _load_disk()
    if key in disk:
        _memory[key] = (KernelConfig(**disk[key]["config"]), True)
        return _memory[key][0], True
    sms = sm_count(x.device) if x.is_cuda else 132
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    clusters = wgmma_clusters(x.device) if wg and m <= WGMMA_DECODE_MAX_M else None
    if not tune or not x.is_cuda or capturing:
        _memory[key] = (default_config(m, sched, n_out, sms, mma, staged, silu_mul, tma, cslt, wg, clusters), False)
        return _memory[key][0], not tune or not x.is_cuda
    best, best_ms = None, float("inf")
    for cfg in candidates(m, sched, n_out, mma, staged, silu_mul, tma, cslt, wg):
        try:
            ms = graph_time_ms([lambda c=cfg: launch(x, dense, values, meta, sched, bias, n_out, c, silu_mul)])
        except Exception:  # noqa: BLE001 - a config that does not compile (e.g. out of shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    best = best or default_config(m, sched, n_out, sms, mma, staged, silu_mul, tma, cslt, wg, clusters)
    _memory[key] = (best, True)
    with _lock:
        disk = _load_disk()
        disk[key] = {"config": asdict(best), "ms": best_ms}
        _save_disk(disk)
    return best, True
