"""Nothing lost, nothing silently wrong: what a new user runs into (versions, output folders, wrong weights,
coverage, integrity, and arguments checked before anything is loaded)."""
import json
import os
import types

import pytest
import torch


# ---------------------------------------------------------------------------------------------
# 1. dynamo source names: the backend's layer names whatever transformers' wrapping
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", [
    "L['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']._modules['down_proj']._buffers['bitmap']",
    "L['args'][0]._modules['model']._modules['layers']._modules['0']._modules['mlp']._modules['down_proj']._buffers['bitmap']",
    "L['self'].model.layers[0].mlp.down_proj.bitmap",
    "L['kwargs']['self']._modules['model']._modules['layers']._modules['0']._modules['mlp']._modules['down_proj']._buffers['bitmap']",
])
def test_backend_layer_name_any_source_naming(source):
    from patchc.passes.swap_kernels import _layer_name

    g = torch.fx.Graph()
    x = g.placeholder("x")
    bm = g.placeholder("bitmap")
    bm.meta["grapharg"] = types.SimpleNamespace(source=types.SimpleNamespace(name=source))
    node = g.call_function(torch.add, (x, bm))
    assert _layer_name(node) == "model.layers.0.mlp.down_proj"


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------
FAST = dict(steps=2, seq_len=64, batch_size=2, calib_samples=4)


def _prune(model, text, out, **kw):
    from patchc import PruneConfig, prune

    cfg = PruneConfig(sparsity=kw.pop("sparsity", 0.35), **FAST, seed=kw.pop("seed", 0))
    return prune(model, [str(text)], out, cfg, progress=False, **kw)


def _snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _hf_folder(path, seed):
    """A tiny llama saved as a local Hugging Face folder (weights from `seed`)."""
    from patchc.models import load_model

    lm = load_model("tiny:llama", seed=seed)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from conftest import WIKI_VALID, need

    p = tmp_path_factory.mktemp("text") / "t.txt"
    p.write_text(need(WIKI_VALID).read_text()[:30_000])
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory, text):
    """One finished prune run of tiny:llama (steps=2)."""
    out = tmp_path_factory.mktemp("run") / "p"
    _prune("tiny:llama", text, out)
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# 2. prune --overwrite: validate first, never delete what the run reads, replace only when done
# ---------------------------------------------------------------------------------------------
def test_prune_overwrite_with_bad_data_keeps_the_earlier_run(run, tmp_path):
    out = _copy(run, tmp_path / "p")
    before = _snapshot(out)
    with pytest.raises(ValueError, match="does not exist"):
        _prune("tiny:llama", tmp_path / "typo.txt", out, overwrite=True)
    assert _snapshot(out) == before


def test_prune_overwrite_never_deletes_the_model_or_a_foreign_folder(text, tmp_path):
    model = _hf_folder(tmp_path / "m", seed=0)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="overlaps"):
        _prune(str(model), text, model, overwrite=True)
    with pytest.raises(ValueError, match="overlaps"):
        _prune(str(model), text, tmp_path, overwrite=True)        # a parent of the model
    assert _snapshot(model) == before
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="not a patchc output"):
        _prune("tiny:llama", text, other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "years of work"


def test_prune_overwrite_replaces_only_after_the_new_run_succeeded(run, text, tmp_path, monkeypatch):
    import patchc.train

    out = _copy(run, tmp_path / "p")
    before = _snapshot(out)

    def boom(*a, **k):
        raise RuntimeError("killed mid-run")

    with monkeypatch.context() as m:
        m.setattr(patchc.train, "mask_graph", boom)
        with pytest.raises(RuntimeError, match="killed mid-run"):
            _prune("tiny:llama", text, out, overwrite=True)
    assert _snapshot(out) == before
    res = _prune("tiny:llama", text, out, overwrite=True, sparsity=0.25)
    assert res.out_dir == out and json.loads((out / "prune.json").read_text())["sparsity"]["target"] == 0.25
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the old run's copy is gone


# ---------------------------------------------------------------------------------------------
# 3. lower: no replacement without --overwrite, never the prune run's parent, stale temp folders cleaned
# ---------------------------------------------------------------------------------------------
def test_lower_never_replaces_a_folder_that_appeared_meanwhile(run, tmp_path, monkeypatch):
    import patchc.lower as L

    out = tmp_path / "ck"
    real = L._write_packed

    def racing(model, masks, tmp, *a):
        out.mkdir()
        (out / "theirs.txt").write_text("another lower's or user's")
        return real(model, masks, tmp, *a)

    monkeypatch.setattr(L, "_write_packed", racing)
    with pytest.raises(FileExistsError):
        L.lower(run, out)
    assert (out / "theirs.txt").read_text() == "another lower's or user's"
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp folder left


def test_lower_overwrite_refuses_parents_of_the_prune_run_and_foreign_folders(run, tmp_path):
    from patchc.lower import lower

    parent = tmp_path / "runs"
    p = _copy(run, parent / "p")
    (parent / "sibling.txt").write_text("keep")
    with pytest.raises(ValueError, match="overlaps"):
        lower(p, parent, overwrite=True)
    assert (parent / "sibling.txt").exists() and (p / "prune.json").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match="not a patchc output"):
        lower(p, foreign, overwrite=True)
    assert (foreign / "data.csv").exists()
    lower(p, tmp_path / "ck")
    lower(p, tmp_path / "ck", overwrite=True)  # an earlier checkpoint is replaced


