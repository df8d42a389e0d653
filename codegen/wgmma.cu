// GEMM for hybrid (dense / 2:4) tile weights on Hopper's warpgroup tensor cores (sm_90a): prefill, and decode of
// tall layers.
//
// y[M, N] = x[M, K] @ (W * Mask)[N, K]^T + bias. W is stored in patchc's packed format
// (patchc/format.py, tile T = 128): dense tiles [n_dense, T, T], 2:4 tiles as values [n_sparse, T, T/2] and
// 4-bit codes [n_sparse, T, T/8]. One CTA computes a [256 rows of W, BN tokens] output tile: two row-tiles,
// one per consumer warpgroup. Both walk K in order, half a K-tile (64 columns) a step, so one load of x's
// [BN, 64] block serves both row-tiles (x is what the CTAs of a GEMM read most often from L2); for each row-tile
// the step's weights are that tile's half: a dense tile as 8 wgmma m64nBNk16 (two 64-row halves x 4 k16),
// a 2:4 tile as 4 sparse wgmma m64nBNk32 (half the tensor-core time) with its values and codes as stored,
// all into the same fp32 accumulators. No decompression, no second copy of the weight.
//
// The weight is the A operand ("swap AB": A = W rows, B = x^T, D = y^T), so 2:4 along K is exactly the
// sparse operand's structure. Warp-specialised: warpgroup 0 (one thread) is the producer, issuing each step's
// bulk tensor copies (TMA) into a ring of STAGES shared-memory stages: x's [BN, 64] box (128-byte swizzle),
// and per row-tile a dense [128, 64] box (128-byte swizzle) or a 2:4 tile's [128, 32] values box (64-byte
// swizzle) plus a plain bulk copy of its 2 KB of codes; warpgroups 1 and 2 consume. Full / empty mbarriers per
// stage; a consumer keeps one step's wgmma group in flight and frees a stage when the group that read it has
// completed. y is staged through shared memory transposed and written with 16-byte stores.
//
// Decode (M <= 16: BN = 16) is memory bound and has far fewer CTAs than SMs at one CTA a row pair (or, ROWS = 64, a
// half row-tile: see hybrid_wgmma_kernel), so K is split
// over a thread-block cluster of `split` CTAs (cluster dims 1 x 1 x split), each streaming its share of the K-tiles
// through the same ring; each CTA owns 1 / split of the output fragments, lays out the others' fp32 partials in its
// ring and has the bulk copy engine send each owner its share (completing on the owner's mbarrier), then sums the
// partials it received and writes its share. silu_mul: a CTA pairs gate row-tile p with up row-tile p + R / 2 (one
// per consumer warpgroup) and writes SiLU(gate) * up.
//
// Launched as a programmatic dependent (codegen/device.py: under CUDA graph capture on sm_90), the kernel's CTAs may
// start while the kernel before it drains: they read their tile slots and fill the ring with weights, and load x
// (maybe that kernel's output) only after griddepcontrol.wait. Each CTA lets the next launch start at once. The tile
// slots travel in the launch's parameters (TileKinds) where they fit: a CTA's first loads then wait on no global read.
//
// Sparse metadata (PTX ISA, "Sparse wgmma": the per-warp layout of mma.sp m16n8k32 with selector 0): the
// thread of lane 4g + t (t = 0, 1) of warp w supplies, for one k32 step, the 4-bit codes of rows 16w + g (bits
// 0-15) and 16w + g + 8 (bits 16-31) for k = 16t .. 16t + 15: bytes 2t, 2t + 1 of that step's 4 code bytes of
// each row, which is how the packed format stores them (low nibble first). Threads t = 2, 3 are not read.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <cstring>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "device_common.cuh"

