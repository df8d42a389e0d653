"""Integration on the real SmolLM2-135M (GGUF from ../shared/assets)."""
import json

import pytest

from conftest import SMOLLM2, need
from patchc import PruneConfig, prune

pytestmark = pytest.mark.slow


def test_smollm2_prune_tile_mode(wiki_valid, wiki_test, tmp_path, switches):
    switches(smollm2=need(SMOLLM2))
    cfg = PruneConfig(sparsity=0.35, mode="tile", steps=2, seq_len=128, batch_size=1, calib_samples=4)
    res = prune("smollm2-135m", [str(wiki_valid)], tmp_path / "o", cfg, progress=False, eval_ppl=str(wiki_test),
                eval_seq_len=512, eval_windows=4)
    rep = json.loads((tmp_path / "o/prune.json").read_text())
    assert rep["architecture"] == "LlamaForCausalLM"
    assert rep["tile"] == 64  # 576 is not a multiple of 128: auto picks 64
    assert len(rep["layers"]) == 30 * 7 and {g["kind"] for g in rep["groups"]} == {"qkv", "gate_up"}
    assert abs(rep["sparsity"]["achieved"] - 0.35) <= rep["sparsity"]["one_tile"]
    # dense baseline of the shared assets README: PPL 30.23 on the first 4x512 tokens of WikiText-2
    assert rep["ppl"]["dense"]["ppl"] == pytest.approx(30.23, abs=0.05)
    assert rep["ppl"]["final"]["ppl"] > rep["ppl"]["dense"]["ppl"]
    assert res.report["skipped"][0]["reason"].startswith("weight shared with an embedding")

    # lower both ways; the packed checkpoint loads and equals the masked model (tied lm_head kept)
    import torch
    from transformers import AutoModelForCausalLM

    from patchc.lower import load, lower, memory_report
    from patchc.runtime import hybrid_layers

    manifest = lower(tmp_path / "o", tmp_path / "packed")
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    lower(tmp_path / "o", tmp_path / "dense", fmt="dense")
    packed = load(tmp_path / "packed")
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert len(hybrid_layers(packed)) == 210
    ids = torch.randint(0, 49152, (1, 32))
    torch.testing.assert_close(packed(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    assert memory_report(packed)["ratio"] < 0.75
