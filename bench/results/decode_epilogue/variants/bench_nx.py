"""The wgmma decode with the next layer's bytes prefetched into L2 (experiment): float64 check, then chain timings."""
import sys, json, statistics, os
import torch
sys.path.insert(0, "bench"); sys.path.insert(0, ".ab")
from kernels import make_layer, rotating_copies, time_alternating, copy_bandwidth
from mma_sp_check import err
from patchc.codegen import wgmma
from patchc.codegen.device import pdl_enabled
from patchc.codegen.launch import get_config, launch
from build_nx import build

ext = build()
out = sys.argv[1]
shapes = [(4096, 4096)] if len(sys.argv) < 3 else [tuple(map(int, s.split("x"))) for s in sys.argv[2].split(",")]
configs = [(6, 0, 0), (6, 250, 0), (6, 500, 0), (6, 1000, 0), (6, 500, 1), (6, 1000, 1), (4, 500, 0), (4, 1000, 0), (2, 500, 0)]
bw = copy_bandwidth()
rows = []
log = open(os.path.join(out, "nx.jsonl"), "a", buffering=1)
for n, k in shapes:
    for s in (0.0, 0.25, 0.35, 0.45, 0.5):
        x, d, v, e, sched, ref, p = make_layer(n, k, 16, s)
        packs = rotating_copies((d, v, e), p.nbytes)
        cfg = get_config(x, d, v, e, sched, None, n, tune=False)
        row = {"N": n, "K": k, "s": s, "floor_us": round((p.nbytes + x.nbytes + 16 * n * 2) / bw * 1e6, 2),
               "default_cfg": f"{cfg.engine} {cfg.split_k}"}
        paths = {"default": [lambda c=c: launch(x, *c, sched, None, n, cfg) for c in packs]}
        for split in (6, 4, 2):
            paths[f"wg{split}"] = [lambda c=c, sp=split: wgmma.run(x, *c, sched, None, block_n=16, split=sp) for c in packs]
        def nx_run(i, split, pm, when, poison=False):
            y = torch.full((16, n), float("nan"), dtype=x.dtype, device="cuda") if poison else \
                torch.empty((16, n), dtype=x.dtype, device="cuda")
            ext.hybrid_wgmma_nx(x, *packs[i], sched.slot, None, y, 16, split, 0, int(pdl_enabled(x)),
                                *packs[(i + 1) % len(packs)], pm, when)
            return y
        for split, pm, when in configs:
            name = f"nx{split}_{pm}_{when}"
            row[f"err_{name}"] = err(nx_run(0, split, pm, when, poison=True), ref)
            paths[name] = [lambda i=i, a=(split, pm, when): nx_run(i, *a) for i in range(len(packs))]
        for name, ts in time_alternating(paths, 2).items():
            row[f"{name}_us"] = round(statistics.median(ts), 2)
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        print(json.dumps({k2: v2 for k2, v2 in row.items() if not k2.startswith("err")}), flush=True)
        bad = [k2 for k2, v2 in row.items() if k2.startswith("err") and not v2 < 1e-2]
        if bad:
            print("ERR", bad, flush=True)
        del packs
        torch.cuda.empty_cache()