namespace patchc_wgmma {
using namespace patchc_device;

constexpr int TILE = 128;                       // the packed tile (rows and K of a dense tile)
constexpr int BOX_K = 64;                       // K columns a step: one 128-byte swizzle row of 16-bit elements
constexpr int W_BOX = TILE * BOX_K * 2;         // [128, 64] of a dense tile: 16 KB ([128, 32] values: 8 KB)
constexpr int V_BOX = TILE * BOX_K;             // [128, 32] values of a 2:4 tile's half
constexpr int META_BYTES = TILE * TILE / 8;     // a 2:4 tile's codes: 2 KB
constexpr int THREADS = 384;                    // producer warpgroup + 2 consumer warpgroups
constexpr int SMEM_LIMIT = 227 * 1024;          // H100 / H200 shared memory a block may opt in to
constexpr int MAX_C = 256;                      // K-tiles a row (K <= 32768)
constexpr int MAX_SPLIT = 8;                    // CTAs of a cluster splitting K (the portable cluster size)

// A stage of the ring: x's box, then per row-tile c a weight box at W + c * W_SLOT, then the codes. HALF (half a
// row-tile a CTA, a whole K-tile a step): x's two boxes, the two halves' [64, 64] (or [64, 32]) boxes, 64 rows' codes.
template <int BN, bool HALF = false>
struct Layout {
  static constexpr int X_BOX = BN * BOX_K * 2;                  // [BN, 64] of x
  static constexpr int X1 = X_BOX;                              // HALF: x's second box
  static constexpr int W_SLOT = HALF ? W_BOX / 2 : W_BOX;
  static constexpr int W = HALF ? 2 * X_BOX : X_BOX;
  static constexpr int META = W + 2 * W_SLOT;                   // row-tile c's codes at META + c * META_BYTES
  static constexpr int STAGE = META + (HALF ? META_BYTES / 2 : 2 * META_BYTES);   // 52 KB at BN = 128; HALF 21 KB
  static constexpr int STATIC = 2 * MAX_C * 4;                  // the two rows' tile slots (static shared memory)
  // Decode CTAs (BN <= 32) split K over a cluster: a thread's accumulators are FRAGS float4 fragments, and each
  // CTA receives the other CTAs' partials of the fragments it owns (a 1 / split share, padded to ceil(KEYS / split)
  // a warpgroup) in a buffer of its own: [split senders][2 warpgroups][ceil(KEYS / split)] float4.
  static constexpr int FRAGS = BN / 4;                          // float4 fragments a consumer thread holds
  static constexpr int KEYS = 128 * (HALF ? FRAGS / 2 : FRAGS);   // fragments of one warpgroup (HALF: rows 0-63)
  static constexpr bool PUSH = BN <= 32;
  static constexpr int RECV_BYTES = PUSH ? 16 * (2 * KEYS + 2 * MAX_SPLIT) : 0;
  static constexpr int BUDGET = SMEM_LIMIT - STATIC - RECV_BYTES - 1024 - 256;
  static constexpr int MAX_STAGES = HALF ? 10 : 6;
  // 4 stages at BN = 128, 5 at BN = 64 and 16, 10 for HALF
  static constexpr int STAGES = BUDGET / STAGE < MAX_STAGES ? BUDGET / STAGE : MAX_STAGES;
  static constexpr int EPI_PITCH = TILE + 8;                    // y^T staging: [BN tokens, 128 rows] + 16 B pad
  static constexpr int BARS = 2 * STAGES + 2;                   // full[STAGES], empty[STAGES], received, dependency
  static constexpr int RECV = STAGES * STAGE + 256;             // the receive buffer, after the ring and barriers
  static constexpr int SMEM = RECV + RECV_BYTES + 1024;         // + alignment slack
  static_assert(STAGES >= 2, "two stages at least");
  static_assert(STAGE % 1024 == 0 && X_BOX % 1024 == 0, "swizzled boxes want 1 KB alignment");
  static_assert(2 * BN * EPI_PITCH * 2 <= STAGES * STAGE, "the epilogue reuses the ring");
  static constexpr int RED_PITCH = 2 * TILE + 4;                // fp32 partials [BN tokens, 256 rows (+ pad)]
  static_assert(BN * RED_PITCH * 4 <= STAGES * STAGE, "the fp32 epilogue reuses the ring");
  static_assert(BARS * 8 <= 256, "the mbarriers fit between the ring and the receive buffer");
};

template <typename T, int BN> struct Wgmma;

// @WGMMA_OPS@ (codegen/wgmma.py generates the wgmma wrappers: 64 or 128 accumulator operands each)

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PATCHC_WGMMA_ARCH 1
#else
#define PATCHC_WGMMA_ARCH 0
#endif

#if PATCHC_WGMMA_ARCH
// mbar_wait with acquire at cluster scope: for bytes another CTA of the cluster copied here.
__device__ __forceinline__ void mbar_wait_cluster(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n\t.reg .pred P1;\n"
      "WAIT_%=:\n\tmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 P1, [%0], %1;\n"
      "\t@!P1 bra WAIT_%=;\n}" ::"r"(bar), "r"(parity) : "memory");
}
// A 2D box of a tensor map into shared memory, completing on an mbarrier; c0 = inner (K) coordinate.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar) : "memory");
}
// Whether the mbarrier's phase of this parity has completed, without waiting.
__device__ __forceinline__ bool mbar_test(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile("{\n\t.reg .pred P1;\n\tmbarrier.test_wait.parity.shared::cta.b64 P1, [%1], %2;\n\tselp.u32 %0, 1, 0, P1;\n}"
               : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  return done != 0;
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }
template <int R>
__device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R)); }
template <int R>
__device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R)); }
__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// The two halves of a cluster barrier (in each phase every thread of every CTA arrives once, then waits).
__device__ __forceinline__ void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait;" ::: "memory"); }
// The shared address `addr` of this CTA, as the same place in the cluster's CTA `rank` (distributed shared memory).
__device__ __forceinline__ uint32_t map_rank(uint32_t addr, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(addr), "r"(rank));
  return remote;
}
// `bytes` of this CTA's shared memory at `src` into another CTA's (remote address and mbarrier from map_rank) by the
// bulk copy engine, completing that many bytes of the mbarrier's transaction count when they land.
__device__ __forceinline__ void bulk_copy_to_cta(uint32_t remote, uint32_t src, uint32_t bytes, uint32_t remote_bar) {
  asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(remote), "r"(src), "r"(bytes), "r"(remote_bar) : "memory");
}
__device__ __forceinline__ void st_shared_f4(uint32_t addr, const float* v) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3])
               : "memory");
}
__device__ __forceinline__ float4 ld_shared_f4(uint32_t addr) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr) : "memory");
  return v;
}
#endif

// Shared-memory matrix descriptors of K-major operands as TMA lays them out: 128-byte swizzle (rows of 128
// bytes, 8-row atoms 1024 bytes apart: the stride byte offset) or 64-byte swizzle (rows of 64 bytes, atoms 512
// bytes apart); the start address moves by 32 bytes a k16 step (16 values of a 2:4 row: a k32 step) inside a row.
__device__ __forceinline__ uint64_t desc128(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}
__device__ __forceinline__ uint64_t desc64(uint32_t addr) {
  return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(512 >> 4) << 32) | (2ull << 62);
}

