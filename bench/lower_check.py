"""Lower a prune run, load it with patchc.load, and check it against the prune run (GPU or CPU).

    python bench/lower_check.py PRUNE_DIR --out DIR [--device cuda]
Writes DIR/lower_check.json: PPL of the loaded checkpoint vs the masked model's PPL recorded by the
prune run (same file, windows, length), a greedy generation, and on-disk / in-memory size ratios.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import patchc
from patchc.evaluate import hf_logits_fn, perplexity_of_file
from patchc.lower import lower, memory_report


def folder_bytes(d: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.name.endswith(suffix))


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("prune_dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", default="The capital of France is")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rep = json.loads((Path(a.prune_dir) / "prune.json").read_text())
    t0 = time.time()
    manifest = lower(a.prune_dir, out / "packed", overwrite=True)
    lower(a.prune_dir, out / "dense", fmt="dense", overwrite=True)
    t_lower = time.time() - t0
    model = patchc.load(out / "packed", device=a.device)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "packed")
    final = rep["ppl"]["final"]
    res = {"prune_dir": a.prune_dir, "model": rep["model"], "sparsity": manifest["sparsity"], "lower_s": round(t_lower, 1)}
    if final:
        ppl = perplexity_of_file(hf_logits_fn(model), tok, final["file"], seq_len=final["seq_len"], device=a.device,
                                 progress=False)
        res["ppl_loaded"] = ppl["ppl"]
        res["ppl_masked_prune_run"] = final["ppl"]
        res["ppl_rel_diff"] = abs(ppl["ppl"] - final["ppl"]) / final["ppl"]
        res["ppl_eval"] = f"{ppl['windows']} windows of {ppl['seq_len']}"
    ids = tok(a.prompt, return_tensors="pt").to(a.device)
    gen = model.generate(**ids, max_new_tokens=40, do_sample=False)
    res["generation"] = tok.decode(gen[0], skip_special_tokens=True)
    mem = memory_report(model)
    total = model_bytes(model)
    dense_total = total - mem["packed_bytes"] + mem["dense_bytes"]  # the same model with dense linears
    res["memory"] = {"hybrid_layers_ratio": mem["ratio"], "hybrid_packed_MB": mem["packed_bytes"] / 1e6,
                     "hybrid_dense_MB": mem["dense_bytes"] / 1e6, "model_MB": total / 1e6,
                     "dense_model_MB": dense_total / 1e6, "model_ratio": total / dense_total}
    disk_packed, disk_dense = folder_bytes(out / "packed"), folder_bytes(out / "dense")
    res["disk"] = {"packed_MB": disk_packed / 1e6, "dense_MB": disk_dense / 1e6, "ratio": disk_packed / disk_dense}
    (out / "lower_check.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
