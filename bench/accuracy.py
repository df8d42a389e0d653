"""Accuracy study: PATCH vs dense and the 2:4 baselines on the real SmolLM2-135M (issue 6).

Rows: dense; magnitude / Wanda / SparseGPT 2:4 (one-shot, every tile 2:4); learned 2:4 (PATCH-Joint at 50%);
heuristic hybrid (dense tiles by Wanda tile score, no learning) and PATCH-Tile / PATCH-Joint at each
sparsity. Every learned row trains on the same token budget (steps x batch x seq len, in the report).
Every pruned row is evaluated on its lowered checkpoint through patchc.load (prune -> lower -> load):
WikiText-2 test PPL and TinyStories PPL (non-overlapping windows), zero-shot piqa / arc_easy / winogrande
(acc, acc_norm) and lambada_openai (acc) scored as lm-eval scores them (patchc.zeroshot).

Rows are written one by one to OUT/rows/NAME.json and skipped when present, so a run cut short (a device
call's time limit: --budget-s) continues where it stopped; the report is rebuilt from all rows each time.
    python bench/accuracy.py --out bench/results/accuracy --device cuda            # the full study
    python bench/accuracy.py --quick --out /tmp/acc                                # CPU, tiny model, minutes
    python bench/accuracy.py --report-only --out bench/results/accuracy            # tables + plot again
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patchc import PruneConfig, load, prune  # noqa: E402
from patchc.evaluate import eval_file_tokens, hf_logits_fn, perplexity  # noqa: E402
from patchc.io import write_json  # noqa: E402
from patchc.lower import lower  # noqa: E402
from patchc.models import dtype_name, load_model, parse_dtype  # noqa: E402
from patchc.zeroshot import TASKS, evaluate_zeroshot  # noqa: E402
from patchc.config import settings  # noqa: E402
from report import machine_env, mid_run_points  # noqa: E402  (bench/report.py)

ASSETS = (settings().shared or ROOT.parent / "shared") / "assets"
METHOD_ORDER = ["dense", "magnitude 2:4", "wanda 2:4", "sparsegpt 2:4", "learned 2:4", "heuristic hybrid",
                "PATCH-Tile", "PATCH-Joint"]


@dataclass
class Row:
    name: str
    method: str                 # a METHOD_ORDER label
    sparsity: float
    prune: dict | None = None   # PruneConfig overrides (None = the dense model itself)
    learns: bool = False
    extra: dict = field(default_factory=dict)


def rows_for(sparsities: list[float]) -> list[Row]:
    rows = [Row("dense", "dense", 0.0)]
    for m in ("magnitude", "wanda", "sparsegpt"):
        rows.append(Row(f"{m}-2:4", f"{m} 2:4", 0.5, {"method": m, "sparsity": 0.5}))
    rows.append(Row("learned-2:4", "learned 2:4", 0.5, {"method": "patch", "mode": "joint", "sparsity": 0.5}, True))
    for s in sparsities:
        pct = round(s * 100)
        rows.append(Row(f"hybrid-{pct}", "heuristic hybrid", s, {"method": "hybrid", "mode": "tile", "sparsity": s}))
        rows.append(Row(f"tile-{pct}", "PATCH-Tile", s, {"method": "patch", "mode": "tile", "sparsity": s}, True))
        rows.append(Row(f"joint-{pct}", "PATCH-Joint", s, {"method": "patch", "mode": "joint", "sparsity": s}, True))
    return rows


def evaluate(model, tok, a, device) -> dict:
    fn = hf_logits_fn(model)
    out = {}
    for key, path in (("wikitext2", a.wikitext), ("tinystories", a.tinystories)):
        r = perplexity(fn, eval_file_tokens(tok, path), seq_len=a.eval_seq_len, batch_size=a.eval_batch,
                       max_windows=a.eval_windows, device=device, desc=key, progress=not a.quiet)
        out[key] = {k: r[k] for k in ("ppl", "windows", "seq_len")}
    out["zeroshot"] = evaluate_zeroshot(fn, tok, a.zeroshot, limit=a.zs_limit, device=device,
                                        max_length=min(2048, model.config.max_position_embeddings),
                                        progress=not a.quiet)
    return out


def run_row(row: Row, a, base_spec: str, device, dtype, work: Path) -> dict:
    t0 = time.perf_counter()
    if row.prune is None:
        lm = load_model(base_spec, device=device, dtype=dtype)
        res = {"eval": evaluate(lm.model, lm.tokenizer, a, device)}
    else:
        cfg = PruneConfig(steps=a.steps if row.learns else 0, seq_len=a.seq_len, batch_size=a.batch_size,
                          calib_samples=a.calib_samples, seed=a.seed, **row.prune)
        pdir, cdir = work / row.name / "prune", work / row.name / "ckpt"
        curve = dict(eval_ppl=a.wikitext, eval_seq_len=a.eval_seq_len, eval_windows=a.eval_windows,
                     eval_every=a.eval_every) if a.eval_every and row.learns else {}
        r = prune(base_spec, list(a.data), pdir, cfg, device=device, dtype=dtype, overwrite=True, progress=not a.quiet,
                  **curve)
        t_prune = time.perf_counter() - t0
        lower(pdir, cdir, overwrite=True)
        model = load(cdir, device=device)
        tok = _tokenizer(cdir)
        res = {"eval": evaluate(model, tok, a, device), "prune_seconds": round(t_prune, 1),
               "achieved_sparsity": r.report["sparsity"]["achieved"], "tile": r.report["tile"],
               "tokens_trained": r.report["tokens_trained"], "config": r.report["config"],
               "curve": _curve(pdir / "log.jsonl", r.report, a.batch_size * a.seq_len) if curve else None,
               "evaluated_on": "lowered checkpoint (patchc.load)"}
        shutil.rmtree(work / row.name, ignore_errors=True)
        del model
    res.update(name=row.name, method=row.method, sparsity=row.sparsity, seconds=round(time.perf_counter() - t0, 1))
    return res


def _curve(log: Path, report: dict, tokens_per_step: int) -> list[dict]:
    """WikiText-2 PPL of the exactly extracted masks along training (prune --eval-every), final point last."""
    out = mid_run_points(log, tokens_per_step)
    fin = report["ppl"]["final"]
    if fin:
        steps = report["config"]["steps"]
        out.append({"step": steps, "tokens": steps * tokens_per_step, "ppl": fin["ppl"]})
    return out


def default_calib() -> list[str]:
    """Every calibration folder of the shared assets (the files beside them are notes, not data)."""
    return [str(p) for p in sorted((ASSETS / "data" / "calib").iterdir()) if p.is_dir()]


def data_name(paths: list[str]) -> str:
    names = [Path(p).name for p in paths]
    return names[0] if len(names) == 1 else f"{len(names)} calibration folders ({', '.join(names)})"


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def summarize(rows: list[dict]) -> list[dict]:
    """Flat records + the gap to dense closed relative to learned 2:4 and the heuristic-hybrid comparison."""
    by = {r["name"]: r for r in rows}
    dense = by.get("dense", {}).get("eval", {}).get("wikitext2", {}).get("ppl")
    learned = by.get("learned-2:4", {}).get("eval", {}).get("wikitext2", {}).get("ppl")
    out = []
    for r in rows:
        e = r["eval"]
        z = e["zeroshot"]
        rec = {"name": r["name"], "method": r["method"], "sparsity": r["sparsity"],
               "achieved": r.get("achieved_sparsity", 0.0), "wikitext2_ppl": e["wikitext2"]["ppl"],
               "tinystories_ppl": e["tinystories"]["ppl"], "avg_acc": z["average_acc"]}
        for t in TASKS:
            rec[f"{t}_acc"] = z[t]["acc"]
            if "acc_norm" in z[t]:
                rec[f"{t}_acc_norm"] = z[t]["acc_norm"]
        if r["method"] in ("PATCH-Tile", "PATCH-Joint", "heuristic hybrid") and dense and learned and learned > dense:
            rec["gap_closed"] = (learned - rec["wikitext2_ppl"]) / (learned - dense)
        if r["method"] in ("PATCH-Tile", "PATCH-Joint"):
            h = by.get(f"hybrid-{round(r['sparsity'] * 100)}")
            if h:
                rec["beats_heuristic"] = rec["wikitext2_ppl"] < h["eval"]["wikitext2"]["ppl"]
        out.append(rec)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(out, key=lambda x: (order.get(x["method"], 99), x["sparsity"]))


def write_report(out: Path, rows: list[dict], meta: dict) -> str:
    recs = summarize(rows)
    write_json(out / "accuracy.json", {"meta": meta, "rows": recs, "raw": rows})
    head = ("| row | method | sparsity | WikiText-2 PPL | TinyStories PPL | piqa acc / norm | arc_easy acc / norm | "
            "winogrande acc / norm | lambada acc | avg acc | gap closed | beats heuristic |")
    lines = [f"# Accuracy: {meta.get('model')} ({meta.get('device_name')}, {meta.get('date')})", "",
             meta.get("protocol", ""), "", head, "|" + "---|" * 12]
    f3 = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    pct = lambda v: "" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    for r in recs:
        lines.append(
            f"| {r['name']} | {r['method']} | {r['sparsity']:.2f} | {r['wikitext2_ppl']:.3f} | {r['tinystories_ppl']:.3f} | "
            f"{f3(r['piqa_acc'])} / {f3(r['piqa_acc_norm'])} | {f3(r['arc_easy_acc'])} / {f3(r['arc_easy_acc_norm'])} | "
            f"{f3(r['winogrande_acc'])} / {f3(r['winogrande_acc_norm'])} | {f3(r['lambada_openai_acc'])} | "
            f"{f3(r['avg_acc'])} | {pct(r.get('gap_closed'))} | "
            f"{'' if 'beats_heuristic' not in r else ('yes' if r['beats_heuristic'] else 'NO')} |")
    lines += ["", "gap closed = (PPL(learned 2:4) - PPL(row)) / (PPL(learned 2:4) - PPL(dense)) on WikiText-2; "
              "avg acc = mean of the four tasks' acc."]
    md = "\n".join(lines) + "\n"
    (out / "accuracy.md").write_text(md)
    plot(out / "accuracy.png", recs, meta)
    return md


def plot(path: Path, recs: list[dict], meta: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install 'patchc[plot]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "wikitext2_ppl", "WikiText-2 PPL (log)"), (axes[1], "avg_acc", "average zero-shot acc")):
        for m in METHOD_ORDER:
            pts = sorted((r["sparsity"], r[key]) for r in recs if r["method"] == m)
            if not pts:
                continue
            xs, ys = zip(*pts)
            style = "-o" if len(pts) > 1 else "s"
            ax.plot([100 * x for x in xs], ys, style, label=m)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "wikitext2_ppl":
            ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{meta.get('model')}: PATCH vs baselines ({meta.get('token_budget', '')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_rows(out: Path) -> list[dict]:
    rows = []
    for p in sorted((out / "rows").glob("*.json")):
        rows.append(json.loads(p.read_text()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/accuracy")
    ap.add_argument("--work", default="/tmp/patchc-accuracy", help="prune folders and checkpoints (deleted per row)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", nargs="+", default=None,
                    help="calibration files/folders (default: every folder of ASSETS/data/calib, mixed by a seeded "
                         "shuffle: the recipe of `patchc prune --data`)")
    ap.add_argument("--wikitext", default=str(ASSETS / "data" / "wikitext2" / "wiki.test.raw.txt"))
    ap.add_argument("--tinystories", default=str(ASSETS / "data" / "tinystories" / "validation_head.txt"))
    ap.add_argument("--zeroshot", default=str(ASSETS / "data" / "zeroshot"))
    ap.add_argument("--sparsities", default="0.25,0.35,0.45")
    ap.add_argument("--rows", default="all", help="comma-separated row names (default: all)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--eval-batch", type=int, default=4)
    ap.add_argument("--zs-limit", type=int, default=None, help="first N items of each zero-shot task")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--budget-s", type=float, default=None, help="start no row after this many seconds")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="learned rows also log WikiText-2 PPL every N steps (the token-budget curve, in the row's JSON)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, few steps/windows/items (CPU tests)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--rows-only", action="store_true", help="write the row files, not the report (bench/token_curve.py)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    if a.data is None:   # quick: one small folder (tokenising the whole corpus would take the CPU test minutes)
        a.data = default_calib()[:1] if a.quick else default_calib()
    if a.quick:
        a.model, a.batch_size, a.seq_len, a.calib_samples = "tiny:llama", 2, 64, 4
        a.steps = 2 if a.steps == ap.get_default("steps") else a.steps
        a.eval_seq_len, a.eval_windows, a.zs_limit, a.sparsities = 128, 2, 3, "0.35"
    out = Path(a.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    dtype = parse_dtype("bfloat16" if a.device.startswith("cuda") else "float32") if a.dtype == "auto" else parse_dtype(a.dtype)
    meta = {"model": a.model, "dtype": dtype_name(dtype), **machine_env("cpu", repeats=1),
            "device": a.device,
            "device_name": torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or "cpu",
            "token_budget": f"{a.steps} steps x {a.batch_size} x {a.seq_len} = {a.steps * a.batch_size * a.seq_len:,} tokens",
            "protocol": (f"Learned rows: {a.steps} steps x batch {a.batch_size} x {a.seq_len} tokens of {data_name(a.data)} "
                         f"(= {a.steps * a.batch_size * a.seq_len:,} tokens each), distillation on, one-shot prior Wanda "
                         f"on {a.calib_samples} x {a.seq_len} calibration tokens. PPL: non-overlapping windows of "
                         f"{a.eval_seq_len}{'' if a.eval_windows is None else f' (first {a.eval_windows})'}. Zero-shot: "
                         f"{'all' if a.zs_limit is None else f'first {a.zs_limit}'} items, lm-eval scoring. Pruned rows "
                         "are evaluated on their lowered checkpoints (patchc.load).")}
    if not a.report_only:
        t_start = time.perf_counter()
        base = a.model
        work = Path(a.work)
        if not a.model.startswith("tiny:"):  # convert once: every row then loads a safetensors folder in ~1 s
            hf = work / "base-hf"
            if not (hf / "config.json").is_file():
                lm = load_model(a.model, dtype=dtype)
                hf.mkdir(parents=True, exist_ok=True)
                lm.model.save_pretrained(hf, safe_serialization=True)
                lm.tokenizer.save_pretrained(hf)
                del lm
            base = str(hf)
        wanted = None if a.rows == "all" else set(a.rows.split(","))
        for row in rows_for([float(s) for s in a.sparsities.split(",")]):
            if wanted is not None and row.name not in wanted:
                continue
            dest = out / "rows" / f"{row.name}.json"
            if dest.is_file():
                continue
            elapsed = time.perf_counter() - t_start
            if a.budget_s is not None and elapsed > a.budget_s:
                print(f"budget: {elapsed:.0f}s spent, stopping before {row.name}", flush=True)
                break
            res = run_row(row, a, base, a.device, dtype, work)
            res["model"] = a.model
            write_json(dest, res)
            e = res["eval"]
            print(f"{row.name:<14} s={row.sparsity:.2f} wiki {e['wikitext2']['ppl']:9.3f} tiny {e['tinystories']['ppl']:8.3f} "
                  f"avg acc {e['zeroshot']['average_acc']:.4f}  ({res['seconds']:.0f}s, total {time.perf_counter() - t_start:.0f}s)",
                  flush=True)
    rows = load_rows(out)
    if rows and not a.rows_only:
        print(write_report(out, rows, meta))


if __name__ == "__main__":
    main()
