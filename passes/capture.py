"""Capture a Hugging Face causal LM as an FX graph with torch.export (batch and sequence dynamic)."""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
from torch.export import Dim

PREFIX = "lm."  # the wrapper's attribute: graph targets are "lm.<HF parameter FQN>"


class LogitsOnly(torch.nn.Module):
    """input_ids [B, S] -> logits [B, S, V], without a KV cache (what torch.export can trace)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


@dataclass
class CapturedGraph:
    gm: torch.fx.GraphModule  # callable: input_ids [B, S] -> logits [B, S, V]; shares the model's weights
    seconds: float
    strategy: str = ""  # how the dynamic dims were expressed


def _strategies(max_pos: int):
    """Ways to ask for dynamic batch/sequence dims, strictest first. Some torch versions emit guards
    (e.g. min(64*s, 192*s) == 64*s) that a named Dim's range check rejects; the later strategies
    turn such guards into runtime asserts instead of failing the export."""
    named = ({0: Dim("batch", min=1, max=1024), 1: Dim("seq", min=2, max=max_pos)},)
    sig = inspect.signature(torch.export.export).parameters
    if "prefer_deferred_runtime_asserts_over_guards" in sig:
        yield "named dims, deferred asserts", named, {"prefer_deferred_runtime_asserts_over_guards": True}
    else:
        yield "named dims", named, {}
    if hasattr(Dim, "DYNAMIC"):
        yield "Dim.DYNAMIC", ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},), {}


def capture(model: torch.nn.Module, example_len: int = 16) -> CapturedGraph:
    """Export `model` to an FX GraphModule whose parameters are `get_attr` nodes named lm.<FQN>."""
    device = next(model.parameters()).device
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 4096)
    ids = torch.randint(0, 100, (2, example_len), device=device)
    t0 = time.perf_counter()
    errors = []
    for how, dims, extra in _strategies(int(max_pos)):
        try:
            ep = torch.export.export(LogitsOnly(model), (ids,), dynamic_shapes=dims, strict=False, **extra)
        except Exception as e:  # noqa: BLE001 - collected, re-raised below with every attempt named
            errors.append(f"{how}: {type(e).__name__}: {str(e)[:300]}")
            continue
        return CapturedGraph(gm=ep.module(), seconds=time.perf_counter() - t0, strategy=how)
    raise RuntimeError(
        f"torch.export could not capture {type(model).__name__} with dynamic batch/sequence dims "
        f"(torch {torch.__version__}); patchc needs a model that exports with use_cache=False. Tried: "
        + " | ".join(errors)
    )
