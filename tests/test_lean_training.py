"""Mask learning at scale: stateless noise, the fused masked linear, lean state, data-parallel training."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import WIKI_VALID, need
from patchc import PruneConfig, prune
from patchc import mask as hm
from patchc.io import read_safetensors
from patchc.optim import LeanAdamW, decode_v, encode_v, r_bound
from patchc.passes.insert_masks import MaskedLinear
from patchc.prune_dir import read_prune_dir

FAST = dict(steps=4, seq_len=64, batch_size=2, calib_samples=4)


def test_noise_is_a_stateless_uniform_hash():
    k = torch.tensor(hm.noise_key(0, 3, 0, 7, 1))
    u = hm.uniform_noise(k, (64, 1000), "cpu")
    assert torch.equal(u, hm.uniform_noise(k, (64, 1000), "cpu"))                 # same key, same noise
    other = hm.uniform_noise(torch.tensor(hm.noise_key(0, 4, 0, 7, 1)), (64, 1000), "cpu")
    assert (u == other).float().mean() < 1e-3                                     # another step: unrelated
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0                          # logs of u and 1-u stay finite
    hist = torch.histc(u, bins=16, min=0.0, max=1.0)
    assert (hist / u.numel() - 1 / 16).abs().max() < 0.005                        # uniform
    assert abs(float(torch.corrcoef(torch.stack([u.flatten()[:-1], u.flatten()[1:]]))[0, 1])) < 0.01


def _masked_linear_case(joint: bool, dtype, out_f=32, in_f=48, tile=16):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    x = torch.randn(3, 5, in_f, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(out_f, generator=g, dtype=dtype)
    tl = torch.randn(out_f // tile, in_f // tile, generator=g, dtype=dtype, requires_grad=True)
    pl = torch.randn(out_f, in_f // 4, 6, generator=g, dtype=dtype, requires_grad=True) if joint else None
    pattern = None if joint else torch.randint(0, 6, (out_f, in_f // 4), generator=g, dtype=torch.uint8)
    dy = torch.randn(3, 5, out_f, generator=g, dtype=dtype)
    return w, x, bias, tl, pl, pattern, dy


def _outputs_and_grads(y, gate, norm, dy, leaves):
    loss = (y * dy).sum() + 0.3 * gate + 0.7 * norm
    return [y.detach()] + list(torch.autograd.grad(loss, leaves))


def _reference(w, x, bias, tl, pl, pattern, dy, knobs, keys, tile):
    """Plain autograd through mask.soft_masked_weight in float64."""
    leaves = [t.detach().double().requires_grad_() for t in (x, tl) + ((pl,) if pl is not None else ())]
    m24 = None if pattern is None else hm.pattern_to_mask(pattern)
    wm, gate, norm = hm.soft_masked_weight(w.double(), leaves[1], leaves[2] if pl is not None else None, m24, tile,
                                           knobs.double(), keys)
    return _outputs_and_grads(F.linear(leaves[0], wm, bias.double()), gate, norm, dy.double(), leaves)


@pytest.mark.parametrize("joint", [True, False])
def test_fused_masked_linear_matches_autograd_in_float64(joint):
    """MaskedLinear (torch-op path) keeps only x and recomputes W * M in backward: output, input gradient and
    logit gradients equal plain autograd through the same relaxed mask, in float64."""
    w, x, bias, tl, pl, pattern, dy = _masked_linear_case(joint, torch.float64)
    knobs, keys = torch.tensor([3.0, 5.0, 0.7], dtype=torch.float64), torch.tensor([11, 12])
    y, gate, norm = MaskedLinear.apply(x, w, bias, tl, pl, pattern, knobs, keys, 16, False)
    got = _outputs_and_grads(y, gate, norm, dy, [x, tl] + ([pl] if joint else []))
    for a, b in zip(got, _reference(w, x, bias, tl, pl, pattern, dy, knobs, keys, 16)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("joint,tile,shape", [(True, 16, (32, 48)), (False, 16, (32, 48)), (True, 8, (24, 40)),
                                              (False, 64, (128, 64)), (True, 128, (128, 256))])
def test_mask_kernels_match_the_float64_reference(joint, tile, shape):
    """The Triton mask kernels (patchc/mask_kernels.py: W * M from the logits in one pass, the logit gradients in
    another) give MaskedLinear's output and every gradient of autograd through mask.soft_masked_weight with the
    same hash noise, in float64, to float32 rounding; keys None (no noise) too. The kernels read the keys from a
    device int64 tensor (what a CUDA graph replays with new values): another key in the same tensor, written in
    place, gives the reference of that key."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    w, x, bias, tl, pl, pattern, dy = _masked_linear_case(joint, torch.float32, *shape, tile)
    knobs = torch.tensor([3.0, 5.0, 0.7])
    keys_dev = torch.zeros(2, dtype=torch.int64, device=dev)          # one persistent tensor, written in place
    for keys in ([hm.noise_key(0, 1, 0, 2, 0), hm.noise_key(0, 1, 0, 2, 1)],
                 [hm.noise_key(0, 2, 0, 2, 0), hm.noise_key(0, 2, 0, 2, 1)], None):
        want = _reference(w, x, bias, tl, pl, pattern, dy, knobs, None if keys is None else torch.tensor(keys), tile)
        if keys is not None:
            keys_dev.copy_(torch.tensor(keys))
        leaves = [t.detach().to(dev).requires_grad_() for t in (x, tl) + ((pl,) if joint else ())]
        y, gate, norm = MaskedLinear.apply(leaves[0], w.to(dev), bias.to(dev), leaves[1],
                                           leaves[2] if joint else None, None if joint else pattern.to(dev),
                                           knobs.to(dev), None if keys is None else keys_dev, tile, True)
        got = _outputs_and_grads(y, gate, norm, dy.to(dev), leaves)
        for name, a, b in zip(["y", "dx", "d tile logits", "d pattern logits"], got, want):
            scale = float(b.abs().max())
            assert float((a.cpu().double() - b).abs().max()) <= 2e-5 * scale + 1e-7, name


