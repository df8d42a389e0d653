"""Generation speed of a packed checkpoint against its dense twin on this machine (`patchc bench`).

The dense twin is the same model with every hybrid linear replaced by an nn.Linear holding its decompressed
weight W * M: the same outputs, dense cuBLAS GEMMs. Every row runs HF generate() the same way (static KV cache,
greedy, a fixed number of new tokens); on a GPU generate() compiles its decode step with CUDA graphs: the `patch`
backend for the packed model, inductor for the twin, once per `dense_modes` entry (by default `reduce-overhead`
and `max-autotune`, the strongest dense baseline: Triton GEMM templates autotuned against cuBLAS), as
bench/e2e.py measures. Speedups are against the best dense row.

    report = bench("ckpt/smol35", BenchConfig(batch=16, prompt=128, new=128, repeats=3), device="cuda")

Memory: with repeats=1 the rows run one after the other and the twin is the packed model densified in place, so
packed and dense weights are never resident together. With repeats > 1 the rows alternate (patch, dense,
dense-max-autotune, patch, ...) so that drifting clocks fall on all alike; the packed model and the dense twin
are then both resident (LLaMA-2-7B: ~9 GB packed at 35% + 13.5 GB dense, plus one static KV cache at a time).
The dense rows of different modes share one set of weights.
"""
from __future__ import annotations

import copy
import gc
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .format import unpack_layer
from .runtime import HybridLinear

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TIMING_KEYS = ("total_ms", "prefill_ms", "decode_ms_per_token", "new_tokens_per_s")


