"""Prefill (large M): the TMA prefill kernel vs decompress + cuBLAS vs cuBLAS dense (GPU, sm_90+).

    python bench/prefill_check.py [--ms 2048] [--sparsities 0,0.25,0.5] [--pointer]
For each LLaMA-2-7B shape, M and sparsity: each kernel config's error against float64 and its time, the
decompress + cuBLAS time and cuBLAS dense on the same weight. --pointer adds the pointer-load fused kernel's
configs (0.46-0.61x cuBLAS at M=2048, results/prefill/fused_vs_decompress.log). Used to choose the prefill
path (bench/NOTES.md).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from kernel_bench import make_layer, rotating_copies  # bench/kernel_bench.py
from mma_sp_check import err, parse_shapes  # bench/mma_sp_check.py

from patchc.codegen.launch import KernelConfig, graph_time_ms, launch

POINTER = [KernelConfig(128, 128, 1, 8, 3), KernelConfig(128, 128, 1, 8, 4), KernelConfig(128, 64, 1, 4, 4),
           KernelConfig(64, 128, 1, 4, 4), KernelConfig(128, 128, 1, 4, 3), KernelConfig(256, 128, 1, 8, 2)]
TMA = [KernelConfig(bm, bn, sk, w, s, engine="tma", block_k=bk) for bm, bn, bk, sk, w, s in
       ((128, 128, 64, 1, 4, 4), (256, 128, 128, 1, 8, 2), (64, 128, 64, 1, 4, 4), (128, 64, 64, 1, 4, 4),
        (64, 128, 64, 2, 4, 4), (64, 128, 64, 4, 4, 4), (64, 64, 64, 2, 4, 4), (64, 64, 64, 4, 4, 4),
        (128, 128, 64, 2, 4, 4))]
CHUNKED = [KernelConfig(0, 0, 0, 4, 1, chunk_n=c) for c in (4096, 2048, 1024, 512)]


def name_of(cfg: KernelConfig) -> str:
    if cfg.engine == "tma":
        return f"tma {cfg.block_m}x{cfg.block_n}x{cfg.block_k} split{cfg.split_k} w{cfg.num_warps} s{cfg.num_stages}"
    if cfg.split_k == 0:
        return f"decompress {cfg.chunk_n} rows at a time+cuBLAS" if cfg.chunk_n else "decompress+cuBLAS"
    return f"pointer {cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="2048")
    ap.add_argument("--sparsities", default="0,0.25,0.5")
    ap.add_argument("--pointer", action="store_true")
    ap.add_argument("--tma", action="store_true", help="also the Triton TMA kernel (0.68x cuBLAS at best, all dense)")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    a = ap.parse_args()
    summary = []
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
                for cfg in (POINTER if a.pointer else []) + (TMA if a.tma else []) + CHUNKED + [KernelConfig(0, 0, 0, 4, 1)]:
                    name = name_of(cfg)
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
                best = max((t_cub / float(r.split()[0]), nm) for nm, r in res.items() if not r.startswith("fails"))
                summary.append(f"{n}x{k} M={m} s={s}: best {best[1]} {best[0]:.2f}x cuBLAS, "
                               f"decompress+cuBLAS {res['decompress+cuBLAS'].split('(')[1].split(',')[0]}")
                del copies
                torch.cuda.empty_cache()
    print("\nsummary")
    for line in summary:
        print("  " + line)


if __name__ == "__main__":
    main()