// Keeps a register's value alive (and unchanged) up to this point: wgmma reads its metadata register
// asynchronously, so the register of a group still in flight must not be reused.
__device__ __forceinline__ void keep(uint32_t v) { asm volatile("" ::"r"(v)); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float silu(float g) { return g / (1.f + __expf(-g)); }

template <typename T>
__device__ __forceinline__ void store4(T* p, float a, float b, float c, float d) {  // 8-byte aligned
  union { T h[4]; uint2 u; } v;
  v.h[0] = from_float<T>(a); v.h[1] = from_float<T>(b); v.h[2] = from_float<T>(c); v.h[3] = from_float<T>(d);
  *reinterpret_cast<uint2*>(p) = v.u;
}

// ROWS = 64 (decode, BN = 16): a CTA computes half a row-tile instead of two row-tiles, for layers too short for
// enough CTAs otherwise (4096 rows: 128 CTAs at split 2 in clusters of 2, where two row-tiles a CTA needed split 6 for
// 96). A step is then a whole K-tile: consumer warpgroup c takes its half c (64 columns) of the CTA's 64 rows, with
// x's [BN, 64] box of those columns, and the two warpgroups' partials of the same rows are summed in the epilogue with
// the other CTAs' (2 * split sources a fragment). (32-row CTAs, no split, ran 1.1-1.5x slower: bench/NOTES.md.)
// A layer's tile kinds in the launch's parameters (codegen/schedule.py tile_kinds): w[0] = W, the 32-K-tile chunks a
// row-tile; then per row-tile r and chunk j, at 1 + 2 (r W + j), the dense tiles stored before the chunk and the
// chunk's bitmask (bit b: K-tile 32 j + b is dense). A CTA's slots are then constant loads and popcounts instead of
// a global load, which at a CTA's start runs under the previous launch's traffic (the slowest CTAs' took ~1.1 us):
// 4096x4096 at 50% 8.43 -> 8.21 us (ab853d4:bench/results/decode_kinds). w[0] = 0: the kinds do not fit
// (1 + 2 R W > KIND_WORDS), read `slot`.
constexpr int KIND_WORDS = 880;                 // with the other parameters under the classic 4 KB limit
struct TileKinds {
  uint32_t w[KIND_WORDS];
};

template <typename T, int BN, int ROWS>
__global__ void __launch_bounds__(THREADS, 1) hybrid_wgmma_kernel(
    const __grid_constant__ CUtensorMap x_map,       // x [M, K], box [BN, 64], 128 B swizzle
    const __grid_constant__ CUtensorMap dense_map,   // dense [n_dense * T, T], box [T (HALF: 64), 64], 128 B swizzle
    const __grid_constant__ CUtensorMap values_map,  // values [n_sparse * T, T / 2], box [T (HALF: 64), 32], 64 B swizzle
    const uint8_t* __restrict__ meta,                 // [n_sparse, T, T / 8]
    const int* __restrict__ slot,                     // [R, C]: i >= 0 dense tile i, ~i 2:4 tile i
    int R, int C, const T* __restrict__ bias, T* __restrict__ y, int M, int64_t stride_ym,
    int split,                                        // CTAs of a cluster splitting K (gridDim.z)
    int silu_mul,                                     // W = [gate; up]: y [M, N / 2] = SiLU(x gate^T) * (x up^T)
    int pdl,                                          // launched as a programmatic dependent
    const __grid_constant__ TileKinds kinds) {        // slot, as bitmasks (w[0] = 0: read slot)
#if PATCHC_WGMMA_ARCH
  constexpr bool HALF = ROWS < 2 * TILE;         // half a row-tile a CTA
  constexpr int SUBS = TILE / ROWS;              // HALF: CTAs a row-tile
  using L = Layout<BN, HALF>;
  static_assert(ROWS == 2 * TILE || (ROWS == TILE / 2 && BN <= 32), "ROWS: 256, or 64 for decode CTAs");
  extern __shared__ unsigned char smem_raw[];
  __shared__ int slots[2][MAX_C];
  const uint32_t base = (smem_u32(smem_raw) + 1023) & ~1023u;   // swizzled boxes want 1 KB alignment
  unsigned char* base_ptr = smem_raw + (base - smem_u32(smem_raw));
  const uint32_t bars = base + L::STAGES * L::STAGE;            // full[STAGES], empty[STAGES], received
  auto full = [&](int s) { return bars + 8 * s; };
  auto empty = [&](int s) { return bars + 8 * (L::STAGES + s); };
  const uint32_t recv_bar = bars + 8 * 2 * L::STAGES;           // split > 1: the other CTAs' partials have landed
  const uint32_t dep_bar = recv_bar + 8;                        // the previous kernel is done (griddepcontrol.wait)

  // This CTA's row-tiles rt[0], rt[1]: 2p and (if R allows) 2p + 1; with silu_mul gate p and up p + R / 2.
  // HALF: rows ROWS hr .. ROWS hr + ROWS - 1 of row-tile rt0 = p / SUBS (hr = p % SUBS).
  const int rt0 = HALF ? blockIdx.y / SUBS : silu_mul ? blockIdx.y : 2 * blockIdx.y;
  const int hr = HALF ? blockIdx.y % SUBS : 0;
  const int pair = HALF ? 1 : silu_mul ? 2 : (R - rt0 < 2 ? R - rt0 : 2);
  const int rt1 = HALF ? rt0 : silu_mul ? blockIdx.y + R / 2 : rt0 + pair - 1;
  const int m0 = blockIdx.x * BN;            // first token of this CTA
  const int rank = blockIdx.z;               // = %cluster_ctarank (cluster dims 1 x 1 x split, gridDim.z = split)
  // v / split as a multiply and a shift (exact for v < 9000, split <= 8), for the decode epilogue: a division by the
  // runtime split there is a ~150-cycle chain of dependent instructions per use, and summing what a CTA received
  // took 1250 / 3200 SM cycles at split 2 / 6 (ab853d4:bench/results/decode_pdl, call 4's trace)
  const uint32_t split_magic = (65536u + (uint32_t)split - 1) / (uint32_t)split;
  auto div_split = [&](int v) { return (int)(((uint32_t)v * split_magic) >> 16); };
  // This CTA's steps [q0, q1) of the 2C half-K-tile steps (kc = q / 2, half q % 2): a split need not divide the K-tiles
  // (on 4096 x 11008, 86 K-tiles over 6 CTAs: 28-29 steps each, where whole K-tiles gave 14 or 15). HALF: of the C
  // K-tile steps (a step's bytes are half as many). Warp-uniform as ptxas can see (else it serialises the wgmmas: C7520).
  const int n_steps = HALF ? C : 2 * C;
  const int q0 = __shfl_sync(0xffffffff, rank * n_steps / split, 0);
  const int q1 = __shfl_sync(0xffffffff, (rank + 1) * n_steps / split, 0);
  const int wg = __shfl_sync(0xffffffff, threadIdx.x / 128, 0);   // warp-uniform, as ptxas can see
  // With an odd number of row-tiles the last CTA has one: its second warpgroup then runs the first row-tile's
  // tiles again and stores nothing (a branch around the mainloop would make ptxas serialise the wgmmas).
  if (threadIdx.x == 0)  // the descriptors' first use waits on them otherwise
    for (const CUtensorMap* m : {&x_map, &dense_map, &values_map})
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(m)) : "memory");
  if (kinds.w[0] > 0) {
    const int W = (int)kinds.w[0];
    for (int i = threadIdx.x; i < 2 * C; i += THREADS) {
      const int r = i < C ? rt0 : rt1, c = i % C;
      const uint32_t before = kinds.w[1 + 2 * (r * W + c / 32)], mask = kinds.w[2 + 2 * (r * W + c / 32)];
      const int d = (int)(before + __popc(mask & ((1u << (c % 32)) - 1u)));   // dense tiles stored before (r, c)
      slots[i / C][c] = (mask >> (c % 32)) & 1u ? d : ~(r * C + c - d);
    }
  } else {
    for (int i = threadIdx.x; i < 2 * C; i += THREADS)
      slots[i / C][i % C] = slot[(int64_t)(i < C ? rt0 : rt1) * C + i % C];
  }
  if (threadIdx.x == 0) {
    for (int s = 0; s < L::STAGES; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 8);                // one arrival per consumer warp
    }
    mbar_init(recv_bar, 1);
    mbar_init(dep_bar, 1);
    fence_mbar_init();
  }
  __syncthreads();
  if (split > 1) cluster_arrive_relaxed();   // (its wait comes before the first message to another CTA)
  const int steps = q1 - q0;

  launch_dependents();   // a programmatic launch after this one may start its CTAs (its x waits for our y)
  if (wg == 0) {  // producer
    setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      // Step q's weights: row-tile c's half-K-tile box (dense, or a 2:4 tile's values and codes) into stage s.
      auto load_weights = [&](int q, int s) {
        const uint32_t st = base + s * L::STAGE;
        if constexpr (HALF) {   // K-tile q0 + q, rows ROWS hr.. of its row-tile: both halves (ROWS-row boxes), x's two boxes
          const int i = slots[0][q0 + q], row = (i >= 0 ? i : ~i) * TILE + hr * ROWS;
          mbar_expect(full(s), 2 * L::X_BOX + (i >= 0 ? ROWS * BOX_K * 4 : ROWS * BOX_K * 2 + ROWS * 16));
          for (int h = 0; h < 2; ++h) {
            if (i >= 0) tma_load(st + L::W + h * L::W_SLOT, &dense_map, h * BOX_K, row, full(s));
            else tma_load(st + L::W + h * L::W_SLOT, &values_map, h * BOX_K / 2, row, full(s));
          }
          if (i < 0)
            bulk_copy(st + L::META, meta + (int64_t)(~i) * META_BYTES + hr * ROWS * 16, ROWS * 16, full(s));
          return;
        }
        const int kc = (q0 + q) / 2, h = (q0 + q) % 2;
        uint32_t bytes = L::X_BOX;
        for (int c = 0; c < 2; ++c) bytes += slots[c][kc] >= 0 ? W_BOX : V_BOX + META_BYTES;
        mbar_expect(full(s), bytes);           // (x's box too: it follows)
        for (int c = 0; c < 2; ++c) {
          const int i = slots[c][kc];
          if (i >= 0) {
            tma_load(st + L::W + c * W_BOX, &dense_map, h * BOX_K, i * TILE, full(s));
          } else {
            tma_load(st + L::W + c * W_BOX, &values_map, h * BOX_K / 2, ~i * TILE, full(s));
            bulk_copy(st + L::META + c * META_BYTES, meta + (int64_t)(~i) * META_BYTES, META_BYTES, full(s));
          }
        }
      };
      auto load_x = [&](int q, int s) {        // x [m0:+BN, 64 columns] (HALF: 128, as two boxes)
        if constexpr (HALF) {
          tma_load(base + s * L::STAGE, &x_map, (q0 + q) * 2 * BOX_K, m0, full(s));
          tma_load(base + s * L::STAGE + L::X1, &x_map, ((q0 + q) * 2 + 1) * BOX_K, m0, full(s));
        } else {
          tma_load(base + s * L::STAGE, &x_map, (q0 + q) * BOX_K, m0, full(s));
        }
      };
      // Launched as a programmatic dependent, the ring's weights go ahead (no kernel of a forward writes weights or
      // the schedule) while x, maybe the previous kernel's output, waits for that kernel, unless that kernel has
      // finished by the time the first stage's weights are on their way (the producer's second warp arrives on dep_bar
      // past griddepcontrol.wait): after a kernel that is not a programmatic predecessor (a norm or attention before a
      // linear) x then follows its weights from the first step, as in a plain launch: with the whole ring's weights
      // first, the first stage's x queued behind them (H100: 0.6-1 us a launch). Testing again after each stage lost
      // 0.3-0.6 us a launch after another hybrid linear (ab853d4:bench/results/decode_pdl, decode_half).
      const int ahead = pdl ? (steps < L::STAGES ? steps : L::STAGES) : 0;
      int q = 0;
      if (ahead > 0) {
        load_weights(0, 0);
        q = 1;
        if (!mbar_test(dep_bar, 0))
          for (; q < ahead; ++q) load_weights(q, q);
      }
      if (pdl) mbar_wait(dep_bar, 0);
      for (int j = 0; j < q; ++j) load_x(j, j);
      for (; q < steps; ++q) {
        const int s = q % L::STAGES;
        if (q >= L::STAGES) mbar_wait(empty(s), ((q / L::STAGES) & 1) ^ 1);
        load_weights(q, s);
        load_x(q, s);
      }
    } else if (threadIdx.x == 32) {          // x may be the previous kernel's output: tell the producer when it is done
      grid_dependency_wait();
      mbar_arrive(dep_bar);
    }
    if (split > 1) {                         // the producer warpgroup's part in the two cluster barrier phases
      cluster_wait();
      cluster_arrive_relaxed();
      cluster_wait();
    }
  } else {  // consumers: warpgroup c owns row-tile rt0 + c (two 64-row accumulators); HALF: K-tile half c of 64 rows
    setmaxnreg_inc<232>();
    const int c = wg - 1;
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    // Rows 0-63 and 64-127 of the row-tile, in NSETS independent sets (summed after the mainloop), so that a decode
    // step's wgmmas need not wait on each other; measured on the H100 it changed nothing (bench/NOTES.md, tenth
    // session: the consumer is not what holds decode back), and it costs nothing either.
    constexpr int NSETS = BN <= 32 ? 4 : 1;
    float acc0[NSETS][BN / 2], acc1[NSETS][BN / 2];
#pragma unroll
    for (int a = 0; a < NSETS; ++a)
#pragma unroll
      for (int r = 0; r < BN / 2; ++r) acc0[a][r] = acc1[a][r] = 0.f;
    uint32_t e_prev0 = 0, e_prev1 = 0, e_prev2 = 0, e_prev3 = 0;   // codes of the group still in flight
    const uint32_t perm = (t & 1) ? 0x7632 : 0x5410;                // halves 1 or 0 of rows g and g + 8
    for (int q = 0; q < steps; ++q) {
      const int s = q % L::STAGES, kc = HALF ? q0 + q : (q0 + q) / 2, h = HALF ? c : (q0 + q) % 2;
      mbar_wait(full(s), (q / L::STAGES) & 1);
      const uint32_t st = base + s * L::STAGE, xs = st + (HALF && c ? L::X1 : 0), ws = st + L::W + c * L::W_SLOT;
      uint32_t e0 = 0, e1 = 0, e2 = 0, e3 = 0;
      wgmma_fence();
      if (slots[HALF ? 0 : c][kc] >= 0) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          Wgmma<T, BN>::dense(acc0[kk % NSETS], desc128(ws + kk * 32), desc128(xs + kk * 32));
          if constexpr (!HALF)
            Wgmma<T, BN>::dense(acc1[kk % NSETS], desc128(ws + 64 * 128 + kk * 32), desc128(xs + kk * 32));
        }
      } else {
        // this step's 2 k32 steps are code words 2h, 2h + 1 of each row (16 code bytes a row; HALF: 64 rows' codes)
        const unsigned char* ms = base_ptr + (st - base) + L::META + (HALF ? 0 : c * META_BYTES) + 8 * h;
        const int row = warp * 16 + g;
        const uint2 a_lo = *reinterpret_cast<const uint2*>(ms + row * 16);
        const uint2 a_hi = *reinterpret_cast<const uint2*>(ms + (row + 8) * 16);
        if constexpr (!HALF) {
          const uint2 b_lo = *reinterpret_cast<const uint2*>(ms + (row + 64) * 16);
          const uint2 b_hi = *reinterpret_cast<const uint2*>(ms + (row + 72) * 16);
          e2 = __byte_perm(b_lo.x, b_hi.x, perm);
          e3 = __byte_perm(b_lo.y, b_hi.y, perm);
        }
        e0 = __byte_perm(a_lo.x, a_hi.x, perm);
        e1 = __byte_perm(a_lo.y, a_hi.y, perm);
        Wgmma<T, BN>::sparse(acc0[0], desc64(ws), desc128(xs), e0);
        if constexpr (!HALF) Wgmma<T, BN>::sparse(acc1[0], desc64(ws + 64 * 64), desc128(xs), e2);
        Wgmma<T, BN>::sparse(acc0[1 % NSETS], desc64(ws + 32), desc128(xs + 64), e1);
        if constexpr (!HALF) Wgmma<T, BN>::sparse(acc1[1 % NSETS], desc64(ws + 64 * 64 + 32), desc128(xs + 64), e3);
      }
      wgmma_commit();
      wgmma_wait<1>();                       // the previous step's group is done: its stage is free
      keep(e_prev0); keep(e_prev1); keep(e_prev2); keep(e_prev3);
      e_prev0 = e0; e_prev1 = e1; e_prev2 = e2; e_prev3 = e3;
      if (q > 0 && lane == 0) mbar_arrive(empty((q - 1) % L::STAGES));
    }
    wgmma_wait<0>();
    keep(e_prev0); keep(e_prev1); keep(e_prev2); keep(e_prev3);
    grid_dependency_wait();   // (long satisfied: x came after it) y's storage is free of the previous kernel's reads
