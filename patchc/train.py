"""`patchc prune`: learn hybrid tile masks on frozen weights, then extract them at an exact sparsity.

Stages: load model -> tokenise data -> capture FX graph -> find linears -> one-shot priors on
calibration activations -> insert MaskNodes -> train the mask logits -> exact global extraction ->
DIR/masks.safetensors + DIR/prune.json.

Loss = CE + sparse_reg * |density - (1 - sparsity)|
          - weight_reg * (1 - step/steps) * sum_l ||M_l * W_l||_F / sum_l ||W_l||_F
          (+ distill * KL(dense || masked) on the logits when asked)
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from patchc import checkpoint as ckpt
from patchc import distributed as pdist
from patchc import mask as hm
from patchc import mask_kernels
from patchc import step_graph
from patchc.config import settings
from patchc.coverage import coverage_report
from patchc.data import (TokenCorpus, TrainingWindows, batch_indices, calibration_indices, check_data_paths,
                         holdout_indices, rank_slice)
from patchc.evaluate import eval_file_tokens, perplexity
from patchc.fingerprint import source_record
from patchc.io import write_json, write_safetensors
from patchc.models import dtype_name, load_model, resolve_device, resolve_dtype
from patchc.outdir import finish_prune_output, stage_prune_output
from patchc.oneshot import ONESHOT_METHODS, collect_input_stats, oneshot_pattern, tile_kept_fraction, tile_prior, weight_2d
from patchc.passes import MaskNode, MaskState, capture, find_linears, insert_masks
from patchc.optim import LeanAdamW
from patchc.passes.insert_masks import mask_nodes
from patchc.preflight import check_prune

PRUNE_VERSION = 1
DEFAULT_SEQ_LEN = 2048          # PruneConfig.seq_len 0 resolves to this (or the model's positions if fewer)
MODES = ("tile", "joint")
STATES = ("lean", "fp32")
METHODS = ("patch", "hybrid", *ONESHOT_METHODS)
AUTO_TILES = (128, 64, 32, 16)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class PruneConfig:
    """Everything that decides a prune run's result (recorded in prune.json, checked on --resume)."""
    sparsity: float = 0.35          # global target over the masked linears, in [0, 0.5]
    mode: str = "joint"             # tile: fixed one-shot 2:4 pattern; joint: 2:4 pattern learned too
    method: str = "patch"           # patch (learn) | hybrid (one-shot tile choice) | magnitude | wanda | sparsegpt (2:4 everywhere)
    oneshot: str = "wanda"          # one-shot 2:4 method giving the fixed / prior pattern
    tile_size: int = 0              # 0 = auto: the largest of 128/64/32/16 dividing every masked linear
    steps: int = 400                # the default recipe: 400 x 8 x 2048 = 6.5M tokens (bench/results/accuracy)
    seq_len: int = 0                # 0 = auto: DEFAULT_SEQ_LEN, or the model's positions if it has fewer
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 5
    sparse_reg: float = 5.0
    weight_reg: float = 1.0
    distill: float = 1.0            # weight of KL(dense teacher || masked student) on the logits (0 = off)
    tau: tuple = (4.0, 0.05)
    scale_tile: tuple = (25.0, 350.0)
    scale_24: tuple = (100.0, 500.0)
    init_std: float = 0.014
    prior_strength: float = 3.0
    calib_samples: int = 64
    holdout: int = 0                # windows of seq_len held out of training: their PPL is reported (dense, start,
                                    # result, every eval_every steps): a validation set for tuning, not an eval set
    seed: int = 0
    include: tuple = ()
    exclude: tuple = ()
    state: str = "lean"             # mask-logit + optimizer state: lean (bf16 logits, 8-bit moments: 6 bytes per
                                    # masked weight in joint mode) or fp32 (fp32 logits and Adam moments: 18)
    cuda_graphs: bool = False       # capture the training step in CUDA graphs (patchc/step_graph.py): the same
                                    # computation with ~no host overhead; CUDA, one process, mask kernels only.
                                    # It changes nothing learned: a run may resume with it on or off

    def validate(self) -> None:
        hm.check_sparsity(self.sparsity)
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} unknown; choose tile or joint")
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} unknown; choose one of {', '.join(METHODS)}")
        if self.method in ONESHOT_METHODS and self.sparsity != 0.5:
            raise ValueError(f"--method {self.method} prunes every tile 2:4, i.e. sparsity 0.5; got {self.sparsity}")
        if self.oneshot not in ONESHOT_METHODS:
            raise ValueError(f"one-shot method {self.oneshot!r} unknown; choose one of {', '.join(ONESHOT_METHODS)}")
        if self.tile_size and (self.tile_size < 8 or self.tile_size % 8):
            raise ValueError(f"tile size {self.tile_size} must be a multiple of 8 (0 = auto, 128 is typical)")
        for k in ("steps", "seq_len", "batch_size", "grad_accum", "calib_samples"):
            if getattr(self, k) < (0 if k in ("steps", "seq_len") else 1):
                raise ValueError(f"{k} must be positive, got {getattr(self, k)}")
        if self.holdout < 0:
            raise ValueError(f"holdout must be >= 0 windows, got {self.holdout}")
        if self.seq_len == 1:
            raise ValueError("seq_len must be at least 2 (0 = auto)")
        if self.state not in STATES:
            raise ValueError(f"state {self.state!r} unknown; choose lean or fp32")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be True or False, got {self.cuda_graphs!r}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "PruneConfig":
        names = {f.name for f in fields(cls)}
        d = {"state": "fp32", **d}  # runs recorded before lean state existed used fp32
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

    @property
    def learns(self) -> bool:
        return self.method == "patch" and self.steps > 0


