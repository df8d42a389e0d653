"""Triton kernels of the training-time hybrid mask: W * M formed from the logits, and the logit gradients, in one
pass over the weight each. No weight-sized soft mask, noise or softmax tensor ever exists in memory.

They compute patchc.mask.soft_masked_weight with its integer-hash noise (the tensor-key form of
mask.uniform_noise), the reference they are tested against:

  gate  = sigmoid((l_tile * s_tile + logistic noise) / tau)                  [R, C]      _gate_kernel
  p     = softmax((l_24 * s_24 + Gumbel noise) / tau)                          [out, in/4, 6]
  m24_j = sum of p over the patterns keeping position j                       [out, in]   (joint; tile: fixed 0/1)
  WM    = W * (g + (1 - g) * m24)       in W's dtype; ||W * M||_F from fp32   [out, in]   _forward_kernel
and, given dWM = dy.T @ x and the regularisers' output gradients,
  dM    = (dWM + d_norm / ||WM|| * WM) * W
  dgate = per-tile sum of dM * (1 - m24)        dl_24 = softmax backward of (dM * (1 - g)) @ PATTERNS.T
                                                                              _backward_kernel (also writes WM again)
Every program covers a [BR rows, 4 * BG columns] block inside one tile, so per-tile sums are a partial per
program, summed in a fixed order afterwards (deterministic, no atomics).
The noise keys and the knobs are read from device memory (key_ptr: the node's [2] int64 keys, tile stream then
2:4 stream; knobs_ptr: [scale_tile, scale_24, tau]), never passed as Python values: a captured CUDA graph
(patchc/step_graph.py) replays the kernels with the keys and knobs that the host writes into those tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from patchc import mask as hm
from patchc.config import settings

# The 2:4 patterns (mask.PATTERNS) as the kernels write them out: pattern k keeps positions
#   0: {0, 1}  1: {0, 2}  2: {0, 3}  3: {1, 2}  4: {1, 3}  5: {2, 3}
assert hm.PATTERNS.tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]


@triton.jit
def _mix32(x):
    """mask._mix32 on uint32 (multiplication wraps mod 2**32, shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    x = x ^ (x >> 16)
    x = x * 0x297A2D39
    return x ^ (x >> 15)


@triton.jit
def _uniform(idx, key):
    """mask.uniform_noise with a tensor key: element idx of the stream `key` -> float32 in (0, 1)."""
    h = _mix32(_mix32(idx.to(tl.uint32)) ^ key.to(tl.uint32))
    return ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def _gate_kernel(logit_ptr, gate_ptr, n, knobs_ptr, key_ptr, NOISE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    z = tl.load(logit_ptr + offs, mask=ok, other=0.0).to(tl.float32) * tl.load(knobs_ptr)
    if NOISE:
        u = _uniform(offs, tl.load(key_ptr))                   # the tile stream: keys[0]
        z = z + tl.log(u) - tl.log(1.0 - u)
    g = 1.0 / (1.0 + tl.exp(-z / tl.load(knobs_ptr + 2)))
    tl.store(gate_ptr + offs, g, mask=ok)


@triton.jit
def _soft24(logit_ptr, grp, knobs_ptr, key_ptr, NOISE: tl.constexpr):
    """The six pattern probabilities of the groups `grp` (flat group indices)."""
    scale = tl.load(knobs_ptr + 1)
    inv_tau = 1.0 / tl.load(knobs_ptr + 2)
    base = grp * 6
    z0 = tl.load(logit_ptr + base).to(tl.float32) * scale
    z1 = tl.load(logit_ptr + base + 1).to(tl.float32) * scale
    z2 = tl.load(logit_ptr + base + 2).to(tl.float32) * scale
    z3 = tl.load(logit_ptr + base + 3).to(tl.float32) * scale
    z4 = tl.load(logit_ptr + base + 4).to(tl.float32) * scale
    z5 = tl.load(logit_ptr + base + 5).to(tl.float32) * scale
    if NOISE:
        key = tl.load(key_ptr + 1)                              # the 2:4 stream: keys[1]
        z0 -= tl.log(-tl.log(_uniform(base, key)))
        z1 -= tl.log(-tl.log(_uniform(base + 1, key)))
        z2 -= tl.log(-tl.log(_uniform(base + 2, key)))
        z3 -= tl.log(-tl.log(_uniform(base + 3, key)))
        z4 -= tl.log(-tl.log(_uniform(base + 4, key)))
        z5 -= tl.log(-tl.log(_uniform(base + 5, key)))
    top = tl.maximum(tl.maximum(tl.maximum(z0, z1), tl.maximum(z2, z3)), tl.maximum(z4, z5))
    e0 = tl.exp((z0 - top) * inv_tau)
    e1 = tl.exp((z1 - top) * inv_tau)
    e2 = tl.exp((z2 - top) * inv_tau)
    e3 = tl.exp((z3 - top) * inv_tau)
    e4 = tl.exp((z4 - top) * inv_tau)
    e5 = tl.exp((z5 - top) * inv_tau)
    inv = 1.0 / (e0 + e1 + e2 + e3 + e4 + e5)
    return e0 * inv, e1 * inv, e2 * inv, e3 * inv, e4 * inv, e5 * inv


@triton.jit
def _fixed24(pat_ptr, grp):
    """The fixed 2:4 mask (PATCH-Tile) of the groups `grp`, one 0/1 float per position."""
    k = tl.load(pat_ptr + grp).to(tl.int32)
    m0 = (k <= 2).to(tl.float32)
    m1 = ((k == 0) | (k == 3) | (k == 4)).to(tl.float32)
    m2 = ((k == 1) | (k == 3) | (k == 5)).to(tl.float32)
    m3 = ((k == 2) | (k == 4) | (k == 5)).to(tl.float32)
    return m0, m1, m2, m3


@triton.jit
def _relaxed24(logit_ptr, pat_ptr, grp, knobs_ptr, key_ptr, JOINT: tl.constexpr, NOISE: tl.constexpr):
    """(p0..p5, m0..m3) of the groups `grp`: joint, the pattern probabilities and the soft 2:4 mask; tile, the
    fixed mask (p all zero, unused)."""
    if JOINT:
        p0, p1, p2, p3, p4, p5 = _soft24(logit_ptr, grp, knobs_ptr, key_ptr, NOISE)
        m0, m1, m2, m3 = p0 + p1 + p2, p0 + p3 + p4, p1 + p3 + p5, p2 + p4 + p5
    else:
        m0, m1, m2, m3 = _fixed24(pat_ptr, grp)
        p0 = tl.zeros_like(m0)
        p1 = p0
        p2 = p0
        p3 = p0
        p4 = p0
        p5 = p0
    return p0, p1, p2, p3, p4, p5, m0, m1, m2, m3


@triton.jit
def _masked_block(w_ptr, s_wo, s_wi, gate_ptr, C, logit_ptr, pat_ptr, knobs_ptr, key_ptr, wm_ptr, G,
                  T: tl.constexpr, JOINT: tl.constexpr, NOISE: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
    """This program's [BR rows, 4 * BG columns] block (inside one tile): W * M computed and stored into wm_ptr.
    Returns the flat group indices, the tile gate, the mask pieces, W and W * M (float32, one tensor a position)."""
    pid_r, pid_g = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BR + tl.arange(0, BR)                       # [BR]
    cols = pid_g * BG + tl.arange(0, BG)                       # [BG] group index inside the row
    grp = rows[:, None] * G + cols[None, :]                    # [BR, BG] flat group index
    g = tl.load(gate_ptr + ((pid_r * BR) // T) * C + (pid_g * BG * 4) // T)
    p0, p1, p2, p3, p4, p5, m0, m1, m2, m3 = _relaxed24(logit_ptr, pat_ptr, grp, knobs_ptr, key_ptr, JOINT, NOISE)
    w_at = w_ptr + rows[:, None] * s_wo + (cols[None, :] * 4) * s_wi
    o_at = wm_ptr + grp * 4
    w0 = tl.load(w_at).to(tl.float32)
    w1 = tl.load(w_at + s_wi).to(tl.float32)
    w2 = tl.load(w_at + 2 * s_wi).to(tl.float32)
    w3 = tl.load(w_at + 3 * s_wi).to(tl.float32)
    x0 = w0 * (g + (1.0 - g) * m0)
    x1 = w1 * (g + (1.0 - g) * m1)
    x2 = w2 * (g + (1.0 - g) * m2)
    x3 = w3 * (g + (1.0 - g) * m3)
    tl.store(o_at, x0.to(wm_ptr.dtype.element_ty))
    tl.store(o_at + 1, x1.to(wm_ptr.dtype.element_ty))
    tl.store(o_at + 2, x2.to(wm_ptr.dtype.element_ty))
    tl.store(o_at + 3, x3.to(wm_ptr.dtype.element_ty))
    return grp, g, p0, p1, p2, p3, p4, p5, m0, m1, m2, m3, w0, w1, w2, w3, x0, x1, x2, x3


@triton.jit
def _forward_kernel(w_ptr, s_wo, s_wi, gate_ptr, C, logit_ptr, pat_ptr, knobs_ptr, key_ptr, wm_ptr, part_ptr, G,
                    T: tl.constexpr, JOINT: tl.constexpr, NOISE: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
    grp, g, p0, p1, p2, p3, p4, p5, m0, m1, m2, m3, w0, w1, w2, w3, x0, x1, x2, x3 = _masked_block(
        w_ptr, s_wo, s_wi, gate_ptr, C, logit_ptr, pat_ptr, knobs_ptr, key_ptr, wm_ptr, G, T, JOINT, NOISE, BR, BG)
    sq = tl.sum(tl.sum(x0 * x0 + x1 * x1 + x2 * x2 + x3 * x3, axis=1), axis=0)
    tl.store(part_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), sq)


@triton.jit
def _backward_kernel(w_ptr, s_wo, s_wi, gate_ptr, C, logit_ptr, pat_ptr, knobs_ptr, key_ptr, dwm_ptr, cnorm_ptr,
                     wm_ptr, dlogit_ptr, part_ptr, G,
                     T: tl.constexpr, JOINT: tl.constexpr, NOISE: tl.constexpr, BR: tl.constexpr, BG: tl.constexpr):
    grp, g, p0, p1, p2, p3, p4, p5, m0, m1, m2, m3, w0, w1, w2, w3, x0, x1, x2, x3 = _masked_block(
        w_ptr, s_wo, s_wi, gate_ptr, C, logit_ptr, pat_ptr, knobs_ptr, key_ptr, wm_ptr, G, T, JOINT, NOISE, BR, BG)
    c = tl.load(cnorm_ptr)                                      # d_norm / ||W * M||
    d_at = dwm_ptr + grp * 4
    d0 = (tl.load(d_at).to(tl.float32) + c * x0) * w0           # dL/dM per position
    d1 = (tl.load(d_at + 1).to(tl.float32) + c * x1) * w1
    d2 = (tl.load(d_at + 2).to(tl.float32) + c * x2) * w2
    d3 = (tl.load(d_at + 3).to(tl.float32) + c * x3) * w3
    dg = d0 * (1.0 - m0) + d1 * (1.0 - m1) + d2 * (1.0 - m2) + d3 * (1.0 - m3)
    tl.store(part_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(dg, axis=1), axis=0))
    if JOINT:
        keep = 1.0 - g                                          # dL/dm24 = dL/dM * (1 - g)
        q0 = (d0 + d1) * keep                                   # dL/dp_k: sum over the positions pattern k keeps
        q1 = (d0 + d2) * keep
        q2 = (d0 + d3) * keep
        q3 = (d1 + d2) * keep
        q4 = (d1 + d3) * keep
        q5 = (d2 + d3) * keep
        s = p0 * q0 + p1 * q1 + p2 * q2 + p3 * q3 + p4 * q4 + p5 * q5
        f = tl.load(knobs_ptr + 1) / tl.load(knobs_ptr + 2)    # d(z / tau) / d logit = scale / tau
        out = dlogit_ptr + grp * 6
        ty = dlogit_ptr.dtype.element_ty
        tl.store(out, (p0 * (q0 - s) * f).to(ty))
        tl.store(out + 1, (p1 * (q1 - s) * f).to(ty))
        tl.store(out + 2, (p2 * (q2 - s) * f).to(ty))
        tl.store(out + 3, (p3 * (q3 - s) * f).to(ty))
        tl.store(out + 4, (p4 * (q4 - s) * f).to(ty))
        tl.store(out + 5, (p5 * (q5 - s) * f).to(ty))


def _pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _blocks(tile: int) -> tuple[int, int]:
    """(rows, groups) of a program: powers of two dividing the tile, so a program never straddles two tiles."""
    return _pow2_divisor(tile, 16), _pow2_divisor(tile // 4, 32)


def enabled(device) -> bool:
    """Whether mask learning runs these kernels (and patchc.optim_kernels) on `device`: CUDA, or the CPU under
    Triton's interpreter with PATCHC_KERNELS_ON_CPU=1; PATCHC_MASK_KERNELS=0 turns them off."""
    s = settings()
    return s.mask_kernels and (torch.device(device).type == "cuda" or s.kernels_on_cpu)


def supported(w: torch.Tensor, tile: int) -> bool:
    """Whether the kernels handle this weight: [out, in] tileable, hash indices within 32 bits."""
    out_f, in_f = w.shape
    return (hm.check_tileable(out_f, in_f, tile) is None and out_f * in_f // 4 * 6 < 2 ** 32
            and w.dtype in (torch.float32, torch.float16, torch.bfloat16))


def _keys_ptr(keys: torch.Tensor | None, knobs: torch.Tensor) -> torch.Tensor:
    """The key_ptr argument: the node's [2] int64 keys (tile stream, 2:4 stream) on the kernel's device, or, without
    noise (NOISE=False, never read), any tensor of the device (the knobs)."""
    if keys is None:
        return knobs
    if keys.dtype != torch.int64 or keys.shape != (2,) or keys.device != knobs.device or not keys.is_contiguous():
        raise ValueError(f"noise keys must be a contiguous [2] int64 tensor on {knobs.device}, got "
                         f"{tuple(keys.shape)} {keys.dtype} on {keys.device}")
    return keys


def soft_gate(tile_logits: torch.Tensor, knobs: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
    """Dense-tile probabilities [R, C] (float32) of mask.soft_dense_tile, hash noise keyed by keys[0] (read on the
    device; keys [2] int64, or None: no noise)."""
    logits = tile_logits.detach().contiguous()
    gate = torch.empty(logits.shape, device=logits.device, dtype=torch.float32)
    n = gate.numel()
    _gate_kernel[(triton.cdiv(n, 256),)](logits, gate, n, knobs, _keys_ptr(keys, knobs), NOISE=keys is not None,
                                         BLOCK=256)
    return gate


def _launch(w: torch.Tensor, pattern_logits: torch.Tensor | None, pattern: torch.Tensor | None, tile: int, keys):
    """What both mask kernels are launched with: (grid, W * M output [out, in], per-program partials, the logits
    and pattern pointers (the unused one stands in as W * M), the constexpr arguments)."""
    out_f, in_f = w.shape
    br, bg = _blocks(tile)
    grid = (out_f // br, in_f // 4 // bg)
    wm = torch.empty((out_f, in_f), device=w.device, dtype=w.dtype)
    part = torch.empty(grid, device=w.device, dtype=torch.float32)
    joint = pattern_logits is not None
    logits = pattern_logits.detach().contiguous() if joint else wm
    pat = pattern.contiguous() if not joint else wm
    return grid, wm, part, logits, pat, dict(T=tile, JOINT=joint, NOISE=keys is not None, BR=br, BG=bg)


def masked_weight_forward(w: torch.Tensor, gate: torch.Tensor, pattern_logits: torch.Tensor | None,
                          pattern: torch.Tensor | None, tile: int, knobs: torch.Tensor, keys):
    """(W * M [out, in] in w's dtype, ||W * M||_F float32 0-d). w [out, in] (any strides); gate from soft_gate;
    pattern_logits [out, in/4, 6] (joint) or the fixed pattern [out, in/4] uint8 (tile); keys: the node's [2] int64
    noise keys on w's device (read there by the kernels), or None: no noise."""
    grid, wm, part, logits, pat, meta = _launch(w, pattern_logits, pattern, tile, keys)
    _forward_kernel[grid](w, w.stride(0), w.stride(1), gate, gate.shape[1], logits, pat, knobs, _keys_ptr(keys, knobs),
                          wm, part, w.shape[1] // 4, **meta)
    return wm, part.sum().sqrt()


def masked_weight_backward(w: torch.Tensor, gate: torch.Tensor, pattern_logits: torch.Tensor | None,
                           pattern: torch.Tensor | None, tile: int, knobs: torch.Tensor, keys, dwm: torch.Tensor,
                           norm: torch.Tensor, d_norm: torch.Tensor | None, d_gate_mean: torch.Tensor | None):
    """(W * M again, d tile_logits [R, C] float32, d pattern_logits in their dtype or None) given dwm = dL/d(W * M)
    [out, in] and the gradients of the outputs ||W * M||_F and mean(gate)."""
    grid, wm, part, logits, pat, meta = _launch(w, pattern_logits, pattern, tile, keys)
    joint = meta["JOINT"]
    dlogits = torch.empty_like(logits) if joint else part
    if d_norm is None:
        cnorm = torch.zeros(1, device=w.device)
    else:
        cnorm = (d_norm.float() / norm.clamp_min(1e-30)).reshape(1)     # d_norm / ||W * M||
    _backward_kernel[grid](w, w.stride(0), w.stride(1), gate, gate.shape[1], logits, pat, knobs,
                           _keys_ptr(keys, knobs), dwm.contiguous(), cnorm, wm, dlogits, part, w.shape[1] // 4, **meta)
    r, c = gate.shape
    dgate = part.reshape(r, tile // meta["BR"], c, tile // 4 // meta["BG"]).sum((1, 3))   # [R, C] per-tile sums
    if d_gate_mean is not None:
        dgate = dgate + d_gate_mean.float() / gate.numel()
    d_tile = dgate * gate * (1.0 - gate) * (knobs[0] / knobs[2])                  # sigmoid backward
    return wm, d_tile, (dlogits if joint else None)