@dataclass
class BenchConfig:
    batch: int = 16            # sequences generated together (the decode GEMMs' M)
    prompt: int = 128          # prompt tokens a sequence (random ids, seeded)
    new: int = 128             # new tokens a sequence (min = max: every row generates exactly this many)
    compile: bool | None = None  # generate()'s compiled decode step (CUDA graphs); None: on CUDA devices only
    seed: int = 0
    dense_modes: tuple[str, ...] | None = None  # inductor modes of the dense twin's rows; None: reduce-overhead and
                                                # max-autotune when compiled, reduce-overhead alone otherwise
    repeats: int = 1           # rows alternate this many times; each row reports the median and min / max

    def __post_init__(self):
        for name in ("batch", "prompt", "new", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1 (got {getattr(self, name)})")
        if self.dense_modes is not None:
            self.dense_modes = tuple(self.dense_modes)
            bad = [m for m in self.dense_modes if m not in COMPILE_MODES]
            if bad or not self.dense_modes or len(set(self.dense_modes)) != len(self.dense_modes):
                raise ValueError(f"BenchConfig.dense_modes must be distinct entries of {', '.join(COMPILE_MODES)} "
                                 f"(got {self.dense_modes})")

    def compiled(self, device) -> bool:
        return self.compile if self.compile is not None else str(device).startswith("cuda")

    def modes(self, device) -> tuple[str, ...]:
        """The dense rows' inductor modes on `device`."""
        if self.dense_modes is not None:
            return self.dense_modes
        return ("reduce-overhead", "max-autotune") if self.compiled(device) else ("reduce-overhead",)


def dense_label(mode: str) -> str:
    """"dense" for reduce-overhead (the key reports have always used), "dense-<mode>" for the others."""
    return "dense" if mode == "reduce-overhead" else f"dense-{mode}"


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


def twin_sharing_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` holding the same parameter and buffer tensors (no new weight memory): its own module tree
    and generation config, so that it can be compiled in another mode without recompiling `model`'s forward."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    _forget_compiled(model)                              # compiled code and caches are not copied
    return copy.deepcopy(model, memo)


def _forget_compiled(model) -> None:
    """Drop what generate() left on a model: its compiled forward (made for another model or mode) and a kept cache."""
    for name in ("_compiled_call", "_last_compile_config", "_cache"):
        model.__dict__.pop(name, None)


def _run(model, label: str, ids, cfg: BenchConfig, device, log, rep: int) -> tuple[dict, torch.Tensor]:
    """One row once: the timings, and the greedy tokens [batch, new] it generates. A compiled row's model was
    given its CompileConfig once (_compile_with), so later repeats replay what the first one compiled."""
    compiled = cfg.compiled(device)
    cc = getattr(model.generation_config, "compile_config", None) if compiled else None
    how = f"compiled decode step, {cc.backend} {cc.mode}" if cc is not None else "eager"
    log(f"[patchc] bench: {label} ({how}), batch {cfg.batch}, {cfg.prompt} + {cfg.new} tokens, "
        f"repeat {rep + 1}/{cfg.repeats} ...")
    times, tokens = time_generate(model, ids, cfg.new, device, disable_compile=not compiled, keep_tokens=True)
    log(f"[patchc] bench: {label}: {times['new_tokens_per_s']} new tokens/s, decode {times['decode_ms_per_token']} "
        f"ms/token, prefill {times['prefill_ms']} ms, first call {times['first_call_s']} s")
    return times, tokens                                                     # the greedy tokens [batch, new]


def _compile_with(model, backend: str, mode: str, cfg: BenchConfig, device) -> None:
    if cfg.compiled(device):
        from transformers import CompileConfig

        model.generation_config.compile_config = CompileConfig(backend=backend, mode=mode)


def summarize_row(label: str, mode: str | None, runs: list[dict], weights: float) -> dict:
    """One row over its repeats: the medians under the keys a single run has (so readers of one-repeat reports
    keep working), `stats` with n / median / min / max of each, the first call of the first repeat (compilation,
    autotuning, graph capture: later repeats reuse them) and every run."""
    row = {"row": label, "mode": mode, "weights_GB": round(weights, 3), "repeats": len(runs),
           "first_call_s": runs[0]["first_call_s"]}
    row["stats"] = {}
    for k in TIMING_KEYS:
        v = [r[k] for r in runs]
        row[k] = round(statistics.median(v), 3)
        row["stats"][k] = {"n": len(v), "median": row[k], "min": min(v), "max": max(v)}
    row["runs"] = runs
    return row


def bench(path: str | Path, cfg: BenchConfig | None = None, device: str = "auto", log=print) -> dict:
    """Time generate() on the packed checkpoint at `path` and on its dense twin under each of cfg.modes(device);
    rows alternate cfg.repeats times (see the module's note on memory). Returns the rows (medians, ranges, every
    run), the ratios against the best dense row (tokens/s and decode, each against the dense row best at it),
    and greedy_agreement: the mean share of each sequence's new tokens the packed model and a dense row generate
    alike before their first difference, the lowest over the dense rows (1.0: identical; 16-bit kernels and
    cuBLAS round differently, so long greedy runs may part); greedy_agreement_vs gives it per dense row."""
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
    modes = cfg.modes(device)
    labels = ["patch"] + [dense_label(m) for m in modes]
    mode_of = {"patch": "reduce-overhead", **{dense_label(m): m for m in modes}}
    alternate = cfg.repeats > 1
    g = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, config.vocab_size, (cfg.batch, cfg.prompt), generator=g).to(device)

    torch._dynamo.reset()
    models = {"patch": load(path, device=device)}
    _compile_with(models["patch"], "patch", "reduce-overhead", cfg, device)
    weights = {"patch": weights_gb(models["patch"])}

    def dense_models():
        """The twin's rows: one densified model (a second load when rows alternate, else the packed model
        densified in place), and a weight-sharing copy of it per further mode."""
        if alternate:
            dense = load(path, device=device)
        else:
            dense = models.pop("patch")                 # its rows are done: densified in place
            torch._dynamo.reset()                       # the patch row's compiled code held the packed weights
        densify_(dense)
        _forget_compiled(dense)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        for i, m in enumerate(modes):
            twin = dense if i == 0 else twin_sharing_weights(dense)
            _compile_with(twin, "inductor", m, cfg, device)
            models[dense_label(m)] = twin
            weights[dense_label(m)] = weights_gb(dense)

    if alternate:
        dense_models()
        order = [(rep, x) for rep in range(cfg.repeats) for x in labels]            # alternated
    else:
        order = [(0, x) for x in labels]
    runs = {x: [] for x in labels}
    tokens = {}
    for rep, label in order:
        if label not in models:
            dense_models()
        times, toks = _run(models[label], label, ids, cfg, device, log, rep)
        runs[label].append(times)
        tokens.setdefault(label, toks)                   # the first repeat's greedy tokens [batch, new]
    rows = [summarize_row(x, mode_of[x] if cfg.compiled(device) else None, runs[x], weights[x]) for x in labels]
    patch, dense_rows = rows[0], rows[1:]
    best_tps = max(dense_rows, key=lambda r: r["new_tokens_per_s"])
    best_decode = min(dense_rows, key=lambda r: r["decode_ms_per_token"])
    agree = {r["row"]: round(greedy_agreement(tokens["patch"], tokens[r["row"]]), 4) for r in dense_rows}
    return {"checkpoint": str(path), "device": str(device), "gpu": torch.cuda.get_device_name(device) if cuda else None,
            "config": {**asdict(cfg), "dense_modes": list(modes)}, "rows": rows,
            "best_dense": best_tps["row"],
            "greedy_agreement": min(agree.values()), "greedy_agreement_vs": agree,
            "speedup_tokens_per_s": round(patch["new_tokens_per_s"] / best_tps["new_tokens_per_s"], 3),
            "speedup_decode": round(best_decode["decode_ms_per_token"] / max(patch["decode_ms_per_token"], 1e-9), 3),
            "speedup_vs": {r["row"]: round(patch["new_tokens_per_s"] / r["new_tokens_per_s"], 3) for r in dense_rows},
            "weights_ratio": round(patch["weights_GB"] / dense_rows[0]["weights_GB"], 3)}
