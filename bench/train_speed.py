"""Mask-training cost: step time and peak memory of PATCH-Tile / PATCH-Joint vs a plain forward+backward.

Per model (bf16 on the GPU, random token batches):
  plain        forward + CE + backward through every weight (the cost of ordinary fine-tuning, no optimizer)
  tile / joint one prune step as patchc.train runs it: MaskNodes in soft mode, CE + density + weight-norm
               terms, with (kd) or without the distillation teacher forward, backward into the mask logits,
               AdamW step on the logits (patchc.train.step_loss: the same code as the trainer);
               Eager, as `patchc prune` runs by default: on the GPU the Triton kernels of patchc/mask_kernels.py
               form W * M and the logit gradients. Ablations: +torch: those from torch ops instead
               (PATCHC_MASK_KERNELS=0); +compile: the whole training graph under torch.compile (prune's compile=True);
               +graph: the step replayed from CUDA graphs (prune's --cuda-graphs, patchc/step_graph.py): its first
               step runs the eager warm-up steps and the capture (first_step_s; capture alone: graph_capture_s)
Models: SmolLM2-135M (its real weights; batch 8 x 2048) and random-weight LLaMA-shaped models from
LLAMA_SHAPES; `--fit` tries PATCH-Joint (eager, optimizer step in backward, batch 1 x 2048) on larger shapes to
find the largest whose step fits the GPU.
    python bench/train_speed.py --out bench/results/train_speed [--models smollm2,llama3.2-1b] [--fit llama3.2-3b,llama3-8b]
    python bench/train_speed.py --quick --device cpu --out /tmp/ts      # tiny shapes (tests)
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BENCH = sys.path.pop(0) if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench" else None
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers.activations  # noqa: E402,F401  (before bench/ is on the path: its kernels.py is not the hub's)

sys.path.insert(0, str(ROOT))
if _BENCH:
    sys.path.insert(0, _BENCH)

from patchc import PruneConfig, config  # noqa: E402
from patchc.models import load_model  # noqa: E402
from patchc import step_graph  # noqa: E402
from patchc.train import TrainStep, make_optimizer, mask_graph, opt_params  # noqa: E402

from report import machine_env, write_report  # noqa: E402  (bench/report.py)

LLAMA_SHAPES = {  # hidden, ffn, layers, heads, kv heads, vocab
    "smollm2-shape": (576, 1536, 30, 9, 3, 49152),       # SmolLM2-135M's shapes, random weights
    "llama3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama3.2-3b": (3072, 8192, 28, 24, 8, 128256),
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "tiny": (128, 256, 2, 4, 2, 384),
}


def build(name: str, device, dtype):
    if name == "smollm2":
        return load_model("smollm2-135m", device=device, dtype=dtype).model
    from transformers import LlamaConfig, LlamaForCausalLM

    h, f, n, heads, kv, vocab = LLAMA_SHAPES[name]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=f, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=True)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else None
    return model.eval()


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, reps: int, warmup: int = 3):
    """(median, min, max) ms of `reps` calls after `warmup` calls, and the first call's seconds (compile)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3, first_s


def peak_reset(device):
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if str(device).startswith("cuda") else None


def plain_step(model, ids):
    for p in model.parameters():
        p.requires_grad_(True)

    def step():
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        for p in model.parameters():
            p.grad = None
    return step


