"""The training step's static-input plumbing (every per-step value in a device tensor written in place) and its
CUDA-graph replay (patchc/step_graph.py): same results as the step written with fresh Python values; refusals."""
import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

from patchc import PruneConfig, config, prune
from patchc import mask as hm
from patchc import step_graph
from patchc.io import read_safetensors
from patchc.models import load_model
from patchc.train import TrainStep, make_optimizer, mask_graph, opt_params

SEQ, BATCH = 32, 2


def _run(mode: str, steps: int, grad_accum: int, kernels: bool, device="cpu", graphs=False, trainer_step=True,
         coef_lag=0, include=()):
    """(per-step losses, mask logits + optimizer state after `steps`) of tiny:llama, through TrainStep
    (trainer_step) or through _reference_step (coef_lag: its weight-norm coefficient that many steps stale)."""
    cfg = PruneConfig(sparsity=0.35, mode=mode, oneshot="magnitude", steps=steps, seq_len=SEQ, batch_size=BATCH,
                      grad_accum=grad_accum, distill=1.0, lr=2e-2, warmup=1, include=include)
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with config.override(kernels_on_cpu=kernels):
        model = load_model("tiny:llama", device=device, dtype=dtype, seed=0).model
        for p in model.parameters():
            p.requires_grad_(False)
        ids = torch.randint(0, model.config.vocab_size, (steps * grad_accum, BATCH, SEQ), generator=g)
        mg = mask_graph(model, cfg, ids[0, :1].to(device), device)
        assert mg.state.kernels == kernels
        opt = make_optimizer(mg.nodes, cfg)
        losses = []
        if trainer_step:
            ts = TrainStep(mg.gm, mg.nodes, mg.state, cfg, opt, (BATCH, SEQ), mg.weight_norm, device, graphs=graphs)
            for step in range(steps):
                sums, bad = ts.run(step, lambda micro, step=step: ids[step * grad_accum + micro])
                assert bad is None
                losses.append(sums["loss"])
            if graphs:
                assert ts.graph is not None and ts.replays == steps - step_graph.WARMUP_STEPS
                if isinstance(ts.graph, _EagerGraph):
                    assert ts.graph.calls == (["micro-step"] * grad_accum + ["optimizer"]) * ts.replays
        else:
            for step in range(steps):
                losses.append(_reference_step(mg, opt, cfg, ids, step, device, coef_lag))
    state = {f"p{i}": p.detach().clone() for i, p in enumerate(opt_params(mg.nodes))}
    for i, p in enumerate(opt_params(mg.nodes)):
        state.update({f"p{i}/{k}": v.clone() for k, v in opt.state[p].items()})
    return losses, state


