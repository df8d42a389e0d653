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
#include <cooperative_groups.h>
#include <stdint.h>

namespace patchc {

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

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
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
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(uint32_t bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n\tfence.mbarrier_init.release.cluster;" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n\t.reg .pred P1;\n"
      "WAIT:\n\tmbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "\t@!P1 bra WAIT;\n}" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
// Shared-memory reads of a buffer (generic proxy) before the bulk copy engine (async proxy) refills it.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
#else
__device__ __forceinline__ void mbar_init(uint32_t) { __trap(); }
__device__ __forceinline__ void mbar_expect(uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void mbar_wait(uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void bulk_copy(uint32_t, const void*, uint32_t, uint32_t) { __trap(); }
__device__ __forceinline__ void fence_proxy_async() {}
#endif

// 16-byte asynchronous copies global -> shared (sm_80+), in commit groups: the row-tile kernel's x ring.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
#else
__device__ __forceinline__ void cp_async16(uint32_t, const void*) { __trap(); }
__device__ __forceinline__ void cp_async_commit() {}
template <int N> __device__ __forceinline__ void cp_async_wait() {}
#endif

// MB: batch blocks of 8 rows (M <= 8 * MB); R: 16-row slices a CTA owns (each warp runs its tiles for all R
// slices, so one load of x serves R slices); TILE: the tile size (64 or 128); STAGED: weights through the
// shared-memory ring (sm_90+) instead of direct loads.
template <typename T, int MB, int R, int TILE, bool STAGED>
__global__ void __launch_bounds__(512) hybrid_mma_sp_kernel(
    const T* __restrict__ x, int M, int64_t stride_xm,
    const T* __restrict__ dense, const T* __restrict__ values, const uint8_t* __restrict__ meta,
    const int* __restrict__ dense_col, const int* __restrict__ sparse_col,
    const int* __restrict__ dense_start, const int* __restrict__ sparse_start,
    const T* __restrict__ bias, T* __restrict__ y, int64_t stride_ym, int up_rt) {
  // Dynamic shared memory: the STAGED ring ([warps, STAGES] buffers, then [warps, STAGES] mbarriers); after the
  // tile loop, the cross-warp reduction's [warps, 16 * R rows, 8 * MB batch rows] fp32 partials (aliasing it).
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
    if (lane == 0)
      for (int b = 0; b < STAGES; ++b) mbar_init(bars + b * 8);
    __syncwarp();
    for (int b = 0; b < STAGES; ++b) fetch(wid + b * team, b);
  }

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
  constexpr int ROWS = 16 * R, COLS = 8 * MB;
  float* mine = partial + warp * ROWS * COLS;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < MB; ++b) {
      mine[(16 * r + g) * COLS + 8 * b + 2 * t] = acc[r][b][0];
      mine[(16 * r + g) * COLS + 8 * b + 2 * t + 1] = acc[r][b][1];
      mine[(16 * r + g + 8) * COLS + 8 * b + 2 * t] = acc[r][b][2];
      mine[(16 * r + g + 8) * COLS + 8 * b + 2 * t + 1] = acc[r][b][3];
    }
  __syncthreads();
  for (int o = threadIdx.x; o < ROWS * COLS; o += blockDim.x) {
    const int row = o % ROWS, m = o / ROWS;              // neighbouring threads write neighbouring features
    if (m >= M) continue;
    float sum = 0.f;
    for (int w = 0; w < team; ++w) sum += partial[(w * ROWS + row) * COLS + m];
    if (bias != nullptr) sum += Mma<T>::to_float(bias[n0 + row]);
    if (silu) {  // sum is the gate: SiLU(gate) * up, up from the second team (and the bias's second half)
      float up = 0.f;
      for (int w = team; w < warps; ++w) up += partial[(w * ROWS + row) * COLS + m];
      if (bias != nullptr) up += Mma<T>::to_float(bias[up_rt * TILE + n0 + row]);
      sum = sum / (1.f + __expf(-sum)) * up;
    }
    y[(int64_t)m * stride_ym + n0 + row] = Mma<T>::from_float(sum);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Row-tile kernel (sm_90+). The kernel above gives a CTA 16-32 output rows and all of K, its warps splitting the
// K-tiles, so every CTA reads all of x: at M=16 that is 16 * K * 2 bytes from L2 a CTA, 0.5-0.9x the bytes of
// the weights themselves. Here a thread-block cluster owns one row-tile (TILE output rows): its CL = SPLIT CTAs
// (2 * SPLIT for SiLU * up: SPLIT on the gate row-tile, SPLIT on the up row-tile) share the row-tile's tiles by
// bytes (a dense tile counts 16, a 2:4 tile 9), and inside a CTA warp w owns rows 16w..16w+15 of every tile. So
// a tile's x columns are read once by the CTA, into a ring of shared-memory slots by cp.async two tiles ahead,
// and serve all TILE rows. Each warp holds its weights one tile ahead in registers (direct loads, L1 bypassed).
// The CTAs' fp32 partials are summed across the cluster through distributed shared memory and y is written
// once, in the output dtype, by one launch.
constexpr int RT_XS = 3;  // x ring slots (tiles in flight: the one computed, two arriving)

template <typename T, int TILE>
struct RtFrag {         // one warp's 16 rows of one tile, as loaded
  uint4 w[TILE / 16];   // dense: [TILE / 32 steps][rows g, g + 8]; 2:4 values: [TILE / 64 double spans][g, g + 8]
  uint2 e[TILE / 32];   // 2:4 codes: [TILE / 64][g, g + 8]
};

template <typename T, int MB, int TILE>
struct RtSmem {
  static constexpr int COLS = 8 * MB;                                   // batch rows a fragment covers
  static constexpr int PITCH = (TILE + 32) * (int)sizeof(T);            // an x row (+64 B: rows g, g+1 on other banks)
  static constexpr int SLOT = COLS * PITCH;                             // one tile's x columns
  static constexpr int PARTIAL = COLS * TILE * (int)sizeof(float);      // [COLS, TILE] fp32 partials
  static constexpr int BYTES = PARTIAL + RT_XS * SLOT;
};

template <typename T, int MB, int TILE>
__global__ void __launch_bounds__(2 * TILE, 256 / TILE) hybrid_mma_sp_rowtile_kernel(
    const T* __restrict__ x, int M, int64_t stride_xm,
    const T* __restrict__ dense, const T* __restrict__ values, const uint8_t* __restrict__ meta,
    const int* __restrict__ dense_col, const int* __restrict__ sparse_col,
    const int* __restrict__ dense_start, const int* __restrict__ sparse_start,
    const T* __restrict__ bias, T* __restrict__ y, int64_t stride_ym, int up_rt, int split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using S = RtSmem<T, MB, TILE>;
  constexpr int NT = 2 * TILE, COLS = S::COLS;  // threads: TILE / 16 warps
  extern __shared__ __align__(16) unsigned char smem[];
  float* partial = reinterpret_cast<float*>(smem);                       // [COLS, TILE]
  const uint32_t xring = smem_u32(smem + S::PARTIAL);                    // [RT_XS][COLS rows of PITCH bytes]
  cg::cluster_group cluster = cg::this_cluster();
  const int cl = (int)cluster.num_blocks(), c = (int)cluster.block_rank();
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x / cl * TILE;                                 // first output feature of the cluster
  const int rt = n0 / TILE + (c >= split ? up_rt : 0), r0 = 16 * warp;   // this CTA's row-tile, the warp's rows
  const int d0 = dense_start[rt], nd = dense_start[rt + 1] - d0;
  const int s0 = sparse_start[rt], ns = sparse_start[rt + 1] - s0;
  // This CTA's tiles [ja, jb) of the row-tile's list (dense first, then 2:4): share c % split by bytes.
  const int64_t total = 16LL * nd + 9LL * ns;
  auto bound = [&](int q) -> int {
    const int64_t target = total * q / split;
    return target <= 16LL * nd ? (int)((target + 15) / 16) : nd + (int)((target - 16LL * nd + 8) / 9);
  };
  const int ja = bound(c % split), jb = bound(c % split + 1), n = jb - ja;
  auto col = [&](int j) { return j < nd ? dense_col[d0 + j] : sparse_col[s0 + j - nd]; };

  // x columns of local tile jl into slot jl % RT_XS (rows < M only; the fragments zero the rest), one commit group.
  auto stage = [&](int jl) {
    if (jl < n) {
      const T* src = x + (int64_t)col(ja + jl) * TILE;
      const uint32_t dst = xring + (jl % RT_XS) * S::SLOT;
      for (int q = tid; q < M * (TILE / 8); q += NT) {
        const int m = q / (TILE / 8), c8 = q % (TILE / 8);
        cp_async16(dst + m * S::PITCH + 16 * c8, src + m * stride_xm + 8 * c8);
      }
    }
    cp_async_commit();
  };
  auto load = [&](RtFrag<T, TILE>& f, int j) {
    if (j < nd) {
      const T* w = dense + ((int64_t)(d0 + j) * TILE + r0) * TILE;       // [16, TILE]
#pragma unroll
      for (int s = 0; s < TILE / 32; ++s) {
        f.w[2 * s] = ld128_once(w + g * TILE + 32 * s + 8 * t);
        f.w[2 * s + 1] = ld128_once(w + (g + 8) * TILE + 32 * s + 8 * t);
      }
    } else {
      const int64_t i = s0 + (j - nd);
      const T* v = values + (i * TILE + r0) * (TILE / 2);                // [16, TILE / 2]
      const uint8_t* e = meta + (i * TILE + r0) * (TILE / 8);            // [16, TILE / 8]
#pragma unroll
      for (int d = 0; d < TILE / 64; ++d) {
        f.w[2 * d] = ld128_once(v + g * (TILE / 2) + 32 * d + 8 * t);
        f.w[2 * d + 1] = ld128_once(v + (g + 8) * (TILE / 2) + 32 * d + 8 * t);
        f.e[2 * d] = ld64_once(e + g * (TILE / 8) + 8 * d);
        f.e[2 * d + 1] = ld64_once(e + (g + 8) * (TILE / 8) + 8 * d);
      }
    }
  };

  bool xok[MB];
#pragma unroll
  for (int b = 0; b < MB; ++b) xok[b] = 8 * b + g < M;
  float acc[MB][4];
#pragma unroll
  for (int b = 0; b < MB; ++b) acc[b][0] = acc[b][1] = acc[b][2] = acc[b][3] = 0.f;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const bool odd = t & 1;
  const int h = t >> 1;
  const uint32_t sel = odd ? 0x7531u : 0x6420u;

  // The same fragment layouts and K permutations as hybrid_mma_sp_kernel (see there), x read from the slot.
  auto mma = [&](const RtFrag<T, TILE>& f, int j, uint32_t xs) {
    if (j < nd) {
#pragma unroll
      for (int s = 0; s < TILE / 32; ++s) {
        const uint4 lo = f.w[2 * s], hi = f.w[2 * s + 1];
        const uint32_t a0[4] = {lo.x, hi.x, lo.y, hi.y};
        const uint32_t a1[4] = {lo.z, hi.z, lo.w, hi.w};
#pragma unroll
        for (int b = 0; b < MB; ++b) {
          const uint4 xb = xok[b] ? lds128(xs + (8 * b + g) * S::PITCH + (32 * s + 8 * t) * (int)sizeof(T)) : zero;
          Mma<T>::dense(acc[b], a0, xb.x, xb.y);
          Mma<T>::dense(acc[b], a1, xb.z, xb.w);
        }
      }
    } else {
#pragma unroll
      for (int d = 0; d < TILE / 64; ++d) {
        const uint4 vg = f.w[2 * d], vh = f.w[2 * d + 1];
        const uint2 eg = f.e[2 * d], eh = f.e[2 * d + 1];
        const uint32_t pg = __byte_perm(eg.x, eg.y, sel), ph = __byte_perm(eh.x, eh.y, sel);
        uint32_t em[2];
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          uint32_t ng = (pg >> (4 * cc)) & 0x0F0F0F0Fu, nh = (ph >> (4 * cc)) & 0x0F0F0F0Fu;
          ng |= ng >> 4;
          nh |= nh >> 4;
          em[cc] = __byte_perm(ng, nh, 0x6420u);
        }
        const uint32_t a0[4] = {vg.x, vh.x, vg.z, vh.z};
        const uint32_t a1[4] = {vg.y, vh.y, vg.w, vh.w};
#pragma unroll
        for (int b = 0; b < MB; ++b) {
          const uint32_t xa = xs + (8 * b + g) * S::PITCH + (64 * d + 16 * h) * (int)sizeof(T);
          const uint4 p0 = xok[b] ? lds128(xa) : zero, p1 = xok[b] ? lds128(xa + 16) : zero;
          const uint4 q0 = xok[b] ? lds128(xa + 64) : zero, q1 = xok[b] ? lds128(xa + 80) : zero;
          const uint32_t x0[4] = {odd ? p0.y : p0.x, odd ? q0.y : q0.x, odd ? p1.y : p1.x, odd ? q1.y : q1.x};
          const uint32_t x1[4] = {odd ? p0.w : p0.z, odd ? q0.w : q0.z, odd ? p1.w : p1.z, odd ? q1.w : q1.z};
          Mma<T>::sparse(acc[b], a0, x0, em[0]);
          Mma<T>::sparse(acc[b], a1, x1, em[1]);
        }
      }
    }
  };
  // Tile jl: its x has landed (wait for all but the newest group, then a barrier that also frees the slot the
  // previous tile used), ask for tile jl + RT_XS - 1's x into that slot, run the tile.
  auto run = [&](const RtFrag<T, TILE>& f, int jl) {
    cp_async_wait<RT_XS - 2>();
    __syncthreads();
    stage(jl + RT_XS - 1);
    mma(f, ja + jl, xring + (jl % RT_XS) * S::SLOT);
  };

  for (int p = 0; p < RT_XS - 1; ++p) stage(p);
  RtFrag<T, TILE> fa, fb;  // weights of tile jl (fa) and jl + 1 (fb): two register sets, alternating
  if (n > 0) load(fa, ja);
  for (int jl = 0; jl < n; jl += 2) {
    if (jl + 1 < n) load(fb, ja + jl + 1);
    run(fa, jl);
    if (jl + 1 >= n) break;
    if (jl + 2 < n) load(fa, ja + jl + 2);
    run(fb, jl + 1);
  }

  // Partials [COLS, TILE] (a warp writes its own 16 rows), then the cluster's reduction: CTA c sums elements
  // c * NT + tid, stepping by cl * NT, over the partials of its half's CTAs (and for SiLU * up the other half's).
#pragma unroll
  for (int b = 0; b < MB; ++b) {
    partial[(8 * b + 2 * t) * TILE + r0 + g] = acc[b][0];
    partial[(8 * b + 2 * t + 1) * TILE + r0 + g] = acc[b][1];
    partial[(8 * b + 2 * t) * TILE + r0 + g + 8] = acc[b][2];
    partial[(8 * b + 2 * t + 1) * TILE + r0 + g + 8] = acc[b][3];
  }
  cluster.sync();
  for (int o = c * NT + tid; o < M * TILE; o += cl * NT) {
    const int row = o % TILE, m = o / TILE;             // neighbouring threads write neighbouring features
    float sum = 0.f;
    for (int q = 0; q < split; ++q) sum += cluster.map_shared_rank(partial, q)[m * TILE + row];
    if (bias != nullptr) sum += Mma<T>::to_float(bias[n0 + row]);
    if (up_rt > 0) {  // sum is the gate: SiLU(gate) * up
      float up = 0.f;
      for (int q = split; q < 2 * split; ++q) up += cluster.map_shared_rank(partial, q)[m * TILE + row];
      if (bias != nullptr) up += Mma<T>::to_float(bias[up_rt * TILE + n0 + row]);
      sum = sum / (1.f + __expf(-sum)) * up;
    }
    y[(int64_t)m * stride_ym + n0 + row] = Mma<T>::from_float(sum);
  }
  cluster.sync();  // no CTA leaves while another may still read its partials
#else
  __trap();
#endif
}

}  // namespace patchc

#ifndef PATCHC_KERNEL_ONLY
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

namespace patchc {

// Dynamic shared memory of a launch: the cross-warp partials, or for STAGED the ring (which they alias) + barriers.
template <typename T, int R, int TILE>
size_t smem_bytes(bool staged, int warps, int mb) {
  const size_t partial = sizeof(float) * warps * 16 * R * 8 * mb;
  if (!staged) return partial;
  const size_t ring = (size_t)warps * STAGES * Stage<T, R, TILE>::SIZE;
  return (ring > partial ? ring : partial) + (size_t)warps * STAGES * 8;
}

template <typename T, int MB, int R, int TILE, bool STAGED>
void launch_kernel(int warps, dim3 grid, cudaStream_t stream, const T* x, int M, int64_t sxm, const T* dense,
                   const T* values, const uint8_t* meta, const int* dcol, const int* scol, const int* dstart,
                   const int* sstart, const T* bias, T* y, int64_t sym, int up_rt) {
  auto kernel = hybrid_mma_sp_kernel<T, MB, R, TILE, STAGED>;
  const size_t smem = smem_bytes<T, R, TILE>(STAGED, warps, MB);
  if (smem > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  kernel<<<grid, dim3(32 * warps), smem, stream>>>(x, M, sxm, dense, values, meta, dcol, scol, dstart, sstart, bias, y,
                                                   sym, up_rt);
}

template <typename T, int MB, int R>
void launch_tile(int tile, bool staged, int warps, dim3 grid, cudaStream_t stream, const T* x, int M, int64_t sxm,
                 const T* dense, const T* values, const uint8_t* meta, const int* dcol, const int* scol,
                 const int* dstart, const int* sstart, const T* bias, T* y, int64_t sym, int up_rt) {
#define PATCHC_K(TILE_, STAGED_) \
  launch_kernel<T, MB, R, TILE_, STAGED_>(warps, grid, stream, x, M, sxm, dense, values, meta, dcol, scol, dstart, sstart, bias, y, sym, up_rt)
  if (tile == 64) {
    if (staged) PATCHC_K(64, true); else PATCHC_K(64, false);
  } else {
    if (staged) PATCHC_K(128, true); else PATCHC_K(128, false);
  }
#undef PATCHC_K
}

// The row-tile kernel: one cluster of `cl` CTAs (split, twice that for SiLU * up) per output row-tile.
template <typename T, int MB, int TILE>
void launch_rowtile(int split, int cl, int n_rt, cudaStream_t stream, const T* x, int M, int64_t sxm, const T* dense,
                    const T* values, const uint8_t* meta, const int* dcol, const int* scol, const int* dstart,
                    const int* sstart, const T* bias, T* y, int64_t sym, int up_rt) {
  auto kernel = hybrid_mma_sp_rowtile_kernel<T, MB, TILE>;
  const int smem = RtSmem<T, MB, TILE>::BYTES;
  if (smem > 48 * 1024) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(n_rt * cl);
  config.blockDim = dim3(2 * TILE);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cl;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, x, M, sxm, dense, values, meta, dcol, scol, dstart, sstart, bias,
                                    y, sym, up_rt, split));
}

template <typename T>
void launch_rowtile_typed(int mb, int tile, int split, int cl, int n_rt, cudaStream_t stream, const T* x, int M,
                          int64_t sxm, const T* dense, const T* values, const uint8_t* meta, const int* dcol,
                          const int* scol, const int* dstart, const int* sstart, const T* bias, T* y, int64_t sym,
                          int up_rt) {
#define PATCHC_RT(MB_, TILE_) \
  launch_rowtile<T, MB_, TILE_>(split, cl, n_rt, stream, x, M, sxm, dense, values, meta, dcol, scol, dstart, sstart, bias, y, sym, up_rt)
  if (tile == 64) {
    if (mb == 1) PATCHC_RT(1, 64); else if (mb == 2) PATCHC_RT(2, 64); else PATCHC_RT(4, 64);
  } else {
    if (mb == 1) PATCHC_RT(1, 128); else if (mb == 2) PATCHC_RT(2, 128); else PATCHC_RT(4, 128);
  }
#undef PATCHC_RT
}

template <typename T>
void launch_typed(int mb, int rows, int tile, bool staged, int warps, dim3 grid, cudaStream_t stream, const T* x,
                  int M, int64_t sxm, const T* dense, const T* values, const uint8_t* meta, const int* dcol,
                  const int* scol, const int* dstart, const int* sstart, const T* bias, T* y, int64_t sym, int up_rt) {
#define PATCHC_LAUNCH(MB_, R_) \
  launch_tile<T, MB_, R_>(tile, staged, warps, grid, stream, x, M, sxm, dense, values, meta, dcol, scol, dstart, sstart, bias, y, sym, up_rt)
  if (rows == 1) {
    if (mb == 1) PATCHC_LAUNCH(1, 1); else if (mb == 2) PATCHC_LAUNCH(2, 1); else PATCHC_LAUNCH(4, 1);
  } else {
    if (mb == 1) PATCHC_LAUNCH(1, 2); else PATCHC_LAUNCH(2, 2);  // M > 16 with 2 slices would spill
  }
#undef PATCHC_LAUNCH
}

}  // namespace patchc

