"""Tune mask learning on a held-out split of the calibration data, never on the evaluation sets.

Every row is one `patchc prune` run with `--holdout N`: N windows of the training data are kept out of training
and the run reports their PPL (dense, one-shot start, result). The first row is the recipe as given (defaults plus
--set); every further row changes one setting of it (--vary NAME=V1,V2,...), so each row reads as "this one change
moved the held-out PPL from the base row's by so much". Rows are kept under OUT/tuning_runs/ (one JSON a row), so a
sweep cut short by a device call's time limit continues where it stopped; OUT/tuning.{json,md} is rewritten after
every row.

    python bench/tune.py --data CALIB/*/ --holdout 64 --out bench/results/tuning \
        --vary prior_strength=1,5 lr=5e-4,2e-3 scale_24=50:500,200:500 oneshot=sparsegpt
    python bench/tune.py --quick --out /tmp/tune                     # CPU, tiny model (tests)
Values: numbers, words, or START:END pairs for the (start, end) schedules (tau, scale_tile, scale_24).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BENCH = sys.path.pop(0) if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench" else None
import torch  # noqa: E402
import transformers.activations  # noqa: E402,F401  (before bench/ is on the path)

sys.path.insert(0, str(ROOT))
if _BENCH:
    sys.path.insert(0, _BENCH)

from patchc import PruneConfig, prune  # noqa: E402
from patchc.io import write_json  # noqa: E402

from report import machine_env, write_report  # noqa: E402

QUICK = dict(model="tiny:llama", set=["steps=4", "seq_len=64", "batch_size=2", "calib_samples=4"], holdout=4,
             vary=["prior_strength=1", "lr=3e-3"])


def parse_value(name: str, text: str, default):
    """A --set / --vary value in the type of PruneConfig's field `name` (tuples from START:END)."""
    if isinstance(default, tuple):
        if not default:                                   # include / exclude: regexes
            return tuple(text.split(":"))
        parts = text.split(":")
        if len(parts) != len(default):
            raise SystemExit(f"bench/tune.py: {name}: give {len(default)} values as START:END, got {text!r}")
        return tuple(float(p) for p in parts)
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    return text


def parse_settings(items: list[str], multi: bool) -> list[tuple[str, list]]:
    """NAME=V or NAME=V1,V2 items -> [(name, [values])], names checked against PruneConfig before any run."""
    defaults = {f.name: f.default for f in fields(PruneConfig)}
    out = []
    for item in items:
        name, sep, vals = item.partition("=")
        if not sep or not vals:
            raise SystemExit(f"bench/tune.py: {item!r}: write NAME=VALUE{',VALUE2' if multi else ''}")
        if name not in defaults:
            raise SystemExit(f"bench/tune.py: {name!r} is not a PruneConfig field ({', '.join(sorted(defaults))})")
        values = [parse_value(name, v, defaults[name]) for v in (vals.split(",") if multi else [vals])]
        out.append((name, values))
    return out


def row_name(change: dict) -> str:
    if not change:
        return "base"
    (k, v), = change.items()
    return f"{k}={':'.join(map(str, v)) if isinstance(v, tuple) else v}"


def run_row(a, base: PruneConfig, change: dict, runs: Path, device: str) -> dict:
    """One prune run (or its saved row): held-out PPL of dense, start and result, and the run's time."""
    name = row_name(change)
    f = runs / (name.replace("/", "_") + ".json")
    if f.is_file():
        return json.loads(f.read_text())
    cfg = replace(base, **change)
    cfg.validate()
    print(f"[tune] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    res = prune(a.model, a.data, runs / "work" / name.replace("/", "_"), cfg, device=device, overwrite=True,
                progress=False)
    h = res.report["ppl_holdout"]
    row = {"row": name, "change": {k: list(v) if isinstance(v, tuple) else v for k, v in change.items()},
           "holdout_ppl": round(h["final"]["ppl"], 4), "holdout_ppl_init": round(h["init"]["ppl"], 4),
           "holdout_ppl_dense": round(h["dense"]["ppl"], 4), "holdout_windows": h["final"]["windows"],
           "tokens_trained": res.report["tokens_trained"], "sparsity": round(res.report["sparsity"]["achieved"], 4),
           "seconds": round(time.perf_counter() - t0, 1)}
    write_json(f, row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", nargs="+", default=None, help="training data (the held-out windows are drawn from it)")
    ap.add_argument("--holdout", type=int, default=64, help="windows held out of training (validation)")
    ap.add_argument("--set", nargs="*", default=[], help="NAME=VALUE changes to the defaults for every row")
    ap.add_argument("--vary", nargs="*", default=[], help="NAME=V1,V2: one row per value, the rest as the base")
    ap.add_argument("--out", default="bench/results/tuning")
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU (tests)")
    a = ap.parse_args()
    if a.quick:
        a.model, a.holdout = QUICK["model"], QUICK["holdout"]
        a.set = QUICK["set"] + a.set
        a.vary = a.vary or QUICK["vary"]
        a.data = a.data or [str(ROOT.parent / "shared/assets/data/calib/wikitext2_v1_valid.txt")]
    if not a.data:
        raise SystemExit("bench/tune.py: --data is required (the calibration folders)")
    base = replace(PruneConfig(), **{k: v[0] for k, v in parse_settings(a.set, multi=False)}, holdout=a.holdout)
    base.validate()
    changes = [{}] + [{k: v} for k, vals in parse_settings(a.vary, multi=True) for v in vals]
    device = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    out = Path(a.out)
    runs = out / "tuning_runs"
    env = machine_env(device, repeats=1)
    env.update(model=a.model, data=a.data, base=base.to_json())
    rows = []
    for change in changes:
        rows.append(run_row(a, base, change, runs, device))
        ref = rows[0]["holdout_ppl"]
        for r in rows:
            r["vs_base"] = round(r["holdout_ppl"] / ref, 4)
        cols = [("row", "row"), ("held-out PPL", "holdout_ppl"), ("vs base", "vs_base"),
                ("one-shot start", "holdout_ppl_init"), ("dense", "holdout_ppl_dense"), ("tokens", "tokens_trained"),
                ("sparsity", "sparsity"), ("seconds", "seconds")]
        text = write_report(out, "tuning", f"Mask-learning settings on {a.holdout} held-out windows of the training "
                            f"data ({a.model}, {env['device']})", cols, rows, env,
                            note="Each row changes one setting of the base recipe; PPL on windows training never saw "
                                 "(patchc prune --holdout), never on an evaluation set.")
    print(text)


if __name__ == "__main__":
    main()
