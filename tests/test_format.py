"""Packed format: exact round trip and the byte count of the design formula."""
import pytest
import torch
from hypothesis import given, strategies as st

from patchc import mask as hm
from patchc.format import FormatError, expected_bytes_ratio, pack_layer, to_tiles, unpack_layer, validate_packed

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@st.composite
def layer(draw):
    t = draw(st.sampled_from([8, 16, 32]))
    r, c = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["dense", "sparse", "mixed"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    bitmap = {"dense": torch.ones(r, c, dtype=torch.bool), "sparse": torch.zeros(r, c, dtype=torch.bool),
              "mixed": torch.rand(r, c, generator=g) < draw(st.floats(0.05, 0.95))}[kind]
    pattern = torch.randint(0, 6, (r * t, c * t // 4), generator=g, dtype=torch.uint8)
    dtype = draw(st.sampled_from(DTYPES))
    w = (torch.randn(r * t, c * t, generator=g) + 0.1).to(dtype)  # nonzero almost surely
    return t, bitmap, pattern, w


@given(layer())
def test_pack_unpack_is_exact(case):
    t, bitmap, pattern, w = case
    p = pack_layer(w, bitmap, pattern, t)
    validate_packed(p)
    want = hm.apply_hybrid(w, bitmap, hm.pattern_to_mask(pattern), t)
    got = unpack_layer(p)
    assert got.dtype == w.dtype and torch.equal(got, want)
    # every stored value is a weight of W (no rounding, no reordering within a group)
    assert p.dense.dtype == w.dtype and p.values.dtype == w.dtype


@given(layer())
def test_packed_bytes_match_the_formula(case):
    t, bitmap, pattern, w = case
    p = pack_layer(w, bitmap, pattern, t)
    s = hm.layer_sparsity(bitmap)
    n = w.numel()
    if w.element_size() == 2:
        assert p.nbytes == pytest.approx(2 * n * expected_bytes_ratio(s), abs=1e-6)
    # in general: dense tiles full, sparse tiles half the values + 4 bits a group of 4
    ns = int((~bitmap).sum())
    nd = bitmap.numel() - ns
    assert p.nbytes == nd * t * t * w.element_size() + ns * (t * t // 2 * w.element_size() + t * t // 8)


def test_packed_bytes_match_the_design_ratios():
    """A 16-bit layer packed at 25 / 35 / 45 / 50% takes 0.781 / 0.694 / 0.606 / 0.5625 of its dense bytes (the
    packed tensors themselves, not the formula)."""
    t, r, c = 64, 8, 10
    w = torch.randn(r * t, c * t).half()
    pat = torch.randint(0, 6, (r * t, c * t // 4), dtype=torch.uint8)
    for s, want in [(0.25, 0.781), (0.35, 0.694), (0.45, 0.606), (0.5, 0.5625)]:
        bitmap = torch.ones(r * c, dtype=torch.bool)
        bitmap[: round(2 * s * r * c)] = False                 # 2:4 tiles: s = half of their share
        p = pack_layer(w, bitmap.reshape(r, c), pat, t)
        got = sum(getattr(p, f).numel() * getattr(p, f).element_size() for f in ("dense", "values", "meta"))
        assert got / (w.numel() * 2) == pytest.approx(want, abs=6e-4), s
        assert expected_bytes_ratio(s) == pytest.approx(want, abs=6e-4)


def test_inconsistent_packed_layer_is_refused():
    w = torch.randn(16, 16)
    p = pack_layer(w, torch.tensor([[1, 0], [0, 1]], dtype=torch.bool), torch.zeros(16, 4, dtype=torch.uint8), 8)
    p.values = p.values[:1]
    with pytest.raises(FormatError, match="values has shape"):
        validate_packed(p, "x")
    with pytest.raises(FormatError, match="multiple of 8"):
        pack_layer(torch.randn(12, 12), torch.ones(3, 3, dtype=torch.bool), torch.zeros(12, 3, dtype=torch.uint8), 4)


def test_schedule_slot_points_at_each_tiles_storage():
    """Schedule.slot[r, c] = i >= 0: tile (r, c) is dense tile i; ~i: it is 2:4 tile i (what the wgmma kernel walks
    in K order)."""
    from patchc.codegen.schedule import build_schedule

    g = torch.Generator().manual_seed(3)
    for r, c in ((1, 1), (3, 5), (6, 2)):
        bitmap = torch.rand(r, c, generator=g) < 0.5
        w = torch.randn(r * 16, c * 16, generator=g)
        p = pack_layer(w, bitmap, torch.randint(0, 6, (r * 16, c * 4), generator=g, dtype=torch.uint8), 16)
        slot = build_schedule(bitmap, 16).slot
        assert slot.shape == (r, c) and slot.dtype == torch.int32
        tiles = to_tiles(w, 16)
        for i in range(r):
            for j in range(c):
                s = int(slot[i, j])
                assert (s >= 0) == bool(bitmap[i, j])
                if s >= 0:
                    assert torch.equal(p.dense[s], tiles[i * c + j])
                else:  # 2:4 tiles are stored in row-major (r, c) order: ~s counts the 2:4 tiles before (i, j)
                    assert ~s == int((~bitmap.flatten())[:i * c + j].sum())
        assert sorted(slot[slot >= 0].tolist()) == list(range(int(bitmap.sum())))
        assert sorted((~slot[slot < 0]).tolist()) == list(range(int((~bitmap).sum())))


def test_schedule_kinds_say_what_slot_says():
    """Schedule.kinds (the tile slots as 32-K-tile bitmasks, which the wgmma kernel takes in its launch parameters)
    decode to Schedule.slot for every tile, on the CPU whatever the schedule's device, across chunk boundaries and with
    bit 31 set (stored as a negative int32)."""
    from patchc.codegen.schedule import build_schedule

    g = torch.Generator().manual_seed(4)
    for r, c in ((1, 1), (3, 31), (2, 32), (5, 33), (4, 86), (2, 64)):
        for p in (0.0, 0.4, 1.0):
            bitmap = torch.rand(r, c, generator=g) < p
            sched = build_schedule(bitmap, 16)
            k = sched.kinds
            assert k.dtype == torch.int32 and k.device.type == "cpu" and sched.to("meta").kinds is k
            w = -(-c // 32)
            assert k.numel() == 1 + 2 * r * w and int(k[0]) == w
            u = k.to(torch.int64) & 0xFFFFFFFF
            for i in range(r):
                for j in range(c):
                    before, mask = int(u[1 + 2 * (i * w + j // 32)]), int(u[2 + 2 * (i * w + j // 32)])
                    d = before + bin(mask & ((1 << (j % 32)) - 1)).count("1")
                    want = d if (mask >> (j % 32)) & 1 else ~(i * c + j - d)
                    assert want == int(sched.slot[i, j]), (r, c, p, i, j)
