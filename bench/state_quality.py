"""Quality cost of the lean mask-learning state: the same PATCH-Joint run with lean state (bf16 pattern logits,
LeanAdamW 8-bit moments: 6 bytes per masked weight) and with fp32 state (18 bytes), WikiText-2 PPL of each.

    python bench/state_quality.py --model smollm2-135m --data CALIB_FOLDERS... --eval-ppl wiki.test.raw.txt \
        --steps 400 --batch-size 8 --seq-len 2048 --out bench/results/state_quality
Rows run one after the other on one machine (one run each: a full training run is the unit). Rows already in
OUT/state_quality.json for other states are kept (each row records its commit and GPU), so the two states may run
in separate processes: `--states fp32` adds the fp32 row beside a lean one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_BENCH = sys.path.pop(0) if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench" else None
import torch  # noqa: E402
import transformers.activations  # noqa: E402,F401  (before bench/ is on the path)

sys.path.insert(0, str(ROOT))
if _BENCH:
    sys.path.insert(0, _BENCH)

from patchc import PruneConfig, prune  # noqa: E402

from report import machine_env, mid_run_points, write_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--eval-ppl", required=True)
    ap.add_argument("--eval-seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=None, help="evaluate only the first N windows")
    ap.add_argument("--sparsity", type=float, default=0.35)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--states", default="lean,fp32")
    ap.add_argument("--work", default="/tmp/state_quality")
    ap.add_argument("--out", default="bench/results/state_quality")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="also read WikiText-2 PPL of the extracted masks every N steps (mid-run points, in the JSON)")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = machine_env(device)
    states = a.states.split(",")
    old = Path(a.out) / "state_quality.json"
    kept = [r for r in (json.loads(old.read_text())["rows"] if old.is_file() else []) if r["state"] not in states]
    rows = []
    for state in states:
        cfg = PruneConfig(sparsity=a.sparsity, mode="joint", steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                          state=state)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = prune(a.model, a.data, Path(a.work) / state, cfg, device=device, eval_ppl=a.eval_ppl, overwrite=True,
                    eval_seq_len=a.eval_seq_len, eval_windows=a.eval_windows,
                    progress=False, eval_every=a.eval_every)
        rep = res.report
        row = {"state": state, "ppl_final": round(rep["ppl"]["final"]["ppl"], 3), "ppl_dense": round(rep["ppl"]["dense"]["ppl"], 3),
               "ppl_init": round(rep["ppl"]["init"]["ppl"], 3), "windows": rep["ppl"]["final"]["windows"],
               "tokens_trained": rep["tokens_trained"], "sparsity": round(rep["sparsity"]["achieved"], 4),
               "state_bytes_per_masked_weight": rep["training_state"]["bytes_per_masked_weight"],
               "seconds": round(time.perf_counter() - t0, 1),
               "peak_GB": round(torch.cuda.max_memory_allocated() / 1e9, 2) if device == "cuda" else None,
               "curve": mid_run_points(Path(a.work) / state / "log.jsonl", a.batch_size * a.seq_len),
               "commit": env["commit"], "gpu": env["device"]}
        print(row, flush=True)
        rows.append(row)
        del res
    rows = sorted(kept + rows, key=lambda r: r["state"] != "lean")                   # lean first
    by = {r["state"]: r for r in rows}
    if "lean" in by and "fp32" in by:
        by["lean"]["ppl_vs_fp32"] = round(by["lean"]["ppl_final"] / by["fp32"]["ppl_final"], 4)
    cols = [("state", "state"), ("state B / masked weight", "state_bytes_per_masked_weight"),
            ("WikiText-2 PPL", "ppl_final"), ("dense PPL", "ppl_dense"), ("one-shot start PPL", "ppl_init"),
            ("tokens", "tokens_trained"), ("seconds", "seconds"), ("peak GB", lambda r: r.get("peak_GB") or ""),
            ("lean / fp32 PPL", lambda r: r.get("ppl_vs_fp32", "")), ("commit", lambda r: (r.get("commit") or "")[:10])]
    print(write_report(Path(a.out), "state_quality",
                       f"PATCH-Joint {a.sparsity:.0%} on {a.model}: lean vs fp32 mask state ({env['device']}, "
                       f"{env['date']})", cols, rows, env))


if __name__ == "__main__":
    main()