#pragma unroll
    for (int a = 0; a < NSETS; ++a)
#pragma unroll
      for (int r = 0; r < BN / 2; ++r) asm volatile("" : "+f"(acc0[a][r]), "+f"(acc1[a][r])::"memory");
#pragma unroll
    for (int a = 1; a < NSETS; ++a)
#pragma unroll
      for (int r = 0; r < BN / 2; ++r) acc0[0][r] += acc0[a][r], acc1[0][r] += acc1[a][r];

    // Epilogue: both consumer warpgroups are past their last wgmma (every stage read), so the ring is free.
    named_barrier(1, 256);
    if (split > 1 || HALF) {
      // K split over the cluster (decode CTAs, BN <= 32; the host refuses others): a key names a thread's float4
      // fragment within its warpgroup (the same key for a gate and its up), CTA `rank` owns the keys with
      // key % split == rank. Each CTA lays out the fragments the others own in its free ring, owner by owner, and
      // the bulk copy engine sends each owner its share (one copy an owner, completing on the owner's receive
      // barrier) and puts the fragments it owns in its own place of its receive buffer; each CTA then sums the
      // `split` partials of every key it owns, slot by slot, and writes those. Cluster
      // barrier phase 0 (arrived at the start): every receive barrier is initialised before a copy signals it;
      // phase 1 (arrived once a CTA has received everything): no CTA exits while a copy may still read its ring.
      // HALF: a thread's fragments are those of rows 0-63 only, and both warpgroups' keys name the same outputs (the
      // sum is over 2 * split partials); at split 1 the same code sums the two warpgroups', with no cluster.
      if constexpr (L::PUSH) {
        constexpr int FH = L::FRAGS / 2, F = HALF ? FH : L::FRAGS;   // fragments: FH of rows 0-63, then FH of 64-127
        constexpr int KEYS = L::KEYS;
        static_assert(KEYS == 128 * F, "a key a fragment of a consumer thread");
        const int ct = threadIdx.x % 128, per_k = div_split(KEYS + split - 1);   // ceil(KEYS / split)
        const uint32_t recv = base + L::RECV, share = 2 * per_k * 16;   // bytes a CTA sends each other CTA
        auto frag = [&](int u) { return (u < FH ? acc0[0] : acc1[0]) + 4 * (u % FH); };
        int slot_of[F], owner_of[F];         // fragment u's key = ct * F + u: key / split and key % split
#pragma unroll
        for (int u = 0; u < F; ++u) {
          slot_of[u] = div_split(ct * F + u);
          owner_of[u] = ct * F + u - slot_of[u] * split;
        }
#pragma unroll
        for (int u = 0; u < F; ++u)          // [owner][warpgroup][key / split]: the outbox in the ring, the fragments this
          st_shared_f4((owner_of[u] != rank ? base : recv) +   // CTA owns in its own place of its receive buffer
                       (uint32_t)(((owner_of[u] * 2 + c) * per_k + slot_of[u]) * 16), frag(u));
        fence_proxy_async();
        named_barrier(1, 256);
        if (split > 1) cluster_wait();       // phase 0
        if (threadIdx.x == 128) {
          mbar_expect(recv_bar, (split - 1) * share);   // each other CTA sends a whole share (slots it does not own too)
          for (int q = 0; q < split; ++q)
            if (q != rank)
              bulk_copy_to_cta(map_rank(recv + rank * share, q), base + q * share, share, map_rank(recv_bar, q));
        }
        mbar_wait_cluster(recv_bar, 0);
        if (split > 1) cluster_arrive_relaxed();   // phase 1: this CTA has received all its partials
        // Sums by slot, not by fragment: consumer thread j takes this CTA's slots j, j + 256, ... (key = slot * split +
        // rank) of both warpgroups and adds the `split` partials of each in rank order, its loads independent of one
        // another. (Summed by the threads that held the fragments, each warp branched per fragment and chained one
        // shared-memory load after another: ~1300 SM cycles at split 6, ab853d4:bench/results/decode_epilogue.)
        for (int i = (int)threadIdx.x - 128; i < per_k; i += 256) {
          const int key = i * split + rank;
          if (key >= KEYS) break;
          float4 s[2];
#pragma unroll
          for (int cc = 0; cc < 2; ++cc) {
            float4 w[MAX_SPLIT];
#pragma unroll
            for (int src = 0; src < MAX_SPLIT; ++src)
              if (src < split) w[src] = ld_shared_f4(recv + (uint32_t)(((src * 2 + cc) * per_k + i) * 16));
            s[cc] = w[0];
#pragma unroll
            for (int src = 1; src < MAX_SPLIT; ++src)
              if (src < split) s[cc].x += w[src].x, s[cc].y += w[src].y, s[cc].z += w[src].z, s[cc].w += w[src].w;
          }
          // the key's fragment: thread kt = key / F of its warpgroup, fragment u = key % F (F is a power of 2)
          const int kt = key / F, u = key % F, kl = kt % 32;
          const int r = (u / FH) * 64 + (kt / 32) * 16 + kl / 4, tok = 8 * (u % FH) + 2 * (kl % 4);   // rows r, r + 8
          auto put = [&](int tk, int n, float v) {
            if (m0 + tk < M) y[(int64_t)(m0 + tk) * stride_ym + n] = from_float<T>(v);
          };
          if (HALF) {                        // both warpgroups' partials are of rows ROWS hr + r, + 8
            const int n = rt0 * TILE + hr * ROWS + r;
            const float b_lo = bias ? to_float(bias[n]) : 0.f, b_hi = bias ? to_float(bias[n + 8]) : 0.f;
            put(tok, n, s[0].x + s[1].x + b_lo);
            put(tok + 1, n, s[0].y + s[1].y + b_lo);
            put(tok, n + 8, s[0].z + s[1].z + b_hi);
            put(tok + 1, n + 8, s[0].w + s[1].w + b_hi);
          } else if (silu_mul) {
            const int n = rt0 * TILE + r, nu = rt1 * TILE + r;   // gate and up rows of W; y's column n
            const float b_lo = bias ? to_float(bias[n]) : 0.f, b_hi = bias ? to_float(bias[n + 8]) : 0.f;
            const float u_lo = bias ? to_float(bias[nu]) : 0.f, u_hi = bias ? to_float(bias[nu + 8]) : 0.f;
            put(tok, n, silu(s[0].x + b_lo) * (s[1].x + u_lo));
            put(tok + 1, n, silu(s[0].y + b_lo) * (s[1].y + u_lo));
            put(tok, n + 8, silu(s[0].z + b_hi) * (s[1].z + u_hi));
            put(tok + 1, n + 8, silu(s[0].w + b_hi) * (s[1].w + u_hi));
          } else {
#pragma unroll
            for (int cc = 0; cc < 2; ++cc) {
              if (cc >= pair) break;
              const int n = (rt0 + cc) * TILE + r;
              const float b_lo = bias ? to_float(bias[n]) : 0.f, b_hi = bias ? to_float(bias[n + 8]) : 0.f;
              put(tok, n, s[cc].x + b_lo);
              put(tok + 1, n, s[cc].y + b_lo);
              put(tok, n + 8, s[cc].z + b_hi);
              put(tok + 1, n + 8, s[cc].w + b_hi);
            }
          }
        }
        if (split > 1) cluster_wait();       // phase 1: every CTA has received, so no copy still reads this ring
      }
    } else if (silu_mul) {  // fp32 partials [BN tokens, 256 rows]: SiLU(gate) * up is written below
      float* red = reinterpret_cast<float*>(base_ptr);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float* acc = half ? acc1[0] : acc0[0];
        const int r = c * TILE + half * 64 + warp * 16 + g;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {   // conflict-free: tokens 2t apart are 8t banks apart
          const int tok = 8 * j + 2 * t;
          red[tok * L::RED_PITCH + r] = acc[4 * j + 0];
          red[(tok + 1) * L::RED_PITCH + r] = acc[4 * j + 1];
          red[tok * L::RED_PITCH + r + 8] = acc[4 * j + 2];
          red[(tok + 1) * L::RED_PITCH + r + 8] = acc[4 * j + 3];
        }
      }
    } else if (c < pair) {
      T* out = reinterpret_cast<T*>(base_ptr) + c * BN * L::EPI_PITCH;     // [BN tokens, 128 rows (+ pad)]
      const int n_row0 = (rt0 + c) * TILE;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float* acc = half ? acc1[0] : acc0[0];
        const int r = half * 64 + warp * 16 + g;
        const float b_lo = bias ? to_float(bias[n_row0 + r]) : 0.f;
        const float b_hi = bias ? to_float(bias[n_row0 + r + 8]) : 0.f;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {   // accumulator block j: tokens 8j + 2t, + 1; rows r, r + 8
          const int tok = 8 * j + 2 * t;
          out[tok * L::EPI_PITCH + r] = from_float<T>(acc[4 * j + 0] + b_lo);
          out[(tok + 1) * L::EPI_PITCH + r] = from_float<T>(acc[4 * j + 1] + b_lo);
          out[tok * L::EPI_PITCH + r + 8] = from_float<T>(acc[4 * j + 2] + b_hi);
          out[(tok + 1) * L::EPI_PITCH + r + 8] = from_float<T>(acc[4 * j + 3] + b_hi);
        }
      }
      named_barrier(2 + c, 128);
      const int ct = threadIdx.x % 128;
