"""Eager (uncompiled) cost of one hybrid linear call on the GPU: host time per call against the kernel's GPU time.

    python bench/eager_overhead.py [--shapes 4096x4096,11008x4096] [--ms 1,16,2048] [--sparsity 0.45]

For each case: `host us` = wall time of N back-to-back calls without a sync / N (what Python, the dispatcher and
the launch cost on the CPU), `eager us` = the same with a sync at the end (the larger of host and GPU time is
what an uncompiled model pays), `gpu us` = the kernel alone replayed in a CUDA graph; for HybridLinear also the
layers below it (the custom op, get_config + launch, the launcher) so the host cost can be attributed;
nn.Linear on a dense weight of the same shape for comparison.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from patchc.codegen.launch import get_config, graph_time_ms, launch
from patchc.runtime import HybridLinear, schedule_for

from kernel_sweep import make_layer  # bench/kernel_sweep.py
from report import machine_env  # bench/report.py


def host_and_wall_us(fn, n: int = 200) -> tuple[float, float]:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e6
    return host, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--ms", default="1,16,2048")
    ap.add_argument("--sparsity", type=float, default=0.45)
    a = ap.parse_args()
    print(json.dumps(machine_env("cuda")), flush=True)
    print("N x K M | what | host us | eager us | gpu us", flush=True)
    for nk in a.shapes.split(","):
        n, k = map(int, nk.split("x"))
        for m in map(int, a.ms.split(",")):
            x, d, v, e, sched, ref, p = make_layer(n, k, m, a.sparsity)
            layer = HybridLinear(p, name="probe").cuda()
            y = layer(x)
            assert ((y.double() - ref).norm() / ref.norm()).item() < 1.5e-2
            key = layer._schedule_key
            sched = schedule_for(layer.bitmap, layer.tile, key)
            cfg = get_config(x, layer.dense, layer.values, layer.meta, sched, None, n)
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=x.dtype)
            rows = {
                "nn.Linear (dense)": lambda: lin(x),
                "HybridLinear": lambda: layer(x),
                "torch.ops.patchc.hybrid_mm": lambda: torch.ops.patchc.hybrid_mm(
                    x, layer.bitmap, layer.dense, layer.values, layer.meta, None, n, k, layer.tile, key),
                "get_config + launch": lambda: launch(x, layer.dense, layer.values, layer.meta, sched, None, n,
                                                       get_config(x, layer.dense, layer.values, layer.meta, sched,
                                                                  None, n)),
                f"launch ({cfg.engine})": lambda: launch(x, layer.dense, layer.values, layer.meta, sched, None, n, cfg),
            }
            gpu = {"nn.Linear (dense)": graph_time_ms([lambda: lin(x)]) * 1e3}
            gpu["HybridLinear"] = graph_time_ms([lambda: launch(x, layer.dense, layer.values, layer.meta, sched, None,
                                                                n, cfg)]) * 1e3
            for name, fn in rows.items():
                host, wall = host_and_wall_us(fn)
                g = f"{gpu[name]:.1f}" if name in gpu else ""
                print(f"{n}x{k} M={m} | {name} | {host:.1f} | {wall:.1f} | {g}", flush=True)
            del layer, lin
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