@dataclass
class PruneResult:
    out_dir: Path
    report: dict
    model: torch.nn.Module | None = field(repr=False)  # the HF model (weights untouched; None when distributed)
    graph: torch.nn.Module = field(repr=False)       # the rewritten graph (MaskNodes in hard mode)


# ---------------------------------------------------------------------------------------------
# Preparation: graph, plan, priors, mask nodes
# ---------------------------------------------------------------------------------------------
def choose_tile(gm, cfg: PruneConfig) -> int:
    if cfg.tile_size:
        return cfg.tile_size
    plan = find_linears(gm, 8, list(cfg.include), list(cfg.exclude))
    for t in AUTO_TILES:
        if all(s.out_features % t == 0 and s.in_features % t == 0 for s in plan.masked):
            return t
    return AUTO_TILES[0]


EXPERT_ONESHOT = "magnitude"  # fused MoE experts: no per-expert input statistics (routed tokens) are collected


def init_masks(model, plan, tile: int, cfg: PruneConfig, calib: torch.Tensor, device, log) -> dict[str, dict]:
    """Per masked weight: tile_logits [R, C], pattern [out, in/4] and (joint) pattern_logits [out, in/4, 6]; a
    fused MoE expert weight gets the same per expert matrix ([E, R, C], ...), from magnitude (EXPERT_ONESHOT:
    Wanda / SparseGPT need the inputs each expert sees, which are not collected)."""
    need_stats = cfg.oneshot != "magnitude" or cfg.method in ("wanda", "sparsegpt")
    method24 = cfg.method if cfg.method in ONESHOT_METHODS else cfg.oneshot
    linears = [s for s in plan.masked if not s.experts]
    stats = {}
    if linears and (need_stats or cfg.method in ("patch", "hybrid")):
        log(f"calibration: {len(calib)} sequences x {calib.shape[-1]} tokens")
        with tqdm(total=len(calib), desc="calibration", leave=False, disable=not log.progress) as bar:
            stats = collect_input_stats(model, linears, calib.to(device).unsqueeze(1),
                                        hessian=(method24 == "sparsegpt"), progress=bar)
    g = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for site in tqdm(plan.masked, desc=f"one-shot {method24}", leave=False, disable=not log.progress):
        w = weight_2d(model, site.name, site.transposed)                   # [(E,) out, in]
        st = stats.get(site.name)
        pattern = oneshot_pattern(EXPERT_ONESHOT if site.experts else method24, w, st).cpu()
        r, c = site.out_features // tile, site.in_features // tile
        logits = torch.randn(*site.lead, r, c, generator=g) * cfg.init_std  # [(E,) R, C]
        std = logits.std().item() if logits.numel() > 1 else cfg.init_std
        kept = tile_kept_fraction(w, st, cfg.sparsity, tile).cpu()
        logits += tile_prior(kept, cfg.sparsity) * std * cfg.prior_strength
        entry = {"tile_logits": logits, "pattern": pattern}
        if cfg.mode == "joint" and cfg.learns:
            # Prior only, no init noise: noise of the same size as the prior flips the argmax away from
            # the one-shot pattern in a few % of groups (measured: PPL 127 vs 73 at the start on SmolLM2).
            pl = (hm.pattern_overlap(pattern) - 1.0) * cfg.init_std * cfg.prior_strength  # [out, in/4, 6]
            entry["pattern_logits"] = pl
        out[site.name] = entry
    return out


def build_nodes(plan, tile: int, state: MaskState, init: dict[str, dict], device, lean: bool) -> dict[str, MaskNode]:
    return {s.name: MaskNode(s, tile, state, init[s.name]["tile_logits"], init[s.name]["pattern"],
                             init[s.name].get("pattern_logits"), index=i, lean=lean).to(device)
            for i, s in enumerate(plan.masked)}


@dataclass
class MaskedGraph:
    """A model's captured graph with a MaskNode on every masked linear (what prune trains)."""
    gm: torch.fx.GraphModule
    nodes: list[MaskNode]
    plan: object                # passes.find_linears.LinearPlan
    tile: int
    state: MaskState
    capture_s: float
    weight_norm: float          # sum over masked layers of ||W||_F (the weight-norm term's denominator)