#pragma unroll 4
      for (int q = ct; q < BN * 16; q += 128) {  // 16 chunks of 16 bytes a token row
        const int tok = q / 16, ch = q % 16;
        if (m0 + tok < M) {
          const uint4 v = *reinterpret_cast<const uint4*>(out + tok * L::EPI_PITCH + ch * 8);
          *reinterpret_cast<uint4*>(y + (int64_t)(m0 + tok) * stride_ym + n_row0 + ch * 8) = v;
        }
      }
    }
  }
  if (split == 1 && silu_mul) {   // one CTA: its two warpgroups' partials meet in its shared memory
    __syncthreads();
    if (wg > 0) {
      const uint32_t red = base;
      for (int i = (int)threadIdx.x - 128; i < BN * TILE / 4; i += 256) {
        const int tok = i / (TILE / 4), row = (i % (TILE / 4)) * 4;   // four gates (and their ups) a thread
        const uint32_t at = red + (uint32_t)(tok * L::RED_PITCH + row) * 4;
        float4 a = ld_shared_f4(at), u = ld_shared_f4(at + TILE * 4);
        if (m0 + tok >= M) continue;
        const int n = rt0 * TILE + row, nu = rt1 * TILE + row;        // W's gate and up rows
        if (bias) {
          a.x += to_float(bias[n]); a.y += to_float(bias[n + 1]); a.z += to_float(bias[n + 2]); a.w += to_float(bias[n + 3]);
          u.x += to_float(bias[nu]); u.y += to_float(bias[nu + 1]); u.z += to_float(bias[nu + 2]); u.w += to_float(bias[nu + 3]);
        }
        store4(y + (int64_t)(m0 + tok) * stride_ym + n, silu(a.x) * u.x, silu(a.y) * u.y, silu(a.z) * u.z,
               silu(a.w) * u.w);
      }
    }
  }