def _dead_pid():
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_lower_removes_temp_folders_of_killed_runs(run, tmp_path):
    from patchc.lower import lower

    stale = tmp_path / f".ck.tmp-{_dead_pid()}-0badf00d"
    stale.mkdir()
    (stale / "packed.safetensors").write_bytes(b"half")
    live = tmp_path / f".ck.tmp-{os.getpid()}-0000abcd"   # a live process's: left alone
    live.mkdir()
    lower(run, tmp_path / "ck")
    assert not stale.exists() and live.exists()


# ---------------------------------------------------------------------------------------------
# 4. lower / eval load the recorded model, and check it is the same
# ---------------------------------------------------------------------------------------------
def test_lower_and_eval_use_the_recorded_model_not_the_cwd(text, tmp_path, monkeypatch):
    from patchc.fingerprint import ModelMismatchError, model_fingerprint
    from patchc.lower import load, lower
    from patchc.models import load_model
    from patchc.prune_dir import apply_hard_masks_, read_prune_dir

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _hf_folder(a / "m", seed=0)
    _hf_folder(b / "m", seed=1)                                  # same shapes, other weights
    monkeypatch.chdir(a)
    _prune("m", text, tmp_path / "p")                           # a relative model path
    rep = json.loads((tmp_path / "p/prune.json").read_text())
    assert rep["model_resolved"] == str((a / "m").resolve())
    assert rep["model_fingerprint"] == model_fingerprint(load_model(str(a / "m")).model)
    monkeypatch.chdir(b)                                         # elsewhere, "m" is another model
    lower(tmp_path / "p", tmp_path / "ck")
    ref = load_model(str(a / "m")).model
    apply_hard_masks_(ref, read_prune_dir(tmp_path / "p"))
    ids = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(load(tmp_path / "ck")(input_ids=ids).logits, ref(input_ids=ids).logits)
    # the recorded folder now holds other weights: refused, naming both
    import shutil

    shutil.rmtree(a / "m")
    shutil.copytree(b / "m", a / "m")
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        lower(tmp_path / "p", tmp_path / "ck2")
    assert not (tmp_path / "ck2").exists()
    from patchc.cli import main

    assert main(["eval", str(tmp_path / "p"), "--ppl", str(text), "--device", "cpu", "--seq-len", "64",
                 "--max-windows", "1"]) == 2


# ---------------------------------------------------------------------------------------------
# 8. arguments checked before any loading, one-line errors, nothing created; file modes
# ---------------------------------------------------------------------------------------------
def _cli(capsys, *args):
    from patchc.cli import main

    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("case", ["data", "device", "seq_len", "include", "out_file", "hub", "hub_down"])
