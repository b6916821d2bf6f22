"""Flash attention in Triton: causal or not, forward and backward, dropout on the weights in-kernel.

Math, for one (batch b, head h); rows i are queries, columns j keys, s = softmax_scale:
  S = s Q K^T (causal: S_ij = -inf for j > i),  P = softmax(S),  O = (P o Z / (1 - p)) V,
where Z is the dropout keep mask, Z_ij = (rand(seed, b, h, i, j) >= p).

Forward (online softmax). Work in base 2: S2 = S log2(e), so exp is exp2 and log2(e) folds into the
scale. Walk the key blocks keeping, per row, the running max m, the running sum l = sum_j 2^(S2_ij - m)
and acc = sum_j 2^(S2_ij - m) Z_ij V_j. A block with a larger max m' rescales l and acc by 2^(m - m').
At the end O = acc / l / (1 - p) (the sum l is taken before dropout, as nn.Dropout after softmax does),
and lse = m + log2(l) (fp32, base 2) is kept so backward recomputes P_ij = 2^(S2_ij - lse_i).

Backward. With Pd = P o Z / (1 - p), the dropped weights, O = Pd V gives
  dV = Pd^T dO,  dP = (dO V^T) o Z / (1 - p),  dS = P o (dP - delta),  dQ = s dS K,  dK = s dS^T Q,
  delta_i = sum_j P_ij dP_ij = sum_j Pd_ij (dO V^T)_ij = rowsum(dO o O)_i   (dropout included).
A preprocess kernel computes delta; one kernel owns a key block and walks the query blocks (dK, dV),
another owns a query block and walks the key blocks (dQ). Every gradient element is written by one
program in a fixed order: bitwise repeatable, no atomics. No (T, T) matrix is ever stored.

Causal blocks: key blocks the mask empties are skipped; the mask is applied only on blocks that
straddle the diagonal (or the ragged end), the `MASKED` stage of each loop.

Dropout bits. Philox (tl.randint4x, the generator behind tl.rand) returns four 32-bit words per
counter. Element (b, h, i, j) takes word j % 4 of counter ((b H + h) Tq + i) ceil(Tk / 4) + j // 4,
mapped to [0, 1) as tl.rand does, and is kept when that is >= p. One Philox call thus serves four
keys, and the bits depend on (seed, b, h, i, j) only, never on block shapes, grid or launch order.
The counter is an int64 (Philox takes its low and high halves as two of its 32-bit counters), so it
never wraps: 16*6*4096*4096 / 4 = 2^28.6 counters would still fit an int32, 8x more would not.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels._common import check_dropout_p, check_float_tensor, seed_tensor

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


@triton.jit
def _dropout_keep(seed, rows, start_n, n_groups, dropout_p, BLOCK_N: tl.constexpr):
    """Bool keep mask (len(rows), BLOCK_N) for keys start_n .. start_n + BLOCK_N - 1.

    rows: int64 (b * H + h) * Tq + i per query row; n_groups = ceil(Tk / 4); start_n % 4 == 0.
    """
    tl.static_assert(BLOCK_N % 4 == 0, "key blocks hold whole groups of four keys")
    offs_g = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    counter = rows[:, None] * n_groups + offs_g[None, :]  # (M, BLOCK_N / 4) int64
    r0, r1, r2, r3 = tl.rand4x(seed, counter)
    # [r0, r2] and [r1, r3] interleaved, then interleaved again: column 4 g + w holds word w of group g.
    u = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # (M, BLOCK_N)
    return u >= dropout_p


@triton.jit
def _head_dim_mask(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """offs_d < HEAD_DIM; a constant all-true mask (which the compiler folds away) when D == BLOCK_D."""
    mask_d = tl.full([BLOCK_D], 1, tl.int1)
    if BLOCK_D != HEAD_DIM:
        mask_d = tl.arange(0, BLOCK_D) < HEAD_DIM
    return mask_d


@triton.jit
def _key_split(start_m, T_K, IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(mid, hi) for a query block: keys < mid are seen by all its rows, keys >= hi by none."""
    if IS_CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, T_K)
        mid = (tl.minimum(start_m + 1, T_K) // BLOCK_N) * BLOCK_N
    else:
        hi = T_K
        mid = (T_K // BLOCK_N) * BLOCK_N
    return mid, hi


@triton.jit
def _mask_scores(qk, offs_m, offs_n, T_K, IS_CAUSAL: tl.constexpr):
    """-inf where key offs_n is past Tk or, causal, after query offs_m."""
    visible = (offs_n < T_K)[None, :]
    if IS_CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(visible, qk, float("-inf"))


@triton.jit
def _attn_fwd_loop(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k_t, stride_v_t, offs_m, offs_d, mask_d,
                   lo, hi, T_K, qk_scale, seed, rows, n_groups, dropout_p,
                   MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key blocks lo, lo + BLOCK_N, .. < hi into the online softmax of one query block."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_kv = mask_d[None, :]
        if MASKED:
            mask_kv = (offs_n < T_K)[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + offs_n[:, None] * stride_k_t + offs_d[None, :], mask=mask_kv, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N), base 2
        if MASKED:
            qk = _mask_scores(qk, offs_m, offs_n, T_K, IS_CAUSAL)
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: key 0 is in the first block every row sees
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(seed, rows, start_n, n_groups, dropout_p, BLOCK_N), p, 0.0)
        v = tl.load(v_ptr + offs_n[:, None] * stride_v_t + offs_d[None, :], mask=mask_kv, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, seed_ptr,
                     stride_q_b, stride_q_t, stride_q_h, stride_k_b, stride_k_t, stride_k_h,
                     stride_v_b, stride_v_t, stride_v_h, stride_o_b, stride_o_t, stride_o_h,
                     H, T_Q, T_K, qk_scale, dropout_p, keep_scale,
                     IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_LSE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head). Grid (cdiv(Tq, BLOCK_M), B * H)."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = off_bh // H, off_bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = _head_dim_mask(HEAD_DIM, BLOCK_D)
    mask_m = offs_m < T_Q
    q_ptr += off_b * stride_q_b + off_h * stride_q_h
    k_ptr += off_b * stride_k_b + off_h * stride_k_h
    v_ptr += off_b * stride_v_b + off_h * stride_v_h
    q = tl.load(q_ptr + offs_m[:, None] * stride_q_t + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    rows = off_bh * T_Q + offs_m  # (M,) int64, the dropout counter's row part
    n_groups = (T_K + 3) // 4

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mid, hi = _key_split(start_m, T_K, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_loop(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k_t, stride_v_t, offs_m,
                                   offs_d, mask_d, 0, mid, T_K, qk_scale, seed, rows, n_groups,
                                   dropout_p, False, IS_CAUSAL, HAS_DROPOUT, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_loop(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k_t, stride_v_t, offs_m,
                                   offs_d, mask_d, mid, hi, T_K, qk_scale, seed, rows, n_groups,
                                   dropout_p, True, IS_CAUSAL, HAS_DROPOUT, BLOCK_N, DOT_PRECISION)
    if STORE_LSE:
        tl.store(lse_ptr + rows, m_i + tl.log2(l_i), mask=mask_m)
    o = acc * (keep_scale / l_i)[:, None]
    o_ptr += off_b * stride_o_b + off_h * stride_o_h
    tl.store(o_ptr + offs_m[:, None] * stride_o_t + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _attn_bwd_preprocess_kernel(o_ptr, do_ptr, delta_ptr, stride_o_b, stride_o_t, stride_o_h,
                                stride_do_b, stride_do_t, stride_do_h, H, T_Q,
                                BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO o O) in fp32, (B, H, Tq). Grid (cdiv(Tq, BLOCK_M), B * H)."""
    off_bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = off_bh // H, off_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T_Q)[:, None] & _head_dim_mask(HEAD_DIM, BLOCK_D)[None, :]
    o = tl.load(o_ptr + off_b * stride_o_b + off_h * stride_o_h + offs_m[:, None] * stride_o_t
                + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + off_b * stride_do_b + off_h * stride_do_h + offs_m[:, None] * stride_do_t
                 + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + off_bh * T_Q + offs_m, delta, mask=offs_m < T_Q)


@triton.jit
def _attn_bwd_dkdv_loop(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q_t, stride_do_t,
                        start_n, offs_n, offs_d, mask_d, lo, hi, off_bh, T_Q, qk_scale, seed, n_groups,
                        dropout_p, keep_scale, MASKED: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add query blocks lo, lo + BLOCK_M, .. < hi into dK, dV of one key block (unscaled dK)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < T_Q  # rows past Tq load as zeros and add nothing
        q = tl.load(q_ptr + offs_m[:, None] * stride_q_t + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        do = tl.load(do_ptr + offs_m[:, None] * stride_do_t + offs_d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        rows = off_bh * T_Q + offs_m
        lse = tl.load(lse_ptr + rows, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + rows, mask=mask_m, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N), base 2
        if MASKED:
            qk = tl.where(offs_n[None, :] <= offs_m[:, None], qk, float("-inf"))
        p = tl.exp2(qk - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (M, N), dO V^T
        pd = p
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows, start_n, n_groups, dropout_p, BLOCK_N)
            pd = tl.where(keep, p * keep_scale, 0.0)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        dv = tl.dot(tl.trans(pd.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, seed_ptr,
                          stride_q_b, stride_q_t, stride_q_h, stride_k_b, stride_k_t, stride_k_h,
                          stride_v_b, stride_v_t, stride_v_h, stride_do_b, stride_do_t, stride_do_h,
                          stride_dk_b, stride_dk_t, stride_dk_h, stride_dv_b, stride_dv_t, stride_dv_h,
                          H, T_Q, T_K, qk_scale, sm_scale, dropout_p, keep_scale,
                          IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """One program: dK, dV of BLOCK_N keys of one (batch, head). Grid (cdiv(Tk, BLOCK_N), B * H)."""
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = off_bh // H, off_bh % H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = _head_dim_mask(HEAD_DIM, BLOCK_D)
    mask_nd = (offs_n < T_K)[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + off_b * stride_k_b + off_h * stride_k_h + offs_n[:, None] * stride_k_t
                + offs_d[None, :], mask=mask_nd, other=0.0)
    v = tl.load(v_ptr + off_b * stride_v_b + off_h * stride_v_h + offs_n[:, None] * stride_v_t
                + offs_d[None, :], mask=mask_nd, other=0.0)
    q_ptr += off_b * stride_q_b + off_h * stride_q_h
    do_ptr += off_b * stride_do_b + off_h * stride_do_h
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    n_groups = (T_K + 3) // 4

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    mid = 0
    if IS_CAUSAL:  # queries before the block see none of its keys, those from mid on see all
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, T_Q)
        dk, dv = _attn_bwd_dkdv_loop(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q_t,
                                     stride_do_t, start_n, offs_n, offs_d, mask_d,
                                     (start_n // BLOCK_M) * BLOCK_M, mid, off_bh, T_Q, qk_scale, seed,
                                     n_groups, dropout_p, keep_scale, True, HAS_DROPOUT, BLOCK_M,
                                     BLOCK_N, DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_loop(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q_t,
                                 stride_do_t, start_n, offs_n, offs_d, mask_d, mid, T_Q, off_bh, T_Q,
                                 qk_scale, seed, n_groups, dropout_p, keep_scale, False, HAS_DROPOUT,
                                 BLOCK_M, BLOCK_N, DOT_PRECISION)
    tl.store(dk_ptr + off_b * stride_dk_b + off_h * stride_dk_h + offs_n[:, None] * stride_dk_t
             + offs_d[None, :], (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dv_ptr + off_b * stride_dv_b + off_h * stride_dv_h + offs_n[:, None] * stride_dv_t
             + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_loop(dq, q, do, lse, delta, k_ptr, v_ptr, stride_k_t, stride_v_t, offs_m, offs_d,
                      mask_d, lo, hi, T_K, qk_scale, seed, rows, n_groups, dropout_p, keep_scale,
                      MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                      BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add key blocks lo, lo + BLOCK_N, .. < hi into dQ of one query block (unscaled)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_kv = mask_d[None, :]
        if MASKED:
            mask_kv = (offs_n < T_K)[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + offs_n[:, None] * stride_k_t + offs_d[None, :], mask=mask_kv, other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * stride_v_t + offs_d[None, :], mask=mask_kv, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (M, N), base 2
        if MASKED:
            qk = _mask_scores(qk, offs_m, offs_n, T_K, IS_CAUSAL)
        p = tl.exp2(qk - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (M, N), dO V^T
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows, start_n, n_groups, dropout_p, BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, seed_ptr,
                        stride_q_b, stride_q_t, stride_q_h, stride_k_b, stride_k_t, stride_k_h,
                        stride_v_b, stride_v_t, stride_v_h, stride_do_b, stride_do_t, stride_do_h,
                        stride_dq_b, stride_dq_t, stride_dq_h,
                        H, T_Q, T_K, qk_scale, sm_scale, dropout_p, keep_scale,
                        IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """One program: dQ of BLOCK_M queries of one (batch, head). Grid (cdiv(Tq, BLOCK_M), B * H)."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1).to(tl.int64)
    off_b, off_h = off_bh // H, off_bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = _head_dim_mask(HEAD_DIM, BLOCK_D)
    mask_m = offs_m < T_Q
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + off_b * stride_q_b + off_h * stride_q_h + offs_m[:, None] * stride_q_t
                + offs_d[None, :], mask=mask_md, other=0.0)
    do = tl.load(do_ptr + off_b * stride_do_b + off_h * stride_do_h + offs_m[:, None] * stride_do_t
                 + offs_d[None, :], mask=mask_md, other=0.0)
    rows = off_bh * T_Q + offs_m
    lse = tl.load(lse_ptr + rows, mask=mask_m, other=0.0)
    delta = tl.load(delta_ptr + rows, mask=mask_m, other=0.0)
    k_ptr += off_b * stride_k_b + off_h * stride_k_h
    v_ptr += off_b * stride_v_b + off_h * stride_v_h
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    n_groups = (T_K + 3) // 4

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mid, hi = _key_split(start_m, T_K, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_loop(dq, q, do, lse, delta, k_ptr, v_ptr, stride_k_t, stride_v_t, offs_m,
                           offs_d, mask_d, 0, mid, T_K, qk_scale, seed, rows, n_groups, dropout_p,
                           keep_scale, False, IS_CAUSAL, HAS_DROPOUT, BLOCK_N, DOT_PRECISION)
    dq = _attn_bwd_dq_loop(dq, q, do, lse, delta, k_ptr, v_ptr, stride_k_t, stride_v_t, offs_m,
                           offs_d, mask_d, mid, hi, T_K, qk_scale, seed, rows, n_groups, dropout_p,
                           keep_scale, True, IS_CAUSAL, HAS_DROPOUT, BLOCK_N, DOT_PRECISION)
    tl.store(dq_ptr + off_b * stride_dq_b + off_h * stride_dq_h + offs_m[:, None] * stride_dq_t
             + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=mask_md)


@triton.jit
def _dropout_mask_kernel(mask_ptr, seed_ptr, T_Q, T_K, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep mask as int8 (B * H, Tq, Tk). Grid (B * H, cdiv(Tq, BLOCK_M), cdiv(Tk, BLOCK_N))."""
    off_bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    start_n = tl.program_id(2) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    rows = off_bh * T_Q + offs_m
    keep = _dropout_keep(tl.load(seed_ptr), rows, start_n, (T_K + 3) // 4, dropout_p, BLOCK_N)
    tl.store(mask_ptr + rows[:, None] * T_K + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m < T_Q)[:, None] & (offs_n < T_K)[None, :])


class _Config(NamedTuple):
    """Launch shape of one kernel: queries and keys per block, warps, software-pipeline stages."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Keyed by the padded head dim. Picked for an H100 at the model shape (B, T, H, D) = (64, 256, 6, 64)
# bf16 from Triton tutorial 06's Hopper choices, with BLOCK_M >= 64 so every tl.dot can use wgmma,
# and 8 warps where 4 made ptxas spill registers with dropout on (bench/compile_check.py, sm_90,
# Triton 3.6); not yet timed on a card. Every block size is a multiple of 4 (whole dropout groups),
# and the tests check that each entry here gives the same dropout mask.
_FWD_CONFIGS = {16: _Config(128, 64, 4, 3), 32: _Config(128, 64, 8, 3), 64: _Config(128, 64, 8, 3),
                128: _Config(128, 64, 8, 3)}
_DKDV_CONFIGS = {16: _Config(64, 64, 4, 2), 32: _Config(64, 64, 4, 2), 64: _Config(64, 64, 8, 2),
                 128: _Config(64, 64, 8, 2)}
_DQ_CONFIGS = {16: _Config(64, 64, 4, 2), 32: _Config(64, 64, 4, 2), 64: _Config(64, 64, 4, 2),
               128: _Config(64, 64, 8, 2)}
_PREPROCESS_BLOCK_M = 64


def _block_d(head_dim: int) -> int:
    """The head dim padded to a power of two, at least tl.dot's minimum of 16."""
    return max(16, triton.next_power_of_2(head_dim))


def _table_config(table, dtype: torch.dtype, block_d: int) -> _Config:
    """The table's entry; fp32 takes the exact FMA path (checks, not training), with smaller tiles
    and no pipelining so that it stays within shared memory up to D = 128."""
    cfg = table[block_d]
    if dtype == torch.float32:
        cfg = cfg._replace(block_m=min(cfg.block_m, 64), num_stages=1)
    return cfg


def _dot_precision(dtype: torch.dtype):
    """'ieee' keeps fp32 dots exact on the GPU (no TF32); half types use the default."""
    return "ieee" if dtype == torch.float32 else None


def _attn_forward(q, k, v, dropout_p, causal, scale, seed_t, need_lse=True, *, _config=None):
    """o (B, Tq, H, D) contiguous, and lse (B, H, Tq) fp32 in base 2 (empty unless need_lse).

    q (B, Tq, H, D), k and v (B, Tk, H, D) with unit last-dim stride; seed_t: 1-element int64
    tensor, or None when dropout_p == 0. _config overrides the block table (tests).
    """
    B, T_q, H, D = q.shape
    T_k = k.shape[1]
    block_d = _block_d(D)
    cfg = _config or _table_config(_FWD_CONFIGS, q.dtype, block_d)
    o = torch.empty((B, T_q, H, D), dtype=q.dtype, device=q.device)  # (B, T, H, D)
    lse = torch.empty((B, H, T_q) if need_lse else (0,), dtype=torch.float32, device=q.device)  # (B, H, T)
    has_dropout = dropout_p > 0.0
    grid = (triton.cdiv(T_q, cfg.block_m), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse if need_lse else o, seed_t if has_dropout else q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, T_q, T_k, scale * LOG2E, dropout_p, 1.0 / (1.0 - dropout_p),
        IS_CAUSAL=causal, HAS_DROPOUT=has_dropout, STORE_LSE=need_lse, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, HEAD_DIM=D, BLOCK_D=block_d, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o, lse


def _attn_backward(do, q, k, v, o, lse, dropout_p, causal, scale, seed_t, *, _configs=None):
    """(dq, dk, dv) for the output gradient do (B, Tq, H, D). _configs: (dkdv, dq) overrides."""
    B, T_q, H, D = q.shape
    T_k = k.shape[1]
    block_d = _block_d(D)
    dkdv_cfg, dq_cfg = _configs or (_table_config(_DKDV_CONFIGS, q.dtype, block_d),
                                     _table_config(_DQ_CONFIGS, q.dtype, block_d))
    do = do.to(q.dtype)
    if do.stride(-1) != 1:
        do = do.contiguous()
    # Strided like the inputs where they are dense, contiguous otherwise (views into a packed
    # projection get contiguous gradients; autograd packs them back).
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # (B, T, H, D) each
    delta = torch.empty((B, H, T_q), dtype=torch.float32, device=q.device)  # (B, H, T)
    _attn_bwd_preprocess_kernel[(triton.cdiv(T_q, _PREPROCESS_BLOCK_M), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T_q,
        BLOCK_M=_PREPROCESS_BLOCK_M, HEAD_DIM=D, BLOCK_D=block_d)
    has_dropout = dropout_p > 0.0
    common = dict(IS_CAUSAL=causal, HAS_DROPOUT=has_dropout, HEAD_DIM=D, BLOCK_D=block_d,
                  DOT_PRECISION=_dot_precision(q.dtype))
    scalars = (H, T_q, T_k, scale * LOG2E, scale, dropout_p, 1.0 / (1.0 - dropout_p))
    seed_arg = seed_t if has_dropout else q
    _attn_bwd_dkdv_kernel[(triton.cdiv(T_k, dkdv_cfg.block_n), B * H)](
        q, k, v, do, lse, delta, dk, dv, seed_arg, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], *scalars,
        BLOCK_M=dkdv_cfg.block_m, BLOCK_N=dkdv_cfg.block_n, num_warps=dkdv_cfg.num_warps,
        num_stages=dkdv_cfg.num_stages, **common)
    _attn_bwd_dq_kernel[(triton.cdiv(T_q, dq_cfg.block_m), B * H)](
        q, k, v, do, lse, delta, dq, seed_arg, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *do.stride()[:3], *dq.stride()[:3], *scalars,
        BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n, num_warps=dq_cfg.num_warps,
        num_stages=dq_cfg.num_stages, **common)
    return dq, dk, dv


# The launchers registered as torch.library custom ops, so torch.compile treats each as one opaque
# node (no graph break) and autograd runs _attn_backward. Custom ops return tensors only, never
# None nor an input: an absent lse is an empty tensor.
@torch.library.custom_op("triton_gpt::flash_attn_fwd", mutates_args=())
def _attn_forward_op(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, causal: bool, scale: float,
                     seed_t: Optional[Tensor], need_lse: bool) -> tuple[Tensor, Tensor]:
    return _attn_forward(q, k, v, dropout_p, causal, scale, seed_t, need_lse)


@_attn_forward_op.register_fake
def _(q, k, v, dropout_p, causal, scale, seed_t, need_lse):
    B, T_q, H, _ = q.shape
    lse = q.new_empty((B, H, T_q) if need_lse else (0,), dtype=torch.float32)  # (B, H, T)
    return q.new_empty(q.shape), lse


@torch.library.custom_op("triton_gpt::flash_attn_bwd", mutates_args=())
def _attn_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dropout_p: float,
                      causal: bool, scale: float, seed_t: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return _attn_backward(do, q, k, v, o, lse, dropout_p, causal, scale, seed_t)


@_attn_backward_op.register_fake
def _(do, q, k, v, o, lse, dropout_p, causal, scale, seed_t):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, dropout_p, causal, scale, seed_t, _ = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed_t)
    ctx.dropout_p, ctx.causal, ctx.scale = dropout_p, causal, scale


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, seed_t = ctx.saved_tensors
    dq, dk, dv = _attn_backward_op(do, q, k, v, o, lse, ctx.dropout_p, ctx.causal, ctx.scale, seed_t)
    return dq, dk, dv, None, None, None, None, None


_attn_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q, k, v, causal, softmax_scale):
    """TypeError / ValueError naming the offending value; nothing is allocated before this."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-d (B, T, H, D), got shape {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    (B, T_q, H, D), T_k = q.shape, k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (B, H, D):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and D")
    if min(B, T_q, T_k, H, D) < 1:
        raise ValueError(f"q, k, v must be non-empty, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    if B * H > 65535:
        raise ValueError(f"batch * heads must be at most 65535 (one grid axis), got {B * H}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")


def flash_attention(q, k, v, dropout_p=0.0, causal=True, softmax_scale=None, seed=None):
    """softmax(q k^T * scale, causal) with dropout on the weights, times v; kernels.reference.attention's twin.

    q (B, Tq, H, D), k and v (B, Tk, H, D): any strides with a unit last one (views into a packed
    (B, T, 3, H, D) projection go in as they are), fp32/fp16/bf16, 1 <= D <= 128. Causal: query i
    sees keys 0..i. softmax_scale defaults to 1/sqrt(D). seed (int, 1-element int tensor, or None
    to draw one from torch's generator) picks the dropout mask, see dropout_keep_mask; it is unused
    when dropout_p == 0. Returns (B, Tq, H, D), contiguous.
    """
    _check_inputs(q, k, v, causal, softmax_scale)
    dropout_p = check_dropout_p(dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    seed_t = seed_tensor(seed, q.device) if dropout_p > 0.0 else None
    need_lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    o, _ = _attn_forward_op(q, k, v, dropout_p, causal, scale, seed_t, need_lse)  # (B, T, H, D)
    return o


def dropout_keep_mask(seed, batch, heads, seqlen_q, seqlen_k, dropout_p, device):
    """The bool (B, H, Tq, Tk) mask of attention weights the kernels keep (True) for this seed.

    Drawn by the kernels' own _dropout_keep, so it can be passed as `keep_mask` to
    kernels.reference.attention to check them exactly.
    """
    dropout_p = check_dropout_p(dropout_p)
    for name, n in (("batch", batch), ("heads", heads), ("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    device = torch.device(device)
    seed_t = seed_tensor(seed, device)
    mask = torch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.int8, device=device)  # (B, H, Tq, Tk)
    grid = (batch * heads, triton.cdiv(seqlen_q, 32), triton.cdiv(seqlen_k, 32))
    _dropout_mask_kernel[grid](mask, seed_t, seqlen_q, seqlen_k, dropout_p, BLOCK_M=32, BLOCK_N=32)
    return mask.bool()