#else
  __trap();  // built for sm_90a only; the host refuses other GPUs
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (fn == nullptr) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q;
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q);
    TORCH_CHECK(err == cudaSuccess && q == cudaDriverEntryPointSuccess && p != nullptr,
                "patchc: cuTensorMapEncodeTiled is not available from the CUDA driver (needs CUDA 12+)");
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }
  return fn;
}

// A [rows, cols] row-major 16-bit matrix (row pitch `pitch` elements) read in [box_rows, box_cols] boxes, swizzled
// by the box's row bytes (128 or 64).
CUtensorMap tensor_map(const void* ptr, CUtensorMapDataType dt, int64_t rows, int64_t cols, int64_t pitch,
                       int box_rows, int box_cols) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
  const cuuint64_t strides[1] = {(cuuint64_t)pitch * 2};
  const cuuint32_t box[2] = {(cuuint32_t)box_cols, (cuuint32_t)box_rows};
  const cuuint32_t elem_strides[2] = {1, 1};
  const auto swizzle = box_cols * 2 == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B;
  const CUresult r = encode_fn()(&map, dt, 2, const_cast<void*>(ptr), dims, strides, box, elem_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                 CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(r == CUDA_SUCCESS, "patchc: cuTensorMapEncodeTiled failed (", (int)r, ") for a [", rows, ", ", cols,
              "] matrix with row pitch ", pitch);
  return map;
}

