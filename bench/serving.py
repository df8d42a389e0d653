"""Serving numbers at 7B scale, in one results file: bench/results/serving/serving.json (+ serving.md).

Two stages, each resumable (what serving.json already holds is skipped) and each runnable in its own process,
merging into the same file (written atomically after every case):

  kernels  one hybrid linear as the runtime dispatches it (launch.get_config + launch; kernel_sweep.bench_case)
           against cuBLAS, alternated --repeats rounds (median, min, max), float64 check first, on the LLaMA-2-7B
           and LLaMA-3-8B layer shapes, every M of --ms, at 25 / 35 / 45 / 50% sparsity
  e2e      the user's flow: a LLaMA-2-7B-shaped HF model with random bf16 weights saved to a folder (or --model),
           `patchc prune --mode tile --steps N` on generated text, `patchc lower`, then `patchc bench` (one process
           a batch) at each --batches: packed model against its dense twin under inductor reduce-overhead and
           max-autotune, rows alternated --repeats times, greedy agreement; speedup against the best dense row

    python bench/serving.py --stages kernels --budget-s 420     # GPU calls are limited: run again to go on
    python bench/serving.py --stages e2e --max-tasks 1          # model, prune, lower, then a batch a call
    python bench/serving.py --quick --device cpu --out /tmp/s   # tiny shapes, for tests (< 1 min on 2 cores)

Memory of an e2e batch (7B, `patchc bench --repeats > 1`): packed model (~9 GB at 35%) + dense twin (13.5 GB) +
one static KV cache (batch 128, 256 positions: 17 GB). Disk in --work: the HF model 13.5 GB + each lowered
checkpoint ~9 GB. Nothing outside --work and --out is written; --work subfolders are only ever created or
replaced by this script.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from patchc.io import write_json
from report import machine_env, save_results  # bench/report.py

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # (N, K) = (out, in), as kernel_sweep.SHAPES
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "quick": [(256, 512), (512, 256)],
}
MS = "1,2,4,8,16,32,64,128,256,512,1024,2048,4096"
LLAMA2_7B = dict(layers=32, hidden=4096, ffn=11008, heads=32, vocab=32000)   # bench/e2e.py SEVEN_B
QUICK = dict(layers=2, hidden=256, ffn=512, heads=4, vocab=384)                # bench/e2e.py QUICK


def log(msg: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- results file

def load_results(out: Path) -> dict:
    path = out / "serving.json"
    if not path.is_file():
        return {"kernels": [], "e2e": [], "env": {}}
    res = json.loads(path.read_text())
    for k in ("kernels", "e2e"):
        res.setdefault(k, [])
    res.setdefault("env", {})
    return res


def kernel_key(r: dict) -> tuple:
    return (r["shape"], r["m"], r["sparsity"])


def e2e_key(r: dict) -> tuple:
    return (r["model"], r["target_sparsity"], r["batch"])


def save(out: Path, res: dict) -> None:
    """serving.json and serving.md, atomically (report.save_results); rows sorted so that reruns diff cleanly."""
    res["kernels"].sort(key=lambda r: (r["shape"], r["m"], r["sparsity"]))
    res["e2e"].sort(key=lambda r: (r["model"], r["target_sparsity"], r["batch"]))
    latest = max(res["env"].values(), key=lambda e: e.get("written", 0), default=None)
    if latest:                                            # of the stage written last (each stage keeps its own)
        res.update(commit=latest.get("commit"), dirty=latest.get("dirty"), gpu=latest.get("gpu"),
                   versions={k: latest.get(k) for k in ("torch", "triton", "transformers", "python")})
    save_results(out, "serving", res, markdown(res))


def markdown(res: dict) -> str:
    md = ["# Serving: hybrid kernels and the 7B flow", ""]
    for stage, env in res.get("env", {}).items():
        md.append(f"- {stage}: commit {str(env.get('commit'))[:12]}{' (dirty)' if env.get('dirty') else ''}, "
                  f"{env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}, transformers "
                  f"{env.get('transformers')}, {env.get('repeats')} repeats, {env.get('date')}")
    rng = lambda v, lo, hi: f"{v} ({lo}-{hi})"  # noqa: E731
    if res["e2e"]:
        md += ["", "## End to end (tokens/s, median (min-max) of alternated repeats)", "",
               "| batch | sparsity | patch | dense reduce-overhead | dense max-autotune | speedup vs best dense | "
               "greedy agreement |", "|---|---|---|---|---|---|---|"]
        for r in res["e2e"]:
            md.append(f"| {r['batch']} | {r['sparsity']} | {rng(r['tok_s'], r['tok_s_min'], r['tok_s_max'])} | "
                      f"{r['dense_tok_s']} | {r.get('dense_maxautotune_tok_s', '')} | {r['speedup']} | "
                      f"{r['greedy_agreement']} |")
    if res["kernels"]:
        md += ["", "## Kernels (us, median (min-max) of alternated rounds)", "",
               "| shape | M | sparsity | kernel | patch us | cuBLAS us | speedup vs cuBLAS |", "|---|---|---|---|---|---|---|"]
        for r in res["kernels"]:
            md.append(f"| {r['shape']} | {r['m']} | {r['sparsity']} | {r['kernel']} | "
                      f"{rng(r['us'], r['us_min'], r['us_max'])} | {rng(r['cublas_us'], r['cublas_min'], r['cublas_max'])} "
                      f"| {r['speedup_vs_cublas']} |")
    if res.get("errors"):
        md += ["", "## Failed cases (tried again on the next run)", ""]
        md += [f"- {x['shape']} M={x['m']} s={x['sparsity']}: {x['error']}" for x in res["errors"]]
    return "\n".join(md) + "\n"


def set_env(res: dict, stage: str, env: dict) -> None:
    """The stage's environment, now; `commits` keeps every commit whose rows the stage holds (runs resume)."""
    old = res["env"].get(stage, {})
    commits = [c for c in old.get("commits", [old.get("commit")]) if c]
    if old and env.get("commit") not in commits:
        log(f"{stage}: serving.json holds rows measured at {commits}; now at {env.get('commit')} (recorded in commits)")
    env["commits"] = commits + [c for c in [env.get("commit")] if c not in commits]
    res["env"][stage] = env


