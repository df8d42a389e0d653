"""The packed hybrid format: one source of truth for lowering, loading, kernels and tests.

A hybrid linear W [out, in] with tile T (R = out/T, C = in/T) packs into:

  bitmap  uint8 [R, C]            1 = dense tile, 0 = 2:4 tile
  dense   dtype [n_dense, T, T]   the dense tiles, row-major over (r, c)
  values  dtype [n_sparse, T, T/2] the 2 kept weights of every group of 4, in input order
  meta    uint8 [n_sparse, T, T/8] 2-bit positions (0..3) of the kept weights: 4 bits a group
                                   (low 2 bits = first kept), two groups a byte (low nibble first)

Bytes at global sparsity s (16-bit weights): 2 * out * in * (1 - 0.875 s).

A fused MoE expert weight [E, out, in] (bitmap [E, R, C], pattern [E, out, in/4]) packs as the one matrix
[E*out, in] with bitmap [E*R, C]: expert e is tile rows e*R .. (e+1)*R - 1 (out % T == 0, so no tile
straddles two experts). pack_experts / unpack_experts do the reshapes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from patchc import mask as hm

FORMAT = "patchc-packed"
FORMAT_VERSION = 1
PACKED_FIELDS = ("bitmap", "dense", "values", "meta")

# Positions of the two kept weights of each of the six patterns: [6, 2].
KEPT_POS = torch.tensor([[i for i, b in enumerate(p) if b] for p in hm.PATTERNS.tolist()], dtype=torch.long)


class FormatError(ValueError):
    """A packed layer or manifest that does not follow the format."""


def check_packable(out_features: int, in_features: int, tile: int) -> None:
    if tile % 8:
        raise FormatError(f"tile size {tile} must be a multiple of 8 to pack 2:4 metadata")
    reason = hm.check_tileable(out_features, in_features, tile)
    if reason:
        raise FormatError(reason)


@dataclass
class PackedLayer:
    bitmap: torch.Tensor   # uint8 [R, C]
    dense: torch.Tensor    # [n_dense, T, T]
    values: torch.Tensor   # [n_sparse, T, T/2]
    meta: torch.Tensor     # uint8 [n_sparse, T, T/8]
    out_features: int
    in_features: int
    tile: int

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in PACKED_FIELDS}

    @property
    def nbytes(self) -> int:
        """Weight bytes (dense + values + meta); the bitmap's R*C bytes are counted separately."""
        return sum(t.numel() * t.element_size() for t in (self.dense, self.values, self.meta))

    @property
    def sparsity(self) -> float:
        return hm.layer_sparsity(self.bitmap)


def to_tiles(x: torch.Tensor, tile: int, col_div: int = 1) -> torch.Tensor:
    """[out, in/col_div] -> [R*C, T, T/col_div] tiles in row-major (r, c) order."""
    out_f, cols = x.shape
    tc = tile // col_div
    r, c = out_f // tile, cols // tc
    return x.reshape(r, tile, c, tc).permute(0, 2, 1, 3).reshape(r * c, tile, tc)


def from_tiles(t: torch.Tensor, r: int, c: int) -> torch.Tensor:
    """[R*C, T, Tc] -> [R*T, C*Tc] (inverse of to_tiles)."""
    _, tile, tc = t.shape
    return t.reshape(r, c, tile, tc).permute(0, 2, 1, 3).reshape(r * tile, c * tc)


