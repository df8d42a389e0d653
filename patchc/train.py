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
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from patchc import mask as hm
from patchc.data import batch_indices, chunk, tokenize_files
from patchc.evaluate import eval_file_tokens, perplexity
from patchc.io import read_safetensors, read_safetensors_metadata, write_json, write_safetensors
from patchc.models import dtype_name, load_model, resolve_device, resolve_dtype
from patchc.oneshot import ONESHOT_METHODS, collect_input_stats, oneshot_pattern, tile_kept_fraction, tile_prior, weight_2d
from patchc.passes import MaskNode, MaskState, capture, find_linears, insert_masks
from patchc.passes.capture import PREFIX
from patchc.passes.insert_masks import mask_nodes

PRUNE_VERSION = 1
MODES = ("tile", "joint")
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
    steps: int = 100
    seq_len: int = 1024
    batch_size: int = 4
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
    calib_samples: int = 32
    seed: int = 0
    include: tuple = ()
    exclude: tuple = ()

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
            if getattr(self, k) < (0 if k == "steps" else 1):
                raise ValueError(f"{k} must be positive, got {getattr(self, k)}")
        if self.seq_len < 2:
            raise ValueError("seq_len must be at least 2")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "PruneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})

    @property
    def learns(self) -> bool:
        return self.method == "patch" and self.steps > 0


@dataclass
class PruneResult:
    out_dir: Path
    report: dict
    model: torch.nn.Module = field(repr=False)       # the HF model (weights untouched)
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


def init_masks(model, plan, tile: int, cfg: PruneConfig, calib: torch.Tensor, device, log) -> dict[str, dict]:
    """Per masked linear: tile_logits [R, C], pattern [out, in/4] and (joint) pattern_logits [out, in/4, 6]."""
    need_stats = cfg.oneshot != "magnitude" or cfg.method in ("wanda", "sparsegpt")
    method24 = cfg.method if cfg.method in ONESHOT_METHODS else cfg.oneshot
    stats = {}
    if need_stats or cfg.method in ("patch", "hybrid"):
        log(f"calibration: {len(calib)} sequences x {calib.shape[-1]} tokens")
        with tqdm(total=len(calib), desc="calibration", leave=False, disable=not log.progress) as bar:
            stats = collect_input_stats(model, plan.masked, calib.to(device).unsqueeze(1),
                                        hessian=(method24 == "sparsegpt"), progress=bar)
    g = torch.Generator().manual_seed(cfg.seed)
    out = {}
    for site in tqdm(plan.masked, desc=f"one-shot {method24}", leave=False, disable=not log.progress):
        w = weight_2d(model, site.name, site.transposed)
        st = stats.get(site.name)
        pattern = oneshot_pattern(method24, w, st).cpu()
        r, c = site.out_features // tile, site.in_features // tile
        logits = torch.randn(r, c, generator=g) * cfg.init_std
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


def build_nodes(plan, tile: int, state: MaskState, init: dict[str, dict], device) -> dict[str, MaskNode]:
    return {s.name: MaskNode(s, tile, state, init[s.name]["tile_logits"], init[s.name]["pattern"],
                             init[s.name].get("pattern_logits")).to(device)
            for s in plan.masked}


@dataclass
class MaskedGraph:
    """A model's captured graph with a MaskNode on every masked linear (what prune trains)."""
    gm: torch.fx.GraphModule
    nodes: list[MaskNode]
    plan: object                # passes.find_linears.LinearPlan
    tile: int
    state: MaskState
    capture_s: float


def mask_graph(model, cfg: PruneConfig, calib: torch.Tensor, device, *, init: dict[str, dict] | None = None,
               recompute_masks: bool = False, log=None, name: str = "the model") -> MaskedGraph:
    """Capture `model`, choose the tile, find the maskable linears and insert initialised mask nodes: the
    set-up every prune run (and bench/train_speed.py) does. init: mask logits to start from (a resumed
    checkpoint's); None initialises them from the one-shot prior on `calib`."""
    log = log or _Log(progress=False)
    cap = capture(model)
    tile = choose_tile(cap.gm, cfg)
    plan = find_linears(cap.gm, tile, list(cfg.include), list(cfg.exclude))
    if not plan.masked:
        raise ValueError(f"no linear layer of {name} can be masked with tile size {tile}: "
                         + "; ".join(f"{s.name}: {s.skip_reason}" for s in plan.skipped[:4]))
    log(f"graph captured in {cap.seconds:.1f}s ({cap.strategy}): {len(plan.masked)} linears masked, "
        f"{len(plan.skipped)} kept dense, tile {tile}, {len(plan.groups)} shared-input groups")
    state = MaskState(generator=torch.Generator(device=device), checkpoint=recompute_masks)
    if init is None:
        init = init_masks(model, plan, tile, cfg, calib, device, log)
    gm = insert_masks(cap.gm, plan, build_nodes(plan, tile, state, init, device))
    return MaskedGraph(gm, mask_nodes(gm), plan, tile, state, cap.seconds)