class Budget:
    """Start no new case after `seconds` (None: no limit), nor more than `tasks` e2e steps (model, prune, lower, a
    batch: None, no limit). GPU calls are limited, so a run stops here and the next one resumes."""

    def __init__(self, seconds: float | None, tasks: int | None = None):
        self.seconds, self.tasks, self.t0 = seconds, tasks, time.perf_counter()

    def spent(self) -> bool:
        return ((self.seconds is not None and time.perf_counter() - self.t0 > self.seconds)
                or (self.tasks is not None and self.tasks <= 0))

    def task(self) -> bool:
        """Whether an e2e step may start (counting it if so)."""
        if self.spent():
            log("budget spent: run again to go on")
            return False
        if self.tasks is not None:
            self.tasks -= 1
        return True


# ------------------------------------------------------------------------------------------------ kernels stage

def kernel_row(n: int, k: int, m: int, sparsity: float, a, bw: float | None) -> dict:
    """One (shape, M, sparsity) as the runtime dispatches it, against cuBLAS, a.repeats alternated rounds."""
    if a.device.startswith("cuda"):
        import kernel_sweep  # bench/kernel_sweep.py: CUDA-graph replays over weight copies > L2, float64 check first

        kernel_sweep.ROUNDS = a.repeats
        r = kernel_sweep.bench_case(n, k, m, sparsity, a.tile, bw, {"cublas_us": None})
        patch, cublas = r["patch_runs_us"], r["cublas_runs_us"]
        kernel, err, achieved, floor = kernel_sweep.kernel_name(r), r["rel_err"], r["achieved"], r["floor_us"]
    else:
        patch, cublas, err, achieved = cpu_case(n, k, m, sparsity, a.tile, a.repeats)
        kernel, floor = "reference (CPU)", None
    us, cu = statistics.median(patch), statistics.median(cublas)
    return {"m": m, "shape": f"{n}x{k}", "sparsity": sparsity, "achieved": achieved, "kernel": kernel,
            "us": round(us, 2), "us_min": round(min(patch), 2), "us_max": round(max(patch), 2),
            "cublas_us": round(cu, 2), "cublas_min": round(min(cublas), 2), "cublas_max": round(max(cublas), 2),
            "speedup_vs_cublas": round(cu / us, 3), "repeats": len(patch), "rel_err": err, "floor_us": floor}


