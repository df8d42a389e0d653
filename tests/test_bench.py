"""The GPU benchmark scripts run end to end on the CPU in their quick modes (so they cannot rot)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_e2e_quick(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench/e2e.py"), "--quick", "--device", "cpu", "--sparsities", "0.35",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert [x["row"] for x in rows] == ["dense-inductor", "patch-0.35"]
    info = rows[1]["per_layer_sparsity"]
    assert info["min"] < 0.35 < info["max"]  # non-uniform layers around the exact global target
    assert all(x["new_tokens_per_s"] > 0 for x in rows)


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