# ---------------------------------------------------------------------------------------------
# Extraction: exact global target
# ---------------------------------------------------------------------------------------------
def extract(nodes: list[MaskNode], sparsity: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Hard (bitmap [R, C] bool, pattern [out, in/4] uint8) per node, global sparsity exact to one tile."""
    bitmaps = hm.select_dense_tiles([n.tile_logits for n in nodes], sparsity)
    return [(b.cpu(), n.hard_pattern_now().cpu()) for b, n in zip(bitmaps, nodes)]


def set_hard(nodes: list[MaskNode], hard) -> None:
    for n, (b, p) in zip(nodes, hard):
        n.set_hard(b, p)


def sparsity_report(plan, nodes: list[MaskNode], hard, tile: int, target: float) -> dict:
    layers, zeros, total = [], 0, 0
    for site, n, (b, _) in zip(plan.masked, nodes, hard):
        s = hm.layer_sparsity(b)
        layers.append({"name": site.name, "role": site.role, "shape": [site.out_features, site.in_features],
                       "tiles": b.numel(), "dense_tiles": int(b.sum()), "sparsity": round(s, 6),
                       "group": site.group, "transposed": site.transposed})
        zeros += s * n.numel
        total += n.numel
    all_total = total + sum(s.out_features * s.in_features for s in plan.skipped)
    achieved = zeros / total if total else 0.0
    return {
        "target": target, "achieved": achieved,
        "achieved_all_linears": zeros / all_total if all_total else 0.0,
        "one_tile": 0.5 * tile * tile / total if total else 0.0,
        "masked_params": total, "all_linear_params": all_total,
        "layers": layers,
        "skipped": [{"name": s.name, "shape": [s.out_features, s.in_features], "reason": s.skip_reason}
                    for s in plan.skipped],
    }


# ---------------------------------------------------------------------------------------------
# Checkpoints (one safetensors file; scalars and config in its metadata)
# ---------------------------------------------------------------------------------------------
CKPT = "checkpoint.safetensors"


def save_checkpoint(out: Path, step: int, cfg: PruneConfig, nodes: list[MaskNode], opt, extra: dict) -> None:
    tensors = {}
    for n in nodes:
        tensors[f"{n.name}/tile_logits"] = n.tile_logits.detach()
        tensors[f"{n.name}/pattern"] = n.hard_pattern if not n.joint else n.hard_pattern_now()
        if n.joint:
            tensors[f"{n.name}/pattern_logits"] = n.pattern_logits.detach()
    if opt is not None:
        for i, p in enumerate(opt_params(nodes)):
            for k, v in opt.state.get(p, {}).items():
                tensors[f"opt/{i}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    meta = {"format": "patchc-checkpoint-1", "step": str(step), "config": json.dumps(cfg.to_json()),
            "extra": json.dumps(extra)}
    write_safetensors(out / CKPT, tensors, meta)


def load_checkpoint(out: Path, cfg: PruneConfig) -> tuple[int, dict, dict, dict]:
    path = out / CKPT
    meta = read_safetensors_metadata(path)
    if meta.get("format") != "patchc-checkpoint-1":
        raise ValueError(f"{path} is not a patchc checkpoint (format {meta.get('format')!r})")
    saved = PruneConfig.from_json(json.loads(meta["config"]))
    if saved != cfg:
        diff = {k: (getattr(saved, k), getattr(cfg, k)) for k in saved.to_json() if getattr(saved, k) != getattr(cfg, k)}
        raise ValueError(f"--resume with a different configuration than the checkpoint's: {diff} (saved, given)")
    tensors = read_safetensors(path)
    init, opt_state = {}, {}
    for k, v in tensors.items():
        if k.startswith("opt/"):
            _, i, key = k.split("/", 2)
            opt_state.setdefault(int(i), {})[key] = v
        else:
            name, key = k.rsplit("/", 1)
            init.setdefault(name, {})[key] = v
    return int(meta["step"]), init, opt_state, json.loads(meta.get("extra", "{}"))


def opt_params(nodes: list[MaskNode]) -> list[torch.nn.Parameter]:
    return [p for n in nodes for p in ((n.tile_logits, n.pattern_logits) if n.joint else (n.tile_logits,))]


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
          save_every: int = 50, eval_every: int = 0, recompute_masks: bool = False,
          progress: bool = True) -> PruneResult:
    """Learn hybrid masks for `model` (a spec, see patchc.models) and write them to `out_dir`.
    recompute_masks=True recomputes the soft masks in backward instead of keeping them: less memory, slower
    steps, identical results (the learned masks do not depend on it).
    eval_every > 0 (with eval_ppl): every that many steps, the masks extracted at the exact target are
    evaluated and their PPL logged (log.jsonl "ppl"): the learning curve, e.g. to find the token budget
    that saturates quality. It changes nothing the run learns."""
    cfg = config or PruneConfig()
    cfg.validate()
    if eval_every and not eval_ppl:
        raise ValueError("--eval-every needs --eval-ppl FILE (the text to evaluate on)")
    log = _Log(progress)
    device = resolve_device(device)           # "auto": cuda if available, else cpu
    dtype = resolve_dtype(dtype, device)      # "auto": bf16 on cuda, fp32 on cpu
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise FileExistsError(f"output folder {out} exists and is not empty: pass --resume to continue "
                                  "its run or --overwrite to replace it")
        shutil.rmtree(out)
    if resume and not (out / CKPT).is_file():
        raise FileNotFoundError(f"--resume: {out / CKPT} does not exist (no checkpoint to continue)")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    loaded = load_model(model, device=device, dtype=dtype, seed=cfg.seed)
    hf = loaded.model
    need = max(cfg.steps * cfg.batch_size * cfg.grad_accum, cfg.calib_samples if cfg.method != "magnitude" else 1)
    tokens = tokenize_files(loaded.tokenizer, data, max_tokens=need * cfg.seq_len + 1)
    seqs = chunk(tokens, cfg.seq_len, "training data")
    log(f"data: {tokens.numel():,} tokens -> {len(seqs)} sequences of {cfg.seq_len}")

    start_step, init, opt_state, extra = 0, None, {}, {}
    if resume:
        start_step, init, opt_state, extra = load_checkpoint(out, cfg)
    mg = mask_graph(hf, cfg, seqs[: cfg.calib_samples], device, init=init, recompute_masks=recompute_masks, log=log,
                    name=model)
    if resume:
        log(f"resuming from step {start_step}")
    gm, nodes, plan, tile, state = mg.gm, mg.nodes, mg.plan, mg.tile, mg.state

    def logits_fn(ids):
        return gm(ids)

    eval_tokens = eval_file_tokens(loaded.tokenizer, eval_ppl) if eval_ppl else None  # tokenised once

    def eval_now(tag: str, mode: str = "hard") -> dict | None:
        if eval_tokens is None:
            return None
        prev, state.mode = state.mode, mode
        r = perplexity(logits_fn, eval_tokens, seq_len=eval_seq_len, max_windows=eval_windows, device=device,
                       desc=f"ppl {tag}", progress=progress)
        state.mode = prev
        r["file"] = str(eval_ppl)
        log(f"PPL ({tag}) {r['ppl']:.3f} on {r['windows']} windows of {r['seq_len']}")
        return r

    if not resume:
        set_hard(nodes, extract(nodes, cfg.sparsity))
        extra["ppl_init"] = eval_now("one-shot start")
        extra["ppl_dense"] = eval_now("dense", mode="off")

    def eval_hook(step: int) -> float | None:
        if not eval_every or step % eval_every or step == cfg.steps:  # the final one is evaluated below
            return None
        set_hard(nodes, extract(nodes, cfg.sparsity))
        return eval_now(f"step {step}")["ppl"]

    if cfg.learns and start_step < cfg.steps:
        train_loop(gm, nodes, state, cfg, seqs, out, start_step, opt_state, extra, device, save_every, log, eval_hook)

    hard = extract(nodes, cfg.sparsity)
    set_hard(nodes, hard)
    state.mode = "hard"
    report = sparsity_report(plan, nodes, hard, tile, cfg.sparsity)
    ppl_final = eval_now("final")
    tensors = {}
    for n, (b, p) in zip(nodes, hard):
        tensors[f"{n.name}/tile_logits"] = n.tile_logits.detach()
        tensors[f"{n.name}/bitmap"] = b.to(torch.uint8)
        tensors[f"{n.name}/pattern"] = p
    write_safetensors(out / "masks.safetensors", tensors, {"format": "patchc-masks-1", "tile": str(tile)})
    result = {
        "version": PRUNE_VERSION,
        "model": model,
        "model_source": loaded.source,
        "architecture": type(hf).__name__,
        "dtype": dtype_name(dtype),
        "tile": tile,
        "config": cfg.to_json(),
        "tokens_trained": cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len if cfg.learns else 0,
        "sparsity": {k: v for k, v in report.items() if k not in ("layers", "skipped")},
        "ppl": {"dense": extra.get("ppl_dense"), "init": extra.get("ppl_init"), "final": ppl_final},
        "groups": [asdict(g) for g in plan.groups],
        "layers": report["layers"],
        "skipped": report["skipped"],
        "seconds": round(time.perf_counter() - t_start, 2),
    }
    write_json(out / "prune.json", result)
    log(f"sparsity {report['achieved']:.4f} (target {cfg.sparsity}) -> {out / 'prune.json'}")
    return PruneResult(out_dir=out, report=result, model=hf, graph=gm)


def train_loop(gm, nodes: list[MaskNode], state: MaskState, cfg: PruneConfig, seqs: torch.Tensor, out: Path,
               start_step: int, opt_state: dict, extra: dict, device, save_every: int, log, eval_hook=None) -> None:
    params = opt_params(nodes)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if opt_state:
        for i, p in enumerate(params):
            opt.state[p] = {k: v.to(device) if k != "step" else v for k, v in opt_state[i].items()}
    numel = torch.tensor([float(n.numel) for n in nodes], device=device)
    w_norm_total = sum(_weight_norms(gm, nodes))
    log_path = out / "log.jsonl"
    _truncate_log(log_path, start_step)
    last_good = start_step
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="prune",
               disable=not log.progress)
    for step in bar:
        state.mode = "soft"
        state.tau = hm.linear_schedule(*cfg.tau, step, cfg.steps)
        state.scale_tile = hm.linear_schedule(*cfg.scale_tile, step, cfg.steps)
        state.scale_24 = hm.linear_schedule(*cfg.scale_24, step, cfg.steps)
        lr = hm.cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "ce": 0.0, "density": 0.0, "kl": 0.0}
        for micro in range(cfg.grad_accum):
            state.generator.manual_seed(cfg.seed * 1_000_003 + step * 97 + micro)
            ids = seqs[batch_indices(len(seqs), step * cfg.grad_accum + micro, cfg.batch_size, cfg.seed)].to(device)
            loss, ce, kl, density = step_loss(gm, nodes, state, cfg, ids, numel, w_norm_total, step)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at step {step}; stopped. The last good checkpoint (step {last_good}) "
                    f"is {out / CKPT}: lower --lr or the regularisers and --resume, or start over")
            (loss / cfg.grad_accum).backward()
            sums["loss"] += loss.item() / cfg.grad_accum
            sums["ce"] += ce.item() / cfg.grad_accum
            sums["kl"] += kl.item() / cfg.grad_accum
            sums["density"] += density.item() / cfg.grad_accum
        opt.step()
        if any(not torch.isfinite(p).all() for p in params):
            raise TrainingDiverged(f"mask logits became non-finite at step {step}; last good checkpoint: step "
                                   f"{last_good} in {out / CKPT}")
        rec = {"step": step + 1, **{k: round(v, 6) for k, v in sums.items()}, "tau": round(state.tau, 5),
               "lr": lr, "sparsity": round(1.0 - sums["density"], 5)}
        ppl = eval_hook(step + 1) if eval_hook else None
        if ppl is not None:
            rec["ppl"] = round(ppl, 4)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(loss=f"{sums['loss']:.3f}", ce=f"{sums['ce']:.3f}", sparsity=f"{1 - sums['density']:.3f}",
                        tau=f"{state.tau:.2f}")
        if (step + 1) % save_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(out, step + 1, cfg, nodes, opt, extra)
            last_good = step + 1
    bar.close()


def step_loss(gm, nodes: list[MaskNode], state: MaskState, cfg: PruneConfig, ids: torch.Tensor, numel: torch.Tensor,
              w_norm_total: float, step: int):
    """One micro-batch: (loss, ce, kl, density). The teacher (distillation) is the same graph with masks off."""
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
            - cfg.weight_reg * (1.0 - step / cfg.steps) * kept_norm)
    return loss, ce, kl, density


@torch.no_grad()
def _weight_norms(gm, nodes: list[MaskNode]) -> list[float]:
    """||W||_F of every masked weight (the denominator of the weight-norm term)."""
    return [float(gm.get_parameter(PREFIX + n.name).float().norm()) for n in nodes]


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
