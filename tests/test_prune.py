"""`patchc prune` end to end on tiny models: exact sparsity, outputs, errors, resume, divergence."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TINY_ARCHS
from patchc import PruneConfig, TrainingDiverged, prune
from patchc.data import DataError
from patchc.io import read_safetensors
from patchc.models import load_model
from patchc.prune_dir import apply_hard_masks_, read_prune_dir

FAST = dict(steps=4, seq_len=64, batch_size=2, calib_samples=4)


@pytest.mark.parametrize("mode", ["tile", "joint"])
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prune_hits_the_target_within_one_tile(arch, mode, small_text, tmp_path):
    cfg = PruneConfig(sparsity=0.35, mode=mode, **FAST)
    res = prune(f"tiny:{arch}", [str(small_text)], tmp_path / "out", cfg, progress=False)
    rep = json.loads((tmp_path / "out/prune.json").read_text())
    s = rep["sparsity"]
    assert abs(s["achieved"] - 0.35) <= s["one_tile"] + 1e-12
    assert rep["model"] == f"tiny:{arch}" and rep["config"]["mode"] == mode and rep["tile"] == 128
    # per-layer sparsities add up to the global one, and layers may differ
    zeros = sum(l["sparsity"] * l["shape"][0] * l["shape"][1] for l in rep["layers"])
    assert zeros / s["masked_params"] == pytest.approx(s["achieved"], abs=1e-5)
    assert all(0.0 <= l["sparsity"] <= 0.5 for l in rep["layers"])
    masks = read_prune_dir(tmp_path / "out")
    assert set(masks.bitmaps) == {l["name"] for l in rep["layers"]}
    # the HF model with the hard masks applied equals the rewritten graph in hard mode
    ids = torch.randint(0, 256, (2, 32))
    hf = load_model(f"tiny:{arch}").model
    apply_hard_masks_(hf, masks)
    torch.testing.assert_close(res.graph(ids), hf(input_ids=ids, use_cache=False).logits, rtol=1e-5, atol=1e-5)
    log = [json.loads(l) for l in (tmp_path / "out/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)


@pytest.mark.parametrize("s", [0.0, 0.1, 0.25, 0.45, 0.5])
def test_any_target_in_range(s, small_text, tmp_path):
    res = prune("tiny:llama", [str(small_text)], tmp_path / "o", PruneConfig(sparsity=s, mode="tile", **FAST),
                progress=False)
    sp = res.report["sparsity"]
    assert abs(sp["achieved"] - s) <= sp["one_tile"] + 1e-12


def test_oneshot_methods_are_24_everywhere(small_text, tmp_path):
    for method in ("magnitude", "wanda", "sparsegpt"):
        res = prune("tiny:qwen2", [str(small_text)], tmp_path / method,
                    PruneConfig(sparsity=0.5, method=method, **FAST), progress=False)
        assert res.report["sparsity"]["achieved"] == 0.5
        assert all(l["dense_tiles"] == 0 for l in res.report["layers"])
        assert res.report["tokens_trained"] == 0


def test_heuristic_hybrid_is_the_untrained_start(small_text, tmp_path):
    res = prune("tiny:llama", [str(small_text)], tmp_path / "h", PruneConfig(sparsity=0.25, method="hybrid", **FAST),
                progress=False)
    assert abs(res.report["sparsity"]["achieved"] - 0.25) <= res.report["sparsity"]["one_tile"]
    assert not (tmp_path / "h/log.jsonl").exists()


def test_auto_tile_size_and_explicit(small_text, tmp_path):
    res = prune("tiny:llama", [str(small_text)], tmp_path / "t", PruneConfig(sparsity=0.3, tile_size=64, **FAST),
                progress=False)
    assert res.report["tile"] == 64 and res.report["layers"][0]["tiles"] == (256 // 64) ** 2


@pytest.mark.parametrize("kw,match", [
    (dict(sparsity=0.6), r"outside \[0, 0.5\]"),
    (dict(sparsity=-0.1), r"outside \[0, 0.5\]"),
    (dict(mode="both"), "mode"),
    (dict(method="wanda", sparsity=0.3), "sparsity 0.5"),
    (dict(tile_size=12), "multiple of 8"),
])
def test_bad_config_is_refused(kw, match, small_text, tmp_path):
    with pytest.raises(ValueError, match=match):
        prune("tiny:llama", [str(small_text)], tmp_path / "o", PruneConfig(**{**FAST, **kw}), progress=False)
    assert not (tmp_path / "o").exists()


def test_bad_data_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    cfg = PruneConfig(sparsity=0.3, **FAST)
    with pytest.raises(DataError, match="does not exist"):
        prune("tiny:llama", [str(tmp_path / "nope.txt")], tmp_path / "a", cfg, progress=False)
    with pytest.raises(DataError, match="holds no text"):
        prune("tiny:llama", [str(empty)], tmp_path / "b", cfg, progress=False)
    with pytest.raises(DataError, match="fewer than one sequence of 64"):
        prune("tiny:llama", [str(short)], tmp_path / "c", cfg, progress=False)


def test_holdout_reports_the_ppl_of_windows_training_never_saw(small_text, tmp_path):
    """--holdout N: prune.json gives the held-out windows' PPL for dense, start and result (and log.jsonl every
    --eval-every steps), without --eval-ppl; the dense model's held-out PPL is that of those windows."""
    cfg = PruneConfig(sparsity=0.35, mode="joint", **{**FAST, "steps": 4}, holdout=3)
    res = prune("tiny:llama", [str(small_text)], tmp_path / "o", cfg, progress=False, eval_every=2)
    h = res.report["ppl_holdout"]
    assert h["dense"]["windows"] == h["final"]["windows"] == 3 and h["final"]["seq_len"] == 64
    assert all(math.isfinite(h[k]["ppl"]) for k in ("dense", "init", "final"))
    assert h["dense"]["ppl"] != h["final"]["ppl"]
    assert res.report["ppl"] == {"dense": None, "init": None, "final": None}   # no --eval-ppl given
    log = [json.loads(x) for x in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "ppl_holdout" in r] == [2]
    with pytest.raises(ValueError, match="holdout must be >= 0"):
        prune("tiny:llama", [str(small_text)], tmp_path / "b", PruneConfig(**{**FAST, "holdout": -1}), progress=False)
    with pytest.raises(DataError, match="lower --holdout"):
        prune("tiny:llama", [str(small_text)], tmp_path / "c", PruneConfig(**{**FAST, "holdout": 10 ** 6}),
              progress=False)