// x [M, K] (unit column stride), packed tiles, schedule (int32, on x's device) -> y [M, n_out] (written).
// The caller (codegen/mma_sp.py) checks dtypes, shapes and alignment before calling.
void hybrid_mma_sp(torch::Tensor x, torch::Tensor dense, torch::Tensor values, torch::Tensor meta,
                   torch::Tensor dense_col, torch::Tensor sparse_col, torch::Tensor dense_start,
                   torch::Tensor sparse_start, c10::optional<torch::Tensor> bias, torch::Tensor y,
                   int64_t tile, int64_t warps, int64_t slices, int64_t staged, int64_t silu_mul, int64_t split) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1, "hybrid_mma_sp: x must be a CUDA [M, K] row-major");
  // Messages carry no numbers: streaming an integer into an error message crashed inside this extension on
  // the GPU image (libstdc++ mismatch); codegen/mma_sp.py validates the arguments with readable errors first.
  TORCH_CHECK(tile == 64 || tile == 128, "hybrid_mma_sp: tile must be 64 or 128");
  const int M = x.size(0);
  const int64_t n_out = y.size(1);
  TORCH_CHECK(y.dim() == 2 && y.size(0) == M && y.stride(1) == 1 && y.scalar_type() == x.scalar_type(),
              "hybrid_mma_sp: y must be a row-major [M, n_out] of x's dtype");
  TORCH_CHECK(M >= 1 && M <= 32, "hybrid_mma_sp: M must be in 1..32");
  const int mb = M <= 8 ? 1 : (M <= 16 ? 2 : 4);
  // silu_mul: the weights are [gate; up], 2 * n_out rows, and y = SiLU(x @ gate^T) * (x @ up^T)
  const int64_t w_rows = (dense_start.size(0) - 1) * tile;
  TORCH_CHECK(w_rows == (silu_mul ? 2 : 1) * n_out, "hybrid_mma_sp: the schedule's rows do not match n_out");
  const int up_rt = silu_mul ? (int)(n_out / tile) : 0;
  // split > 0: the row-tile kernel, a cluster of split (SiLU * up: 2 * split) CTAs per output row-tile
  const int cl = (int)(silu_mul ? 2 * split : split);
  TORCH_CHECK(split == 0 || (cl >= 1 && cl <= 8 && n_out % tile == 0),
              "hybrid_mma_sp: split needs 1..8 CTAs a cluster and n_out a multiple of the tile");
  TORCH_CHECK(split > 0 || ((slices == 1 || slices == 2) && n_out % (16 * slices) == 0 && warps >= 1 && warps <= 16),
              "hybrid_mma_sp: bad n_out / warps / slices");
  TORCH_CHECK(split > 0 || slices == 1 || mb <= 2, "hybrid_mma_sp: 2 slices a CTA need M <= 16");
  TORCH_CHECK(split > 0 || !silu_mul || (warps % 2 == 0 && n_out % tile == 0),
              "hybrid_mma_sp: SiLU*up needs an even number of warps and n_out a multiple of the tile");
  TORCH_CHECK(split > 0 || staged || sizeof(float) * warps * 16 * slices * 8 * mb <= 48 * 1024,
              "hybrid_mma_sp: warps x slices need more than 48 KB of shared memory");
  const c10::cuda::CUDAGuard guard(x.device());
  const dim3 grid(n_out / (16 * slices));
  const int n_rt = (int)(n_out / tile);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int* dcol = dense_col.data_ptr<int>();
  const int* scol = sparse_col.data_ptr<int>();
  const int* dst = dense_start.data_ptr<int>();
  const int* sst = sparse_start.data_ptr<int>();
  const uint8_t* e = meta.data_ptr<uint8_t>();
