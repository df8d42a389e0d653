# The exact script behind diag_session5.log (fifth session, H100), kept for provenance: it imported the then-buggy
# to_cusparselt (row-interleaved values/codes, since fixed), hence values_eq/meta_eq False; the maps it saved
# (map_NxK.pt, not committed) matched the nibble formula exactly. Run from the repo root: OUT=dir python3 <this>.
import math, os, sys, torch
sys.path.insert(0, "bench")
from cslt_prefill_check import to_cusparselt, make_sparse_layer
from triton.testing import do_bench
out = os.environ["OUT"]; dev = "cuda"
CODE_A, CODE_B = 0x4, 0xE
def mask_from_codes(codes):
    i0, i1 = codes & 3, (codes >> 2) & 3
    n, g = codes.shape
    m = torch.zeros(n, g, 4, dtype=torch.bool, device=codes.device)
    m.scatter_(2, i0.long().unsqueeze(-1), True); m.scatter_(2, i1.long().unsqueeze(-1), True)
    return m.view(n, 4 * g)
for n, k in [(384, 640), (512, 512), (1024, 1024), (512, 2048), (2048, 512), (4096, 4096)]:
    values, meta, w, p, keep = make_sparse_layer(n, k, 128, torch.bfloat16, dev)
    ours = to_cusparselt(values, meta, n, k, 128)
    ref = torch._cslt_compress(w)
    nv = n * k // 2
    a, b = ours.reshape(-1), ref.reshape(-1)
    line = f"{n}x{k}: ours {tuple(ours.shape)} ref {tuple(ref.shape)} numel {a.numel()} {b.numel()}"
    if a.numel() == b.numel():
        line += f" values_eq {torch.equal(a[:nv], b[:nv])} meta_eq {torch.equal(a[nv:], b[nv:])}"
        ma, mb = a[nv:].contiguous().view(torch.uint8), b[nv:].contiguous().view(torch.uint8)
        line += f" meta bytes differing {(ma != mb).float().mean().item():.3f}"
        if (ma != mb).any():
            line += f" first diff byte {int((ma != mb).nonzero()[0])}"
    print(line, flush=True)
    if n * k <= 4096 * 4096:
        ng = n * (k // 4)
        gid = torch.arange(ng, device=dev).view(n, k // 4)
        nmeta = b.numel() - nv
        found = torch.zeros(nmeta * 4, dtype=torch.int64, device=dev)
        for bit in range(max(1, math.ceil(math.log2(ng)))):
            c = torch.where((gid >> bit) & 1 == 1, CODE_B, CODE_A)
            cb = torch._cslt_compress(torch.ones(n, k, device=dev, dtype=torch.bfloat16) * mask_from_codes(c)).reshape(-1)
            mbb = cb[nv:].contiguous().view(torch.uint8)
            nib = torch.stack([mbb & 0xF, mbb >> 4], 1).view(-1)
            found |= (nib == CODE_B).long() << bit
        torch.save(found.int().cpu(), f"{out}/map_{n}x{k}.pt")
# transpose_result cost, L2-warm eager vs graph not needed: relative
for n, k in [(4096, 4096), (11008, 4096)]:
    values, meta, w, p, keep = make_sparse_layer(n, k, 128, torch.bfloat16, dev)
    comp = torch._cslt_compress(w)
    for m in (2048,):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16); xt = x.t()
        alg = torch._cslt_sparse_mm_search(comp, xt); alg = alg[0] if isinstance(alg, (tuple, list)) else alg
        y = torch._cslt_sparse_mm(comp, xt, alg_id=alg, transpose_result=True)
        ref = x.double() @ w.double().t()
        print(n, k, m, "rel err ref-compress", ((y.double() - ref).norm() / ref.norm()).item())
        from patchc.codegen.launch import graph_time_ms
        f = lambda: torch.nn.functional.linear(x, w)
        print(n, k, m, "graph us: cslt", graph_time_ms([lambda: torch._cslt_sparse_mm(comp, xt, alg_id=alg)]) * 1e3,
              "cslt T", graph_time_ms([lambda: torch._cslt_sparse_mm(comp, xt, alg_id=alg, transpose_result=True)]) * 1e3,
              "cslt default alg T", graph_time_ms([lambda: torch._cslt_sparse_mm(comp, xt, transpose_result=True)]) * 1e3,
              "cublas", graph_time_ms([f]) * 1e3, flush=True)
