"""Flash attention in Triton: causal or not, forward and backward, dropout on the weights in-kernel.

Math, for one (batch b, head h); rows i are queries, columns j keys, s = softmax_scale:
  S = s Q K^T (causal: S_ij = -inf for j > i),  P = softmax(S),  O = (P o Z / (1 - p)) V,
where Z is the dropout keep mask (kernels.dropout: Z_ij = 1 when the 16-bit slice of Philox that
belongs to (seed, b, h, i, j) is >= round(p 2^16)), and p is the effective p, a multiple of 2^-16.

Forward (online softmax). Work in base 2 with c = s log2(e) > 0 (the launcher makes it so): walk the
key blocks keeping, per row, the running max m of c (Q K^T)_ij, the running sum
l = sum_j 2^(c (Q K^T)_ij - m) and acc = sum_j 2^(c (Q K^T)_ij - m) Z_ij V_j. The max of c x is c
times the max of x, so the scale is one fused multiply-add per element, inside the exp2 argument. A
block with a larger max m' rescales l and acc by 2^(m - m'). At the end O = acc / l / (1 - p) (the
sum l is taken before dropout, as nn.Dropout after softmax does), and lse = m + log2(l) (fp32, base 2)
is kept so backward recomputes P_ij = 2^(c (Q K^T)_ij - lse_i).

Backward. With Pd = P o Z / (1 - p), the dropped weights, O = Pd V gives
  dV = Pd^T dO,  dP = (dO V^T) o Z / (1 - p),  dS = P o (dP - delta),  dQ = s dS K,  dK = s dS^T Q,
  delta_i = sum_j P_ij dP_ij = sum_j Pd_ij (dO V^T)_ij = rowsum(dO o O)_i   (dropout included).
The 1 / (1 - p) is taken out of the loops: with delta' = (1 - p) delta, dS = P o ((dO V^T) o Z -
delta') / (1 - p), so the loops apply only Z, and dV, dK, dQ are scaled once at the end. One kernel
owns a query block and walks the key blocks (dQ); it runs first and also computes its rows' delta'
(it loads dO anyway) for the other, which owns a key block and walks the query blocks (dK, dV: one
warpgroup, S and dP computed once). Every gradient element is written by one program in a fixed
order: bitwise repeatable, no atomics. No (T, T) matrix is ever stored.

Causal blocks: key blocks the mask empties are skipped; the mask is applied only on blocks that
straddle the diagonal (or the ragged end), the `MASKED` stage of each loop.

Dropout bits: kernels.dropout.attention_keep, whose docstring gives the layout. One Philox4x32-7 call
serves the 8 elements (i + {0, 8}) x (j + {0, 1, 8, 9}) that one thread holds in a tensor-core
accumulator, so the mask is drawn in the accumulator's own layout (no trip through shared memory),
and it depends on (seed, b, h, i, j) only, never on block shapes, grid or launch order.

The Python layer (see kernels/_common.py): flash_attention checks its inputs and calls the launchers
directly, through _FlashAttention (a torch.autograd.Function) when a gradient is needed; a traced
call (torch.compile) goes through the op triton_gpt::flash_attn_fwd instead, a torch.library
triton_op whose kernels torch.compile sees.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels import _DOCS
from kernels._common import (FLOAT_DTYPES, MAX_HEAD_DIM, _no_wrap, check_dropout_p, check_float_tensor, define_op,
                             device_error, launch_meta, no_double_backward, op_wrap, seed_tensor, traced,
                             triton_device_types)
from kernels.dropout import attention_keep, dropout_threshold

LOG2E = 1.4426950408889634
_TINY_SCALE = 2.0**-126  # softmax_scale 0 runs as this: every c (Q K^T)_ij still rounds to 0 in fp32


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
def _visible(offs_m, start_n, T_K, IS_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """(M, N) bool: key start_n + n exists (< Tk) and, causal, is not after query offs_m.

    One compare an element: against a per-row limit, with the block's own key offsets n (constants);
    the keys' absolute offsets would be compared in 64 bits once LLVM widens the loop counter.
    """
    if IS_CAUSAL:
        limit = tl.minimum(offs_m, T_K - 1) - start_n  # (M,): the last visible key, block-relative
        visible = tl.arange(0, BLOCK_N)[None, :] <= limit[:, None]
    else:
        visible = (tl.arange(0, BLOCK_N) < T_K - start_n)[None, :]
    return visible


@triton.jit
def _attn_fwd_loop(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k_t, stride_v_t, start_m, offs_m, offs_d, mask_d,
                   lo, hi, T_K, qk_scale, seed, off_bh, threshold, zero,
                   MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key blocks lo, lo + BLOCK_N, .. < hi into the online softmax of one query block."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_kv = mask_d[None, :]
        if MASKED:
            mask_kv = (offs_n < T_K)[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + offs_n[:, None] * stride_k_t + offs_d[None, :], mask=mask_kv, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (M, N), unscaled
        if MASKED:
            qk = tl.where(_visible(offs_m, start_n, T_K, IS_CAUSAL, BLOCK_N), qk, float("-inf"))
        # Finite: key 0 is in the first block every row sees. qk_scale > 0 keeps -inf at -inf.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk * qk_scale - m_new[:, None])  # one FFMA and one MUFU an element
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # A runtime 0.0, not a literal: with a constant LLVM moves the select past the bf16
            # rounding below and ptxas then selects 16-bit halves (byte shuffles, PRMT).
            p = tl.where(attention_keep(seed, off_bh, start_m, start_n, threshold, BLOCK_M, BLOCK_N), p, zero)
        v = tl.load(v_ptr + offs_n[:, None] * stride_v_t + offs_d[None, :], mask=mask_kv, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, seed_ptr,
                     stride_q_b, stride_q_t, stride_q_h, stride_k_b, stride_k_t, stride_k_h,
                     stride_v_b, stride_v_t, stride_v_h, stride_o_b, stride_o_t, stride_o_h,
                     H, T_Q, T_K, qk_scale, threshold, keep_scale,
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
    zero = keep_scale * 0.0  # see _attn_fwd_loop

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mid, hi = _key_split(start_m, T_K, IS_CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _attn_fwd_loop(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k_t, stride_v_t, start_m, offs_m,
                                   offs_d, mask_d, 0, mid, T_K, qk_scale, seed, off_bh, threshold, zero,
                                   False, IS_CAUSAL, HAS_DROPOUT, BLOCK_M, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _attn_fwd_loop(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k_t, stride_v_t, start_m, offs_m,
                                   offs_d, mask_d, mid, hi, T_K, qk_scale, seed, off_bh, threshold, zero,
                                   True, IS_CAUSAL, HAS_DROPOUT, BLOCK_M, BLOCK_N, DOT_PRECISION)
    if STORE_LSE:
        tl.store(lse_ptr + off_bh * T_Q + offs_m, m_i + tl.log2(l_i), mask=mask_m)
    o = acc * (keep_scale / l_i)[:, None]
    o_ptr += off_b * stride_o_b + off_h * stride_o_h
    tl.store(o_ptr + offs_m[:, None] * stride_o_t + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def _attn_bwd_dkdv_loop(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q_t, stride_do_t,
                        start_n, offs_n, offs_d, mask_d, lo, hi, off_bh, T_Q, qk_scale, seed, threshold,
                        zero, MASKED: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add query blocks lo, lo + BLOCK_M, .. < hi into dK, dV of one key block (both unscaled)."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < T_Q  # rows past Tq load as zeros (q = 0, dO = 0) and add nothing
        q = tl.load(q_ptr + offs_m[:, None] * stride_q_t + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        do = tl.load(do_ptr + offs_m[:, None] * stride_do_t + offs_d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        lse = tl.load(lse_ptr + off_bh * T_Q + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + off_bh * T_Q + offs_m, mask=mask_m, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (M, N), unscaled
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if MASKED:  # causal only; block-relative key offsets, see _visible
            p = tl.where(tl.arange(0, BLOCK_N)[None, :] <= (offs_m - start_n)[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (M, N), dO V^T
        pz = p
        if HAS_DROPOUT:
            keep = attention_keep(seed, off_bh, start_m, start_n, threshold, BLOCK_M, BLOCK_N)
            pz = tl.where(keep, p, zero)  # a runtime zero: see _attn_fwd_loop
            dp = tl.where(keep, dp, 0.0)
        dv = tl.dot(tl.trans(pz.to(do.dtype)), do, dv, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, seed_ptr,
                          stride_q_b, stride_q_t, stride_q_h, stride_k_b, stride_k_t, stride_k_h,
                          stride_v_b, stride_v_t, stride_v_h, stride_do_b, stride_do_t, stride_do_h,
                          stride_dk_b, stride_dk_t, stride_dk_h, stride_dv_b, stride_dv_t, stride_dv_h,
                          H, T_Q, T_K, qk_scale, dk_scale, threshold, keep_scale,
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
    zero = keep_scale * 0.0

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    mid = 0
    if IS_CAUSAL:  # queries before the block see none of its keys, those from mid on see all
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, T_Q)
        dk, dv = _attn_bwd_dkdv_loop(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q_t,
                                     stride_do_t, start_n, offs_n, offs_d, mask_d,
                                     (start_n // BLOCK_M) * BLOCK_M, mid, off_bh, T_Q, qk_scale, seed,
                                     threshold, zero, True, HAS_DROPOUT, BLOCK_M, BLOCK_N, DOT_PRECISION)
    dk, dv = _attn_bwd_dkdv_loop(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, stride_q_t,
                                 stride_do_t, start_n, offs_n, offs_d, mask_d, mid, T_Q, off_bh, T_Q,
                                 qk_scale, seed, threshold, zero, False, HAS_DROPOUT, BLOCK_M, BLOCK_N,
                                 DOT_PRECISION)
    tl.store(dk_ptr + off_b * stride_dk_b + off_h * stride_dk_h + offs_n[:, None] * stride_dk_t
             + offs_d[None, :], (dk * dk_scale).to(dk_ptr.dtype.element_ty), mask=mask_nd)
    tl.store(dv_ptr + off_b * stride_dv_b + off_h * stride_dv_h + offs_n[:, None] * stride_dv_t
             + offs_d[None, :], (dv * keep_scale).to(dv_ptr.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_loop(dq, q, do, lse, delta, k_ptr, v_ptr, stride_k_t, stride_v_t, start_m, offs_m, offs_d,
                      mask_d, lo, hi, T_K, qk_scale, seed, off_bh, threshold,
                      MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add key blocks lo, lo + BLOCK_N, .. < hi into dQ of one query block (unscaled)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_kv = mask_d[None, :]
        if MASKED:
            mask_kv = (offs_n < T_K)[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + offs_n[:, None] * stride_k_t + offs_d[None, :], mask=mask_kv, other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * stride_v_t + offs_d[None, :], mask=mask_kv, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (M, N), unscaled
        p = tl.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m, start_n, T_K, IS_CAUSAL, BLOCK_N), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # (M, N), dO V^T
        if HAS_DROPOUT:
            dp = tl.where(attention_keep(seed, off_bh, start_m, start_n, threshold, BLOCK_M, BLOCK_N), dp, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, seed_ptr,
                        stride_q_b, stride_q_t, stride_q_h, stride_k_b, stride_k_t, stride_k_h,
                        stride_v_b, stride_v_t, stride_v_h, stride_o_b, stride_o_t, stride_o_h,
                        stride_do_b, stride_do_t, stride_do_h, stride_dq_b, stride_dq_t, stride_dq_h,
                        H, T_Q, T_K, qk_scale, dq_scale, threshold, delta_scale,
                        IS_CAUSAL: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """One program: dQ of BLOCK_M queries of one (batch, head), and their delta' for the dK/dV
    kernel, which runs after it. Grid (cdiv(Tq, BLOCK_M), B * H)."""
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
    o = tl.load(o_ptr + off_b * stride_o_b + off_h * stride_o_h + offs_m[:, None] * stride_o_t
                + offs_d[None, :], mask=mask_md, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1) * delta_scale  # (M,): (1 - p) rowsum(dO o O)
    tl.store(delta_ptr + off_bh * T_Q + offs_m, delta, mask=mask_m)
    lse = tl.load(lse_ptr + off_bh * T_Q + offs_m, mask=mask_m, other=0.0)
    k_ptr += off_b * stride_k_b + off_h * stride_k_h
    v_ptr += off_b * stride_v_b + off_h * stride_v_h
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    mid, hi = _key_split(start_m, T_K, IS_CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_loop(dq, q, do, lse, delta, k_ptr, v_ptr, stride_k_t, stride_v_t, start_m, offs_m,
                           offs_d, mask_d, 0, mid, T_K, qk_scale, seed, off_bh, threshold,
                           False, IS_CAUSAL, HAS_DROPOUT, BLOCK_M, BLOCK_N, DOT_PRECISION)
    dq = _attn_bwd_dq_loop(dq, q, do, lse, delta, k_ptr, v_ptr, stride_k_t, stride_v_t, start_m, offs_m,
                           offs_d, mask_d, mid, hi, T_K, qk_scale, seed, off_bh, threshold,
                           True, IS_CAUSAL, HAS_DROPOUT, BLOCK_M, BLOCK_N, DOT_PRECISION)
    tl.store(dq_ptr + off_b * stride_dq_b + off_h * stride_dq_h + offs_m[:, None] * stride_dq_t
             + offs_d[None, :], (dq * dq_scale).to(dq_ptr.dtype.element_ty), mask=mask_md)


@triton.jit
def _dropout_mask_kernel(mask_ptr, seed_ptr, T_Q, T_K, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep mask as int8 (B * H, Tq, Tk). Grid (B * H, cdiv(Tq, BLOCK_M), cdiv(Tk, BLOCK_N))."""
    off_bh = tl.program_id(0).to(tl.int64)
    start_m = tl.program_id(1) * BLOCK_M
    start_n = tl.program_id(2) * BLOCK_N
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    keep = attention_keep(tl.load(seed_ptr), off_bh, start_m, start_n, threshold, BLOCK_M, BLOCK_N)
    tl.store(mask_ptr + (off_bh * T_Q + offs_m)[:, None] * T_K + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m < T_Q)[:, None] & (offs_n < T_K)[None, :])


