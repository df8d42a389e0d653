// Decode kernel for hybrid (dense / 2:4) tile weights on the sparse tensor cores (sm_80+).
//
// y[M, N] = x[M, K] @ (W * Mask)[N, K]^T + bias, for small M (decode). W is stored in patchc's packed
// format (patchc/format.py): dense tiles [n_dense, T, T], 2:4 tiles as values [n_sparse, T, T/2] and
// 4-bit codes [n_sparse, T, T/8] (low 2 bits = first kept position, two groups a byte, low nibble first).
// Those codes are what mma.sp's metadata operand wants, so a 2:4 tile goes to the tensor cores as it is
// stored: no decompression instruction at all. Dense tiles use plain mma.sync.
//
// The weight is the A operand ("swap AB"): A = 16 output rows x K, B = x^T (K x 8 batch rows a block),
// C = y^T. One CTA owns R 16-row slices of one row-tile (R = 1 or 2: each load of x then serves R
// slices) and all of K; its warps take that row-tile's tiles round-robin (dense first, then 2:4, in
// storage order) and reduce through shared memory at the end, so the output is written once, in the
// output dtype, by one launch. Weights reach the registers either by direct loads (bypassing L1), or
// (STAGED, sm_90+) through a ring of two shared-memory buffers per warp that the bulk copy engine fills a
// tile ahead: faster at M <= 8 on mostly-dense layers, slower with many 2:4 tiles (bench/NOTES.md, v7).
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16" and "... sparse mma.m16n8k32"):
// lane = 4 * g + t (g = groupID, t = threadID_in_group). A (16 x 16 dense, or 16 x 32 sparse stored as
// 16 x 16 values): regs {row g, k 2t..2t+1}, {row g+8, same}, {row g, k 2t+8..}, {row g+8, k 2t+8..};
// B (k x 8): regs k = 2t..2t+1 (+8, +16, +24), column g; C: {row g, col 2t, 2t+1}, {row g+8, same}.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "device_common.cuh"

