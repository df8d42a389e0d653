"""How much of a model's matmul weight a prune run masks.

coverage = masked parameters / all matmul parameters, where matmul parameters are every weight of two or
more dimensions except input embeddings and biases (each tensor once): linears masked or kept dense, lm_head (also when
tied to the embedding), and fused 3-D MoE expert weights ([experts, out, in], as Mixtral / Qwen2-MoE /
Qwen3-MoE hold them in transformers 5). patchc masks both linears and the expert weights it finds in the
graph (passes.find_linears); what it leaves unmasked (lm_head, routers, a 3-D weight no grouped / batched
matmul reads, or one excluded by --include / --exclude) is reported here. Below WARN_BELOW coverage the
achieved sparsity speaks for a minority of the model's matmul weight, and a warning says so (naming any
unmasked expert weights).
"""
from __future__ import annotations

import warnings

import torch

WARN_BELOW = 0.5


def matmul_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out_w = getattr(out_emb, "weight", None)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen, out = set(), {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.dim() < 2 or id(p) in seen or name.rsplit(".", 1)[-1].endswith("bias"):  # per-expert biases [E, out]
            continue
        if id(p) in embeddings and p is not out_w:
            continue
        seen.add(id(p))
        out[name] = p
    return out


def coverage_report(model: torch.nn.Module, masked: list[str], warn: bool = True) -> dict:
    params = matmul_params(model)
    masked = set(masked)
    masked_n = sum(p.numel() for n, p in params.items() if n in masked)
    total = sum(p.numel() for p in params.values())
    experts = {n: list(p.shape) for n, p in params.items() if p.dim() >= 3}
    unmasked_experts = [n for n in experts if n not in masked]
    cov = masked_n / total if total else 0.0
    rep = {"masked_params": masked_n, "matmul_params": total, "coverage": round(cov, 6),
           "masked_expert_params": sum(params[n].numel() for n in experts if n in masked),
           "unmasked_expert_params": sum(params[n].numel() for n in unmasked_experts),
           "expert_weights": experts}
    if warn and total and cov < WARN_BELOW:
        what = (f"; {len(unmasked_experts)} fused MoE expert weights ({rep['unmasked_expert_params']:,} parameters) "
                "are not masked: the reported sparsity covers the rest only" if unmasked_experts else "")
        warnings.warn(f"patchc masks only {cov:.1%} of this model's matmul parameters{what}", stacklevel=2)
    return rep
