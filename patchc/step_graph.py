"""CUDA graphs of a whole mask-training step (opt-in: PruneConfig.cuda_graphs, `patchc prune --cuda-graphs`,
PATCHC_CUDA_GRAPHS=1).

On small models the eager step is host-bound: per masked linear ~20 small torch ops, 3 Triton launches and an
autograd.Function, ~1 ms of host time per linear per step (SmolLM2-135M: 340 ms a step for 140 ms of device
time). This module follows PyTorch's "whole network capture" recipe: warm-up iterations on a side stream, then
one capture of forward + loss + backward (the micro-step) and one of the optimizer update, replayed every step.

What changes from step to step reaches the graphs only through device tensors the host writes IN PLACE before
a replay (patchc.train.TrainStep does it, the eager path reads the very same tensors):
  MaskState.keys [nodes, 2] int64, MaskState.knobs [3]   mask noise keys, scale_tile / scale_24 / tau
  LeanAdamW hp [8] float32, keys [params] int64           lr, bias corrections, stochastic-rounding keys
  TrainStep.weight_coef (0-d), TrainStep.ids [B, S]        weight_reg * (1 - step / steps), the input ids
Gradient accumulation: the .grad tensors are static buffers (made before capture, never set to None); the
micro-step graph accumulates into them (autograd adds in place) and the optimizer graph zeroes them after the
update, so ONE micro-step graph serves every micro-batch of a step.

This module knows nothing of prune (it captures and replays closures); patchc.train decides what they do.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

WARMUP_STEPS = 3   # eager steps on a side stream before the capture (PyTorch's example uses 3)


def refusal(device, *, compile: bool, step_in_backward: bool | None, world: int, mask_kernels: bool) -> str | None:
    """Why a prune run cannot capture its step in CUDA graphs, with the fix; None when it can (so far as is known
    before the model is loaded: patchc.train checks the mask nodes and the optimizer once they exist)."""
    if torch.device(device).type != "cuda":
        return f"CUDA graphs need a CUDA device (got {device}): run on a GPU or drop --cuda-graphs"
    if world > 1:
        return ("CUDA graphs are single-process only (under torchrun, FSDP2 communicates inside the step); run one "
                "process or drop --cuda-graphs")
    if compile:
        return "CUDA graphs and compile=True are exclusive (torch.compile has its own): drop compile or --cuda-graphs"
    if step_in_backward:
        return ("CUDA graphs run the optimizer after backward, not inside it: drop step_in_backward=True "
                "or --cuda-graphs")
    if not mask_kernels:
        return ("CUDA graphs need the Triton mask kernels (they read the noise keys from device memory); "
                "PATCHC_MASK_KERNELS=0 turns them off: unset it or drop --cuda-graphs")
    return None


class StepGraph:
    """Named CUDA graphs captured on first use and replayed after, sharing one memory pool (they replay in the
    order they were captured, never concurrently). run(name, fn) captures fn the first time (the capture does
    not execute it) and then replays the graph, so every call runs fn's work exactly once."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.side = torch.cuda.Stream(device=self.device)
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self.capture_s = 0.0            # host seconds spent capturing (reported like compile's first step)
        self._pool = None

    @contextlib.contextmanager
    def side_stream(self):
        """Warm-up work on a side stream (lazy initialisation of cuBLAS, Triton, autograd, optimizer state happens
        off the stream the capture later starts from), ordered after and before the current stream's work."""
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            yield
        torch.cuda.current_stream(self.device).wait_stream(self.side)

    def run(self, name: str, fn: Callable[[], None]) -> None:
        g = self.graphs.get(name)
        if g is None:
            import time

            t0 = time.perf_counter()
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g, pool=self._pool):
                    fn()
            except Exception as e:
                raise RuntimeError(f"capturing the training step's {name!r} CUDA graph failed ({type(e).__name__}: "
                                   f"{e}); run without --cuda-graphs (PATCHC_CUDA_GRAPHS=0)") from e
            if self._pool is None:
                self._pool = g.pool()
            self.graphs[name] = g
            self.capture_s += time.perf_counter() - t0
        g.replay()