def cpu_case(n, k, m, sparsity, tile, rounds) -> tuple:
    """The CPU stand-in (tests): a HybridLinear on the reference path and F.linear, float64 check, wall clock."""
    import torch.nn.functional as F

    from patchc import mask as hm
    from patchc.format import pack_layer
    from patchc.runtime import HybridLinear

    g = torch.Generator().manual_seed(0)
    bitmap = torch.ones((n // tile) * (k // tile), dtype=torch.bool)
    bitmap[torch.randperm(bitmap.numel(), generator=g)[:hm.sparse_tile_budget(bitmap.numel(), sparsity)]] = False
    bitmap = bitmap.reshape(n // tile, k // tile)
    w = torch.randn(n, k, generator=g) * 0.02                                              # [N, K]
    pattern = torch.randint(0, 6, (n, k // 4), generator=g, dtype=torch.uint8)
    p = pack_layer(w, bitmap, pattern, tile)
    lin = HybridLinear(p, None, name="case")
    x = torch.randn(m, k, generator=g)                                                     # [M, K]
    wm = hm.apply_hybrid(w.double(), bitmap, hm.pattern_to_mask(pattern), tile)
    ref = x.double() @ wm.T                                                                # [M, N]
    with torch.no_grad():
        y = lin(x)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert math.isfinite(err) and err < 1.5e-2, f"N={n} K={k} M={m} s={sparsity}: rel err {err}"
        wd = wm.float()
        t_p, t_c = [], []
        for _ in range(rounds):                                                            # alternated
            for fn, acc in ((lambda: F.linear(x, wd), t_c), (lambda: lin(x), t_p)):
                t0 = time.perf_counter()
                fn()
                acc.append((time.perf_counter() - t0) * 1e6)
    return t_p, t_c, err, round(hm.layer_sparsity(p.bitmap), 4)


def run_kernels(a, out: Path, res: dict, budget: Budget) -> None:
    shapes = {}                                            # (N, K) -> the models that have it
    for name in a.shapes.split(","):
        for nk in SHAPES[name]:
            shapes.setdefault(nk, []).append(name)
    ms = [int(x) for x in a.ms.split(",")]
    sparsities = [float(x) for x in a.sparsities.split(",")]
    done = {kernel_key(r) for r in res["kernels"]}
    todo = [(n, k, m, s) for (n, k) in shapes for m in ms for s in sparsities if (f"{n}x{k}", m, s) not in done]
    log(f"kernels: {len(todo)} cases to run, {len(done)} already in serving.json")
    if not todo:
        return
    cuda = a.device.startswith("cuda")
    if cuda and not a.pdl:
        from patchc import config

        config.override(pdl=False).__enter__()            # plain launches, as kernel_sweep.py times them by default
    env = machine_env(a.device, repeats=a.repeats, tile=a.tile, pdl=a.pdl, stage="kernels", written=time.time())
    bw = env.get("copy_bandwidth_GBps", 0) * 1e9 or None
    set_env(res, "kernels", env)
    for i, (n, k, m, s) in enumerate(todo):
        if budget.spent():
            log(f"kernels: budget spent, {len(todo) - i} cases left: run again to go on")
            break
        try:
            r = {**kernel_row(n, k, m, s, a, bw), "models": shapes[(n, k)]}
        except Exception as e:  # noqa: BLE001 - recorded and reported; the case is tried again on the next run
            msg = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            log(f"kernels: {n}x{k} M={m} s={s}: FAILED: {msg}")
            res.setdefault("errors", []).append({"stage": "kernels", "shape": f"{n}x{k}", "m": m, "sparsity": s,
                                                 "error": msg, "commit": env.get("commit")})
            save(out, res)
            if cuda and "CUDA" in msg:
                raise                                     # the context may be unusable: stop, a new process resumes
            continue
        res["kernels"].append(r)
        res["errors"] = [x for x in res.get("errors", []) if (x["shape"], x["m"], x["sparsity"]) != kernel_key(r)]
        save(out, res)                                    # after every case: a killed run loses one case at most
        log(f"kernels: {r['shape']:>11} M={m:<5} s={s:.2f} {r['kernel']:<22} patch {r['us']:>9} us  cuBLAS "
            f"{r['cublas_us']:>9} us  {r['speedup_vs_cublas']:.3f}x  err {r['rel_err']:.1e}")


# ---------------------------------------------------------------------------------------------------- e2e stage

def build_model(folder: Path, shape: dict, device: str) -> None:
    """A LLaMA-shaped HF folder with random bf16 weights (bench/e2e.py's build) and patchc's byte tokenizer,
    written to FOLDER.tmp and renamed into place, so a folder that exists is complete."""
    from e2e import build  # bench/e2e.py

    from patchc.models import byte_tokenizer

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)                                # our own half-written folder from a killed run
    log(f"e2e: building {shape} with random bf16 weights on {device} -> {folder}")
    model = build(shape, device, torch.bfloat16)
    model.save_pretrained(tmp)
    byte_tokenizer().save_pretrained(tmp)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    os.replace(tmp, folder)


def write_text(path: Path, n_chars: int, seed: int = 0) -> None:
    """Generated training text (the weights are random: any text will do): seeded words, atomically."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(2000)]
    text = []
    size = 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(12)) + ".\n"
        text.append(line)
        size += len(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(text))
    os.replace(tmp, path)


def patchc_cli(*args: str) -> None:
    """One `patchc` command in its own process (the user's flow; its memory is released when it exits)."""
    cmd = [sys.executable, "-m", "patchc", *args]
    log("e2e: $ patchc " + " ".join(args))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=sys.stderr)
    if r.returncode:
        raise SystemExit(f"serving.py: `patchc {args[0]}` failed (exit {r.returncode}); see its messages above")
    log(f"e2e: patchc {args[0]} took {time.perf_counter() - t0:.0f} s")


def e2e_row(rep: dict, model: str, target: float, ckpt: Path, batch: int) -> dict:
    """serving.json's e2e row from a `patchc bench --json` report."""
    from patchc.lower import read_manifest

    rows = {r["row"]: r for r in rep["rows"]}
    patch = rows["patch"]
    st = patch["stats"]["new_tokens_per_s"]
    out = {"model": model, "batch": batch, "target_sparsity": target,
           "sparsity": round(read_manifest(ckpt)["sparsity"]["achieved"], 4),
           "tok_s": patch["new_tokens_per_s"], "tok_s_min": st["min"], "tok_s_max": st["max"],
           "dense_tok_s": rows["dense"]["new_tokens_per_s"] if "dense" in rows else None}
    if "dense-max-autotune" in rows:
        out["dense_maxautotune_tok_s"] = rows["dense-max-autotune"]["new_tokens_per_s"]
    out.update(speedup=rep["speedup_tokens_per_s"], best_dense=rep["best_dense"],
               speedup_decode=rep["speedup_decode"], greedy_agreement=rep["greedy_agreement"],
               greedy_agreement_vs=rep["greedy_agreement_vs"], weights_ratio=rep["weights_ratio"],
               prompt=rep["config"]["prompt"], new=rep["config"]["new"], repeats=rep["config"]["repeats"],
               rows=rep["rows"])
    return out


def run_e2e(a, out: Path, res: dict, budget: Budget) -> None:
    work = Path(a.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    shape = QUICK if a.quick else LLAMA2_7B
    if a.model:
        model_dir = Path(a.model)
        if not (model_dir / "config.json").is_file():
            raise SystemExit(f"serving.py: --model {a.model}: no config.json there (expected a Hugging Face folder)")
        name = model_dir.resolve().name
    else:
        name = "llama-quick-random" if a.quick else "llama2-7b-random"
        model_dir = work / name
    batches = [int(x) for x in a.batches.split(",")]
    targets = [float(x) for x in a.e2e_sparsities.split(",")]
    done = {e2e_key(r) for r in res["e2e"]}
    todo = [(s, b) for s in targets for b in batches if (name, s, b) not in done]
    log(f"e2e: {len(todo)} (sparsity, batch) rows to run, {len(done)} already in serving.json")
    if not todo:
        return
    set_env(res, "e2e", machine_env(a.device, repeats=a.repeats, stage="e2e", model=str(model_dir),
                                    written=time.time(), dense_modes=a.dense_modes, prompt=a.prompt, new=a.new,
                                    prune=dict(mode="tile", steps=a.steps, seq_len=a.seq_len, batch_size=1,
                                               calib_samples=a.calib_samples, data="generated text")))
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()                          # the bandwidth probe's buffers: the children need the GPU
    dev = ["--device", a.device]

    # 1. the model (skipped when its folder exists: it is renamed into place only when complete)
    if not model_dir.is_dir():
        if not budget.task():
            return
        build_model(model_dir, shape, a.device)
    data = work / "train.txt"
    for target in sorted({s for s, _ in todo}):
        # 2. PATCH-Tile: a few steps of mask learning on the generated text (prune.json marks a finished run)
        pdir = work / f"{name}-tile-{target}"
        if not (pdir / "prune.json").is_file():
            if not budget.task():
                return
            if not data.is_file():
                write_text(data, 2_000_000 if not a.quick else 50_000)
            again = ["--resume"] if (pdir / "checkpoint").is_dir() else (["--overwrite"] if pdir.exists() else [])
            patchc_cli("prune", str(model_dir), "--data", str(data), "--out", str(pdir), "--mode", "tile",
                       "--sparsity", str(target), "--steps", str(a.steps), "--seq-len", str(a.seq_len),
                       "--batch-size", "1", "--calib-samples", str(a.calib_samples), "--save-every", "1000",
                       "--quiet", *dev, *again)
        # 3. lower (manifest.json marks a finished checkpoint)
        ckpt = work / f"{name}-tile-{target}-packed"
        if not (ckpt / "manifest.json").is_file():
            if not budget.task():
                return
            patchc_cli("lower", str(pdir), "--out", str(ckpt), *(["--overwrite"] if ckpt.exists() else []))
        # 4. patchc bench, one process a batch; a report already written by a killed run is merged, not re-run
        for s, batch in todo:
            if s != target:
                continue
            rep_path = work / f"bench-{name}-tile-{target}-b{batch}.json"
            want = {"batch": batch, "prompt": a.prompt, "new": a.new, "repeats": a.repeats,
                    "dense_modes": a.dense_modes.split(",")}
            rep = json.loads(rep_path.read_text()) if rep_path.is_file() else None
            if rep is None or {k: rep["config"].get(k) for k in want} != want:      # none, or made with other settings
                if not budget.task():
                    return
                patchc_cli("bench", str(ckpt), "--batch", str(batch), "--prompt", str(a.prompt), "--new", str(a.new),
                           "--repeats", str(a.repeats), "--dense-modes", a.dense_modes, "--json", str(rep_path), *dev)
                rep = {**json.loads(rep_path.read_text()), "commit": res["env"]["e2e"].get("commit")}
                write_json(rep_path, rep)                 # which commit measured it, for a later merge
            r = {**e2e_row(rep, name, target, ckpt, batch), "commit": rep.get("commit")}
            res["e2e"] = [x for x in res["e2e"] if e2e_key(x) != e2e_key(r)] + [r]
            save(out, res)
            log(f"e2e: batch {batch} s={r['sparsity']}: patch {r['tok_s']} tok/s, dense {r['dense_tok_s']}, "
                f"dense max-autotune {r.get('dense_maxautotune_tok_s')}: {r['speedup']}x, greedy {r['greedy_agreement']}")


# ----------------------------------------------------------------------------------------------------- main

def table(res: dict) -> str:
    lines = []
    if res["e2e"]:
        lines.append(f"{'batch':>5} {'sparsity':>8} {'patch tok/s':>12} {'dense':>10} {'dense max':>10} {'speedup':>8} "
                     f"{'greedy':>7}")
        for r in res["e2e"]:
            lines.append(f"{r['batch']:>5} {r['sparsity']:>8} {r['tok_s']:>12} {r['dense_tok_s']:>10} "
                         f"{str(r.get('dense_maxautotune_tok_s', '-')):>10} {r['speedup']:>8} {r['greedy_agreement']:>7}")
    if res["kernels"]:
        by_m = {}
        for r in res["kernels"]:
            by_m.setdefault((r["m"], r["sparsity"]), []).append(r["speedup_vs_cublas"])
        lines.append(f"{'M':>5} {'sparsity':>8} {'kernel speedup vs cuBLAS (geomean over shapes)':>48}")
        for (m, s), v in sorted(by_m.items()):
            lines.append(f"{m:>5} {s:>8} {math.exp(sum(map(math.log, v)) / len(v)):>48.3f}")
    return "\n".join(lines)


def main() -> None:
    from patchc import config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench/results/serving"))
    ap.add_argument("--stages", default="kernels,e2e", help="comma-separated: kernels, e2e")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and model, for tests (with --device cpu)")
    ap.add_argument("--repeats", type=int, default=3, help="alternated rounds (kernels) / repeats (e2e rows)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new case / step after this many seconds")
    ap.add_argument("--max-tasks", type=int, default=None,
                    help="run at most this many e2e steps (model, prune, lower, one batch each), e.g. 1 a GPU call")
    ap.add_argument("--shapes", default="llama2-7b,llama3-8b", help="kernel shapes: " + ", ".join(SHAPES))
    ap.add_argument("--ms", default=MS)
    ap.add_argument("--sparsities", default="0.25,0.35,0.45,0.5", help="kernel rows' sparsities")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--pdl", action="store_true", help="kernels as programmatic dependent launches (kernel_sweep --pdl)")
    ap.add_argument("--model", default=None, help="a HF folder to prune instead of the random LLaMA-2-7B shape")
    ap.add_argument("--work", default=None, help="models, prune runs, checkpoints, bench reports (default: "
                    "PATCHC_CACHE/serving, ~/.cache/patchc/serving); 13.5 GB + ~9 GB a sparsity at 7B")
    ap.add_argument("--e2e-sparsities", default="0.35", help="a prune + lower + bench per target sparsity")
    ap.add_argument("--steps", type=int, default=4, help="PATCH-Tile steps")
    ap.add_argument("--seq-len", type=int, default=256, help="prune sequence length")
    ap.add_argument("--calib-samples", type=int, default=8, help="prune's one-shot (Wanda) calibration sequences")
    ap.add_argument("--batches", default="1,4,16,32,64,128")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--dense-modes", default="reduce-overhead,max-autotune")
    a = ap.parse_args()
    if a.quick:
        a.shapes, a.ms, a.tile, a.repeats = "quick", "1,16", 64, min(a.repeats, 2)
        a.batches, a.prompt, a.new, a.steps, a.seq_len, a.calib_samples = "1,2", 8, 4, 2, 32, 2
    stages = [s for s in a.stages.split(",") if s]
    # every argument checked before slow work
    bad = [s for s in stages if s not in ("kernels", "e2e")]
    if bad or not stages:
        ap.error(f"--stages: expected kernels and/or e2e, got {a.stages!r}")
    unknown = [s for s in a.shapes.split(",") if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {unknown}; choose from {', '.join(SHAPES)}")
    if a.repeats < 1:
        ap.error("--repeats must be >= 1")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda but no GPU is visible (use --quick --device cpu for a CPU run)")
    for s in [*a.sparsities.split(","), *a.e2e_sparsities.split(",")]:
        if not 0 <= float(s) <= 0.5:
            ap.error(f"sparsity {s} outside [0, 0.5]")
    a.work = a.work or str(config.settings().cache / "serving")
    out = Path(a.out)
    if out.exists() and not out.is_dir():
        ap.error(f"--out {out} is a file")
    res = load_results(out)
    budget = Budget(a.budget_s, a.max_tasks)
    if "kernels" in stages:
        run_kernels(a, out, res, budget)
    if "e2e" in stages:
        run_e2e(a, out, res, budget)
    save(out, res)
    print(table(res))


if __name__ == "__main__":
    main()
