"""Profile the default M=16 decode launch and cuBLAS at the LLaMA-2-7B shapes under ncu (GPU); where the default
is the mma.sp kernel, also the same launch on x[:1].expand(16, K) (x's L2 traffic 1/16, output not used):

    ncu --clock-control none --profile-from-start off --set full -o OUT python3 bench/ncu_decode.py

Only the profiler range holds one call of each (after two warm-up calls); results/ncu_decode/ has the report.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_bench import make_layer  # bench/kernel_bench.py
from patchc.codegen.launch import get_config, launch


def main() -> None:
    cases = [(11008, 4096, 0.45), (4096, 4096, 0.5), (4096, 11008, 0.45)]
    calls = []
    for n, k, s in cases:
        x, d, v, e, sched, _, _ = make_layer(n, k, 16, s)
        cfg = get_config(x, d, v, e, sched, None, n)
        print(n, k, s, cfg, flush=True)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        calls.append(lambda x=x, d=d, v=v, e=e, sched=sched, n=n, cfg=cfg: launch(x, d, v, e, sched, None, n, cfg))
        if cfg.engine == "mma_sp":
            x0 = x[:1].expand(16, k)
            calls.append(lambda x0=x0, d=d, v=v, e=e, sched=sched, n=n, cfg=cfg: launch(x0, d, v, e, sched, None, n, cfg))
        calls.append(lambda x=x, w=w: F.linear(x, w))
    for c in calls:  # warm up: compile, load, pick configs outside the profiled range
        c()
        c()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for c in calls:
        c()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