class _Config(NamedTuple):
    """Launch shape of one kernel: queries and keys per block, warps, software-pipeline stages."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# The defaults, keyed by the padded head dim: for an unknown GPU, for the interpreter, and wherever
# kernels/attention_configs.py (written by bench/tune.py from measurements) has no entry. Chosen from
# the static cost report (bench/compile_check.py --cost, sm_90, Triton 3.6): BLOCK_M, BLOCK_N >= 64
# so every tl.dot can use wgmma; dK/dV on one warpgroup (4 warps: 8 warps on 64 rows compute S and
# dP twice), and without software pipelining at D = 64, where 2 stages spill 40 bytes with dropout.
# D = 128's dK/dV is the exception: its dK and dV (64 x 128 fp32 each) need 128 registers a thread
# on 4 warps, so 8 warps split them by D and both warpgroups compute S and dP. Every block size is a
# multiple of 16 (the dropout bits come in 16 x 16 tiles), and the tests check that every
# configuration gives the same dropout mask.
_DEFAULT_CONFIGS = {
    "fwd": {16: _Config(128, 64, 4, 3), 32: _Config(128, 64, 8, 3), 64: _Config(128, 64, 8, 3),
            128: _Config(128, 64, 8, 3)},
    "dkdv": {16: _Config(64, 64, 4, 2), 32: _Config(64, 64, 4, 2), 64: _Config(64, 64, 4, 1),
             128: _Config(64, 64, 8, 2)},
    "dq": {16: _Config(64, 64, 4, 2), 32: _Config(64, 64, 4, 2), 64: _Config(64, 64, 4, 2),
           128: _Config(128, 64, 8, 2)},
}


# The device types these kernels run on in this process ('cuda'; also 'cpu' under the interpreter).
DEVICE_TYPES = triton_device_types(_attn_fwd_kernel)


def _block_d(head_dim: int) -> int:
    """The head dim padded to a power of two, at least tl.dot's minimum of 16."""
    return max(16, 1 << (head_dim - 1).bit_length())  # triton.next_power_of_2, without its call cost