def mask_step(model, ids, mode: str, distill: float, device, *, compile: bool = True, state: str = "lean",
              in_backward: bool = False, mask_kernels: bool = True, graphs: bool = False):
    """A prune step's closure as patchc.train runs it (graph capture, mask init with the magnitude prior: no
    calibration): patchc.train.TrainStep, i.e. MaskNodes in soft mode, CE + density + weight-norm (+ KL) terms,
    backward into the mask logits, LeanAdamW step (in backward when asked). compile: the training graph under
    torch.compile; graphs: the step replayed from CUDA graphs (the first call runs the warm-up and the capture)."""
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = PruneConfig(sparsity=0.35, mode=mode, oneshot="magnitude", distill=distill, steps=100, state=state,
                      batch_size=ids.shape[0], seq_len=ids.shape[1], cuda_graphs=graphs)
    if graphs:
        why = step_graph.refusal(device, compile=compile, step_in_backward=in_backward, world=1,
                                 mask_kernels=mask_kernels and config.settings().mask_kernels)
        if why:
            raise ValueError(why)
    with config.override(mask_kernels=mask_kernels):
        mg = mask_graph(model, cfg, ids[:1], device, compile=compile)
    gm, nodes = mg.gm, mg.nodes
    run = torch.compile(gm, dynamic=False) if compile else gm
    opt = make_optimizer(nodes, cfg, compile=compile)
    trainer = TrainStep(run, nodes, mg.state, cfg, opt, tuple(ids.shape), mg.weight_norm, device,
                        step_in_backward=in_backward, graphs=graphs, log=print)
    if graphs and trainer.graph is None:
        raise ValueError("CUDA graphs were refused for this model (see the line above)")
    counter = [0]
    n_logits = sum(p.numel() for p in opt_params(nodes))
    state_bytes = sum(p.numel() * opt.state_bytes_per_element(p) for p in opt_params(nodes))
    info = {"masked_linears": len(nodes), "mask_params": n_logits, "tile": mg.tile, "capture_s": round(mg.capture_s, 1),
            "state_bytes_per_masked_weight": round(state_bytes / sum(n.numel for n in nodes), 4)}

    def one():
        _, bad = trainer.run(counter[0] % cfg.steps, lambda micro: ids)
        counter[0] += 1
        if bad:
            raise RuntimeError(f"non-finite {bad} at bench step {counter[0]}")

    def step():
        if graphs and not trainer.graph.graphs:   # first call: the eager warm-up steps, then capture + replay
            for _ in range(step_graph.WARMUP_STEPS):
                one()
            one()
            info["graph_capture_s"] = round(trainer.graph.capture_s, 2)
            return
        one()
    return step, info


