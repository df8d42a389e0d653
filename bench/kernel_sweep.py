"""Hybrid kernel vs cuBLAS dense vs the byte floor, on the GPU (one call; see bench/README.md).

For every shape / M / sparsity: pack a random bf16 weight with a random bitmap holding exactly that
share of 2:4 tiles, check the kernel against a float64 reference, then time (median of CUDA-graph
replays, rotating over weight copies > L2 so no run is served from cache):
  patch     the hybrid kernel with the config users get (default; --tune: autotuned): mma_sp (sparse tensor
            cores) at M <= 16, else the Triton kernel (+ split-K reduction) or decompress + cuBLAS (prefill),
            or, for a layer with no dense tile from M=256 (launch.CSLT_MIN_M) on, cuSPARSELt fed from the packed
            tiles (inside the CUDA graphs it is timed in)
  cublas    F.linear on the dense weight
  compiled  torch.compile(F.linear, mode="max-autotune-no-cudagraphs") on the dense weight (--compiled-ms)
  cslt      cuSPARSELt 2:4 (torch._cslt_sparse_mm, weight compressed once, its algorithm search): every tile
            2:4, i.e. the 50% point of the vendor's own sparse path
  floor     (packed weight bytes + x + y bytes) / measured copy bandwidth
The decode kernel is timed as plain launches (PATCHC_PDL=0) unless --pdl.
The dense baselines depend on (shape, M) only and are timed once per pair.
    python bench/kernel_sweep.py --out bench/results/kernels [--shapes llama2-7b,llama3-8b] [--ms 1,16,128,2048]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from patchc import config
from patchc import mask as hm
from patchc.codegen.launch import get_config, graph_time_ms, launch
from patchc.codegen.schedule import build_schedule
from patchc.format import from_tiles, pack_layer

from report import machine_env, write_report  # bench/report.py

SHAPES = {  # (N, K) = (out, in)
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-8b": [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)],
    "llama2-7b-square": [(4096, 4096)],   # (the one 7B shape left above 1.3x the decode floor, for quick A/B runs)
}


def sweep_args(ap, ms: str, out: str) -> None:
    """The arguments of the kernel sweeps (prefill.py, decode.py): which M, sparsities and shapes,
    where results go ($OUT on the device machine), whether to skip the float64 checks."""
    ap.add_argument("--ms", default=ms)
    ap.add_argument("--sparsities", default="0,0.25,0.35,0.45,0.5")
    ap.add_argument("--shapes", default="llama2-7b")
    ap.add_argument("--out", default=os.environ.get("OUT", out))
    ap.add_argument("--skip-checks", action="store_true")


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write), 1 GiB buffers, median of graph replays."""
    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * a.numel() * a.element_size() / (ms * 1e-3)


ROUNDS = 3  # alternating timings of the kernel and cuBLAS per case (bench_case)


def graph_time_us(fns: list) -> float:
    return graph_time_ms(fns) * 1e3


def time_alternating(paths: dict, rounds: int) -> dict:
    """{name: [us of each round]} for {name: calls to cycle through}: every path timed once a round, in turn, so
    that a drift of the GPU's clocks or temperature falls on all of them alike."""
    times = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fns in paths.items():
            times[name].append(graph_time_us(fns))
    return times


def random_bitmap(r: int, c: int, sparsity: float, g: torch.Generator) -> torch.Tensor:
    n_sparse = hm.sparse_tile_budget(r * c, sparsity)
    bm = torch.ones(r * c, dtype=torch.bool)
    bm[torch.randperm(r * c, generator=g)[:n_sparse]] = False
    return bm.reshape(r, c)


L2_ROTATION = 200 << 20  # timed calls cycle over weight copies this large together, so none is served from L2


def rotating_copies(tensors: tuple, nbytes: int, l2_bytes: int = L2_ROTATION) -> list[tuple]:
    """Clones of `tensors` (`nbytes` together), enough that cycling over them reads DRAM, not L2."""
    return [tuple(t.clone() for t in tensors) for _ in range(max(2, math.ceil(l2_bytes / max(1, nbytes))))]