def _cdiv(a, b):
    """ceil(a / b) for the grids (triton.cdiv costs a microsecond a call on Triton 3.9's host)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _arch(device: torch.device) -> str:
    """'sm90' for an H100; 'cpu' off the GPU (the interpreter), where only the defaults apply."""
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def configs_for(device, dtype: torch.dtype, head_dim: int, causal: bool, dropout: bool) -> dict:
    """{'fwd', 'dkdv', 'dq'} -> _Config: the measured table's entry for this GPU, else the defaults.

    fp32 takes the exact FMA path (checks, not training), with BLOCK_M <= 64 and no pipelining so
    that it stays within shared memory up to D = 128.
    """
    from kernels.attention_configs import TABLE

    block_d = _block_d(head_dim)
    key = config_key(_arch(torch.device(device)), dtype, block_d, causal, dropout)
    measured = TABLE.get(key, {})
    cfgs = {}
    for kernel, defaults in _DEFAULT_CONFIGS.items():
        cfg = _Config(*measured[kernel]) if kernel in measured else defaults[block_d]
        if dtype == torch.float32:
            cfg = cfg._replace(block_m=min(cfg.block_m, 64), num_stages=1)
        cfgs[kernel] = cfg
    return cfgs


_LAUNCH_CONFIGS: dict = {}  # (device, dtype, head dim, causal, dropout) -> configs_for(...)


def _launch_configs(device, dtype, head_dim, causal, dropout) -> dict:
    """configs_for, looked up once per process and key (the launchers' hot path)."""
    key = (device, dtype, head_dim, causal, dropout)
    cfgs = _LAUNCH_CONFIGS.get(key)
    if cfgs is None:
        cfgs = _LAUNCH_CONFIGS[key] = configs_for(device, dtype, head_dim, causal, dropout)
    return cfgs


def config_key(arch: str, dtype: torch.dtype, block_d: int, causal: bool, dropout: bool) -> str:
    """The table's key, e.g. 'sm90 bf16 D64 causal dropout'."""
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return f"{arch} {name} D{block_d}{' causal' if causal else ''}{' dropout' if dropout else ''}"


def _dot_precision(dtype: torch.dtype):
    """'ieee' keeps fp32 dots exact on the GPU (no TF32); half types use the default."""
    return "ieee" if dtype == torch.float32 else None


# Each launch's constexprs and options (kernels._common.launch_meta), built once per configuration
# and flags: spreading a dozen keywords on every call cost about 0.6 us of host time a launch.
@functools.lru_cache(maxsize=None)
def _fwd_meta(cfg: _Config, causal: bool, has_dropout: bool, need_lse: bool, head_dim: int,
              dtype: torch.dtype) -> tuple[tuple, dict]:
    return launch_meta(_attn_fwd_kernel, dict(
        IS_CAUSAL=causal, HAS_DROPOUT=has_dropout, STORE_LSE=need_lse, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), DOT_PRECISION=_dot_precision(dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages))


@functools.lru_cache(maxsize=None)
def _bwd_meta(kernel_name: str, cfg: _Config, causal: bool, has_dropout: bool, head_dim: int,
              dtype: torch.dtype) -> tuple[tuple, dict]:
    kernel = {"dq": _attn_bwd_dq_kernel, "dkdv": _attn_bwd_dkdv_kernel}[kernel_name]
    return launch_meta(kernel, dict(
        IS_CAUSAL=causal, HAS_DROPOUT=has_dropout, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HEAD_DIM=head_dim,
        BLOCK_D=_block_d(head_dim), DOT_PRECISION=_dot_precision(dtype), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages))


def _positive_scale(q: Tensor, scale: float) -> tuple[Tensor, float]:
    """(q', c) with c = s' log2(e) > 0 and s' q' = s q, as the kernels need: a negative scale runs as
    -q with -s, and 0 as the smallest normal float (every logit still rounds to 0 in fp32)."""
    if scale < 0.0:
        return -q, -scale * LOG2E
    return q, max(scale, _TINY_SCALE) * LOG2E


# The launchers. `wrap_triton` is torch.library.wrap_triton when a registered op traces them (see
# _attn_forward_body) and the identity otherwise; the parameter keeps that name because torch finds
# the kernels behind an op by reading its source for wrap_triton(<kernel>) calls (torch.compile's
# caches then key on the kernels' source). `kernel.run(*args, grid=grid, warmup=False)` is what
# `kernel[grid](*args)` calls, without a lambda and a second packing of the arguments (0.7 us a
# launch on the host); torch's wrapper takes the same call.
def _attn_forward(q, k, v, dropout_p, causal, scale, seed_t, need_lse=True, *, _config=None, wrap_triton=_no_wrap):
    """o (B, Tq, H, D) contiguous, and lse (B, H, Tq) fp32 in base 2, or None unless need_lse.

    q (B, Tq, H, D), k and v (B, Tk, H, D) with unit last-dim stride; seed_t: 1-element int64
    tensor, or None when dropout_p == 0. _config overrides the block table (tests, bench/tune.py).
    """
    B, T_q, H, D = q.shape
    T_k, D = k.shape[1], int(D)  # D a plain int (a constexpr) even when torch.compile traces symbolic shapes
    threshold, _, keep_scale = dropout_threshold(dropout_p)
    has_dropout = threshold > 0
    cfg = _config or _launch_configs(q.device, q.dtype, D, causal, has_dropout)["fwd"]
    o = torch.empty_like(q, memory_format=torch.contiguous_format)  # (B, T, H, D)
    lse = q.new_empty(B, H, T_q, dtype=torch.float32) if need_lse else None  # (B, H, T)
    q, qk_scale = _positive_scale(q, scale)
    consts, options = _fwd_meta(cfg, causal, has_dropout, need_lse, D, q.dtype)
    wrap_triton(_attn_fwd_kernel).run(
        q, k, v, o, lse if need_lse else o, seed_t if has_dropout else q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, T_q, T_k, qk_scale, threshold, keep_scale, *consts,
        grid=(_cdiv(T_q, cfg.block_m), B * H), warmup=False, **options)
    return o, lse


def _attn_backward(do, q, k, v, o, lse, dropout_p, causal, scale, seed_t, *, _configs=None, wrap_triton=_no_wrap):
    """(dq, dk, dv) for the output gradient do (B, Tq, H, D). _configs: (dkdv, dq) overrides."""
    B, T_q, H, D = q.shape
    T_k, D = k.shape[1], int(D)  # as in _attn_forward
    threshold, p_eff, keep_scale = dropout_threshold(dropout_p)
    has_dropout = threshold > 0
    if _configs is None:
        cfgs = _launch_configs(q.device, q.dtype, D, causal, has_dropout)
        _configs = (cfgs["dkdv"], cfgs["dq"])
    dkdv_cfg, dq_cfg = _configs
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    if do.stride(-1) != 1:
        do = do.contiguous()
    # Strided like the inputs where they are dense, contiguous otherwise (views into a packed
    # projection get contiguous gradients; autograd packs them back).
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # (B, T, H, D) each
    delta = q.new_empty(B, H, T_q, dtype=torch.float32)  # (B, H, T), written by dQ's kernel
    q_run, qk_scale = _positive_scale(q, scale)
    seed_arg = seed_t if has_dropout else q
    # dK = s dS^T Q = |s| dS^T q_run; dQ = s dS K. Both and dV carry the 1 / (1 - p) of the loops.
    grad_scale = abs(scale) * keep_scale
    # dQ's kernel first: it also writes delta', which the dK/dV kernel reads.
    consts, options = _bwd_meta("dq", dq_cfg, causal, has_dropout, D, q.dtype)
    wrap_triton(_attn_bwd_dq_kernel).run(
        q_run, k, v, o, do, lse, delta, dq, seed_arg, *q_run.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *o.stride()[:3], *do.stride()[:3], *dq.stride()[:3], H, T_q, T_k, qk_scale,
        math.copysign(grad_scale, scale), threshold, 1.0 - p_eff, *consts,
        grid=(_cdiv(T_q, dq_cfg.block_m), B * H), warmup=False, **options)
    consts, options = _bwd_meta("dkdv", dkdv_cfg, causal, has_dropout, D, q.dtype)
    wrap_triton(_attn_bwd_dkdv_kernel).run(
        q_run, k, v, do, lse, delta, dk, dv, seed_arg, *q_run.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H, T_q, T_k, qk_scale, grad_scale, threshold, keep_scale, *consts,
        grid=(_cdiv(T_k, dkdv_cfg.block_n), B * H), warmup=False, **options)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """Autograd for eager calls: the launchers, with no dispatcher between them and the caller."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p, causal, scale, seed_t):
        o, lse = _attn_forward(q, k, v, dropout_p, causal, scale, seed_t, True)
        ctx.save_for_backward(q, k, v, o, lse, seed_t)
        ctx.args = (dropout_p, causal, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        no_double_backward("kernels.flash_attention")
        q, k, v, o, lse, seed_t = ctx.saved_tensors
        dropout_p, causal, scale = ctx.args
        dq, dk, dv = _attn_backward(do, q, k, v, o, lse, dropout_p, causal, scale, seed_t)
        return dq, dk, dv, None, None, None, None


# The same launchers as torch.library ops, for tracers (torch.compile, FakeTensorMode): see
# kernels._common.define_op. An op returns tensors only, never None nor an input: an absent lse is
# an empty tensor.
_OP_WRAP = op_wrap(_attn_fwd_kernel)


def _attn_forward_body(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, causal: bool, scale: float,
                       seed_t: Optional[Tensor], need_lse: bool) -> tuple[Tensor, Tensor]:
    o, lse = _attn_forward(q, k, v, dropout_p, causal, scale, seed_t, need_lse, wrap_triton=_OP_WRAP)
    return o, lse if need_lse else q.new_empty((0,), dtype=torch.float32)


def _attn_forward_fake(q, k, v, dropout_p, causal, scale, seed_t, need_lse):
    B, T_q, H, _ = q.shape
    lse = q.new_empty((B, H, T_q) if need_lse else (0,), dtype=torch.float32)  # (B, H, T)
    return q.new_empty(q.shape), lse


def _attn_backward_body(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dropout_p: float,
                        causal: bool, scale: float, seed_t: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return _attn_backward(do, q, k, v, o, lse, dropout_p, causal, scale, seed_t, wrap_triton=_OP_WRAP)


def _attn_backward_fake(do, q, k, v, o, lse, dropout_p, causal, scale, seed_t):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_attn_forward_op = define_op("triton_gpt::flash_attn_fwd", _attn_forward_body, _attn_forward_fake, _attn_fwd_kernel)
_attn_backward_op = define_op("triton_gpt::flash_attn_bwd", _attn_backward_body, _attn_backward_fake,
                              _attn_fwd_kernel)


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


def _check_inputs(q, k, v, causal, softmax_scale) -> torch.device:
    """TypeError / ValueError naming the offending value, TritonDeviceError for a device Triton cannot
    run on; returns the inputs' device. Nothing is allocated before this. Each test covers q, k and v
    at once and builds its message only when it fails: about a microsecond when all is well."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_float_tensor(name, t)
    dtype = q.dtype
    if not (dtype in FLOAT_DTYPES and k.dtype is dtype and v.dtype is dtype):
        for name, t in (("q", q), ("k", k), ("v", v)):
            check_float_tensor(name, t)
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.ndim == k.ndim == v.ndim == 4:
        name, t = next((n, t) for n, t in (("q", q), ("k", k), ("v", v)) if t.ndim != 4)
        raise ValueError(f"{name} must be 4-d (B, T, H, D), got shape {tuple(t.shape)}")
    device = q.device
    if not device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if device.type not in DEVICE_TYPES:
        raise device_error("kernels.flash_attention", device)
    (B, T_q, H, D), k_shape = q.shape, k.shape
    if k_shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k_shape)} and {tuple(v.shape)}")
    if k_shape[0] != B or k_shape[2] != H or k_shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k_shape)} must agree in B, H and D")
    if not (B and T_q and k_shape[1] and H):
        raise ValueError(f"q, k, v must be non-empty, got q {tuple(q.shape)}, k {tuple(k_shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    if B * H > 65535:
        raise ValueError(f"batch * heads must be at most 65535 (one grid axis), got {B * H}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        name, t = next((n, t) for n, t in (("q", q), ("k", k), ("v", v)) if t.stride(-1) != 1)
        raise ValueError(f"{name} must have unit stride in its last dimension, got strides {t.stride()}")
    if causal is not True and causal is not False:
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return device


def flash_attention(q, k, v, dropout_p=0.0, causal=True, softmax_scale=None, seed=None):
    device = _check_inputs(q, k, v, causal, softmax_scale)
    dropout_p = check_dropout_p(dropout_p)
    scale = 1.0 / math.sqrt(int(q.shape[-1])) if softmax_scale is None else float(softmax_scale)
    seed_t = seed_tensor(seed, device) if dropout_p > 0.0 else None
    need_lse = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if traced():
        return _attn_forward_op(q, k, v, dropout_p, causal, scale, seed_t, need_lse)[0]  # (B, T, H, D)
    if need_lse:
        return _FlashAttention.apply(q, k, v, dropout_p, causal, scale, seed_t)  # (B, T, H, D)
    return _attn_forward(q, k, v, dropout_p, causal, scale, seed_t, False)[0]  # (B, T, H, D)


flash_attention.__doc__ = _DOCS["flash_attention"]  # the public text, kernels/__init__.py


def dropout_keep_mask(seed, batch, heads, seqlen_q, seqlen_k, dropout_p, device):
    """The bool (B, H, Tq, Tk) mask of attention weights the kernels keep (True) for this seed.

    Drawn by the kernels' own helper (kernels.dropout.attention_keep), so it can be passed as
    `keep_mask` to kernels.reference.attention, with the effective p of
    kernels.dropout.dropout_threshold(dropout_p), to check the kernels exactly.
    """
    dropout_p = check_dropout_p(dropout_p)
    for name, n in (("batch", batch), ("heads", heads), ("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    device = torch.device(device)
    seed_t = seed_tensor(seed, device)
    mask = torch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.int8, device=device)  # (B, H, Tq, Tk)
    grid = (batch * heads, _cdiv(seqlen_q, 32), _cdiv(seqlen_k, 32))
    _dropout_mask_kernel[grid](mask, seed_t, seqlen_q, seqlen_k, dropout_threshold(dropout_p).threshold,
                               BLOCK_M=32, BLOCK_N=32)
    return mask.bool()
