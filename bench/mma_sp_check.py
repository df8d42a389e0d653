"""Check the mma.sp decode kernel against float64 and time it against the Triton kernel and cuBLAS (GPU).

    python bench/mma_sp_check.py [--ms 1,16,32]
Prints the max error of small mixed cases (bf16 / fp16, tiles 64 / 128), then a timing table at the
LLaMA-2-7B shapes (and 1024x4096) against the Triton kernel and cuBLAS.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from patchc.codegen import mma_sp
from patchc.codegen.launch import default_config, get_config, graph_time_ms, launch

from kernel_bench import make_layer, rotating_copies  # bench/kernel_bench.py


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    return [tuple(map(int, nk.split("x"))) for nk in spec.split(",")]


def err(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def ab(old, a):
    """Old vs current kernel, interleaved in one run on the same packed weights (default launch of each case)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print("N x K M s | old us | new us | new/old", flush=True)
    for n, k in parse_shapes(a.shapes):
        for m in map(int, a.ms.split(",")):
            for s in map(float, a.sparsities.split(",")):
                x, d, v, e, sched, ref, p = make_layer(n, k, m, s)
                warps, sl = mma_sp.default_launch(m, n, sms, 128, bool(a.ab_staged))
                copies = rotating_copies((d, v, e), p.nbytes)
                ys = [torch.empty(m, n, dtype=x.dtype, device="cuda") for _ in copies]

                def call(ext, c, y):
                    extra = (int(a.ab_staged), 0)  # old: a mma_sp.cu with the (staged, silu_mul) arguments
                    if ext is mma_sp.extension():
                        extra += (0,)              # the current one also takes pdl
                    ext.hybrid_mma_sp(x, *c, sched.dense_col, sched.sparse_col, sched.dense_start, sched.sparse_start,
                                      None, y, sched.tile, warps, sl, *extra)
                for ext in (old, mma_sp.extension()):
                    call(ext, copies[0], ys[0])
                    assert err(ys[0], ref) < 1.5e-2, (n, k, m, s)
                t = {}
                for rep in range(2):  # old, new, old, new: the better of each
                    for name, ext in (("old", old), ("new", mma_sp.extension())):
                        us = graph_time_ms([lambda c=c, y=y, ext=ext: call(ext, c, y) for c, y in zip(copies, ys)]) * 1e3
                        t[name] = min(t.get(name, 1e9), us)
                print(f"{n}x{k} M={m} s={s} ({warps}w{sl}s) | {t['old']:.2f} | {t['new']:.2f} | "
                      f"{t['new'] / t['old']:.3f}", flush=True)
                del copies, ys
                torch.cuda.empty_cache()


