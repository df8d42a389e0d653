"""`patchc bench`: a packed checkpoint against its dense twin (the timing itself is only meaningful on a GPU;
on the CPU these tests check the twin's equivalence, the report and the errors)."""
import json
import subprocess
import sys

import pytest
import torch

from patchc.lower import load, lower
from patchc.runtime import HybridLinear, hybrid_layers
from patchc.speed import BenchConfig, densify_, greedy_agreement, weights_gb


@pytest.fixture(scope="module")
def ckpt(pruned_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "ck"
    lower(pruned_tiny("llama", 0.35), out)
    return out


def test_dense_twin_computes_what_the_packed_model_computes(ckpt):
    model = load(ckpt)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits
    packed_gb, n_hybrid = weights_gb(model), len(hybrid_layers(model))
    assert densify_(model) == n_hybrid > 0
    assert not any(isinstance(m, HybridLinear) for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert weights_gb(model) > packed_gb  # the 2:4 tiles' zeros are stored again


def test_bench_command_reports_both_rows(ckpt, tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "patchc", "bench", str(ckpt), "--device", "cpu", "--batch", "2",
                        "--prompt", "8", "--new", "4", "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert [row["row"] for row in rep["rows"]] == ["patch", "dense"]
    assert all(row["new_tokens_per_s"] > 0 and row["total_ms"] >= row["prefill_ms"] for row in rep["rows"])
    assert 0 < rep["weights_ratio"] < 1 and rep["config"]["new"] == 4
    assert rep["greedy_agreement"] == 1.0  # on the CPU the reference path computes exactly what the twin does
    assert "packed / best dense (dense)" in r.stdout and "reference path" in r.stdout


def test_bench_alternates_rows_and_reports_ranges(ckpt, tmp_path):
    """--repeats 2 with both dense modes: patch / dense / dense-max-autotune alternate twice, each row gives medians
    and min / max over its two runs, the speedup is against the best dense row, and the packed model survives
    beside the twin (the weight-sharing copy for the second mode adds no weight memory)."""
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "patchc", "bench", str(ckpt), "--device", "cpu", "--batch", "2",
                        "--prompt", "8", "--new", "4", "--repeats", "2", "--dense-modes",
                        "reduce-overhead,max-autotune", "--json", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(out.read_text())
    rows = {row["row"]: row for row in rep["rows"]}
    assert list(rows) == ["patch", "dense", "dense-max-autotune"]
    starts = [line.split(" (")[0].split(": ")[-1] for line in r.stderr.splitlines() if "repeat " in line]
    assert starts == ["patch", "dense", "dense-max-autotune"] * 2          # alternated, not one row after another
    for row in rows.values():
        st = row["stats"]["new_tokens_per_s"]
        assert row["repeats"] == st["n"] == len(row["runs"]) == 2
        assert st["min"] <= row["new_tokens_per_s"] == st["median"] <= st["max"]
    best = max(rows["dense"]["new_tokens_per_s"], rows["dense-max-autotune"]["new_tokens_per_s"])
    assert rep["speedup_tokens_per_s"] == round(rows["patch"]["new_tokens_per_s"] / best, 3)
    assert rep["best_dense"] in ("dense", "dense-max-autotune")
    assert rep["greedy_agreement_vs"] == {"dense": 1.0, "dense-max-autotune": 1.0}
    assert rows["dense"]["weights_GB"] == rows["dense-max-autotune"]["weights_GB"] > rows["patch"]["weights_GB"]
    assert rep["config"]["dense_modes"] == ["reduce-overhead", "max-autotune"] and rep["config"]["repeats"] == 2


def test_twin_shares_weights_and_not_modules(ckpt):
    from patchc.speed import twin_sharing_weights

    model = load(ckpt)
    densify_(model)
    twin = twin_sharing_weights(model)
    assert twin is not model and twin.generation_config is not model.generation_config
    assert all(a is b for a, b in zip(model.parameters(), twin.parameters()))
    assert twin.model.layers[0] is not model.model.layers[0]


def test_bench_errors_are_clear(ckpt, tmp_path):
    with pytest.raises(ValueError, match="batch must be >= 1"):
        BenchConfig(batch=0)
    with pytest.raises(ValueError, match="dense_modes"):
        BenchConfig(dense_modes=("fast",))
    r = subprocess.run([sys.executable, "-m", "patchc", "bench", str(ckpt), "--device", "cpu", "--repeats", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "repeats must be >= 1" in r.stderr
    r = subprocess.run([sys.executable, "-m", "patchc", "bench", str(ckpt), "--device", "cpu", "--prompt", "1000",
                        "--new", "100"], capture_output=True, text=True)
    assert r.returncode == 2 and "max_position_embeddings" in r.stderr
    r = subprocess.run([sys.executable, "-m", "patchc", "bench", str(tmp_path / "nope"), "--device", "cpu"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error" in r.stderr


def test_greedy_agreement_counts_tokens_before_the_first_difference():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    b = torch.tensor([[1, 2, 9, 4], [1, 2, 3, 4], [0, 6, 7, 8]])   # the 4th of row 0 matches again: not counted
    assert greedy_agreement(a, b) == pytest.approx((2 + 4 + 0) / 12)
    assert greedy_agreement(a, a) == 1.0
