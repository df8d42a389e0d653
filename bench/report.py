"""Write a benchmark's rows as DIR/NAME.json (with its environment) and DIR/NAME.md (a table)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def machine_env(device: str) -> dict:
    """GPU name, torch / triton versions and the measured copy bandwidth, recorded in every result file."""
    import time

    import torch

    env = {"device": "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if str(device).startswith("cuda"):
        from kernel_bench import copy_bandwidth  # bench/kernel_bench.py

        env.update(device=torch.cuda.get_device_name(), copy_bandwidth_GBps=round(copy_bandwidth() / 1e9, 1))
    return env


def write_report(out: Path, name: str, title: str, columns: list[tuple[str, object]], rows: list[dict],
                 env: dict | None = None, note: str = "") -> str:
    """columns: (header, key or function of the row). Returns the markdown."""
    payload = {"env": env, "rows": rows} if env is not None else rows
    cell = lambda r, k: k(r) if callable(k) else r.get(k, "")  # noqa: E731
    md = [f"# {title}", ""] + ([note, ""] if note else [])
    md += ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(str(cell(r, k)) for _, k in columns) + " |" for r in rows]
    text = "\n".join(md) + "\n"
    save_results(out, name, payload, text)
    return text


def save_results(out, name: str, payload: dict | list, md: str) -> None:
    """DIR/NAME.json (payload) and DIR/NAME.md (md), each written to a temporary file and renamed into place, so an
    interrupted run leaves the previous files whole."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path, text in ((out / f"{name}.json", json.dumps(payload, indent=1) + "\n"), (out / f"{name}.md", md)):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
