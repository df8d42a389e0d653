"""The hybrid-mask math that training, extraction, lowering and kernels share."""
import itertools

import pytest
import torch
from hypothesis import given, strategies as st

from patchc import mask as hm

tiles = st.sampled_from([4, 8, 16])


@st.composite
def hybrid_case(draw):
    t = draw(tiles)
    r, c = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["dense", "sparse", "random"]))
    bitmap = {"dense": torch.ones(r, c, dtype=torch.bool), "sparse": torch.zeros(r, c, dtype=torch.bool),
              "random": torch.rand(r, c, generator=g) < 0.5}[kind]
    pattern = torch.randint(0, 6, (r * t, c * t // 4), generator=g, dtype=torch.uint8)
    w = torch.randn(r * t, c * t, generator=g, dtype=torch.float64)
    return t, bitmap, pattern, w


def reference_mask(bitmap, pattern, t):
    """Element by element, straight from the definition."""
    out_f, in_f = pattern.shape[0], pattern.shape[1] * 4
    m = torch.zeros(out_f, in_f, dtype=torch.bool)
    for i, j in itertools.product(range(out_f), range(in_f)):
        m[i, j] = bool(bitmap[i // t, j // t]) or bool(hm.PATTERNS[int(pattern[i, j // 4]), j % 4])
    return m


def test_patterns_are_the_six_legal_2_of_4():
    assert hm.PATTERNS.shape == (6, 4)
    assert (hm.PATTERNS.sum(1) == 2).all()
    assert len({tuple(p) for p in hm.PATTERNS.tolist()}) == 6


@given(hybrid_case())
def test_hybrid_mask_matches_definition(case):
    t, bitmap, pattern, _ = case
    m = hm.hybrid_mask(bitmap, hm.pattern_to_mask(pattern), t)
    assert torch.equal(m, reference_mask(bitmap, pattern, t))
    soft = hm.hybrid_mask(bitmap.double(), hm.pattern_to_mask(pattern).double(), t)
    assert torch.equal(soft.bool(), m)


@given(hybrid_case())
def test_mask_pattern_round_trip(case):
    _, _, pattern, _ = case
    assert torch.equal(hm.mask_to_pattern(hm.pattern_to_mask(pattern)), pattern)


def test_mask_to_pattern_rejects_non_24():
    m = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    with pytest.raises(ValueError, match="not 2:4"):
        hm.mask_to_pattern(m)


@given(hybrid_case())
def test_topk24_keeps_the_two_largest(case):
    _, _, _, w = case
    pattern = hm.topk24_pattern(w.abs())
    kept = hm.pattern_to_mask(pattern)
    groups = w.abs().reshape(w.shape[0], -1, 4)
    ref = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True)
    assert torch.equal(kept, ref.reshape(w.shape))


@given(hybrid_case())
def test_sparsity_of_layer(case):
    t, bitmap, pattern, _ = case
    m = hm.hybrid_mask(bitmap, hm.pattern_to_mask(pattern), t)
    assert abs((1 - m.double().mean().item()) - hm.layer_sparsity(bitmap)) < 1e-12


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=5),
       st.floats(0, 0.5), st.integers(0, 1000))
def test_global_topk_hits_the_target_exactly(shapes, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.randn(r, c, generator=g).round(decimals=1) for r, c in shapes]  # ties on purpose
    bitmaps = hm.select_dense_tiles(scores, sparsity)
    total = sum(s.numel() for s in scores)
    n_sparse = sum(int((~b).sum()) for b in bitmaps)
    assert n_sparse == hm.sparse_tile_budget(total, sparsity)
    achieved = 0.5 * n_sparse / total
    assert abs(achieved - sparsity) <= 0.5 * 0.5 / total + 1e-12  # within half a tile
    # dense tiles score at least as high as sparse ones, and the choice is deterministic
    flat_s = torch.cat([s.flatten() for s in scores])
    flat_b = torch.cat([b.flatten() for b in bitmaps])
    if flat_b.any() and (~flat_b).any():
        assert flat_s[flat_b].min() >= flat_s[~flat_b].max()
    assert all(torch.equal(a, b) for a, b in zip(bitmaps, hm.select_dense_tiles(scores, sparsity)))


@pytest.mark.parametrize("bad", [-0.01, 0.51, 1.0, float("nan"), float("inf")])
def test_sparsity_outside_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"outside \[0, 0.5\]"):
        hm.check_sparsity(bad)


def test_soft_masks_are_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, 6, generator=g)
    m = hm.soft_mask24(logits, scale=3.0, tau=0.7, key=torch.tensor(1))
    assert m.shape == (8, 16)
    assert torch.allclose(m.reshape(8, 4, 4).sum(-1), torch.full((8, 4), 2.0), atol=1e-5)
    p = hm.soft_dense_tile(torch.randn(3, 3, generator=g), 25.0, 4.0, torch.tensor(2))
    assert ((p > 0) & (p < 1)).all()
    # no noise, low temperature: the relaxation approaches the hard argmax pattern
    hard = hm.soft_mask24(logits, scale=1.0, tau=1e-4, key=None)
    assert torch.equal(hard.round().bool(), hm.pattern_to_mask(logits.argmax(-1).to(torch.uint8)))


def test_soft_dense_tile_is_class_1_of_a_two_class_gumbel_softmax():
    """hm.soft_dense_tile = P(class 1) of softmax(([0, l] * scale + (g0, g1)) / tau): the difference of its two
    Gumbels is the logistic log(u) - log(1 - u) of the uniform noise it draws for its key; the same draws fed to the
    softmax definition give the same numbers, and without noise it is softmax([0, l * scale] / tau)[1]."""
    l = torch.randn(40, 7, generator=torch.Generator().manual_seed(1)) * 0.05
    s, tau = 25.0, 3.0
    for key in (7, torch.tensor(7)):                       # Philox (eager) and the integer hash (compiled)
        got = hm.soft_dense_tile(l, s, tau, key)
        u = hm.uniform_noise(key, tuple(l.shape), "cpu").double()
        # any g0 with g1 - g0 = logistic(u): take g0 = 0
        ref = torch.softmax(torch.stack([torch.zeros_like(u), l.double() * s + torch.log(u) - torch.log1p(-u)], -1)
                            / tau, -1)[..., 1]
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    plain = torch.softmax(torch.stack([torch.zeros_like(l), l * s], -1) / tau, -1)[..., 1]
    torch.testing.assert_close(hm.soft_dense_tile(l, s, tau, None), plain, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(got, plain)    # the noise is there


def test_schedules():
    assert hm.linear_schedule(4.0, 0.05, 0, 10) == 4.0
    assert hm.linear_schedule(4.0, 0.05, 9, 10) == pytest.approx(0.05)
    assert hm.cosine_lr(1e-3, 0, 100, 5) < hm.cosine_lr(1e-3, 5, 100, 5) == pytest.approx(1e-3)
    assert hm.cosine_lr(1e-3, 100, 100, 5) == pytest.approx(0.0, abs=1e-12)
