"""Insert trainable hybrid-mask nodes into a captured graph.

Each masked linear gets a MaskNode (a call_module node) that owns a reference to the frozen weight and the
layer's mask logits:

  aten.linear(x, W, b)          ->  MaskNode(x, b)       y = x @ (W * M).T + b, fused (see MaskedLinear)
  mm / addmm over W or W.T      ->  MaskNode() -> W * M  the weight only (GPT-2's Conv1D and other forms)
  fused MoE experts W [E, ..]   ->  MaskNode() -> W * M  the whole 3-D weight, every use of it (whatever
                                                         grouped / batched matmul the experts run as)

The frozen parameter is unchanged byte for byte; only the mask logits require grad. In the fused form the
relaxed mask is recomputed in backward from the logits (with the same stateless noise), so nothing of
weight size waits for backward: the layer keeps only its input x, as a plain linear layer does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from patchc import mask as hm
from patchc import mask_kernels as mk
from patchc.config import settings
from patchc.models import on_device

from .find_linears import LinearPlan, LinearSite

MASK_ROOT = "patch_masks"


@dataclass
class MaskState:
    """Shared by every MaskNode of a model; the trainer updates it each step.

    mode: soft   Gumbel-softmax sample (training)
          mean   no noise: the deterministic relaxation
          hard   the extracted hard masks (set_hard)
          off    the dense model (a free teacher for distillation)
    The noise of node i at a step is a stateless hash keyed by (seed, step, micro, i): set_step() sets them.
    """
    mode: str = "soft"
    tau: float = 4.0
    scale_tile: float = 25.0
    scale_24: float = 100.0
    seed: int = 0
    step: int = 0
    micro: int = 0
    # the graph runs under torch.compile: nodes compute W * M inline (inductor fuses the mask into a few
    # kernels and its partitioner recomputes it in backward) instead of through MaskedLinear / MaskedWeight
    compile: bool = False
    # eager soft masks come from the Triton kernels of patchc.mask_kernels (CUDA weights, PATCHC_MASK_KERNELS=1;
    # on the CPU only under Triton's interpreter with PATCHC_KERNELS_ON_CPU=1); else from torch ops
    kernels: bool = False
    # Persistent device tensors, written IN PLACE by set_step / knobs_now (never replaced once made): the mask
    # kernels and compiled graphs read them from memory, so a captured CUDA graph (patchc/step_graph.py) replays
    # with the values of the current step.
    knobs: torch.Tensor | None = field(default=None, repr=False)   # [3] float32: scale_tile, scale_24, tau
    keys: torch.Tensor | None = field(default=None, repr=False)    # [nodes, 2] int64 noise keys (tile, 2:4 stream)
    keys_int: list | None = field(default=None, repr=False)        # the same keys as ints (the torch-op path's
                                                                   # Philox seeds)

    def set_step(self, step: int, micro: int, n_nodes: int, device) -> None:
        """Noise keys and schedule values of one micro-batch, written into the device tensors (one copy each)."""
        self.step, self.micro = step, micro
        keys = [[hm.noise_key(self.seed, step, micro, i, s) for s in (0, 1)] for i in range(n_nodes)]
        self.keys_int = [tuple(k) for k in keys]
        host = torch.tensor(keys, dtype=torch.int64).reshape(n_nodes, 2)
        if self.keys is None or self.keys.shape != host.shape or not on_device(self.keys, device):
            self.keys = torch.empty(host.shape, dtype=torch.int64, device=device)
        self.keys.copy_(host)
        self.knobs_now(device)

    def knobs_now(self, device) -> torch.Tensor:
        """The knobs tensor, holding the current values (written in place only when a value changed)."""
        want = (self.scale_tile, self.scale_24, self.tau)
        if self.knobs is None or not on_device(self.knobs, device):
            self.knobs = torch.empty(3, dtype=torch.float32, device=device)
            self._knobs_for = None
        if getattr(self, "_knobs_for", None) != want:
            with torch.no_grad():
                self.knobs.copy_(torch.tensor(want, dtype=torch.float32))
            self._knobs_for = want
        return self.knobs


class MaskedLinear(torch.autograd.Function):
    """y = x @ (W * M(logits)).T + b with M the relaxed hybrid mask. Forward keeps x and the (frozen) W; backward
    recomputes W * M from the logits, then dx = dy @ (W * M), dWM = dy.T @ x and the logit gradients through
    the mask. Extra outputs: the mean dense-tile probability and ||W * M||_F (the regularisers' inputs).
    kernels=True: W * M and the logit gradients come from patchc.mask_kernels (one pass over W each way, hash
    noise); else from the torch ops of mask.soft_masked_weight (autograd through them in backward)."""

    @staticmethod
    def forward(ctx, x, w, bias, tile_logits, pattern_logits, pattern, knobs, keys, tile, kernels):
        ctx.has_bias = bias is not None
        wm, gate_mean, norm = _mask_forward(ctx, x, w, tile_logits, pattern_logits, pattern, knobs, keys, tile, kernels)
        y = F.linear(x, wm, bias)                                                   # [.., in] @ [in, out]
        return y, gate_mean, norm

    @staticmethod
    def backward(ctx, dy, d_gate, d_norm):
        dy2 = dy.reshape(-1, dy.shape[-1])                                          # [tokens, out]
        x = ctx.saved_tensors[0]
        dwm = dy2.t() @ x.reshape(-1, x.shape[-1]).to(dy2.dtype)                    # [out, tokens] @ [tokens, in]
        wm, g_tile, g_pat = _mask_backward(ctx, dwm, d_gate, d_norm)
        dx = (dy2 @ wm).reshape(x.shape) if ctx.needs_input_grad[0] else None      # [tokens, out] @ [out, in]
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, db, g_tile, g_pat, None, None, None, None, None


class MaskedWeight(torch.autograd.Function):
    """W * M(logits) alone (the mm / addmm forms), with the gradients of MaskedLinear's mask part."""

    @staticmethod
    def forward(ctx, w, tile_logits, pattern_logits, pattern, knobs, keys, tile, kernels):
        return _mask_forward(ctx, None, w, tile_logits, pattern_logits, pattern, knobs, keys, tile, kernels)

    @staticmethod
    def backward(ctx, dwm, d_gate, d_norm):
        _, g_tile, g_pat = _mask_backward(ctx, dwm, d_gate, d_norm)
        return None, g_tile, g_pat, None, None, None, None, None


def _mask_forward(ctx, x, w, tile_logits, pattern_logits, pattern, knobs, keys, tile, kernels):
    """(W * M, mean gate, ||W * M||_F) of MaskedLinear / MaskedWeight's forward; saves what _mask_backward needs
    (x first: the linear's input, None for the weight-only form)."""
    ctx.tile, ctx.keys, ctx.kernels = tile, keys, kernels
    if kernels:
        gate = mk.soft_gate(tile_logits, knobs, keys)                                         # [R, C]
        wm, norm = mk.masked_weight_forward(w, gate, pattern_logits, pattern, tile, knobs, keys)
        ctx.save_for_backward(x, w, gate, pattern_logits, pattern, knobs, norm)
        return wm, gate.mean(), norm
    with torch.no_grad():
        wm, gate_mean, norm = hm.soft_masked_weight(w, tile_logits, pattern_logits, _mask24(pattern), tile, knobs, keys)
    ctx.save_for_backward(x, w, tile_logits, pattern_logits, pattern, knobs)
    return wm, gate_mean, norm


def _mask_backward(ctx, dwm, d_gate, d_norm):
    """(W * M again, d tile logits, d pattern logits or None) given dwm = dL/d(W * M)."""
    if ctx.kernels:
        _, w, gate, pattern_logits, pattern, knobs, norm = ctx.saved_tensors
        return mk.masked_weight_backward(w, gate, pattern_logits, pattern, ctx.tile, knobs, ctx.keys, dwm, norm,
                                         d_norm, d_gate)
    return _torch_backward(ctx, dwm, d_gate, d_norm)


def _mask24(pattern: torch.Tensor | None) -> torch.Tensor | None:
    """The fixed [out, in] 0/1 mask of a PATCH-Tile node's 2:4 pattern (no validation: no device sync)."""
    if pattern is None:
        return None
    return hm.PATTERNS.to(pattern.device)[pattern.long()].reshape(pattern.shape[0], pattern.shape[1] * 4)


def _torch_backward(ctx, dwm, d_gate, d_norm):
    """W * M recomputed by the torch ops, and the logit gradients by autograd through them."""
    _, w, tile_logits, pattern_logits, pattern, knobs = ctx.saved_tensors
    tl = tile_logits.detach().requires_grad_()
    pl = pattern_logits.detach().requires_grad_() if pattern_logits is not None else None
    inputs = [tl] if pl is None else [tl, pl]
    with torch.enable_grad():
        wm, gate_mean, norm = hm.soft_masked_weight(w, tl, pl, _mask24(pattern), ctx.tile, knobs, ctx.keys)
    grads = torch.autograd.grad([wm, gate_mean, norm], inputs, [dwm.to(wm.dtype), d_gate, d_norm])
    return wm.detach(), grads[0], (grads[1] if pl is not None else None)


class MaskNode(torch.nn.Module):
    """Hybrid mask of one linear: tile logits [R, C] (fp32) and, in joint mode, 2:4 pattern logits
    [out, in/4, 6] (bf16 when lean: patchc.optim.LeanAdamW keeps them in 4 bytes per logit with its state).
    `weight` is the frozen parameter itself (shared with the model, never written).

    A fused MoE expert weight (site.experts = E) has per-expert-matrix masks: tile logits [E, R, C], pattern
    logits [E, out, in/4, 6], fixed pattern [E, out, in/4]. Its soft mask is computed on the stacked
    matrix [E*out, in] (the same mask, see patchc.mask), so the mask kernels serve experts too."""

    def __init__(self, site: LinearSite, tile: int, state: MaskState, tile_logits: torch.Tensor,
                 pattern: torch.Tensor, pattern_logits: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                 index: int = 0, lean: bool = False):
        super().__init__()
        self.name, self.tile, self.transposed, self.state = site.name, tile, site.transposed, state
        self.out_features, self.in_features = site.out_features, site.in_features
        self.experts = site.experts            # E of a fused MoE expert weight, 0 for a linear
        self.index = index
        self.fused = False                     # set by insert_masks: this node computes the whole linear
        # set by patchc.distributed.shard_: FSDP frees the unsharded weight after this module's forward, so the
        # weight-only form returns a copy of it in mode "off" (the dense teacher), never the weight itself
        self.sharded = False
        self.weight = weight                   # the frozen nn.Parameter (registered when given)
        self.tile_logits = torch.nn.Parameter(tile_logits.float().clone())  # [R, C] ([E, R, C] for experts)
        self.joint = pattern_logits is not None
        if self.joint:
            dtype = torch.bfloat16 if lean else torch.float32
            self.pattern_logits = torch.nn.Parameter(pattern_logits.to(dtype).clone())  # [(E,) out, in/4, 6]
        else:
            self.pattern_logits = None
        # The fixed one-shot 2:4 pattern (PATCH-Tile), uint8 [(E,) out, in/4].
        self.register_buffer("pattern24", None if self.joint else pattern.to(torch.uint8).clone(), persistent=False)
        self.register_buffer("hard_bitmap", torch.zeros_like(self.tile_logits, dtype=torch.bool), persistent=False)
        self.register_buffer("hard_pattern", pattern.to(torch.uint8).clone(), persistent=False)
        self.last_gate: torch.Tensor | None = None      # mean dense-tile probability of the last forward
        self.last_norm: torch.Tensor | None = None      # ||W * M||_F of the last forward

    @property
    def numel(self) -> int:
        return max(self.experts, 1) * self.out_features * self.in_features

    def w2d(self) -> torch.Tensor:
        """The [out, in] view of the frozen weight ([E, out, in] for experts)."""
        return self.weight.mT if self.transposed else self.weight

    def _rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """An expert tensor [E, a, ...] as the stacked-matrix one [E*a, ...] (a linear's as it is)."""
        return t.flatten(0, 1) if self.experts and t is not None else t

    def hard_pattern_now(self) -> torch.Tensor:
        """The 2:4 pattern the node would extract now: argmax logits (joint) or the fixed one."""
        if self.joint:
            return self.pattern_logits.detach().float().argmax(-1).to(torch.uint8)
        return self.hard_pattern

    def set_hard(self, bitmap: torch.Tensor, pattern: torch.Tensor) -> None:
        self.hard_bitmap.copy_(bitmap.to(self.hard_bitmap.device, torch.bool))
        self.hard_pattern.copy_(pattern.to(self.hard_pattern.device, torch.uint8))

    def _keys(self, kernels: bool):
        """This node's noise keys: None (no noise) unless soft; the [2] int64 device row of MaskState.keys for the
        kernels and compiled graphs (hash noise read from memory), the ints for the torch ops (Philox seeds)."""
        st = self.state
        if st.mode != "soft":
            return None
        if st.keys_int is None or self.index >= len(st.keys_int):
            raise RuntimeError("MaskState.set_step() must run before a soft forward (noise keys)")
        return st.keys[self.index] if st.compile or kernels else st.keys_int[self.index]

    def _kernels(self, w: torch.Tensor) -> bool:
        return self.state.kernels and mk.supported(w, self.tile)

    def uses_kernels(self) -> bool:
        """Whether this node's soft forward and backward run the mask kernels (the weight [(E*)out, in] the kernels
        would see is checked by shape and dtype only: no copy of a stored-transposed expert weight)."""
        rows = max(self.experts, 1) * self.out_features
        return self._kernels(torch.empty((rows, self.in_features), dtype=self.weight.dtype, device="meta"))

    def _masked_weight(self):
        """(W * M in the stored layout, mean gate, norm) for the weight-only form."""
        st = self.state
        w = self.w2d()
        if st.mode == "off":
            return self.weight, None, None
        if st.mode == "hard":
            wm = hm.apply_hybrid(w, self.hard_bitmap, hm.pattern_to_mask(self.hard_pattern), self.tile)
            return (wm.mT if self.transposed else wm), None, None
        knobs = st.knobs_now(w.device)
        rows = self._rows
        w2 = rows(w)                                   # [out, in], or [E*out, in] (a copy when stored [E, in, out])
        if st.compile:
            wm, gate, norm = hm.soft_masked_weight(w2, rows(self.tile_logits), rows(self.pattern_logits),
                                                   _mask24(rows(self.pattern24)), self.tile, knobs, self._keys(True))
        else:
            kernels = self._kernels(w2)
            wm, gate, norm = MaskedWeight.apply(w2, rows(self.tile_logits), rows(self.pattern_logits),
                                                rows(self.pattern24), knobs, self._keys(kernels), self.tile, kernels)
        wm = wm.reshape(w.shape)                       # [(E,) out, in]
        return (wm.mT if self.transposed else wm), gate, norm

    def forward(self, x: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.fused:
            wm, self.last_gate, self.last_norm = self._masked_weight()
            if self.sharded and self.state.mode == "off":  # the weight itself: FSDP frees it after this forward
                wm = wm.detach().clone()
            return wm
        st = self.state
        if st.mode in ("off", "hard") or st.compile:
            wm, self.last_gate, self.last_norm = self._masked_weight()
            return F.linear(x, wm, bias)
        kernels = self._kernels(self.weight)
        y, self.last_gate, self.last_norm = MaskedLinear.apply(
            x, self.weight, bias, self.tile_logits, self.pattern_logits, self.pattern24, st.knobs_now(x.device),
            self._keys(kernels), self.tile, kernels)
        return y


def _get_attr_value(gm: torch.fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def insert_masks(gm: torch.fx.GraphModule, plan: LinearPlan, nodes: dict[str, MaskNode]) -> torch.fx.GraphModule:
    """Rewire every masked linear of `plan` through its MaskNode; `nodes` maps FQN -> MaskNode. A node is
    given the frozen weight parameter it masks (node.weight); aten.linear sites become fused nodes."""
    root = torch.nn.Module()
    gm.add_module(MASK_ROOT, root)
    by_name = {n.name: n for n in gm.graph.nodes}
    for i, site in enumerate(plan.masked):
        if site.name not in nodes:
            raise KeyError(f"no MaskNode for masked linear {site.name}")
        node = nodes[site.name]
        key = f"m{i}"
        root.add_module(key, node)
        attr, user = by_name[site.weight_node], by_name[site.node]
        if node.weight is None:
            node.weight = _get_attr_value(gm, attr.target)
        if site.op == "experts":  # every use of the 3-D weight reads W * M
            with gm.graph.inserting_after(attr):
                masked = gm.graph.call_module(f"{MASK_ROOT}.{key}", ())
            attr.replace_all_uses_with(masked)
        elif site.op == "linear" and not site.transposed and user.args[1] is attr:
            x = user.args[0]
            bias = user.args[2] if len(user.args) > 2 else user.kwargs.get("bias")
            with gm.graph.inserting_before(user):
                new = gm.graph.call_module(f"{MASK_ROOT}.{key}", (x, bias) if bias is not None else (x,))
            new.meta.update(user.meta)
            user.replace_all_uses_with(new)
            gm.graph.erase_node(user)
            node.fused = True
        else:
            with gm.graph.inserting_after(attr):
                masked = gm.graph.call_module(f"{MASK_ROOT}.{key}", ())
            # Rewire only the path from this parameter to this matmul (directly or through its transpose).
            if attr in user.all_input_nodes:
                user.replace_input_with(attr, masked)
            else:
                for t in user.all_input_nodes:
                    if attr in t.all_input_nodes:
                        t.replace_input_with(attr, masked)
        if not attr.users:
            gm.graph.erase_node(attr)
    gm.graph.lint()
    gm.recompile()
    return gm


def mask_nodes(gm: torch.nn.Module) -> list[MaskNode]:
    """The MaskNodes of a rewritten graph, in insertion (graph) order."""
    return [m for m in gm.modules() if isinstance(m, MaskNode)]