def profile_step(fn, device) -> tuple[float, str]:
    """One more step under torch.profiler: (busy time of the device in ms, the top ops as a table). A step much
    longer than the busy time is host-bound (launches, Python), not device-bound."""
    from torch.profiler import ProfilerActivity, profile

    cuda = str(device).startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    ka = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    if cuda:   # the device's own events (kernels, copies), as the profiler's "Self CUDA time total": the ops
        from torch.autograd import DeviceType   # that launched them and user ranges would count them again
        busy = sum(e.self_device_time_total for e in ka
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e3
    else:
        busy = sum(e.self_cpu_time_total for e in ka) / 1e3
    return busy, ka.table(sort_by=key, row_limit=15, max_name_column_width=60)


def _error(e: Exception) -> str:
    """A row's error: the exception's first and last lines (a Triton compile error names the cause last)."""
    lines = [x for x in str(e).splitlines() if x.strip()]
    text = lines[0][:240] + (" ... " + lines[-1][:240] if len(lines) > 1 else "") if lines else ""
    return f"{type(e).__name__}: {text}"


def measure(name: str, kinds: list[str], batch: int, seq: int, device, dtype, reps: int,
            profiles: list[str] | None = None) -> list[dict]:
    """Rows of one model. profiles: a list to append each row's profiler table to (None: no profiling)."""
    rows = []
    for kind in kinds:
        peak_reset(device)
        model = build(name, device, dtype)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (batch, seq), device=device)
        n_params = sum(p.numel() for p in model.parameters())
        r = {"model": name, "params_M": round(n_params / 1e6, 1), "batch": batch, "seq": seq, "kind": kind}
        try:
            if kind == "plain":
                fn, info = plain_step(model, ids), {}
            else:
                # tile | joint, then +kd (distillation), +compile (the whole graph under torch.compile),
                # +torch (eager masks from torch ops, not the Triton kernels), +fp32 (fp32 logits and Adam
                # state), +ib (optimizer step in backward), +graph (the step replayed from CUDA graphs)
                mode, *opts = kind.split("+")
                fn, info = mask_step(model, ids, mode, 1.0 if "kd" in opts else 0.0, device, compile="compile" in opts,
                                     state="fp32" if "fp32" in opts else "lean", in_backward="ib" in opts,
                                     mask_kernels="torch" not in opts, graphs="graph" in opts)
            peak_reset(device)
            med, lo, hi, first = timed(fn, device, reps)
            r.update(info, step_ms=round(med, 1), step_ms_min=round(lo, 1), step_ms_max=round(hi, 1), reps=reps,
                     first_step_s=round(first, 1),
                     peak_GB=peak_gb(device), fits=True)
            if profiles is not None:
                busy, table = profile_step(fn, device)
                r["busy_ms"] = round(busy, 1)   # device (CPU: host) time of one profiled step
                profiles.append(f"## {name} {kind}: step {r['step_ms']} ms, busy {r['busy_ms']} ms\n\n{table}\n")
        except torch.OutOfMemoryError as e:
            r.update(fits=False, error=str(e).splitlines()[0][:160])
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the others
            r.update(fits=False, error=_error(e))
        rows.append(r)
        print(json.dumps(r), flush=True)
        del model
        peak_reset(device)
    base = next((x for x in rows if x["kind"] == "plain" and x.get("fits")), None)
    for x in rows:
        if base and x.get("fits") and x is not base:
            x["vs_plain"] = round(x["step_ms"] / base["step_ms"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/train_speed")
    ap.add_argument("--models", default="smollm2,llama3.2-1b")
    ap.add_argument("--kinds", default="plain,tile,joint,tile+kd,joint+kd,tile+torch,joint+torch,joint+fp32",
                    help="+kd: with distillation; +compile: the whole graph under torch.compile; +torch: masks from torch "
                         "ops, not the Triton kernels; +fp32: fp32 logit state; +ib: step in backward; +graph: the step "
                         "replayed from CUDA graphs (prune --cuda-graphs)")
    ap.add_argument("--model-kinds", default="", help="per-model kinds overriding --kinds: NAME=k1/k2,NAME2=...")
    ap.add_argument("--fit", default="", help="shapes to try PATCH-Joint (step in backward) on at batch 1 x seq")
    ap.add_argument("--batch", default="smollm2=8,smollm2-shape=8,llama3.2-1b=4")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="profile one more step per row: busy_ms (device busy time) and OUT/profiles.txt (top ops)")
    a = ap.parse_args()
    if a.quick:
        a.models, a.batch, a.seq, a.reps, a.fit = "tiny", "tiny=2", 64, 2, ""
        if a.kinds == ap.get_default("kinds"):
            a.kinds = "plain,tile,joint,joint+fp32,joint+ib"
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    batches = dict(kv.split("=") for kv in a.batch.split(",") if kv)
    rows = []
    profiles = [] if a.profile else None
    for name in a.models.split(","):
        per_model = dict(kv.split("=") for kv in a.model_kinds.split(",") if kv)
        kinds = per_model[name].split("/") if name in per_model else a.kinds.split(",")
        rows += measure(name, kinds, int(batches.get(name, 1)), a.seq, a.device, dtype, a.reps, profiles)
    for name in [n for n in a.fit.split(",") if n]:
        rows += measure(name, ["joint+ib"], 1, a.seq, a.device, dtype, 3, profiles)
    env = {**machine_env(a.device), "dtype": str(dtype)}
    print(report(Path(a.out), rows, env))
    if profiles:
        (Path(a.out) / "profiles.txt").write_text("\n".join(profiles))


COLUMNS = [("model", "model"), ("params M", "params_M"), ("batch x seq", lambda r: f"{r['batch']}x{r['seq']}"),
           ("kind", "kind"), ("run", lambda r: r.get("run", "")), ("step ms (min-max)", lambda r: f"{r['step_ms']} ({r['step_ms_min']}-{r['step_ms_max']})"
                                if "step_ms" in r else ""), ("vs plain", lambda r: r.get("vs_plain", "")),
           ("peak GB", lambda r: r.get("peak_GB", "")),
           ("state B/weight", lambda r: r.get("state_bytes_per_masked_weight", "")),
           ("busy ms", lambda r: r.get("busy_ms", "")),
           ("fits", lambda r: "yes" if r.get("fits") else ("OOM" if "memory" in r.get("error", "") else "error"))]


def report(out: Path, rows: list[dict], env: dict) -> str:
    """OUT/train_speed.{json,md} from measured rows (also to rebuild the markdown from a JSON)."""
    return write_report(out, "train_speed", f"Mask-training step cost ({env['device']}, torch {env['torch']}, "
                        f"{env['date']})", COLUMNS, rows, env, note=env.get("note", ""))


if __name__ == "__main__":
    main()
