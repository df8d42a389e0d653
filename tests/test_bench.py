"""The GPU benchmark scripts run end to end on the CPU in their quick modes (so they cannot rot)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_e2e_quick(tmp_path):
    """bench/e2e.py --quick: rows alternate --repeats times; each row stores median / min / max over them, and the
    result records the git commit and versions it measured."""
    r = subprocess.run([sys.executable, str(ROOT / "bench/e2e.py"), "--quick", "--device", "cpu", "--sparsities", "0.35",
                        "--repeats", "2", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "e2e.json").read_text())
    rows = res["rows"]
    assert [x["row"] for x in rows] == ["dense-inductor", "patch-0.35"]
    info = rows[1]["per_layer_sparsity"]
    assert info["min"] < 0.35 < info["max"]  # non-uniform layers around the exact global target
    assert info["stacked_groups"] == 4  # q/k/v and gate/up of both layers share one allocation, as patchc.load does
    for x in rows:
        st = x["tokens_per_s"]
        assert x["repeats"] == st["n"] == 2 and 0 < st["min"] <= st["median"] <= st["max"]
    env = res["env"]
    assert env["repeats"] == 2 and len(env["commit"]) == 40 and isinstance(env["dirty"], bool)
    assert env["transformers"] and env["torch"]


def test_accuracy_quick_evaluates_lowered_rows_and_resumes(tmp_path):
    """bench/accuracy.py --quick: rows on the tiny model, pruned rows evaluated through patchc.load; a second
    run skips finished rows and rebuilds the report."""
    cmd = [sys.executable, str(ROOT / "bench/accuracy.py"), "--quick", "--quiet", "--out", str(tmp_path / "acc"),
           "--work", str(tmp_path / "work"), "--rows", "dense,wanda-2:4,tile-35"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "acc" / "accuracy.json").read_text())
    by = {x["name"]: x for x in res["rows"]}
    assert set(by) == {"dense", "wanda-2:4", "tile-35"}
    assert by["wanda-2:4"]["achieved"] == 0.5 and abs(by["tile-35"]["achieved"] - 0.35) < 0.01
    raw = {x["name"]: x for x in res["raw"]}
    assert raw["tile-35"]["evaluated_on"].startswith("lowered checkpoint")
    assert raw["tile-35"]["tokens_trained"] == 2 * 2 * 64
    for x in res["rows"]:
        assert x["wikitext2_ppl"] > 1 and 0 <= x["avg_acc"] <= 1 and "winogrande_acc_norm" in x
    assert "gap closed" in (tmp_path / "acc" / "accuracy.md").read_text()
    r = subprocess.run(cmd, capture_output=True, text=True)  # everything present: nothing re-run
    assert r.returncode == 0 and "s=0.35" not in r.stdout


def test_train_speed_quick(tmp_path):
    """bench/train_speed.py --quick: a plain step and PATCH steps (with the distillation teacher) are timed; a
    +graph row (CUDA graphs) is refused on the CPU with the reason, the other rows still measured."""
    r = subprocess.run([sys.executable, str(ROOT / "bench/train_speed.py"), "--quick", "--device", "cpu",
                        "--kinds", "plain,tile,joint+kd,joint+fp32,tile+graph", "--profile", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "train_speed.json").read_text())
    graph = res["rows"].pop()
    assert graph["kind"] == "tile+graph" and not graph["fits"] and "CUDA graphs need a CUDA device" in graph["error"]
    assert [x["kind"] for x in res["rows"]] == ["plain", "tile", "joint+kd", "joint+fp32"]
    assert res["rows"][2]["state_bytes_per_masked_weight"] < 6.01 < 18 <= res["rows"][3]["state_bytes_per_masked_weight"]
    assert all(x["fits"] and x["step_ms"] > 0 for x in res["rows"]) and "vs_plain" in res["rows"][2]
    assert res["rows"][2]["mask_params"] > res["rows"][1]["mask_params"]  # joint learns 2:4 logits too
    assert "torch" in res["env"]
    assert all(x["busy_ms"] > 0 for x in res["rows"])                     # --profile: one profiled step a row
    assert (tmp_path / "profiles.txt").read_text().count("## tiny ") == 4


def test_read_floor_kernel_reads_every_word():
    """bench/kernel_sweep.py's read floor (bench/decode.py's `read_us`) is a time to read a layer's packed bytes: its kernel must load every
    word exactly once (the per-program sums add up to the buffer's sum, for buffers that do not fill the last
    program), or the floor would be too low."""
    import pytest

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    sys.path.insert(0, str(ROOT / "bench"))
    import triton
    from kernel_sweep import _read_kernel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    for words, block, iters in ((5000, 256, 2), (4096, 1024, 4), (777, 128, 8)):
        src = torch.randint(-1000, 1000, (words,), generator=g, dtype=torch.int32).to(dev)
        grid = (triton.cdiv(words, block * iters),)
        out = torch.empty(grid[0], dtype=torch.int32, device=dev)
        _read_kernel[grid](src, out, words, BLOCK=block, ITERS=iters)
        assert out.sum().item() == src.sum().item(), (words, block, iters)


def test_readme_measured_table_is_generated_from_the_results():
    """The README's Measured table is bench/readme_table.py's output on the committed results."""
    r = subprocess.run([sys.executable, str(ROOT / "bench/readme_table.py"), "--check", str(ROOT / "README.md")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


def test_token_curve_quick(tmp_path):
    """bench/token_curve.py --quick: one lowered, evaluated row per (token budget, row), each the end of its own
    run, more steps meaning more tokens; a second call re-runs nothing."""
    cmd = [sys.executable, str(ROOT / "bench/token_curve.py"), "--quick", "--quiet", "--out", str(tmp_path),
           "--rows", "joint-35", "--work", str(tmp_path / "work")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "token_curve.json").read_text())
    pts = res["points"]
    assert [(p["row"], p["steps"]) for p in pts] == [("joint-35", 1), ("joint-35", 2)]
    assert pts[1]["tokens"] == 2 * pts[0]["tokens"] > 0
    assert all(p["point"] == "end of run" and p["wikitext2_ppl"] > 1 and 0 <= p["avg_acc"] <= 1 for p in pts)
    assert "token_curve.md" in {f.name for f in tmp_path.iterdir()}
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and "joint-35" not in r.stdout.split("# Token curve")[0]   # nothing trained again
