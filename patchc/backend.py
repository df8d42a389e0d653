"""`torch.compile(model, backend="patch")`: generated Triton kernels for hybrid linears, inductor for the rest.

Registered when patchc is imported and through the `torch_dynamo_backends` entry point, so the name
resolves with no import. torch.compile's `mode` ("reduce-overhead" = CUDA graphs, "max-autotune", ...)
and `options` reach inductor as they would with backend="inductor".
"""
from __future__ import annotations

import time
import warnings

import torch

from patchc.passes.swap_kernels import SwapReport, swap_hybrid_linears

LAST_REPORT: SwapReport | None = None   # what the last compiled graph did (for tests and --verbose)
LAST_GRAPH: torch.fx.GraphModule | None = None  # the last graph after the pass (what inductor was given)
_warned_cpu = False


_MODES = {
    None: {}, "default": {},
    "reduce-overhead": {"triton.cudagraphs": True},
    "max-autotune": {"max_autotune": True, "triton.cudagraphs": True},
    "max-autotune-no-cudagraphs": {"max_autotune": True},
}


def _config_patches(mode: str | None, options: dict | None) -> dict:
    if mode not in _MODES:
        raise ValueError(f"patch backend: unknown mode {mode!r}; use one of {', '.join(m for m in _MODES if m)}")
    return {**_MODES[mode], **(options or {})}


def patch_backend(gm: torch.fx.GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    global LAST_REPORT, LAST_GRAPH, _warned_cpu
    from torch._inductor.compile_fx import compile_fx

    t0 = time.perf_counter()
    report = swap_hybrid_linears(gm, example_inputs)
    report.seconds = time.perf_counter() - t0
    LAST_REPORT, LAST_GRAPH = report, gm
    from patchc import runtime

    if report.swapped and not _warned_cpu and not runtime.kernels_on_cpu() and not any(
            isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs):
        _warned_cpu = True
        warnings.warn("patch backend: the model is on the CPU; hybrid layers run the reference "
                      "(decompress + F.linear) path, the Triton kernels need a CUDA device", stacklevel=2)
    return compile_fx(gm, example_inputs, config_patches=_config_patches(mode, options))


def register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if "patch" not in _BACKENDS:
        register_backend(name="patch")(patch_backend)
