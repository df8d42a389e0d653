"""Fused MoE expert weights (transformers 5 holds each expert projection as one [E, out, in] parameter, or
[E, in, out]): masked per expert matrix, counted in the global target, reported in coverage, lowered packed
and loaded back as exactly W * M."""
import json
import warnings

import pytest
import torch

TILE = 32
COMMON = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=384,
              max_position_embeddings=512, bos_token_id=256, eos_token_id=256, pad_token_id=256)
MOE = {
    "mixtral": dict(intermediate_size=256, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=256, moe_intermediate_size=128, shared_expert_intermediate_size=256,
                      num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=256, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
                      head_dim=32),
    # stores its experts transposed, [E, in, out] (is_transposed=True in transformers)
    "gpt_oss": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, head_dim=32,
                    sliding_window=16),
}


def _moe_model(arch: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **COMMON, **MOE[arch]))


def _moe_folder(path, arch: str):
    from patchc.models import byte_tokenizer

    _moe_model(arch).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def _experts(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.dim() == 3}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    from conftest import WIKI_VALID, need

    p = tmp_path_factory.mktemp("text") / "t.txt"
    p.write_text(need(WIKI_VALID).read_text()[:30_000])
    return p


def _prune(model, text, out, **kw):
    from patchc import PruneConfig, prune

    cfg = PruneConfig(sparsity=0.35, steps=2, seq_len=64, batch_size=2, calib_samples=4, tile_size=TILE, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="patchc masks only")  # the low-coverage warning must not fire
        return prune(model, [str(text)], out, cfg, progress=False)


# ---------------------------------------------------------------------------------------------
# the graph: expert sites, their orientation, whichever experts implementation runs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,impl", [("mixtral", "grouped_mm"), ("mixtral", "batched_mm"), ("gpt_oss", "grouped_mm"),
                                       ("gpt_oss", "batched_mm")])
def test_expert_sites_and_orientation(arch, impl):
    from patchc.passes import capture, find_linears

    model = _moe_model(arch)
    model.set_experts_implementation(impl)
    plan = find_linears(capture(model).gm, TILE)
    sites = {s.name: s for s in plan.masked if s.experts}
    experts = _experts(model)
    assert sites.keys() == experts.keys()
    assert not any(n in g.members for g in plan.groups for n in sites)  # no shared-input group of experts
    transposed = arch == "gpt_oss"
    for name, p in experts.items():
        s = sites[name]
        e, out_f, in_f = p.shape[0], *(p.shape[1:][::-1] if transposed else p.shape[1:])
        assert (s.op, s.transposed, s.experts, s.out_features, s.in_features) == ("experts", transposed, e, out_f, in_f)
        if name.endswith("gate_up_proj"):  # [E, 2 * intermediate, hidden] in [.., out, in] orientation
            assert (out_f, in_f) == (2 * MOE[arch]["intermediate_size"], COMMON["hidden_size"])


