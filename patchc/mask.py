"""Hybrid-mask math: the one source of truth for training, extraction, lowering, kernels and tests.

A linear weight W [out, in] is cut into T x T tiles. Tile (r, c) is either dense (bitmap 1) or 2:4
sparse (bitmap 0): in every group of 4 consecutive input-dim weights, 2 are kept. The 2:4 choice of a
group is one of the 6 legal patterns below, stored as a pattern index (uint8 in 0..5).

    M = M_tile + (1 - M_tile) * M_24          (M_tile expanded from the bitmap to [out, in])

Sparsity of a layer = 0.5 * (sparse tiles / all tiles). Everything here works on the [out, in]
orientation; callers transpose Conv1D-style [in, out] weights first. Leading dims are batch dims: a fused
MoE expert weight [E, out, in] has bitmap [E, R, C] and pattern [E, out, in/4], every expert matrix tiled
on its own. Tiles never straddle two experts (out % T == 0), so the same weight seen as one matrix
[E*out, in] with bitmap [E*R, C] has the same mask (what the mask kernels and the packed format use).
"""
from __future__ import annotations

import math

import torch

# The six legal 2:4 patterns over a group of 4 consecutive input weights (1 = kept).
PATTERNS = torch.tensor(
    [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]],
    dtype=torch.bool,
)  # [6, 4]
NUM_PATTERNS = 6


def check_tileable(out_features: int, in_features: int, tile: int) -> str | None:
    """None when a [out, in] weight can be tiled by `tile`, else the reason it cannot."""
    if tile <= 0 or tile % 8:
        return f"tile size {tile} must be a positive multiple of 8"
    if out_features % tile or in_features % tile:
        return f"shape [{out_features}, {in_features}] is not divisible by tile size {tile}"
    return None


# ---------------------------------------------------------------------------------------------
# 2:4 patterns
# ---------------------------------------------------------------------------------------------
def pattern_to_mask(pattern: torch.Tensor) -> torch.Tensor:
    """[..., out, in/4] uint8 pattern index -> [..., out, in] bool keep-mask."""
    if pattern.dtype != torch.uint8:
        raise TypeError(f"pattern must be uint8, got {pattern.dtype}")
    if pattern.numel() and int(pattern.max()) >= NUM_PATTERNS:
        raise ValueError(f"pattern index {int(pattern.max())} out of range 0..5")
    table = PATTERNS.to(pattern.device)
    return table[pattern.long()].reshape(*pattern.shape[:-1], pattern.shape[-1] * 4)


