"""Triton kernels of LeanAdamW's update (patchc/optim.py): one pass over a tensor instead of ~40 torch ops.

`lean_apply` is optim.lean_step with the hash noise of mask.uniform_noise (tensor-key form) computed in
registers: reads the bf16 logit, its gradient and the 2 bytes of state, writes them back. The reference it is
tested against is optim.lean_step itself. `new_vref` is the reduction that precedes it (the largest new v of
the tensor, the reference of the v code). `adamw_update` is plain fp32 AdamW for fp32 parameters.
Every per-step value (learning rate, bias corrections: hp; the noise key: key_ptr) is read from device memory,
so a captured CUDA graph of the update (patchc/step_graph.py) replays with the values the host wrote there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from patchc.mask_kernels import _uniform

BLOCK = 1024


@triton.jit
def _decode_v(code, vref):
    return tl.where(code > 0, tl.exp2((code.to(tl.float32) - 255.0) * 0.25) * vref, 0.0)


@triton.jit
def _hyper(hp_ptr):
    """LeanAdamW's hp tensor: lr, beta1, beta2, eps, weight decay, bias corrections 1 and 2 (r_max follows)."""
    return (tl.load(hp_ptr), tl.load(hp_ptr + 1), tl.load(hp_ptr + 2), tl.load(hp_ptr + 3), tl.load(hp_ptr + 4),
            tl.load(hp_ptr + 5), tl.load(hp_ptr + 6))