def mask_graph(model, cfg: PruneConfig, calib: torch.Tensor | None, device, *, init=None,
               compile: bool = False, log=None, name: str = "the model",
               info: pdist.DistInfo | None = None) -> MaskedGraph:
    """Capture `model`, choose the tile, find the maskable linears and insert initialised mask nodes: the
    set-up every prune run (and bench/train_speed.py) does. init: a function plan -> initial logits and
    patterns (a resumed run's placeholders), or None to initialise them from the one-shot prior on `calib`
    (computed on rank 0 and broadcast when distributed)."""
    info = info or pdist.DistInfo()
    log = log or _Log(progress=False)
    cap = capture(model)
    tile = choose_tile(cap.gm, cfg)
    plan = find_linears(cap.gm, tile, list(cfg.include), list(cfg.exclude))
    if not plan.masked:
        raise ValueError(f"no linear layer of {name} can be masked with tile size {tile}: "
                         + "; ".join(f"{s.name}: {s.skip_reason}" for s in plan.skipped[:4]))
    n_exp = sum(bool(s.experts) for s in plan.masked)
    log(f"graph captured in {cap.seconds:.1f}s ({cap.strategy}): {len(plan.masked) - n_exp} linears and "
        f"{n_exp} fused expert weights masked, "
        f"{len(plan.skipped)} kept dense, tile {tile}, {len(plan.groups)} shared-input groups")
    state = MaskState(seed=cfg.seed, compile=compile, kernels=mask_kernels.enabled(device) and not compile)
    if init is None:
        init = init_masks(model, plan, tile, cfg, calib, device, log)
        if info.active:  # every rank starts from rank 0's logits and patterns
            for site in plan.masked:
                for k, t in init[site.name].items():
                    moved = t.to(device)
                    pdist.broadcast_([moved], info)
                    init[site.name][k] = moved.cpu()
    else:
        init = init(plan, tile)
    gm = insert_masks(cap.gm, plan, build_nodes(plan, tile, state, init, device, lean=cfg.state == "lean"))
    nodes = mask_nodes(gm)
    with torch.no_grad():
        w_norm = sum(float(n.w2d().float().norm()) for n in nodes)
    return MaskedGraph(gm, nodes, plan, tile, state, cap.seconds, w_norm)


# ---------------------------------------------------------------------------------------------
# Extraction: exact global target
# ---------------------------------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: every rank calls it), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def extract(nodes: list[MaskNode], sparsity: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Hard (bitmap [R, C] bool, pattern [out, in/4] uint8) per node, global sparsity exact to one tile."""
    bitmaps = hm.select_dense_tiles([_full(n.tile_logits).detach() for n in nodes], sparsity)
    out = []
    for b, n in zip(bitmaps, nodes):
        p = _full(n.pattern_logits).detach().float().argmax(-1).to(torch.uint8) if n.joint else n.hard_pattern
        out.append((b.cpu(), p.cpu()))
    return out


def set_hard(nodes: list[MaskNode], hard) -> None:
    for n, (b, p) in zip(nodes, hard):
        n.set_hard(b, p)


def sparsity_report(plan, nodes: list[MaskNode], hard, tile: int, target: float) -> dict:
    """Per masked weight and overall; a fused MoE expert weight is one entry, shape [E, out, in], "experts" E."""
    layers, zeros, total = [], 0, 0
    for site, n, (b, _) in zip(plan.masked, nodes, hard):
        s = hm.layer_sparsity(b)
        layer = {"name": site.name, "role": site.role, "shape": site.shape,
                 "tiles": b.numel(), "dense_tiles": int(b.sum()), "sparsity": round(s, 6),
                 "group": site.group, "transposed": site.transposed}
        if site.experts:
            layer.update(experts=site.experts, oneshot=EXPERT_ONESHOT)
        layers.append(layer)
        zeros += s * n.numel
        total += n.numel
    all_total = total + sum(s.numel for s in plan.skipped)
    achieved = zeros / total if total else 0.0
    return {
        "target": target, "achieved": achieved,
        "achieved_all_linears": zeros / all_total if all_total else 0.0,
        "one_tile": 0.5 * tile * tile / total if total else 0.0,
        "masked_params": total, "all_linear_params": all_total,
        "layers": layers,
        "skipped": [{"name": s.name, "shape": s.shape, "reason": s.skip_reason}
                    for s in plan.skipped],
    }


def opt_params(nodes: list[MaskNode]) -> list[torch.nn.Parameter]:
    return [p for n in nodes for p in ((n.tile_logits, n.pattern_logits) if n.joint else (n.tile_logits,))]


def make_optimizer(nodes: list[MaskNode], cfg: PruneConfig, compile: bool = False) -> LeanAdamW:
    """AdamW over the mask logits; with lean state the bf16 pattern logits keep 2 bytes of state each."""
    return LeanAdamW(opt_params(nodes), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, seed=cfg.seed,
                     compile=compile)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class _Log:
    def __init__(self, progress: bool):
        self.progress = progress

    def __call__(self, msg: str) -> None:
        if self.progress:
            tqdm.write(f"[patchc] {msg}")


