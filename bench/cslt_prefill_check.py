"""The cuSPARSELt prefill engine (codegen/cusparselt.py, engine "cslt") on a GPU: bytes, error, timing.

    python bench/cslt_prefill_check.py [--ms 256,512,1024,2048,4096] [--out DIR]

For all-2:4 layers at the LLaMA-2-7B shapes: the one-pass conversion checked byte for byte against
torch._cslt_compress, the engine's output against float64, then, in CUDA graphs rotating over weight copies
larger than L2: cuBLAS on the dense weight, decompress + cuBLAS (the prefill path of mixed layers), the engine
(conversion + cuSPARSELt's y^T + the transposing epilogue) and each of its three launches alone
(cuSPARSELt with its default algorithm and with the searched one the engine uses); --convert-variants times the
conversion's launch variants first. Writes
cslt_prefill.json and cslt_prefill.md under --out (default bench/results/cslt_prefill). The CPU tests of the
conversion and epilogue are tests/test_cusparselt.py.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from patchc.codegen import cusparselt as cs
from patchc.codegen.launch import KernelConfig, graph_time_ms, launch
from patchc.format import unpack_layer

from kernel_bench import make_layer, rotating_copies  # bench/kernel_bench.py


def check_shape(n: int, k: int, ms: list[int], silu: bool) -> list[dict]:
    """Rows for one all-2:4 layer shape (silu: gate and up stacked, [2n, K], with the SiLU(gate) * up epilogue)."""
    rows_w = 2 * n if silu else n
    _, dense, values, meta, sched, _, p = make_layer(rows_w, k, 1, 0.5, 128)
    assert sched.all_sparse, "50% sparsity at tile 128 should leave no dense tile"
    w = unpack_layer(p).cuda()                                                           # W * M [rows_w, K]
    comp = cs.to_cusparselt(values, meta, rows_w, k, 128)
    ref_comp = torch._cslt_compress(w).view(-1).view(torch.int16)
    # torch's buffer can be longer than the values + metadata (seen at 22016 rows): compare what cuSPARSELt reads
    same = bool(torch.equal(comp.view(-1).view(torch.int16), ref_comp[: comp.numel()]))
    if not same and ref_comp.numel() >= comp.numel():
        diff = (comp.view(-1).view(torch.int16) != ref_comp[: comp.numel()]).nonzero().flatten()
        first = int(diff[0])
        region = "values" if first < rows_w * k // 2 else "metadata"
        print(f"  note: {diff.numel()} of {comp.numel()} elements differ from torch._cslt_compress for {rows_w}x{k}; "
              f"first at {first} ({region}), last at {int(diff[-1])}", flush=True)
    if ref_comp.numel() != comp.numel():
        print(f"  note: torch._cslt_compress gave {ref_comp.numel()} elements for {rows_w}x{k}, "
              f"the conversion {comp.numel()}", flush=True)
    packs = rotating_copies((values, meta), values.nbytes + meta.nbytes)
    denses = [c for (c,) in rotating_copies((w,), w.nbytes)]
    comps = [cs.to_cusparselt(v, e, rows_w, k, 128) for v, e in packs]
    buf = torch.empty_like(comp).view(-1)
    eng, dec = KernelConfig(0, 0, 0, 4, 1, engine="cslt"), KernelConfig(0, 0, 0, 4, 1)
    n_out = n
    out = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = cs.cslt_mm(x, values, meta, sched, None, n_out, silu_mul=silu, poison=True)  # (eager launch() would
        # run decompress + cuBLAS: cuSPARSELt runs inside CUDA graphs, as every timing below)
        ref = x.double() @ w.double().t()
        if silu:
            ref = F.silu(ref[:, :n]) * ref[:, n:]
        err = ((y.double() - ref).norm() / ref.norm()).item()
        yt = torch._cslt_sparse_mm(comp, x.t())
        alg = cs.algorithm(comp, x.t())                                  # the engine's searched algorithm

        def cublas(d, x=x):
            yy = F.linear(x, d)
            return F.silu(yy[:, :n]) * yy[:, n:] if silu else yy

        t = {
            "cublas": graph_time_ms([lambda d=d: cublas(d) for d in denses]),
            "decompress": graph_time_ms([lambda v=v, e=e: launch(x, dense, v, e, sched, None, n_out, dec, silu_mul=silu)
                                         for v, e in packs]),
            "engine": graph_time_ms([lambda v=v, e=e: launch(x, dense, v, e, sched, None, n_out, eng, silu_mul=silu)
                                     for v, e in packs]),
            "convert": graph_time_ms([lambda v=v, e=e: cs.to_cusparselt(v, e, rows_w, k, 128, buf) for v, e in packs]),
            "gemm": graph_time_ms([lambda c=c: torch._cslt_sparse_mm(c, x.t()) for c in comps]),
            "gemm_searched": graph_time_ms([lambda c=c: torch._cslt_sparse_mm(c, x.t(), alg_id=alg) for c in comps]),
            "epilogue": graph_time_ms([lambda: cs.transpose_epilogue(yt, m, n_out, None, silu)]),
        }
        us = {key: round(v * 1e3, 2) for key, v in t.items()}
        row = {"n": n, "k": k, "silu_mul": silu, "m": m, "bytes_equal_cslt_compress": same, "rel_err": err,
               "alg": int(alg), **{f"{key}_us": v for key, v in us.items()},
               "engine_vs_cublas": round(us["cublas"] / us["engine"], 3),
               "decompress_vs_cublas": round(us["cublas"] / us["decompress"], 3)}
        print(f"{n}x{k}{' silu' if silu else ''} M={m} | {same} | {err:.1e} | {us['cublas']} | {us['decompress']} | "
              f"{us['engine']} | {us['convert']} | {us['gemm']} ({us['gemm_searched']}) | {us['epilogue']} | "
              f"{row['engine_vs_cublas']}x | {row['decompress_vs_cublas']}x", flush=True)
        out.append(row)
    del packs, denses, comps
    torch.cuda.empty_cache()
    return out


CONVERT_VARIANTS = [(1, 4, 1), (2, 4, 2), (4, 4, 2), (4, 8, 2), (8, 4, 3), (2, 8, 2), (4, 4, 3)]


def convert_variants(shapes: list[tuple[int, int]]) -> list[dict]:
    """Time the conversion kernel's launch variants (tile columns a program, warps, stages), bytes checked."""
    rows = []
    for n, k in shapes:
        _, _, values, meta, _, _, _ = make_layer(n, k, 1, 0.5, 128)
        want = cs.to_cusparselt(values, meta, n, k, 128, launch=(1, 4, 1)).view(-1).view(torch.int16)
        packs = rotating_copies((values, meta), values.nbytes + meta.nbytes)
        buf = torch.empty(want.numel(), dtype=values.dtype, device="cuda")
        moved = 2 * (values.nbytes + meta.nbytes)
        for v in CONVERT_VARIANTS:
            ok = bool(torch.equal(cs.to_cusparselt(values, meta, n, k, 128, launch=v).view(-1).view(torch.int16), want))
            us = graph_time_ms([lambda a=a, e=e: cs.to_cusparselt(a, e, n, k, 128, buf, launch=v) for a, e in packs]) * 1e3
            rows.append({"n": n, "k": k, "launch": list(v), "same_bytes": ok, "us": round(us, 2),
                         "GBps": round(moved / us * 1e-3, 1)})
            print(f"convert {n}x{k} cols/warps/stages {v}: {us:.2f} us ({moved / us * 1e-3:.0f} GB/s) same {ok}", flush=True)
        del packs
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008")
    ap.add_argument("--silu-shapes", default="11008x4096", help="gate+up stacked shapes (n x K per projection)")
    ap.add_argument("--ms", default="256,512,1024,2048,4096")
    ap.add_argument("--out", default="bench/results/cslt_prefill")
    ap.add_argument("--convert-variants", action="store_true", help="also time the conversion's launch variants")
    a = ap.parse_args()
    ms = [int(v) for v in a.ms.split(",")]
    print("N x K M | bytes == _cslt_compress | rel err | cuBLAS us | decompress+cuBLAS us | engine us | "
          "convert us | cuSPARSELt y^T us (searched alg) | epilogue us | engine vs cuBLAS | decompress vs cuBLAS",
          flush=True)
    variants = convert_variants([(4096, 4096), (11008, 4096)]) if a.convert_variants else []
    rows = []
    for shapes, silu in ((a.shapes, False), (a.silu_shapes, True)):
        for nk in filter(None, shapes.split(",")):
            n, k = map(int, nk.split("x"))
            rows += check_shape(n, k, ms, silu)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "cusparselt": torch.backends.cusparselt.version()}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cslt_prefill.json").write_text(json.dumps({"env": env, "rows": rows, "convert_variants": variants}, indent=1))
    lines = [f"# cuSPARSELt prefill engine, all-2:4 layers ({env['gpu']}, torch {env['torch']}, cuSPARSELt "
             f"{env['cusparselt']}, bf16, tile 128, {env['date']})", "",
             "| N x K | M | engine us | cuBLAS us | decompress+cuBLAS us | engine vs cuBLAS | decompress vs cuBLAS | "
             "convert us | cuSPARSELt y^T us | epilogue us | bytes == _cslt_compress | rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']}x{r['k']}{' gate+up, SiLU*up' if r['silu_mul'] else ''} | {r['m']} | {r['engine_us']} | "
                     f"{r['cublas_us']} | {r['decompress_us']} | {r['engine_vs_cublas']} | {r['decompress_vs_cublas']} | "
                     f"{r['convert_us']} | {r['gemm_us']} | {r['epilogue_us']} | {r['bytes_equal_cslt_compress']} | "
                     f"{r['rel_err']:.1e} |")
    (out / "cslt_prefill.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
