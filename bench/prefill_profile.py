"""Where an eager 7B-shape prefill spends its time: the decoder forward of bench/e2e.py's model (batch 16 x 128
tokens, M = 2048 per linear), hybrid at given sparsities, timed eagerly (best of REPS, variants alternating) and
profiled once per variant (CUDA time by kernel).

Variants: the defaults; SiLU(gate) * up after the wgmma GEMM in torch instead of in its epilogue; PATCHC_WGMMA=0.

    python bench/prefill_profile.py --out DIR [--sparsities 0.25,0.45]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import patchc  # noqa: F401  (registers the op)
from patchc.codegen import launch as launch_mod

from e2e import SEVEN_B, build, hybridize_  # bench/e2e.py

REPS = 5
FUSES = launch_mod.wgmma_fuses_silu


def variant(name: str) -> None:
    launch_mod.wgmma_fuses_silu = FUSES if name != "silu_in_torch" else (lambda sched: False)
    if name == "no_wgmma":
        os.environ["PATCHC_WGMMA"] = "0"
    else:
        os.environ.pop("PATCHC_WGMMA", None)


def forward_ms(model, ids) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.model(input_ids=ids, use_cache=False)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sparsities", default="0.25,0.45")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(0)
    ids = torch.randint(0, SEVEN_B["vocab"], (16, 128), device="cuda")
    names = ["default", "silu_in_torch", "no_wgmma"]
    rows = []
    for s in map(float, a.sparsities.split(",")):
        model = build(SEVEN_B, "cuda", torch.bfloat16)
        info = hybridize_(model, s, 128)
        for name in names:            # warm-up: first calls pick configs, build nothing new
            variant(name)
            forward_ms(model, ids)
        times = {n: [] for n in names}
        for _ in range(REPS):
            for name in names:
                variant(name)
                times[name].append(forward_ms(model, ids))
        row = {"sparsity": s, "layers": info, **{f"{n}_ms": round(min(t), 2) for n, t in times.items()}}
        for name in names:
            variant(name)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                forward_ms(model, ids)
            kern = {}
            for e in prof.key_averages():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    kern[e.key[:90]] = round(e.device_time_total / 1e3, 2)
            row[f"{name}_kernels_ms"] = dict(sorted(kern.items(), key=lambda kv: -kv[1])[:12])
        variant("default")
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("kernels_ms")}), flush=True)
        for name in names:
            print(f"  {name}: " + "; ".join(f"{k} {v}" for k, v in list(row[f'{name}_kernels_ms'].items())[:6]),
                  flush=True)
        del model
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "prefill_profile.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