def _reference_step(mg, opt, cfg: PruneConfig, ids, step: int, device, coef_lag: int = 0) -> float:
    """The prune step as written before the static-input plumbing: the weight-norm coefficient a Python float,
    fresh knob / key / input-id tensors every step and micro-batch (nothing reused in place)."""
    st, nodes, ga = mg.state, mg.nodes, cfg.grad_accum
    st.mode = "soft"
    st.tau = hm.linear_schedule(*cfg.tau, step, cfg.steps)
    st.scale_tile = hm.linear_schedule(*cfg.scale_tile, step, cfg.steps)
    st.scale_24 = hm.linear_schedule(*cfg.scale_24, step, cfg.steps)
    for group in opt.param_groups:
        group["lr"] = hm.cosine_lr(cfg.lr, step, cfg.steps, cfg.warmup)
    opt.zero_grad(set_to_none=True)
    numel = torch.tensor([float(n.numel) for n in nodes], device=device)
    total = 0.0
    for micro in range(ga):
        keys = [[hm.noise_key(st.seed, step, micro, i, s) for s in (0, 1)] for i in range(len(nodes))]
        st.step, st.micro, st.keys_int = step, micro, [tuple(k) for k in keys]
        st.keys = torch.tensor(keys, dtype=torch.int64, device=device)                  # a new tensor
        want = (st.scale_tile, st.scale_24, st.tau)
        st.knobs, st._knobs_for = torch.tensor(want, dtype=torch.float32, device=device), want
        x = ids[step * ga + micro].to(device)
        with torch.no_grad():
            st.mode = "off"
            teacher = mg.gm(x).float()
            st.mode = "soft"
        logits = mg.gm(x)
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
        kl = F.kl_div(F.log_softmax(logits.float(), -1).flatten(0, 1), F.log_softmax(teacher, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
        density = ((0.5 + 0.5 * torch.stack([n.last_gate for n in nodes])) * numel).sum() / numel.sum()
        kept_norm = torch.stack([n.last_norm for n in nodes]).sum() / mg.weight_norm
        loss = (ce + cfg.distill * kl + cfg.sparse_reg * (density - (1.0 - cfg.sparsity)).abs()
                - cfg.weight_reg * (1.0 - max(step - coef_lag, 0) / cfg.steps) * kept_norm)
        (loss / ga).backward()
        total += loss.item() / ga
    opt.step()
    return total


def _assert_same(a, b):
    (la, sa), (lb, sb) = a, b
    assert la == lb
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("mode", ["tile", "joint"])
def test_static_input_step_equals_the_step_with_fresh_python_values(mode):
    """TrainStep (eager; the path a CUDA graph captures) writes the knobs, noise keys, optimizer hp / keys, the
    weight-norm coefficient and the ids into persistent tensors in place: over 3 steps of 2 micro-batches with
    distillation, losses, mask logits and optimizer state are bit-identical to the step with fresh values."""
    got = _run(mode, 3, 2, kernels=False)
    _assert_same(got, _run(mode, 3, 2, kernels=False, trainer_step=False))
    # the comparison sees a value left stale in its tensor: the coefficient one step late changes the result
    with pytest.raises(AssertionError):
        _assert_same(got, _run(mode, 3, 2, kernels=False, trainer_step=False, coef_lag=1))


def test_static_input_step_on_the_kernels_equals_the_step_with_fresh_values():
    """The same on the Triton mask and fp32 AdamW kernels (keys, hp read from device memory), under the interpreter
    (PATCH-Tile, the first layer's MLP masked only: interpreted kernels are slow; the joint kernels and the lean
    update are checked against their references in test_lean_training.py)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (the kernels on the CPU)")
    mlp = (r"layers\.0\.mlp",)
    _assert_same(_run("tile", 2, 2, kernels=True, include=mlp),
                 _run("tile", 2, 2, kernels=True, trainer_step=False, include=mlp))


class _EagerGraph:
    """step_graph.StepGraph without CUDA: "captures" by remembering the name and runs the closure at every call, so
    the replay path's own logic (static gradients accumulated then zeroed in the update, the optimizer split into
    begin_step / finish_step, the static outputs) runs on the CPU."""

    def __init__(self, device):
        self.graphs, self.capture_s, self.calls = {}, 0.0, []

    def side_stream(self):
        import contextlib

        return contextlib.nullcontext()

    def run(self, name, fn):
        self.graphs[name] = True
        self.calls.append(name)
        fn()


def test_the_replay_path_computes_the_eager_step(monkeypatch):
    """TrainStep's replay path (what the CUDA graphs capture), run eagerly on the CPU: 3 warm-up steps, then 2
    steps of 2 micro-batches through the captured closures, give the eager run's logits and optimizer state bit
    for bit, and its losses to float32 rounding (summed on the device)."""
    import patchc.train as tr

    monkeypatch.setattr(step_graph, "StepGraph", _EagerGraph)
    monkeypatch.setattr(tr, "graph_blocker", lambda nodes, opt: None)   # the torch-op path stands in for kernels
    steps = step_graph.WARMUP_STEPS + 2
    eager = _run("joint", steps, 2, kernels=False)
    replayed = _run("joint", steps, 2, kernels=False, graphs=True)
    assert eager[0][:step_graph.WARMUP_STEPS] == replayed[0][:step_graph.WARMUP_STEPS]
    torch.testing.assert_close(torch.tensor(replayed[0]), torch.tensor(eager[0]), rtol=1e-6, atol=1e-6)
    _assert_same(([], eager[1]), ([], replayed[1]))


def test_cuda_graphs_are_refused_where_they_cannot_apply(small_text, tmp_path):
    ok = dict(compile=False, step_in_backward=None, world=1, mask_kernels=True)
    assert step_graph.refusal("cuda", **ok) is None
    assert step_graph.refusal("cuda:0", **{**ok, "step_in_backward": False}) is None
    for change, words in [(dict(compile=True), "compile"), (dict(step_in_backward=True), "step_in_backward"),
                          (dict(world=2), "torchrun"), (dict(mask_kernels=False), "PATCHC_MASK_KERNELS=0")]:
        why = step_graph.refusal("cuda", **{**ok, **change})
        assert why and words in why and "--cuda-graphs" in why, why
    assert "CUDA device" in step_graph.refusal("cpu", **ok)
    # asked for in the config: refused before anything is loaded or created
    cfg = PruneConfig(sparsity=0.35, steps=2, seq_len=32, batch_size=2, calib_samples=2, cuda_graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        prune("tiny:llama", [str(small_text)], tmp_path / "o", cfg, device="cpu", progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="cuda_graphs must be True or False"):
        PruneConfig(cuda_graphs="yes").validate()


def test_cuda_graphs_from_the_environment_fall_back_to_eager_on_the_cpu(small_text, tmp_path, capsys):
    """PATCHC_CUDA_GRAPHS=1 where graphs cannot apply: the run goes on eagerly, says why, learns the same masks;
    cuda_graphs is in prune.json but changes nothing learned (a run resumes with it on or off)."""
    cfg = PruneConfig(sparsity=0.35, steps=2, seq_len=32, batch_size=2, calib_samples=2)
    with config.override(cuda_graphs=True):
        a = prune("tiny:llama", [str(small_text)], tmp_path / "a", cfg, device="cpu", progress=True)
    said = capsys.readouterr()
    assert "PATCHC_CUDA_GRAPHS=1 ignored: CUDA graphs need a CUDA device" in said.out + said.err
    b = prune("tiny:llama", [str(small_text)], tmp_path / "b", cfg, device="cpu", progress=False)
    assert a.report["config"]["cuda_graphs"] is False
    ma, mb = read_safetensors(a.out_dir / "masks.safetensors"), read_safetensors(b.out_dir / "masks.safetensors")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode,grad_accum", [("tile", 1), ("joint", 2)])
def test_cuda_graph_replay_equals_the_eager_step(mode, grad_accum):
    """On a GPU: 3 eager warm-up steps, then the captured micro-step and optimizer graphs replayed for 3 steps,
    give the eager run's losses and mask logits (same kernels, same inputs)."""
    steps = step_graph.WARMUP_STEPS + 3
    eager = _run(mode, steps, grad_accum, kernels=True, device="cuda")
    graphed = _run(mode, steps, grad_accum, kernels=True, device="cuda", graphs=True)
    torch.testing.assert_close(torch.tensor(graphed[0]), torch.tensor(eager[0]), rtol=1e-5, atol=1e-5)
    for k in eager[1]:
        a, b = eager[1][k], graphed[1][k]
        if a.is_floating_point():     # the same kernels on the same inputs: expected bit-identical, allowed a
            torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-3, msg=k)   # bf16 rounding apart
        else:
            assert (a == b).float().mean() > 0.99, k
    n_exact = sum(torch.equal(eager[1][k], graphed[1][k]) for k in eager[1])
    print(f"{n_exact}/{len(eager[1])} tensors bit-identical")


