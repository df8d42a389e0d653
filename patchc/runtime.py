"""Run packed hybrid linears: the `patchc::hybrid_linear` custom op and the HybridLinear module.

The op's reference implementation decompresses the packed tile weights (patchc.format.unpack_layer)
and calls F.linear; it runs on CPU and GPU. Eager GPU calls of HybridLinear skip it and run the
generated kernel (`patchc::hybrid_mm`) directly. It is a torch.library custom op with a fake (meta)
implementation, so torch.export / dynamo / inductor trace it as one node; the `patch` compile backend
swaps those nodes for generated Triton kernels.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from patchc.config import settings
from patchc.format import PACKED_FIELDS, PackedLayer, from_tiles, to_tiles, unpack_layer, validate_packed
from patchc.mask import layer_sparsity

def kernels_on_cpu() -> bool:
    """Tests: with Triton's interpreter (TRITON_INTERPRET=1), PATCHC_KERNELS_ON_CPU=1 runs the generated kernels on
    CPU tensors too, so the whole kernel path (schedules, configs, launch, split-K) is exercised without a GPU."""
    return settings().kernels_on_cpu


def _kernel_device(x: torch.Tensor) -> bool:
    return x.is_cuda or settings().kernels_on_cpu


@torch.library.custom_op("patchc::hybrid_linear", mutates_args=())
def hybrid_linear(x: torch.Tensor, bitmap: torch.Tensor, dense: torch.Tensor, values: torch.Tensor,
                  meta: torch.Tensor, bias: torch.Tensor | None, out_features: int, in_features: int,
                  tile: int) -> torch.Tensor:
    """y = x @ (W * M).T + bias with W * M given packed: x [..., in] -> y [..., out]."""
    w = unpack_layer(PackedLayer(bitmap, dense, values, meta, out_features, in_features, tile))
    return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


@hybrid_linear.register_fake
def _(x, bitmap, dense, values, meta, bias, out_features, in_features, tile):
    return x.new_empty((*x.shape[:-1], out_features))


MIN_KERNEL_TILE = 16  # tl.dot needs K >= 16


def kernel_unsupported(tile: int) -> str | None:
    """Why the generated kernel cannot run a layer of this tile size (None: it can). One rule for the
    eager path and the backend's pass."""
    if tile < MIN_KERNEL_TILE:
        return f"tile {tile} < {MIN_KERNEL_TILE} (tl.dot's minimum K)"
    if tile & (tile - 1):
        return f"tile {tile} is not a power of two (Triton block shapes)"
    return None


def _exporting() -> bool:
    f = getattr(torch.compiler, "is_exporting", None)
    return bool(f and f())


class HybridLinear(torch.nn.Module):
    """A linear layer whose weight lives only in the packed hybrid format (buffers, not parameters).

    plain_dense=True on a layer with no 2:4 tile (training kept every tile dense) holds the same bytes as a
    row-major `weight` [out, in] instead of dense tiles, and runs as a plain F.linear: the vendor GEMM at
    every M, which on the H100 ran the 7B shapes 1.08-1.15x as fast as the hybrid kernels at M=16, 1.5-2.0x at
    M=128, 1.15-1.19x at M=2048, and 0.86-0.91x at M=1 (ab853d4:bench/results/kernels_v8, 0% rows). `dense` is then
    empty."""

    def __init__(self, packed: PackedLayer, bias: torch.Tensor | None = None, name: str = "layer",
                 plain_dense: bool = False):
        super().__init__()
        validate_packed(packed, name)
        self.in_features, self.out_features, self.tile = packed.in_features, packed.out_features, packed.tile
        self.name = name
        for k in PACKED_FIELDS:
            self.register_buffer(k, getattr(packed, k))
        self.register_buffer("weight", None)
        if plain_dense and packed.values.shape[0] == 0:
            t = packed.tile
            self.weight = from_tiles(packed.dense, self.out_features // t, self.in_features // t)  # [out, in]
            self.dense = packed.dense.new_empty((0, t, t))
        if bias is not None:
            self.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.bias = None
        self._schedule_key: str | None = None

    @property
    def packed(self) -> PackedLayer:
        """The layer in the packed format (a plain-dense layer's tiles are cut from its weight: a copy)."""
        dense = self.dense if self.weight is None else to_tiles(self.weight, self.tile)
        return PackedLayer(self.bitmap, dense, self.values, self.meta, self.out_features, self.in_features, self.tile)

    @property
    def weight_nbytes(self) -> int:
        """Bytes holding the weight in memory: packed tiles + metadata (or the plain dense weight) + bitmap."""
        held = (self.weight if self.weight is not None else self.dense, self.values, self.meta)
        return sum(t.numel() * t.element_size() for t in held) + self.bitmap.numel()

    def _use_kernel(self, x: torch.Tensor) -> bool:
        """Eager calls on the GPU run the generated kernel directly; traced/compiled calls emit the reference
        op, which the `patch` backend's pass swaps for the kernel (with a warning where it cannot)."""
        return (_kernel_device(x) and settings().eager_kernels and kernel_unsupported(self.tile) is None
                and not torch.compiler.is_compiling() and not _exporting())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        if self._use_kernel(x):
            if self._schedule_key is None:  # built once per layer from its bitmap (one small device->host copy)
                self._schedule_key = schedule_for(self.bitmap, self.tile).key
            # Eager: the kernel directly, not through the custom op's dispatcher (on the H100 host that was ~90 of
            # the ~180 us an eager decode call cost the CPU, 5-15x the kernel's GPU time; bench/eager_overhead.py).
            # Traced and compiled calls take the op (see _use_kernel).
            return _hybrid_mm(x, self.bitmap, self.dense, self.values, self.meta, self.bias, self.out_features,
                              self.in_features, self.tile, self._schedule_key)
        return torch.ops.patchc.hybrid_linear(x, self.bitmap, self.dense, self.values, self.meta, self.bias,
                                              self.out_features, self.in_features, self.tile)

    def extra_repr(self) -> str:
        n = self.bitmap.numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, tile={self.tile}, "
                f"dense_tiles={int(self.bitmap.sum())}/{n}, sparsity={layer_sparsity(self.bitmap):.3f}"
                + (", plain_dense=True" if self.weight is not None else ""))