template <typename T, int BN, int ROWS>
void launch(const torch::Tensor& x, const torch::Tensor& dense, const torch::Tensor& values, const torch::Tensor& meta,
            const torch::Tensor& slot, const torch::Tensor& kinds, const c10::optional<torch::Tensor>& bias,
            torch::Tensor& y, CUtensorMapDataType dt, int split, bool silu_mul, bool pdl) {
  constexpr bool HALF = ROWS < 2 * TILE;
  using L = Layout<BN, HALF>;
  const int64_t M = x.size(0), K = x.size(1), R = slot.size(0), C = slot.size(1);
  const int box_rows = HALF ? ROWS : TILE;   // weight rows a box
  const CUtensorMap x_map = tensor_map(x.data_ptr(), dt, M, K, x.stride(0), BN, BOX_K);
  // An empty field gets a map over x: never read (no tile of that kind), but the kernel wants a valid map.
  const CUtensorMap d_map = dense.numel()
                                ? tensor_map(dense.data_ptr(), dt, dense.size(0) * TILE, TILE, TILE, box_rows, BOX_K)
                                : tensor_map(x.data_ptr(), dt, M, K, x.stride(0), box_rows, BOX_K);
  const CUtensorMap v_map = values.numel()
                                ? tensor_map(values.data_ptr(), dt, values.size(0) * TILE, TILE / 2, TILE / 2, box_rows,
                                             BOX_K / 2)
                                : tensor_map(x.data_ptr(), dt, M, K, x.stride(0), box_rows, BOX_K / 2);
  auto kernel = hybrid_wgmma_kernel<T, BN, ROWS>;
  TORCH_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::SMEM) == cudaSuccess,
              "patchc: could not raise the shared memory limit of the wgmma kernel to ", L::SMEM, " bytes");
  TileKinds tile_kinds;   // (all of it set: CUDA graphs keep the parameters' bytes)
  std::memset(&tile_kinds, 0, sizeof(tile_kinds));
  if (kinds.numel() <= KIND_WORDS) std::memcpy(tile_kinds.w, kinds.data_ptr<int>(), kinds.numel() * 4);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)((M + BN - 1) / BN), (unsigned)(HALF ? TILE / ROWS * R : silu_mul ? R / 2 : (R + 1) / 2),
                     (unsigned)split);
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = L::SMEM;
  cfg.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[2];
  int n_attr = 0;
  if (split > 1) {   // the K-splitting CTAs of one output tile: a cluster
    attr[n_attr].id = cudaLaunchAttributeClusterDimension;
    attr[n_attr].val.clusterDim.x = 1;
    attr[n_attr].val.clusterDim.y = 1;
    attr[n_attr].val.clusterDim.z = (unsigned)split;
    ++n_attr;
  }
  if (pdl) {         // may start while the previous kernel drains (the kernel waits for it before reading x)
    attr[n_attr].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n_attr].val.programmaticStreamSerializationAllowed = 1;
    ++n_attr;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n_attr;
  const cudaError_t err = cudaLaunchKernelEx(
      &cfg, kernel, x_map, d_map, v_map, (const uint8_t*)meta.data_ptr<uint8_t>(), (const int*)slot.data_ptr<int>(),
      (int)R, (int)C, bias ? reinterpret_cast<const T*>(bias->data_ptr()) : (const T*)nullptr,
      reinterpret_cast<T*>(y.data_ptr()), (int)M, (int64_t)y.stride(0), split, (int)silu_mul, (int)pdl,
      tile_kinds);
  // (no integers in these messages: streaming one segfaulted inside an extension on the GPU image; wgmma.py
  // validates block_n and split first)
  TORCH_CHECK(err == cudaSuccess, "patchc wgmma: launch failed: ", cudaGetErrorString(err));
}