# ---------------------------------------------------------------------------------------------
# soft masks: an expert weight's mask is each expert matrix's own, forward and gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("kernels", [False, True])
def test_expert_soft_mask_is_per_expert_matrix(transposed, kernels):
    from patchc import mask as hm
    from patchc.passes.find_linears import LinearSite
    from patchc.passes.insert_masks import MaskNode, MaskState

    g = torch.Generator().manual_seed(0)
    e, out_f, in_f = 3, 64, 96
    site = LinearSite(name="experts.w", node="", weight_node="", op="experts", out_features=out_f, in_features=in_f,
                      transposed=transposed, role="w", input_node="", experts=e)
    w = torch.randn(e, out_f, in_f, generator=g)                                 # [E, out, in]
    stored = w.mT.contiguous() if transposed else w                               # [E, in, out] when transposed
    tl = torch.randn(e, out_f // TILE, in_f // TILE, generator=g)                 # [E, R, C]
    pl = torch.randn(e, out_f, in_f // 4, 6, generator=g)                         # [E, out, in/4, 6]
    state = MaskState(mode="mean", kernels=kernels)
    node = MaskNode(site, TILE, state, tl, torch.zeros(e, out_f, in_f // 4, dtype=torch.uint8), pl, weight=stored)
    wm, gate, norm = node._masked_weight()
    assert wm.shape == stored.shape
    up = torch.randn(wm.shape, generator=g)
    (wm * up).sum().add(gate).add(norm).backward()

    knobs = state.knobs_now(w.device)
    ref_tl, ref_pl = tl.clone().requires_grad_(), pl.clone().requires_grad_()
    parts = [hm.soft_masked_weight(w[i], ref_tl[i], ref_pl[i], None, TILE, knobs, None) for i in range(e)]
    ref = torch.stack([p[0] for p in parts])                                      # [E, out, in]
    ref_gate = torch.stack([p[1] for p in parts]).mean()                          # equal tile counts per expert
    ref_norm = torch.stack([p[2] for p in parts]).square().sum().sqrt()
    ((ref.mT if transposed else ref) * up).sum().add(ref_gate).add(ref_norm).backward()
    torch.testing.assert_close(wm, ref.mT if transposed else ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gate, ref_gate)
    torch.testing.assert_close(norm, ref_norm)
    torch.testing.assert_close(node.tile_logits.grad, ref_tl.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(node.pattern_logits.grad.float(), ref_pl.grad, rtol=1e-4, atol=1e-5)


def test_expert_oneshot_pattern_and_prior_are_per_matrix():
    from patchc.oneshot import oneshot_pattern, tile_kept_fraction, tile_prior

    w = torch.randn(3, 64, 128, generator=torch.Generator().manual_seed(0))     # [E, out, in]
    pattern = oneshot_pattern("magnitude", w, None)                                # [E, out, in/4]
    assert torch.equal(pattern, torch.stack([oneshot_pattern("magnitude", m, None) for m in w]))
    kept = tile_kept_fraction(w, None, 0.35, TILE)                                 # [E, R, C]
    assert torch.equal(kept, torch.stack([tile_kept_fraction(m, None, 0.35, TILE) for m in w]))
    prior = tile_prior(kept, 0.35)
    n_dense = round(2 * 8 * (0.5 - 0.35))                                          # 8 tiles per matrix
    assert [int((p == 1).sum()) for p in prior] == [n_dense] * 3 and int((prior == -1).sum()) == 3 * (8 - n_dense)


# ---------------------------------------------------------------------------------------------
# prune -> lower -> load: the target over every masked matrix, experts included; exact reload
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,mode", [("mixtral", "tile"), ("mixtral", "joint"), ("qwen2_moe", "joint"),
                                       ("qwen3_moe", "tile"), ("gpt_oss", "joint")])
def test_moe_pruned_to_target_lowered_and_loaded(arch, mode, text, tmp_path, capsys):
    import patchc
    from patchc.cli import main
    from patchc.lower import lower
    from patchc.passes.insert_masks import mask_nodes
    from patchc.prune_dir import apply_hard_masks_, read_prune_dir

    res = _prune(_moe_folder(tmp_path / "m", arch), text, tmp_path / "p", mode=mode)
    rep, hf = res.report, res.model
    experts = _experts(hf)
    n_expert = sum(p.numel() for p in experts.values())
    assert experts and n_expert > 0.4 * sum(p.numel() for n, p in hf.named_parameters() if p.dim() >= 2)

    # every expert weight is one masked entry, tiled per expert matrix
    layers = {l["name"]: l for l in rep["layers"]}
    for name, p in experts.items():
        l = layers[name]
        assert l["experts"] == p.shape[0] and l["tiles"] == p.numel() // TILE ** 2 and len(l["shape"]) == 3
    cov = rep["coverage"]
    assert cov["unmasked_expert_params"] == 0 and cov["masked_expert_params"] == n_expert and cov["coverage"] > 0.85
    assert rep["sparsity"]["masked_params"] == cov["masked_params"]

    # zeros of W * M over every masked matrix, expert ones included, are the target (to one tile)
    nodes = mask_nodes(res.graph)                                                 # hard mode after prune
    assert {n.name for n in nodes if n.experts} == experts.keys()
    wms = {n.name: n._masked_weight()[0].detach() for n in nodes}
    zeros = sum(int((wm == 0).sum()) for wm in wms.values())
    total = sum(wm.numel() for wm in wms.values())
    assert total == rep["sparsity"]["masked_params"]
    assert zeros / total == pytest.approx(0.35, abs=rep["sparsity"]["one_tile"] + 1e-9)
    expert_zeros = sum(int((wms[n] == 0).sum()) for n in experts)
    assert 0.2 < expert_zeros / n_expert <= 0.5  # the experts carry their share of the target

    # the graph's experts read W * M: the same logits as the HF model with the recorded masks applied
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        graph_logits = res.graph(ids)
        res.graph.patch_masks.m0.state.mode = "off"
        dense_logits = res.graph(ids)
        res.graph.patch_masks.m0.state.mode = "hard"
    assert not torch.allclose(graph_logits, dense_logits, atol=1e-3)
    masked_hf = _moe_model(arch)
    apply_hard_masks_(masked_hf, read_prune_dir(tmp_path / "p"))
    for name, p in experts.items():
        assert torch.equal(masked_hf.get_parameter(name), wms[name])
    with torch.no_grad():
        torch.testing.assert_close(masked_hf(input_ids=ids, use_cache=False).logits, graph_logits, rtol=1e-4, atol=1e-5)

    # lowered: experts packed on disk; loaded: exactly W * M, and the hard graph's logits
    manifest = lower(tmp_path / "p", tmp_path / "ck")
    packed = {e["name"]: e for e in manifest["experts"]}
    assert packed.keys() == experts.keys() and all(e["bytes"] < e["dense_bytes"] for e in packed.values())
    loaded = patchc.load(tmp_path / "ck", device="cpu")
    for name in experts:
        assert torch.equal(loaded.get_parameter(name), wms[name])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, use_cache=False).logits, graph_logits, rtol=1e-4, atol=1e-5)

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ck"), "--verify", "--plot", str(tmp_path / "maps.png")]) == 0
    out = capsys.readouterr().out
    assert out.count("(experts)") == len(experts) and "not pruned" not in out
    assert f"coverage: {cov['coverage']:.1%}" in out and (tmp_path / "maps.png").stat().st_size > 0


def test_moe_from_pretrained_and_resume(text, tmp_path):
    """A MoE checkpoint loads through transformers once patchc is imported; a resumed run keeps the expert masks."""
    from transformers import AutoModelForCausalLM

    import patchc
    from patchc import PruneConfig, prune
    from patchc.io import read_safetensors
    from patchc.lower import lower

    src = _moe_folder(tmp_path / "m", "mixtral")
    cfg = PruneConfig(sparsity=0.35, steps=2, seq_len=64, batch_size=2, calib_samples=4, tile_size=TILE, mode="tile")
    first = prune(src, [str(text)], tmp_path / "p", cfg, progress=False, keep_checkpoint=True)
    masks = read_safetensors(tmp_path / "p" / "masks.safetensors")
    again = prune(src, [str(text)], tmp_path / "p", cfg, progress=False, resume=True, keep_checkpoint=True)
    assert again.report["layers"] == first.report["layers"]
    resumed = read_safetensors(tmp_path / "p" / "masks.safetensors")
    assert resumed.keys() == masks.keys() and any(k.endswith("experts.down_proj/pattern") for k in masks)
    assert all(torch.equal(resumed[k], masks[k]) for k in masks)

    lower(tmp_path / "p", tmp_path / "ck")
    a = patchc.load(tmp_path / "ck", device="cpu")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "ck")
    for name in _experts(a):
        assert torch.equal(a.get_parameter(name), b.get_parameter(name))
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(b(input_ids=ids).logits, a(input_ids=ids).logits, rtol=0, atol=0)
    lower(tmp_path / "p", tmp_path / "dense", fmt="dense")  # a plain HF checkpoint, experts zeroed the same
    d = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    for name in _experts(a):
        assert torch.equal(d.get_parameter(name), a.get_parameter(name))