#define PATCHC_DISPATCH(T)                                                                                          \
  {                                                                                                                 \
    auto p = [](const torch::Tensor& v) { return reinterpret_cast<const T*>(v.data_ptr()); };                       \
    const T* b = bias ? p(*bias) : nullptr;                                                                         \
    T* out = reinterpret_cast<T*>(y.data_ptr());                                                                    \
    if (split > 0)                                                                                                  \
      patchc::launch_rowtile_typed<T>(mb, tile, split, cl, n_rt, stream, p(x), M, x.stride(0), p(dense), p(values), \
                                      e, dcol, scol, dst, sst, b, out, y.stride(0), up_rt);                         \
    else                                                                                                            \
      patchc::launch_typed<T>(mb, slices, tile, staged != 0, warps, grid, stream, p(x), M, x.stride(0), p(dense),   \
                              p(values), e, dcol, scol, dst, sst, b, out, y.stride(0), up_rt);                      \
  }
  if (x.scalar_type() == at::kBFloat16) {
    PATCHC_DISPATCH(__nv_bfloat16)
  } else {
    TORCH_CHECK(x.scalar_type() == at::kHalf, "hybrid_mma_sp: x must be bfloat16 or float16");
    PATCHC_DISPATCH(__half)
  }
#undef PATCHC_DISPATCH
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif
