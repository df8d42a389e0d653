"""Kernel equivalence: the hybrid Triton kernel vs a float64 reference of x @ (W * M)^T.

On the CPU these run under TRITON_INTERPRET=1 (fp32 / fp16; bf16 dot is wrong in the interpreter);
on a GPU (HYPOTHESIS_PROFILE=gpu, PATCHC_TEST_DEVICE=cuda) in bf16 too; PATCHC_TEST_SHAPES=llama2-7b
draws the LLaMA-2-7B linear shapes (4096x4096, 11008x4096, 4096x11008) with tile 128.
"""
import os

import pytest
import torch
from hypothesis import given, strategies as st

from patchc import config
from patchc import mask as hm
from patchc.format import pack_layer

DEVICE = config.settings().test_device or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 (set before import)", allow_module_level=True)

from patchc.codegen.launch import KernelConfig, candidates, default_config, launch  # noqa: E402
from patchc.codegen.schedule import build_schedule  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
REAL_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)] if config.settings().test_shapes == "llama2-7b" else None


BITMAP_KINDS = ["dense", "sparse", "random", "empty_rows"]


def make_bitmap(kind: str, r: int, c: int, g: torch.Generator) -> torch.Tensor:
    """bool [r, c] (1 = dense): all dense, all 2:4, random, or 2:4 everywhere but row-tile 0."""
    if kind == "random":
        return torch.rand(r, c, generator=g) < 0.5
    bitmap = torch.full((r, c), kind == "dense", dtype=torch.bool)
    return bitmap.index_fill_(0, torch.tensor([0]), True) if kind == "empty_rows" else bitmap


@st.composite
def case(draw):
    t = draw(st.sampled_from([16, 32, 64] if DEVICE == "cpu" else [64, 128]))
    r, c = draw(st.integers(1, 3 if t < 64 or DEVICE == "cuda" else 2)), draw(st.integers(1, 3 if t < 64 or DEVICE == "cuda" else 2))
    if REAL_SHAPES:
        t = 128
        n, k = draw(st.sampled_from(REAL_SHAPES))
        r, c = n // t, k // t
    m = draw(st.integers(1, 300 if DEVICE == "cuda" else 80))
    kind = draw(st.sampled_from(BITMAP_KINDS))
    seed = draw(st.integers(0, 2**31 - 1))
    bitmap = make_bitmap(kind, r, c, torch.Generator().manual_seed(seed))
    dtype = draw(st.sampled_from(DTYPES))
    bias = draw(st.booleans())
    return t, bitmap, m, dtype, bias, seed


def reference(x, w, bitmap, pattern, t, bias):
    wm = hm.apply_hybrid(w.double(), bitmap, hm.pattern_to_mask(pattern), t)
    y = x.double() @ wm.T
    return y + bias.double() if bias is not None else y