def test_existing_output_needs_overwrite(small_text, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cfg = PruneConfig(sparsity=0.3, **FAST)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prune("tiny:llama", [str(small_text)], out, cfg, progress=False)
    with pytest.raises(ValueError, match="not a patchc output"):  # --overwrite replaces only an earlier run
        prune("tiny:llama", [str(small_text)], out, cfg, progress=False, overwrite=True)
    assert (out / "keep.txt").exists()
    run = tmp_path / "run"
    prune("tiny:llama", [str(small_text)], run, cfg, progress=False)
    (run / "old.txt").write_text("x")
    prune("tiny:llama", [str(small_text)], run, cfg, progress=False, overwrite=True)
    assert (run / "prune.json").exists() and not (run / "old.txt").exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_text, tmp_path, monkeypatch):
    import patchc.train as tr

    real = tr.step_loss

    def nan_from_step_3(gm, nodes, state, cfg, ids, numel, w_norm, weight_coef):
        loss, ce, kl, density = real(gm, nodes, state, cfg, ids, numel, w_norm, weight_coef)
        return (loss * float("nan") if state.step >= 3 else loss), ce, kl, density
    monkeypatch.setattr(tr, "step_loss", nan_from_step_3)
    cfg = PruneConfig(sparsity=0.3, **{**FAST, "steps": 6})
    with pytest.raises(TrainingDiverged, match=r"last good checkpoint \(step 2\)"):
        prune("tiny:llama", [str(small_text)], tmp_path / "o", cfg, progress=False, save_every=2)
    assert not (tmp_path / "o/prune.json").exists()
    state = json.loads((tmp_path / "o/checkpoint/state.json").read_text())
    assert state["step"] == 2
    shards = list((tmp_path / "o/checkpoint").glob("*.safetensors"))
    assert shards and all(torch.isfinite(t.float()).all() for f in shards for t in read_safetensors(f).values())


