"""One-shot 2:4 methods and the tile prior."""
import torch
from hypothesis import given, strategies as st

from patchc import mask as hm
from patchc.oneshot import InputStats, oneshot_pattern, sparsegpt_pattern, tile_kept_fraction, tile_prior


def stats_from(x: torch.Tensor) -> InputStats:
    x = x.double()
    return InputStats(sq_norm=(x * x).sum(0), hessian=x.T @ x, tokens=x.shape[0])


@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 10_000))
def test_wanda_is_top2_of_weight_times_input_norm(rows, groups, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * 4, generator=g, dtype=torch.float64)
    x = torch.randn(64, groups * 4, generator=g, dtype=torch.float64) * torch.rand(groups * 4, generator=g, dtype=torch.float64) * 3
    st_ = stats_from(x)
    kept = hm.pattern_to_mask(oneshot_pattern("wanda", w, st_))
    score = (w.abs() * x.norm(dim=0)).reshape(rows, groups, 4)
    ref = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, score.topk(2, -1).indices, True)
    assert torch.equal(kept, ref.reshape(rows, -1))


@given(st.integers(1, 6), st.integers(1, 8), st.integers(0, 10_000))
def test_sparsegpt_with_white_inputs_is_magnitude(rows, groups, seed):
    # With H proportional to I the OBS saliency is w^2 and no error propagates: magnitude 2:4.
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * 4, generator=g, dtype=torch.float64)
    st_ = InputStats(sq_norm=torch.full((groups * 4,), 5.0), hessian=5.0 * torch.eye(groups * 4, dtype=torch.float64), tokens=1)
    assert torch.equal(sparsegpt_pattern(w, st_, percdamp=0.0), oneshot_pattern("magnitude", w, None))


def test_sparsegpt_mask_reconstructs_better_than_magnitude_on_correlated_inputs():
    # SparseGPT picks the mask that is best *after* re-fitting the kept weights; compare both masks with
    # the optimal least-squares refit of every row on its kept support (float64 reference).
    g = torch.Generator().manual_seed(0)
    k, n = 64, 32
    mix = torch.randn(k, k, generator=g, dtype=torch.float64)
    x = torch.randn(4096, k, generator=g, dtype=torch.float64) @ mix
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    st_ = stats_from(x)

    def refit_err(pattern):
        keep = hm.pattern_to_mask(pattern)
        err = 0.0
        for i in range(n):
            xs = x[:, keep[i]]
            sol = torch.linalg.lstsq(xs, x @ w[i]).solution
            err += ((x @ w[i] - xs @ sol) ** 2).sum().item()
        return err

    p = sparsegpt_pattern(w, st_)
    assert hm.pattern_to_mask(p).reshape(n, -1, 4).sum(-1).eq(2).all()
    assert refit_err(p) < 0.9 * refit_err(oneshot_pattern("magnitude", w, None))


@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from([0.0, 0.1, 0.25, 0.35, 0.5]), st.integers(0, 1000))
def test_tile_prior_marks_the_right_number_of_dense_tiles(r, c, s, seed):
    g = torch.Generator().manual_seed(seed)
    t = 8
    w = torch.randn(r * t, c * t, generator=g)
    kept = tile_kept_fraction(w, None, s, t)
    assert kept.shape == (r, c) and ((kept >= 0) & (kept <= 1)).all()
    prior = tile_prior(kept, s)
    n_dense = round(2 * r * c * (0.5 - s))
    assert int((prior > 0).sum()) == n_dense and set(prior.unique().tolist()) <= {-1.0, 1.0}
    if 0 < n_dense < r * c:
        assert kept[prior > 0].min() >= kept[prior < 0].max()
