"""Capture a Hugging Face causal LM as an FX graph with torch.export (batch and sequence dynamic)."""
from __future__ import annotations

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


def capture(model: torch.nn.Module, example_len: int = 16) -> CapturedGraph:
    """Export `model` to an FX GraphModule whose parameters are `get_attr` nodes named lm.<FQN>."""
    device = next(model.parameters()).device
    max_pos = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 4096)
    ids = torch.randint(0, 100, (2, example_len), device=device)
    dims = ({0: Dim("batch", min=1, max=1024), 1: Dim("seq", min=2, max=int(max_pos))},)
    t0 = time.perf_counter()
    try:
        ep = torch.export.export(LogitsOnly(model), (ids,), dynamic_shapes=dims, strict=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the model named
        raise RuntimeError(
            f"torch.export could not capture {type(model).__name__} ({type(e).__name__}: {str(e)[:400]}); "
            "patchc needs a model that exports with use_cache=False"
        ) from e
    gm = ep.module()
    return CapturedGraph(gm=gm, seconds=time.perf_counter() - t0)
