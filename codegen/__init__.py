"""Per-layer Triton kernels generated from learned tile bitmaps (installed as patchc.codegen)."""
