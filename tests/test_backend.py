"""torch.compile(model, backend="patch") on lowered models: the FX pass, equivalence, generate()."""
import importlib.metadata
import warnings

import pytest
import torch

import patchc
import patchc.backend as backend
from patchc.lower import load, lower, stack_groups_
from patchc.runtime import hybrid_layers

from conftest import TINY_ARCHS

@pytest.fixture(scope="module")
def ckpts(pruned_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    for arch in TINY_ARCHS:
        lower(pruned_tiny(arch, 0.35), root / arch)
    return {arch: root / arch for arch in TINY_ARCHS}


def test_backend_resolves_by_name():
    names = {ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    assert "patch" in names
    from torch._dynamo import list_backends

    assert "patch" in list_backends(exclude_tags=())


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_compiled_matches_eager_and_swaps_every_layer(arch, ckpts):
    torch._dynamo.reset()
    model = load(ckpts[arch])
    ids = torch.randint(0, 256, (2, 20))
    ref = model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.compile(model, backend="patch", fullgraph=True)(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    rep = backend.LAST_REPORT
    assert sorted(rep.swapped) == sorted(hybrid_layers(model, packed_only=True)) and not rep.reference
    if arch in ("llama", "qwen2"):  # q/k/v and gate/up read one input each: each group runs as one launch
        sizes = sorted(len(g) for g in rep.shared_input_groups)
        assert sizes == [2, 2, 3, 3]
        assert sorted(len(g) for g in rep.stacked) == [2, 2, 3, 3]
        # SiLU(gate) * up of both MLPs runs in the kernel's epilogue (one op, the [gate; up] output never written)
        assert sorted(g[0].rsplit(".", 1)[-1] for g in rep.fused_silu_mul) == ["gate_proj", "gate_proj"]
        assert sum(n.target == torch.ops.patchc.hybrid_mm_silu_mul.default for n in backend.LAST_GRAPH.graph.nodes) == 2


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generated_kernels_eager_and_compiled_under_the_interpreter(arch, ckpts, monkeypatch, switches):
    """The real kernel path without a GPU (Triton's interpreter): eager HybridLinear calls and the compiled
    graph's swapped hybrid_mm nodes both run the Triton kernels and match the reference op."""
    import os

    from patchc import runtime

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest when there is no GPU)")
    from patchc.format import PACKED_FIELDS

    torch._dynamo.reset()
    model = load(ckpts[arch])
    for m in hybrid_layers(model).values():  # the interpreter re-seats storages; safetensors' are not resizable
        for k in PACKED_FIELDS:
            setattr(m, k, getattr(m, k).clone())
    stack_groups_(model, model.patchc_manifest["groups"])   # (the clones undid load's stacking)
    ids = torch.randint(0, 256, (2, 12))
    ref = model(input_ids=ids).logits                       # reference op (decompress + F.linear)
    switches(kernels_on_cpu=True)
    calls = []
    real_launch = __import__("patchc.codegen.launch", fromlist=["launch"]).launch
    monkeypatch.setattr("patchc.codegen.launch.launch", lambda *a, **k: calls.append(1) or real_launch(*a, **k))
    eager = model(input_ids=ids).logits
    n_eager = len(calls)
    compiled = torch.compile(model, backend="patch", fullgraph=True)(input_ids=ids).logits
    stacked = backend.LAST_REPORT.stacked
    assert n_eager == len(hybrid_layers(model, packed_only=True))  # every packed layer eagerly; compiled: one launch per stacked group
    assert len(calls) - n_eager == n_eager - sum(len(g) - 1 for g in stacked)
    assert (len(stacked) == 4) == (arch == "llama")  # q/k/v and gate/up of 2 layers; GPT-2's c_attn is one layer
    assert len(backend.LAST_REPORT.fused_silu_mul) == (2 if arch == "llama" else 0)  # GPT-2's MLP has no gate
    torch.testing.assert_close(eager, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled, ref, rtol=1e-4, atol=1e-4)
    assert sorted(backend.LAST_REPORT.swapped) == sorted(hybrid_layers(model, packed_only=True))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_generate_on_the_compiled_model(arch, ckpts):
    torch._dynamo.reset()
    model = load(ckpts[arch])
    ids = torch.randint(0, 256, (1, 10))
    want = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=256)
    model.forward = torch.compile(model.forward, backend="patch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=256, cache_implementation="static")
    assert torch.equal(got, want)


def test_cpu_model_warns_that_it_runs_the_reference_path(ckpts):
    torch._dynamo.reset()
    backend._warned_cpu = False
    model = load(ckpts["gpt2"])
    with pytest.warns(UserWarning, match="reference"):
        torch.compile(model, backend="patch")(input_ids=torch.randint(0, 256, (1, 8)))


def test_compile_modes_reach_inductor(ckpts, monkeypatch):
    """torch.compile's mode reaches inductor as the config patches backend="inductor" would get for it."""
    import torch._inductor.compile_fx as cfx

    seen = []
    real = cfx.compile_fx
    monkeypatch.setattr(cfx, "compile_fx", lambda gm, ex, config_patches=None, **kw: seen.append(config_patches)
                        or real(gm, ex, config_patches=config_patches, **kw))
    torch._dynamo.reset()
    model = load(ckpts["llama"])
    ids = torch.randint(0, 256, (1, 12))
    ref = model(input_ids=ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = torch.compile(model, backend="patch", mode="max-autotune-no-cudagraphs")(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert seen and seen[0] == {"max_autotune": True}, seen   # (compile_fx may call itself again within them)
    assert backend._config_patches("reduce-overhead", {"x": 1}) == {"triton.cudagraphs": True, "x": 1}
    with pytest.raises(ValueError, match="unknown mode"):
        backend._config_patches("fastest", None)


def test_one_rule_decides_which_tiles_the_kernel_runs():
    """Eager path and backend pass share patchc.runtime.kernel_unsupported: tiles under 16 or not a power
    of two keep the reference op (Triton block shapes), with the reason named."""
    from patchc.runtime import kernel_unsupported

    assert kernel_unsupported(16) is None and kernel_unsupported(64) is None and kernel_unsupported(128) is None
    assert "minimum K" in kernel_unsupported(8)
    assert "power of two" in kernel_unsupported(48) and "power of two" in kernel_unsupported(96)