def test_prune_arguments_fail_fast_and_create_nothing(case, text, tmp_path, capsys, monkeypatch):
    import time

    import patchc.models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    loads = []
    real = patchc.models.load_model
    monkeypatch.setattr(patchc.models, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    out = tmp_path / "deep" / "out"
    args = ["prune", "tiny:llama", "--sparsity", "0.3", "--data", str(text), "--out", str(out), "--quiet",
            "--steps", "1", "--seq-len", "64", "--device", "cpu"]
    want = {"data": "does not exist", "device": "CUDA is not available", "seq_len": "positions",
            "include": "not a valid regular expression", "out_file": "not a folder", "hub": "HF_HUB_OFFLINE",
            "hub_down": "cannot be reached"}[case]
    if case == "data":
        args[args.index("--data") + 1] = str(tmp_path / "typo.txt")
    elif case == "device":
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        args[args.index("--device") + 1] = "cuda"
    elif case == "seq_len":
        args[args.index("--seq-len") + 1] = "4096"
    elif case == "include":
        args += ["--include", "mlp.(gate"]
    elif case == "out_file":
        out.parent.mkdir()
        out.write_text("not a folder")
    elif case == "hub":
        args[1] = "no-such-org/no-such-model-patchc"
    elif case == "hub_down":                      # online, but nothing answers: no 45 s of retries
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
        args[1] = "no-such-org/no-such-model-patchc"
    t0 = time.perf_counter()
    rc, err = _cli(capsys, *args)
    assert rc == 2 and want in err and err.startswith("patchc prune: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and not loads and time.perf_counter() - t0 < 10
    assert not out.exists() or case == "out_file"
    assert not (tmp_path / "deep").exists() or case == "out_file"


def test_lower_eval_bench_fail_fast(run, text, tmp_path, capsys, monkeypatch):
    import patchc.models

    loads = []
    monkeypatch.setattr(patchc.models, "load_model", lambda *a, **k: loads.append(a))
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "x").write_text("x")
    rc, err = _cli(capsys, "lower", str(run), "--out", str(tmp_path / "ck"))
    assert rc == 2 and "--overwrite" in err and err.count("\n") == 1
    rc, err = _cli(capsys, "eval", str(run), "--ppl", str(text), "--seq-len", "5000", "--device", "cpu")
    assert rc == 2 and "positions" in err
    rc, err = _cli(capsys, "eval", str(run), "--ppl", str(tmp_path / "nope.txt"), "--device", "cpu")
    assert rc == 2 and "does not exist" in err
    if not torch.cuda.is_available():
        rc, err = _cli(capsys, "eval", str(run), "--ppl", str(text), "--device", "cuda")
        assert rc == 2 and "CUDA is not available" in err
        rc, err = _cli(capsys, "bench", str(tmp_path / "ck"), "--device", "cuda")
        assert rc == 2 and "CUDA is not available" in err
    rc, err = _cli(capsys, "bench", str(tmp_path / "ck"), "--device", "cpu")
    assert rc == 2 and "manifest.json is missing" in err
    assert not loads


def test_outputs_get_the_umask_mode(tmp_path):
    from patchc.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# 7. integrity: the manifest body is checksummed; verify = load's checks; clear errors; no symlinks
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(run, tmp_path_factory):
    from patchc.lower import lower

    out = tmp_path_factory.mktemp("ck") / "ck"
    lower(run, out)
    return out


def _edit_manifest(ck, fn):
    m = json.loads((ck / "manifest.json").read_text())
    fn(m)
    (ck / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit", ["alias", "dtype", "tile"])
def test_manifest_edits_are_detected_by_load_and_verify(edit, ckpt, tmp_path):
    from patchc.lower import CheckpointError, load, verify

    ck = _copy(ckpt, tmp_path / "ck")
    change = {"alias": lambda m: m["aliases"].update({"lm_head.weight": "model.embed_tokens.weight"}),
              "dtype": lambda m: m.update(dtype="float16"),
              "tile": lambda m: m.update(tile=64)}[edit]
    _edit_manifest(ck, change)
    for fn in (load, verify):
        with pytest.raises(CheckpointError, match="edited"):
            fn(ck)


def test_verify_runs_every_check_load_runs(ckpt, tmp_path):
    """A checkpoint whose manifest is consistent in itself but not with config.json: load fails, so must verify."""
    from patchc.lower import CheckpointError, load, verify

    ck = _copy(ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_hidden_layers"] = 1                       # the model built from it lacks layer 1
    (ck / "config.json").write_text(json.dumps(cfg))
    for fn in (load, verify):
        with pytest.raises(CheckpointError, match="does not match|no linear"):
            fn(ck)
    ck2 = _copy(ckpt, tmp_path / "ck2")

    def alias(m):
        from patchc.lower import manifest_digest

        m["aliases"]["lm_head.weight"] = "model.embed_tokens.weight"
        m["manifest_sha256"] = manifest_digest(m)      # a consistent-looking edit: the model has lm_head itself

    _edit_manifest(ck2, alias)
    for fn in (load, verify):
        with pytest.raises(CheckpointError):
            fn(ck2)


@pytest.mark.parametrize("damage", ["truncate", "foreign", "symlink"])
def test_damaged_or_linked_tensor_files_give_checkpoint_errors(damage, ckpt, tmp_path, capsys):
    from patchc.cli import main
    from patchc.lower import CheckpointError, load, verify

    ck = _copy(ckpt, tmp_path / "ck")
    f = ck / "packed.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "foreign":
        f.write_bytes(b"\x00" * 64 + b"not a safetensors file")
    else:
        target = tmp_path / "elsewhere.safetensors"
        f.rename(target)
        f.symlink_to(target)
    for fn in (load, verify):
        with pytest.raises(CheckpointError, match="symbolic link" if damage == "symlink" else "safetensors"):
            fn(ck)
    assert main(["inspect", str(ck), "--verify"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("patchc inspect: error:") and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# 5. coverage: a MoE model's fused expert weights are masked, counted and reported (tests/test_moe.py: the rest)
# ---------------------------------------------------------------------------------------------
def test_moe_experts_are_masked_and_covered(text, tmp_path, capsys):
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    from patchc.cli import main
    from patchc.lower import lower
    from patchc.models import byte_tokenizer

    cfg = AutoConfig.for_model("mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, vocab_size=384, max_position_embeddings=512,
                               bos_token_id=256, eos_token_id=256, pad_token_id=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    expert = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 3)
    assert expert > 0  # transformers 5: fused [experts, out, in] parameters
    model.save_pretrained(tmp_path / "mix")
    byte_tokenizer().save_pretrained(tmp_path / "mix")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="patchc masks only")
        res = _prune(str(tmp_path / "mix"), text, tmp_path / "p")
    cov = res.report["coverage"]
    assert cov["unmasked_expert_params"] == 0 and cov["masked_expert_params"] == expert
    assert cov["coverage"] == pytest.approx(cov["masked_params"] / cov["matmul_params"], rel=1e-5) and cov["coverage"] > 0.9
    assert res.report["sparsity"]["masked_params"] == cov["masked_params"]  # the global target counts the experts
    lower(tmp_path / "p", tmp_path / "ck")
    assert main(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert f"coverage: {cov['coverage']:.1%}" in out and "not pruned" not in out and out.count("(experts)") == 2


def test_dense_model_coverage(run):
    cov = json.loads((run / "prune.json").read_text())["coverage"]
    assert 0.9 < cov["coverage"] < 1 and cov["unmasked_expert_params"] == 0   # lm_head counted, kept dense


# ---------------------------------------------------------------------------------------------
# 6. plain transformers refuses a packed checkpoint (naming patchc.load); with patchc imported it loads it
# ---------------------------------------------------------------------------------------------
def test_plain_transformers_refuses_a_packed_checkpoint(ckpt):
    import subprocess
    import sys

    code = ("import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1]);"
            "print('LOADED')")
    r = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True)
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "patchc.load" in r.stderr  # "Unknown quantization type, got patchc.load", then a size-mismatch error


def test_from_pretrained_loads_through_patchc_once_imported(ckpt):
    from transformers import AutoModelForCausalLM

    import patchc
    from patchc.runtime import hybrid_layers

    a = patchc.load(ckpt)
    b = AutoModelForCausalLM.from_pretrained(ckpt)
    assert hybrid_layers(b).keys() == hybrid_layers(a).keys() and len(hybrid_layers(b)) > 0
    ids = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=0, atol=0)


def test_truncated_prune_masks_give_a_clear_error(run, tmp_path, capsys):
    from patchc.cli import main

    p = _copy(run, tmp_path / "p")
    f = p / "masks.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert main(["lower", str(p), "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert "not a readable safetensors file" in err and err.count("\n") == 1 and not (tmp_path / "ck").exists()


def test_out_inside_the_model_folder_is_fine_until_it_would_be_replaced(tmp_path):
    from patchc.outdir import PRUNE_MARKERS, OutputError, check_out

    model = tmp_path / "m"
    (model / "runs").mkdir(parents=True)
    check_out(model / "runs" / "a", overwrite=False, markers=PRUNE_MARKERS, protected=[model])   # new, inside: fine
    check_out(model / "runs" / "a", overwrite=True, markers=PRUNE_MARKERS, protected=[model])    # not there yet: fine
    (model / "runs" / "a").mkdir()
    (model / "runs" / "a" / "prune.json").write_text("{}")
    with pytest.raises(OutputError, match="overlaps"):
        check_out(model / "runs" / "a", overwrite=True, markers=PRUNE_MARKERS, protected=[model])
    for out in (model, tmp_path):                                   # the model itself, or a folder holding it
        with pytest.raises(OutputError, match="overlaps"):
            check_out(out, overwrite=False, markers=PRUNE_MARKERS, protected=[model])


def test_ci_runs_exactly_the_readme_setup_in_a_fresh_virtualenv():
    """.ci/run and the README's first code block stay in agreement; CI installs into a new virtualenv."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    block = re.search(r"```bash\n(.*?)```", (root / "README.md").read_text(), re.S).group(1)
    readme = [l for l in block.splitlines() if l.strip() and not l.startswith("#")]
    ci = [l for l in (root / ".ci/run").read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]
    assert readme and ci[-len(readme):] == readme
    assert "rm -rf .ci-venv" in ci and "python3 -m venv .ci-venv" in ci and ". .ci-venv/bin/activate" in ci
    assert "/.ci-venv/" in (root / ".gitignore").read_text().splitlines()