def mask_to_pattern(mask: torch.Tensor) -> torch.Tensor:
    """[..., out, in] bool keep-mask with exactly 2 of every 4 kept -> [..., out, in/4] uint8 pattern index."""
    *lead, in_f = mask.shape
    if in_f % 4:
        raise ValueError(f"in_features {in_f} is not a multiple of 4")
    groups = mask.reshape(*lead, in_f // 4, 4).to(torch.uint8)
    if not bool((groups.sum(-1) == 2).all()):
        raise ValueError("mask is not 2:4: some group of 4 does not keep exactly 2")
    code = groups[..., 0] * 8 + groups[..., 1] * 4 + groups[..., 2] * 2 + groups[..., 3]  # 4-bit code
    lut = torch.full((16,), 255, dtype=torch.uint8, device=mask.device)
    for i, p in enumerate(PATTERNS.tolist()):
        lut[p[0] * 8 + p[1] * 4 + p[2] * 2 + p[3]] = i
    return lut[code.long()]


def topk24_pattern(score: torch.Tensor) -> torch.Tensor:
    """Keep the 2 highest-scoring weights of every group of 4: [..., out, in] scores -> [..., out, in/4] uint8.

    The pattern with the largest kept score is the top-2 of the group; ties go to the lower index.
    """
    *lead, in_f = score.shape
    groups = score.float().reshape(*lead, in_f // 4, 4)
    per_pattern = groups @ PATTERNS.to(score.device, torch.float32).T  # [..., out, in/4, 4] @ [4, 6]
    return per_pattern.argmax(-1).to(torch.uint8)


def pattern_overlap(pattern: torch.Tensor) -> torch.Tensor:
    """How many kept weights each of the 6 patterns shares with `pattern`: [..., out, in/4] -> [..., out, in/4, 6]."""
    table = PATTERNS.to(pattern.device, torch.float32)  # [6, 4]
    chosen = table[pattern.long()]  # [out, in/4, 4]
    return chosen @ table.T


# ---------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------
def tile_view(x: torch.Tensor, tile: int) -> torch.Tensor:
    """[..., out, in] -> [..., R, T, C, T] view (R = out/T, C = in/T) so that per-tile values broadcast."""
    *lead, out_f, in_f = x.shape
    return x.reshape(*lead, out_f // tile, tile, in_f // tile, tile)


def expand_tiles(per_tile: torch.Tensor, tile: int) -> torch.Tensor:
    """[R, C] -> [R*T, C*T] by repeating every tile value over its T x T block."""
    return per_tile.repeat_interleave(tile, 0).repeat_interleave(tile, 1)


def hybrid_mask(dense_tile: torch.Tensor, mask24: torch.Tensor, tile: int) -> torch.Tensor:
    """M = M_tile + (1 - M_tile) * M_24 for soft (float) or hard (bool) inputs: dense_tile [..., R, C],
    mask24 [..., out, in] -> [..., out, in]."""
    if dense_tile.dtype == torch.bool:
        m = tile_view(mask24.bool(), tile) | dense_tile[..., :, None, :, None]
        return m.reshape(mask24.shape)
    g = dense_tile.to(mask24.dtype if mask24.is_floating_point() else torch.float32)[..., :, None, :, None]
    m24 = tile_view(mask24.to(g.dtype), tile)
    return (g + (1 - g) * m24).reshape(mask24.shape)


def apply_hybrid(weight: torch.Tensor, dense_tile: torch.Tensor, mask24: torch.Tensor, tile: int) -> torch.Tensor:
    """W * M in W's dtype (the masked weight a linear layer multiplies with)."""
    return weight * hybrid_mask(dense_tile, mask24, tile).to(weight.dtype)


def layer_sparsity(bitmap: torch.Tensor) -> float:
    """Share of zero weights of a hybrid layer: 0.5 * sparse tiles / tiles."""
    n = bitmap.numel()
    return 0.5 * (n - int(bitmap.bool().sum())) / n if n else 0.0


# ---------------------------------------------------------------------------------------------
# Differentiable relaxations (Gumbel-softmax), as in PATCH / MaskLLM
# ---------------------------------------------------------------------------------------------
# The noise is a stateless hash of (key, element index): the same key gives the same noise on any device,
# in any process and when a backward pass recomputes the mask, so data-parallel ranks, recompute and resume
# need no random-generator state. Integer math stays below 2**63 (32-bit values times 31-bit constants).
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x297A2D39) & _M32
    return x ^ (x >> 15)


def noise_key(*parts: int) -> int:
    """A 32-bit key from integers (seed, step, micro-batch, layer, stream): distinct tuples, unrelated noise."""
    import hashlib

    data = b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "little")


def uniform_noise(key, shape: tuple[int, ...], device) -> torch.Tensor:
    """Uniform floats in (0, 1), float32, a function of (key, shape, device type) alone.

    key an int: torch's Philox generator seeded with it (one fast kernel; eager code).
    key a 0-d int64 tensor: element i is an integer hash of (key, i), which torch.compile fuses into the
    kernels that use it (no generator state in a compiled graph)."""
    if isinstance(key, int):
        g = torch.Generator(device=device)
        g.manual_seed(key)
        return torch.rand(shape, generator=g, device=device, dtype=torch.float32).clamp_(1e-12, 1.0 - 2.0 ** -24)
    n = 1
    for d in shape:
        n *= d
    idx = torch.arange(n, device=device, dtype=torch.int64).reshape(shape)
    h = _mix32(_mix32(idx & _M32) ^ (key.to(device=device, dtype=torch.int64) & _M32))
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))  # 23 bits: exact in float32, never 0 or 1


def soft_dense_tile(logits: torch.Tensor, scale, tau, key: torch.Tensor | None = None) -> torch.Tensor:
    """Probability that a tile is dense: class 1 of gumbel_softmax([0, l] * scale, tau).

    A two-class Gumbel-softmax is a sigmoid of the logit gap plus the difference of two Gumbels, which is
    a logistic variable log(u) - log(1 - u). key=None: no noise (the deterministic relaxation).
    """
    z = logits.float() * scale
    if key is not None:
        u = uniform_noise(key, tuple(z.shape), z.device)
        z = z + torch.log(u) - torch.log1p(-u)
    return torch.sigmoid(z / tau)


