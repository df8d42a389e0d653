"""Resumable state of a prune run: DIR/checkpoint/ (safetensors shards through torch.distributed.checkpoint).

  checkpoint/state.json          step, configuration, extra (what --resume checks and continues)
  checkpoint/*.safetensors       mask logits, fixed 2:4 patterns and optimizer state (LeanAdamW: int8 r,
                                 uint8 vq, fp32 vref), each rank writing its shards with their offsets

torch.distributed.checkpoint's Hugging Face storage writes plain safetensors (no pickle anywhere) and reads
them back into any sharding: a run saved by N ranks resumes on M ranks or in one process. A single process
uses the same format. The folder is written under a temporary name and renamed when complete; a completed
run removes it unless asked to keep it (the result is prune.json + masks.safetensors).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from patchc.distributed import DistInfo, barrier
from patchc.io import write_json

CKPT = "checkpoint"
FORMAT = "patchc-checkpoint-2"


def path(out: Path) -> Path:
    return Path(out) / CKPT


def exists(out: Path) -> bool:
    return (path(out) / "state.json").is_file()


def _as_dtensor_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Wrap a rank-local state tensor as a DTensor sharded like parameter `like` (no copy)."""
    if not hasattr(like, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def state_dict(nodes, opt) -> dict[str, torch.Tensor]:
    """Every tensor a resumed run needs, keyed by name; sharded ones as DTensors (aliases, no copies)."""
    sd: dict[str, torch.Tensor] = {}
    for n in nodes:
        sd[f"{n.name}/tile_logits"] = n.tile_logits
        if n.joint:  # the learned pattern is the logits' argmax: nothing else to keep
            sd[f"{n.name}/pattern_logits"] = n.pattern_logits
        else:        # the fixed one-shot 2:4 pattern
            sd[f"{n.name}/pattern"] = n.hard_pattern
    if opt is not None:
        for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
            st = opt.state[p]
            if not st:
                st.update(opt._init_state(p))
            for k, v in st.items():
                sd[f"opt/{i}/{k}"] = _as_dtensor_like(v, p) if v.dim() and v.shape == _local_shape(p) else v
    return {k: (v.detach() if torch.is_tensor(v) else v) for k, v in sd.items()}


def _local_shape(p):
    return p.to_local().shape if hasattr(p, "to_local") else p.shape


def save(out: Path, step: int, config: dict, extra: dict, nodes, opt, info: DistInfo) -> None:
    """Write the checkpoint atomically (all ranks call this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    final = path(out)
    tmp = Path(out) / f".{CKPT}.tmp"
    if info.main and tmp.exists():
        shutil.rmtree(tmp)
    barrier(info)
    sd = state_dict(nodes, opt)
    writer = HuggingFaceStorageWriter(str(tmp), save_distributed=info.active)
    dcp.save(sd, storage_writer=writer, no_dist=not info.active)
    barrier(info)
    if info.main:
        write_json(tmp / "state.json", {"format": FORMAT, "step": step, "config": config, "extra": extra,
                                        "world": info.world})
        if final.exists():
            old = Path(out) / f".{CKPT}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    barrier(info)


def read_state(out: Path) -> dict:
    p = path(out) / "state.json"
    try:
        s = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p} is unreadable ({e}): the checkpoint is damaged; start the run over") from e
    if s.get("format") != FORMAT:
        raise ValueError(f"{p}: format {s.get('format')!r} is not {FORMAT!r} (a checkpoint of another patchc)")
    return s


def load_patterns(out: Path, plan, info: DistInfo, joint: bool) -> dict[str, torch.Tensor]:
    """The fixed 2:4 patterns of every masked layer (plain tensors, read before the mask nodes exist);
    joint runs keep none (their pattern is the logits' argmax): zeros then."""
    sd = {f"{s.name}/pattern": torch.zeros(*s.lead, s.out_features, s.in_features // 4, dtype=torch.uint8)
          for s in plan.masked}
    if not joint:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader

        dcp.load(sd, storage_reader=HuggingFaceStorageReader(str(path(out))), no_dist=not info.active)
    return {k.rsplit("/", 1)[0]: v for k, v in sd.items()}


def load(out: Path, nodes, opt, info: DistInfo) -> None:
    """Read logits and optimizer state into the (possibly sharded) mask nodes and optimizer, in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    sd = state_dict(nodes, opt)
    dcp.load(sd, storage_reader=HuggingFaceStorageReader(str(path(out))), no_dist=not info.active)


def remove(out: Path, info: DistInfo) -> None:
    barrier(info)
    if info.main:
        for p in (path(out), Path(out) / f".{CKPT}.tmp", Path(out) / f".{CKPT}.old"):
            if p.exists():
                shutil.rmtree(p)
    barrier(info)


def nbytes(out: Path) -> int:
    return sum(f.stat().st_size for f in path(out).rglob("*.safetensors"))
