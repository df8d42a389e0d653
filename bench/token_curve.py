"""Token curve of the accuracy study: learned rows at several token budgets, each point the end of its own run.

For every --steps value, bench/accuracy.py trains the --rows (default PATCH-Joint 35% and learned 2:4) on
steps x batch x seq-len tokens of the calibration corpus (every folder by default), lowers each result, loads it
with patchc.load and evaluates WikiText-2 PPL, TinyStories PPL and zero-shot accuracy. A point is the end of a run
(its Gumbel and learning-rate schedules completed), not a mid-run reading. Row files are kept under
OUT/token_curve_runs/steps<N>/rows/, so a curve cut short by a device call's time limit continues where it stopped.

    python bench/token_curve.py --steps 100,400,1600 --out bench/results/accuracy --device cuda
    python bench/token_curve.py --quick --out /tmp/curve            # CPU, tiny model (tests)
Writes OUT/token_curve.json, token_curve.md and token_curve.png (dense as a reference line when OUT has it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from patchc.io import write_json  # noqa: E402

ACCURACY = ROOT / "bench" / "accuracy.py"


def run_budget(a, steps: int, rest: list[str]) -> int:
    """bench/accuracy.py for one token budget (rows only: no report in the budget's folder)."""
    folder = Path(a.out) / "token_curve_runs" / f"steps{steps}"
    cmd = [sys.executable, str(ACCURACY), "--out", str(folder), "--rows", a.rows, "--steps", str(steps),
           "--rows-only", *rest]
    return subprocess.run(cmd).returncode


def points(out: Path) -> list[dict]:
    """Every finished (budget, row) as a flat record."""
    recs = []
    for f in sorted((out / "token_curve_runs").glob("steps*/rows/*.json")):
        r = json.loads(f.read_text())
        e = r["eval"]
        recs.append({"row": r["name"], "method": r["method"], "sparsity": r["sparsity"],
                     "steps": r["config"]["steps"], "tokens": r["tokens_trained"],
                     "wikitext2_ppl": e["wikitext2"]["ppl"], "tinystories_ppl": e["tinystories"]["ppl"],
                     "avg_acc": e["zeroshot"]["average_acc"], "point": "end of run",
                     "achieved_sparsity": r["achieved_sparsity"], "prune_seconds": r.get("prune_seconds")})
    return sorted(recs, key=lambda x: (x["row"], x["tokens"]))


def dense_reference(out: Path) -> dict | None:
    f = out / "rows" / "dense.json"
    if not f.is_file():
        return None
    e = json.loads(f.read_text())["eval"]
    return {"wikitext2_ppl": e["wikitext2"]["ppl"], "tinystories_ppl": e["tinystories"]["ppl"],
            "avg_acc": e["zeroshot"]["average_acc"]}


def report(out: Path, recs: list[dict], dense: dict | None, env: dict) -> str:
    write_json(out / "token_curve.json", {"env": env, "dense": dense, "points": recs})
    lines = [f"# Token curve ({env.get('device_name', '')}, commit {env.get('commit', '')[:12]})", "",
             "Each point is the end of its own run (schedules completed), evaluated on its lowered checkpoint.", "",
             "| row | tokens | WikiText-2 PPL | TinyStories PPL | avg zero-shot acc | sparsity |", "|---|---|---|---|---|---|"]
    if dense:
        lines.append(f"| dense | 0 | {dense['wikitext2_ppl']:.3f} | {dense['tinystories_ppl']:.3f} | "
                     f"{dense['avg_acc']:.4f} | 0 |")
    for r in recs:
        lines.append(f"| {r['row']} | {r['tokens']:,} | {r['wikitext2_ppl']:.3f} | {r['tinystories_ppl']:.3f} | "
                     f"{r['avg_acc']:.4f} | {r['achieved_sparsity']:.4f} |")
    text = "\n".join(lines) + "\n"
    (out / "token_curve.md").write_text(text)
    _plot(out / "token_curve.png", recs, dense)
    return text


def _plot(path: Path, recs: list[dict], dense: dict | None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install 'patchc[plot]')")
        return
    keys = [("wikitext2_ppl", "WikiText-2 PPL"), ("tinystories_ppl", "TinyStories PPL"), ("avg_acc", "avg zero-shot acc")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (k, label) in zip(axes, keys):
        for row in sorted({r["row"] for r in recs}):
            pts = [r for r in recs if r["row"] == row]
            ax.plot([p["tokens"] for p in pts], [p[k] for p in pts], "o-", label=row)
        if dense:
            ax.axhline(dense[k], color="k", ls="--", lw=1, label="dense")
        ax.set_xscale("log")
        ax.set_xlabel("training tokens (end of run)")
        ax.set_title(label)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/accuracy")
    ap.add_argument("--steps", default="100,400,1600", help="token budgets as steps (x batch x seq len each)")
    ap.add_argument("--rows", default="joint-35,learned-2:4")
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU (tests)")
    ap.add_argument("--report-only", action="store_true")
    a, rest = ap.parse_known_args()   # the rest goes to bench/accuracy.py (--device, --data, --budget-s, ...)
    if a.quick:
        rest.append("--quick")
        if a.steps == ap.get_default("steps"):
            a.steps = "1,2"
    out = Path(a.out)
    if not a.report_only:
        for steps in [int(s) for s in a.steps.split(",")]:
            if run_budget(a, steps, rest) != 0:
                sys.exit(f"bench/accuracy.py failed at --steps {steps}")
    sys.path.insert(0, str(ROOT / "bench"))
    from report import machine_env

    import torch

    env = machine_env("cuda" if torch.cuda.is_available() else "cpu", repeats=1)
    env["device_name"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(report(out, points(out), dense_reference(out), env))


if __name__ == "__main__":
    main()