class _Stop(Exception):
    pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_prune_with_cuda_graphs_resumes_and_learns_the_eager_masks(small_text, tmp_path, monkeypatch):
    """`prune(cuda_graphs=True)` on a GPU: stopped after step 4 (checkpoint every 2 steps), resumed with graphs on
    (the checkpoint is loaded before the warm-up and the capture), it ends with the masks of an uninterrupted
    eager run; log.jsonl has every step."""
    import patchc.train as tr

    cfg = PruneConfig(sparsity=0.35, mode="joint", steps=10, seq_len=64, batch_size=2, calib_samples=2)
    eager = prune("tiny:llama", [str(small_text)], tmp_path / "eager", cfg, device="cuda", progress=False)
    graphs = dataclasses.replace(cfg, cuda_graphs=True)
    real = tr.TrainStep.run

    def stop_at_4(self, step, batch):
        if step == 4:
            raise _Stop()
        return real(self, step, batch)
    monkeypatch.setattr(tr.TrainStep, "run", stop_at_4)
    with pytest.raises(_Stop):
        prune("tiny:llama", [str(small_text)], tmp_path / "g", graphs, device="cuda", progress=False, save_every=2)
    monkeypatch.setattr(tr.TrainStep, "run", real)
    res = prune("tiny:llama", [str(small_text)], tmp_path / "g", graphs, device="cuda", progress=False, save_every=2,
                resume=True)
    log = [json.loads(line) for line in (tmp_path / "g/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))
    assert res.report["config"]["cuda_graphs"] is True
    ma = read_safetensors(eager.out_dir / "masks.safetensors")
    mb = read_safetensors(res.out_dir / "masks.safetensors")
    same = [float((ma[k] == mb[k]).float().mean()) for k in ma if not k.endswith("tile_logits")]
    assert min(same) >= 0.99, same