def make_layer(n: int, k: int, m: int, sparsity: float, tile: int = 128, dtype=torch.bfloat16, seed: int = 0):
    """A random packed layer on the GPU (exact share of 2:4 tiles, random patterns), an input x [M, K], and the
    float64 reference x @ (W * M)^T: (x, dense, values, meta, schedule, ref, packed layer)."""
    g = torch.Generator().manual_seed(seed)
    bitmap = random_bitmap(n // tile, k // tile, sparsity, g)
    w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
    pattern = torch.randint(0, 6, (n, k // 4), generator=g, dtype=torch.uint8)
    p = pack_layer(w, bitmap, pattern, tile)
    x = torch.randn(m, k, generator=g).to(dtype).cuda()
    ref = x.double() @ hm.apply_hybrid(w.cuda().double(), bitmap.cuda(), hm.pattern_to_mask(pattern.cuda()), tile).T
    return x, p.dense.cuda(), p.values.cuda(), p.meta.cuda(), build_schedule(bitmap, tile).to("cuda"), ref, p


def time_baselines(n, k, m, compiled: bool, seed=0, l2_bytes=L2_ROTATION) -> dict:
    """cuBLAS, compiled dense and cuSPARSELt 2:4 for one (shape, M); each rotating over weight copies > L2."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dt = torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dt, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=dt, generator=g) * 0.02
    ws = [c for (c,) in rotating_copies((w,), w.nbytes, l2_bytes)]
    out = {"cublas_us": round(graph_time_us([lambda t=t: F.linear(x, t) for t in ws]), 2)}
    if compiled:
        try:
            f = torch.compile(lambda a, b: F.linear(a, b), mode="max-autotune-no-cudagraphs", dynamic=False)
            out["compiled_us"] = round(graph_time_us([lambda t=t: f(x, t) for t in ws]), 2)
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            out["compiled_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    try:
        mask = hm.pattern_to_mask(torch.randint(0, 6, (n, k // 4), device="cuda", dtype=torch.uint8, generator=g))
        comps = [torch._cslt_compress(t * mask) for t in ws]
        xt = x.t()  # [K, M]
        alg = torch._cslt_sparse_mm_search(comps[0], xt)
        alg = alg[0] if isinstance(alg, (tuple, list)) else alg
        y = torch._cslt_sparse_mm(comps[0], xt, alg_id=alg)  # [N, M]
        ref = (ws[0] * mask).double() @ x.double().t()
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 1.5e-2, f"cuSPARSELt rel err {err}"
        out["cslt_us"] = round(graph_time_us([lambda c=c: torch._cslt_sparse_mm(c, xt, alg_id=alg) for c in comps]), 2)
    except Exception as e:  # noqa: BLE001 - M too small for cuSPARSELt, or no cuSPARSELt: reported
        out["cslt_error"] = f"{type(e).__name__}: {str(e)[:120]}"
    del ws
    torch.cuda.empty_cache()
    return out


def bench_case(n, k, m, sparsity, tile, bw, base: dict, tune=False, seed=0, l2_bytes=L2_ROTATION, plain_dense=True):
    """One (shape, M, sparsity): what the runtime runs for such a layer, checked against float64, then timed. A
    layer with no 2:4 tile runs as HybridLinear(plain_dense=True) does (F.linear on its row-major weight) unless
    plain_dense=False."""
    x, dense, values, meta, sched, ref, p = make_layer(n, k, m, sparsity, tile, seed=seed)
    if plain_dense and sched.all_dense:
        w = from_tiles(dense, n // tile, k // tile)                       # the plain-dense layer's weight [N, K]
        config = {"engine": "dense-linear", "split_k": 0}
        run = lambda w_: F.linear(x, w_)  # noqa: E731
        y, packs = run(w), rotating_copies((w,), p.nbytes, l2_bytes)
    else:
        cfg = get_config(x, dense, values, meta, sched, None, n, tune=tune)
        config = cfg.__dict__
        run = lambda d, v, e: launch(x, d, v, e, sched, None, n, cfg)  # noqa: E731
        y = launch(x, dense, values, meta, sched, None, n, cfg, poison=True)
        packs = rotating_copies((dense, values, meta), p.nbytes, l2_bytes)
    # correctness first: float64 reference of x @ (W * M)^T
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert math.isfinite(err) and err < 1.5e-2, f"N={n} K={k} M={m} s={sparsity}: rel err {err}"
    # timing, rotating over copies that together exceed L2; cuBLAS (on a dense weight of this shape) is timed
    # again in alternation with the kernel, ROUNDS times each, medians compared: a single cuBLAS time per shape
    # drifted by up to 15% from case to case at M=2048 (GPU clocks under sustained tensor-core load)
    wd = torch.randn(n, k, device="cuda", dtype=x.dtype) * 0.02
    wds = [c for (c,) in rotating_copies((wd,), wd.nbytes, l2_bytes)]
    t_p, t_c = [], []
    for _ in range(ROUNDS):
        t_c.append(graph_time_us([lambda w_=w_: F.linear(x, w_) for w_ in wds]))
        t_p.append(graph_time_us([lambda c=c: run(*c) for c in packs]))
    t_patch, t_cublas = statistics.median(t_p), statistics.median(t_c)
    del wd, wds
    bytes_moved = p.nbytes + x.nbytes + m * n * 2
    floor = bytes_moved / bw * 1e6
    flops = 2 * m * n * k
    del packs
    torch.cuda.empty_cache()
    extra = {k_: v for k_, v in base.items() if k_ != "cublas_us"}
    if "compiled_us" in base:
        extra["speedup_vs_compiled"] = round(base["compiled_us"] / t_patch, 3)
    return {**extra, "N": n, "K": k, "M": m, "sparsity": sparsity, "achieved": round(hm.layer_sparsity(p.bitmap), 4),
            "rel_err": err, "config": config, "patch_us": round(t_patch, 2), "cublas_us": round(t_cublas, 2),
            "cublas_first_us": base["cublas_us"], "patch_runs_us": [round(t, 2) for t in t_p],
            "cublas_runs_us": [round(t, 2) for t in t_c],
            "floor_us": round(floor, 2), "patch_over_floor": round(t_patch / floor, 3),
            "speedup_vs_cublas": round(t_cublas / t_patch, 3), "patch_tflops": round(flops / t_patch / 1e6, 1),
            "cublas_tflops": round(flops / t_cublas / 1e6, 1), "bytes_ratio": round(p.nbytes / (n * k * 2), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/kernels")
    ap.add_argument("--shapes", default="llama2-7b", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--ms", default="1,16,128,2048")
    ap.add_argument("--ms-for", default="", help="per shape set M lists, e.g. 'llama3-8b=16'")
    ap.add_argument("--sparsities", default="0,0.25,0.35,0.45,0.5")
    ap.add_argument("--compiled-ms", default="16,2048", help="M values that also time torch.compile max-autotune")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--tune", action="store_true", help="autotune each case (default: the config users get)")
    ap.add_argument("--no-plain-dense", action="store_true",
                    help="0%%: time the hybrid kernels on the all-dense layer (default: F.linear, as the runtime runs it)")
    ap.add_argument("--budget-s", type=float, default=None)
    ap.add_argument("--pdl", action="store_true",
                    help="time the decode kernel as programmatic dependent launches (each call then overlaps the "
                         "previous one of the same graph: the chain bench/decode.py measures; off by default, "
                         "since in a model most linears follow kernels that are not)")
    a = ap.parse_args()
    if not a.pdl:
        config.override(pdl=False).__enter__()   # for the whole run
    from pathlib import Path

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth()
    env = machine_env("cpu", repeats=ROUNDS, gpu=torch.cuda.get_device_name(), device=torch.cuda.get_device_name(),
                      copy_bandwidth_GBps=round(bw / 1e9, 1), tile=a.tile, tuned=a.tune)
    print(json.dumps(env))
    ms_for = dict(kv.split("=") for kv in a.ms_for.split(";") if kv)
    compiled_ms = {int(v) for v in a.compiled_ms.split(",") if v}
    rows = []
    seen = set()
    t0 = time.time()
    for shapes in a.shapes.split(","):
        for n, k in SHAPES[shapes]:
            for m in map(int, ms_for.get(shapes, a.ms).split(",")):
                if (n, k, m) in seen:
                    continue
                seen.add((n, k, m))
                if a.budget_s is not None and time.time() - t0 > a.budget_s:
                    print(f"budget spent: skipping {n}x{k} M={m}", flush=True)
                    continue
                base = time_baselines(n, k, m, m in compiled_ms)
                for s in map(float, a.sparsities.split(",")):
                    r = bench_case(n, k, m, s, a.tile, bw, base, tune=a.tune, plain_dense=not a.no_plain_dense)
                    r["shapes"] = shapes
                    rows.append(r)
                    print(f"{n:>6}x{k:<6} M={m:<5} s={s:.2f} patch {r['patch_us']:>8.2f}us cublas {r['cublas_us']:>8.2f}us "
                          f"compiled {r.get('compiled_us', '-')} cslt {r.get('cslt_us', '-')} floor {r['floor_us']:>7.2f}us "
                          f"/floor {r['patch_over_floor']:.2f} vs cuBLAS {r['speedup_vs_cublas']:.2f}x err {r['rel_err']:.1e} "
                          f"[{time.time() - t0:.0f}s]", flush=True)
                (out / "kernels.partial.json").write_text(json.dumps({"env": env, "rows": rows}))
    plot(out / "kernels.png", rows, env)
    title = (f"Hybrid kernel vs cuBLAS ({env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
             f"copy {env['copy_bandwidth_GBps']} GB/s, tile {a.tile}, bf16, {env['date']})")
    cols = [("N x K", lambda r: f"{r['N']}x{r['K']}"), ("M", "M"), ("sparsity", "sparsity"),
            ("kernel", kernel_name),
            ("patch us", "patch_us"),
            ("cuBLAS us", "cublas_us"), ("compiled us", lambda r: r.get("compiled_us", "")),
            ("cuSPARSELt 2:4 us", lambda r: r.get("cslt_us", "") if r["sparsity"] == 0.5 else ""),
            ("floor us", "floor_us"), ("patch/floor", "patch_over_floor"),
            ("speedup vs cuBLAS", "speedup_vs_cublas"), ("rel err", lambda r: f"{r['rel_err']:.1e}")]
    print(write_report(out, "kernels", title, cols, rows, env))

def kernel_name(r: dict) -> str:
    c = r["config"]
    engine = c.get("engine", "triton")
    if engine == "mma_sp":
        return "mma_sp staged" if c.get("staged") else "mma_sp"
    if engine == "dense-linear":
        return "dense linear (cuBLAS)"
    if engine == "cslt":
        return "cuSPARSELt (packed)"
    if engine == "tma":
        return f"tma split{c['split_k']}" if c["split_k"] > 1 else "tma"
    if c["split_k"] == 0:
        return f"decompress {c['chunk_n']} rows+cuBLAS" if c.get("chunk_n") else "decompress+cuBLAS"
    return "triton"


def plot(path, rows, env) -> None:
    """Time vs sparsity, one panel per (shape, M): patch, cuBLAS, compiled, cuSPARSELt (50%), byte floor."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = sorted({(r["N"], r["K"], r["M"]) for r in rows}, key=lambda t: (t[2], t[0], t[1]))
    if not keys:
        return
    cols = min(4, len(keys))
    nrow = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrow, cols, figsize=(4 * cols, 3.2 * nrow), squeeze=False)
    for ax, (n, k, m) in zip(axes.flat, keys):
        rs = sorted((r for r in rows if (r["N"], r["K"], r["M"]) == (n, k, m)), key=lambda r: r["sparsity"])
        xs = [100 * r["sparsity"] for r in rs]
        ax.plot(xs, [r["patch_us"] for r in rs], "-o", label="patch")
        ax.plot(xs, [r["floor_us"] for r in rs], "--", label="byte floor")
        ax.axhline(rs[0]["cublas_us"], color="k", lw=1, label="cuBLAS dense")
        if "compiled_us" in rs[0]:
            ax.axhline(rs[0]["compiled_us"], color="gray", ls=":", label="compiled dense")
        if "cslt_us" in rs[0]:
            ax.plot([50], [rs[0]["cslt_us"]], "r*", ms=10, label="cuSPARSELt 2:4")
        ax.set_title(f"{n}x{k}, M={m}", fontsize=9)
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("us")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"hybrid kernel vs dense ({env['gpu']}, triton {env['triton']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def err(y, ref):
    """Relative error of y against a float64 reference (Frobenius norms)."""
    return ((y.double() - ref).norm() / ref.norm()).item()


@triton.jit
def _read_kernel(src, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Streams int32 words: each program sums ITERS blocks and writes one word (the read floor)."""
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    base = pid * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src + offs, mask=offs < n, other=0)
    tl.store(out + pid, tl.sum(acc, axis=0))


def read_floor_us(nbytes: int) -> dict:
    """Fastest streaming read (and a device copy) of nbytes, rotating over buffers > L2, in CUDA graphs."""
    words = nbytes // 4
    bufs = [b for (b,) in rotating_copies((torch.randint(-100, 100, (words,), device="cuda", dtype=torch.int32),),
                                          nbytes)]
    best, best_cfg = float("inf"), None
    for block in (2048, 4096):
        for iters in (2, 4, 8):
            for warps in (8,):
                grid = (triton.cdiv(words, block * iters),)
                out = torch.empty(grid[0], device="cuda", dtype=torch.int32)
                fns = [lambda b=b, o=out, bl=block, it=iters, w=warps: _read_kernel[grid](b, o, words, BLOCK=bl,
                                                                                      ITERS=it, num_warps=w)
                       for b in bufs]
                us = graph_time_ms(fns) * 1e3
                if us < best:
                    best, best_cfg = us, (block, iters, warps)
    dst = torch.empty_like(bufs[0])
    copy_us = graph_time_ms([lambda b=b: dst.copy_(b) for b in bufs]) * 1e3
    del bufs
    torch.cuda.empty_cache()
    return {"read_us": round(best, 2), "read_cfg": best_cfg, "copy_us": round(copy_us, 2)}


if __name__ == "__main__":
    main()
