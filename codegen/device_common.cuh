// Device helpers shared by mma_sp.cu and wgmma.cu. A source includes this file by name and codegen/cuda_build.py's
// inline_common pastes it in place of that line before compiling, so the build's hash covers it.
// The sm_90 instructions (mbarriers, the bulk copy engine) compile to a trap for older GPUs: mma_sp.cu is built for
// sm_80+ and its host side never launches the staged path there.
namespace patchc_device {

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
// The mbarrier inits before it are visible to the cluster (and to the bulk copy engine) after it.
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n\t.reg .pred P1;\n"
      "WAIT_%=:\n\tmbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "\t@!P1 bra WAIT_%=;\n}" ::"r"(bar), "r"(parity) : "memory");
}
// `bytes` of global memory into this CTA's shared memory by the bulk copy engine, completing on an mbarrier.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// Shared memory touched through the generic proxy (loads, stores) before the bulk copy engine (the async proxy)
// writes or reads it.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Programmatic dependent launch: wait until the previous kernel in the stream has completed and its writes are
// visible (a no-op when this launch was not programmatic), and let the next programmatic launch start early.
__device__ __forceinline__ void grid_dependency_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
#else
__device__ __forceinline__ void grid_dependency_wait() {}
__device__ __forceinline__ void launch_dependents() {}
__device__ __forceinline__ void mbar_init(uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void fence_mbar_init() { __trap(); }
__device__ __forceinline__ void mbar_expect(uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void mbar_arrive(uint32_t) { __trap(); }
__device__ __forceinline__ void mbar_wait(uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void bulk_copy(uint32_t, const void*, uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void fence_proxy_async() {}
#endif

}  // namespace patchc_device