def pack_layer(weight: torch.Tensor, bitmap: torch.Tensor, pattern: torch.Tensor, tile: int) -> PackedLayer:
    """W [out, in], bitmap [R, C] (bool/uint8, 1 = dense), pattern [out, in/4] uint8 -> PackedLayer."""
    out_f, in_f = weight.shape
    check_packable(out_f, in_f, tile)
    r, c = out_f // tile, in_f // tile
    if tuple(bitmap.shape) != (r, c) or tuple(pattern.shape) != (out_f, in_f // 4):
        raise FormatError(f"bitmap {tuple(bitmap.shape)} / pattern {tuple(pattern.shape)} do not fit weight "
                          f"[{out_f}, {in_f}] with tile {tile}")
    bm = bitmap.to(weight.device).bool().flatten()                         # [R*C]
    tiles = to_tiles(weight, tile)                                          # [R*C, T, T]
    dense = tiles[bm].contiguous()                                          # [nd, T, T]
    sparse = tiles[~bm].reshape(-1, tile, tile // 4, 4)                     # [ns, T, T/4, 4]
    pat = to_tiles(pattern.to(weight.device), tile, 4)[~bm].long()          # [ns, T, T/4]
    pos = KEPT_POS.to(weight.device)[pat]                                   # [ns, T, T/4, 2]
    values = sparse.gather(-1, pos).reshape(-1, tile, tile // 2).contiguous()  # [ns, T, T/2]
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.uint8)                # [ns, T, T/4]
    meta = (nib[..., 0::2] | (nib[..., 1::2] << 4)).contiguous()            # [ns, T, T/8]
    return PackedLayer(bitmap.to(weight.device, torch.uint8).contiguous(), dense, values, meta, out_f, in_f, tile)


def pack_experts(weight: torch.Tensor, bitmap: torch.Tensor, pattern: torch.Tensor, tile: int) -> PackedLayer:
    """Experts W [E, out, in], bitmap [E, R, C], pattern [E, out, in/4] -> the PackedLayer of [E*out, in]."""
    e, out_f, in_f = weight.shape
    if tuple(bitmap.shape[:1]) != (e,) or tuple(pattern.shape[:1]) != (e,) or bitmap.dim() != 3 or pattern.dim() != 3:
        raise FormatError(f"expert bitmap {tuple(bitmap.shape)} / pattern {tuple(pattern.shape)} do not fit weight "
                          f"{list(weight.shape)}")
    return pack_layer(weight.reshape(e * out_f, in_f), bitmap.flatten(0, 1), pattern.flatten(0, 1), tile)


def unpack_experts(p: PackedLayer, experts: int) -> torch.Tensor:
    """The PackedLayer of a fused expert weight -> W * M as a dense [E, out, in] tensor."""
    if experts < 1 or p.out_features % experts:
        raise FormatError(f"{p.out_features} packed rows do not split into {experts} experts")
    return unpack_layer(p).reshape(experts, p.out_features // experts, p.in_features)


def decode_meta(meta: torch.Tensor) -> torch.Tensor:
    """uint8 [ns, T, T/8] -> kept positions [ns, T, T/4, 2] (long)."""
    lo, hi = meta & 0xF, meta >> 4
    nib = torch.stack([lo, hi], dim=-1).flatten(-2).long()                  # [ns, T, T/4]
    return torch.stack([nib & 3, nib >> 2], dim=-1)


def unpack_layer(p: PackedLayer) -> torch.Tensor:
    """PackedLayer -> W * M as a dense [out, in] tensor (the reference decompression)."""
    t = p.tile
    r, c = p.out_features // t, p.in_features // t
    dtype = p.dense.dtype if p.dense.numel() else p.values.dtype
    tiles = torch.zeros(r * c, t, t, dtype=dtype, device=p.values.device)
    bm = p.bitmap.bool().flatten()
    tiles[bm] = p.dense
    groups = torch.zeros(p.values.shape[0], t, t // 4, 4, dtype=dtype, device=p.values.device)
    groups.scatter_(-1, decode_meta(p.meta), p.values.reshape(-1, t, t // 4, 2))
    tiles[~bm] = groups.reshape(-1, t, t)
    return from_tiles(tiles, r, c)


def validate_packed(p: PackedLayer, name: str = "layer") -> None:
    """Shapes and dtypes of a packed layer agree with each other and with its declared shape."""
    t, out_f, in_f = p.tile, p.out_features, p.in_features
    try:
        check_packable(out_f, in_f, t)
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None
    r, c = out_f // t, in_f // t
    if tuple(p.bitmap.shape) != (r, c) or p.bitmap.dtype != torch.uint8:
        raise FormatError(f"{name}: bitmap {tuple(p.bitmap.shape)} {p.bitmap.dtype}, expected ({r}, {c}) uint8")
    nd = int(p.bitmap.bool().sum())
    ns = r * c - nd
    want = {"dense": (nd, t, t), "values": (ns, t, t // 2), "meta": (ns, t, t // 8)}
    for k, shape in want.items():
        if tuple(getattr(p, k).shape) != shape:
            raise FormatError(f"{name}: {k} has shape {tuple(getattr(p, k).shape)}, expected {shape}")
    if p.meta.dtype != torch.uint8:
        raise FormatError(f"{name}: meta must be uint8, got {p.meta.dtype}")
    if p.dense.dtype != p.values.dtype:
        raise FormatError(f"{name}: dense {p.dense.dtype} and values {p.values.dtype} differ")


def dense_bytes(out_features: int, in_features: int, element_size: int = 2) -> int:
    return out_features * in_features * element_size


def expected_bytes_ratio(sparsity: float) -> float:
    """Packed / dense weight bytes for 16-bit weights at sparsity s: 1 - 0.875 s."""
    return 1.0 - 0.875 * sparsity


def sha256(t: torch.Tensor) -> str:
    """Checksum of a tensor's raw bytes (CPU, contiguous)."""
    b = t.detach().contiguous().cpu()
    return hashlib.sha256(b.view(torch.uint8).numpy().tobytes() if b.numel() else b"").hexdigest()