namespace patchc {
using namespace patchc_device;

template <typename T> struct Mma;

#define PATCHC_MMA(TYPE, PTX_T, TO_F, FROM_F)                                                           \
  template <> struct Mma<TYPE> {                                                                        \
    __device__ __forceinline__ static float to_float(TYPE v) { return TO_F(v); }                         \
    __device__ __forceinline__ static TYPE from_float(float v) { return FROM_F(v); }                      \
    __device__ __forceinline__ static void dense(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) { \
      asm("mma.sync.aligned.m16n8k16.row.col.f32." PTX_T "." PTX_T ".f32 "                               \
          "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                                     \
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                              \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                              \
    }                                                                                                   \
    __device__ __forceinline__ static void sparse(float* c, const uint32_t* a, const uint32_t* b, uint32_t e) { \
      asm("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." PTX_T "." PTX_T ".f32 "         \
          "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"                   \
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                              \
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),    \
            "r"(e));                                                                                    \
    }                                                                                                   \
  };
PATCHC_MMA(__nv_bfloat16, "bf16", __bfloat162float, __float2bfloat16_rn)
PATCHC_MMA(__half, "f16", __half2float, __float2half_rn)
#undef PATCHC_MMA

// x: read-only, cached in L1 (every warp of the CTA reads it again). Weights: read once, so they bypass L1
// (L1::no_allocate) and leave it to x.
__device__ __forceinline__ uint4 ld128(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint4 ld128_once(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}
__device__ __forceinline__ uint2 ld64_once(const void* p) {
  uint2 r;
  asm("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "l"(p));
  return r;
}
// Staged path (sm_90+): each warp streams its tiles into a ring of STAGES shared-memory buffers with the
// bulk-copy engine (cp.async.bulk, completion on an mbarrier), so the loads in flight are held in shared
// memory rather than registers, and the next tiles' bytes arrive while the tensor cores run this one.
constexpr int STAGES = 2;
// A tile's rows of this CTA are one contiguous span per field, fetched with one bulk copy each and laid out
// as stored (row by row into a padded pitch was 1.1-1.4x slower with 2:4 tiles on the H100: many 128-byte
// copies). Unpadded, the two rows a quarter-warp reads share banks (2-way conflicts on ld.shared.v4).
template <typename T, int R, int TILE>
struct Stage {
  static constexpr int DENSE_PITCH = TILE * (int)sizeof(T);                    // a dense row
  static constexpr int VALUE_PITCH = TILE / 2 * (int)sizeof(T);                // a 2:4 row's kept values
  static constexpr int DENSE_BYTES = 16 * R * DENSE_PITCH;                     // bytes a dense tile brings
  static constexpr int META_OFFSET = 16 * R * VALUE_PITCH;                     // codes after the values
  static constexpr int SPARSE_BYTES = META_OFFSET + 16 * R * TILE / 8;         // bytes a 2:4 tile brings
  static constexpr int SIZE = DENSE_BYTES > SPARSE_BYTES ? DENSE_BYTES : SPARSE_BYTES;
};

__device__ __forceinline__ uint4 lds128(uint32_t a) {
  uint4 r;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(a));
  return r;
}
__device__ __forceinline__ uint2 lds64(uint32_t a) {
  uint2 r;
  asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];" : "=r"(r.x), "=r"(r.y) : "r"(a));
  return r;
}
// MB: batch blocks of 8 rows (M <= 8 * MB); R: 16-row slices a CTA owns (each warp runs its tiles for all R
// slices, so one load of x serves R slices); TILE: the tile size (64 or 128); STAGED: weights through the
// shared-memory ring (sm_90+) instead of direct loads. Launched as a programmatic dependent (sm_90+, under CUDA
// graph capture), a CTA may start while the previous kernel drains: the schedule and (STAGED) the first tiles'
// copies, which no kernel of the forward writes, go ahead; x and y wait for the previous kernel.
template <typename T, int MB, int R, int TILE, bool STAGED>
__global__ void __launch_bounds__(512) hybrid_mma_sp_kernel(
    const T* __restrict__ x, int M, int64_t stride_xm,
    const T* __restrict__ dense, const T* __restrict__ values, const uint8_t* __restrict__ meta,
    const int* __restrict__ dense_col, const int* __restrict__ sparse_col,
    const int* __restrict__ dense_start, const int* __restrict__ sparse_start,
    const T* __restrict__ bias, T* __restrict__ y, int64_t stride_ym, int up_rt) {
  // Dynamic shared memory: the STAGED ring ([warps, STAGES] buffers, then [warps, STAGES] mbarriers); after the
  // tile loop, the cross-warp reduction's [warps, 8 * MB batch rows, 16 * R + 4] fp32 partials (aliasing it).
  extern __shared__ __align__(16) unsigned char smem[];
  float* partial = reinterpret_cast<float*>(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * (16 * R);                  // first output feature of this CTA
  // SiLU(gate) * up (up_rt > 0: W is gate rows then up rows, up_rt row-tiles in): the first half of the warps
  // run the gate row-tile's tiles, the second half the up row-tile's, and the reduction combines the halves.
  const bool silu = up_rt > 0;
  const int team = silu ? warps / 2 : warps;             // warps sharing one row-tile's tiles
  const int wid = silu ? warp % team : warp;             // this warp's place in its team
  const int rt = n0 / TILE + (silu && warp >= team ? up_rt : 0), r0 = n0 % TILE;  // row-tile, first row in it
  const int d0 = dense_start[rt], nd = dense_start[rt + 1] - d0;
  const int s0 = sparse_start[rt], ns = sparse_start[rt + 1] - s0;

  // B fragments: this lane reads batch row m = 8 * b + g of x (zeros past M).
  const T* xrow[MB];
  bool xok[MB];
#pragma unroll
  for (int b = 0; b < MB; ++b) {
    xok[b] = 8 * b + g < M;
    xrow[b] = x + (xok[b] ? (int64_t)(8 * b + g) * stride_xm : 0);
  }
  float acc[R][MB][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < MB; ++b) acc[r][b][0] = acc[r][b][1] = acc[r][b][2] = acc[r][b][3] = 0.f;
  const uint4 zero = make_uint4(0, 0, 0, 0);

  // Each warp keeps the K columns of its next 32 tiles in a register (one load, then shuffles), so x's loads
  // do not wait on a dependent load of the tile's column every turn.
  const int n_tiles = nd + ns;
  int col_next = 0;  // K column of tile warp + (it0 + lane) * warps, for this warp's turns it0..it0+31

  using S = Stage<T, R, TILE>;
  const uint32_t ring = smem_u32(smem) + warp * STAGES * S::SIZE;               // this warp's buffers
  const uint32_t bars = smem_u32(smem) + warps * STAGES * S::SIZE + warp * STAGES * 8;
  // Ask the bulk copy engine for tile jj's rows of this CTA into buffer `buf` (one copy per field).
  auto fetch = [&](int jj, int buf) {
    if (jj >= n_tiles) return;
    const uint32_t dst = ring + buf * S::SIZE, bar = bars + buf * 8;
    if (lane == 0) {
      mbar_expect(bar, jj < nd ? S::DENSE_BYTES : S::SPARSE_BYTES);
      if (jj < nd) {
        bulk_copy(dst, dense + ((int64_t)(d0 + jj) * TILE + r0) * TILE, S::DENSE_BYTES, bar);
      } else {
        const int64_t i = s0 + (jj - nd);
        bulk_copy(dst, values + (i * TILE + r0) * (TILE / 2), S::META_OFFSET, bar);
        bulk_copy(dst + S::META_OFFSET, meta + (i * TILE + r0) * (TILE / 8), 16 * R * TILE / 8, bar);
      }
    }
  };
  if constexpr (STAGED) {
    if (lane == 0) {
      for (int b = 0; b < STAGES; ++b) mbar_init(bars + b * 8, 1);
      fence_mbar_init();
    }
    __syncwarp();
    for (int b = 0; b < STAGES; ++b) fetch(wid + b * team, b);
  }
  launch_dependents();      // the next programmatic launch may start (its waits cover our writes)
  grid_dependency_wait();   // x (and y's storage) may come from the previous kernel

  for (int it = 0, j = wid; j < n_tiles; ++it, j += team) {
    if ((it & 31) == 0) {
      const int jj = j + lane * team;
      col_next = jj < nd ? dense_col[d0 + jj] : (jj < n_tiles ? sparse_col[s0 + jj - nd] : 0);
    }
    const int kc = __shfl_sync(0xffffffffu, col_next, it & 31) * TILE;
    const int buf = it % STAGES;
    const uint32_t sb = ring + buf * S::SIZE;                                     // this tile's buffer (STAGED)
    if constexpr (STAGED) mbar_wait(bars + buf * 8, (it / STAGES) & 1);
    if (j < nd) {
      // Dense tile: each slice's 16 rows are 16 * TILE contiguous weights. Each 32-column span is two k16
      // steps; lane t reads columns 8t..8t+7 of the span from A's rows g, g+8 and from x (one 16-byte load
      // each) and feeds 8t..8t+3 to step 0, 8t+4..8t+7 to step 1: a permutation of K applied to A and B alike.
      const int i = d0 + j;
      const T* w = dense + ((int64_t)i * TILE + r0) * TILE;  // [16 * R, TILE]
#pragma unroll
      for (int s = 0; s < TILE / 32; ++s) {
        uint4 xb[MB], lo[R], hi[R];
#pragma unroll
        for (int b = 0; b < MB; ++b) xb[b] = xok[b] ? ld128(xrow[b] + kc + 32 * s + 8 * t) : zero;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if constexpr (STAGED) {
            lo[r] = lds128(sb + (16 * r + g) * S::DENSE_PITCH + (32 * s + 8 * t) * sizeof(T));
            hi[r] = lds128(sb + (16 * r + g + 8) * S::DENSE_PITCH + (32 * s + 8 * t) * sizeof(T));
          } else {
            lo[r] = ld128_once(w + (16 * r + g) * TILE + 32 * s + 8 * t);
            hi[r] = ld128_once(w + (16 * r + g + 8) * TILE + 32 * s + 8 * t);
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint32_t a0[4] = {lo[r].x, hi[r].x, lo[r].y, hi[r].y};
          const uint32_t a1[4] = {lo[r].z, hi[r].z, lo[r].w, hi[r].w};
#pragma unroll
          for (int b = 0; b < MB; ++b) {
            Mma<T>::dense(acc[r][b], a0, xb[b].x, xb[b].y);
            Mma<T>::dense(acc[r][b], a1, xb[b].z, xb[b].w);
          }
        }
      }
    } else {
      // 2:4 tile, in 64-column double spans (two mma.sp each). Lane t's 16-byte loads of rows g and g+8
      // hold the stored pairs of the span's groups 4t..4t+3, which feed logical groups t and 4+t of both
      // steps (step c: t <- group 4t+c, 4+t <- group 4t+2+c). That permutes whole groups of K, so the
      // metadata nibbles and the x columns are gathered to match (byte permutes and selects, no memory).
      const int i = s0 + (j - nd);
      const T* v = values + ((int64_t)i * TILE + r0) * (TILE / 2);           // [16 * R, TILE / 2]
      const uint8_t* e = meta + ((int64_t)i * TILE + r0) * (TILE / 8);       // [16 * R, TILE / 8]
      const bool odd = t & 1;
      const int h = t >> 1;
      const uint32_t sel = odd ? 0x7531u : 0x6420u;
#pragma unroll
      for (int d = 0; d < TILE / 64; ++d) {
        uint4 vg[R], vh[R];
        uint2 eg[R], eh[R];
        uint32_t x0[MB][4], x1[MB][4];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if constexpr (STAGED) {
            vg[r] = lds128(sb + (16 * r + g) * S::VALUE_PITCH + (32 * d + 8 * t) * sizeof(T));
            vh[r] = lds128(sb + (16 * r + g + 8) * S::VALUE_PITCH + (32 * d + 8 * t) * sizeof(T));
            eg[r] = lds64(sb + S::META_OFFSET + (16 * r + g) * (TILE / 8) + 8 * d);
            eh[r] = lds64(sb + S::META_OFFSET + (16 * r + g + 8) * (TILE / 8) + 8 * d);
          } else {
            vg[r] = ld128_once(v + (16 * r + g) * (TILE / 2) + 32 * d + 8 * t);
            vh[r] = ld128_once(v + (16 * r + g + 8) * (TILE / 2) + 32 * d + 8 * t);
            eg[r] = ld64_once(e + (16 * r + g) * (TILE / 8) + 8 * d);          // 16 groups of row g
            eh[r] = ld64_once(e + (16 * r + g + 8) * (TILE / 8) + 8 * d);      // and of row g + 8
          }
        }
#pragma unroll
        for (int b = 0; b < MB; ++b) {
          // x columns of step c for lane t: 16h + 4c + 2odd (+8, +32, +40) within the double span
          const T* xs = xrow[b] + kc + 64 * d + 16 * h;
          const uint4 p0 = xok[b] ? ld128(xs) : zero, p1 = xok[b] ? ld128(xs + 8) : zero;
          const uint4 q0 = xok[b] ? ld128(xs + 32) : zero, q1 = xok[b] ? ld128(xs + 40) : zero;
          x0[b][0] = odd ? p0.y : p0.x;  x0[b][1] = odd ? q0.y : q0.x;
          x0[b][2] = odd ? p1.y : p1.x;  x0[b][3] = odd ? q1.y : q1.x;
          x1[b][0] = odd ? p0.w : p0.z;  x1[b][1] = odd ? q0.w : q0.z;
          x1[b][2] = odd ? p1.w : p1.z;  x1[b][3] = odd ? q1.w : q1.z;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          // Metadata (selector 0): lane 4g gives logical groups 0..3 = stored groups 4q + c, lane 4g+1
          // groups 4..7 = stored 4(q-4) + 2 + c; each as row g in bits 0..15 and row g+8 in bits 16..31.
          const uint32_t pg = __byte_perm(eg[r].x, eg[r].y, sel), ph = __byte_perm(eh[r].x, eh[r].y, sel);
          uint32_t em[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            uint32_t ng = (pg >> (4 * c)) & 0x0F0F0F0Fu, nh = (ph >> (4 * c)) & 0x0F0F0F0Fu;
            ng |= ng >> 4;
            nh |= nh >> 4;
            em[c] = __byte_perm(ng, nh, 0x6420u);
          }
          const uint32_t a0[4] = {vg[r].x, vh[r].x, vg[r].z, vh[r].z};
          const uint32_t a1[4] = {vg[r].y, vh[r].y, vg[r].w, vh[r].w};
#pragma unroll
          for (int b = 0; b < MB; ++b) {
            Mma<T>::sparse(acc[r][b], a0, x0[b], em[0]);
            Mma<T>::sparse(acc[r][b], a1, x1[b], em[1]);
          }
        }
      }
    }
    if constexpr (STAGED) {  // every lane has read this buffer: refill it with the tile STAGES turns ahead
      __syncwarp();
      fence_proxy_async();
      fetch(j + STAGES * team, buf);
    }
  }
  if constexpr (STAGED) __syncthreads();  // the partials below alias other warps' buffers
  // Partials [warps, COLS batch rows, PITCH] with the rows innermost: the reduction's reads (neighbouring
  // threads, neighbouring rows) are conflict-free, and the pad (PITCH = ROWS + 4) spreads the stores of the
  // four t's of a quarter-warp over distinct banks (row-innermost without it, or batch-innermost as before,
  // was a 4-16-way conflict: ncu saw 94% of the shared-load wavefronts as conflicts, at the CTA's tail).
  constexpr int ROWS = 16 * R, COLS = 8 * MB, PITCH = ROWS + 4;
  float* mine = partial + warp * COLS * PITCH;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < MB; ++b) {
      mine[(8 * b + 2 * t) * PITCH + 16 * r + g] = acc[r][b][0];
      mine[(8 * b + 2 * t + 1) * PITCH + 16 * r + g] = acc[r][b][1];
      mine[(8 * b + 2 * t) * PITCH + 16 * r + g + 8] = acc[r][b][2];
      mine[(8 * b + 2 * t + 1) * PITCH + 16 * r + g + 8] = acc[r][b][3];
    }
  __syncthreads();
  for (int o = threadIdx.x; o < ROWS * COLS; o += blockDim.x) {
    const int row = o % ROWS, m = o / ROWS;              // neighbouring threads write neighbouring features
    if (m >= M) continue;
    float sum = 0.f;
    for (int w = 0; w < team; ++w) sum += partial[(w * COLS + m) * PITCH + row];
    if (bias != nullptr) sum += Mma<T>::to_float(bias[n0 + row]);
    if (silu) {  // sum is the gate: SiLU(gate) * up, up from the second team (and the bias's second half)
      float up = 0.f;
      for (int w = team; w < warps; ++w) up += partial[(w * COLS + m) * PITCH + row];
      if (bias != nullptr) up += Mma<T>::to_float(bias[up_rt * TILE + n0 + row]);
      sum = sum / (1.f + __expf(-sum)) * up;
    }
    y[(int64_t)m * stride_ym + n0 + row] = Mma<T>::from_float(sum);
  }
}

}  // namespace patchc

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

namespace patchc {

// Dynamic shared memory of a launch: the cross-warp partials, or for STAGED the ring (which they alias) + barriers.
template <typename T, int R, int TILE>
size_t smem_bytes(bool staged, int warps, int mb) {
  const size_t partial = sizeof(float) * warps * 8 * mb * (16 * R + 4);  // PITCH = rows + 4
  if (!staged) return partial;
  const size_t ring = (size_t)warps * STAGES * Stage<T, R, TILE>::SIZE;
  return (ring > partial ? ring : partial) + (size_t)warps * STAGES * 8;
}

// One launch's arguments, as the host entry point gathered them (pointers untyped until the dtype is dispatched).
struct Launch {
  int mb, rows, tile, warps;  // batch blocks of 8, 16-row slices a CTA, tile size, warps a CTA
  bool staged, pdl;           // weights through the shared-memory ring; programmatic dependent launch
  dim3 grid;
  cudaStream_t stream;
  const void* x; int M; int64_t sxm;
  const void *dense, *values; const uint8_t* meta;
  const int *dcol, *scol, *dstart, *sstart;
  const void* bias; void* y; int64_t sym;
  int up_rt;
};

template <typename T, int MB, int R, int TILE, bool STAGED>
void launch_kernel(const Launch& a) {
  auto kernel = hybrid_mma_sp_kernel<T, MB, R, TILE, STAGED>;
  const size_t smem = smem_bytes<T, R, TILE>(STAGED, a.warps, MB);
  if (smem > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = a.grid;
  cfg.blockDim = dim3(32 * a.warps);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = a.stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;  // may start while the previous kernel drains
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = a.pdl ? 1 : 0;
  auto t = [](const void* p) { return static_cast<const T*>(p); };
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, t(a.x), a.M, a.sxm, t(a.dense), t(a.values), a.meta, a.dcol, a.scol,
                                    a.dstart, a.sstart, t(a.bias), static_cast<T*>(a.y), a.sym, a.up_rt));
}

template <typename T, int MB, int R>
void launch_tile(const Launch& a) {
  if (a.tile == 64) {
    if (a.staged) launch_kernel<T, MB, R, 64, true>(a); else launch_kernel<T, MB, R, 64, false>(a);
  } else {
    if (a.staged) launch_kernel<T, MB, R, 128, true>(a); else launch_kernel<T, MB, R, 128, false>(a);
  }
}

template <typename T>
void launch_typed(const Launch& a) {
  if (a.rows == 1) {
    if (a.mb == 1) launch_tile<T, 1, 1>(a); else if (a.mb == 2) launch_tile<T, 2, 1>(a); else launch_tile<T, 4, 1>(a);
  } else {
    if (a.mb == 1) launch_tile<T, 1, 2>(a); else launch_tile<T, 2, 2>(a);  // M > 16 with 2 slices would spill
  }
}

}  // namespace patchc

// x [M, K] (unit column stride), packed tiles, schedule (int32, on x's device) -> y [M, n_out] (written).
// The caller (codegen/mma_sp.py) checks dtypes, shapes and alignment before calling.
void hybrid_mma_sp(torch::Tensor x, torch::Tensor dense, torch::Tensor values, torch::Tensor meta,
                   torch::Tensor dense_col, torch::Tensor sparse_col, torch::Tensor dense_start,
                   torch::Tensor sparse_start, c10::optional<torch::Tensor> bias, torch::Tensor y,
                   int64_t tile, int64_t warps, int64_t slices, int64_t staged, int64_t silu_mul,
                   int64_t pdl) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "hybrid_mma_sp: x must be a CUDA [M, K] row-major");
  // Messages carry no numbers: streaming an integer into an error message crashed inside this extension on
  // the GPU image (libstdc++ mismatch); codegen/mma_sp.py validates the arguments with readable errors first.
  TORCH_CHECK(tile == 64 || tile == 128, "hybrid_mma_sp: tile must be 64 or 128");
  const int M = x.size(0);
  const int64_t n_out = y.size(1);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == M && y.stride(1) == 1 && y.scalar_type() == x.scalar_type(),
              "hybrid_mma_sp: y must be a row-major [M, n_out] of x's dtype");
  TORCH_CHECK((slices == 1 || slices == 2) && n_out % (16 * slices) == 0 && warps >= 1 && warps <= 16,
              "hybrid_mma_sp: bad n_out / warps / slices");
  TORCH_CHECK(M >= 1 && M <= 32, "hybrid_mma_sp: M must be in 1..32");
  const int mb = M <= 8 ? 1 : (M <= 16 ? 2 : 4);
  TORCH_CHECK(slices == 1 || mb <= 2, "hybrid_mma_sp: 2 slices a CTA need M <= 16");
  // silu_mul: the weights are [gate; up], 2 * n_out rows, and y = SiLU(x @ gate^T) * (x @ up^T)
  const int64_t w_rows = (dense_start.size(0) - 1) * tile;
  TORCH_CHECK(w_rows == (silu_mul ? 2 : 1) * n_out, "hybrid_mma_sp: the schedule's rows do not match n_out");
  TORCH_CHECK(!silu_mul || (warps % 2 == 0 && n_out % tile == 0),
              "hybrid_mma_sp: SiLU*up needs an even number of warps and n_out a multiple of the tile");
  const int up_rt = silu_mul ? (int)(n_out / tile) : 0;
  const c10::cuda::CUDAGuard guard(x.device());
  const dim3 grid(n_out / (16 * slices));
  TORCH_CHECK(staged || sizeof(float) * warps * 8 * mb * (16 * slices + 4) <= 48 * 1024,
              "hybrid_mma_sp: warps x slices need more than 48 KB of shared memory");
  TORCH_CHECK(pdl == 0 || pdl == 1, "hybrid_mma_sp: pdl must be 0 or 1");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "hybrid_mma_sp: x must be bfloat16 or float16");
  patchc::Launch a;
  a.mb = mb; a.rows = (int)slices; a.tile = (int)tile; a.warps = (int)warps;
  a.staged = staged != 0; a.pdl = pdl != 0;
  a.grid = grid;
  a.stream = c10::cuda::getCurrentCUDAStream();
  a.x = x.data_ptr(); a.M = M; a.sxm = x.stride(0);
  a.dense = dense.data_ptr(); a.values = values.data_ptr(); a.meta = meta.data_ptr<uint8_t>();
  a.dcol = dense_col.data_ptr<int>(); a.scol = sparse_col.data_ptr<int>();
  a.dstart = dense_start.data_ptr<int>(); a.sstart = sparse_start.data_ptr<int>();
  a.bias = bias ? bias->data_ptr() : nullptr; a.y = y.data_ptr(); a.sym = y.stride(0);
  a.up_rt = up_rt;
  if (x.scalar_type() == at::kBFloat16) patchc::launch_typed<__nv_bfloat16>(a);
  else patchc::launch_typed<__half>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
