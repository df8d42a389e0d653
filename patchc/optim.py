"""LeanAdamW: AdamW for mask logits in 4 bytes per logit (logit + both moments), instead of 12.

A joint-mode layer has 6 pattern logits per group of 4 weights (1.5 per weight): with fp32 logits and
fp32 Adam moments that is 18 bytes of training state per masked weight. LeanAdamW keeps, per logit:

  logit  bf16, updated with stochastic rounding (unbiased: small late-schedule steps are not lost)
  r      int8, the normalised first moment m / sqrt(v) on a fixed grid over [-R, R]
  vq     uint8, the second moment v as a code on a log2 grid (quarter octaves) below a per-tensor
         reference vref (the tensor's largest v); code 0 is v = 0

= 4 bytes per logit = 6 bytes per masked weight. Why r instead of m: with b1^2 < b2, Cauchy-Schwarz bounds
|m| / sqrt(v) <= R = (1 - b1) / sqrt((1 - b2) (1 - b1^2 / b2)) (1.17 for b1 0.9, b2 0.95), so r needs no
scale of its own; its rounding error is an absolute error of at most R / 127 in the step lr * r, never a
relative one. Both codes are rounded stochastically (unbiased in v and in r), with noise from the same
stateless hash as the masks (patchc.mask.uniform_noise), so a run is reproducible and resumable.
Parameters that are not bf16 (the tile logits, a few per 128x128 weights) keep ordinary fp32 AdamW state.

The state is plain tensors (saved as safetensors by the trainer) and works on FSDP2 DTensor parameters:
codes are computed on the local shard; vref is the max over the whole tensor (one all-reduce when sharded).
"""
from __future__ import annotations

import math

import torch

from patchc import mask_kernels
from patchc import optim_kernels as ok
from patchc.mask import noise_key, uniform_noise
from patchc.models import on_device

V_STEPS_PER_OCTAVE = 4   # vq code resolution: quarter octaves (19% in v, 9% in sqrt(v); rounded without bias)
R_LEVELS = 127           # int8 grid for r over [-r_max, r_max]