def test_non_finite_logits_stop_the_run(small_text, tmp_path):
    cfg = PruneConfig(sparsity=0.3, lr=float("inf"), **{**FAST, "steps": 6})
    with pytest.raises(TrainingDiverged, match="mask logits became non-finite at step 0"):
        prune("tiny:llama", [str(small_text)], tmp_path / "o", cfg, progress=False, save_every=1)
    assert not (tmp_path / "o/prune.json").exists()


def test_resume_after_kill_reproduces_an_uninterrupted_run(small_text, tmp_path):
    args = ["tiny:llama", "--sparsity", "0.35", "--mode", "joint", "--data", str(small_text), "--steps", "60",
            "--seq-len", "64", "--batch-size", "2", "--calib-samples", "4", "--save-every", "2", "--quiet",
            "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "patchc", "prune", *args]
    ref = subprocess.run([*cmd, "--out", str(tmp_path / "ref")], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state, deadline = out / "checkpoint/state.json", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["step"] >= 4:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "prune.json").exists(), "the run finished before it could be killed"
    killed_at = json.loads(state.read_text())["step"]
    assert 4 <= killed_at < 60
    res = subprocess.run([*cmd, "--out", str(out), "--resume"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = read_safetensors(tmp_path / "ref/masks.safetensors"), read_safetensors(out / "masks.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))


def test_resume_refuses_another_configuration(small_text, tmp_path):
    prune("tiny:llama", [str(small_text)], tmp_path / "o", PruneConfig(sparsity=0.3, **FAST), progress=False,
          keep_checkpoint=True)
    with pytest.raises(ValueError, match="different configuration"):
        prune("tiny:llama", [str(small_text)], tmp_path / "o", PruneConfig(sparsity=0.4, **FAST), progress=False,
              resume=True)


def test_joint_starts_from_the_one_shot_pattern(small_text, tmp_path):
    # with lr 0 nothing moves: joint must extract exactly the one-shot start that tile mode uses
    runs = {}
    for mode in ("tile", "joint"):
        cfg = PruneConfig(sparsity=0.35, mode=mode, lr=0.0, **{**FAST, "steps": 1})
        prune("tiny:llama", [str(small_text)], tmp_path / mode, cfg, progress=False)
        runs[mode] = read_safetensors(tmp_path / mode / "masks.safetensors")
    for k in runs["tile"]:
        if k.endswith(("/bitmap", "/pattern")):
            assert torch.equal(runs["tile"][k], runs["joint"][k]), k


def test_eval_every_logs_the_learning_curve_and_changes_nothing_learned(small_text, wiki_test, tmp_path):
    cfg = PruneConfig(sparsity=0.35, mode="joint", **FAST)
    ev = dict(eval_ppl=str(wiki_test), eval_seq_len=64, eval_windows=2, progress=False)
    prune("tiny:llama", [str(small_text)], tmp_path / "a", cfg, eval_every=2, **ev)
    prune("tiny:llama", [str(small_text)], tmp_path / "b", cfg, **ev)
    log = [json.loads(x) for x in (tmp_path / "a/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "ppl" in r] == [2]  # step 4 is the final evaluation in prune.json
    assert math.isfinite(log[1]["ppl"]) and log[1]["ppl"] > 1
    a, b = read_safetensors(tmp_path / "a/masks.safetensors"), read_safetensors(tmp_path / "b/masks.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="--eval-every needs --eval-ppl"):
        prune("tiny:llama", [str(small_text)], tmp_path / "c", cfg, eval_every=2, progress=False)
