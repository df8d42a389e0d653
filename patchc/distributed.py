"""Data-parallel mask learning on torch.distributed: process group set-up under torchrun, FSDP2 sharding.

Under `torchrun --nproc-per-node N -m patchc prune ...` every process runs the same prune(); this module
gives it its rank, device and process group (NCCL on CUDA, gloo on CPU), and shards the masked graph with
FSDP2 (`torch.distributed.fsdp.fully_shard`): the MaskNodes of one decoder layer form one FSDP unit, so a
layer's frozen weights, mask logits, their gradients and the optimizer state live 1/N on each rank and
are all-gathered for that layer's forward and backward only. Everything else (embeddings, norms,
lm_head) is one root unit. Global batch = ranks x batch size x gradient accumulation.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False   # this process group was created by patchc (and is destroyed by it)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str) -> tuple[DistInfo, str]:
    """(DistInfo, device for this process). A single process gets DistInfo() and the device unchanged."""
    if not launched_by_torchrun():
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))), device
        return DistInfo(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = str(device).startswith("cuda")
    if cuda:
        if torch.cuda.device_count() <= local:
            raise RuntimeError(f"rank {rank}: LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    started = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        started = True
    return DistInfo(rank, world, local, started), device


def teardown(info: DistInfo) -> None:
    if info.started_here and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def broadcast_(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Rank 0's values into every rank's tensors (in place)."""
    if not info.active:
        return
    for t in tensors:
        dist.broadcast(t, src=0)


def broadcast_str(text: str, info: DistInfo) -> str:
    """Rank 0's string on every rank (as bytes in a tensor: nothing is pickled)."""
    if not info.active:
        return text
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    n = torch.tensor([data.numel()], dtype=torch.int64)
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    n = n.to(dev)
    dist.broadcast(n, src=0)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=dev)
    if info.main:
        buf.copy_(data.to(dev))
    dist.broadcast(buf, src=0)
    return bytes(buf.cpu().tolist()).decode()


def mean_(value: float, info: DistInfo, device) -> float:
    """The mean of a scalar over ranks (for logs)."""
    if not info.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / info.world


def any_(flag: bool, info: DistInfo, device) -> bool:
    if not info.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


_LAYER = re.compile(r"^(.*?\.(?:layers|h|blocks|layer|decoder\.layers)\.\d+)\.")


def layer_of(name: str) -> str:
    """The decoder layer a parameter FQN belongs to (model.layers.3.mlp.up_proj.weight -> model.layers.3)."""
    m = _LAYER.match(name)
    return m.group(1) if m else name


def detach_masked_weights_(gm: torch.nn.Module, nodes) -> None:
    """Drop the graph module's own references to the weights the MaskNodes own (the graph no longer reads
    them), so each frozen weight belongs to exactly one FSDP unit: its layer's."""
    owned = {id(n.weight) for n in nodes if n.weight is not None}
    for mod in list(gm.modules()):
        for pname, p in list(mod._parameters.items()):
            if p is not None and id(p) in owned and not _is_mask_node(mod):
                del mod._parameters[pname]


def _is_mask_node(mod) -> bool:
    from patchc.passes.insert_masks import MaskNode

    return isinstance(mod, MaskNode)


def shard_(gm: torch.nn.Module, nodes, info: DistInfo) -> None:
    """FSDP2 over the masked graph: one unit per decoder layer's MaskNodes (frozen weights + pattern logits),
    the rest in the root unit. The tile logits (a few per 128x128 weights, fp32 where the pattern logits may
    be bf16: an FSDP unit trains one dtype) stay replicated; all_reduce_replicated_grads_ averages their
    gradients."""
    from torch.distributed.fsdp import fully_shard

    detach_masked_weights_(gm, nodes)
    for n in nodes:
        n.sharded = True
    replicated = {n.tile_logits for n in nodes}
    groups: dict[str, list] = {}
    for n in nodes:
        groups.setdefault(layer_of(n.name), []).append(n)
    for members in groups.values():
        fully_shard(members if len(members) > 1 else members[0], ignored_params=replicated)
    fully_shard(gm, ignored_params=replicated)


def all_reduce_replicated_grads_(nodes, info: DistInfo) -> None:
    """Average the gradients of the replicated (not sharded) tile logits over ranks, as FSDP does for the rest."""
    if not info.active:
        return
    grads = [n.tile_logits.grad for n in nodes if n.tile_logits.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= info.world
    start = 0
    for g in grads:
        g.copy_(flat[start:start + g.numel()].view_as(g))
        start += g.numel()
