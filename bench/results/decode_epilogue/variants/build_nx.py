import sys
from torch.utils.cpp_extension import load_inline
sys.path.insert(0, ".")
from patchc.codegen import wgmma
def build(path=".ab/nx.cu"):
    k = wgmma._KERNEL
    decl = k.decl + ("\nvoid hybrid_wgmma_nx(torch::Tensor x, torch::Tensor dense, torch::Tensor values, torch::Tensor meta, "
                     "torch::Tensor slot, c10::optional<torch::Tensor> bias, torch::Tensor y, int64_t block_n, int64_t split, "
                     "int64_t silu_mul, int64_t pdl, torch::Tensor nd, torch::Tensor nv, torch::Tensor nm, int64_t permille, "
                     "int64_t when);")
    import hashlib
    src = wgmma.source(open(path).read())
    return load_inline("patchc_wgmma_nx_" + hashlib.sha256(src.encode()).hexdigest()[:10], cpp_sources=decl,
                       cuda_sources=src, functions=k.functions + ["hybrid_wgmma_nx"], extra_cuda_cflags=k.flags)
if __name__ == "__main__":
    build()
