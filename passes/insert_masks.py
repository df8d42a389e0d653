"""Insert trainable hybrid-mask nodes: weight -> MaskNode(weight) -> linear.

Each masked linear's weight `get_attr` gets a `call_module` successor that returns W * M(logits) in
the weight's own layout; only the matmul's use of the weight is rewired, so the parameter itself
stays frozen and unchanged byte for byte. Only the mask logits require grad.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from patchc import mask as hm

from .find_linears import LinearPlan, LinearSite

MASK_ROOT = "patch_masks"


@dataclass
class MaskState:
    """Shared by every MaskNode of a model; the trainer updates it each step.

    mode: soft   Gumbel-softmax sample (training)
          mean   no noise: the deterministic relaxation
          hard   the extracted hard masks (set_hard)
          off    the dense model (a free teacher for distillation)
    """
    mode: str = "soft"
    tau: float = 4.0
    scale_tile: float = 25.0
    scale_24: float = 100.0
    generator: torch.Generator | None = None
    # Recompute the soft masks in backward instead of keeping them (torch.utils.checkpoint): the per-weight
    # soft mask, 2:4 probabilities and the norm's input are not held between forward and backward. Less memory
    # (Joint + distillation on a 1B model fits an H100 only with it), slower steps (bench/results/train_speed).
    checkpoint: bool = False


class MaskNode(torch.nn.Module):
    """Hybrid mask of one linear: tile logits [R, C] and, in joint mode, 2:4 pattern logits [out, in/4, 6]."""

    def __init__(self, site: LinearSite, tile: int, state: MaskState, tile_logits: torch.Tensor,
                 pattern: torch.Tensor, pattern_logits: torch.Tensor | None = None):
        super().__init__()
        self.name, self.tile, self.transposed, self.state = site.name, tile, site.transposed, state
        self.out_features, self.in_features = site.out_features, site.in_features
        self.tile_logits = torch.nn.Parameter(tile_logits.float().clone())  # [R, C]
        self.joint = pattern_logits is not None
        if self.joint:
            self.pattern_logits = torch.nn.Parameter(pattern_logits.float().clone())  # [out, in/4, 6]
        # The fixed one-shot 2:4 mask (PATCH-Tile), kept as bool [out, in].
        self.register_buffer("mask24", hm.pattern_to_mask(pattern.to(torch.uint8)), persistent=False)
        self.register_buffer("hard_bitmap", torch.zeros_like(self.tile_logits, dtype=torch.bool), persistent=False)
        self.register_buffer("hard_pattern", pattern.to(torch.uint8).clone(), persistent=False)
        self.last_gate: torch.Tensor | None = None      # mean dense-tile probability of the last forward
        self.last_norm: torch.Tensor | None = None      # ||W * M||_F of the last forward

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def soft_masks(self, noise: bool, generator: torch.Generator | None = None, tau: float | None = None,
                   scale_tile: float | None = None, scale_24: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.state
        tau = st.tau if tau is None else tau
        gen = st.generator if generator is None else generator
        gate = hm.soft_dense_tile(self.tile_logits, st.scale_tile if scale_tile is None else scale_tile, tau, gen,
                                  noise)  # [R, C]
        if self.joint:
            m24 = hm.soft_mask24(self.pattern_logits, st.scale_24 if scale_24 is None else scale_24, tau, gen,
                                 noise)  # [out, in]
        else:
            m24 = self.mask24
        return gate, m24

    def _soft_masked(self, w: torch.Tensor, rng_state: torch.Tensor | None, noise: bool, tau: float,
                     scale_tile: float, scale_24: float):
        """(W * M, mean gate, ||W * M||) with the noise drawn from a generator restored to `rng_state`, so a
        recompute in backward draws exactly the same noise."""
        gen = None
        if rng_state is not None:
            gen = torch.Generator(device=w.device)
            gen.set_state(rng_state)
        gate, m24 = self.soft_masks(noise, gen, tau, scale_tile, scale_24)
        masked = w * hm.hybrid_mask(gate, m24, self.tile).to(w.dtype)
        if gen is not None:
            self._rng_after = gen.get_state()
        return masked, gate.mean(), masked.float().norm()

    def hard_pattern_now(self) -> torch.Tensor:
        """The 2:4 pattern the node would extract now: argmax logits (joint) or the fixed one."""
        if self.joint:
            return self.pattern_logits.detach().argmax(-1).to(torch.uint8)
        return self.hard_pattern

    def set_hard(self, bitmap: torch.Tensor, pattern: torch.Tensor) -> None:
        self.hard_bitmap.copy_(bitmap.to(self.hard_bitmap.device, torch.bool))
        self.hard_pattern.copy_(pattern.to(self.hard_pattern.device, torch.uint8))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mode = self.state.mode
        if mode == "off":
            return weight
        w = weight.t() if self.transposed else weight  # [out, in]
        if mode == "hard":
            masked = hm.apply_hybrid(w, self.hard_bitmap, hm.pattern_to_mask(self.hard_pattern), self.tile)
            self.last_gate, self.last_norm = None, None
        else:
            st = self.state
            noise = mode == "soft"
            recompute = st.checkpoint and torch.is_grad_enabled() and (st.generator is not None or not noise)
            # only a recompute needs the noise replayed: then the draws come from a generator restored to this state
            rng = st.generator.get_state() if recompute and noise else None
            args = (w, rng, noise, st.tau, st.scale_tile, st.scale_24)
            if recompute:
                masked, self.last_gate, self.last_norm = torch.utils.checkpoint.checkpoint(
                    self._soft_masked, *args, use_reentrant=False, preserve_rng_state=False)
            else:
                masked, self.last_gate, self.last_norm = self._soft_masked(*args)
            if rng is not None:  # advance the shared generator past this node's draws
                st.generator.set_state(self._rng_after)
        return masked.t() if self.transposed else masked


def insert_masks(gm: torch.fx.GraphModule, plan: LinearPlan, nodes: dict[str, MaskNode]) -> torch.fx.GraphModule:
    """Rewire every masked linear of `plan` to read MaskNode(weight); `nodes` maps FQN -> MaskNode."""
    root = torch.nn.Module()
    gm.add_module(MASK_ROOT, root)
    by_name = {n.name: n for n in gm.graph.nodes}
    for i, site in enumerate(plan.masked):
        if site.name not in nodes:
            raise KeyError(f"no MaskNode for masked linear {site.name}")
        key = f"m{i}"
        root.add_module(key, nodes[site.name])
        attr, user = by_name[site.weight_node], by_name[site.node]
        with gm.graph.inserting_after(attr):
            masked = gm.graph.call_module(f"{MASK_ROOT}.{key}", (attr,))
        # Rewire only the path from this parameter to this matmul (directly or through its transpose).
        if attr in user.all_input_nodes:
            user.replace_input_with(attr, masked)
        else:
            for t in user.all_input_nodes:
                if attr in t.all_input_nodes:
                    t.replace_input_with(attr, masked)
    gm.graph.lint()
    gm.recompile()
    return gm


def mask_nodes(gm: torch.nn.Module) -> list[MaskNode]:
    """The MaskNodes of a rewritten graph, in insertion (graph) order."""
    return [m for m in gm.modules() if isinstance(m, MaskNode)]
