"""Print the README's "Measured" table (markdown) from the maintained results in bench/results/.

    python bench/readme_table.py            # paste between <!-- measured:begin --> and <!-- measured:end -->
    python bench/readme_table.py --check README.md   # exit 1 if the README's table differs from the results

Every row names the GPU, the git commit the result records (older results did not record one: "not recorded"),
how many times each number was measured, the median and the range, and the results folder. Ranges are over the
repeats where a result has repeats, else over the cases the row names (shapes, sparsities).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"


def _jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; lines may carry a prefix before the JSON object (`1 dense-inductor rc=0 {...}`)."""
    rows = []
    for line in path.read_text().splitlines():
        if "{" in line:
            rows.append(json.loads(line[line.index("{"):]))
    return rows


def _gpu(env: dict) -> str:
    name = env.get("gpu") or env.get("device") or env.get("device_name") or "?"
    return name.replace("NVIDIA ", "").replace(" 80GB HBM3", "")


def _commit(env: dict) -> str:
    c = env.get("commit")
    return "not recorded" if not c else c[:10] + (" (dirty)" if env.get("dirty") else "")


def _fmt(v: float, digits: int) -> str:
    return f"{v:.{digits}f}"


def _row(what, env, repeats, values, folder, digits=2, unit=""):
    med, lo, hi = statistics.median(values), min(values), max(values)
    rng = f"{_fmt(lo, digits)}–{_fmt(hi, digits)}{unit}" if len(values) > 1 else "—"
    return (f"| {what} | {_gpu(env)} | {_commit(env)} | {repeats} | {_fmt(med, digits)}{unit} | {rng} | "
            f"`{folder}` |")


def decode_rows() -> list[str]:
    d = json.loads((RESULTS / "decode/decode.json").read_text())
    env, rows = d["env"], d["decode"]
    rep = env.get("repeats", 2)
    out = []
    for s in sorted({r["sparsity"] for r in rows}):
        rs = [r for r in rows if r["sparsity"] == s]
        out.append(_row(f"decode M=16, {s:.0%}: hybrid speed / cuBLAS dense (3 LLaMA-2-7B shapes)", env, rep,
                        [r["cublas_us"] / r["default_us"] for r in rs], "bench/results/decode", unit="×"))
    out.append(_row("decode M=16, 0–50%: time / byte floor (15 points)", env, rep,
                    [r["default_us"] / r["floor_us"] for r in rows], "bench/results/decode", unit="×"))
    return out


def prefill_rows() -> list[str]:
    path = RESULTS / "prefill"
    rows = [r for r in _jsonl(path / "prefill.jsonl") if "check" not in r]
    env = json.loads((path / "prefill.json").read_text())["env"] if (path / "prefill.json").is_file() else \
        {"gpu": "H100", **json.loads((path / "env.json").read_text())}
    rep = len(rows[0].get("cublas_runs_us", [])) or "not recorded"
    out = []
    for s in sorted({r["sparsity"] for r in rows}):
        if s == 0:
            continue          # 0% layers run cuBLAS itself (a plain dense linear)
        rs = [r for r in rows if r["sparsity"] == s]
        key = "default_vs_cublas" if s == 0.5 else "wgmma128_vs_cublas"   # H100 engines: cuSPARSELt / wgmma
        engine = "cuSPARSELt" if s == 0.5 else "wgmma"
        out.append(_row(f"prefill M=2048, {s:.0%} ({engine}): speed / cuBLAS dense (3 shapes)", env, rep,
                        [r[key] for r in rs], "bench/results/prefill", digits=3, unit="×"))
    return out


def e2e_rows() -> list[str]:
    path = RESULTS / "e2e"
    env = json.loads((path / "env.json").read_text())
    runs = _jsonl(path / "alternating/e2e_alternating.jsonl") + _jsonl(path / "repeats.jsonl")
    by = {}
    for r in runs:
        by.setdefault(r["row"], []).append(r)
    dense = statistics.median(r["new_tokens_per_s"] for r in by["dense-inductor"])
    out = []
    for label in sorted(by, key=lambda x: (x != "dense-inductor", x)):
        rs = by[label]
        name = "dense + inductor" if label == "dense-inductor" else f"PATCH {float(label.split('-')[1]):.0%}"
        out.append(_row(f"LLaMA-2-7B shape, batch 16, 128+128: {name}, decode ms/token", env, len(rs),
                        [r["decode_ms_per_token"] for r in rs], "bench/results/e2e"))
        if label != "dense-inductor":
            out.append(_row(f"… {name}: tokens/s / dense's median ({dense:.0f} tok/s, first machine)", env, len(rs),
                            [r["new_tokens_per_s"] / dense for r in rs], "bench/results/e2e", unit="×"))
    for label in sorted(by, key=lambda x: (x != "dense-inductor", x)):
        rs = by[label]
        name = "dense" if label == "dense-inductor" else f"{float(label.split('-')[1]):.0%}"
        out.append(_row(f"… {name}: weights / peak memory of generate(), GB", env, len(rs),
                        [rs[-1]["weights_GB"]], "bench/results/e2e").replace(
            f"| {_fmt(rs[-1]['weights_GB'], 2)} |", f"| {rs[-1]['weights_GB']} / {rs[-1]['peak_mem_GB']} |"))
    return out


