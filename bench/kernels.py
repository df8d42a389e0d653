"""Hybrid kernel vs cuBLAS dense vs the byte floor, on the GPU (one call; see bench/README.md).

For every shape / M / sparsity: pack a random bf16 weight with a random bitmap holding exactly that
share of 2:4 tiles, check the kernel against a float64 reference, then time (median of CUDA-graph
replays, rotating over weight copies > L2 so no run is served from cache):
  patch    the tuned hybrid kernel (launch + split-K reduction)
  cublas   F.linear on the dense weight
  floor    (packed weight bytes + x + y bytes) / measured copy bandwidth
    python bench/kernels.py --out bench/results/kernels [--shapes llama2-7b] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch
import torch.nn.functional as F
import triton

from patchc import mask as hm
from patchc.codegen.launch import get_config, graph_time_ms, launch
from patchc.codegen.schedule import build_schedule
from patchc.format import pack_layer

from report import write_report  # bench/report.py

SHAPES = {  # (N, K) = (out, in)
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
}


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write), 1 GiB buffers, median of graph replays."""
    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


def graph_time_us(fns: list) -> float:
    return graph_time_ms(fns) * 1e3


def random_bitmap(r: int, c: int, sparsity: float, g: torch.Generator) -> torch.Tensor:
    n_sparse = hm.sparse_tile_budget(r * c, sparsity)
    bm = torch.ones(r * c, dtype=torch.bool)
    bm[torch.randperm(r * c, generator=g)[:n_sparse]] = False
    return bm.reshape(r, c)


def bench_case(n, k, m, sparsity, tile, bw, seed=0, l2_bytes=200 << 20):
    g = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16
    bitmap = random_bitmap(n // tile, k // tile, sparsity, g)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dt)
    pattern = torch.randint(0, 6, (n, k // 4), generator=g, dtype=torch.uint8)
    p = pack_layer(w, bitmap, pattern, tile)
    sched = build_schedule(bitmap, tile).to("cuda")
    x = torch.randn(m, k, generator=g).to(dt).cuda()
    dense, values, meta = p.dense.cuda(), p.values.cuda(), p.meta.cuda()
    # correctness first: float64 reference of x @ (W * M)^T
    cfg = get_config(x, dense, values, meta, sched, None, n, tune=True)
    y = launch(x, dense, values, meta, sched, None, n, cfg, poison=True)
    wm = hm.apply_hybrid(w.cuda().double(), bitmap.cuda(), hm.pattern_to_mask(pattern.cuda()), tile)
    ref = x.double() @ wm.T
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert math.isfinite(err) and err < 1.5e-2, f"N={n} K={k} M={m} s={sparsity}: rel err {err}"
    # timing, rotating over copies that together exceed L2
    copies = max(2, math.ceil(l2_bytes / (p.nbytes + 1)))
    packs = [(dense.clone(), values.clone(), meta.clone()) for _ in range(copies)]
    wd = wm.to(dt)
    dense_ws = [wd.clone() for _ in range(max(2, math.ceil(l2_bytes / wd.nbytes)))]
    t_patch = graph_time_us([lambda d=d, v=v, e=e: launch(x, d, v, e, sched, None, n, cfg) for d, v, e in packs])
    t_cublas = graph_time_us([lambda wt=wt: F.linear(x, wt) for wt in dense_ws])
    bytes_moved = p.nbytes + x.nbytes + m * n * 2
    floor = bytes_moved / bw * 1e6
    flops = 2 * m * n * k
    del packs, dense_ws
    torch.cuda.empty_cache()
    return {"N": n, "K": k, "M": m, "sparsity": sparsity, "achieved": round(hm.layer_sparsity(bitmap), 4),
            "rel_err": err, "config": cfg.__dict__, "patch_us": round(t_patch, 2), "cublas_us": round(t_cublas, 2),
            "floor_us": round(floor, 2), "patch_over_floor": round(t_patch / floor, 3),
            "speedup_vs_cublas": round(t_cublas / t_patch, 3), "patch_tflops": round(flops / t_patch / 1e6, 1),
            "cublas_tflops": round(flops / t_cublas / 1e6, 1), "bytes_ratio": round(p.nbytes / (n * k * 2), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/kernels")
    ap.add_argument("--shapes", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--ms", default="1,16,128,2048")
    ap.add_argument("--sparsities", default="0,0.25,0.35,0.45,0.5")
    ap.add_argument("--tile", type=int, default=128)
    a = ap.parse_args()
    from pathlib import Path

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth()
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version(), "copy_bandwidth_GBps": round(bw / 1e9, 1), "tile": a.tile,
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(env))
    rows = []
    t0 = time.time()
    for n, k in SHAPES[a.shapes]:
        for m in map(int, a.ms.split(",")):
            for s in map(float, a.sparsities.split(",")):
                r = bench_case(n, k, m, s, a.tile, bw)
                rows.append(r)
                print(f"{n:>6}x{k:<6} M={m:<5} s={s:.2f} patch {r['patch_us']:>8.2f}us cublas {r['cublas_us']:>8.2f}us "
                      f"floor {r['floor_us']:>7.2f}us  /floor {r['patch_over_floor']:.2f}  vs cuBLAS "
                      f"{r['speedup_vs_cublas']:.2f}x  err {r['rel_err']:.1e}  [{time.time() - t0:.0f}s]", flush=True)
    title = (f"Hybrid kernel vs cuBLAS ({env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
             f"copy {env['copy_bandwidth_GBps']} GB/s, tile {a.tile}, bf16, {env['date']})")
    cols = [("N x K", lambda r: f"{r['N']}x{r['K']}"), ("M", "M"), ("sparsity", "sparsity"), ("patch us", "patch_us"),
            ("cuBLAS us", "cublas_us"), ("floor us", "floor_us"), ("patch/floor", "patch_over_floor"),
            ("speedup vs cuBLAS", "speedup_vs_cublas"), ("rel err", lambda r: f"{r['rel_err']:.1e}")]
    print(write_report(out, "kernels", title, cols, rows, env))

if __name__ == "__main__":
    main()
