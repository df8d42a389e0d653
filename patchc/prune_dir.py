"""Read a `patchc prune` output folder back, validated, and apply its hard masks to a model."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from patchc import mask as hm
from patchc.io import read_safetensors, read_safetensors_metadata
from patchc.oneshot import weight_2d


class PruneDirError(ValueError):
    """A prune folder that is missing files or does not match the model it names."""


@dataclass
class PrunedMasks:
    dir: Path
    report: dict                                   # prune.json
    tile: int
    bitmaps: dict[str, torch.Tensor]               # FQN -> [R, C] bool ([E, R, C] for fused MoE experts)
    patterns: dict[str, torch.Tensor]              # FQN -> [out, in/4] uint8 ([E, out, in/4])


def read_prune_dir(path: str | Path) -> PrunedMasks:
    d = Path(path)
    for f in ("prune.json", "masks.safetensors"):
        if not (d / f).is_file():
            raise PruneDirError(f"{d / f} is missing: {d} is not a finished `patchc prune` output")
    try:
        report = json.loads((d / "prune.json").read_text())
    except json.JSONDecodeError as e:
        raise PruneDirError(f"{d / 'prune.json'} is not valid JSON ({e.msg})") from e
    if report.get("version") != 1:
        raise PruneDirError(f"{d / 'prune.json'}: unknown version {report.get('version')!r} (this patchc reads 1)")
    try:
        meta = read_safetensors_metadata(d / "masks.safetensors")
        if meta.get("format") != "patchc-masks-1":
            raise PruneDirError(f"{d / 'masks.safetensors'}: unknown format {meta.get('format')!r}")
        tensors = read_safetensors(d / "masks.safetensors")
    except PruneDirError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: truncated or not safetensors
        raise PruneDirError(f"{d / 'masks.safetensors'} is not a readable safetensors file ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None
    tile = int(report["tile"])
    bitmaps, patterns = {}, {}
    for layer in report["layers"]:
        shape, experts = layer.get("shape"), layer.get("experts", 0)
        if not (isinstance(shape, list) and len(shape) == (3 if experts else 2) and (not experts or shape[0] == experts)):
            raise PruneDirError(f"{d / 'prune.json'}: layer {layer.get('name')!r} has shape {shape!r} and experts "
                                f"{experts!r}: expected [out, in], or [E, out, in] with experts E")
        name, (*lead, out_f, in_f) = layer["name"], shape
        b, p = tensors.get(f"{name}/bitmap"), tensors.get(f"{name}/pattern")
        if b is None or p is None:
            raise PruneDirError(f"masks.safetensors has no bitmap/pattern for {name}")
        if (tuple(b.shape) != (*lead, out_f // tile, in_f // tile)
                or tuple(p.shape) != (*lead, out_f, in_f // 4)):
            raise PruneDirError(f"{name}: mask shapes {tuple(b.shape)}, {tuple(p.shape)} do not match layer shape "
                                f"{layer['shape']} with tile {tile}")
        bitmaps[name], patterns[name] = b.bool(), p
    return PrunedMasks(dir=d, report=report, tile=tile, bitmaps=bitmaps, patterns=patterns)


@torch.no_grad()
def apply_hard_masks_(model: torch.nn.Module, masks: PrunedMasks) -> None:
    """Zero the pruned weights of `model` in place (W <- W * M), fused MoE expert weights included."""
    transposed = _transposed_layers(model, masks)
    for name, bitmap in masks.bitmaps.items():  # shapes checked by read_prune_dir and _transposed_layers
        w = weight_2d(model, name, transposed[name])
        m = hm.hybrid_mask(bitmap.to(w.device), hm.pattern_to_mask(masks.patterns[name].to(w.device)), masks.tile)
        w.mul_(m.to(w.dtype))


def _transposed_layers(model: torch.nn.Module, masks: PrunedMasks) -> dict[str, bool]:
    """Conv1D-style layers store their weight [in, out], some experts [E, in, out] (prune.json records which)."""
    out = {}
    for layer in masks.report["layers"]:
        name, (*lead, out_f, in_f), tr = layer["name"], layer["shape"], bool(layer.get("transposed", False))
        try:
            shape = tuple(model.get_parameter(name).shape)
        except AttributeError as e:
            raise PruneDirError(f"the model has no parameter {name}: wrong model for this prune folder?") from e
        if shape != ((*lead, in_f, out_f) if tr else (*lead, out_f, in_f)):
            raise PruneDirError(f"{name}: model weight {list(shape)} does not match the recorded shape "
                                f"{layer['shape']}: wrong model for this prune folder?")
        out[name] = tr
    return out
