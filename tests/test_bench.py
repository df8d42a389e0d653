"""The GPU benchmark scripts run end to end on the CPU in their quick modes (so they cannot rot)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_e2e_quick(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench/e2e.py"), "--quick", "--device", "cpu", "--sparsities", "0.35",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert [x["row"] for x in rows] == ["dense-inductor", "patch-0.35"]
    info = rows[1]["per_layer_sparsity"]
    assert info["min"] < 0.35 < info["max"]  # non-uniform layers around the exact global target
    assert info["stacked_groups"] == 4  # q/k/v and gate/up of both layers share one allocation, as patchc.load does
    assert all(x["new_tokens_per_s"] > 0 for x in rows)


def test_prefill_e2e_quick(tmp_path):
    """bench/prefill_e2e.py --quick: dense and patch rows compile, match their eager logits and are timed."""
    r = subprocess.run([sys.executable, str(ROOT / "bench/prefill_e2e.py"), "--quick", "--device", "cpu",
                        "--rows", "dense,patch-0.5", "--out", str(tmp_path)], capture_output=True, text=True,
                       cwd=ROOT / "bench")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "prefill_e2e.json").read_text())["rows"]
    assert [x["row"] for x in rows] == ["dense", "patch-0.5"]
    assert all(x["prefill_ms"] > 0 and x["rel_err_vs_eager"] < 1e-4 for x in rows)
    assert rows[1]["per_layer_sparsity"]["min"] == rows[1]["per_layer_sparsity"]["max"] == 0.5  # every tile 2:4


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


def test_kernel_variants_all_compute_the_hybrid_product():
    """bench/kernel_variants.py: every decode variant (under the interpreter on the CPU) equals float64."""
    import os

    import pytest
    import torch

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    sys.path.insert(0, str(ROOT / "bench"))
    from kernel_variants import VARIANTS, run_variant

    from patchc import mask as hm
    from patchc.codegen.schedule import build_schedule
    from patchc.format import pack_layer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    n, k, t, m = 64, 96, 32, 5
    bitmap = torch.rand(n // t, k // t, generator=g) < 0.4
    w = torch.randn(n, k, generator=g).half()
    pat = torch.randint(0, 6, (n, k // 4), generator=g, dtype=torch.uint8)
    pk = pack_layer(w, bitmap, pat, t)
    sched = build_schedule(bitmap, t).to(dev)
    x = torch.randn(m, k, generator=g).half()
    ref = x.double() @ hm.apply_hybrid(w.double(), bitmap, hm.pattern_to_mask(pat), t).T
    for var in VARIANTS:
        for bn, split in ((16, 1), (32, 2)):
            y = run_variant(x.to(dev), tuple(p.to(dev) for p in (pk.dense, pk.values, pk.meta)), sched, n, var, bn,
                            split, 4, 2).cpu()
            err = ((y.double() - ref).norm() / ref.norm()).item()
            assert err < 3e-3, (var, bn, split, err)


def test_train_speed_quick(tmp_path):
    """bench/train_speed.py --quick: a plain step and PATCH steps (with the distillation teacher) are timed."""
    r = subprocess.run([sys.executable, str(ROOT / "bench/train_speed.py"), "--quick", "--device", "cpu",
                        "--kinds", "plain,tile+eager,joint+kd+eager,joint+eager+fp32", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "train_speed.json").read_text())
    assert [x["kind"] for x in res["rows"]] == ["plain", "tile+eager", "joint+kd+eager", "joint+eager+fp32"]
    assert res["rows"][2]["state_bytes_per_masked_weight"] < 6.01 < 18 <= res["rows"][3]["state_bytes_per_masked_weight"]
    assert all(x["fits"] and x["step_ms"] > 0 for x in res["rows"]) and "vs_plain" in res["rows"][2]
    assert res["rows"][2]["mask_params"] > res["rows"][1]["mask_params"]  # joint learns 2:4 logits too
    assert "torch" in res["env"]


def test_read_floor_kernel_reads_every_word():
    """bench/decode_l2_pdl.py's read floor is a time to read a layer's packed bytes: its kernel must load every
    word exactly once (the per-program sums add up to the buffer's sum, for buffers that do not fill the last
    program), or the floor would be too low."""
    import pytest

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    sys.path.insert(0, str(ROOT / "bench"))
    import triton
    from decode_l2_pdl import _read_kernel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    for words, block, iters in ((5000, 256, 2), (4096, 1024, 4), (777, 128, 8)):
        src = torch.randint(-1000, 1000, (words,), generator=g, dtype=torch.int32).to(dev)
        grid = (triton.cdiv(words, block * iters),)
        out = torch.empty(grid[0], dtype=torch.int32, device=dev)
        _read_kernel[grid](src, out, words, BLOCK=block, ITERS=iters)
        assert out.sum().item() == src.sum().item(), (words, block, iters)
