"""Prefill of a whole model as a captured forward: dense + inductor vs patch, torch.compile with CUDA graphs.

generate() runs its prefill eagerly (bench/e2e.py measures that); a server that captures its prefill forward
(or a user who compiles the forward with mode="reduce-overhead") runs every hybrid layer inside a CUDA graph,
where all-2:4 layers take the cuSPARSELt engine. This times that: the LLaMA-2-7B-shaped random model of
bench/e2e.py (--layers to shorten it), one forward over [batch, prompt] tokens without a KV cache, median of
CUDA-event timings after warm-up, every row checked against the row's own eager logits first.

    python bench/prefill_e2e.py --out bench/results/prefill_e2e [--layers 8] [--rows dense,patch-0.5,...]
    python bench/prefill_e2e.py --quick --device cpu --out /tmp/p      # tiny shape, for tests

A row is `dense`, `patch-S` (sparsity S), or `patch-S-nocslt` (the same with PATCHC_CSLT=0).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from e2e import QUICK, SEVEN_B, build, hybridize_, model_args  # bench/e2e.py
from report import machine_env, write_report  # bench/report.py


def time_forward(f, ids, device, reps: int) -> float:
    """Median ms of f(ids) (CUDA events on the GPU)."""
    times = []
    for _ in range(reps):
        if str(device).startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f(ids)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            f(ids)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def run_row(label: str, a, shape: dict, ids, dtype) -> dict:
    cuda = str(a.device).startswith("cuda")
    os.environ["PATCHC_CSLT"] = "0" if label.endswith("-nocslt") else "1"
    torch._dynamo.reset()
    model = build(shape, a.device, dtype)
    model.config.use_cache = False
    backend, info = "inductor", {}
    if label.startswith("patch"):
        import patchc  # noqa: F401  (registers the backend)

        info = hybridize_(model, float(label.split("-")[1]), a.tile)
        backend = "patch"
    eager = model(ids).logits.float()
    compiled = torch.compile(model, backend=backend, mode="reduce-overhead" if cuda else None)

    def f(x):
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(input_ids=x).logits

    t0 = time.perf_counter()
    out = f(ids).float()
    first = time.perf_counter() - t0
    for _ in range(3):  # cudagraph trees: warm-up run, recording, then replays
        f(ids)
    err = ((out - eager).norm() / eager.norm()).item()
    ms = time_forward(f, ids, a.device, a.reps)
    tokens = ids.numel()
    r = {"row": label, "prefill_ms": round(ms, 3), "tokens_per_s": round(tokens / ms * 1e3, 1),
         "first_call_s": round(first, 2), "rel_err_vs_eager": err, "per_layer_sparsity": info}
    model = compiled = None  # release the row's model and graphs before the next row
    if cuda:
        torch.cuda.empty_cache()
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    model_args(ap)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's, 32 for 7B)")
    ap.add_argument("--rows", default="dense,patch-0.5,patch-0.5-nocslt,patch-0.45")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    shape = dict(QUICK if a.quick else SEVEN_B)
    if a.quick:
        a.batch, a.prompt, a.tile, a.reps = 2, 16, 64, 3
    if a.layers:
        shape["layers"] = a.layers
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    ids = torch.randint(0, shape["vocab"], (a.batch, a.prompt), device=a.device)
    rows = []
    for label in a.rows.split(","):
        r = run_row(label, a, shape, ids, dtype)
        print(r, flush=True)
        rows.append(r)
    base = next((r["prefill_ms"] for r in rows if r["row"] == "dense"), None)
    for r in rows:
        r["speedup_vs_dense"] = round(base / r["prefill_ms"], 3) if base else None
    env = {**machine_env(a.device), "shape": shape, "batch": a.batch, "prompt": a.prompt, "tile": a.tile}
    text = write_report(a.out, "prefill_e2e", f"Prefill as a captured forward ({env['device']}, {shape['layers']} layers "
                        f"of {shape['hidden']}/{shape['ffn']}, batch {a.batch} x {a.prompt} tokens)",
                        [("row", "row"), ("prefill ms", "prefill_ms"), ("tokens/s", "tokens_per_s"),
                         ("speedup vs dense", "speedup_vs_dense"), ("first call s", "first_call_s"),
                         ("rel err vs eager", lambda r: f"{r['rel_err_vs_eager']:.1e}")], rows, env)
    print(text)


if __name__ == "__main__":
    main()