def run_case(t, bitmap, m, dtype, with_bias, seed, cfg_fn, silu=False, graph=False):
    """graph=True: the launch (poisoning its output first) is captured in a CUDA graph and replayed, as under
    mode="reduce-overhead"; there the mma.sp kernel is a programmatic dependent launch (sm_90+)."""
    g = torch.Generator().manual_seed(seed)
    r, c = bitmap.shape
    n, k = r * t, c * t
    # weights at the usual 1/sqrt(K) init scale: with unit weights, K=11008 gives SiLU(gate)*up ~ 1e4 whose
    # tails overflow float16 (a test-data artifact, seen on the GPU at the 7B shapes)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
    pattern = torch.randint(0, 6, (n, k // 4), generator=g, dtype=torch.uint8)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    p = pack_layer(w, bitmap, pattern, t)
    sched = build_schedule(bitmap, t).to(DEVICE)
    n_out = n // 2 if silu else n
    cfg = cfg_fn(m, sched, n_out)
    dev = lambda v: v.to(DEVICE) if v is not None else None  # noqa: E731
    args = (dev(x), dev(p.dense), dev(p.values), dev(p.meta), sched, dev(bias), n_out, cfg)
    y = launch(*args, silu_mul=silu, poison=True)
    if graph:
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = launch(*args, silu_mul=silu, poison=True)
        g.replay()
        torch.cuda.synchronize()
    ref = reference(x, w, bitmap, pattern, t, bias)
    if silu:
        ref = torch.nn.functional.silu(ref[:, :n_out]) * ref[:, n_out:]
    assert y.shape == (m, n_out) and y.dtype == dtype
    y = y.double().cpu()
    assert torch.isfinite(y).all(), "unwritten or non-finite outputs"
    err = (y - ref).norm() / ref.norm().clamp_min(1e-12)
    assert err < TOL[dtype], f"rel err {err:.2e} cfg {cfg}"


def _tma_ready() -> bool:
    return DEVICE == "cpu" or torch.cuda.get_device_capability() >= (9, 0)


@given(case())
def test_kernel_matches_float64_reference(c):
    """The config users get (the TMA kernel's defaults included where it can run)."""
    tma = c[3] != torch.float32 and _tma_ready()
    run_case(*c, cfg_fn=lambda m, s, n: default_config(m, s, n, tma=tma))


@given(case(), st.data())
def test_every_candidate_config_is_correct(c, data):
    t, bitmap, m, dtype, bias, seed = c
    tma = dtype != torch.float32 and _tma_ready()
    pick = lambda m_, s, n: data.draw(st.sampled_from(candidates(m_, s, n, tma=tma)))  # noqa: E731
    run_case(t, bitmap, m, dtype, bias, seed, cfg_fn=pick)


@given(case())
def test_fused_silu_gate_up(c):
    t, bitmap, m, dtype, bias, seed = c
    if bitmap.shape[0] % 2:  # gate and up stacked: an even number of row-tiles
        bitmap = torch.cat([bitmap, bitmap.flip(1)], 0)
    run_case(t, bitmap, m, dtype, bias, seed, cfg_fn=default_config, silu=True)


@st.composite
def tma_case(draw):
    """The TMA kernel (sm_90+ / the interpreter): 16-bit, tiles 64 | 128, any M, a drawn block shape and split."""
    t, bitmap, m, _, bias, seed = draw(case())
    if t % 64:
        t = 64
    dtype = draw(st.sampled_from([torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])))
    bn = draw(st.sampled_from(sorted({64, t})))
    cfg = KernelConfig(draw(st.sampled_from([64, 128])), bn, draw(st.sampled_from([1, 2, 4])), 4,
                       draw(st.sampled_from([2, 4])), engine="tma", block_k=draw(st.sampled_from(sorted({64, t}))))
    return (t, bitmap, m, dtype, bias, seed), cfg


@pytest.mark.skipif(not _tma_ready(), reason="the TMA kernel needs sm_90+")
@given(tma_case())
def test_tma_kernel_matches_float64_reference(c):
    args, cfg = c
    run_case(*args, cfg_fn=lambda m, s, n: cfg)


def test_prefill_defaults_and_chunked_decompress_are_correct():
    """M above the decode range: the default config (the TMA kernel where it can run) and decompress + GEMM a
    row-tile at a time (what tall layers use at M >= 1024) both match the float64 reference."""
    from patchc.codegen.launch import tma_available

    t, bitmap = 64, torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 1]], dtype=torch.bool)
    for dtype in (torch.float16, torch.float32):
        run_case(t, bitmap, 70, dtype, True, 1,
                 cfg_fn=lambda m, s, n: default_config(m, s, n, tma=tma_available(torch.empty(0, dtype=dtype,
                                                                                               device=DEVICE), s)))
        run_case(t, bitmap, 70, dtype, True, 2, cfg_fn=lambda m, s, n: KernelConfig(0, 0, 0, 4, 1, chunk_n=t))
    sched = build_schedule(bitmap, t)
    assert default_config(100, sched, 3 * t, tma=True).engine == "tma"
    assert default_config(200, sched, 3 * t, tma=True).engine == "triton"      # short layer: decompress + GEMM
    tall = build_schedule(torch.ones(4608 // t, 2, dtype=torch.bool), t)
    assert default_config(200, tall, 4608, tma=True).engine == "tma"
    assert default_config(2048, tall, 4608, tma=True).chunk_n == 4096


def test_split_k_is_correct_and_poisoned_output_is_overwritten():
    t, bitmap = (16 if DEVICE == "cpu" else 128), torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    for split in (1, 2, 4):
        run_case(t, bitmap, 5, torch.float32, True, split,
                 cfg_fn=lambda m, s, n, _k=split: KernelConfig(16, 16 if DEVICE == "cpu" else 64, _k, 4, 2))


@given(case())
def test_decompress_equals_the_format_reference(c):
    from patchc.codegen.launch import decompress
    from patchc.format import unpack_layer

    t, bitmap, _, dtype, _, seed = c
    g = torch.Generator().manual_seed(seed)
    n, k = bitmap.shape[0] * t, bitmap.shape[1] * t
    w = torch.randn(n, k, generator=g).to(dtype)
    p = pack_layer(w, bitmap, torch.randint(0, 6, (n, k // 4), generator=g, dtype=torch.uint8), t)
    got = decompress(p.dense.to(DEVICE), p.values.to(DEVICE), p.meta.to(DEVICE), build_schedule(bitmap, t).to(DEVICE),
                     dtype, poison=True)
    assert torch.equal(got.cpu(), unpack_layer(p))


def test_config_cache_is_used_and_a_corrupt_cache_ignored(tmp_path, monkeypatch, switches):
    import json

    from patchc.codegen import launch as L

    switches(cache=tmp_path)
    monkeypatch.setattr(L, "_memory", {})
    monkeypatch.setattr(L, "_answered", {})
    sched = build_schedule(torch.tensor([[1, 0], [0, 0]], dtype=torch.bool), 64)
    x = torch.randn(3, 128)
    assert L.get_config(x, None, None, None, sched, None, 128) == L.default_config(3, sched, 128)
    L.cache_file().parent.mkdir(parents=True, exist_ok=True)
    L.cache_file().write_text("{not json")
    assert L.get_config(x, None, None, None, sched, None, 128) == L.default_config(3, sched, 128)
    chosen = KernelConfig(16, 32, 2, 4, 3)
    L.cache_file().write_text(json.dumps({L.config_key(sched, 3, x.dtype, False): {"config": chosen.__dict__, "ms": 1}}))
    assert L.get_config(x, None, None, None, sched, None, 128) == L.default_config(3, sched, 128)  # memoized
    monkeypatch.setattr(L, "_memory", {})
    monkeypatch.setattr(L, "_answered", {})
    assert L.get_config(x, None, None, None, sched, None, 128) == chosen


def test_config_answers_are_remembered_per_everything_they_depend_on(monkeypatch, switches):
    """get_config answers a repeated call from memory (eager decode asks it for every layer at every step), and
    asks again when anything its answer depends on changes: the M bucket, x's alignment, the schedule, the
    switches. Within an M bucket (as for tuned configs) the answer is shared, so the memo stays small."""
    from patchc.codegen import launch as L

    monkeypatch.setattr(L, "_answered", {})
    calls = []
    real = L._get_config
    monkeypatch.setattr(L, "_get_config", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    sched = build_schedule(torch.tensor([[1, 0], [0, 1]], dtype=torch.bool), 64)
    x = torch.randn(8, 128)
    first = L.get_config(x, None, None, None, sched, None, 128, tune=False)
    assert L.get_config(x.clone(), None, None, None, sched, None, 128, tune=False) is first and len(calls) == 1
    L.get_config(torch.randn(5, 128), None, None, None, sched, None, 128, tune=False)             # same bucket
    L.get_config(torch.randn(9, 128), None, None, None, sched, None, 128, tune=False)             # another bucket
    L.get_config(torch.randn(8, 130)[:, 1:129], None, None, None, sched, None, 128, tune=False)  # unaligned x
    other = build_schedule(torch.tensor([[1, 1], [0, 1]], dtype=torch.bool), 64)
    L.get_config(x, None, None, None, other, None, 128, tune=False)                                # another bitmap
    switches(mma_sp=False)
    L.get_config(x, None, None, None, sched, None, 128, tune=False)                                # a switch
    assert calls == [8, 9, 8, 8, 8]


# ---------------------------------------------------------------------------------------------
# The sparse-tensor-core decode kernel (codegen/mma_sp.cu): GPU only; its launch rules are checked anywhere
# ---------------------------------------------------------------------------------------------
def _mma_ready() -> bool:
    from patchc.codegen import mma_sp

    return DEVICE == "cuda" and torch.cuda.get_device_capability() >= (8, 0) and mma_sp.extension() is not None


@st.composite
def mma_case(draw):
    from patchc.codegen import mma_sp

    t, bitmap, _, _, bias, seed = draw(case())
    if t not in mma_sp.TILES:
        t = 128
    m = draw(st.integers(1, mma_sp.MAX_M))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    slices = draw(st.sampled_from([1, 2] if m <= 16 else [1]))
    warps = draw(st.sampled_from([1, 2, 3, 4, 8, 11, 16]))
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    staged = draw(st.booleans()) and hopper
    graph = draw(st.booleans())
    silu = draw(st.booleans())
    if silu and bitmap.shape[0] % 2:  # gate and up stacked: an even number of row-tiles
        bitmap = torch.cat([bitmap, bitmap.flip(1)], 0)
    n_out = bitmap.shape[0] * t // (2 if silu else 1)
    if mma_sp.launch_error(m, n_out, t, warps, slices, staged, silu):
        warps, slices = 4, 1
    return t, bitmap, m, dtype, bias, seed, warps, slices, staged, silu, graph


@pytest.mark.skipif(not _mma_ready(), reason="mma.sp kernel: needs an sm_80+ GPU and nvcc")
@given(mma_case())
def test_mma_sp_kernel_matches_float64_reference(c):
    """Direct loads and (sm_90+) the staged variant, whose warps each refill a ring of shared-memory buffers;
    plain outputs and SiLU(gate) * up (half the warps on the gate row-tile, half on the up one); and, captured in
    a CUDA graph, the programmatic dependent launch (sm_90+), whose output must land after the poisoning fill
    that precedes it."""
    t, bitmap, m, dtype, bias, seed, warps, slices, staged, silu, graph = c
    cfg = KernelConfig(0, 16 * slices, 0, warps, 1, engine="mma_sp", staged=staged)
    run_case(t, bitmap, m, dtype, bias, seed, cfg_fn=lambda *_: cfg, silu=silu, graph=graph)


@pytest.mark.skipif(not _mma_ready(), reason="mma.sp kernel: needs an sm_80+ GPU and nvcc")
def test_decode_default_runs_on_the_sparse_tensor_cores():
    from patchc.codegen.launch import get_config

    bitmap = torch.tensor([[1, 0, 0], [0, 1, 0]], dtype=torch.bool)
    sched = build_schedule(bitmap, 128).to("cuda")
    x = torch.randn(16, 384, device="cuda", dtype=torch.bfloat16)
    cfg = get_config(x, torch.empty(2, 128, 128, device="cuda", dtype=torch.bfloat16),
                     torch.empty(4, 128, 64, device="cuda", dtype=torch.bfloat16), None, sched, None, 256, tune=False)
    assert cfg.engine == "mma_sp"   # (two row-tiles: too few CTA row pairs for the wgmma kernel's decode CTAs)
    run_case(128, bitmap, 16, torch.bfloat16, True, 0, cfg_fn=lambda *_: cfg)


def test_decode_default_sends_m_up_to_32_to_mma_sp_on_short_layers():
    """M <= 16 goes to the mma.sp kernel on every layer; 16 < M <= 32 only on layers of at most 4096 output rows
    (where it beat the Triton kernel on the H100); above 32 never."""
    from patchc.codegen import mma_sp
    from patchc.codegen.launch import default_config

    g = torch.Generator().manual_seed(0)
    short = build_schedule(torch.rand(32, 4, generator=g) < 0.5, 128)   # 4096 x 512
    tall = build_schedule(torch.rand(86, 4, generator=g) < 0.5, 128)    # 11008 x 512
    for m, sched, n_out, engine in ((16, short, 4096, "mma_sp"), (16, tall, 11008, "mma_sp"),
                                    (24, short, 4096, "mma_sp"), (32, short, 4096, "mma_sp"),
                                    (24, tall, 11008, "triton"), (32, tall, 11008, "triton"),
                                    (33, short, 4096, "triton")):
        cfg = default_config(m, sched, n_out, mma=True)
        assert cfg.engine == engine, (m, n_out, cfg)
        if engine == "mma_sp":
            assert mma_sp.launch_error(m, n_out, 128, cfg.num_warps, cfg.block_n // 16) is None
    assert default_config(32, short, 4096, mma=False).engine == "triton"  # the kernel cannot run this call


def test_mma_sp_launch_rules():
    from patchc.codegen import mma_sp

    for m in range(1, mma_sp.MAX_M + 1):
        for n_out in (1024, 4096, 6144, 11008, 14336, 22016):
            for tile in mma_sp.TILES:
                for staged in (False, True):
                    warps, slices = mma_sp.default_launch(m, n_out, 132, tile, staged)
                    assert mma_sp.launch_error(m, n_out, tile, warps, slices, staged) is None, (m, n_out, warps, slices)
                    if staged:  # every CTA resident at once: one wave
                        per_sm = min(mma_sp.SM_SMEM // (mma_sp.smem_bytes(m, warps, slices, tile, True) + 1024),
                                     16 // warps)
                        assert per_sm * 132 >= n_out // (16 * slices) or warps == 1
    # the staged ring: 2 buffers a warp of the CTA's rows of a dense tile, 16 warps x 2 slices do not fit
    assert mma_sp.smem_bytes(16, 8, 2, 128, True) == 8 * 2 * 32 * 128 * 2 + 8 * 2 * 8
    assert "shared memory" in mma_sp.launch_error(16, 4096, 128, 16, 2, staged=True)
    assert "M=33" in mma_sp.launch_error(33, 4096, 128, 4, 1)
    assert "slices" in mma_sp.launch_error(17, 4096, 128, 4, 2)
    assert "warps=17" in mma_sp.launch_error(8, 4096, 128, 17, 1)
    assert "multiple of 32" in mma_sp.launch_error(8, 4112, 128, 4, 2)
    assert "even number of warps" in mma_sp.launch_error(8, 4096, 128, 3, 1, silu_mul=True)
    for m in (1, 8, 16):
        for n_out in (1024, 11008, 14336):
            warps, slices = mma_sp.default_launch(m, n_out, 132, 128, False, silu_mul=True)
            assert mma_sp.launch_error(m, n_out, 128, warps, slices, False, True) is None
    x = torch.randn(4, 256)
    sched = build_schedule(torch.ones(1, 2, dtype=torch.bool), 128)
    assert mma_sp.unsupported(x, torch.float32, sched) in ("not a CUDA tensor", "PATCHC_MMA_SP=0")


# ---------------------------------------------------------------------------------------------
# The Hopper prefill GEMM (codegen/wgmma.cu): H100 / H200 only; its source and launch rules are checked anywhere
# ---------------------------------------------------------------------------------------------
def _wgmma_ready() -> bool:
    from patchc.codegen import wgmma

    return DEVICE == "cuda" and torch.cuda.get_device_capability() == (9, 0) and wgmma.extension() is not None


@st.composite
def wgmma_case(draw):
    _, bitmap, _, _, bias, seed = draw(case())
    if not REAL_SHAPES:  # up to 5 row-tiles: an odd count leaves the last CTA one row-tile
        g = torch.Generator().manual_seed(seed)
        r, c = draw(st.integers(1, 5)), draw(st.integers(1, 4))
        bitmap = make_bitmap(draw(st.sampled_from(BITMAP_KINDS)), r, c, g)
    from patchc.codegen import wgmma
    from patchc.codegen.launch import WGMMA, WGMMA_64, wgmma_decode

    decode = draw(st.booleans())
    m = draw(st.integers(1, 16)) if decode else \
        draw(st.sampled_from([draw(st.integers(1, 300)), draw(st.integers(301, 2100))]))
    cfg = wgmma_decode(draw(st.integers(1, min(wgmma.MAX_SPLIT, bitmap.shape[1]))), draw(st.sampled_from(wgmma.ROWS))) \
        if decode else draw(st.sampled_from([WGMMA, WGMMA_64]))
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    silu = draw(st.booleans())
    if silu and draw(st.booleans()):  # gate and up stacked: an even number of row-tiles is fused in the kernel
        bitmap = torch.cat([bitmap, bitmap.flip(1)], 0)
    return bitmap, m, dtype, bias, seed, silu, draw(st.booleans()), cfg


@pytest.mark.skipif(not _wgmma_ready(), reason="wgmma kernel: needs an H100 / H200 (sm_90a) and nvcc")
@given(wgmma_case())
def test_wgmma_kernel_matches_float64_reference(c):
    """Two row-tiles a CTA (or one, for the last of an odd count), dense tiles on wgmma and 2:4 tiles on sparse
    wgmma in K order; 64- and 128-token blocks, and 16-token blocks with K split over a cluster of 1..8 CTAs whose
    partials meet in distributed shared memory, covering two row-tiles or half of one a CTA; M not a multiple of the
    block, bias, SiLU(gate) * up (in the kernel when gate and up are whole row-tiles, else after it), and a CUDA graph
    replay after a poisoning fill (there the kernel is a programmatic dependent launch, whose y must land after the
    fill)."""
    bitmap, m, dtype, bias, seed, silu, graph, cfg = c
    run_case(128, bitmap, m, dtype, bias, seed, cfg_fn=lambda *_: cfg, silu=silu, graph=graph)


@pytest.mark.skipif(not _wgmma_ready(), reason="wgmma kernel: needs an H100 / H200 (sm_90a) and nvcc")
def test_wgmma_reads_global_slots_when_the_kinds_exceed_the_launch_parameters():
    """A layer whose tile kinds do not fit in the launch's parameters (440 row-tiles of one K-tile: 881 words, the
    kernel takes 880) is computed from the slots in global memory instead, with both CTA shapes, in a graph too."""
    from patchc.codegen import wgmma
    from patchc.codegen.launch import wgmma_decode

    bitmap = make_bitmap("random", 440, 1, torch.Generator().manual_seed(7))
    assert build_schedule(bitmap, 128).kinds.numel() > wgmma.KIND_WORDS
    for rows in wgmma.ROWS:
        run_case(128, bitmap, 16, torch.bfloat16, True, 7, cfg_fn=lambda *_: wgmma_decode(1, rows), graph=True)


def test_wgmma_source_generates_one_wrapper_per_shape_and_dtype():
    """The generated inline asm: m64nNk16 dense and m64nNk32 sparse wgmma (N = 16, 64, 128) for bf16 and fp16, each
    naming its N/2 accumulators, both descriptors (and the sparse one its metadata register) and scale-d once; and
    the host dispatches every block size built."""
    import re

    from patchc.codegen import wgmma

    src = wgmma.source()
    for bn in wgmma.BLOCK_NS:
        for ptx in ("bf16", "f16"):
            for sparse, k, operands in ((False, 16, bn // 2 + 2 + 1), (True, 32, bn // 2 + 3 + 1)):
                name = f"wgmma.mma_async{'.sp' if sparse else ''}.sync.aligned.m64n{bn}k{k}.f32.{ptx}.{ptx}"
                assert src.count(name + " ") == 1, name
                start = src.rindex("asm volatile(", 0, src.index(name + " "))
                body = src[start:src.index(");\n", start)]
                assert sorted({int(i) for i in re.findall(r"%(\d+)", body)}) == list(range(operands)), name
                assert body.count('"+f"(d[') == bn // 2
        assert f"template <> struct Wgmma<__half, {bn}>" in src
    assert "// @WGMMA_OPS@" in src
    cases = re.search(r"#define PATCHC_WGMMA_BLOCK_NS (.*)\n", src).group(1)
    assert re.findall(r"PATCHC_WGMMA_CASE\((\d+)\)", cases) == [str(bn) for bn in wgmma.BLOCK_NS]


def test_kernel_sources_carry_the_shared_device_helpers(tmp_path):
    """Both CUDA sources get device_common.cuh pasted in where they include it (so the build's hash covers it), once,
    and carry no bench-only instrumentation; an older source without the include is built as it is."""
    from patchc.codegen import cuda_build, mma_sp, wgmma

    common = cuda_build.COMMON.read_text()
    for name, src, raw in (("wgmma", wgmma.source(), wgmma.SOURCE.read_text()),
                           ("mma_sp", mma_sp.source(), mma_sp.SOURCE.read_text())):
        assert cuda_build.COMMON_INCLUDE in raw and cuda_build.COMMON_INCLUDE not in src, name
        assert src.count(common) == 1, name
        for helper in ("uint32_t smem_u32(", "void mbar_wait(", "void bulk_copy(", "void grid_dependency_wait(",
                       "void launch_dependents("):
            assert helper in common and helper not in raw, (name, helper)
        assert "TRACE" not in src, name
    old = "// an older kernel\n__global__ void k() {}\n"
    assert mma_sp.source(old) == old and cuda_build.inline_common(old) == old


def test_programmatic_dependent_launch_only_under_capture_and_never_with_patchc_pdl_0():
    """Both CUDA kernels are launched as programmatic dependents only while a CUDA graph is captured on sm_90+, and
    PATCHC_PDL=0 turns that off before the device is asked anything."""
    from patchc.codegen.device import pdl_enabled

    with config.override(pdl=False):
        assert not pdl_enabled(torch.empty(1))
    if DEVICE == "cuda":
        x = torch.empty(1, device="cuda")
        assert not pdl_enabled(x)   # eager: not capturing
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            captured = pdl_enabled(x)
            x.add_(1)   # (a graph with no work warns)
        assert captured == (torch.cuda.get_device_capability() >= (9, 0))


def test_wgmma_half_row_tile_ctas_can_be_turned_off():
    """PATCHC_WGMMA_HALF=0: two row-tiles a CTA only; 4096-row layers then decode on the wgmma kernel at split 6 with
    K >= 64 tiles and on the mma.sp kernel with shorter K, as before half-row-tile CTAs existed."""
    from patchc.codegen.launch import default_config, wgmma_decode

    g = torch.Generator().manual_seed(3)
    square, wide = (build_schedule(torch.rand(32, c, generator=g) < 0.5, 128) for c in (32, 86))
    with config.override(wgmma_half=False):
        assert default_config(16, square, 4096, mma=True, wg=True).engine == "mma_sp"
        assert default_config(16, wide, 4096, mma=True, wg=True) == wgmma_decode(6)
    assert default_config(16, square, 4096, mma=True, wg=True) == wgmma_decode(2, 64)


def test_wgmma_decode_default_splits_k_over_a_cluster():
    """M <= 16 on layers of >= 4096 rows runs on the wgmma kernel: 16-token CTAs, one CTA an SM, K split over the
    largest cluster whose clusters all run at once (a second wave doubles the time), with CTAs of two row-tiles or of
    half of one, whichever streams with more CTAs (4096 rows: 128 half-row-tile CTAs at split 2 over 96 of two
    row-tiles at split 6); SiLU(gate) * up pairs each gate row-tile with its up row-tile in one CTA, so half the pairs,
    and goes to it from 16 pairs with K >= 64 tiles. Shorter layers stay on the mma.sp kernel."""
    from patchc.codegen import wgmma
    from patchc.codegen.launch import (H100_MAX_CLUSTERS, WGMMA_DECODE_MAX_M, candidates, default_config,
                                       wgmma_decode, wgmma_decode_default)

    def sched(r, c):
        return build_schedule(torch.rand(r, c, generator=torch.Generator().manual_seed(r * c)) < 0.5, 128)
    # H100: 132 / 66 / 39 / 30 / 22 / 17 / 15 / 15 clusters of 1..8 CTAs at once
    for (r, c, silu), (split, rows) in (((32, 32, False), (2, 64)), ((86, 32, False), (2, 256)),
                                        ((32, 86, False), (2, 64)), ((172, 32, True), (1, 256)),
                                        ((96, 32, False), (2, 256)), ((32, 4, False), (2, 64)),
                                        ((400, 32, False), (1, 256)), ((16, 32, False), (3, 64)),
                                        ((32, 32, True), (6, 256))):
        cfg = wgmma_decode_default(sched(r, c), silu, H100_MAX_CLUSTERS)
        assert cfg == wgmma_decode(split, rows) and cfg.engine == "wgmma" and cfg.block_n == wgmma.DECODE_BLOCK_N, \
            (r, c, cfg)
    assert wgmma_decode_default(sched(32, 32), max_clusters=(132,) * 8) == wgmma_decode(8, 64)
    tall, short = sched(86, 32), sched(32, 32)
    assert default_config(WGMMA_DECODE_MAX_M, tall, 11008, mma=True, wg=True) == wgmma_decode(2)
    assert default_config(1, sched(172, 32), 11008, mma=True, wg=True, silu_mul=True) == wgmma_decode(1)
    # 4096-row layers: half-row-tile CTAs at split 2 at any K and share of dense tiles; 2048 rows stay on mma.sp
    for k_tiles in (86, 64, 32, 16):
        for dense_share in (1.0, 0.5, 0.0):
            bm = torch.zeros(32 * k_tiles, dtype=torch.bool)
            bm[: int(dense_share * bm.numel())] = True
            layer = build_schedule(bm.reshape(32, k_tiles), 128)
            assert default_config(16, layer, 4096, mma=True, wg=True) == wgmma_decode(2, 64), (k_tiles, dense_share)
    assert default_config(16, sched(16, 32), 2048, mma=True, wg=True).engine == "mma_sp"
    # SiLU * up fused (two row-tiles a CTA): from 16 pairs with K >= 64 tiles, else from 32 pairs
    assert default_config(16, sched(32, 32), 2048, mma=True, wg=True, silu_mul=True).engine == "mma_sp"
    assert default_config(16, sched(32, 64), 2048, mma=True, wg=True, silu_mul=True).engine == "wgmma"
    assert default_config(16, sched(64, 32), 4096, mma=True, wg=True, silu_mul=True).engine == "wgmma"
    assert default_config(WGMMA_DECODE_MAX_M + 1, tall, 11008, mma=True, wg=True).engine != "wgmma"
    assert default_config(1, tall, 11008, mma=True, wg=False).engine == "mma_sp"
    assert {wgmma_decode(i, rows) for i in range(1, 9) for rows in (256, 64)} <= \
        set(candidates(16, short, 4096, mma=True, wg=True))
    assert not any(c.engine == "wgmma" for c in candidates(16, short, 4096, mma=True))
    with pytest.raises(ValueError, match="split 9 must be 1..8"):
        wgmma.run(torch.randn(4, 4096), None, None, None, short, None, block_n=16, split=9)
    with pytest.raises(ValueError, match="even number of row-tiles"):
        wgmma.run(torch.randn(4, 512), None, None, None, sched(3, 4), None, block_n=16, silu_mul=True)
    with pytest.raises(ValueError, match="for the 16-token decode CTAs, not block_n 64"):
        wgmma.run(torch.randn(4, 4096), None, None, None, short, None, block_n=64, split=2)
    with pytest.raises(ValueError, match="rows 64 .* decode CTAs without silu_mul"):
        wgmma.run(torch.randn(4, 4096), None, None, None, short, None, block_n=64, rows=64)
    with pytest.raises(ValueError, match="rows 64 .* decode CTAs without silu_mul"):
        wgmma.run(torch.randn(4, 4096), None, None, None, short, None, block_n=16, silu_mul=True, rows=64)
    with pytest.raises(ValueError, match=r"rows 128 not in \(256, 64\)"):
        wgmma.run(torch.randn(4, 4096), None, None, None, short, None, block_n=16, rows=128)


def test_wgmma_rules_and_prefill_default():
    from patchc.codegen import wgmma
    from patchc.codegen.launch import CSLT_OVER_WGMMA_M, WGMMA, WGMMA_64, WGMMA_MIN_M, candidates, prefill_default

    sched = build_schedule(torch.rand(4, 3) < 0.5, 128)
    assert wgmma.unsupported(torch.randn(8, 384), torch.float32, sched) in ("not a CUDA tensor", "PATCHC_WGMMA=0")
    assert prefill_default(8192, sched, 512, wg=True) == WGMMA              # 64 x 2 CTAs of 128 tokens
    assert prefill_default(WGMMA_MIN_M, sched, 512, wg=True) == WGMMA_64   # 4 row-tiles: 2 CTAs of 128 tokens ...
    tall = build_schedule(torch.rand(86, 3) < 0.5, 128)                      # ... 11008 rows: 86 of 128 fill the GPU
    assert prefill_default(256, tall, 11008, wg=True) == WGMMA and prefill_default(255, tall, 11008, wg=True) != WGMMA
    assert prefill_default(2048, sched, 512, wg=True, cslt=True).engine == "wgmma"  # ahead of cuSPARSELt ...
    assert prefill_default(CSLT_OVER_WGMMA_M, sched, 512, wg=True, cslt=True).engine == "cslt"  # ... up to here
    assert prefill_default(WGMMA_MIN_M - 1, sched, 512, wg=True).engine != "wgmma"
    assert prefill_default(4096, sched, 512, wg=False).engine != "wgmma"
    assert {WGMMA, WGMMA_64} <= set(candidates(256, sched, 512, wg=True)) and WGMMA not in candidates(256, sched, 512)
    # asked to run where it cannot, it says why instead of falling back silently
    x = torch.randn(8, 384, dtype=torch.float16)
    with pytest.raises(ValueError, match="wgmma kernel cannot run this call: (not a CUDA tensor|PATCHC_WGMMA=0)"):
        launch(x, torch.zeros(6, 128, 128, dtype=torch.float16), torch.zeros(6, 128, 64, dtype=torch.float16),
               torch.zeros(6, 128, 16, dtype=torch.uint8), sched, None, 512, WGMMA)