def prune(model: str, data: list[str], out_dir: str | os.PathLike, config: PruneConfig | None = None, *,
          device: str = "auto", dtype: torch.dtype | str | None = "auto", resume: bool = False, overwrite: bool = False,
          eval_ppl: str | None = None, eval_seq_len: int = 2048, eval_windows: int | None = None,
          save_every: int = 50, eval_every: int = 0, keep_checkpoint: bool = False,
          compile: bool | None = None, step_in_backward: bool | None = None,
          progress: bool = True) -> PruneResult:
    """Learn hybrid masks for `model` (a spec, see patchc.models) and write them to `out_dir`.

    device "auto": CUDA when available; dtype "auto": bf16 on CUDA, fp32 on the CPU.
    Under torchrun (WORLD_SIZE > 1) every process calls this: the run is data-parallel with FSDP2 (see
    patchc.distributed), global batch = ranks x batch_size x grad_accum, and rank 0 alone writes outputs.
    Every mask node recomputes its relaxed mask in backward (nothing of weight size waits for backward); on a
    GPU the Triton kernels of patchc.mask_kernels form it (PATCHC_MASK_KERNELS). eval_every > 0 (with eval_ppl): the exactly extracted masks are evaluated every
    that many steps (log.jsonl "ppl"); it changes nothing the run learns. keep_checkpoint: keep the
    resumable checkpoint/ folder after a completed run (it is removed otherwise). compile: the training graph
    (masks included) and the optimizer update run through torch.compile (off by default: the compile of a
    30-layer graph took 7 minutes on an H100; see bench/results/train_speed).
    step_in_backward (None = when one
    process and grad_accum 1, and no CUDA graphs): each logit tensor is updated as soon as its gradient is complete
    and the gradient freed, so gradients never all exist at once (same result).
    config.cuda_graphs (or PATCHC_CUDA_GRAPHS=1): the step runs from CUDA graphs (patchc/step_graph.py) after a few
    eager warm-up steps. Asked for in the config, a run that cannot use them (not CUDA, torchrun, compile,
    step_in_backward=True, PATCHC_MASK_KERNELS=0) is refused before anything is loaded; asked for by the
    environment alone, the run goes on eagerly and logs why."""
    cfg = config or PruneConfig()
    device = resolve_device(device)           # "auto": cuda if available, else cpu
    graphs, graphs_off = cfg.cuda_graphs or settings().cuda_graphs, None
    if graphs and cfg.learns:
        why = step_graph.refusal(device, compile=bool(compile), step_in_backward=step_in_backward,
                                 world=2 if pdist.launched_by_torchrun() else 1, mask_kernels=settings().mask_kernels)
        if why and cfg.cuda_graphs:
            raise ValueError(why)
        if why:
            graphs, graphs_off = False, f"PATCHC_CUDA_GRAPHS=1 ignored: {why}"
    positions = check_prune(model, data, out_dir, cfg, device=device, resume=resume, overwrite=overwrite,
                            eval_ppl=eval_ppl, eval_seq_len=eval_seq_len)  # before anything is loaded or created
    if not cfg.seq_len:   # auto
        cfg = replace(cfg, seq_len=min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN))
    if eval_every and not (eval_ppl or cfg.holdout):
        raise ValueError("--eval-every needs --eval-ppl FILE or --holdout N (the text to evaluate on)")
    info, device = pdist.setup(device)
    try:
        return _prune(model, data, out_dir, cfg, device, dtype, resume, overwrite, eval_ppl, eval_seq_len,
                      eval_windows, save_every, eval_every, keep_checkpoint, compile,
                      step_in_backward, progress, info, graphs=graphs and cfg.learns, graphs_off=graphs_off)
    finally:
        pdist.teardown(info)


