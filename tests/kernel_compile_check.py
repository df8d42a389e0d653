"""Compile every Triton kernel of mask learning for sm_90 without a GPU (run by tests/test_lean_training.py in a
process without TRITON_INTERPRET, which would replace the kernels by interpreted functions).
Exit 0: all compiled, none computes in float64; 3: no ptxas for Triton's CUDA backend; else the error."""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from patchc import mask_kernels as mk
from patchc import optim_kernels as ok


def training_kernels():
    f32, bf16 = "*fp32", "*bf16"
    w = dict(w_ptr=bf16, s_wo="i32", s_wi="i32", gate_ptr=f32, C="i32", logit_ptr=bf16, pat_ptr="*u8", knobs_ptr=f32,
             key_ptr="*i64")
    tile = dict(T=128, JOINT=True, NOISE=True, BR=16, BG=32)
    yield mk._gate_kernel, dict(logit_ptr=f32, gate_ptr=f32, n="i32", knobs_ptr=f32, key_ptr="*i64"), dict(NOISE=True, BLOCK=256)
    yield mk._forward_kernel, dict(**w, wm_ptr=bf16, part_ptr=f32, G="i32"), tile
    yield mk._backward_kernel, dict(**w, dwm_ptr=bf16, cnorm_ptr=f32, wm_ptr=bf16, dlogit_ptr=bf16, part_ptr=f32,
                                    G="i32"), tile
    yield ok._vmax_kernel, dict(vq_ptr="*u8", g_ptr=bf16, vref_ptr=f32, hp_ptr=f32, part_ptr=f32, n="i32"), dict(BLOCK=1024)
    yield ok._lean_kernel, dict(p_ptr=bf16, g_ptr=bf16, r_ptr="*i8", vq_ptr="*u8", vref_ptr=f32, vref_new_ptr=f32,
                                hp_ptr=f32, key_ptr="*i64", n="i32"), dict(BLOCK=1024)
    yield ok._adamw_kernel, dict(p_ptr=f32, g_ptr=f32, m_ptr=f32, v_ptr=f32, hp_ptr=f32, n="i32"), dict(BLOCK=1024)


def main() -> None:
    for fn, sig, consts in training_kernels():
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        except RuntimeError as e:
            if "ptxas" in str(e).lower():
                sys.exit(3)
            raise
        assert "f64" not in k.asm["ttir"], f"{fn.__name__} computes in float64"
        print(fn.__name__, "compiled")


if __name__ == "__main__":
    main()
