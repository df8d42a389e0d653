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


def test_e2e_measures_a_lowered_checkpoint(pruned_tiny, tmp_path):
    """bench/e2e.py --ckpt: the lowered checkpoint as patchc.load gives it against its densified twin, instead of
    random weights hybridised in place; --sparsities does not apply there."""
    from patchc.lower import lower

    ckpt = tmp_path / "ck"
    lower(pruned_tiny("llama", 0.35), ckpt)
    cmd = [sys.executable, str(ROOT / "bench/e2e.py"), "--ckpt", str(ckpt), "--device", "cpu", "--batch", "2",
           "--prompt", "8", "--new", "3", "--repeats", "1", "--out", str(tmp_path / "e")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "e" / "e2e.json").read_text())
    assert [x["row"] for x in res["rows"]] == ["dense-inductor", "patch"]
    info = res["rows"][1]["per_layer_sparsity"]
    assert info["checkpoint"] == str(ckpt) and info["layers"] > 0 and info["min"] <= info["mean"] <= info["max"]
    assert res["env"]["shape"]["checkpoint"] == str(ckpt)
    r = subprocess.run(cmd + ["--sparsities", "0.35"], capture_output=True, text=True)
    assert r.returncode == 2 and "--ckpt" in r.stderr


def test_serving_quick_writes_one_file_and_resumes(tmp_path):
    """bench/serving.py --quick: kernel rows (every shape x M x sparsity, median and range) and the e2e flow
    (random model -> patchc prune --mode tile -> lower -> patchc bench per batch) in serving.json; a second run
    re-runs nothing, and a run of one stage fills in only that stage's missing rows."""
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "bench/serving.py"), "--quick", "--device", "cpu", "--out", str(out),
           "--work", str(work)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "serving.json").read_text())
    ks = res["kernels"]
    assert sorted({(x["shape"], x["m"]) for x in ks}) == [("256x512", 1), ("256x512", 16), ("512x256", 1), ("512x256", 16)]
    assert len(ks) == 16 and {x["sparsity"] for x in ks} == {0.25, 0.35, 0.45, 0.5}
    for x in ks:
        assert x["us_min"] <= x["us"] <= x["us_max"] and x["cublas_min"] <= x["cublas_us"] <= x["cublas_max"]
        assert x["speedup_vs_cublas"] == round(x["cublas_us"] / x["us"], 3) and x["repeats"] == 2
        assert x["rel_err"] < 1e-4 and abs(x["achieved"] - x["sparsity"]) < 0.13
    es = res["e2e"]
    assert [x["batch"] for x in es] == [1, 2]
    for x in es:
        assert x["tok_s_min"] <= x["tok_s"] <= x["tok_s_max"] and x["repeats"] == 2
        assert x["speedup"] == round(x["tok_s"] / max(x["dense_tok_s"], x["dense_maxautotune_tok_s"]), 3)
        assert x["greedy_agreement"] == 1.0 and 0.2 < x["sparsity"] <= 0.5 and x["target_sparsity"] == 0.35
        assert [row["row"] for row in x["rows"]] == ["patch", "dense", "dense-max-autotune"]
        assert x["commit"] == res["env"]["e2e"]["commit"] and len(x["commit"]) == 40
    assert len(res["commit"]) == 40 and res["versions"]["torch"] and res["gpu"] == "cpu"
    assert set(res["env"]) == {"kernels", "e2e"} and res["env"]["e2e"]["prune"]["mode"] == "tile"
    assert "| batch |" in (out / "serving.md").read_text()
    assert (work / "llama-quick-random-tile-0.35-packed" / "manifest.json").is_file()

    r = subprocess.run(cmd, capture_output=True, text=True)                    # everything there: nothing re-run
    assert r.returncode == 0 and "0 cases to run" in r.stderr and "$ patchc" not in r.stderr
    assert json.loads((out / "serving.json").read_text())["kernels"] == ks

    res["kernels"] = ks[1:]                                                    # one row of each stage missing
    res["e2e"] = es[:1]
    (out / "serving.json").write_text(json.dumps(res))
    r = subprocess.run(cmd + ["--stages", "kernels"], capture_output=True, text=True)
    assert r.returncode == 0 and "1 cases to run" in r.stderr and "e2e:" not in r.stderr
    again = json.loads((out / "serving.json").read_text())
    assert len(again["kernels"]) == 16 and len(again["e2e"]) == 1
    r = subprocess.run(cmd + ["--stages", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "--stages" in r.stderr

    # --max-tasks 1 (one step a GPU call): a fresh work folder gets its model and nothing else
    r = subprocess.run(cmd[:-1] + [str(tmp_path / "w2"), "--out", str(tmp_path / "o2"), "--stages", "e2e",
                                   "--max-tasks", "1"], capture_output=True, text=True)
    assert r.returncode == 0 and "budget spent" in r.stderr, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "w2").iterdir()) == ["llama-quick-random"]
    assert json.loads((tmp_path / "o2" / "serving.json").read_text())["e2e"] == []


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


def test_tune_quick_rows_change_one_setting_on_held_out_windows_and_resume(tmp_path):
    """bench/tune.py --quick: a base row and one row per varied value, each a prune run scored on held-out
    training windows (never an evaluation file); a second run reuses the saved rows; bad names fail first."""
    cmd = [sys.executable, str(ROOT / "bench/tune.py"), "--quick", "--out", str(tmp_path / "t"),
           "--vary", "prior_strength=1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "t" / "tuning.json").read_text())
    assert [x["row"] for x in res["rows"]] == ["base", "prior_strength=1.0"]
    assert res["rows"][1]["change"] == {"prior_strength": 1.0} and res["rows"][0]["vs_base"] == 1.0
    assert all(x["holdout_windows"] == 4 and x["holdout_ppl"] > 1 for x in res["rows"])
    assert res["env"]["base"]["holdout"] == 4
    r = subprocess.run(cmd, capture_output=True, text=True)  # rows saved: no prune runs again
    assert r.returncode == 0 and "[tune]" not in r.stderr
    r = subprocess.run(cmd[:-1] + ["no_such_knob=1"], capture_output=True, text=True)
    assert r.returncode != 0 and "not a PruneConfig field" in r.stderr


def test_state_quality_rows_from_separate_processes_merge(tmp_path):
    """bench/state_quality.py: the lean and the fp32 rows may run in separate processes; the second keeps the
    first's row (with its commit) and adds the lean / fp32 PPL ratio."""
    wiki = ROOT.parent / "shared/assets/data/wikitext2/wiki.test.raw.txt"
    base = [sys.executable, str(ROOT / "bench/state_quality.py"), "--model", "tiny:llama", "--data",
            str(ROOT.parent / "shared/assets/data/calib/wikitext2_v1_valid.txt"), "--eval-ppl", str(wiki),
            "--steps", "2", "--batch-size", "2", "--seq-len", "64", "--eval-seq-len", "64",
            "--eval-windows", "4", "--work", str(tmp_path / "w"),
            "--out", str(tmp_path / "sq")]
    for state in ("lean", "fp32"):
        r = subprocess.run(base + ["--states", state], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "sq" / "state_quality.json").read_text())["rows"]
    assert [x["state"] for x in rows] == ["lean", "fp32"] and all(x["commit"] for x in rows)
    assert rows[0]["state_bytes_per_masked_weight"] < 6.01 < 18 <= rows[1]["state_bytes_per_masked_weight"]
    assert rows[0]["ppl_vs_fp32"] == round(rows[0]["ppl_final"] / rows[1]["ppl_final"], 4)