def compile_rows() -> list[str]:
    res = {k: json.loads((RESULTS / f"compile_time/{k}/e2e.json").read_text()) for k in ("cold", "warm")}
    warm = {r["row"]: r["first_call_s"] for r in res["warm"]["rows"]}
    env = res["cold"]["env"]
    return [f"| first generate(), 7B shape, cold / warm caches: {r['row']}, s | {_gpu(env)} | {_commit(env)} | 1 | "
            f"{r['first_call_s']:.1f} / {warm.get(r['row'], float('nan')):.1f} | — | `bench/results/compile_time` |"
            for r in res["cold"]["rows"]]


def accuracy_rows() -> list[str]:
    d = json.loads((RESULTS / "accuracy/accuracy.json").read_text())
    env = {**d["meta"], "gpu": d["meta"].get("device_name")}
    ppl = {r["name"]: r["wikitext2_ppl"] for r in d["rows"]}
    groups = [("dense", ["dense"]), ("2:4 one-shot: magnitude / Wanda / SparseGPT", ["magnitude-2:4", "wanda-2:4",
              "sparsegpt-2:4"]), ("2:4 learned", ["learned-2:4"]), ("heuristic hybrid 25 / 35 / 45%", ["hybrid-25",
              "hybrid-35", "hybrid-45"]), ("PATCH-Tile 25 / 35 / 45%", ["tile-25", "tile-35", "tile-45"]),
              ("PATCH-Joint 25 / 35 / 45%", ["joint-25", "joint-35", "joint-45"])]
    out = []
    for name, keys in groups:
        vals = " / ".join(f"{ppl[k]:.1f}" for k in keys if k in ppl)
        out.append(f"| SmolLM2-135M WikiText-2 PPL, {name} | {_gpu(env)} | {_commit(env)} | 1 | {vals} | — | "
                   "`bench/results/accuracy` |")
    return out


def train_rows() -> list[str]:
    """Step time / plain fwd+bwd of tile, joint and joint+kd per model (eager, one run), and the 8B fit."""
    d = json.loads((RESULTS / "train_speed/train_speed.json").read_text())
    rows = [r for r in d["rows"] if r.get("fits") and r.get("run", "a") == "a"]
    out = []
    for model in dict.fromkeys(r["model"] for r in rows if "vs_plain" in r):
        got = {r["kind"]: r for r in rows if r["model"] == model and "vs_plain" in r}
        kinds = [k for k in ("tile", "joint", "joint+kd") if k in got]
        r0 = got[kinds[0]]
        vals = " / ".join(f"{got[k]['vs_plain']:.2f}×" for k in kinds)
        out.append(f"| mask-training step / plain fwd+bwd, {model} {r0['batch']}×{r0['seq']}: {' / '.join(kinds)} | "
                   f"{_gpu(d['env'])} | {_commit(d['env'])} | {r0.get('reps', 1)} | {vals} | — | "
                   "`bench/results/train_speed` |")
    for r in d["rows"]:
        if r.get("fits") and r["model"] == "llama3-8b":
            env = {**d["env"], **({"commit": r["commit"], "dirty": False} if "commit" in r else {})}
            out.append(_row(f"PATCH-Joint step, llama3-8b shape {r['batch']}×{r['seq']} on one GPU (peak {r['peak_GB']} "
                            "GB), ms", env, r.get("reps", 1), [r["step_ms"]], "bench/results/train_speed", digits=0))
    return out


def state_quality_rows() -> list[str]:
    f = RESULTS / "state_quality/state_quality.json"
    if not f.is_file():
        return []
    d = json.loads(f.read_text())
    return [_row(f"SmolLM2-135M WikiText-2 PPL, PATCH-Joint {r['sparsity']:.0%}, {r['tokens_trained'] / 1e6:.2f}M tokens of "
                 f"all calib, {r['state']} state", d["env"], 1, [r["ppl_final"]], "bench/results/state_quality")
            for r in d["rows"]]


def table() -> str:
    head = ["| what | GPU | commit | repeats | median | range | results |", "|---|---|---|---|---|---|---|"]
    body = decode_rows() + prefill_rows() + e2e_rows() + compile_rows() + accuracy_rows() + state_quality_rows() + train_rows()
    return "\n".join(head + body) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--check", metavar="README", default=None,
                    help="compare with the table between the markers in this file instead of printing")
    a = ap.parse_args()
    t = table()
    if a.check is None:
        print(t, end="")
        return
    text = Path(a.check).read_text()
    current = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n") + "\n"
    if current != t:
        sys.exit(f"{a.check}: the Measured table differs from bench/readme_table.py's output; paste it again")


if __name__ == "__main__":
    main()