def soft_mask24(logits: torch.Tensor, scale, tau, key: torch.Tensor | None = None) -> torch.Tensor:
    """Soft 2:4 mask from pattern logits [..., out, in/4, 6] -> [..., out, in] (each group sums to exactly 2).
    key=None: no noise."""
    z = logits.float() * scale
    if key is not None:
        u = uniform_noise(key, tuple(z.shape), z.device)
        z = z - torch.log(-torch.log(u))
    p = torch.softmax(z / tau, dim=-1)  # [out, in/4, 6]
    # probs @ PATTERNS, written out so that it fuses: position j is kept by the patterns that contain it
    m = torch.stack([p[..., 0] + p[..., 1] + p[..., 2], p[..., 0] + p[..., 3] + p[..., 4],
                     p[..., 1] + p[..., 3] + p[..., 5], p[..., 2] + p[..., 4] + p[..., 5]], dim=-1)
    return m.reshape(*logits.shape[:-2], logits.shape[-2] * 4)


def soft_masked_weight(w: torch.Tensor, tile_logits: torch.Tensor, pattern_logits: torch.Tensor | None,
                       mask24: torch.Tensor | None, tile: int, knobs: torch.Tensor, keys: torch.Tensor | None):
    """One layer's relaxed hybrid mask applied to its weight: (W * M in W's dtype, mean dense-tile
    probability, ||W * M||_F). w [..., out, in]; knobs = [scale_tile, scale_24, tau] (a float32 tensor, so a
    compiled version does not recompile as they move); keys [2] int64 (tile, 2:4 noise) or None."""
    scale_tile, scale_24, tau = knobs[0], knobs[1], knobs[2]
    gate = soft_dense_tile(tile_logits, scale_tile, tau, None if keys is None else keys[0])   # [R, C]
    if pattern_logits is not None:
        m24 = soft_mask24(pattern_logits, scale_24, tau, None if keys is None else keys[1])  # [out, in]
    else:
        m24 = mask24.float()
    g = gate[..., :, None, :, None]                                                          # [..., R, 1, C, 1]
    m = (g + (1.0 - g) * tile_view(m24, tile)).reshape(w.shape)
    masked = w.float() * m
    return masked.to(w.dtype), gate.mean(), masked.norm()


def linear_schedule(start: float, end: float, step: int, total: int) -> float:
    """Value at `step` of a linear ramp from start (step 0) to end (step total-1)."""
    if total <= 1:
        return end
    return start + (end - start) * min(max(step, 0), total - 1) / (total - 1)


def cosine_lr(base: float, step: int, total: int, warmup: int) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------------------------
# Exact global budget
# ---------------------------------------------------------------------------------------------
def sparse_tile_budget(total_tiles: int, sparsity: float) -> int:
    """Number of 2:4 tiles that gives `sparsity` over equally-sized tiles (0.5 * sparse / total)."""
    check_sparsity(sparsity)
    return min(total_tiles, max(0, round(2.0 * sparsity * total_tiles)))


def check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and math.isfinite(sparsity) and 0.0 <= sparsity <= 0.5):
        raise ValueError(
            f"sparsity {sparsity!r} is outside [0, 0.5]: hybrid dense/2:4 layers reach at most 50% "
            "(every tile 2:4); pass e.g. --sparsity 0.35"
        )


def select_dense_tiles(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Global top-k: keep the highest-scoring tiles dense so the global sparsity is exact.

    scores: one [R, C] tensor per layer, [E, R, C] for a fused expert weight (all tiles the same size). Ties
    are broken by position (earlier layer, then row-major tile index, stays dense first) so the result is
    deterministic. Returns one bool bitmap of each score's shape.
    """
    flat = torch.cat([s.detach().float().flatten().cpu() for s in scores]) if scores else torch.zeros(0)
    n_sparse = sparse_tile_budget(flat.numel(), sparsity)
    n_dense = flat.numel() - n_sparse
    order = torch.sort(-flat, stable=True).indices  # descending score, stable on position
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:n_dense]] = True
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.numel()].reshape(s.shape).to(s.device))
        start += s.numel()
    return out
