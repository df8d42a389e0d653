"""The FX pass: capture, find linears (FQNs, roles, groups, skips), insert mask nodes."""
import hashlib

import pytest
import torch

from conftest import TINY_ARCHS
from patchc import mask as hm
from patchc.models import load_model
from patchc.passes import MaskNode, MaskState, capture, find_linears, insert_masks
from patchc.passes.insert_masks import mask_nodes

# masked linears per tiny model (2 blocks); lm_head is tied or excluded everywhere
EXPECTED = {
    "llama": (14, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, {"qkv", "gate_up"}),
    "qwen2": (14, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, {"qkv", "gate_up"}),
    "gemma3": (14, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, {"qkv", "gate_up"}),
    "gpt2": (8, {"c_attn", "c_proj", "c_fc"}, set()),
    "opt": (12, {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}, {"qkv"}),
}


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request):
    loaded = load_model(f"tiny:{request.param}")
    return request.param, loaded.model


def digest(model):
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_find_linears(tiny):
    arch, model = tiny
    cap = capture(model)
    plan = find_linears(cap.gm, 128)
    n, roles, kinds = EXPECTED[arch]
    assert len(plan.masked) == n
    assert {s.role for s in plan.masked} == roles
    assert {g.kind for g in plan.groups} >= kinds
    params = dict(model.named_parameters())
    for s in plan.masked:
        w = model.get_parameter(s.name)  # every site maps to a real parameter FQN
        assert tuple(w.shape) == ((s.in_features, s.out_features) if s.transposed else (s.out_features, s.in_features))
        assert s.transposed == (arch == "gpt2")
    assert all("lm_head" in s.name or "embed" in s.name or "wte" in s.name for s in plan.skipped)
    assert {s.name for s in plan.masked} <= set(params) and len(plan.masked) > 0


def test_untileable_layers_stay_dense_and_are_reported(tiny):
    _, model = tiny
    plan = find_linears(capture(model).gm, 96)  # 96 divides none of 256 / 768 / 1024 fully
    bad = [s for s in plan.sites if s.skip_reason and "not divisible" in s.skip_reason]
    assert bad and all(s.out_features % 96 or s.in_features % 96 for s in bad)
    assert all(s.out_features % 96 == 0 and s.in_features % 96 == 0 for s in plan.masked)


def test_include_exclude_filters(tiny):
    _, model = tiny
    gm = capture(model).gm
    plan = find_linears(gm, 128, exclude=[r"layers?\.0\.|\.h\.0\."])
    assert plan.masked and not any(".0." in s.name for s in plan.masked)
    plan = find_linears(gm, 128, include=[r"\.1\."])
    assert plan.masked and all(".1." in s.name for s in plan.masked)


def _masked_graph(model, tile, mode, seed=0):
    cap = capture(model)
    plan = find_linears(cap.gm, tile)
    state = MaskState(mode=mode, seed=seed)
    g = torch.Generator().manual_seed(seed)
    nodes = {}
    for i, s in enumerate(plan.masked):
        r, c = s.out_features // tile, s.in_features // tile
        pattern = torch.randint(0, 6, (s.out_features, s.in_features // 4), generator=g, dtype=torch.uint8)
        pl = torch.randn(s.out_features, s.in_features // 4, 6, generator=g)
        nodes[s.name] = MaskNode(s, tile, state, torch.randn(r, c, generator=g), pattern, pl, index=i)
    gm = insert_masks(cap.gm, plan, nodes)
    state.set_step(0, 0, len(plan.masked), "cpu")
    return gm, plan, state


def test_masks_off_is_the_dense_model_and_hard_is_W_times_M(tiny):
    arch, model = tiny
    ids = torch.randint(0, 256, (2, 24))
    ref = model(input_ids=ids, use_cache=False).logits
    before = digest(model)
    gm, plan, state = _masked_graph(model, 128, "off")
    assert torch.equal(gm(ids), ref)
    # hard: identical to the HF model with pruned weights zeroed
    state.mode = "hard"
    g = torch.Generator().manual_seed(1)
    for n in mask_nodes(gm):
        n.set_hard(torch.rand(n.tile_logits.shape, generator=g) < 0.5, n.hard_pattern_now())
    got = gm(ids)
    masked = load_model(f"tiny:{arch}").model
    with torch.no_grad():
        for n in mask_nodes(gm):
            w = masked.get_parameter(n.name)
            w2d = w.t() if n.transposed else w
            w2d.mul_(hm.hybrid_mask(n.hard_bitmap, hm.pattern_to_mask(n.hard_pattern), n.tile).to(w.dtype))
    want = masked(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert digest(model) == before  # the graph never writes the frozen weights


def test_only_mask_logits_train(tiny):
    _, model = tiny
    before = digest(model)
    gm, _, state = _masked_graph(model, 128, "soft")
    trainable = [n for n, p in gm.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("patch_masks.") for n in trainable)
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 256, (2, 16))
    loss = gm(ids).float().logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gm.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in gm.parameters() if p.requires_grad)
    opt.step()
    assert digest(model) == before


def _saved_bytes(model, mode: str) -> int:
    """Bytes autograd keeps for backward in one step (unique storages, parameters and mask logits excluded)."""
    gm, _, state = _masked_graph(model, 128, mode, seed=5)
    for p in gm.parameters():     # the weights too: both modes keep the same activations (the matmul inputs)
        p.requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in gm.parameters()}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = gm(ids).float().logsumexp(-1).mean()
        if mode == "soft":
            loss = loss + sum(n.last_norm + n.last_gate for n in mask_nodes(gm))
    loss.backward()
    return sum(seen.values())


def test_weight_only_soft_masks_are_recomputed_in_backward():
    """Weight-only mask nodes (GPT-2's Conv1D addmm) keep nothing of the soft mask for backward: beyond the dense
    model's saved activations a soft step keeps only W * M (the matmul's operand), not the fp32 mask, its noise
    or its pattern probabilities (MaskedWeight recomputes them from the logits)."""
    model = load_model("tiny:gpt2").model
    weights = sum(n.numel for n in mask_nodes(_masked_graph(model, 128, "soft")[0]))
    extra = _saved_bytes(model, "soft") - _saved_bytes(model, "off")
    assert extra <= 4 * weights + 64 * 1024, (extra, weights)        # W * M in fp32 and small per-layer tensors


def test_dynamic_shapes(tiny):
    _, model = tiny
    gm = capture(model).gm
    for b, s in [(1, 5), (3, 40)]:
        ids = torch.randint(0, 256, (b, s))
        torch.testing.assert_close(gm(ids), model(input_ids=ids, use_cache=False).logits)