@triton.jit
def _vmax_kernel(vq_ptr, g_ptr, vref_ptr, hp_ptr, part_ptr, n, BLOCK: tl.constexpr):
    """Per-program max of b2 * v_old + (1 - b2) * g^2 (every new v of the tensor)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    b2 = tl.load(hp_ptr + 2)
    v_old = _decode_v(tl.load(vq_ptr + offs, mask=ok, other=0), tl.load(vref_ptr))
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(part_ptr + tl.program_id(0), tl.max(tl.where(ok, b2 * v_old + (1.0 - b2) * g * g, 0.0), axis=0))


@triton.jit
def _lean_kernel(p_ptr, g_ptr, r_ptr, vq_ptr, vref_ptr, vref_new_ptr, hp_ptr, key_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    lr, b1, b2, eps, wd, bc1, bc2 = _hyper(hp_ptr)
    r_max = tl.load(hp_ptr + 7)
    vref = tl.load(vref_ptr)
    vref_new = tl.load(vref_new_ptr)
    key = tl.load(key_ptr)                       # int64 noise key of this tensor and step
    u0 = _uniform(offs, key)                     # streams 0, 1, 2 of uniform_noise(key, (3, n))
    u1 = _uniform(offs + n, key)
    u2 = _uniform(offs + 2 * n, key)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    v_old = _decode_v(tl.load(vq_ptr + offs, mask=ok, other=0), vref)
    m_old = tl.load(r_ptr + offs, mask=ok, other=0).to(tl.float32) * (r_max / 127.0) * tl.sqrt(v_old)
    m = b1 * m_old + (1.0 - b1) * g
    v = b2 * v_old + (1.0 - b2) * g * g
    # encode_v(v, vref_new, u0): quarter octaves below vref_new, rounded without bias; 0 = zero
    t = tl.log2(tl.maximum(v / vref_new, 1e-30)) * 4.0
    lo = tl.floor(t)
    v_lo = tl.exp2(lo * 0.25) * vref_new
    v_hi = v_lo * 1.189207115002721                                  # 2 ** (1 / 4)
    code = 255.0 + lo + (u0 < (v - v_lo) / (v_hi - v_lo)).to(tl.float32)
    floor_v = vref_new * 8.636168555094445e-20                       # 2 ** (-254 / 4)
    code = tl.where(code >= 1.0, code, tl.where(u0 < v / floor_v, 1.0, 0.0))
    code = tl.minimum(tl.maximum(code, 0.0), 255.0)
    v_kept = _decode_v(code, vref_new)
    x = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32) * (1.0 - lr * wd)
    x = x - lr * (m / bc1) / (tl.sqrt(v_kept / bc2) + eps)
    ratio = tl.where(v_kept > 0, m / tl.sqrt(v_kept), 0.0) * (127.0 / r_max)
    ratio = tl.minimum(tl.maximum(ratio, -127.0), 127.0)
    r_new = tl.minimum(tl.maximum(tl.floor(ratio + u1), -127.0), 127.0)
    # stochastic rounding to bf16 (optim._stochastic_round_bf16 without bit casts): a = x truncated to bf16,
    # b = the next bf16 away from zero (a * (1 + 2**-7) is exact in fp32 and truncates to it); b is taken when
    # u >= 1 - (x - a) / (b - a), the torch reference's "16 random low bits carry into bit 16"
    a = x.to(tl.bfloat16, fp_downcast_rounding="rtz").to(tl.float32)
    b = (a * 1.0078125).to(tl.bfloat16, fp_downcast_rounding="rtz").to(tl.float32)
    frac = tl.where(b != a, (x - a) / (b - a), 0.0)
    tl.store(p_ptr + offs, tl.where(u2 >= 1.0 - frac, b, a).to(tl.bfloat16), mask=ok)
    tl.store(r_ptr + offs, r_new.to(tl.int8), mask=ok)
    tl.store(vq_ptr + offs, code.to(tl.uint8), mask=ok)


@triton.jit
def _adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, hp_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    lr, b1, b2, eps, wd, bc1, bc2 = _hyper(hp_ptr)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    m = b1 * tl.load(m_ptr + offs, mask=ok, other=0.0) + (1.0 - b1) * g
    v = b2 * tl.load(v_ptr + offs, mask=ok, other=0.0) + (1.0 - b2) * g * g
    p = tl.load(p_ptr + offs, mask=ok, other=0.0).to(tl.float32) * (1.0 - lr * wd)
    p = p - lr * (m / bc1) / (tl.sqrt(v / bc2) + eps)
    tl.store(m_ptr + offs, m, mask=ok)
    tl.store(v_ptr + offs, v, mask=ok)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=ok)


def supported(*tensors: torch.Tensor) -> bool:
    """Contiguous tensors of fewer than 2**32 / 3 elements (the hash index of the third noise stream)."""
    return all(t.is_contiguous() for t in tensors) and tensors[0].numel() * 3 < 2 ** 32


def new_vref(vq: torch.Tensor, g: torch.Tensor, vref: torch.Tensor, hp: torch.Tensor) -> torch.Tensor:
    """The largest new second moment b2 * v_old + (1 - b2) * g^2 of the tensor (0-d float32)."""
    n = vq.numel()
    grid = (triton.cdiv(n, BLOCK),)
    part = torch.empty(grid[0], device=vq.device, dtype=torch.float32)
    _vmax_kernel[grid](vq, g, vref, hp, part, n, BLOCK=BLOCK)
    return part.max()


def lean_apply(p: torch.Tensor, g: torch.Tensor, r: torch.Tensor, vq: torch.Tensor, vref: torch.Tensor,
               vref_new: torch.Tensor, hp: torch.Tensor, key: torch.Tensor) -> None:
    """In place: p (bf16), r (int8), vq (uint8) one LeanAdamW step further, as optim.lean_step computes them
    (hp: its float32 hyper-parameter tensor; key: the noise key, a 0-d int64 tensor on p's device, read by the
    kernel; vref / vref_new: 0-d float32)."""
    if key.dtype != torch.int64 or key.numel() != 1 or key.device != p.device:
        raise ValueError(f"the noise key must be one int64 on {p.device}, got {tuple(key.shape)} {key.dtype} "
                         f"on {key.device}")
    n = p.numel()
    _lean_kernel[(triton.cdiv(n, BLOCK),)](p, g, r, vq, vref, vref_new, hp, key, n, BLOCK=BLOCK)


def adamw_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, hp: torch.Tensor) -> None:
    """In place: plain AdamW on an fp32 parameter (fp32 moments); hp = [lr, beta1, beta2, eps, weight_decay,
    bias_correction1, bias_correction2, ...] float32 on p's device (LeanAdamW's hyper-parameter tensor)."""
    n = p.numel()
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](p, g, m, v, hp, n, BLOCK=BLOCK)
