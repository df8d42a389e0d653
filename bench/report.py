"""What every benchmark records, and how it writes its results.

machine_env(device, repeats=...) is the `env` of every result file: git commit (and whether the tree had
uncommitted changes), GPU, torch / triton / transformers / Python versions, date, repeats and, on a GPU, the
measured copy bandwidth. stats(values) is how a repeated timing is stored: n, median, min, max.
write_report / save_results write DIR/NAME.json (env + rows) and DIR/NAME.md (a table), atomically.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git_commit(root: Path = ROOT) -> dict:
    """{"commit": HEAD's hash, "dirty": uncommitted changes to tracked files} (None / None outside a checkout)."""
    def git(*args):
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        commit, status = None, None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def versions() -> dict:
    """torch / triton / transformers / Python versions (None where a package is missing)."""
    import torch

    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def machine_env(device: str, repeats: int | None = None, **extra) -> dict:
    """The environment of one result: git commit + dirty flag, device (GPU name or "cpu"), versions, date, repeats
    (how many times each number was measured; medians and ranges are over these) and, on a GPU, the copy bandwidth."""
    import time

    import torch

    env = {**git_commit(), "device": "cpu", **versions(), "date": time.strftime("%Y-%m-%d")}
    if repeats is not None:
        env["repeats"] = repeats
    if str(device).startswith("cuda"):
        from kernel_sweep import copy_bandwidth  # bench/kernel_sweep.py

        env.update(device=torch.cuda.get_device_name(), copy_bandwidth_GBps=round(copy_bandwidth() / 1e9, 1))
    env["gpu"] = env["device"]
    env.update(extra)
    return env


def stats(values, digits: int = 2) -> dict:
    """n, median, min and max of repeated measurements (rounded)."""
    v = [float(x) for x in values]
    return {"n": len(v), "median": round(statistics.median(v), digits), "min": round(min(v), digits),
            "max": round(max(v), digits)}


def write_report(out: Path, name: str, title: str, columns: list[tuple[str, object]], rows: list[dict],
                 env: dict | None = None, note: str = "") -> str:
    """columns: (header, key or function of the row). Returns the markdown."""
    payload = {"env": env, "rows": rows} if env is not None else rows
    cell = lambda r, k: k(r) if callable(k) else r.get(k, "")  # noqa: E731
    md = [f"# {title}", ""] + ([note, ""] if note else [])
    if env is not None and env.get("commit"):
        md += [f"commit {env['commit'][:12]}{' (dirty)' if env.get('dirty') else ''}, {env.get('device')}, "
               f"torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}"
               + (f", {env['repeats']} repeats" if env.get("repeats") else ""), ""]
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


def mid_run_points(log: Path, tokens_per_step: int) -> list[dict]:
    """WikiText-2 PPL read during a prune run (`--eval-every`, log.jsonl "ppl"): mid-run readings, schedules still
    running."""
    pts = [json.loads(x) for x in Path(log).read_text().splitlines() if x.strip()] if Path(log).exists() else []
    return [{"step": p["step"], "tokens": p["step"] * tokens_per_step, "ppl": p["ppl"]} for p in pts if "ppl" in p]