def _prune(model, data, out_dir, cfg, device, dtype, resume, overwrite, eval_ppl, eval_seq_len, eval_windows,
           save_every, eval_every, keep_checkpoint, compile, step_in_backward, progress,
           info: pdist.DistInfo, *, graphs: bool = False, graphs_off: str | None = None) -> PruneResult:
    cuda = str(device).startswith("cuda")
    dtype = resolve_dtype(dtype or "auto", device)      # "auto": bf16 on cuda, fp32 on cpu
    compile = False if compile is None else compile  # whole-graph compile: fast steps, but minutes to compile
    if step_in_backward is None:
        step_in_backward = not info.active and cfg.grad_accum == 1 and not graphs
    log = _Log(progress and info.main)
    if graphs_off:
        log(graphs_off)
    check_data_paths(data)  # missing, binary or undecodable data fails now, before anything is loaded or deleted
    final_out = Path(out_dir)
    if resume and not ckpt.exists(final_out):
        raise FileNotFoundError(f"--resume: {final_out / ckpt.CKPT} does not exist (no checkpoint to continue)")
    # replacing a run: rank 0 makes a folder beside it, swapped in when the new result is complete
    out = stage_prune_output(final_out, resume=resume, overwrite=overwrite) if info.main else None
    out = Path(pdist.broadcast_str(str(out) if out else "", info))
    t_start = time.perf_counter()
    if info.active:
        log(f"distributed: {info.world} processes ({'nccl' if cuda else 'gloo'}), global batch "
            f"{info.world} x {cfg.batch_size} x {cfg.grad_accum}")

    loaded = load_model(model, device=device, dtype=dtype, seed=cfg.seed)
    hf, tokenizer, architecture = loaded.model, loaded.tokenizer, type(loaded.model).__name__
    source = source_record(loaded)  # resolved source + fingerprint: lower/eval check they load the same model
    model_source = loaded.source
    global_batch = info.world * cfg.batch_size
    if info.main:  # rank 0 fills the token cache; the others then read it
        corpus = TokenCorpus.build(tokenizer, data, progress=progress)
    pdist.barrier(info)
    if not info.main:
        corpus = TokenCorpus.build(tokenizer, data)
    n_seq = corpus.num_sequences(cfg.seq_len)
    log(f"data: {corpus.n_tokens:,} tokens in {len(corpus.files)} files ({corpus.hits} from the cache) -> "
        f"{n_seq} sequences of {cfg.seq_len}, mixed by a seeded shuffle"
        + (f"; {cfg.holdout} held out of training" if cfg.holdout else ""))
    held_tokens = None
    if cfg.holdout:  # training, calibration included, only ever sees the other windows
        held = holdout_indices(n_seq, cfg.holdout, cfg.seed)
        held_tokens = corpus.sequences(held, cfg.seq_len).reshape(-1)               # [holdout * seq_len]
        corpus = TrainingWindows(corpus, cfg.seq_len, held)
        n_seq = corpus.num_sequences(cfg.seq_len)
    calib = corpus.sequences(calibration_indices(n_seq, min(cfg.calib_samples, n_seq), cfg.seed), cfg.seq_len)

    start_step, extra, init = 0, {}, None
    if resume:
        st = ckpt.read_state(out)
        saved = replace(PruneConfig.from_json(st["config"]), cuda_graphs=cfg.cuda_graphs)  # changes nothing learned
        if saved != cfg:
            diff = {k: (getattr(saved, k), getattr(cfg, k)) for k in saved.to_json() if getattr(saved, k) != getattr(cfg, k)}
            raise ValueError(f"--resume with a different configuration than the checkpoint's: {diff} (saved, given)")
        start_step, extra = int(st["step"]), dict(st.get("extra", {}))
        init = lambda plan, tile: _placeholder_init(plan, tile, cfg, ckpt.load_patterns(out, plan, info, cfg.mode == "joint" and cfg.learns))  # noqa: E731
    mg = mask_graph(hf, cfg, calib, device, init=init,
                    compile=compile, log=log, name=model, info=info)
    gm, nodes, plan, tile, state = mg.gm, mg.nodes, mg.plan, mg.tile, mg.state
    coverage = coverage_report(hf, [s.name for s in plan.masked])  # share of matmul params masked (MoE!)
    if info.active:
        pdist.shard_(gm, nodes, info)
        hf = loaded = None  # the graph holds the weights; FSDP2 frees each rank's unsharded copies
    opt = make_optimizer(nodes, cfg, compile=compile) if cfg.learns else None
    if resume:
        ckpt.load(out, nodes, opt, info)
        log(f"resuming from step {start_step}")

    def logits_fn(ids):
        return gm(ids)

    # what PPL is read on: "ppl" the --eval-ppl file, "ppl_holdout" the held-out training windows
    targets = {}
    if eval_ppl:
        targets["ppl"] = (eval_file_tokens(tokenizer, eval_ppl), eval_seq_len, eval_windows, str(eval_ppl))
    if held_tokens is not None:
        targets["ppl_holdout"] = (held_tokens, cfg.seq_len, None, "holdout")

    def eval_now(tag: str, mode: str = "hard") -> dict:
        """{target: PPL record} of the model now (masks in `mode`)."""
        prev, state.mode = state.mode, mode
        out = {}
        for key, (tokens, seq_len, windows, source) in targets.items():
            r = perplexity(logits_fn, tokens, seq_len=seq_len, max_windows=windows, device=device,
                           desc=f"{key} {tag}", progress=progress and info.main)
            r["file"] = source
            log(f"PPL ({tag}, {source}) {r['ppl']:.3f} on {r['windows']} windows of {r['seq_len']}")
            out[key] = r
        state.mode = prev
        return out

    if not resume:
        set_hard(nodes, extract(nodes, cfg.sparsity))
        extra["ppl_init"] = eval_now("one-shot start")
        extra["ppl_dense"] = eval_now("dense", mode="off")

    def eval_hook(step: int) -> dict | None:
        """{"ppl": .., "ppl_holdout": ..} of the extracted masks every eval_every steps (None otherwise)."""
        if not eval_every or not targets or step % eval_every or step == cfg.steps:  # the final one: below
            return None
        set_hard(nodes, extract(nodes, cfg.sparsity))
        return {k: r["ppl"] for k, r in eval_now(f"step {step}").items()}

    if cfg.learns and start_step < cfg.steps:
        train_gm = torch.compile(gm, dynamic=False) if compile else gm  # the training forward (and its backward)
        train_loop(train_gm, nodes, state, cfg, corpus, out, start_step, opt, extra, device, save_every, log, eval_hook,
                   w_norm_total=mg.weight_norm, info=info, step_in_backward=step_in_backward, graphs=graphs)

    hard = extract(nodes, cfg.sparsity)
    set_hard(nodes, hard)
    state.mode = "hard"
    report = sparsity_report(plan, nodes, hard, tile, cfg.sparsity)
    ppl_final = eval_now("final")
    tensors = {}
    for n, (b, p) in zip(nodes, hard):
        tensors[f"{n.name}/tile_logits"] = _full(n.tile_logits).detach()
        tensors[f"{n.name}/bitmap"] = b.to(torch.uint8)
        tensors[f"{n.name}/pattern"] = p
    state_bytes = _state_bytes(nodes, opt)
    result = {
        "version": PRUNE_VERSION,
        "model": model,
        "model_source": model_source,
        **source,
        "architecture": architecture,
        "dtype": dtype_name(dtype),
        "tile": tile,
        "config": cfg.to_json(),
        "tokens_trained": cfg.steps * global_batch * cfg.grad_accum * cfg.seq_len if cfg.learns else 0,
        "processes": info.world,
        "training_state": state_bytes,
        "sparsity": {k: v for k, v in report.items() if k not in ("layers", "skipped")},
        "coverage": coverage,
        **{key: {"dense": _by_target(extra.get("ppl_dense")).get(key), "init": _by_target(extra.get("ppl_init")).get(key),
                 "final": ppl_final.get(key)} for key in ("ppl", "ppl_holdout") if key == "ppl" or key in targets},
        "groups": [asdict(g) for g in plan.groups],
        "layers": report["layers"],
        "skipped": report["skipped"],
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    if not keep_checkpoint and ckpt.exists(out):
        ckpt.remove(out, info)
    if info.main:
        write_safetensors(out / "masks.safetensors", tensors, {"format": "patchc-masks-1", "tile": str(tile)})
        write_json(out / "prune.json", result)
        out = finish_prune_output(out, Path(out_dir))  # a replacement goes into place only now, complete
    else:
        out = Path(out_dir)
    pdist.barrier(info)
    log(f"sparsity {report['achieved']:.4f} (target {cfg.sparsity}) -> {out / 'prune.json'}")
    return PruneResult(out_dir=out, report=result, model=hf, graph=gm)


def _by_target(rec: dict | None) -> dict:
    """A checkpoint's recorded PPL as {target: record}; checkpoints written before held-out windows existed
    hold the --eval-ppl record itself."""
    return {"ppl": rec} if rec and isinstance(rec.get("ppl"), (int, float)) else (rec or {})


def _placeholder_init(plan, tile: int, cfg: PruneConfig, patterns: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Zero logits of the right shapes and the saved fixed patterns: a resumed run's nodes, filled by ckpt.load."""
    out = {}
    for s in plan.masked:
        e = {"tile_logits": torch.zeros(*s.lead, s.out_features // tile, s.in_features // tile),
             "pattern": patterns[s.name]}
        if cfg.mode == "joint" and cfg.learns:
            e["pattern_logits"] = torch.zeros(*s.lead, s.out_features, s.in_features // 4, 6)
        out[s.name] = e
    return out


def _state_bytes(nodes: list[MaskNode], opt) -> dict:
    """Bytes of mask logits + optimizer state per masked weight (whole model, all ranks together)."""
    weights = sum(n.numel for n in nodes)
    total = 0
    for p in opt_params(nodes):
        per = LeanAdamW.state_bytes_per_element(p) if opt is not None else p.element_size()
        total += p.numel() * per
    return {"bytes": total, "masked_weights": weights, "bytes_per_masked_weight": round(total / max(weights, 1), 4)}


def train_loop(gm, nodes: list[MaskNode], state: MaskState, cfg: PruneConfig, corpus: TokenCorpus, out: Path,
               start_step: int, opt: LeanAdamW, extra: dict, device, save_every: int, log, eval_hook=None, *,
               w_norm_total: float, info: pdist.DistInfo | None = None, step_in_backward: bool = False,
               graphs: bool = False) -> None:
    info = info or pdist.DistInfo()
    log_path = out / "log.jsonl"
    if info.main:
        _truncate_log(log_path, start_step)
    last_good = start_step
    global_batch = info.world * cfg.batch_size
    n_seq = corpus.num_sequences(cfg.seq_len)
    trainer = TrainStep(gm, nodes, state, cfg, opt, (cfg.batch_size, cfg.seq_len), w_norm_total, device, info=info,
                        step_in_backward=step_in_backward, graphs=graphs, log=log)
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="prune",
               disable=not (log.progress and info.main))
    try:
        for step in bar:
            def batch(micro: int, step=step) -> torch.Tensor:      # [B, S] token ids of this rank's micro-batch
                idx = batch_indices(n_seq, step * cfg.grad_accum + micro, global_batch, cfg.seed)
                return corpus.sequences(rank_slice(idx, info.rank, info.world), cfg.seq_len)
            sums, bad = trainer.run(step, batch)
            if bad == "loss":
                raise TrainingDiverged(
                    f"loss became non-finite at step {step}; stopped. The last good checkpoint (step {last_good}) "
                    f"is {out / ckpt.CKPT}: lower --lr or the regularisers and --resume, or start over")
            if bad == "logits":
                raise TrainingDiverged(f"mask logits became non-finite at step {step}; last good checkpoint: step "
                                       f"{last_good} in {out / ckpt.CKPT}")
            lr = sums.pop("lr")
            for k in ("loss", "ce", "kl"):
                sums[k] = pdist.mean_(sums[k], info, device)
            rec = {"step": step + 1, **{k: round(v, 6) for k, v in sums.items()}, "tau": round(state.tau, 5),
                   "lr": lr, "sparsity": round(1.0 - sums["density"], 5)}
            for key, ppl in ((eval_hook(step + 1) if eval_hook else None) or {}).items():
                rec[key] = round(ppl, 4)
            if info.main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{sums['loss']:.3f}", ce=f"{sums['ce']:.3f}", sparsity=f"{1 - sums['density']:.3f}",
                            tau=f"{state.tau:.2f}")
            if (step + 1) % save_every == 0 or step + 1 == cfg.steps:
                ckpt.save(out, step + 1, cfg.to_json(), extra, nodes, opt, info)
                last_good = step + 1
    finally:
        trainer.close()
    if trainer.graph is not None and trainer.graph.graphs:
        log(f"CUDA graphs: captured in {trainer.graph.capture_s:.1f}s, replayed for {trainer.replays} steps")
    bar.close()


def graph_blocker(nodes: list[MaskNode], opt: LeanAdamW) -> str | None:
    """Why this run's step cannot be captured in a CUDA graph once its nodes and optimizer exist (a node or an
    optimizer update off the Triton kernels would bake this step's noise seeds and values into the graph), or
    None."""
    for n in nodes:
        if not n.uses_kernels():
            return (f"mask node {n.name} ({n.out_features}x{n.in_features}, tile {n.tile}) is not served by the "
                    "mask kernels")
    return opt.kernels_only()


class TrainStep:
    """One optimisation step of prune: cfg.grad_accum micro-batches (forward, loss, backward), then the optimizer;
    eager, or replayed from CUDA graphs (graphs=True: patchc/step_graph.py) after step_graph.WARMUP_STEPS eager
    steps on a side stream. Both paths read every per-step value from the same persistent device tensors: the
    mask noise keys and knobs (MaskState.set_step), the optimizer's hp and keys (LeanAdamW), the loss's weight-norm
    coefficient (weight_coef) and the input ids (ids), so they compute the same thing.

    run(step, batch) -> (means of loss / ce / kl / density over the micro-batches and the lr, None or the failed
    check: "loss" (a non-finite loss) or "logits" (non-finite mask logits after the update)). Eager, a non-finite
    loss stops before its backward; replayed, the checks read the graphs' static outputs after the step (the one
    host sync of a replayed step), so the update has run: the caller stops either way and keeps its checkpoint.
    Replayed with grad_accum > 1, the means are summed on the device in float32 (eager: on the host in float64):
    the logged values may differ in the last digits, the masks do not."""

    def __init__(self, gm, nodes: list[MaskNode], state: MaskState, cfg: PruneConfig, opt: LeanAdamW,
                 ids_shape: tuple[int, int], w_norm_total: float, device, *, info: pdist.DistInfo | None = None,
                 step_in_backward: bool = False, graphs: bool = False, log=None):
        self.gm, self.nodes, self.state, self.cfg, self.opt = gm, nodes, state, cfg, opt
        self.device, self.info, self.w_norm_total = device, info or pdist.DistInfo(), w_norm_total
        self.step_in_backward = step_in_backward
        self.params = opt_params(nodes)
        self.numel = torch.tensor([float(n.numel) for n in nodes], device=device)          # [nodes]
        self.ids = torch.zeros(ids_shape, dtype=torch.int64, device=device)                 # [B, S] static input
        self.weight_coef = torch.zeros((), dtype=torch.float32, device=device)  # weight_reg * (1 - step / steps)
        self.hooks = opt.step_in_backward() if step_in_backward else []
        self.graph, self.warm, self.replays = None, 0, 0
        if graphs:
            why = graph_blocker(nodes, opt)
            if why:
                (log or print)(f"CUDA graphs off, the step runs eagerly: {why}")
            else:
                self.graph = step_graph.StepGraph(device)
                # [loss, ce, kl, density] summed over the micro-batches / grad_accum, then 1.0 if every mask logit
                # is finite after the update: the graphs' static outputs, read once a step
                self.stats = torch.zeros(5, dtype=torch.float32, device=device)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def schedule(self, step: int) -> float:
        """The step's schedule values into the state, the optimizer and weight_coef; returns the lr."""
        cfg, st = self.cfg, self.state
        st.mode = "soft"
        st.tau = hm.linear_schedule(*cfg.tau, step, cfg.steps)
        st.scale_tile = hm.linear_schedule(*cfg.scale_tile, step, cfg.steps)
        st.scale_24 = hm.linear_schedule(*cfg.scale_24, step, cfg.steps)
        lr = hm.cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.weight_coef.fill_(cfg.weight_reg * (1.0 - step / cfg.steps))
        return lr

    def _inputs(self, step: int, micro: int, batch) -> None:
        """Noise keys, knobs and input ids of one micro-batch, written in place."""
        self.state.set_step(step, micro, len(self.nodes), self.device)
        self.ids.copy_(batch(micro))

    def run(self, step: int, batch) -> tuple[dict, str | None]:
        lr = self.schedule(step)
        if self.graph is None:
            sums, bad = self._eager(step, batch)
        elif self.warm < step_graph.WARMUP_STEPS:
            with self.graph.side_stream():
                sums, bad = self._eager(step, batch)
            self.warm += 1
        else:
            sums, bad = self._replay(step, batch)
        return {**sums, "lr": lr}, bad

    def _eager(self, step: int, batch) -> tuple[dict, str | None]:
        cfg, info, ga = self.cfg, self.info, self.cfg.grad_accum
        self.opt.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "ce": 0.0, "density": 0.0, "kl": 0.0}
        for micro in range(ga):
            self._inputs(step, micro, batch)
            loss, ce, kl, density = step_loss(self.gm, self.nodes, self.state, cfg, self.ids, self.numel,
                                              self.w_norm_total, self.weight_coef)
            if pdist.any_(not torch.isfinite(loss).item(), info, self.device):
                return sums, "loss"
            (loss / ga).backward()
            sums["loss"] += loss.item() / ga
            sums["ce"] += ce.item() / ga
            sums["kl"] += kl.item() / ga
            sums["density"] += density.item() / ga
        if not self.step_in_backward:
            pdist.all_reduce_replicated_grads_(self.nodes, info)
            self.opt.step()
        bad = not bool(torch.stack([torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()
                                    for p in self.params]).all())  # one host sync
        return sums, ("logits" if pdist.any_(bad, info, self.device) else None)

    def _replay(self, step: int, batch) -> tuple[dict, str | None]:
        if not self.graph.graphs:    # before the first capture: every .grad a static buffer, zero
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.opt.zero_grad(set_to_none=False)
        self.stats.zero_()
        for micro in range(self.cfg.grad_accum):
            self._inputs(step, micro, batch)
            self.graph.run("micro-step", self._graphed_micro)
        todo = self.opt.begin_step()          # host: step counts, hp and keys of this step written in place
        self.graph.run("optimizer", lambda: self._graphed_update(todo))
        loss, ce, kl, density, finite = self.stats.tolist()     # the one host sync of the step
        self.replays += 1
        sums = {"loss": loss, "ce": ce, "density": density, "kl": kl}
        return sums, ("loss" if not math.isfinite(loss) else "logits" if finite < 1.0 else None)

    def _graphed_micro(self) -> None:
        """Captured: one micro-batch's forward, loss and backward (into the static .grad), its values into stats."""
        ga = self.cfg.grad_accum
        loss, ce, kl, density = step_loss(self.gm, self.nodes, self.state, self.cfg, self.ids, self.numel,
                                          self.w_norm_total, self.weight_coef)
        (loss / ga).backward()
        self.stats[:4] += torch.stack([loss, ce, kl, density]).detach().float() / ga

    def _graphed_update(self, todo) -> None:
        """Captured: the optimizer update, the finiteness check of the logits, the gradients zeroed for the next
        step."""
        self.opt.finish_step(todo)
        self.stats[4] = torch.stack([torch.isfinite(p).all() for p in self.params]).all().float()
        torch._foreach_zero_([p.grad for p in self.params])


def step_loss(gm, nodes: list[MaskNode], state: MaskState, cfg: PruneConfig, ids: torch.Tensor, numel: torch.Tensor,
              w_norm_total: float, weight_coef: torch.Tensor):
    """One micro-batch: (loss, ce, kl, density). The teacher (distillation) is the same graph with masks off.
    weight_coef: 0-d float32 device tensor, cfg.weight_reg * (1 - step / cfg.steps) (TrainStep.schedule)."""
    kl = torch.zeros((), device=ids.device)
    if cfg.distill > 0:
        with torch.no_grad():
            state.mode = "off"
            teacher = gm(ids).float()
            state.mode = "soft"
    logits = gm(ids)  # [B, S, V]
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    if cfg.distill > 0:
        kl = F.kl_div(F.log_softmax(logits.float(), -1).flatten(0, 1), F.log_softmax(teacher, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
    gates = torch.stack([n.last_gate for n in nodes])
    density = ((0.5 + 0.5 * gates) * numel).sum() / numel.sum()
    kept_norm = torch.stack([n.last_norm for n in nodes]).sum() / w_norm_total
    loss = (ce + cfg.distill * kl + cfg.sparse_reg * (density - (1.0 - cfg.sparsity)).abs()
            - weight_coef * kept_norm)
    return loss, ce, kl, density


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