template <typename T, int BN>
int max_clusters(int split) {
  using L = Layout<BN>;
  auto kernel = hybrid_wgmma_kernel<T, BN, 2 * TILE>;   // (64-row CTAs: one an SM too)
  TORCH_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::SMEM) == cudaSuccess,
              "patchc: could not raise the shared memory limit of the wgmma kernel");
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(1, 1, (unsigned)split);
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = L::SMEM;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = (unsigned)split;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  TORCH_CHECK(cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) == cudaSuccess, "patchc wgmma: occupancy query failed");
  return n;
}

}  // namespace patchc_wgmma

// How many clusters of `split` CTAs (block_n tokens each) the current GPU runs at once.
int64_t wgmma_max_clusters(int64_t block_n, int64_t split) {
  using namespace patchc_wgmma;
  TORCH_CHECK(split >= 1 && split <= 8, "patchc wgmma: split must be 1..8");
  switch (block_n) {
#define PATCHC_WGMMA_CASE(BN) \
  case BN:                    \
    return max_clusters<__nv_bfloat16, BN>((int)split);
    PATCHC_WGMMA_BLOCK_NS
#undef PATCHC_WGMMA_CASE
    default:
      TORCH_CHECK(false, "patchc wgmma: no kernel was built for this block_n");
  }
  return 0;
}

// y [M, N] (preallocated) = x [M, K] @ W^T (+ bias); W packed with tile 128, slot [R, C] and kinds (on the CPU)
// from its schedule;
// block_n: tokens a CTA (16, 32, 64 or 128); split: CTAs (a cluster) splitting K, 1..8; silu_mul: W = [gate; up]
// and y [M, N / 2] = SiLU(x gate^T + b_gate) * (x up^T + b_up); pdl: launched as a programmatic dependent;
// rows: rows of W a CTA, 256 (two row-tiles) or 64 (half a row-tile: decode, block_n 16, no silu_mul).
void hybrid_wgmma(torch::Tensor x, torch::Tensor dense, torch::Tensor values, torch::Tensor meta, torch::Tensor slot,
                  torch::Tensor kinds, c10::optional<torch::Tensor> bias, torch::Tensor y, int64_t block_n,
                  int64_t split, int64_t silu_mul, int64_t pdl, int64_t rows) {
  using namespace patchc_wgmma;
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1 && x.stride(0) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "patchc wgmma: x must be a CUDA [M, K] matrix with contiguous, 16-byte aligned rows");
  TORCH_CHECK(slot.dim() == 2 && slot.scalar_type() == torch::kInt && slot.is_contiguous() && slot.is_cuda() &&
                  slot.size(1) <= MAX_C && x.size(1) == slot.size(1) * TILE &&
                  y.size(1) * (silu_mul ? 2 : 1) == slot.size(0) * TILE && (!silu_mul || slot.size(0) % 2 == 0) &&
                  y.size(0) == x.size(0) && y.stride(1) == 1 && y.stride(0) % 8 == 0,
              "patchc wgmma: x ", x.sizes(), ", y ", y.sizes(), " and the schedule's slots ", slot.sizes(),
              " do not fit (tile 128, K <= ", MAX_C * TILE, ")");
  const int64_t kind_w = (slot.size(1) + 31) / 32;
  TORCH_CHECK(!kinds.is_cuda() && kinds.scalar_type() == torch::kInt && kinds.dim() == 1 && kinds.is_contiguous() &&
                  kinds.numel() == 1 + 2 * slot.size(0) * kind_w && kinds.data_ptr<int>()[0] == kind_w,
              "patchc wgmma: kinds must be the schedule's tile_kinds (a CPU int32 vector of 1 + 2 R ceil(C / 32)) for "
              "slots ", slot.sizes());
  TORCH_CHECK(dense.scalar_type() == x.scalar_type() && values.scalar_type() == x.scalar_type() &&
                  y.scalar_type() == x.scalar_type(), "patchc wgmma: weights, x and y must share one 16-bit dtype");
  const bool bf16 = x.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf16 || x.scalar_type() == torch::kHalf, "patchc wgmma: bf16 or fp16 only");
  const auto dt = bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  TORCH_CHECK(split >= 1 && split <= 8 && split <= slot.size(1), "patchc wgmma: split must be 1..8 and at most the "
              "K-tiles");
  TORCH_CHECK(pdl == 0 || pdl == 1, "patchc wgmma: pdl must be 0 or 1");
  TORCH_CHECK(split == 1 || block_n <= 32, "patchc wgmma: K split over a cluster is for 16-token (decode) CTAs");
  TORCH_CHECK(rows == 256 || (rows == 64 && block_n == 16 && silu_mul == 0),
              "patchc wgmma: rows a CTA must be 256, or 64 for 16-token CTAs without silu_mul");
  TORCH_CHECK(!bias || (bias->is_cuda() && bias->is_contiguous() && bias->scalar_type() == x.scalar_type() &&
                        bias->numel() == slot.size(0) * TILE),
              "patchc wgmma: bias must be a contiguous CUDA vector of N elements in x's dtype");
  const int s = (int)split;
  const bool silu = silu_mul != 0, dep = pdl != 0;
  if (rows == 64) {
    if (bf16) launch<__nv_bfloat16, 16, 64>(x, dense, values, meta, slot, kinds, bias, y, dt, s, false, dep);
    else launch<__half, 16, 64>(x, dense, values, meta, slot, kinds, bias, y, dt, s, false, dep);
    return;
  }
  switch (block_n) {
#define PATCHC_WGMMA_CASE(BN)                                                                              \
  case BN:                                                                                                 \
    if (bf16) launch<__nv_bfloat16, BN, 256>(x, dense, values, meta, slot, kinds, bias, y, dt, s, silu, dep); \
    else launch<__half, BN, 256>(x, dense, values, meta, slot, kinds, bias, y, dt, s, silu, dep);            \
    break;
    PATCHC_WGMMA_BLOCK_NS
#undef PATCHC_WGMMA_CASE
    default:
      TORCH_CHECK(false, "patchc wgmma: no kernel was built for this block_n");
  }
}