def silu(a):
    """The MLP's gate/up: one fused launch vs the stacked launch followed by SiLU * mul (two kernels)."""
    print("stacked N x K M s | fused us (config) | stacked + silu*mul us | fused/unfused", flush=True)
    for n, k in parse_shapes(a.shapes):
        for m in map(int, a.ms.split(",")):
            for s in map(float, a.sparsities.split(",")):
                x, d, v, e, sched, ref, p = make_layer(n, k, m, s)
                h = n // 2
                want = F.silu(ref[:, :h]) * ref[:, h:]
                cf = get_config(x, d, v, e, sched, None, h, silu_mul=True, tune=False)
                cu = get_config(x, d, v, e, sched, None, n, tune=False)
                y = launch(x, d, v, e, sched, None, h, cf, silu_mul=True, poison=True)
                assert err(y, want) < 1.5e-2, (n, k, m, s, err(y, want))
                copies = rotating_copies((d, v, e), p.nbytes)

                def unfused(c):
                    z = launch(x, *c, sched, None, n, cu)
                    return F.silu(z[:, :h]) * z[:, h:]
                t_f = graph_time_ms([lambda c=c: launch(x, *c, sched, None, h, cf, silu_mul=True) for c in copies]) * 1e3
                t_u = graph_time_ms([lambda c=c: unfused(c) for c in copies]) * 1e3
                print(f"{n}x{k} M={m} s={s} | {t_f:.2f} ({cf.engine} {cf.num_warps}w {cf.block_n // 16}s"
                      f"{' staged' if cf.staged else ''}) | {t_u:.2f} | {t_f / t_u:.3f}", flush=True)
                del copies
                torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", default="1,16,32")
    ap.add_argument("--warps", default="4,8,16", help="warps a CTA to try")
    ap.add_argument("--staged", default="0,1", help="weights by direct loads (0) and/or through shared memory (1)")
    ap.add_argument("--sparsities", default="0,0.25,0.5")
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008,1024x4096")
    ap.add_argument("--ab", default=None, metavar="OLD.cu",
                    help="time this older mma_sp.cu against the current one (default launches, same run, same data)")
    ap.add_argument("--ab-staged", type=int, default=0, help="--ab: run the current kernel staged (1) or not (0)")
    ap.add_argument("--silu", action="store_true",
                    help="SiLU(gate) * up fused in the kernel vs the stacked [gate; up] launch + SiLU * mul (default "
                         "configs, same run); --shapes give the stacked N x K")
    ap.add_argument("--only", default=None, metavar="NxK:M:S",
                    help="just run the default launch of one case 20 times (e.g. under ncu), e.g. 4096x4096:16:0.5")
    a = ap.parse_args()
    t0 = time.time()
    ext = mma_sp.extension()
    print(f"build/load {time.time() - t0:.1f}s ext={ext is not None}", flush=True)
    if a.ab:
        ab(mma_sp.build(open(a.ab).read()), a)
        return
    if a.silu:
        silu(a)
        return
    if a.only:
        nk, m, s = a.only.split(":")
        n, k = map(int, nk.split("x"))
        x, d, v, e, sched, ref, _ = make_layer(n, k, int(m), float(s))
        cfg = get_config(x, d, v, e, sched, None, n, tune=False)  # the launch users get, staged or not
        for _ in range(20):
            y = launch(x, d, v, e, sched, None, n, cfg)
        torch.cuda.synchronize()
        print(f"{a.only} {cfg} rel err {err(y, ref):.2e}")
        return
    res = []
    for (n, k, m, s, tile, dt) in [(256, 512, 16, 0.0, 128, torch.bfloat16), (256, 512, 16, 0.5, 128, torch.bfloat16),
                                   (512, 384, 5, 0.25, 128, torch.float16), (128, 256, 32, 0.25, 64, torch.bfloat16),
                                   (128, 256, 3, 0.25, 64, torch.float16), (128, 640, 9, 0.3, 128, torch.bfloat16)]:
        x, d, v, e, sched, ref, _ = make_layer(n, k, m, s, tile, dt)
        for warps, sl in ((1, 1), (4, 2 if m <= 16 else 1), (3, 2 if m <= 16 else 1)):
            for st in (False, True):
                y = mma_sp.run(x, d, v, e, sched, None, n, warps, sl, poison=True, staged=st)
                res.append(err(y, ref))
    print(f"small cases: max rel err {max(res):.2e} {'OK' if max(res) < 1.5e-2 else 'WRONG'} "
          f"{[f'{r:.1e}' for r in res]}", flush=True)
    bw = 3.0e12
    print("N x K M s | mma us (best warps) | triton us | cublas us | floor us | mma/floor | vs cuBLAS")
    for n, k in parse_shapes(a.shapes):
        for m in map(int, a.ms.split(",")):
            wd = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            wds = [c for (c,) in rotating_copies((wd,), wd.nbytes)]
            xx = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_cub = graph_time_ms([lambda w=w: F.linear(xx, w) for w in wds]) * 1e3
            del wds, wd
            for s in map(float, a.sparsities.split(",")):
                x, d, v, e, sched, ref, p = make_layer(n, k, m, s)
                copies = rotating_copies((d, v, e), p.nbytes)
                best = (1e9, 0)
                allt = {}
                for st in map(int, a.staged.split(",")):
                    dflt = mma_sp.default_launch(m, n, 132, 128, bool(st))
                    for warps in sorted({*map(int, a.warps.split(",")), dflt[0]}):
                        for sl in (1, 2):
                            if mma_sp.launch_error(m, n, 128, warps, sl, bool(st)):
                                continue
                            y = mma_sp.run(x, d, v, e, sched, None, n, warps, sl, poison=True, staged=bool(st))
                            assert err(y, ref) < 1.5e-2, (n, k, m, s, warps, sl, st, err(y, ref))
                            us = graph_time_ms([lambda c=c, w_=warps, s_=sl, st_=bool(st): mma_sp.run(
                                x, *c, sched, None, n, w_, s_, staged=st_) for c in copies]) * 1e3
                            name = f"{warps}w{sl}s{'S' if st else ''}" + ("*" if (warps, sl) == dflt else "")
                            allt[name] = round(us, 1)
                            best = min(best, (us, name))
                cfg = default_config(m, sched, n)
                t_tri = graph_time_ms([lambda c=c: launch(x, *c, sched, None, n, cfg) for c in copies]) * 1e3
                floor = (p.nbytes + x.nbytes + m * n * 2) / bw * 1e6
                print(f"{n}x{k} M={m} s={s} | {best[0]:.2f} ({best[1]}; * = default) | {t_tri:.2f} | {t_cub:.2f} | "
                      f"{floor:.2f} | {best[0] / floor:.2f} | {t_cub / best[0]:.2f}x {allt}", flush=True)
                del copies
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
