"""float64 checks of a --ab build of wgmma.cu (decode splits), its determinism, and a captured programmatic chain."""
import sys, json
import torch
import torch.nn.functional as F
sys.path.insert(0, "bench")
from kernels import make_layer
from mma_sp_check import err
from patchc.codegen import wgmma

ext = wgmma._KERNEL.build(wgmma.source(open(sys.argv[1]).read()))
ok, n = True, 0
def rec(good, **kw):
    global ok, n
    ok &= bool(good); n += 1
    if not good: print("FAIL", json.dumps(kw), flush=True)
def run(x, d, v, e, sched, bias, split, silu=False, pdl=0, n_out=None, rows=256):
    y = torch.full((x.shape[0], n_out), float("nan"), dtype=x.dtype, device="cuda")
    ext.hybrid_wgmma(x, d, v, e, sched.slot, sched.kinds, bias, y, 16, split, int(silu), pdl, rows)
    return y
for nn, k in ((512, 1024), (640, 2048), (4096, 4096)):
    for s in (0.0, 0.3, 0.5):
        for dt in (torch.bfloat16, torch.float16):
            for m in (16, 5, 32):
                x, d, v, e, sched, ref, _ = make_layer(nn, k, m, s, dtype=dt, seed=nn + k + m)
                bias = (torch.randn(nn, device="cuda") * 0.1).to(dt)
                for split in range(1, min(8, k // 128) + 1):
                    for pdl, rows in ((0, 256), (1, 256), (0, 64), (1, 64)):
                        y = run(x, d, v, e, sched, bias, split, pdl=pdl, n_out=nn, rows=rows)
                        r = err(y, ref + bias.double())
                        rec(r < 1e-2 and not torch.isnan(y).any(), shape=[nn, k, m], s=s, split=split, err=r, rows=rows)
                        y2 = run(x, d, v, e, sched, bias, split, pdl=pdl, n_out=nn, rows=rows)
                        rec(torch.equal(y, y2), what="deterministic", shape=[nn, k, m], split=split)
x, d, v, e, sched, ref, _ = make_layer(1024, 1024, 16, 0.4, seed=5)
bias = (torch.randn(1024, device="cuda") * 0.1).to(x.dtype)
full = ref + bias.double()
want = F.silu(full[:, :512]) * full[:, 512:]
for split in (1, 3, 8):
    y = run(x, d, v, e, sched, bias, split, silu=True, pdl=1, n_out=512)
    r = err(y, want)
    rec(r < 1e-2 and not torch.isnan(y).any(), what="silu", split=split, err=r)
# captured programmatic chain, replayed after x changed, against plain launches
steps = [(4096, 4096, 0.5, 4, 256), (11008, 4096, 0.35, 2, 256), (4096, 11008, 0.45, 6, 256), (4096, 4096, 0.0, 6, 256),
         (4096, 4096, 0.25, 8, 256), (4096, 4096, 0.35, 2, 64), (4096, 4096, 0.5, 2, 64), (11008, 4096, 0.0, 2, 256),
         (4096, 11008, 0.5, 2, 64)]
layers = [make_layer(nn, k, 16, s, seed=40 + i)[1:5] for i, (nn, k, s, _, _) in enumerate(steps)]
x0 = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
def chain(pdl):
    h = x0
    for (nn, k, s, split, rows), (d, v, e, sched) in zip(steps, layers):
        h = run(h, d, v, e, sched, None, split, pdl=pdl, n_out=nn, rows=rows)
    return h
chain(1); torch.cuda.synchronize()
g = torch.cuda.CUDAGraph()
with torch.cuda.stream(torch.cuda.Stream()), torch.cuda.graph(g):
    yg = chain(1)
for rep in range(5):
    x0.copy_(torch.randn_like(x0))
    g.replay()
    want = chain(0)
    torch.cuda.synchronize()
    rec(torch.equal(yg, want), what="chain replay == plain", rep=rep)
print(f"variant checks: {n} {'passed' if ok else 'FAILED'}", flush=True)
sys.exit(0 if ok else 1)
