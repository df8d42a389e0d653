"""`patchc lower` / `patchc.load` / `patchc inspect`: equivalence, sizes, and every bad input."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import TINY_ARCHS
from patchc.format import unpack_layer
from patchc.lower import CheckpointError, load, lower, memory_report, verify
from patchc.models import load_model
from patchc.prune_dir import PruneDirError, apply_hard_masks_, read_prune_dir
from patchc.runtime import HybridLinear, hybrid_layers

@pytest.fixture(scope="module")
def pruned(pruned_tiny):
    """One prune run per tiny arch at 45% (joint)."""
    return {arch: pruned_tiny(arch) for arch in TINY_ARCHS}


def masked_reference(arch, prune_dir):
    model = load_model(f"tiny:{arch}").model
    apply_hard_masks_(model, read_prune_dir(prune_dir))
    return model


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_lowered_model_equals_the_masked_model(arch, pruned, tmp_path):
    manifest = lower(pruned[arch], tmp_path / "ck")
    model = load(tmp_path / "ck")
    assert len(hybrid_layers(model)) == len(manifest["layers"]) > 0
    assert not any(isinstance(m, torch.nn.Linear) and n in {l["module"] for l in manifest["layers"]}
                   for n, m in model.named_modules())
    ids = torch.randint(0, 256, (2, 40))
    ref = masked_reference(arch, pruned[arch])
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    # greedy generation with the KV cache works and matches
    a = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=256)
    b = ref.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=256)
    assert torch.equal(a, b)
    # memory: the hybrid layers hold packed bytes; on disk the same
    for alias, target in manifest["aliases"].items():  # tied weights stay one tensor in memory
        assert model.get_parameter(alias).data_ptr() == model.get_parameter(target).data_ptr()
    if arch == "gpt2":
        assert manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    mem = memory_report(model)
    assert mem["packed_bytes"] == manifest["bytes"]["hybrid_packed"]
    assert mem["ratio"] < 1.0


def test_bf16_ratio_follows_the_formula(pruned, tmp_path):
    manifest = lower(pruned["llama"], tmp_path / "ck", dtype=torch.bfloat16)
    model = load(tmp_path / "ck")
    s = manifest["sparsity"]["achieved"]
    bitmap_bytes = sum(l["tiles"] for l in manifest["layers"])
    weights = manifest["bytes"]["hybrid_packed"] - bitmap_bytes
    assert weights == pytest.approx(manifest["bytes"]["hybrid_dense"] * (1 - 0.875 * s), rel=1e-9)
    assert next(iter(hybrid_layers(model).values())).dense.dtype == torch.bfloat16


def test_dense_format_loads_with_transformers_alone(pruned, tmp_path):
    from transformers import AutoModelForCausalLM

    lower(pruned["qwen2"], tmp_path / "dense", fmt="dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 256, (1, 24))
    ref = masked_reference("qwen2", pruned["qwen2"])
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "dense/patchc.json").read_text())["format"] == "dense-zeroed"


def test_existing_output_is_refused_unless_overwrite(pruned, tmp_path):
    out = tmp_path / "ck"
    lower(pruned["llama"], out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        lower(pruned["llama"], out)
    lower(pruned["llama"], out, overwrite=True)
    load(out)


def test_crash_mid_write_leaves_no_valid_looking_checkpoint(pruned, tmp_path, monkeypatch):
    import patchc.lower as lw

    calls = {"n": 0}
    real = lw.write_safetensors

    def crash_on_second(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(lw, "write_safetensors", crash_on_second)
    with pytest.raises(OSError, match="simulated"):
        lower(pruned["llama"], tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    assert not any(p.name.startswith(".ck.") for p in tmp_path.iterdir())  # temp folder cleaned up
    # an overwrite that crashes keeps the previous checkpoint intact
    monkeypatch.setattr(lw, "write_safetensors", real)
    lower(pruned["llama"], tmp_path / "ck")
    calls["n"] = 0
    monkeypatch.setattr(lw, "write_safetensors", crash_on_second)
    with pytest.raises(OSError):
        lower(pruned["llama"], tmp_path / "ck", overwrite=True)
    load(tmp_path / "ck")


@pytest.fixture()
def ck(pruned, tmp_path):
    lower(pruned["gpt2"], tmp_path / "ck")
    return tmp_path / "ck"


def _edit_manifest(ck, fn):
    m = json.loads((ck / "manifest.json").read_text())
    fn(m)
    (ck / "manifest.json").write_text(json.dumps(m))


def test_corrupt_tensor_fails_its_checksum(ck):
    from safetensors.torch import load_file, save_file

    t = load_file(ck / "packed.safetensors")
    key = next(k for k in t if k.endswith(".values"))
    t[key] = t[key].clone()
    t[key].view(-1)[0] += 1.0
    save_file(t, ck / "packed.safetensors")
    with pytest.raises(CheckpointError, match=f"checksum mismatch for packed.safetensors::{key}"):
        load(ck)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        verify(ck)


def test_unknown_version_is_refused(ck):
    _edit_manifest(ck, lambda m: m.update(version=99))
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        load(ck)


def test_manifest_shape_mismatch_is_refused(ck):
    def bad(m):
        m["layers"][0]["shape"] = [m["layers"][0]["shape"][0] * 2, m["layers"][0]["shape"][1]]
    _edit_manifest(ck, bad)
    with pytest.raises(CheckpointError, match="manifest"):
        load(ck)


def test_missing_file_is_refused(ck):
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load(ck)
    empty = ck.parent / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load(empty)


def test_prune_dir_for_another_model_is_refused(pruned, tmp_path):
    rep = json.loads((pruned["llama"] / "prune.json").read_text())
    masks = read_prune_dir(pruned["llama"])
    other = load_model("tiny:gpt2").model
    with pytest.raises(PruneDirError, match="wrong model"):
        apply_hard_masks_(other, masks)
    assert rep["model"] == "tiny:llama"


def test_no_pickle_anywhere(ck):
    for f in ck.iterdir():
        assert f.suffix in {".json", ".safetensors", ".txt", ".jinja"} or f.name.startswith("tokenizer"), f.name


def test_layers_without_2_4_tiles_run_as_plain_dense_linears(pruned, tmp_path):
    """A layer the training kept all dense loads as a row-major weight (same bytes, empty dense tiles) and runs as
    F.linear; the model's logits are those of the fully packed model; plain_dense=False keeps it packed."""
    manifest = lower(pruned["llama"], tmp_path / "ck")
    all_dense = {l["module"] for l in manifest["layers"] if l["dense_tiles"] == l["tiles"]}
    assert all_dense, "the 45% tiny-llama prune keeps at least one layer all dense (this test's premise)"
    from patchc.inspect import table
    assert f"{len(all_dense)} of {len(manifest['layers'])} layers have no 2:4 tile" in table(manifest)
    plain, packed = load(tmp_path / "ck"), load(tmp_path / "ck", plain_dense=False)
    for name, m in hybrid_layers(plain).items():
        p = packed.get_submodule(name)
        assert (m.weight is not None) == (name in all_dense) and p.weight is None
        if m.weight is not None:
            assert m.dense.numel() == 0 and torch.equal(m.weight, unpack_layer(p.packed))
            assert torch.equal(m.packed.dense, p.dense)                       # the packed view is still the format
            assert m.weight_nbytes == p.weight_nbytes
    assert memory_report(plain) == memory_report(packed)
    ids = torch.randint(0, 256, (2, 17))
    torch.testing.assert_close(plain(input_ids=ids).logits, packed(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_custom_op_traces_as_one_node(ck):
    model = load(ck)
    ids = torch.randint(0, 256, (1, 12))
    ep = torch.export.export(model, (ids,), kwargs={"use_cache": False}, strict=False)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("patchc.hybrid_linear" in t for t in targets) == len(hybrid_layers(model, packed_only=True)) > 0
    m = next(iter(hybrid_layers(model).values()))
    assert isinstance(m, HybridLinear)


def test_eager_gpu_path_calls_the_kernel_op_with_the_layer_schedule(ck, monkeypatch, switches):
    """Eager GPU calls run patchc::hybrid_mm's body (without the op's dispatcher) with the layer's schedule key: here
    on the CPU through Triton's interpreter (PATCHC_KERNELS_ON_CPU), so the generated kernels really run: the logits
    match the reference op's, every hybrid layer launched a kernel, one schedule per layer built from its own
    bitmap."""
    import os

    from patchc.codegen import launch as L
    from patchc.codegen.schedule import build_schedule
    from patchc.format import PACKED_FIELDS
    from patchc.lower import stack_groups_

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 (or a GPU)")
    model = load(ck)
    for m in hybrid_layers(model).values():   # the interpreter re-seats storages; safetensors' are not resizable
        for k in PACKED_FIELDS:
            if getattr(m, k, None) is not None:
                setattr(m, k, getattr(m, k).clone())
    stack_groups_(model, model.patchc_manifest["groups"])   # (the clones undid load's stacking)
    ids = torch.randint(0, 256, (2, 9))
    want = model(ids).logits                               # reference op (decompress + F.linear)
    launched = []
    real = L.launch
    monkeypatch.setattr(L, "launch", lambda *a, **k: launched.append(1) or real(*a, **k))
    switches(kernels_on_cpu=True)
    got = model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(launched) >= len(hybrid_layers(model, packed_only=True)) > 0
    for m in hybrid_layers(model, packed_only=True).values():
        assert m._schedule_key == build_schedule(m.bitmap, m.tile).key


def test_shared_input_groups_are_stored_in_one_allocation(pruned, tmp_path):
    """q/k/v and gate/up (from the prune graph) are recorded in the manifest; patchc.load stores each group's
    packed tiles as consecutive views of one allocation (no extra bytes) and the model is unchanged."""
    lower(pruned["llama"], tmp_path / "ck")
    for plain_dense in (False, True):
        model = load(tmp_path / "ck", plain_dense=plain_dense)
        groups = model.patchc_manifest["groups"]
        assert sorted(len(g) for g in groups) == [2, 2, 3, 3]
        for g in groups:
            mods = [model.get_submodule(n) for n in g]
            packed = [m for m in mods if m.weight is None]   # plain-dense members run as F.linear, unstacked
            assert len(packed) == len(mods) or plain_dense
            if len(packed) < 2:
                continue
            for k in ("dense", "values", "meta"):
                ts = [getattr(m, k) for m in packed]
                assert len({t.untyped_storage().data_ptr() for t in ts}) == 1
                assert all(t.storage_offset() + t.numel() == u.storage_offset() for t, u in zip(ts, ts[1:]))
                assert ts[0].untyped_storage().nbytes() == sum(t.nbytes for t in ts)
    m = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    m["groups"] = [["no.such.layer", g[0]] for g in groups]
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="groups"):
        load(tmp_path / "ck")


def test_cli_lower_and_inspect(pruned, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "patchc", *a], capture_output=True, text=True)  # noqa: E731
    r = run("lower", str(pruned["opt"]), "--out", str(tmp_path / "ck"))
    assert r.returncode == 0 and "ratio" in r.stdout, r.stderr[-1500:]
    r = run("inspect", str(tmp_path / "ck"), "--plot", str(tmp_path / "maps.png"), "--verify")
    assert r.returncode == 0, r.stderr[-1500:]
    assert "TOTAL" in r.stdout and "checksums OK" in r.stdout and "fc1" in r.stdout
    assert (tmp_path / "maps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = run("lower", str(pruned["opt"]), "--out", str(tmp_path / "ck"))
    assert r.returncode == 2 and "--overwrite" in r.stderr

