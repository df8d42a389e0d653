"""GPU check of the `patch` backend: a lowered tiny model compiled with CUDA graphs matches eager, and
generate() works on it; prints cold and warm compile times.   python bench/backend_check.py --out DIR"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import patchc
import patchc.backend as backend
from patchc import PruneConfig, prune
from patchc.lower import lower


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default="bench/README.md")
    ap.add_argument("--archs", default="llama,qwen2")
    a = ap.parse_args()
    out = Path(a.out)
    res = {}
    for arch in a.archs.split(","):
        prune(f"tiny:{arch}", [a.data], out / f"p_{arch}", PruneConfig(sparsity=0.35, steps=2, seq_len=64, batch_size=2,
              calib_samples=2), progress=False, overwrite=True)
        lower(out / f"p_{arch}", out / f"ck_{arch}", dtype=torch.bfloat16, overwrite=True)
        model = patchc.load(out / f"ck_{arch}", device="cuda")
        ids = torch.randint(0, 256, (16, 64), device="cuda")
        ref = model(input_ids=ids).logits.float()
        torch._dynamo.reset()
        t0 = time.perf_counter()
        cm = torch.compile(model, backend="patch", mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up runs, then CUDA-graph replays
            got = cm(input_ids=ids).logits.float()
        torch.cuda.synchronize()
        cold = time.perf_counter() - t0
        err = ((got - ref).norm() / ref.norm()).item()
        assert err < 2e-2, f"{arch}: compiled vs eager rel err {err}"
        torch._dynamo.reset()
        t0 = time.perf_counter()
        cm = torch.compile(model, backend="patch", mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            cm(input_ids=ids)
        torch.cuda.synchronize()
        warm = time.perf_counter() - t0
        # decode-sized forward (M = 2 x 8 = 16 tokens: the mma.sp kernel, captured, so launched as programmatic
        # dependents) against eager
        small = ids[:2, :8]
        ref_small = model(input_ids=small).logits.float()
        for _ in range(3):
            got_small = cm(input_ids=small).logits.float()
        err_small = ((got_small - ref_small).norm() / ref_small.norm()).item()
        assert err_small < 2e-2, f"{arch}: decode-sized compiled vs eager rel err {err_small}"
        from transformers import CompileConfig

        model.generation_config.compile_config = CompileConfig(backend="patch", mode="reduce-overhead")
        gen = model.generate(ids[:2, :8], max_new_tokens=8, do_sample=False, pad_token_id=256,
                             cache_implementation="static")
        model.generation_config.compile_config = None
        want = model.generate(ids[:2, :8], max_new_tokens=8, do_sample=False, pad_token_id=256)
        res[arch] = {"rel_err_vs_eager": err, "decode_sized_rel_err_vs_eager": err_small,
                     "generate_tokens_equal_eager": bool(torch.equal(gen, want)), "swapped": len(backend.LAST_REPORT.swapped),
                     "cold_compile_s": round(cold, 2), "warm_compile_s": round(warm, 2), "generate_shape": list(gen.shape)}
        print(arch, res[arch], flush=True)
    (out / "backend_check.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
