"""Generation speed of a packed checkpoint against its dense twin on this machine (`patchc bench`).

The dense twin is the same model with every hybrid linear replaced by an nn.Linear holding its decompressed
weight W * M: the same outputs, dense cuBLAS GEMMs. Both run HF generate() the same way (static KV cache,
greedy, a fixed number of new tokens); on a GPU generate() compiles its decode step with CUDA graphs, with the
`patch` backend for the packed model and inductor for the twin, as bench/e2e.py measures.

    report = bench("ckpt/smol35", BenchConfig(batch=16, prompt=128, new=128), device="cuda")
"""
from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .format import unpack_layer
from .runtime import HybridLinear


@dataclass
class BenchConfig:
    batch: int = 16            # sequences generated together (the decode GEMMs' M)
    prompt: int = 128          # prompt tokens a sequence (random ids, seeded)
    new: int = 128             # new tokens a sequence (min = max: every row generates exactly this many)
    compile: bool | None = None  # generate()'s compiled decode step (CUDA graphs); None: on CUDA devices only
    seed: int = 0

    def __post_init__(self):
        for name in ("batch", "prompt", "new"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1 (got {getattr(self, name)})")


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_generate(model, ids: torch.Tensor, new: int, device, disable_compile: bool = False,
                  keep_tokens: bool = False):
    """Prefill and full generate() times (static cache, greedy): the first call (compilation, autotuning, graph
    capture), one warm-up, then the best of two, alternated with the prefill timings (prefill = generating one
    token). disable_compile=True keeps generate() from compiling its decode step (a forward compiled by the
    caller, or eager). keep_tokens=True returns (times, the new tokens [batch, new] of a timed call, on the CPU)
    instead of the times alone."""
    out = tokens = None

    def gen(n):
        nonlocal out
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             cache_implementation="static", pad_token_id=0, disable_compile=disable_compile)
        sync(device)
        return time.perf_counter() - t0

    first = gen(new)             # cold: compile + autotune + graph capture
    gen(new)                     # warm-up of every shape
    fulls, prefills = [], []
    for _ in range(2):           # alternated, so drifting clocks or load hit both alike
        fulls.append(gen(new))
        if keep_tokens and len(fulls) == 1:
            tokens = out[:, ids.shape[1]:].cpu()                  # [batch, new]
        prefills.append(gen(1))
    full = min(fulls)
    prefill = min(min(prefills), full)   # one token never takes longer than `new`: a larger reading is noise
    batch = ids.shape[0]
    times = {"first_call_s": round(first, 2), "total_ms": round(full * 1e3, 2),
             "prefill_ms": round(prefill * 1e3, 2),
             "decode_ms_per_token": round((full - prefill) * 1e3 / max(1, new - 1), 3),
             "new_tokens_per_s": round(batch * new / full, 1)}
    return (times, tokens) if keep_tokens else times


@torch.no_grad()
def densify_(model: torch.nn.Module) -> int:
    """Replace every HybridLinear of `model` by an nn.Linear holding its decompressed weight W * M (in place);
    returns how many were replaced. The packed storage is released once nothing else holds it."""
    names = [n for n, m in model.named_modules() if isinstance(m, HybridLinear)]
    for name in names:
        m = model.get_submodule(name)
        w = m.weight if m.weight is not None else unpack_layer(m.packed)        # [out, in]
        lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = torch.nn.Parameter(w.contiguous(), requires_grad=False)
        if m.bias is not None:
            lin.bias = torch.nn.Parameter(m.bias.detach(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, lin)
    return len(names)


def weights_gb(model: torch.nn.Module) -> float:
    """Bytes of the model's parameters and buffers, in GB (each storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total / 1e9


def greedy_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean share of each sequence's tokens ([batch, new] each) that a and b have alike before their first
    difference: after one, the two continue from different prefixes, so later matches say nothing."""
    same = a == b                                                                          # [batch, new]
    agree = torch.where(same.all(1), same.shape[1], (~same).int().argmax(1))              # [batch]
    return agree.float().mean().item() / same.shape[1]


def _run(model, label: str, ids, cfg: BenchConfig, device, backend: str, log) -> tuple[dict, torch.Tensor]:
    """One row: the timings, and the greedy tokens [batch, new] it generates."""
    compiled = cfg.compile if cfg.compile is not None else str(device).startswith("cuda")
    torch._dynamo.reset()
    if compiled:
        from transformers import CompileConfig

        model.generation_config.compile_config = CompileConfig(backend=backend, mode="reduce-overhead")
    log(f"[patchc] bench: {label} ({'compiled decode step, ' + backend if compiled else 'eager'}), "
        f"batch {cfg.batch}, {cfg.prompt} + {cfg.new} tokens ...")
    times, tokens = time_generate(model, ids, cfg.new, device, disable_compile=not compiled, keep_tokens=True)
    row = {"row": label, "weights_GB": round(weights_gb(model), 3), **times}
    log(f"[patchc] bench: {label}: {row['new_tokens_per_s']} new tokens/s, decode {row['decode_ms_per_token']} "
        f"ms/token, prefill {row['prefill_ms']} ms, first call {row['first_call_s']} s")
    return row, tokens                                                      # the greedy tokens [batch, new]


def bench(path: str | Path, cfg: BenchConfig | None = None, device: str = "auto", log=print) -> dict:
    """Time generate() on the packed checkpoint at `path`, then on its dense twin (the same model densified in
    place, so the two never hold memory together); returns both rows, the ratios, and greedy_agreement: the mean
    share of each sequence's new tokens the two generate alike before their first difference (1.0: identical;
    16-bit kernels and cuBLAS round differently, so long greedy runs may part)."""
    from transformers import AutoConfig

    from .lower import load, read_manifest

    from .models import resolve_device

    cfg = cfg or BenchConfig()
    device = resolve_device(device)                     # "auto": cuda if available, else cpu
    cuda = str(device).startswith("cuda")
    read_manifest(path)                                 # a clear error for what is not a packed checkpoint
    config = AutoConfig.from_pretrained(path)           # checked before the weights are read
    if cfg.prompt + cfg.new > getattr(config, "max_position_embeddings", 1 << 30):
        raise ValueError(f"prompt + new = {cfg.prompt + cfg.new} tokens exceed the model's "
                         f"max_position_embeddings ({config.max_position_embeddings}); lower --prompt/--new")
    model = load(path, device=device)
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, config.vocab_size, (cfg.batch, cfg.prompt), generator=g).to(device)
    patch, patch_tokens = _run(model, "patch", ids, cfg, device, "patch", log)
    densify_(model)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    dense, dense_tokens = _run(model, "dense", ids, cfg, device, "inductor", log)
    return {"checkpoint": str(path), "device": str(device), "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "config": asdict(cfg), "rows": [patch, dense],
            "greedy_agreement": round(greedy_agreement(patch_tokens, dense_tokens), 4),
            "speedup_tokens_per_s": round(patch["new_tokens_per_s"] / dense["new_tokens_per_s"], 3),
            "speedup_decode": round(dense["decode_ms_per_token"] / max(patch["decode_ms_per_token"], 1e-9), 3),
            "weights_ratio": round(patch["weights_GB"] / dense["weights_GB"], 3)}
