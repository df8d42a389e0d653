"""Probe cuSPARSELt's compressed layout (torch._cslt_compress) on this GPU: values order, metadata placement.

    OUT=dir python bench/cslt_layout_probe.py

For small 2:4 matrices: whether the compressed values are the kept values in row-major order, whether every
metadata nibble is one of patchc's 4-bit codes, and the nibble -> group map (found with log2(groups) probes
whose codes spell each group's index in binary; saved as map_NxK.pt, torch.save of an int64 tensor); then
the time of torch._cslt_compress and torch._cslt_sparse_mm called eagerly (host cost included) at 7B shapes.
A feasibility probe for feeding cuSPARSELt from the packed format (bench/NOTES.md, next, 3); not part of the
runtime.
"""
import json
import math
import os

import torch
from triton.testing import do_bench

out = os.environ.get("OUT", "/tmp")
dev = "cuda"
CODE_A, CODE_B = 0x4, 0xE  # kept (0,1) and (2,3): low 2 bits first kept index, high 2 bits second
res = {}

def mask_from_codes(codes):  # codes [N, K/4] int -> bool mask [N, K]
    i0, i1 = codes & 3, (codes >> 2) & 3
    n, g = codes.shape
    m = torch.zeros(n, g, 4, dtype=torch.bool, device=codes.device)
    m.scatter_(2, i0.long().unsqueeze(-1), True)
    m.scatter_(2, i1.long().unsqueeze(-1), True)
    return m.view(n, 4 * g)

for (n, k) in [(128, 128), (256, 256), (256, 512), (512, 256), (384, 640)]:
    g = torch.Generator(device=dev).manual_seed(0)
    valid = torch.tensor([0x4, 0x8, 0xC, 0x9, 0xD, 0xE], device=dev)  # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    codes = valid[torch.randint(0, 6, (n, k // 4), device=dev, generator=g)]
    w = torch.randn(n, k, device=dev, generator=g).to(torch.bfloat16)
    m = mask_from_codes(codes)
    w2 = w * m
    comp0 = torch._cslt_compress(w2)
    comp = comp0.reshape(-1)
    nv = n * k // 2
    info = {"shape": list(comp0.shape), "dtype": str(comp0.dtype), "numel": comp.numel(), "values": nv, "meta_elems": comp.numel() - nv}
    info["values_row_major"] = bool(torch.equal(comp[:nv].view(n, k // 2), w2[m].view(n, k // 2)))
    meta = comp[nv:].contiguous().view(torch.uint8)
    info["meta_bytes"] = meta.numel()
    # our packed meta: [N, K/8] bytes, two groups a byte, low nibble first
    ours = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    info["meta_equals_ours_row_major"] = bool(meta.numel() >= ours.numel() and torch.equal(meta[:ours.numel()].view(n, k // 8), ours))
    # placement map: for every nibble of meta, the id of the group whose code it holds
    ng = n * (k // 4)
    bits = max(1, math.ceil(math.log2(ng)))
    gid = torch.arange(ng, device=dev).view(n, k // 4)
    found = torch.zeros(meta.numel() * 2, dtype=torch.int64, device=dev)
    ok = torch.ones(meta.numel() * 2, dtype=torch.bool, device=dev)
    for b in range(bits):
        c = torch.where((gid >> b) & 1 == 1, CODE_B, CODE_A)
        mm = mask_from_codes(c)
        cb = torch._cslt_compress(torch.ones(n, k, device=dev, dtype=torch.bfloat16) * mm).reshape(-1)
        mb = cb[nv:].contiguous().view(torch.uint8)
        nib = torch.stack([mb & 0xF, mb >> 4], 1).view(-1)
        found |= (nib == CODE_B).long() << b
        ok &= (nib == CODE_B) | (nib == CODE_A)
    info["all_nibbles_are_codes"] = bool(ok.all())
    info["map_is_permutation"] = bool(ok.all() and torch.equal(found.sort().values, torch.arange(found.numel(), device=dev)))
    torch.save(found.cpu(), f"{out}/map_{n}x{k}.pt")
    # does the random-code matrix's meta equal ours permuted by the map?
    if info["map_is_permutation"]:
        flat = codes.view(-1)
        nib = torch.stack([meta & 0xF, meta >> 4], 1).view(-1)
        info["random_meta_matches_map"] = bool(torch.equal(nib.long(), flat[found].long()))
    res[f"{n}x{k}"] = info
    print(n, k, info, flush=True)

# timing: compress and mm at 7B shapes
for (n, k) in [(4096, 4096), (11008, 4096), (4096, 11008)]:
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    codes = torch.full((n, k // 4), 0x9, device=dev)
    w2 = w * mask_from_codes(codes)
    t_c = do_bench(lambda: torch._cslt_compress(w2), return_mode="median") * 1e3
    comp = torch._cslt_compress(w2)
    for m in (2048, 512, 128):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        xt = x.t()
        alg = torch._cslt_sparse_mm_search(comp, xt)
        alg = alg[0] if isinstance(alg, (tuple, list)) else alg
        t_mm = do_bench(lambda: torch._cslt_sparse_mm(comp, xt, alg_id=alg), return_mode="median") * 1e3
        t_mmT = do_bench(lambda: torch._cslt_sparse_mm(comp, xt, alg_id=alg, transpose_result=True), return_mode="median") * 1e3
        t_cub = do_bench(lambda: torch.nn.functional.linear(x, w), return_mode="median") * 1e3
        yT = torch._cslt_sparse_mm(comp, xt, alg_id=alg, transpose_result=True)
        print(f"{n}x{k} M={m}: compress {t_c:.1f} us, cslt {t_mm:.1f} us, cslt transposed {t_mmT:.1f} us {tuple(yT.shape)} {yT.stride()}, cuBLAS {t_cub:.1f} us (L2-warm)", flush=True)
json.dump(res, open(f"{out}/probe.json", "w"), indent=1)