def r_bound(beta1: float, beta2: float) -> float:
    """Largest |m| / sqrt(v) Adam's moments can reach (Cauchy-Schwarz; needs beta1^2 < beta2)."""
    if not beta1 * beta1 < beta2:
        raise ValueError(f"LeanAdamW needs beta1^2 < beta2 (got {beta1}, {beta2})")
    return (1 - beta1) / math.sqrt((1 - beta2) * (1 - beta1 * beta1 / beta2))


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _stochastic_round_bf16(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 rounded up or down with probability proportional to the distance (unbiased)."""
    bits = x.contiguous().view(torch.int32)
    noise = (u * 65536.0).to(torch.int32)                                  # uniform in [0, 2**16)
    bits = (bits + noise) & -65536                                         # keep the top 16 bits
    return bits.view(torch.float32).to(torch.bfloat16)


def encode_v(v: torch.Tensor, vref: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """v >= 0 -> uint8 code: 255 + k / V_STEPS_PER_OCTAVE octaves below vref, rounded without bias; 0 = zero."""
    s = V_STEPS_PER_OCTAVE
    t = torch.log2(torch.clamp(v / vref, min=1e-30)) * s                   # <= 0
    lo = torch.floor(t)
    v_lo = torch.exp2(lo / s) * vref
    v_hi = v_lo * (2.0 ** (1.0 / s))
    up = (u < (v - v_lo) / (v_hi - v_lo)).to(lo.dtype)
    code = 255.0 + lo + up
    # below the grid: round to the lowest code or to zero, unbiased as well
    floor_v = vref * 2.0 ** (-254.0 / s)
    code = torch.where(code >= 1.0, code, torch.where(u < v / floor_v, 1.0, 0.0))
    return code.clamp(0, 255).to(torch.uint8)


def decode_v(code: torch.Tensor, vref: torch.Tensor) -> torch.Tensor:
    c = code.float()
    return torch.where(c > 0, torch.exp2((c - 255.0) / V_STEPS_PER_OCTAVE) * vref, 0.0)


def lean_step(p: torch.Tensor, g: torch.Tensor, r: torch.Tensor, vq: torch.Tensor, vref: torch.Tensor,
              vref_new: torch.Tensor, key: torch.Tensor, hp: torch.Tensor):
    """One AdamW step on a bf16 tensor with lean state; returns (p, r, vq) new values.
    hp = [lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2, r_max] (float32 tensor);
    key: the noise key of the three stochastic roundings (an int in eager code, a 0-d int64 tensor compiled)."""
    lr, b1, b2, eps, wd, bc1, bc2, r_max = (hp[i] for i in range(8))
    u = uniform_noise(key, (3, *p.shape), p.device)
    g = g.float()
    v_old = decode_v(vq, vref)
    m_old = r.float() * (r_max / R_LEVELS) * torch.sqrt(v_old)
    m = b1 * m_old + (1 - b1) * g
    v = b2 * v_old + (1 - b2) * g * g
    vq_new = encode_v(v, vref_new, u[0])
    v_kept = decode_v(vq_new, vref_new)
    x = p.float() * (1 - lr * wd)
    x = x - lr * (m / bc1) / (torch.sqrt(v_kept / bc2) + eps)
    ratio = torch.where(v_kept > 0, m / torch.sqrt(v_kept), 0.0) * (R_LEVELS / r_max)
    ratio = ratio.clamp(-R_LEVELS, R_LEVELS)
    r_new = torch.floor(ratio + u[1]).clamp(-R_LEVELS, R_LEVELS).to(torch.int8)
    return _stochastic_round_bf16(x, u[2]), r_new, vq_new


class LeanAdamW(torch.optim.Optimizer):
    """AdamW whose state for bf16 parameters is 2 bytes (int8 r + uint8 vq) per element; see the module doc.

    seed: the stochastic roundings draw stateless noise from (seed, step, parameter index).
    compile: run the bf16 update through torch.compile (CUDA: one fused kernel per tensor shape).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 seed: int = 0, compile: bool = False):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        r_bound(*betas)
        self.seed = seed
        self._index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        self._step_fn = torch.compile(lean_step, dynamic=False) if compile else lean_step
        self._compiled = compile
        self._per_step: dict[int, tuple] = {}   # id(group) -> ((step, lr, device), hp, keys, keys as ints)

    def _step_tensors(self, t: int, group: dict, device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(hyper-parameters hp [8] float32, noise keys of every parameter [n] int64, the same keys as ints) of step
        t. hp and keys are persistent device tensors of the group, written IN PLACE (one copy each) when the step or
        the lr changes: the kernels read them from memory, so a captured CUDA graph of the update replays with this
        step's values. The ints seed the torch path's Philox noise (eager, no kernels)."""
        b1, b2 = group["betas"]
        want = (t, group["lr"], str(device))
        have = self._per_step.get(id(group))
        if have is not None and have[0] == want:
            return have[1:]
        hp = [group["lr"], b1, b2, group["eps"], group["weight_decay"], 1 - b1 ** t, 1 - b2 ** t, r_bound(b1, b2)]
        keys = [noise_key(self.seed, t, i, 7) for i in range(len(self._index))]
        if have is None or not on_device(have[1], device):
            have = (None, torch.empty(8, dtype=torch.float32, device=device),
                    torch.empty(len(keys), dtype=torch.int64, device=device))
        hp_t, keys_t = have[1], have[2]
        hp_t.copy_(torch.tensor(hp, dtype=torch.float32))
        keys_t.copy_(torch.tensor(keys, dtype=torch.int64))
        self._per_step[id(group)] = (want, hp_t, keys_t, keys)
        return hp_t, keys_t, keys

    @staticmethod
    def state_bytes_per_element(p: torch.Tensor) -> int:
        """Bytes of parameter + optimizer state per element (bf16: 2 + 1 + 1; fp32: 4 + 4 + 4)."""
        return 4 if p.dtype == torch.bfloat16 else 12

    def _init_state(self, p: torch.Tensor) -> dict:
        lp = _local(p)
        if p.dtype == torch.bfloat16:
            return {"step": torch.zeros((), dtype=torch.int64), "r": torch.zeros_like(lp, dtype=torch.int8),
                    "vq": torch.zeros_like(lp, dtype=torch.uint8),
                    "vref": torch.zeros((), dtype=torch.float32, device=lp.device)}
        return {"step": torch.zeros((), dtype=torch.int64), "m": torch.zeros_like(lp, dtype=torch.float32),
                "v": torch.zeros_like(lp, dtype=torch.float32)}

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict) -> None:
        """Update one parameter from its .grad (also usable from a post-accumulate-grad hook)."""
        if p.grad is None:
            return
        self._update(p, group, self._advance(p, group))

    def _advance(self, p: torch.Tensor, group: dict) -> int:
        """The host half of a parameter's step: its state (made on the first step), its step count + 1, and the
        group's hp / keys tensors filled for that step. Returns the step number."""
        state = self.state[p]
        if not state:
            state.update(self._init_state(p))
        state["step"] += 1
        t = int(state["step"])
        self._step_tensors(t, group, _local(p).device)
        return t

    def _update(self, p: torch.Tensor, group: dict, t: int) -> None:
        """The device half: p and its state one step further from p.grad. On the kernel path no host value of the
        step reaches the device except through the tensors _advance filled (what a CUDA graph can capture)."""
        state = self.state[p]
        lp, g = _local(p), _local(p.grad)
        hp, keys, keys_int = self._step_tensors(t, group, lp.device)
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if p.dtype != torch.bfloat16:
            m, v = state["m"], state["v"]
            if self._kernels_for(lp, g, m, v):
                ok.adamw_update(lp, g, m, v, hp)
                return
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            m.mul_(b1).add_(g.float(), alpha=1 - b1)
            v.mul_(b2).addcmul_(g.float(), g.float(), value=1 - b2)
            lp.mul_(1 - lr * wd).addcdiv_(m / bc1, (v / bc2).sqrt_().add_(eps), value=-lr)
            return
        vref = state["vref"]
        i = self._index[id(p)]
        kernels = self._kernels_for(lp, g, state["r"], state["vq"])
        if not lp.numel():
            vref_new = vref * 0
        elif kernels:
            vref_new = ok.new_vref(state["vq"], g, vref, hp)
        else:                                  # the largest new v of the tensor
            vref_new = (b2 * decode_v(state["vq"], vref) + (1 - b2) * g.float().square()).max()
        vref_new = torch.maximum(vref_new, vref * b2)      # the reference decays no faster than v itself
        if hasattr(p, "device_mesh"):  # FSDP2 shard: one reference for the whole tensor
            import torch.distributed as dist

            dist.all_reduce(vref_new, op=dist.ReduceOp.MAX, group=p.device_mesh.get_group())
        vref_new = torch.clamp(vref_new, min=1e-30)
        if kernels:
            ok.lean_apply(lp, g, state["r"], state["vq"], vref, vref_new, hp, keys[i])
        else:   # compiled: the hash noise of a 0-d key tensor; eager torch ops: Philox seeded by the int
            key = keys[i] if self._compiled else keys_int[i]
            new_p, new_r, new_vq = self._step_fn(lp, g, state["r"], state["vq"], vref, vref_new, key, hp)
            lp.copy_(new_p)
            state["r"].copy_(new_r)
            state["vq"].copy_(new_vq)
        vref.copy_(vref_new)

    def _kernels_for(self, *tensors: torch.Tensor) -> bool:
        """Whether this update runs as a Triton kernel (optim_kernels): CUDA tensors (or the interpreter with
        PATCHC_KERNELS_ON_CPU=1), PATCHC_MASK_KERNELS on, not compiled."""
        return not self._compiled and mask_kernels.enabled(tensors[0].device) and ok.supported(*tensors)

    def kernels_only(self) -> str | None:
        """None when every parameter's update runs as a Triton kernel reading its step values from device tensors
        (what a CUDA graph of finish_step() needs), else why not (the first parameter that would not)."""
        for group in self.param_groups:
            for p in group["params"]:
                lp = _local(p)
                if self._compiled or not mask_kernels.enabled(lp.device):
                    return "the optimizer update runs through torch ops (compiled, or PATCHC_MASK_KERNELS=0)"
                if not (lp.is_contiguous() and ok.supported(lp)):
                    return f"a logit tensor {tuple(lp.shape)} is not supported by the optimizer kernels"
                if hasattr(p, "device_mesh"):
                    return "sharded (FSDP2) parameters all-reduce in the update"
        return None

    @torch.no_grad()
    def begin_step(self) -> list[tuple[torch.Tensor, dict, int]]:
        """The host half of step(): for every parameter with a gradient, its state (first step), step count + 1
        and the group's hp / keys filled in place. Returns (parameter, group, step) of each, for finish_step()."""
        return [(p, group, self._advance(p, group)) for group in self.param_groups for p in group["params"]
                if p.grad is not None]

    @torch.no_grad()
    def finish_step(self, todo: list[tuple[torch.Tensor, dict, int]]) -> None:
        """The device half of step(): the updates of begin_step()'s parameters. With every update on the kernels
        (kernels_only() None) it only launches kernels reading device tensors: a CUDA graph captures it and its
        replays update with the step values begin_step() wrote (the step numbers given here are then unused)."""
        for p, group, t in todo:
            self._update(p, group, t)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.finish_step(self.begin_step())
        return loss

    def step_in_backward(self) -> list:
        """Update each parameter as soon as backward has accumulated its gradient, then free the gradient (so
        gradients never all exist at once; the same result as step() after backward). Returns the hook handles;
        remove them to go back to step()."""
        handles = []
        for group in self.param_groups:
            for p in group["params"]:
                def hook(param, _group=group):
                    self.step_param(param, _group)
                    param.grad = None
                handles.append(p.register_post_accumulate_grad_hook(hook))
        return handles
