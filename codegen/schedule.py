"""A layer's schedule, derived from its tile bitmap.

Packed storage is row-major over (row-tile r, K-tile c), so the dense tiles of row-tile r are the
contiguous storage range dense_start[r]:dense_start[r+1] (likewise the 2:4 tiles): every program of
a row-tile streams its tiles in storage order, each weight byte read once. The schedule gives each
stored tile its K-tile index, and `slot` / `kinds` say where each tile (r, c) is stored (kinds: the same in a
compact form the wgmma kernel takes in its launch parameters). Several layers can be stacked along the output dim
(q/k/v, gate/up): their storages concatenate in the same order, and the schedule of the stack is the concatenation.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class Schedule:
    n: int                      # output features (rows of W)
    k: int                      # input features
    tile: int
    dense_col: torch.Tensor     # int32 [n_dense]: K-tile of each stored dense tile
    sparse_col: torch.Tensor    # int32 [n_sparse]: K-tile of each stored 2:4 tile
    dense_start: torch.Tensor   # int32 [R + 1]: row-tile r's dense tiles are [dense_start[r], dense_start[r+1])
    sparse_start: torch.Tensor  # int32 [R + 1]
    slot: torch.Tensor          # int32 [R, C]: where tile (r, c) is stored: i >= 0 dense tile i, ~i (< 0) 2:4 tile i
    kinds: torch.Tensor         # int32 [1 + 2 R W], on the CPU (tile_kinds): slot in 32-K-tile bitmasks
    key: str                    # hash of bitmap + shape + tile: names the layer's kernel specialisation

    @property
    def all_dense(self) -> bool:
        return self.sparse_col.numel() == 0

    @property
    def all_sparse(self) -> bool:
        return self.dense_col.numel() == 0

    def to(self, device) -> "Schedule":
        mv = lambda t: t.to(device)  # noqa: E731
        return Schedule(self.n, self.k, self.tile, mv(self.dense_col), mv(self.sparse_col), mv(self.dense_start),
                        mv(self.sparse_start), mv(self.slot), self.kinds, self.key)   # (kinds stays on the CPU)


def tile_kinds(bitmap: torch.Tensor) -> torch.Tensor:
    """bitmap [R, C] (1 = dense) -> int32 [1 + 2 R W] on the CPU, W = ceil(C / 32): W, then for row-tile r and chunk j
    (K-tiles 32 j .. 32 j + 31) at 1 + 2 (r W + j) the dense tiles stored before the chunk and the chunk's bitmask
    (bit b: K-tile 32 j + b is dense; bit 31 is the int32 sign). Storage being row-major, tile (r, c) is dense tile
    d = before + popcount(mask below bit c % 32) if its bit is set, else 2:4 tile r C + c - d: `slot` in a form small
    enough to travel in a kernel launch's parameters (the wgmma decode reads it there, not from global memory)."""
    bm = bitmap.bool().cpu()
    r, c = bm.shape
    w = -(-c // 32)
    padded = torch.zeros(r, w * 32, dtype=torch.bool)
    padded[:, :c] = bm
    bits = padded.reshape(r, w, 32).to(torch.int64) << torch.arange(32, dtype=torch.int64)
    masks = bits.sum(-1)                                                     # [R, W] in 0 .. 2^32 - 1
    dense = padded.reshape(r, w, 32).sum(-1).flatten()
    before = (dense.cumsum(0) - dense).reshape(r, w)                         # dense tiles stored before each chunk
    masks = torch.where(masks >= 1 << 31, masks - (1 << 32), masks)          # as int32
    body = torch.stack([before, masks], -1).flatten()
    return torch.cat([torch.tensor([w]), body]).to(torch.int32)


def build_schedule(bitmap: torch.Tensor, tile: int) -> Schedule:
    """bitmap [R, C] (1 = dense) -> Schedule (on the bitmap's device)."""
    bm = bitmap.bool()
    r, c = bm.shape
    cols = torch.arange(c, device=bm.device).expand(r, c)
    dense_col = cols[bm].to(torch.int32)       # row-major = storage order
    sparse_col = cols[~bm].to(torch.int32)
    zero = torch.zeros(1, dtype=torch.int32, device=bm.device)
    dense_start = torch.cat([zero, bm.sum(1).cumsum(0).to(torch.int32)])
    sparse_start = torch.cat([zero, (~bm).sum(1).cumsum(0).to(torch.int32)])
    flat = bm.flatten()
    rank = torch.where(flat, flat.cumsum(0) - 1, (~flat).cumsum(0) - 1)                # index within its kind
    slot = torch.where(flat, rank, -rank - 1).reshape(r, c).to(torch.int32)            # ~i == -i - 1
    bm_cpu = bm.cpu()                                                                  # (one device->host copy)
    h = hashlib.sha256(bm_cpu.to(torch.uint8).numpy().tobytes())
    h.update(f"{r}x{c}x{tile}".encode())
    return Schedule(r * tile, c * tile, tile, dense_col, sparse_col, dense_start, sparse_start, slot, tile_kinds(bm_cpu),
                    h.hexdigest()[:16])
