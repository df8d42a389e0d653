"""Prefill (large M) on the fused Triton kernel vs decompress + cuBLAS vs cuBLAS dense (GPU).

    python bench/prefill_check.py [--ms 2048] [--sparsities 0,0.05]
For each LLaMA-2-7B shape, M and sparsity: the fused kernel's error against float64 and its time at each
candidate config, the decompress + cuBLAS time and cuBLAS dense on the same weight. Used to choose where
the prefill path runs the fused kernel (bench/NOTES.md).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from kernels import make_layer, rotating_copies  # bench/kernels.py
from mma_sp_check import err, parse_shapes  # bench/mma_sp_check.py

from patchc.codegen.launch import KernelConfig, graph_time_ms, launch

CONFIGS = [KernelConfig(128, 128, 1, 8, 3), KernelConfig(128, 128, 1, 8, 4), KernelConfig(128, 64, 1, 4, 4),
           KernelConfig(64, 128, 1, 4, 4), KernelConfig(128, 128, 1, 4, 3), KernelConfig(256, 128, 1, 8, 2)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="2048")
    ap.add_argument("--sparsities", default="0,0.05")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    a = ap.parse_args()
    for n, k in parse_shapes(a.shapes):
        for m in map(int, a.ms.split(",")):
            wd = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            xx = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_cub = graph_time_ms([lambda w=wd: F.linear(xx, w)]) * 1e3
            del wd
            for s in map(float, a.sparsities.split(",")):
                x, d, v, e, sched, ref, p = make_layer(n, k, m, s)
                copies = rotating_copies((d, v, e), p.nbytes, 100 << 20)
                res = {}
                for cfg in CONFIGS + [KernelConfig(0, 0, 0, 4, 1)]:
                    name = "decompress+cuBLAS" if cfg.split_k == 0 else \
                        f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
                    try:
                        y = launch(x, d, v, e, sched, None, n, cfg, poison=True)
                        torch.cuda.synchronize()
                    except Exception as ex:  # noqa: BLE001 - report configs Triton cannot compile, go on
                        res[name] = f"fails: {type(ex).__name__}: {str(ex).splitlines()[0][:80]}"
                        continue
                    rel = err(y, ref)
                    us = graph_time_ms([lambda c=c, cfg=cfg: launch(x, *c, sched, None, n, cfg) for c in copies]) * 1e3
                    res[name] = f"{us:.1f} us ({t_cub / us:.2f}x cuBLAS, err {rel:.1e})"
                print(f"{n}x{k} M={m} s={s} cuBLAS {t_cub:.1f} us", flush=True)
                for name, r in res.items():
                    print(f"    {name}: {r}", flush=True)
                del copies
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
