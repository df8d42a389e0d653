"""One-shot pruning on calibration activations: 2:4 patterns (magnitude, Wanda, SparseGPT) and the
PATCH tile prior (unstructured Wanda reference -> kept fraction per tile -> top tiles per layer).

Statistics come from one pass of the dense model over the calibration batches (every layer sees the
dense model's activations). Weights are never modified: SparseGPT is used for its Hessian-aware mask
selection; its weight update is applied to a scratch copy only, as the algorithm needs it to choose
later columns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from patchc import mask as hm

ONESHOT_METHODS = ("magnitude", "wanda", "sparsegpt")


@dataclass
class InputStats:
    sq_norm: torch.Tensor            # [in] sum over tokens of x_j^2
    hessian: torch.Tensor | None     # [in, in] sum over tokens of x x^T (SparseGPT)
    tokens: int


def weight_2d(model: torch.nn.Module, name: str, transposed: bool) -> torch.Tensor:
    """The [out, in] view of a linear's weight parameter (Conv1D weights are stored [in, out]); the
    [E, out, in] view of a fused MoE expert weight (stored [E, out, in], or [E, in, out] when transposed)."""
    w = model.get_parameter(name)
    return w.mT if transposed else w


@torch.no_grad()
def collect_input_stats(model: torch.nn.Module, sites, batches: torch.Tensor, hessian: bool,
                        progress=None) -> dict[str, InputStats]:
    """Run the dense model over `batches` [N, B, S] and accumulate per-layer input statistics."""
    stats: dict[str, InputStats] = {}
    hooks = []
    for s in sites:
        module = model.get_submodule(s.name.rsplit(".", 1)[0])
        dev = model.get_parameter(s.name).device

        def hook(mod, args, _s=s, _dev=dev):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
            st = stats.get(_s.name)
            if st is None:
                st = stats[_s.name] = InputStats(torch.zeros(x.shape[1], device=_dev), None, 0)
                if hessian:
                    st.hessian = torch.zeros(x.shape[1], x.shape[1], device=_dev)
            st.sq_norm += (x * x).sum(0)
            if hessian:
                st.hessian += x.T @ x  # [in, tokens] @ [tokens, in]
            st.tokens += x.shape[0]

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        for b in batches:
            model(input_ids=b, use_cache=False)
            if progress is not None:
                progress.update(1)
    finally:
        for h in hooks:
            h.remove()
    missing = [s.name for s in sites if s.name not in stats]
    if missing:
        raise RuntimeError(f"calibration never reached {missing[:3]}...: their modules are not called by forward()")
    return stats


def wanda_score(w: torch.Tensor, st: InputStats) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for a [out, in] weight."""
    return w.float().abs() * st.sq_norm.sqrt()[None, :]


def magnitude_pattern(w: torch.Tensor) -> torch.Tensor:
    return hm.topk24_pattern(w.float().abs())


def wanda_pattern(w: torch.Tensor, st: InputStats) -> torch.Tensor:
    return hm.topk24_pattern(wanda_score(w, st))


@torch.no_grad()
def sparsegpt_pattern(w: torch.Tensor, st: InputStats, blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT 2:4 mask selection (Frantar & Alistarh 2023): OBS saliency w^2 / [H^-1]_jj^2 per group
    of 4, chosen column block by column block while the remaining columns absorb the error."""
    if st.hessian is None:
        raise ValueError("sparsegpt needs the calibration Hessian (collect_input_stats(hessian=True))")
    dt = torch.promote_types(torch.promote_types(w.dtype, st.hessian.dtype), torch.float32)
    W = w.detach().to(dt).clone()  # [out, in] scratch copy
    H = st.hessian.to(dt) / max(st.tokens, 1)
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device, dtype=dt)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        for i in range(i2 - i1):
            if i % 4 == 0:
                sal = W1[:, i:i + 4] ** 2 / d[i:i + 4][None, :] ** 2  # [out, 4]
                drop = torch.topk(sal, 2, dim=1, largest=False).indices
                keep[:, i1 + i:i1 + i + 4].scatter_(1, drop, False)
            col = W1[:, i]
            q = torch.where(keep[:, i1 + i], col, torch.zeros_like(col))
            err = (col - q) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return hm.mask_to_pattern(keep)


def per_matrix(fn, w: torch.Tensor) -> torch.Tensor:
    """fn of a [out, in] weight, or of each expert matrix of a fused [E, out, in] one, stacked (the scratch
    memory of one matrix at a time)."""
    return fn(w) if w.dim() == 2 else torch.stack([fn(m) for m in w])


def oneshot_pattern(method: str, w: torch.Tensor, st: InputStats | None) -> torch.Tensor:
    """2:4 pattern index [out, in/4] of a [out, in] weight by a one-shot method ([E, out, in/4] per expert
    matrix of a fused [E, out, in] weight)."""
    if w.dim() == 3:
        return per_matrix(lambda m: oneshot_pattern(method, m, st), w)
    if method == "magnitude":
        return magnitude_pattern(w)
    if st is None:
        raise ValueError(f"{method} needs calibration statistics")
    if method == "wanda":
        return wanda_pattern(w, st)
    if method == "sparsegpt":
        return sparsegpt_pattern(w, st)
    raise ValueError(f"unknown one-shot method {method!r}; choose one of {', '.join(ONESHOT_METHODS)}")


def tile_kept_fraction(w: torch.Tensor, st: InputStats | None, sparsity: float, tile: int) -> torch.Tensor:
    """Prune a copy unstructured to `sparsity` per output row by Wanda score (magnitude without stats);
    return the kept fraction of every tile: [out, in] -> [R, C] ([E, out, in] -> [E, R, C], per expert matrix)."""
    if w.dim() == 3:
        return per_matrix(lambda m: tile_kept_fraction(m, st, sparsity, tile), w)
    score = wanda_score(w, st) if st is not None else w.float().abs()
    in_f = score.shape[-1]
    n_prune = int(round(sparsity * in_f))
    keep = torch.ones_like(score, dtype=torch.bool)
    if n_prune:
        idx = torch.topk(score, n_prune, dim=-1, largest=False).indices
        keep.scatter_(-1, idx, False)
    return hm.tile_view(keep.float(), tile).mean(dim=(-3, -1))  # [..., R, T, C, T] -> [..., R, C]


def tile_prior(kept: torch.Tensor, sparsity: float) -> torch.Tensor:
    """+1 for the top N_dense = round(2 * N_tiles * (0.5 - s)) tiles of a layer, -1 for the rest: kept [R, C],
    or [E, R, C] for the expert matrices of a fused MoE weight (each matrix its own top N_dense)."""
    mats = kept.reshape(-1, kept.shape[-2] * kept.shape[-1])                 # [matrices, R*C]
    n = mats.shape[1]
    n_dense = min(n, max(0, round(2 * n * (0.5 - sparsity))))
    prior = -torch.ones_like(mats, dtype=torch.float32)
    order = torch.sort(-mats, dim=1, stable=True).indices
    prior.scatter_(1, order[:, :n_dense], 1.0)
    return prior.reshape(kept.shape)
