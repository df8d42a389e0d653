"""Collect prune.json files into one JSON + a markdown table.

    python bench/summarize_prune.py bench/results/prune_smollm2 --title "..." 
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from report import write_report  # bench/report.py


def row(name: str, rep: dict) -> dict:
    c, p = rep["config"], rep["ppl"]
    return {
        "run": name, "mode": c["mode"], "method": c["method"], "sparsity": round(rep["sparsity"]["achieved"], 4),
        "steps": c["steps"], "tokens": rep["tokens_trained"], "distill": c.get("distill", 0.0),
        "ppl_dense": p["dense"] and round(p["dense"]["ppl"], 3), "ppl_start": p["init"] and round(p["init"]["ppl"], 3),
        "ppl_final": p["final"] and round(p["final"]["ppl"], 3),
        "eval": p["final"] and f"{p['final']['windows']}x{p['final']['seq_len']}", "seconds": rep["seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--title", default="prune runs")
    ap.add_argument("--note", default="")
    a = ap.parse_args()
    root = Path(a.folder)
    rows = [row(d.name, json.loads((d / "prune.json").read_text())) for d in sorted(root.iterdir())
            if (d / "prune.json").is_file()]
    print(write_report(root, "summary", a.title, [(c, c) for c in rows[0]], rows, note=a.note))

if __name__ == "__main__":
    main()