def hybrid_layers(model: torch.nn.Module, packed_only: bool = False) -> dict[str, HybridLinear]:
    """The model's HybridLinears (packed_only: without the plain-dense ones, i.e. those on the hybrid kernels)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, HybridLinear) and not (packed_only and m.weight is not None)}


_SCHEDULES: dict[tuple[str, str], object] = {}   # (layer key, device) -> codegen.schedule.Schedule


def schedule_for(bitmap: torch.Tensor, tile: int, key: str | None = None):
    """The layer's schedule (built from its bitmap once per device, then reused)."""
    from patchc.codegen.schedule import build_schedule

    if key is not None and (key, str(bitmap.device)) in _SCHEDULES:
        return _SCHEDULES[(key, str(bitmap.device))]
    sched = build_schedule(bitmap, tile)
    _SCHEDULES[(sched.key, str(bitmap.device))] = sched
    return sched


@torch.library.custom_op("patchc::hybrid_mm", mutates_args=())
def hybrid_mm(x: torch.Tensor, bitmap: torch.Tensor, dense: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
              bias: torch.Tensor | None, out_features: int, in_features: int, tile: int, key: str) -> torch.Tensor:
    """hybrid_linear bound to the layer's generated kernel (what the `patch` backend emits). `key` names
    the layer's schedule, built by the backend at compile time. CUDA tensors run the Triton kernel
    with its tuned config; CPU tensors the reference decompression."""
    return _hybrid_mm(x, bitmap, dense, values, meta, bias, out_features, in_features, tile, key)


def _hybrid_mm(x, bitmap, dense, values, meta, bias, out_features: int, in_features: int, tile: int,
               key: str) -> torch.Tensor:
    """hybrid_mm's body, which eager HybridLinear calls without the op's dispatcher."""
    if not _kernel_device(x):
        return hybrid_linear(x, bitmap, dense, values, meta, bias, out_features, in_features, tile)
    return _run_kernel(x, bitmap, dense, values, meta, bias, out_features, in_features, tile, key, silu_mul=False)


def _run_kernel(x, bitmap, dense, values, meta, bias, n_out: int, in_features: int, tile: int, key: str,
                silu_mul: bool) -> torch.Tensor:
    """The layer's kernel with its config for this M: x [..., in] -> y [..., n_out]."""
    from patchc.codegen.launch import get_config, launch

    sched = schedule_for(bitmap, tile, key)
    x2 = x.reshape(-1, in_features)  # [M, K]
    cfg = get_config(x2, dense, values, meta, sched, bias, n_out, silu_mul=silu_mul)
    y = launch(x2, dense, values, meta, sched, bias, n_out, cfg, silu_mul=silu_mul)
    return y.reshape(*x.shape[:-1], n_out)


@hybrid_mm.register_fake
def _(x, bitmap, dense, values, meta, bias, out_features, in_features, tile, key):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("patchc::hybrid_mm_silu_mul", mutates_args=())
def hybrid_mm_silu_mul(x: torch.Tensor, bitmap: torch.Tensor, dense: torch.Tensor, values: torch.Tensor,
                       meta: torch.Tensor, bias: torch.Tensor | None, out_features: int, in_features: int, tile: int,
                       key: str) -> torch.Tensor:
    """SiLU(x @ gate^T + b_gate) * (x @ up^T + b_up), gate and up packed as one stacked layer of
    `out_features` = 2 x the result's width rows (gate first): what the `patch` backend emits for an MLP whose
    gate and up projections read one input. One launch, one [..., out_features / 2] write on the kernels;
    CPU tensors run the reference decompression."""
    n = out_features // 2
    if not _kernel_device(x):
        y = hybrid_linear(x, bitmap, dense, values, meta, bias, out_features, in_features, tile)
        return F.silu(y[..., :n]) * y[..., n:]
    return _run_kernel(x, bitmap, dense, values, meta, bias, n, in_features, tile, key, silu_mul=True)


@hybrid_mm_silu_mul.register_fake
def _(x, bitmap, dense, values, meta, bias, out_features, in_features, tile, key):
    return x.new_empty((*x.shape[:-1], out_features // 2))
