"""One e2e row (argv[1], e.g. patch-0.35) timed as bench/e2e.py does, then one profiled generate(): top CUDA kernels."""
import os, sys, json
import torch
sys.path.insert(0, "bench")
row, out = sys.argv[1], sys.argv[2]
sys.argv = ["e2e.py", "--out", out, "--sparsities", "0.35,0.45", "--row", row]
import patchc.speed as sp
orig = sp.time_generate
def tg(model, ids, new, device, **kw):
    r = orig(model, ids, new, device, **kw)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, cache_implementation="static",
                       pad_token_id=0, disable_compile=kw.get("disable_compile", False))
        torch.cuda.synchronize()
    print("TIMES", json.dumps(r), flush=True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70), flush=True)
    return r
sp.time_generate = tg
import e2e
e2e.time_generate = tg
e2e.main()
