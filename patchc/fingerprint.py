"""Which model a prune run learned its masks on: the resolved source and a fingerprint of config + weights.

`patchc prune` records both in prune.json; `lower` and `eval` load the recorded source (an absolute path,
a hub id or tiny:<arch>, never a path relative to wherever they run) and refuse a model whose fingerprint
differs (another model of the same shapes would otherwise run silently with the wrong weights).

The fingerprint is sha256 over the config (minus paths and versions) and every tensor of the state dict
(name, dtype, shape, bytes; tied tensors once). Models up to FULL_BYTES of weights (a 1B model in bf16) are
hashed whole (1-2 s per GB on one CPU core); larger ones hash each tensor's name/dtype/shape and SAMPLE_BYTES at its start,
middle and end ("sha256-sampled:"), so a different checkpoint of one architecture is still told apart.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

FULL_BYTES = 4 << 30
SAMPLE_BYTES = 1 << 16
_CONFIG_SKIP = {"transformers_version", "dtype", "torch_dtype", "name_or_path", "use_cache"}


class ModelMismatchError(ValueError):
    """The model found is not the one a prune run recorded."""


def _config_json(model) -> str:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "{}"
    d = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_") and k not in _CONFIG_SKIP}
    return json.dumps(d, sort_keys=True, default=str)


def model_fingerprint(model: torch.nn.Module) -> str:
    state = model.state_dict()
    seen, items = set(), []
    for k in sorted(state):
        t = state[k]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        items.append((k, t))
    total = sum(t.numel() * t.element_size() for _, t in items)
    full = total <= FULL_BYTES
    h = hashlib.sha256(_config_json(model).encode())
    for k, t in items:
        h.update(f"\n{k}|{str(t.dtype)}|{list(t.shape)}\n".encode())
        if not t.numel():
            continue
        b = t.detach().reshape(-1)
        if not full and b.numel() * b.element_size() > 3 * SAMPLE_BYTES:
            n = max(1, SAMPLE_BYTES // b.element_size())
            mid = b.numel() // 2
            b = torch.cat([b[:n], b[mid: mid + n], b[-n:]])
        h.update(b.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return ("sha256:" if full else "sha256-sampled:") + h.hexdigest()


def resolved_spec(loaded) -> str:
    """A spec that names the same model from any working directory (patchc.models.LoadedModel -> str)."""
    if loaded.spec.startswith("tiny:"):
        return loaded.spec
    src = Path(loaded.source)
    if src.exists():
        return str(src.resolve())
    return loaded.source  # a hub id


def source_record(loaded) -> dict:
    """What prune.json records about the model it pruned (prune calls it right after loading the model)."""
    return {"model_resolved": resolved_spec(loaded), "model_fingerprint": model_fingerprint(loaded.model)}


def load_recorded_model(report: dict, device="cpu", dtype: torch.dtype | None = None, where: str = "prune.json"):
    """Load the model a prune report names (its recorded absolute source), check its fingerprint, and
    return it in `dtype` (default: the run's). Raises ModelMismatchError naming both when it differs."""
    from patchc.models import load_model, parse_dtype

    spec = report.get("model_resolved") or report["model"]
    run_dtype = parse_dtype(report.get("dtype", "float32"))
    loaded = load_model(spec, device=device, dtype=run_dtype, seed=report.get("config", {}).get("seed", 0))
    want = report.get("model_fingerprint")
    if not want:
        import warnings

        warnings.warn(f"{where} records no model fingerprint (written by an older patchc): {spec!r} is loaded "
                      "unchecked; prune again to record one", stacklevel=2)
    else:
        got = model_fingerprint(loaded.model)
        if got != want:
            raise ModelMismatchError(
                f"the model at {spec} (fingerprint {got[:23]}...) is not the one {where} was pruned from "
                f"({report['model']!r} -> {spec}, fingerprint {want[:23]}...): its weights or config changed; "
                "prune it again, or restore the original model")
    if dtype is not None and dtype != run_dtype:
        loaded.model.to(dtype)
    return loaded
