"""The command line as a user runs it, and the errors a user sees."""
import json
import subprocess
import sys

import pytest

from patchc.cli import main
from patchc.models import ModelSpecError, resolve_spec

from conftest import SHARED


def run(*args):
    return subprocess.run([sys.executable, "-m", "patchc", *args], capture_output=True, text=True)


def test_prune_then_eval(small_text, wiki_test, tmp_path):
    out = tmp_path / "p"
    r = run("prune", "tiny:gpt2", "--sparsity", "0.25", "--mode", "tile", "--data", str(small_text), "--steps", "3",
            "--seq-len", "64", "--batch-size", "2", "--calib-samples", "4", "--out", str(out), "--quiet",
            "--eval-ppl", str(wiki_test), "--eval-seq-len", "128", "--eval-windows", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "sparsity 0.25" in r.stdout
    assert "patchc: model tiny:gpt2 -> gpt2 (random weights, seeded, byte-level tokenizer), float32 on cpu" in r.stderr
    rep = json.loads((out / "prune.json").read_text())
    assert rep["ppl"]["final"]["windows"] == 2 and rep["ppl"]["final"]["seq_len"] == 128
    r = run("eval", str(out), "--ppl", str(wiki_test), "--seq-len", "128", "--max-windows", "2", "--device", "cpu",
            "--json", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((tmp_path / "e.json").read_text())["ppl"]
    assert got == pytest.approx(rep["ppl"]["final"]["ppl"], rel=1e-4)  # same masks, HF model vs graph
    # the lowered checkpoint: same PPL through patchc.load, plus zero-shot scoring
    assert run("lower", str(out), "--out", str(tmp_path / "ck")).returncode == 0
    zs = SHARED / "assets" / "data" / "zeroshot"
    r = run("eval", str(tmp_path / "ck"), "--ppl", str(wiki_test), "--seq-len", "128", "--max-windows", "2",
            "--zeroshot", str(zs), "--tasks", "piqa,lambada_openai", "--limit", "3", "--device", "cpu",
            "--json", str(tmp_path / "z.json"))
    assert r.returncode == 0, r.stderr[-2000:]
    z = json.loads((tmp_path / "z.json").read_text())
    assert z["ppl"] == pytest.approx(got, rel=1e-4)
    assert z["zeroshot"]["piqa"]["n"] == 3 and "acc_norm" in z["zeroshot"]["piqa"] and "average acc" in r.stdout
    r = run("eval", str(out))
    assert r.returncode != 0 and "nothing to evaluate" in r.stderr


def test_errors_are_clear(small_text, tmp_path, capsys):
    assert main(["prune", "tiny:llama", "--sparsity", "0.7", "--data", str(small_text), "--out", str(tmp_path / "a")]) == 2
    assert "outside [0, 0.5]" in capsys.readouterr().err
    assert main(["prune", "tiny:nope", "--sparsity", "0.3", "--data", str(small_text), "--out", str(tmp_path / "b")]) == 2
    assert "unknown tiny arch" in capsys.readouterr().err
    assert main(["prune", "tiny:llama", "--sparsity", "0.3", "--data", str(tmp_path / "missing.txt"),
                 "--out", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prune", "tiny:llama", "--data", str(small_text), "--out", str(tmp_path / "d")]) == 2
    assert "--sparsity is required" in capsys.readouterr().err
    assert main(["prune", "tiny:llama", "--sparsity", "0.3", "--data", str(small_text), "--out", str(tmp_path / "e"),
                 "--device", "cpu", "--cuda-graphs"]) == 2
    assert "CUDA graphs need a CUDA device" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_model_specs(tmp_path):
    assert resolve_spec("tiny:opt") == ("tiny", "opt")
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_spec(str(tmp_path / "x.gguf"))
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ModelSpecError, match="without config.json"):
        resolve_spec(str(tmp_path / "notamodel"))
    (tmp_path / "f.bin").write_text("x")
    with pytest.raises(ModelSpecError, match="not a .gguf"):
        resolve_spec(str(tmp_path / "f.bin"))
    assert resolve_spec("org/name") == ("hub", "org/name")


def test_help_shows_defaults():
    r = run("prune", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for want in ("--steps STEPS training steps (default: 400)", "(default: joint)", "(default: auto)",
                 "--eval-seq-len EVAL_SEQ_LEN PPL window length (default: 2048)"):
        assert want in text, want
    for cmd in ("eval", "lower", "inspect", "bench"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and "(default:" in r.stdout, cmd


def test_python_api_defaults_match_the_cli():
    """patchc.prune / patchc.load / patchc.speed.bench default to device "auto" and dtype "auto" as the CLI does, and
    "auto" resolves to cuda where available (bf16), else cpu (fp32)."""
    import inspect

    import torch

    import patchc
    from patchc.models import describe_source, resolve_device, resolve_dtype
    from patchc.speed import bench

    assert inspect.signature(patchc.prune).parameters["device"].default == "auto"
    assert inspect.signature(patchc.prune).parameters["dtype"].default == "auto"
    assert inspect.signature(patchc.load).parameters["device"].default == "auto"
    assert inspect.signature(bench).parameters["device"].default == "auto"
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == want and resolve_device("cpu") == "cpu"
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype(torch.float16, "cpu") == torch.float16
    line = describe_source("smollm2-135m", "gguf", "/x/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert line == "model smollm2-135m -> /x/SmolLM2-135M-Instruct.Q4_1.gguf (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised)"
