"""Packed checkpoints and plain `transformers.from_pretrained`.

`patchc lower` writes `"quantization_config": {"quant_method": "patchc.load", "format": ...}` into a
packed checkpoint's config.json, and stores every hybrid layer's `weight` in model.safetensors as an empty
placeholder. So:
- without patchc imported, transformers warns "Unknown quantization type, got patchc.load" and refuses the load
  (the placeholders do not match the model's weights: a size-mismatch error), never a model with random
  weights;
- once `import patchc` has run, patchc is a registered transformers quantization method, and
  `AutoModelForCausalLM.from_pretrained(ckpt)` loads it as patchc.load does (checksums verified, hybrid layers
  as HybridLinear modules, fused MoE expert weights decompressed).
"""
from __future__ import annotations

from pathlib import Path

import torch

QUANT_METHOD = "patchc.load"  # the name plain transformers prints when it refuses: what to use instead


def config_entry() -> dict:
    from patchc.format import FORMAT, FORMAT_VERSION

    return {"quant_method": QUANT_METHOD, "format": FORMAT, "version": FORMAT_VERSION, "loader": "patchc.load"}


class _Pending(torch.nn.Module):
    """Stands for a hybrid layer while transformers loads the other weights (it holds the bias, if any)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        # not saved or loaded (non-persistent, on meta): only there for init code that touches `.weight`
        self.register_buffer("weight", torch.empty(weight.shape, dtype=weight.dtype, device="meta"), persistent=False)
        self.bias = torch.nn.Parameter(torch.empty_like(bias), requires_grad=False) if bias is not None else None


class _Patterns(set):
    """transformers combines these patterns with | (5.2x) or + (older): a set that does both."""

    def __or__(self, other):
        return _Patterns(set.__or__(self, set(other)))

    __ror__ = __or__

    def __add__(self, other):
        return self | other

    __radd__ = __add__


def register() -> None:
    try:
        from transformers.quantizers.auto import (AUTO_QUANTIZER_MAPPING, register_quantization_config,
                                                  register_quantizer)
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:  # pragma: no cover - a transformers without custom quantizers: patchc.load still works
        return
    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:
        return

    @register_quantization_config(QUANT_METHOD)
    class PatchcQuantizationConfig(QuantizationConfigMixin):
        def __init__(self, **kwargs):
            self.quant_method = QUANT_METHOD
            for k, v in kwargs.items():
                if k != "quant_method":
                    setattr(self, k, v)

    @register_quantizer(QUANT_METHOD)
    class PatchcHfQuantizer(HfQuantizer):
        requires_calibration = False

        def validate_environment(self, *args, **kwargs):
            if not self.pre_quantized:
                raise ValueError("patchc does not quantize on load: lower a prune run with `patchc lower`")

        @property
        def is_compileable(self) -> bool:
            return True

        def is_serializable(self):
            return False

        @property
        def is_trainable(self):
            return False

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            from patchc.lower import read_manifest

            if not checkpoint_files:
                raise ValueError("patchc: from_pretrained found no checkpoint files")
            self._dir = Path(checkpoint_files[0]).parent
            self._manifest = read_manifest(self._dir)
            keys = []
            for layer in self._manifest["layers"]:
                mod_name = layer["module"]
                old = model.get_submodule(mod_name)
                parent, _, child = mod_name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, _Pending(old.weight, getattr(old, "bias", None)))
                keys.append(rf"^{mod_name.replace('.', '[.]')}[.]weight$")
            for entry in self._manifest["experts"]:  # fused MoE expert weights: patchc decompresses them
                parent, _, leaf = entry["name"].rpartition(".")
                owner = model.get_submodule(parent)
                old = getattr(owner, leaf)
                delattr(owner, leaf)
                owner.register_buffer(leaf, torch.empty(old.shape, dtype=old.dtype, device="meta"), persistent=False)
                keys.append(rf"^{entry['name'].replace('.', '[.]')}$")
            model._keys_to_ignore_on_load_unexpected = _Patterns(model._keys_to_ignore_on_load_unexpected or ()) | set(keys)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from patchc.lower import _install, _load_tensors

            tensors = _load_tensors(self._dir, self._manifest, verify=True)
            device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
            return _install(model, self._manifest, tensors, device)