def test_unmasked_experts_are_still_reported_and_warned(text, tmp_path):
    from patchc import PruneConfig, prune

    cfg = PruneConfig(sparsity=0.35, steps=0, seq_len=64, batch_size=2, calib_samples=4, tile_size=TILE,
                      exclude=(r"\.experts\.",))
    with pytest.warns(UserWarning, match="fused MoE expert weights"):
        res = prune(_moe_folder(tmp_path / "m", "mixtral"), [str(text)], tmp_path / "p", cfg, progress=False)
    cov = res.report["coverage"]
    assert cov["unmasked_expert_params"] == sum(p.numel() for p in _experts(res.model).values()) > 0
    assert cov["masked_expert_params"] == 0 and cov["coverage"] < 0.5
    assert not any(l.get("experts") for l in json.loads((tmp_path / "p" / "prune.json").read_text())["layers"])


def test_torchrun_two_processes_learn_the_expert_masks_of_one_process(text, tmp_path):
    """FSDP2 shards the expert weights and their logits like a linear's; the dense teacher (mode "off") of a
    weight-only node must not hand the graph a weight FSDP frees after the node's forward."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from patchc.io import read_safetensors

    src = _moe_folder(tmp_path / "m", "mixtral")
    common = ["prune", src, "--sparsity", "0.35", "--mode", "joint", "--data", str(text), "--steps", "3", "--seq-len",
              "64", "--tile-size", str(TILE), "--calib-samples", "4", "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "patchc", *common,
                        "--batch-size", "2", "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "patchc", *common, "--batch-size", "4", "--out", str(tmp_path / "one")],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    two, one = (read_safetensors(tmp_path / d / "masks.safetensors") for d in ("two", "one"))
    keys = [k for k in one if k.endswith(("/bitmap", "/pattern"))]
    assert any(".experts." in k for k in keys) and two.keys() == one.keys()
    agree = [(two[k] == one[k]).float().mean().item() for k in keys]
    assert min(agree) >= 0.99, dict(zip(keys, agree))
