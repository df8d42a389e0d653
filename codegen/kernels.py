"""Triton kernels for hybrid (dense / 2:4) tile matmuls: y[M, N] = x[M, K] @ (W * M)[N, K]^T.

One program owns BLOCK_M rows of x and BLOCK_N output features inside one row-tile of W (BLOCK_N
divides the tile), and one of SPLIT_K slices of that row-tile's K-tiles. It streams the row-tile's
dense tiles, then its 2:4 tiles (values + 4-bit metadata decompressed in registers), each fed to
tl.dot with an fp32 accumulator. With SPLIT_K == 1 the epilogue (bias, SiLU(gate) * up) is fused and
the output written once; otherwise fp32 partials are written for a reduction.
"""
import triton
import triton.language as tl


@triton.jit
def _sparse_tile_split(values_ptr, meta_ptr, i, rows, T: tl.constexpr):
    """Rows `rows` of stored 2:4 tile i as [BLOCK_N, T], any dtype: values [BLOCK_N, T/2] and meta
    [BLOCK_N, T/8] loaded contiguously, groups formed by reshape/split/join (the fp32 path)."""
    offs_h = tl.arange(0, T // 2)
    offs_e = tl.arange(0, T // 8)
    pos = tl.arange(0, 4)
    v = tl.load(values_ptr + i * (T * (T // 2)) + rows[:, None] * (T // 2) + offs_h[None, :])  # [BLOCK_N, T/2]
    e = tl.load(meta_ptr + i * (T * (T // 8)) + rows[:, None] * (T // 8) + offs_e[None, :])    # [BLOCK_N, T/8]
    v0, v1 = tl.split(tl.reshape(v, [v.shape[0], T // 4, 2]))                    # [BLOCK_N, T/4] each
    nib = tl.reshape(tl.join(e & 0xF, e >> 4), [e.shape[0], T // 4])              # 4-bit code a group
    i0 = (nib & 3).to(tl.int32)[:, :, None]
    i1 = (nib >> 2).to(tl.int32)[:, :, None]
    w = tl.where(i0 == pos[None, None, :], v0[:, :, None],
                 tl.where(i1 == pos[None, None, :], v1[:, :, None], tl.zeros_like(v0)[:, :, None]))  # [BLOCK_N, T/4, 4]
    return tl.reshape(w, [w.shape[0], T]).to(v.dtype)                              # [BLOCK_N, T]


@triton.jit
def _group_pairs(w, c):
    """One group of 4 as two 32-bit words of two 16-bit weights (positions 0,1 and 2,3), from the
    group's word w = (second kept << 16) | first kept and its code c = i0 | i1 << 2 (i0 < i1)."""
    i0 = c & 3
    i1 = c >> 2
    keep01 = tl.where(i0 == 0, 0xFFFF, 0) | tl.where(i1 == 1, -65536, 0)       # -65536 = 0xFFFF0000
    p01 = tl.where(i0 == 1, w << 16, w & keep01)
    keep23 = tl.where(i0 == 2, 0xFFFF, 0) | tl.where(i1 == 3, -65536, 0)
    p23 = tl.where(i1 == 2, (w >> 16) & 0xFFFF, w & keep23)
    return p01, p23


@triton.jit
def _halves(p, OUT: tl.constexpr):
    """A 32-bit word as its two 16-bit weights (low first)."""
    return (p & 0xFFFF).to(tl.int16).to(OUT, bitcast=True), (p >> 16).to(tl.int16).to(OUT, bitcast=True)


@triton.jit
def _sparse_tile_words(values_ptr, meta_ptr, i, rows, T: tl.constexpr, OUT: tl.constexpr):
    """Rows `rows` of stored 2:4 tile i as [BLOCK_N, T], 16-bit dtypes: the values of two groups read
    as one 64-bit word, aligned with the metadata byte of those two groups, so every step is
    elementwise on [BLOCK_N, T/8] and the joins only stack registers. Fewer instructions than the
    split path: decode at 50% went 1.4-1.6x faster on the H100 (bench/NOTES.md, v4)."""
    offs_j = tl.arange(0, T // 8)
    qp = values_ptr.to(tl.pointer_type(tl.int64))
    q = tl.load(qp + i * (T * (T // 8)) + rows[:, None] * (T // 8) + offs_j[None, :])      # [BLOCK_N, T/8] int64
    e = tl.load(meta_ptr + i * (T * (T // 8)) + rows[:, None] * (T // 8) + offs_j[None, :])
    return _expand_words(q, e, OUT)


@triton.jit
def _expand_words(q, e, OUT: tl.constexpr):
    """2:4 weights as dense [BLOCK_N, 8 J]: q int64 [BLOCK_N, J] (the 4 kept values of groups 2j, 2j+1), e uint8
    [BLOCK_N, J] (their metadata byte)."""
    e = e.to(tl.int32)
    a01, a23 = _group_pairs((q & 0xFFFFFFFF).to(tl.int32), e & 0xF)                       # group 2j
    b01, b23 = _group_pairs((q >> 32).to(tl.int32), e >> 4)                               # group 2j + 1
    w0, w1 = _halves(a01, OUT)
    w2, w3 = _halves(a23, OUT)
    w4, w5 = _halves(b01, OUT)
    w6, w7 = _halves(b23, OUT)
    # element 4a + 2b + c of the 8: the innermost join picks a, the outermost c
    w = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
    return tl.reshape(w, [q.shape[0], 8 * q.shape[1]])                                     # [BLOCK_N, 8 J]


@triton.jit
def _sparse_tile(values_ptr, meta_ptr, i, rows, T: tl.constexpr):
    OUT: tl.constexpr = values_ptr.dtype.element_ty
    if OUT.primitive_bitwidth == 16:
        return _sparse_tile_words(values_ptr, meta_ptr, i, rows, T, OUT)
    else:
        return _sparse_tile_split(values_ptr, meta_ptr, i, rows, T)


@triton.jit
def _split_range(start_ptr, rt, pid_k, SPLIT_K: tl.constexpr):
    """Storage range of row-tile rt's tiles that split pid_k of SPLIT_K streams."""
    first = tl.load(start_ptr + rt)
    count = tl.load(start_ptr + rt + 1) - first
    return first + count * pid_k // SPLIT_K, first + count * (pid_k + 1) // SPLIT_K


@triton.jit
def _accumulate(acc, x_ptr, stride_xm, stride_xk, offs_m, mask_m, rows,
                dense_ptr, values_ptr, meta_ptr, dense_col_ptr, sparse_col_ptr, dense_start_ptr, sparse_start_ptr,
                rt, pid_k,
                T: tl.constexpr, SPLIT_K: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_SPARSE: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """acc += x[:, K-tiles of row-tile rt (this split)] @ W[rows, same]^T."""
    offs_t = tl.arange(0, T)
    x_rows = x_ptr + offs_m[:, None] * stride_xm                                           # [BLOCK_M, 1]
    if HAS_DENSE:
        lo, hi = _split_range(dense_start_ptr, rt, pid_k, SPLIT_K)
        for i in range(lo, hi):
            c = tl.load(dense_col_ptr + i)
            x = tl.load(x_rows + (c * T + offs_t)[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)  # [BLOCK_M, T]
            w = tl.load(dense_ptr + i * (T * T) + rows[:, None] * T + offs_t[None, :])  # [BLOCK_N, T]
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    if HAS_SPARSE:
        lo, hi = _split_range(sparse_start_ptr, rt, pid_k, SPLIT_K)
        for i in range(lo, hi):
            c = tl.load(sparse_col_ptr + i)
            x = tl.load(x_rows + (c * T + offs_t)[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)  # [BLOCK_M, T]
            w = _sparse_tile(values_ptr, meta_ptr, i, rows, T)                            # [BLOCK_N, T]
            acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _grouped_pid(pid, M, N_OUT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program -> (m block, n block), grouped along M so neighbouring programs share weight tiles in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = N_OUT // BLOCK_N
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def hybrid_mm_kernel(
    x_ptr, dense_ptr, values_ptr, meta_ptr, dense_col_ptr, sparse_col_ptr, dense_start_ptr, sparse_start_ptr,
    bias_ptr, out_ptr,
    M, N_OUT,
    stride_xm, stride_xk, stride_os, stride_om, stride_on,
    T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_DENSE: tl.constexpr, HAS_SPARSE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_pid(pid, M, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n0 = pid_n * BLOCK_N
    rt = n0 // T                                    # row-tile of this program
    rows = n0 % T + tl.arange(0, BLOCK_N)           # rows inside the tile
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _accumulate(acc, x_ptr, stride_xm, stride_xk, offs_m, mask_m, rows, dense_ptr, values_ptr, meta_ptr,
                      dense_col_ptr, sparse_col_ptr, dense_start_ptr, sparse_start_ptr, rt, pid_k,
                      T, SPLIT_K, HAS_DENSE, HAS_SPARSE, DOT_PRECISION)
    if SILU_MUL:
        # gate rows are the first N_OUT stacked rows, up rows the next N_OUT: one program reads both
        up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        up = _accumulate(up, x_ptr, stride_xm, stride_xk, offs_m, mask_m, rows, dense_ptr, values_ptr, meta_ptr,
                         dense_col_ptr, sparse_col_ptr, dense_start_ptr, sparse_start_ptr, rt + N_OUT // T, pid_k,
                         T, SPLIT_K, HAS_DENSE, HAS_SPARSE, DOT_PRECISION)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    out_mask = mask_m[:, None]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n)[None, :].to(tl.float32)
            if SILU_MUL:
                up += tl.load(bias_ptr + N_OUT + offs_n)[None, :].to(tl.float32)
        if SILU_MUL:
            acc = acc * tl.sigmoid(acc) * up
        ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # fp32 partials [SPLIT_K, (2,) M, N]: reduced (and the epilogue applied) by the launcher
        ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(ptrs, acc, mask=out_mask)
        if SILU_MUL:
            tl.store(ptrs + M * stride_om, up, mask=out_mask)


@triton.jit
def decompress_kernel(dense_ptr, values_ptr, meta_ptr, dense_col_ptr, sparse_col_ptr, dense_start_ptr,
                      sparse_start_ptr, w_ptr, ROW0, K, T: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """Rows [ROW0, ROW0 + rows) of W[N, K] from the packed tiles into w [rows, K] (row-major): program (p, s)
    writes BLOCK_N rows of one row-tile, the tiles of split s of SPLIT of that row-tile's tile lists."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    n0 = ROW0 + pid * BLOCK_N
    rt = n0 // T
    rows = n0 % T + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, T)
    out_rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N))[:, None].to(tl.int64) * K
    lo, hi = _split_range(dense_start_ptr, rt, pid_k, SPLIT)
    for i in range(lo, hi):
        c = tl.load(dense_col_ptr + i)
        w = tl.load(dense_ptr + i * (T * T) + rows[:, None] * T + offs_t[None, :])
        tl.store(w_ptr + out_rows + (c * T + offs_t)[None, :], w)
    lo, hi = _split_range(sparse_start_ptr, rt, pid_k, SPLIT)
    for i in range(lo, hi):
        c = tl.load(sparse_col_ptr + i)
        tl.store(w_ptr + out_rows + (c * T + offs_t)[None, :], _sparse_tile(values_ptr, meta_ptr, i, rows, T))


@triton.jit
def hybrid_mm_tma_kernel(
    x_desc, dense_desc, values_desc, meta_ptr, dense_col_ptr, sparse_col_ptr, dense_start_ptr, sparse_start_ptr,
    bias_ptr, out_ptr,
    M, N_OUT, stride_os, stride_om,
    T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_DENSE: tl.constexpr, HAS_SPARSE: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Large M (16-bit, sm_90+): the hybrid matmul as a TMA-fed tensor-core GEMM over the row-tile's tile
    lists. Dense tiles are read in place by TMA (dense viewed as [n_dense * T, T]); 2:4 tiles by TMA as int64
    words (values viewed as [n_sparse * T, T / 8]) plus their metadata bytes, expanded in registers. The
    accumulator is W-major (acc^T [BLOCK_N, BLOCK_M] = W @ x^T) so the expanded 2:4 weights are the register
    operand of the MMA. With SPLIT_K > 1, program (p, s) takes split s of the row-tile's tiles and writes fp32
    partials [SPLIT_K, M, N] that the launcher reduces."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _grouped_pid(pid, M, N_OUT, BLOCK_M, BLOCK_N, GROUP_M)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    rt = n0 // T                                   # row-tile of this program
    r0 = n0 % T                                    # first row inside the tile
    KT: tl.constexpr = T // BLOCK_K                # K-steps a tile
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if HAS_DENSE:
        lo, hi = _split_range(dense_start_ptr, rt, pid_k, SPLIT_K)
        for j in tl.range(lo * KT, hi * KT, num_stages=NUM_STAGES):
            i = j // KT
            kk = (j % KT) * BLOCK_K
            c = tl.load(dense_col_ptr + i)
            w = dense_desc.load([i * T + r0, kk])                   # [BLOCK_N, BLOCK_K]
            x = x_desc.load([m0, c * T + kk])                       # [BLOCK_M, BLOCK_K]
            acc = tl.dot(w, x.T, acc)                               # [BLOCK_N, BLOCK_K] @ [BLOCK_K, BLOCK_M]
    if HAS_SPARSE:
        OUT: tl.constexpr = x_desc.dtype
        offs_r = r0 + tl.arange(0, BLOCK_N)
        offs_j = tl.arange(0, BLOCK_K // 8)
        lo, hi = _split_range(sparse_start_ptr, rt, pid_k, SPLIT_K)
        for j in tl.range(lo * KT, hi * KT, num_stages=NUM_STAGES):
            i = j // KT
            kk = (j % KT) * BLOCK_K
            c = tl.load(sparse_col_ptr + i)
            q = values_desc.load([i * T + r0, kk // 8])             # [BLOCK_N, BLOCK_K / 8] int64
            e = tl.load(meta_ptr + (i * T + offs_r)[:, None] * (T // 8) + (kk // 8 + offs_j)[None, :])
            x = x_desc.load([m0, c * T + kk])                       # [BLOCK_M, BLOCK_K]
            acc = tl.dot(_expand_words(q, e, OUT), x.T, acc)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask = (offs_m < M)[:, None]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n)[:, None].to(tl.float32)
        y = tl.trans(acc).to(out_ptr.dtype.element_ty)              # [BLOCK_M, BLOCK_N]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], y, mask=mask)
    else:
        ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, tl.trans(acc), mask=mask)
