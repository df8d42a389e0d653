"""The cuSPARSELt prefill engine (codegen/cusparselt.py): the packed -> cuSPARSELt conversion, the transposing
epilogue, and the engine end to end against a float64 reference.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 and cuSPARSELt itself is replaced by a reference that
decodes its compressed layout by the same formula (so the layout, the padding and the epilogue are checked, and
the formula is checked to be a bijection); on a GPU the real torch._cslt_sparse_mm runs and the conversion is
compared byte for byte with torch._cslt_compress.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from patchc import config
from patchc import mask as hm
from patchc.format import pack_layer

DEVICE = config.settings().test_device or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 (set before import)", allow_module_level=True)

from patchc.codegen import cusparselt as cs  # noqa: E402
from patchc.codegen.launch import CSLT_MIN_M, KernelConfig, candidates, default_config, launch  # noqa: E402
from patchc.codegen.schedule import build_schedule  # noqa: E402

REAL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)] if config.settings().test_shapes == "llama2-7b" else None
GPU_CSLT = DEVICE == "cuda" and torch.cuda.is_available() and hasattr(torch, "_cslt_sparse_mm") \
    and torch.backends.cusparselt.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def sparse_layer(n, k, t, dtype, seed):
    """A random all-2:4 layer: (packed layer, dense W * M [N, K], 2:4 keep mask [N, K])."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    pattern = torch.randint(0, 6, (n, k // 4), generator=g, dtype=torch.uint8)
    keep = hm.pattern_to_mask(pattern).bool()
    p = pack_layer(w, torch.zeros(n // t, k // t, dtype=torch.bool), pattern, t)
    return p, torch.where(keep, w, torch.zeros((), dtype=dtype)), keep


def decode_cusparselt(wc: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """cuSPARSELt's compressed weight back to the dense [N, K] weight, by nibble_position: what
    torch._cslt_sparse_mm multiplies by (the stand-in for it on the CPU)."""
    flat = wc.reshape(-1)
    vals = flat[: n * k // 2].view(n, k // 4, 2)                                            # [N, K/4, 2]
    by = flat[n * k // 2:].contiguous().view(torch.uint8)
    nib = torch.stack([by & 0xF, by >> 4], 1).view(-1)
    r = torch.arange(n).repeat_interleave(k // 4)
    q = torch.arange(k // 4).repeat(n)
    code = nib[cs.nibble_position(r, q, k)].view(n, k // 4).long()
    w = torch.zeros(n, k // 4, 4, dtype=wc.dtype)
    w.scatter_(2, (code & 3).unsqueeze(-1), vals[..., :1])
    w.scatter_(2, (code >> 2).unsqueeze(-1), vals[..., 1:])
    return w.view(n, k)


def fake_cslt_sparse_mm(wc, b, **kwargs):
    """torch._cslt_sparse_mm's contract on the CPU: [N, K] (compressed) @ [K, M] -> [N, M]."""
    assert not kwargs, kwargs
    n, k = wc.shape[0], b.shape[0]
    return (decode_cusparselt(wc, n, k).double() @ b.double()).to(b.dtype)


@pytest.mark.parametrize("n,k", [(128, 128), (256, 384), (384, 640), (64, 2048)])
def test_layout_formula_is_a_bijection_onto_the_nibbles(n, k):
    g = k // 4
    idx = torch.arange(n * g)
    pos = cs.nibble_position(idx // g, idx % g, k)
    assert torch.equal(pos.sort().values, idx)


@pytest.mark.parametrize("n,k", [(128, 128), (256, 384)])
def test_reference_conversion_puts_values_first_then_each_code_where_the_formula_says(n, k):
    p, w, keep = sparse_layer(n, k, 128, torch.float16, seed=n + k)
    comp = cs.to_cusparselt_reference(p.values, p.meta, n, k, 128)
    assert comp.shape == (n, k // 2 + k // 16)
    flat = comp.reshape(-1)
    assert torch.equal(flat[: n * k // 2], w[keep])                      # all kept values first, row-major
    nib = flat[n * k // 2:].contiguous().view(torch.uint8)
    nib = torch.stack([nib & 0xF, nib >> 4], 1).view(-1)
    for row in range(0, n, 7):
        for q in range(0, k // 4, 5):
            kept = keep[row, 4 * q: 4 * q + 4].nonzero().flatten().tolist()
            pos = int(cs.nibble_position(torch.tensor(row), torch.tensor(q), k))
            assert int(nib[pos]) == kept[0] | kept[1] << 2, (row, q)
    assert torch.equal(decode_cusparselt(comp, n, k), w)


@given(st.sampled_from([64, 128]), st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**31 - 1),
       st.sampled_from([None, (2, 4, 2), (4, 8, 3)]))
def test_triton_conversion_writes_the_reference_bytes(t, r, c, seed, launch_variant):
    n, k = r * t, c * t
    p, _, _ = sparse_layer(n, k, t, torch.float16, seed)
    want = cs.to_cusparselt_reference(p.values, p.meta, n, k, t)
    out = torch.full((n * k // 2 + n * k // 16,), float("nan"), dtype=torch.float16, device=DEVICE)  # poisoned
    got = cs.to_cusparselt(p.values.to(DEVICE), p.meta.to(DEVICE), n, k, t, out=out, launch=launch_variant)
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


def test_conversion_rejects_what_it_cannot_convert():
    p, _, _ = sparse_layer(128, 128, 64, torch.float16, 0)
    with pytest.raises(ValueError, match="all-2:4 packed layer"):
        cs.to_cusparselt(p.values, p.meta, 128, 256, 64)
    with pytest.raises(ValueError, match="tile that 64 divides"):
        cs.to_cusparselt(p.values, p.meta, 128, 128, 32)


@given(st.integers(1, 150), st.sampled_from([64, 96, 200]), st.booleans(), st.booleans(),
       st.sampled_from([torch.float32, torch.float16]), st.integers(0, 2**31 - 1))
def test_transpose_epilogue_matches_torch(m, n_out, with_bias, silu, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * n_out if silu else n_out
    yt = torch.randn(rows, m + 5, generator=g).to(dtype)                                     # extra padded columns
    bias = torch.randn(rows, generator=g).to(dtype) if with_bias else None
    out = torch.full((m, n_out), float("nan"), dtype=dtype, device=DEVICE)
    y = cs.transpose_epilogue(yt.to(DEVICE), m, n_out, None if bias is None else bias.to(DEVICE), silu, out=out)
    ref = yt[:, :m].double().T + (bias.double() if with_bias else 0)
    if silu:
        ref = F.silu(ref[:, :n_out]) * ref[:, n_out:]
    assert torch.allclose(y.cpu().double(), ref, rtol=1e-2 if dtype == torch.float16 else 1e-5, atol=1e-3)


@st.composite
def cslt_case(draw):
    t = draw(st.sampled_from([64, 128]))
    if REAL_SHAPES and DEVICE == "cuda":
        t = 128
        n, k = draw(st.sampled_from(REAL_SHAPES))
    else:
        n, k = t * draw(st.integers(1, 3)), t * draw(st.integers(1, 3))
    m = draw(st.integers(1, 2100 if DEVICE == "cuda" else 70))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]))
    return t, n, k, m, dtype, draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def _check_cslt_engine(t, n, k, m, dtype, with_bias, silu, seed):
    """launch(..., engine="cslt") against float64 x @ (W * M)^T (+ bias) (SiLU(gate) * up), output poisoned."""
    p, w, _ = sparse_layer(n, k, t, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    n_out = n // 2 if silu else n
    sched = build_schedule(p.bitmap, t).to(DEVICE)
    dev = lambda v: v.to(DEVICE) if v is not None else None  # noqa: E731
    cfg = KernelConfig(0, 0, 0, 4, 1, engine="cslt")
    y = launch(dev(x), dev(p.dense), dev(p.values), dev(p.meta), sched, dev(bias), n_out, cfg, silu_mul=silu,
               poison=True)
    ref = x.double() @ w.double().T + (bias.double() if with_bias else 0)
    if silu:
        ref = F.silu(ref[:, :n_out]) * ref[:, n_out:]
    assert y.shape == (m, n_out) and y.dtype == dtype and y.is_contiguous()
    y = y.double().cpu()
    assert torch.isfinite(y).all(), "unwritten or non-finite outputs"
    err = (y - ref).norm() / ref.norm().clamp_min(1e-12)
    assert err < (1.5e-2 if dtype == torch.bfloat16 else 3e-3), f"rel err {err:.2e}"


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU stand-in for cuSPARSELt")
@given(cslt_case())
def test_cslt_engine_matches_float64_reference_with_a_reference_cusparselt(c):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "_cslt_sparse_mm", fake_cslt_sparse_mm, raising=False)
        _check_cslt_engine(*c)


@pytest.mark.skipif(not GPU_CSLT, reason="cuSPARSELt: needs an sm_80+ GPU and a torch built with it")
@given(cslt_case())
def test_cslt_engine_matches_float64_reference_on_the_gpu(c):
    with config.override(cslt_eager=True):     # cuSPARSELt on eager calls too (by default only inside graphs)
        _check_cslt_engine(*c)


@pytest.mark.skipif(not GPU_CSLT, reason="cuSPARSELt: needs an sm_80+ GPU and a torch built with it")
def test_cslt_runs_inside_cuda_graphs_and_eager_calls_take_decompress_and_search_for_them(monkeypatch):
    """An eager call configured for cuSPARSELt runs decompress + cuBLAS (no cuSPARSELt call) and searches the
    algorithm for the capture; the captured call runs cuSPARSELt and matches the eager output."""
    n, k, t, m = 512, 384, 128, 300
    p, w, _ = sparse_layer(n, k, t, torch.bfloat16, 7)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    sched = build_schedule(p.bitmap, t).to("cuda")
    dense, values, meta = p.dense.cuda(), p.values.cuda(), p.meta.cuda()
    cfg = KernelConfig(0, 0, 0, 4, 1, engine="cslt")
    real, calls = torch._cslt_sparse_mm, []
    monkeypatch.setattr(torch, "_cslt_sparse_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cs._algorithms.clear()
    eager = launch(x, dense, values, meta, sched, None, n, cfg)
    assert not calls and len(cs._algorithms) == 1                     # decompress + cuBLAS; algorithm searched
    g, s = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(s), torch.cuda.graph(g):
        captured = launch(x, dense, values, meta, sched, None, n, cfg)
    g.replay()
    torch.cuda.synchronize()
    assert calls                                                       # cuSPARSELt inside the graph
    ref = x.double() @ w.cuda().double().T
    for y in (eager, captured):
        assert ((y.double() - ref).norm() / ref.norm()) < 1.5e-2


@pytest.mark.skipif(not GPU_CSLT, reason="cuSPARSELt: needs an sm_80+ GPU and a torch built with it")
@pytest.mark.parametrize("n,k,t", [(256, 384, 64), (2048, 1024, 128), (4096, 4096, 128)])
def test_conversion_equals_torch_cslt_compress_on_the_gpu(n, k, t):
    p, w, _ = sparse_layer(n, k, t, torch.bfloat16, n + k)
    want = torch._cslt_compress(w.cuda()).view(-1)
    got = cs.to_cusparselt(p.values.cuda(), p.meta.cuda(), n, k, t).view(-1)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_cslt_is_the_prefill_default_for_all_2_4_layers_only_from_its_threshold():
    t = 128
    sparse = build_schedule(torch.zeros(2, 2, dtype=torch.bool), t)
    assert default_config(CSLT_MIN_M, sparse, 256, cslt=True).engine == "cslt"
    assert default_config(4096, sparse, 256, cslt=True).engine == "cslt"
    assert default_config(CSLT_MIN_M - 1, sparse, 256, cslt=True).engine != "cslt"
    assert default_config(4096, sparse, 256, cslt=False).engine != "cslt"           # cuSPARSELt cannot run it
    assert any(c.engine == "cslt" for c in candidates(256, sparse, 256, cslt=True))
    assert not any(c.engine == "cslt" for c in candidates(256, sparse, 256))
    assert not any(c.engine == "cslt" for c in candidates(16, sparse, 256, cslt=True))  # decode: never


def test_cslt_unsupported_says_why():
    t = 64
    x = torch.randn(128, 128, dtype=torch.float16)
    p, _, _ = sparse_layer(128, 128, t, torch.float16, 0)
    sparse = build_schedule(p.bitmap, t)
    mixed = build_schedule(torch.tensor([[True, False], [False, False]]), t)
    assert cs.unsupported(x, p.values, sparse) == "not a CUDA tensor"
    if torch.cuda.is_available():
        assert "dense tiles" in cs.unsupported(x.cuda(), p.values.cuda(), mixed)
        assert "16-bit" in cs.unsupported(x.float().cuda(), p.values.cuda(), sparse)


def test_cslt_can_be_switched_off(switches):
    switches(cslt=False)
    p, _, _ = sparse_layer(128, 128, 64, torch.float16, 0)
    assert cs.unsupported(torch.randn(128, 128, dtype=torch.float16), p.values,
                          build_schedule(p.bitmap, 64)) == "PATCHC_CSLT=0"


def test_algorithm_search_survives_torch_deprecating_and_removing_it(monkeypatch):
    """torch 2.11 warns that torch._cslt_sparse_mm_search is deprecated: the search still uses it, without passing
    the warning on to the user; a torch without it gets torch._C._cusparselt.mm_search, whose tuple's first field
    is the algorithm."""
    import types
    import warnings

    calls = []

    def old(wc, xt):
        warnings.warn("torch._cslt_sparse_mm_search is deprecated and will be removed", UserWarning)
        calls.append("old")
        return 3

    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", old, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cs._search(None, None) == 3
    monkeypatch.delattr(torch, "_cslt_sparse_mm_search")
    fake = types.SimpleNamespace(mm_search=lambda *a: calls.append(("new", len(a))) or (5, 1, True, 9))
    monkeypatch.setattr(torch._C, "_cusparselt", fake, raising=False)
    assert cs._search(None, None) == 5
    assert calls == ["old", ("new", 6)]