def test_lean_moment_codes_are_unbiased_and_bounded():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(400_000, generator=g) * 3e-3
    u = torch.rand(400_000, generator=g)
    vref = torch.tensor(1e-2)
    code = encode_v(v, vref, u)
    assert code.dtype == torch.uint8
    assert abs(float(decode_v(code, vref).mean() / v.mean()) - 1) < 2e-3           # no bias in v
    assert r_bound(0.9, 0.95) == pytest.approx(1.165, abs=1e-3)
    with pytest.raises(ValueError, match="beta1"):
        LeanAdamW([torch.nn.Parameter(torch.zeros(2))], betas=(0.99, 0.95))


def test_lean_adamw_tracks_fp32_adamw():
    """On a small softmax-logit problem the lean optimizer (bf16 logits, 2 bytes of state) picks the same
    winners as fp32 AdamW."""
    target = torch.randn(64, 16, 6, generator=torch.Generator().manual_seed(1))

    def run(opt_cls, dtype):
        p = torch.nn.Parameter(torch.zeros(64, 16, 6, dtype=dtype))
        opt = opt_cls([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
        for _ in range(200):
            loss = ((torch.softmax(p.float() * 3, -1) - torch.softmax(target, -1)) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item(), p.detach().float()
    l32, p32 = run(torch.optim.AdamW, torch.float32)
    lean, plean = run(LeanAdamW, torch.bfloat16)
    assert (p32.argmax(-1) == plean.argmax(-1)).float().mean() > 0.99
    assert lean < 0.05 * float(((torch.softmax(torch.zeros(6), -1) - torch.softmax(target, -1)) ** 2).sum())


def _tensor_bytes(folder: Path, keep=lambda k: True) -> int:
    return sum(t.numel() * t.element_size() for f in folder.glob("*.safetensors")
               for k, t in read_safetensors(f).items() if keep(k))


def test_joint_state_is_6_bytes_per_masked_weight_and_the_checkpoint_goes_unless_kept(small_text, tmp_path):
    cfg = PruneConfig(sparsity=0.35, mode="joint", **FAST)
    res = prune("tiny:llama", [str(small_text)], tmp_path / "lean", cfg, progress=False, keep_checkpoint=True)
    weights = res.report["sparsity"]["masked_params"]
    tiles = sum(l["tiles"] for l in res.report["layers"])
    ck = tmp_path / "lean/checkpoint"
    # logits + optimizer state on disk: 4 bytes per pattern logit (1.5 per weight) + 12 per fp32 tile logit
    assert _tensor_bytes(ck) <= 6 * weights + 12 * tiles + 64 * len(res.report["layers"])
    assert res.report["training_state"]["bytes_per_masked_weight"] <= 6 + 12 * tiles / weights + 1e-3
    fp32 = prune("tiny:llama", [str(small_text)], tmp_path / "fp32", PruneConfig(**{**cfg.to_json(), "state": "fp32"}),
                 progress=False)
    assert fp32.report["training_state"]["bytes_per_masked_weight"] >= 18
    assert not (tmp_path / "fp32/checkpoint").exists()                            # removed: not asked to keep
    assert {p.name for p in (tmp_path / "fp32").iterdir()} == {"prune.json", "masks.safetensors", "log.jsonl"}


def test_stepping_in_backward_gives_the_same_masks(small_text, tmp_path):
    cfg = PruneConfig(sparsity=0.35, mode="joint", **FAST)
    a = prune("tiny:llama", [str(small_text)], tmp_path / "a", cfg, progress=False, step_in_backward=True)
    b = prune("tiny:llama", [str(small_text)], tmp_path / "b", cfg, progress=False, step_in_backward=False)
    ma, mb = read_safetensors(a.out_dir / "masks.safetensors"), read_safetensors(b.out_dir / "masks.safetensors")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def _agreement(a: Path, b: Path) -> tuple[float, float]:
    x, y = read_prune_dir(a), read_prune_dir(b)
    bm = sum(int((x.bitmaps[k] == y.bitmaps[k]).sum()) for k in x.bitmaps) / sum(v.numel() for v in x.bitmaps.values())
    pt = sum(int((x.patterns[k] == y.patterns[k]).sum()) for k in x.patterns) / sum(v.numel() for v in x.patterns.values())
    return bm, pt


def test_torchrun_two_processes_learn_the_masks_of_one_process_and_resume_anywhere(tmp_path):
    """The documented command: 2 gloo processes x batch 4 learn what one process learns with batch 8
    (same global batch, same seed); the sharded checkpoint resumes in a single process."""
    data = need(WIKI_VALID)
    torchrun = Path(sys.executable).with_name("torchrun")
    common = ["--sparsity", "0.35", "--mode", "joint", "--data", str(data), "--steps", "4", "--seq-len", "64",
              "--save-every", "2", "--quiet", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two"
    r = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "patchc", "prune", "tiny:llama",
                        *common, "--batch-size", "4", "--keep-checkpoint", "--out", str(two)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("sparsity 0.3") == 1                                    # rank 0 alone reports
    rep = json.loads((two / "prune.json").read_text())
    assert rep["processes"] == 2 and rep["tokens_trained"] == 4 * 2 * 4 * 64
    assert sorted(p.name for p in (two / "checkpoint").glob("*.safetensors")) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    one = tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "patchc", "prune", "tiny:llama", *common, "--batch-size", "8",
                        "--out", str(one)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    bm, pt = _agreement(two, one)
    assert bm >= 0.99 and pt >= 0.99, (bm, pt)
    # resume the 2-process checkpoint (step 4 of 4) in one process: nothing left to train, same masks
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for f in ("log.jsonl",):
        (resumed / f).write_bytes((two / f).read_bytes())
    (resumed / "checkpoint").mkdir()
    for f in (two / "checkpoint").iterdir():
        (resumed / "checkpoint" / f.name).write_bytes(f.read_bytes())
    r = subprocess.run([sys.executable, "-m", "patchc", "prune", "tiny:llama", *common, "--batch-size", "4",
                        "--resume", "--out", str(resumed)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _agreement(two, resumed) == (1.0, 1.0)


def test_lean_adamw_kernels_match_the_torch_update():
    """patchc/optim_kernels.py (one pass per tensor) computes optim.lean_step with the same hash noise: the new
    reference vref, the bf16 logits, int8 r and uint8 v codes; and plain fp32 AdamW for fp32 logits. The noise key
    and the hyper-parameters are read from device tensors (what a CUDA graph replays with new values)."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    from patchc import optim, optim_kernels

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g_ = torch.Generator().manual_seed(0)
    n = 5003                                                     # not a multiple of the block
    p = (torch.randn(n, generator=g_) * 0.1).bfloat16().to(dev)
    grad = (torch.randn(n, generator=g_) * 1e-3).bfloat16().to(dev)
    r = torch.randint(-127, 128, (n,), generator=g_, dtype=torch.int8).to(dev)
    vq = torch.randint(0, 256, (n,), generator=g_, dtype=torch.uint8).to(dev)
    vq[:100] = 0
    vref, b1, b2 = torch.tensor(1e-5, device=dev), 0.9, 0.95
    hp = torch.tensor([1e-3, b1, b2, 1e-8, 0.01, 1 - b1 ** 3, 1 - b2 ** 3, optim.r_bound(b1, b2)], device=dev)
    want_vref = (b2 * optim.decode_v(vq, vref) + (1 - b2) * grad.float() ** 2).max()
    got_vref = optim_kernels.new_vref(vq, grad, vref, hp)
    torch.testing.assert_close(got_vref, want_vref, rtol=1e-6, atol=0)
    keys = torch.zeros(3, dtype=torch.int64, device=dev)            # the optimizer's per-parameter key tensor
    for key in (hm.noise_key(0, 3, 5, 7), hm.noise_key(0, 4, 5, 7)):
        keys[1] = key                                                # written in place, read by the kernel
        want = optim.lean_step(p, grad, r, vq, vref, want_vref, torch.tensor(key, device=dev), hp)
        got = p.clone(), r.clone(), vq.clone()
        optim_kernels.lean_apply(got[0], grad, got[1], got[2], vref, want_vref, hp, keys[1])
        for a, ref in zip(got, want):
            same = (a == ref).float().mean().item()
            assert same > 0.999, same                                 # GPU log2/exp2 may round a few codes apart
            assert (a.float() - ref.float()).abs().max() <= (ref.float().abs().max() * 2 ** -7 if a.is_floating_point()
                                                             else 1)
    with pytest.raises(ValueError, match="int64"):
        optim_kernels.lean_apply(p, grad, r, vq, vref, want_vref, hp, keys[1].int())
    pf, gf = torch.randn(300, generator=g_).to(dev), torch.randn(300, generator=g_).to(dev)
    m, v = (torch.randn(300, generator=g_) * 0.1).to(dev), (torch.rand(300, generator=g_) * 0.1).to(dev)
    pr, mr, vr = pf.clone(), m.clone(), v.clone()
    mr.mul_(b1).add_(gf, alpha=1 - b1)
    vr.mul_(b2).addcmul_(gf, gf, value=1 - b2)
    pr.mul_(1 - 1e-3 * 0.01).addcdiv_(mr / 0.3, (vr / 0.2).sqrt_().add_(1e-8), value=-1e-3)
    optim_kernels.adamw_update(pf, gf, m, v, torch.tensor([1e-3, b1, b2, 1e-8, 0.01, 0.3, 0.2, 0.0], device=dev))
    for got, ref in ((pf, pr), (m, mr), (v, vr)):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def test_training_kernels_compile_for_hopper_in_float32():
    """Every mask / optimizer kernel compiles for sm_90 without a GPU, and none computes in float64 (a Python
    constant below float32's normal range once made a whole update float64: Triton 3.6 then failed to build it).
    tests/kernel_compile_check.py runs in a process without TRITON_INTERPRET (the interpreter does not compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tests" / "kernel_compile_check.py")], env=env, capture_output=True,
                       text=True, cwd=root)
    if r.returncode == 3:
        pytest.skip("no ptxas for Triton's CUDA backend")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("compiled") == 6
