"""Fused LayerNorm in Triton: y = layer_norm(x) and (y, s) = (layer_norm(s), s), s = residual + dropout(x).

The math (over one row of C values, all in fp32):

    mean = sum(s) / C          rstd = 1 / sqrt(sum((s - mean)^2) / C + eps)
    xhat = (s - mean) * rstd   y = xhat * w + b

s is the value stored, rounded to the compute dtype, which is also what backward reads: the
statistics come from it, not from the unrounded sum. Two passes, the mean then the variance around
it, and a mean that is exact on a constant row (then y = bias exactly, as PyTorch gives):

- 16-bit s (C <= 2^(24 - p), p the significand's bits: any C for bf16, C <= 8192 for fp16): the
  fp32 sum of C equal values is exact, and one Markstein step, mean += (sum - mean C) / C with the
  remainder taken by an fma, makes mean = sum / C correctly rounded, so the row's value;
- fp32 s: the second pass also sums d = s - mean0 (exact when s is near mean0, mean0 = sum / C):
  mean = mean0 + sum(d) / C and var = sum(d^2) / C - (sum(d) / C)^2. A constant row has d the same
  everywhere, so mean is its value. On rows with a large mean and a small spread the mean is
  then nearly correctly rounded.

Measured at (16384, 384) bf16 for sm_90 against a plain two-pass mean: the Markstein step costs
7 instructions a program of 16 rows, the corrected second pass (the fp32 scheme) 114. xhat is
computed from the rounded fp32 mean in both directions, so forward and backward agree.

Backward, with dy the upstream gradient and dxhat = dy * w (dy when there is no weight):

    dweight = sum over rows of dy * xhat        dbias = sum over rows of dy
    ds = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))  (+ the gradient that reaches s
                                                                    directly, from its later use)
    dresidual = ds             dx = ds * keep * scale   (dx = ds without dropout)

The two means come from differentiating through mean and rstd: d(mean)/ds = 1/C and
d(rstd)/ds = -rstd^3 (s - mean) / C, which collapse to the mean(dxhat) and xhat * mean(dxhat * xhat)
terms. Only mean and rstd (fp32, one each per row) are saved; xhat is recomputed from s.

Layout. A program holds ROWS rows as 2D tiles (M, SUB), M = ROWS / 2: tile (k, h) is columns
[k SUB, (k + 1) SUB) of rows 2m + h, for the pairs m of the program's rows (one row per pair when
a program holds a single row). C = 384 is 3 tiles of 128 by 2 rows: no lane holds a padding column
(a tile that crosses C is masked). Each thread holds 4 consecutive columns of a tile, and the same
columns of both rows of its pair; a warp owns a pair, so every row sum stays inside the warp
(shuffles: no shared memory, no barrier). The tiles live in tuples: every tile of every width has
the same 2D layout, which Triton chooses the same way in every version (a layout with a dimension
per tile index would hang on how a Triton release orders dimensions of equal contiguity).

dweight and dbias are reduced without atomics. The backward grid has as many programs as fit on
the GPU at once (from the compiled kernel's registers and shared memory). Each walks a fixed set
of row blocks, accumulating dy * xhat and dy per column in registers; after its last block it
sums them across its warps and writes one row of the (P, 2, C) partials. One small kernel sums
those over P in a fixed order and casts to the parameters' dtype. Same device, same bits, every run.

Dropout: kernels.dropout's generator (Philox4x32-7 keyed by the 64-bit seed, 16-bit slices against
an integer threshold, p quantized to 1/65536 and scale = 1 / (1 - that p)) in its LayerNorm layout:
one Philox call per 2 rows x 4 columns, which is what a thread holds, in the STREAM_LAYERNORM
counters, for real columns only; the bits depend on (seed, row, col) of x viewed as (rows, C), never
on the tiles, ROWS or the grid. kernels.dropout's docstring gives the layout; its `layernorm_keep`
draws the bits in the forward, again in the backward, and in `dropout_keep_mask`. dropout(x) is
rounded to x's dtype before the add, as residual + F.dropout(x) rounds it.

The Python layer (see kernels/_common.py): layer_norm and add_layer_norm check their inputs and call
the launchers directly, through _LayerNorm (a torch.autograd.Function) when a gradient is needed; a
traced call (torch.compile) goes through the op triton_gpt::layer_norm_fwd instead, a torch.library
triton_op whose kernels torch.compile sees.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import MockTensor

from kernels import _DOCS
from kernels._common import (_no_wrap, check_dropout_p, check_float_tensor, define_op, device_error, launch_meta,
                             no_double_backward, op_wrap, seed_tensor, traced, triton_device_types)
from kernels.dropout import dropout_threshold, inline_ptx, layernorm_keep

MAX_COLS = 16384  # a row lives in registers (<= 32 fp32 values a thread per tensor at 16 warps)
_INTERPRETER_PROGRAMS = 8  # backward programs off the GPU (Triton's interpreter): a small fixed count
_MAX_BLOCKS_PER_SM = 32  # the most resident blocks one SM holds (sm_80 to sm_90)
_REDUCE_BLOCK_N = 64  # columns of the partials a program of the dweight/dbias reduction sums


@triton.jit
def _to_f32(x):
    """x (fp32, fp16 or bf16) in fp32. On the GPU a bf16 pair in one 32-bit register becomes two fp32
    values by a shift and an AND (for the upper value ptxas makes Triton's conversion a PRMT and a
    shift); in the interpreter, Triton's conversion: the same values (bf16 is fp32's upper half)."""
    if inline_ptx() and x.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xFFFF0000; }", "=r,=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=2)
    return x.to(tl.float32)


@triton.jit
def _add_rounded(a, b):
    """a + b rounded once to their dtype (both of one dtype). In fp32 then rounded for 16-bit types,
    which is the same (fp32 has more than twice their significand bits); on the GPU a bf16 pair is
    one fma.rn.bf16x2 (a * 1 + b), whose packed result is stored as it is (Triton's per-value adds
    cost ptxas four to six PRMTs a store to unpack and repack the pairs)."""
    if inline_ptx() and a.dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("{ .reg .b32 one; mov.b32 one, 0x3F803F80; fma.rn.bf16x2 $0, $1, one, $2; }",
                                         "=r,r,r", [a, b], dtype=tl.bfloat16, is_pure=True, pack=2)
    return (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)


@triton.jit
def _block_rows(block, h, ROWS: tl.constexpr, PAIR: tl.constexpr):
    """Rows (M,) of row block `block`, M = ROWS / PAIR: with PAIR = 2, rows 2 m + h of its pairs m."""
    if PAIR == 2:
        rows = 2 * (block * (ROWS // 2) + tl.arange(0, ROWS // 2)) + h
    else:
        rows = block * ROWS + tl.arange(0, ROWS)
    return rows


@triton.jit
def _tile_mask(rows, n_rows, cols, n_cols, MASK_COLS: tl.constexpr):
    """The elements of an (M, SUB) tile that exist: (M, 1), or (M, SUB) for a tile that crosses C."""
    if MASK_COLS:
        mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    else:
        mask = (rows < n_rows)[:, None]
    return mask


@triton.jit
def _load_param(ptr, rows, cols, n_cols, MASK_COLS: tl.constexpr):
    """A (C,) parameter at cols as an (M, SUB) fp32 tile in the data's layout (each warp reads its
    own copy; the two rows of a pair share it)."""
    ptrs = ptr + (rows * 0)[:, None] + cols[None, :]  # (M, SUB)
    if MASK_COLS:
        return tl.load(ptrs, mask=(cols < n_cols)[None, :], other=0.0).to(tl.float32)
    return tl.load(ptrs).to(tl.float32)


@triton.jit
def _ln_fwd_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr, seed_ptr,
    n_rows, n_cols, inv_cols, eps, threshold_hi, dropout_scale,
    SUB: tl.constexpr, NSUB: tl.constexpr, NFULL: tl.constexpr, ROWS: tl.constexpr, PAIR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, SAVE_STATS: tl.constexpr, EXACT_SUM: tl.constexpr,
):
    # One program normalizes ROWS rows as tiles (M, SUB), M = ROWS / PAIR: tile (k, h) holds columns
    # [k SUB, (k + 1) SUB) of rows 2 m + h (h = 0 alone when PAIR = 1). The first NFULL tiles lie
    # inside C, the others are masked at C. Tuples hold the tiles, tile (k, h) at index k PAIR + h.
    tl.static_assert(ROWS * NSUB * SUB <= 16384, "a program's rows must fit in registers")
    pid = tl.program_id(0)
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    cols0 = tl.max_contiguous(tl.arange(0, SUB), 4)  # (SUB,): a thread holds 4 consecutive columns
    rows = ()
    for h in tl.static_range(PAIR):
        rows = rows + (_block_rows(pid, h, ROWS, PAIR),)  # (M,) each

    # s = residual + dropout(x) in fp32, as stored (s is stored when new).
    s = ()
    for k in tl.static_range(NSUB):
        cols = k * SUB + cols0  # (SUB,)
        for h in tl.static_range(PAIR):
            offs = rows[h].to(tl.int64)[:, None] * n_cols + cols[None, :]  # (M, SUB)
            mask = _tile_mask(rows[h], n_rows, cols, n_cols, k >= NFULL)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)  # (M, SUB) in x's dtype
            if HAS_DROPOUT:
                # The bits of a pair's two rows come from one Philox call (the compiler merges the
                # two rows' identical calls; one call feeding both tiles would get another register
                # layout from Triton, hence conversions).
                keep = layernorm_keep(seed, rows[h], k * SUB, cols0, threshold_hi, h if PAIR == 2 else -1)
                # dropout(x) in x's dtype, as F.dropout returns it.
                x = (_to_f32(x) * tl.where(keep, dropout_scale, 0.0)).to(x_ptr.dtype.element_ty)
            if HAS_RESIDUAL:
                # residual + dropout(x), rounded once to s's dtype (x's), as PyTorch's add rounds it.
                x = _add_rounded(x, tl.load(res_ptr + offs, mask=mask, other=0.0))
                tl.store(s_ptr + offs, x, mask=mask)
            s = s + (_to_f32(x),)  # the statistics come from the value stored, which backward reads

    # Per row: the mean, exact on a constant row (see the docstring), then the variance around it.
    mean = ()
    rstd = ()
    for h in tl.static_range(PAIR):
        total = tl.sum(s[h], axis=1)  # (M,)
        for k in tl.static_range(1, NSUB):
            total += tl.sum(s[k * PAIR + h], axis=1)
        m = total * inv_cols
        if EXACT_SUM:
            m = tl.fma(tl.fma(-m, n_cols.to(tl.float32), total), inv_cols, m)  # total / C, rounded once
        sum_dd = tl.zeros_like(m)
        sum_d = tl.zeros_like(m)
        for k in tl.static_range(NSUB):
            d = s[k * PAIR + h] - m[:, None]
            if k >= NFULL:
                d = tl.where((k * SUB + cols0 < n_cols)[None, :], d, 0.0)
            sum_dd += tl.sum(d * d, axis=1)
            if not EXACT_SUM:
                sum_d += tl.sum(d, axis=1)
        var = sum_dd * inv_cols
        if not EXACT_SUM:
            m_d = sum_d * inv_cols
            m += m_d
            var = tl.maximum(var - m_d * m_d, 0.0)
        mean = mean + (m,)
        rstd = rstd + (tl.rsqrt(var + eps),)

    # y = xhat * w + b, with xhat = (s - mean) * rstd as backward computes it.
    for k in tl.static_range(NSUB):
        cols = k * SUB + cols0
        if HAS_WEIGHT:
            w = _load_param(w_ptr, rows[0], cols, n_cols, k >= NFULL)  # (M, SUB)
        if HAS_BIAS:
            b = _load_param(b_ptr, rows[0], cols, n_cols, k >= NFULL)
        for h in tl.static_range(PAIR):
            y = (s[k * PAIR + h] - mean[h][:, None]) * rstd[h][:, None]
            if HAS_WEIGHT:
                y = y * w
            if HAS_BIAS:
                y = y + b
            offs = rows[h].to(tl.int64)[:, None] * n_cols + cols[None, :]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty),
                     mask=_tile_mask(rows[h], n_rows, cols, n_cols, k >= NFULL))
    if SAVE_STATS:
        for h in tl.static_range(PAIR):
            tl.store(mean_ptr + rows[h], mean[h], mask=rows[h] < n_rows)
            tl.store(rstd_ptr + rows[h], rstd[h], mask=rows[h] < n_rows)


@triton.jit
def _ln_bwd_kernel(
    dy_ptr, ds_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, seed_ptr, dx_ptr, dres_ptr, partial_ptr,
    n_rows, n_cols, inv_cols, threshold_hi, dropout_scale,
    SUB: tl.constexpr, NSUB: tl.constexpr, NFULL: tl.constexpr, ROWS: tl.constexpr, PAIR: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_DS: tl.constexpr,
):
    # Program pid handles row blocks pid, pid + P, pid + 2P, ... (P = number of programs), so which
    # rows feed which partial sum, and in what order, depends only on the shape and P. dweight and
    # dbias accumulate per column in registers, (M, SUB) a tile (both rows of a pair summed in the
    # thread), and are reduced across warps once, after the loop: the loop has no barrier.
    # (Inside the loop, tile indices are written out as k * PAIR + h: a name assigned there would
    # become a tensor, and tuples take constant indices only.)
    tl.static_assert(ROWS * NSUB * SUB <= 16384, "a program's rows must fit in registers")
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    n_blocks = tl.cdiv(n_rows, ROWS)
    seed = tl.load(seed_ptr) if HAS_DROPOUT else 0
    cols0 = tl.max_contiguous(tl.arange(0, SUB), 4)  # (SUB,)
    acc_dw = ()
    acc_db = ()
    for k in tl.static_range(NSUB):
        acc_dw = acc_dw + (tl.zeros([ROWS // PAIR, SUB], dtype=tl.float32),)
        acc_db = acc_db + (tl.zeros([ROWS // PAIR, SUB], dtype=tl.float32),)

    for block in range(pid, n_blocks, n_progs):
        # Every load of the block first, so their latencies overlap; masked lanes read 0.
        rows = ()
        offs = ()
        s = ()
        dy = ()
        ds = ()
        mean = ()
        rstd = ()
        for h in tl.static_range(PAIR):
            rows = rows + (_block_rows(block, h, ROWS, PAIR),)
        for k in tl.static_range(NSUB):
            cols = k * SUB + cols0
            for h in tl.static_range(PAIR):
                o = rows[h].to(tl.int64)[:, None] * n_cols + cols[None, :]  # (M, SUB)
                mask = _tile_mask(rows[h], n_rows, cols, n_cols, k >= NFULL)
                offs = offs + (o,)
                s = s + (_to_f32(tl.load(s_ptr + o, mask=mask, other=0.0)),)
                dy = dy + (_to_f32(tl.load(dy_ptr + o, mask=mask, other=0.0)),)
                if HAS_DS:
                    ds = ds + (_to_f32(tl.load(ds_ptr + o, mask=mask, other=0.0)),)
        w = ()  # reloaded each block (from L1): 12 registers fewer to hold across the loop
        for k in tl.static_range(NSUB):
            if HAS_WEIGHT:
                w = w + (_load_param(w_ptr, rows[0], k * SUB + cols0, n_cols, k >= NFULL),)  # (M, SUB)
        for h in tl.static_range(PAIR):
            mean = mean + (tl.load(mean_ptr + rows[h], mask=rows[h] < n_rows, other=0.0),)  # (M,)
            rstd = rstd + (tl.load(rstd_ptr + rows[h], mask=rows[h] < n_rows, other=0.0),)

        # ds = rstd dxhat + ds_in - rstd (mean(dxhat) + xhat mean(dxhat xhat)), the first two terms
        # now, so ds_in is consumed as it arrives. Masked lanes have dy = 0 (and rstd = 0 on
        # masked rows): they add nothing to any sum.
        xhat = ()
        dsum = ()
        new_dw = ()
        new_db = ()
        for k in tl.static_range(NSUB):
            dw_k = acc_dw[k]
            db_k = acc_db[k]
            for h in tl.static_range(PAIR):
                xh = (s[k * PAIR + h] - mean[h][:, None]) * rstd[h][:, None]
                dxh = dy[k * PAIR + h] * w[k] if HAS_WEIGHT else dy[k * PAIR + h]
                part = dxh * rstd[h][:, None]
                if HAS_DS:
                    part += ds[k * PAIR + h]
                xhat = xhat + (xh,)
                dsum = dsum + (part,)
                if HAS_WEIGHT:
                    dw_k += dy[k * PAIR + h] * xh
                if HAS_BIAS:
                    db_k += dy[k * PAIR + h]
            new_dw = new_dw + (dw_k,)
            new_db = new_db + (db_k,)
        acc_dw = new_dw
        acc_db = new_db

        # The row sums of dxhat * xhat and dxhat over each row's tiles.
        mean_dxx = ()
        mean_dx = ()
        for h in tl.static_range(PAIR):
            sum_dxx = tl.zeros_like(mean[h])
            sum_dx = tl.zeros_like(mean[h])
            for k in tl.static_range(NSUB):
                dxh = dy[k * PAIR + h] * w[k] if HAS_WEIGHT else dy[k * PAIR + h]
                sum_dxx += tl.sum(dxh * xhat[k * PAIR + h], axis=1)
                sum_dx += tl.sum(dxh, axis=1)
            mean_dxx = mean_dxx + ((sum_dxx * inv_cols)[:, None],)  # (M, 1)
            mean_dx = mean_dx + ((sum_dx * inv_cols)[:, None],)

        for k in tl.static_range(NSUB):
            cols = k * SUB + cols0
            for h in tl.static_range(PAIR):
                d = dsum[k * PAIR + h] - (mean_dx[h] + xhat[k * PAIR + h] * mean_dxx[h]) * rstd[h][:, None]
                mask = _tile_mask(rows[h], n_rows, cols, n_cols, k >= NFULL)
                if HAS_DROPOUT:
                    tl.store(dres_ptr + offs[k * PAIR + h], d.to(dres_ptr.dtype.element_ty), mask=mask)
                    # The forward's bits, drawn again.
                    keep = layernorm_keep(seed, rows[h], k * SUB, cols0, threshold_hi, h if PAIR == 2 else -1)
                    d = d * tl.where(keep, dropout_scale, 0.0)
                tl.store(dx_ptr + offs[k * PAIR + h], d.to(dx_ptr.dtype.element_ty), mask=mask)

    # This program's partial sums: row pid of the (P, K, C) buffer, dweight then dbias (K = 2), or
    # whichever of them there is (K = 1); the sums across the program's warps happen here, once.
    for k in tl.static_range(NSUB):
        cols = k * SUB + cols0
        mask_c = cols < n_cols
        if HAS_WEIGHT:
            tl.store(partial_ptr + pid * (1 + HAS_BIAS) * n_cols + cols, tl.sum(acc_dw[k], axis=0), mask=mask_c)
        if HAS_BIAS:
            out = partial_ptr + (pid * (1 + HAS_WEIGHT) + HAS_WEIGHT) * n_cols
            tl.store(out + cols, tl.sum(acc_db[k], axis=0), mask=mask_c)


@triton.jit
def _ln_bwd_reduce_kernel(partial_ptr, dw_ptr, db_ptr, n_progs, n_cols,
                          HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    # Sums a strip of BLOCK_N columns of the (P, K, C) partials (K = 2 with weight and bias) over P,
    # BLOCK_P rows at a time, always in the same order; casts to the parameters' dtype on the store.
    pid = tl.program_id(0)
    n_total = (HAS_WEIGHT + HAS_BIAS) * n_cols
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    mask_n = offs_n < n_total
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start_p in range(0, n_progs, BLOCK_P):
        offs_p = start_p + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
        mask = (offs_p < n_progs)[:, None] & mask_n[None, :]  # (BLOCK_P, BLOCK_N)
        acc += tl.load(partial_ptr + offs_p[:, None] * n_total + offs_n[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)  # (BLOCK_N,)
    if HAS_WEIGHT:
        tl.store(dw_ptr + offs_n, total.to(dw_ptr.dtype.element_ty), mask=offs_n < n_cols)
    if HAS_BIAS:
        offs_b = offs_n - n_cols if HAS_WEIGHT else offs_n  # (BLOCK_N,)
        tl.store(db_ptr + offs_b, total.to(db_ptr.dtype.element_ty), mask=mask_n & (offs_b >= 0))


@triton.jit
def _dropout_mask_kernel(seed_ptr, keep_ptr, row0, n_rows, n_cols, threshold_hi,
                         BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    # The same helpers as the forward and backward kernels; the bits depend on (seed, row, col) only.
    # Row i of the output is row row0 + i of x (row0 > 0 only in the tests: rows past 2^32).
    offs_r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    start_c = tl.program_id(1) * BLOCK_C  # a multiple of 4 (BLOCK_C is, or there is one column block)
    cols = start_c + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    mask = (offs_r < n_rows)[:, None] & (cols < n_cols)[None, :]  # (ROWS, BLOCK_C)
    rows = row0 + offs_r.to(tl.int64)  # (ROWS,)
    keep = layernorm_keep(tl.load(seed_ptr), rows, start_c, tl.arange(0, BLOCK_C), threshold_hi, -1)  # (ROWS, BLOCK_C)
    tl.store(keep_ptr + offs_r.to(tl.int64)[:, None] * n_cols + cols[None, :], keep.to(tl.int8), mask=mask)


# The device types these kernels run on in this process ('cuda'; also 'cpu' under the interpreter).
DEVICE_TYPES = triton_device_types(_ln_fwd_kernel)


def _next_power_of_2(n: int) -> int:
    """triton.next_power_of_2, without its call cost (about a microsecond on Triton 3.9's host)."""
    return 1 << (n - 1).bit_length()


class _Config(NamedTuple):
    sub: int  # columns a tile holds: 128 (32 lanes x 4), fewer for narrow rows, more for wide ones
    rows: int  # rows a program holds
    num_warps: int

    def meta(self, n_cols: int) -> dict:
        """The kernels' shape constexprs for width n_cols, and num_warps."""
        return _meta(self, n_cols)


@functools.lru_cache(maxsize=None)
def _meta(cfg: _Config, n_cols: int) -> dict:
    # Cached on the configuration itself, so a test that stands another _config in gets its own.
    return dict(SUB=cfg.sub, NSUB=-(-n_cols // cfg.sub), NFULL=n_cols // cfg.sub, ROWS=cfg.rows,
                PAIR=2 if cfg.rows % 2 == 0 else 1, num_warps=cfg.num_warps)


@functools.lru_cache(maxsize=None)
def _config(n_cols: int) -> _Config:
    """Tiles, rows and warps for a width (C padded to a power of two, P below).

    P <= 512: tiles of min(P, 128) columns, 8192 elements a program (padding included) and 16 a
    thread, 32 at P = 512 (C = 384: 3 tiles of 128, 16 rows, 8 warps: a warp to a pair of rows, 24
    values a thread, no padding). Wider rows: one or two rows a program, tiles of 128 columns a
    warp with every warp along the row, 8 or 16 values a thread (32 at C = 16384).
    """
    width = _next_power_of_2(n_cols)
    if width <= 512:
        rows = min(64, 8192 // width)
        num_warps = max(1, min(16, rows * width // (32 * (32 if width == 512 else 16))))
        return _Config(min(width, 128), rows, num_warps)
    num_warps = 8 if width <= 1024 else 16
    return _Config(min(width, 128 * num_warps), 2 if width <= 4096 else 1, num_warps)


def _max_regs(num_warps: int) -> int:
    """Registers a thread may use in a block of num_warps (an SM has 65536; ptxas allows 255).

    Passed as maxnreg: without it, ptxas (CUDA 12.8) held some of these kernels to 48 or 64
    registers and spilled.
    """
    return min(255, 65536 // (32 * num_warps))


_SIGNIFICAND_BITS = {torch.float16: 11, torch.bfloat16: 8}


def _exact_sum(dtype: torch.dtype, n_cols: int) -> bool:
    """Whether the fp32 sum of C equal values of dtype is exact: 16-bit dtypes, C <= 2^(24 - p)."""
    significand = _SIGNIFICAND_BITS.get(dtype)
    return significand is not None and n_cols <= 2 ** (24 - significand)


# The launchers' constexprs and options (kernels._common.launch_meta: a tuple and a dict), built once
# per configuration and flags (a dict built on every call cost a microsecond or two of host time, and
# spreading it as keywords 0.6 us more); keyed on the configuration itself, as _meta is.
# Under torch.compile (Inductor) maxnreg does not reach the compile: as read in torch 2.13's source,
# a user kernel's configs carry num_warps and num_stages only, and keywords that are not kernel
# parameters are dropped (not yet seen on a GPU). Eager calls and captured graphs keep it.
@functools.lru_cache(maxsize=None)
def _fwd_meta(cfg: _Config, n_cols: int, dtype: torch.dtype, has_weight: bool, has_bias: bool,
              has_residual: bool, has_dropout: bool, save_stats: bool) -> tuple[tuple, dict]:
    return launch_meta(_ln_fwd_kernel, dict(
        HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_RESIDUAL=has_residual, HAS_DROPOUT=has_dropout,
        SAVE_STATS=save_stats, EXACT_SUM=_exact_sum(dtype, n_cols), maxnreg=_max_regs(cfg.num_warps),
        **cfg.meta(n_cols)))


@functools.lru_cache(maxsize=None)
def _bwd_meta(cfg: _Config, n_cols: int, element_size: int, has_weight: bool, has_bias: bool, has_dropout: bool,
              has_ds: bool) -> tuple[tuple, dict]:
    # 16-bit rows of 2 or 3 tiles of 128 in pairs (the model's C = 384) fit 128 registers a thread:
    # capped there, two 8-warp programs share an SM, so one's loads hide behind the other's math.
    fits_128 = cfg.rows % 2 == 0 and cfg.sub == 128 and 128 < n_cols <= 384 and element_size == 2
    return launch_meta(_ln_bwd_kernel, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_DROPOUT=has_dropout,
                                            HAS_DS=has_ds, maxnreg=128 if fits_128 else _max_regs(cfg.num_warps),
                                            **cfg.meta(n_cols)))


@functools.lru_cache(maxsize=None)
def _reduce_meta(has_weight: bool, has_bias: bool) -> tuple[tuple, dict]:
    return launch_meta(_ln_bwd_reduce_kernel, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, BLOCK_P=32,
                                                   BLOCK_N=_REDUCE_BLOCK_N, num_warps=4))


def _mask_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_C, ROWS) of dropout_keep_mask's kernel: column blocks of up to 256, 1024 elements (8 a
    thread: every element makes its own Philox call here)."""
    block_c = min(256, triton.next_power_of_2(n_cols))
    return block_c, max(1, 1024 // block_c)


def _blocks_per_sm(n_regs: int, shared: int, num_warps: int, regs_per_sm: int = 65536,
                   smem_per_sm: int = 233472, threads_per_sm: int = 2048) -> int:
    """How many blocks of a compiled kernel one SM holds at once (defaults: an sm_90 SM).

    Registers are allocated 256 a warp; each block also takes 1 KB of shared memory for the system.
    """
    regs_per_warp = -(-n_regs * 32 // 256) * 256
    by_regs = regs_per_sm // (regs_per_warp * num_warps)
    by_warps = threads_per_sm // (32 * num_warps)
    by_smem = smem_per_sm // (shared + 1024)
    return max(1, min(by_regs, by_warps, by_smem, _MAX_BLOCKS_PER_SM))


_RESIDENT: dict = {}  # (device, configuration) -> backward programs that fit on the device at once


def _bwd_programs(n_blocks: int, args: tuple, meta: tuple[tuple, dict], device: torch.device) -> int:
    """Backward grid size: as many programs as fit on the device at once, never more than row blocks.

    On a GPU, from the compiled kernel's registers and shared memory (_blocks_per_sm) times the
    SMs, computed once per device and configuration: one wave keeps every program busy to the end,
    and a fixed count keeps the order of the dweight/dbias sums fixed. Off the GPU (Triton's
    interpreter), a small fixed count.
    """
    s = args[2]  # what was normalized: on the device the launch runs on
    if not s.is_cuda:  # (device.type != "cuda" costs 0.2 us a call: a new string)
        return max(1, min(n_blocks, _INTERPRETER_PROGRAMS))
    # Keyed on the launch's flags and the dtypes of dy, ds, s and weight (which of the other
    # arguments are None, and their dtypes, follow from those): traced calls (fake tensors,
    # symbolic sizes) share the eager calls' entries, so compiled and eager code sum the partials in
    # one order. meta is _bwd_meta's cached (constexprs, options), one object per configuration for
    # the process, so its id stands for its contents (a key of its items cost about 3 us a call).
    key = (device, id(meta), *(None if a is None else a.dtype for a in args[:4]))
    n_progs = _RESIDENT.get(key)
    if n_progs is None:
        # Compiled for stand-ins of the tensors (their dtypes, 16-byte aligned as the allocator's
        # are): a traced call's tensors have no data, and it must find what an eager call finds.
        args = tuple(MockTensor(a.dtype) if isinstance(a, Tensor) else 2 if isinstance(a, torch.SymInt)
                     else a for a in args)
        consts, options = meta
        kernel = _ln_bwd_kernel.warmup(*args, *consts, grid=(1,), **options)
        kernel._init_handles()  # loads the binary: n_regs becomes known
        props = torch.cuda.get_device_properties(device)
        per_sm = _blocks_per_sm(kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps,
                                getattr(props, "regs_per_multiprocessor", 65536),
                                props.shared_memory_per_multiprocessor, props.max_threads_per_multi_processor)
        n_progs = _RESIDENT[key] = per_sm * props.multi_processor_count
    return max(1, min(n_blocks, n_progs))


# The launchers, for contiguous (..., C) tensors: a row is a run of C elements, whatever the leading
# shape, so no (rows, C) view is made. `wrap_triton` is torch.library.wrap_triton when a registered
# op traces them and the identity otherwise; `kernel.run(..., grid=, warmup=False)` is what
# `kernel[grid](...)` calls, minus a lambda (see kernels/attention.py, whose launchers do the same).
def _ln_forward(x, residual, weight, bias, eps, dropout_p, seed_t, save_stats, *, wrap_triton=_no_wrap):
    """(y, s, mean, rstd) for contiguous (..., C) inputs. s is None without a residual (s = x);
    mean and rstd (fp32, (rows,)) are None unless save_stats; seed_t is needed only with dropout."""
    n_cols = int(x.shape[-1])  # a plain int (constexprs) even when torch.compile traces symbolic shapes
    n_rows = x.numel() // n_cols if n_cols else 0
    has_residual = residual is not None
    y = torch.empty_like(x)  # (..., C)
    s = torch.empty_like(x) if has_residual else None  # (..., C)
    mean = x.new_empty(n_rows, dtype=torch.float32) if save_stats else None  # (rows,)
    rstd = x.new_empty(n_rows, dtype=torch.float32) if save_stats else None  # (rows,)
    if n_rows == 0:
        return y, s, mean, rstd
    cfg = _config(n_cols)
    threshold, _, scale = dropout_threshold(dropout_p)
    consts, options = _fwd_meta(cfg, n_cols, x.dtype, weight is not None, bias is not None, has_residual,
                                dropout_p > 0.0, save_stats)
    wrap_triton(_ln_fwd_kernel).run(
        x, residual, weight, bias, y, s, mean, rstd, seed_t,
        n_rows, n_cols, 1.0 / n_cols, eps, threshold << 16, scale, *consts,
        grid=(-(-n_rows // cfg.rows),), warmup=False, **options,
    )
    return y, s, mean, rstd


def _ln_backward(dy, ds, s, weight, bias, mean, rstd, dropout_p, seed_t, *, wrap_triton=_no_wrap):
    """(dx, dresidual, dweight, dbias) for contiguous (..., C) tensors of one shape.

    s is what was normalized (x for layer_norm); ds the gradient that reaches s directly, or None.
    dresidual is None when it equals dx (no dropout); dweight/dbias are None without a weight/bias
    and otherwise in the parameter's dtype.
    """
    n_cols = int(s.shape[-1])  # as in _ln_forward
    n_rows = s.numel() // n_cols if n_cols else 0
    has_dropout = dropout_p > 0.0
    dx = torch.empty_like(s)  # (..., C)
    dres = torch.empty_like(s) if has_dropout else None  # (..., C)
    new = torch.empty_like if n_rows > 0 else torch.zeros_like  # with no rows there is no launch: zero sums
    dweight = new(weight) if weight is not None else None  # (C,)
    dbias = new(bias) if bias is not None else None  # (C,)
    if n_rows == 0:
        return dx, dres, dweight, dbias
    cfg = _config(n_cols)
    n_sums = (weight is not None) + (bias is not None)
    meta = _bwd_meta(cfg, n_cols, s.element_size(), weight is not None, bias is not None, has_dropout, ds is not None)
    threshold, _, scale = dropout_threshold(dropout_p)
    args = [dy, ds, s, weight, mean, rstd, seed_t, dx, dres, mean if n_sums else None,
            n_rows, n_cols, 1.0 / n_cols, threshold << 16, scale]
    # The partials' stand-in while sizing the grid: mean, an fp32 tensor aligned as the buffer is.
    n_progs = _bwd_programs(-(-n_rows // cfg.rows), tuple(args), meta, s.device)
    if n_sums:
        args[9] = s.new_empty(n_progs, n_sums, n_cols, dtype=torch.float32)  # (P, K, C)
    consts, options = meta
    wrap_triton(_ln_bwd_kernel).run(*args, *consts, grid=(n_progs,), warmup=False, **options)
    if n_sums:
        consts, options = _reduce_meta(weight is not None, bias is not None)
        wrap_triton(_ln_bwd_reduce_kernel).run(args[9], dweight, dbias, n_progs, n_cols, *consts,
                                               grid=(-(-n_sums * n_cols // _REDUCE_BLOCK_N),), warmup=False, **options)
    return dx, dres, dweight, dbias


def _grads(dy, ds, s, weight, bias, mean, rstd, dropout_p, seed_t, has_residual, backward):
    """Autograd's (dx, dresidual, dweight, dbias) from the outputs' gradients dy and ds, either of
    which may be None (an output the loss does not use), through `backward` (the launcher, or the op)."""
    dy = torch.zeros_like(s) if dy is None else dy.contiguous()  # (..., C)
    ds = ds.contiguous() if ds is not None and ds.numel() else None  # (..., C)
    dx, dres, dweight, dbias = backward(dy, ds, s, weight, bias, mean, rstd, dropout_p, seed_t)
    dres = (dres if dropout_p > 0.0 else dx) if has_residual else None
    return dx, dres, dweight if weight is not None else None, dbias if bias is not None else None


class _LayerNorm(torch.autograd.Function):
    """Autograd for eager calls: layer_norm (residual None: returns y) and add_layer_norm ((y, s)),
    the launchers with no dispatcher between them and the caller."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, dropout_p, seed_t):
        y, s, mean, rstd = _ln_forward(x, residual, weight, bias, eps, dropout_p, seed_t, True)
        # What was normalized: s with a residual, else x itself. xhat is recomputed from it.
        ctx.save_for_backward(x if s is None else s, weight, bias, mean, rstd, seed_t)
        ctx.dropout_p, ctx.has_residual = dropout_p, s is not None
        ctx.set_materialize_grads(False)  # dy or ds is None when y or s is not used later
        return y if s is None else (y, s)

    @staticmethod
    def backward(ctx, dy, ds=None):
        no_double_backward("kernels.add_layer_norm" if ctx.has_residual else "kernels.layer_norm")
        s, weight, bias, mean, rstd, seed_t = ctx.saved_tensors
        dx, dres, dweight, dbias = _grads(dy, ds, s, weight, bias, mean, rstd, ctx.dropout_p, seed_t,
                                          ctx.has_residual, _ln_backward)
        return dx, dres, dweight, dbias, None, None, None


# The same launchers as torch.library ops, for tracers (torch.compile, FakeTensorMode): see
# kernels._common.define_op. An op returns tensors only, never None nor an input: an absent output
# is an empty tensor.
_OP_WRAP = op_wrap(_ln_fwd_kernel)


def _ln_forward_body(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                     eps: float, dropout_p: float, seed_t: Optional[Tensor], save_stats: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, s, mean, rstd = _ln_forward(x, residual, weight, bias, eps, dropout_p, seed_t, save_stats, wrap_triton=_OP_WRAP)
    return (y, x.new_empty((0,)) if s is None else s,
            x.new_empty((0,), dtype=torch.float32) if mean is None else mean,
            x.new_empty((0,), dtype=torch.float32) if rstd is None else rstd)


def _ln_forward_fake(x, residual, weight, bias, eps, dropout_p, seed_t, save_stats):
    n_stats = x.numel() // x.shape[-1] if save_stats and x.shape[-1] else 0
    stats = x.new_empty((n_stats,), dtype=torch.float32)  # (rows,) or (0,)
    s = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    return torch.empty_like(x), s, stats, torch.empty_like(stats)


def _ln_backward_body(dy: Tensor, ds: Optional[Tensor], s: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      mean: Tensor, rstd: Tensor, dropout_p: float, seed_t: Optional[Tensor]
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dres, dweight, dbias = _ln_backward(dy, ds, s, weight, bias, mean, rstd, dropout_p, seed_t,
                                            wrap_triton=_OP_WRAP)
    return (dx, s.new_empty((0,)) if dres is None else dres, s.new_empty((0,)) if dweight is None else dweight,
            s.new_empty((0,)) if dbias is None else dbias)


def _ln_backward_fake(dy, ds, s, weight, bias, mean, rstd, dropout_p, seed_t):
    dres = torch.empty_like(s) if dropout_p > 0.0 else s.new_empty((0,))
    dweight = torch.empty_like(weight) if weight is not None else s.new_empty((0,))
    dbias = torch.empty_like(bias) if bias is not None else s.new_empty((0,))
    return torch.empty_like(s), dres, dweight, dbias


_ln_forward_op = define_op("triton_gpt::layer_norm_fwd", _ln_forward_body, _ln_forward_fake, _ln_fwd_kernel)
_ln_backward_op = define_op("triton_gpt::layer_norm_bwd", _ln_backward_body, _ln_backward_fake, _ln_fwd_kernel)


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, seed_t, save_stats = inputs
    y, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, weight, bias, mean, rstd, seed_t)
    ctx.has_residual = residual is not None
    ctx.dropout_p = dropout_p
    ctx.set_materialize_grads(False)  # dy or ds is None when y or s is not used later


def _backward(ctx, dy, ds, _dmean, _drstd):
    s, weight, bias, mean, rstd, seed_t = ctx.saved_tensors
    grads = _grads(dy, ds, s, weight, bias, mean, rstd, ctx.dropout_p, seed_t, ctx.has_residual, _ln_backward_op)
    return (*grads, None, None, None, None)


_ln_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check(caller, x, residual, weight, bias, eps) -> None:
    """TypeError / ValueError naming the offending value, TritonDeviceError for a device Triton cannot
    run on. Nothing is allocated before this; messages are built only when a test fails."""
    check_float_tensor("x", x)
    shape, device = x.shape, x.device
    if not shape or not 1 <= shape[-1] <= MAX_COLS:
        raise ValueError(f"x must have a last dimension C in [1, {MAX_COLS}], got shape {tuple(shape)}")
    # is_cuda first: a CUDA tensor is always allowed, and device.type costs 0.2 us (a new string).
    if not x.is_cuda and device.type not in DEVICE_TYPES:
        raise device_error(caller, device)
    if residual is not None:
        check_float_tensor("residual", residual)
        if residual.shape != shape:
            raise ValueError(f"residual must have x's shape {tuple(shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
        _check_device("residual", residual, device)
    if weight is not None:
        _check_param("weight", weight, shape[-1], device)
    if bias is not None:
        _check_param("bias", bias, shape[-1], device)
    if type(eps) is not float or not eps > 0.0:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"eps must be a float, got {type(eps).__name__}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")


def _check_param(name, t, n_cols, device) -> None:
    check_float_tensor(name, t)
    if t.shape != (n_cols,):
        raise ValueError(f"{name} must have shape (C,) = ({n_cols},), got {tuple(t.shape)}")
    _check_device(name, t, device)


def _check_device(name, t, device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, x on {device}: all tensors must share a device")


def _needs_grad(x, residual, weight, bias) -> bool:
    """Whether autograd needs the backward: grad mode on and an input that requires grad."""
    return torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)
                                        or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    _check("kernels.layer_norm", x, None, weight, bias, eps)
    x = x.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    save_stats = _needs_grad(x, None, weight, bias)
    eps = float(eps)
    if traced():
        return _ln_forward_op(x, None, weight, bias, eps, 0.0, None, save_stats)[0]  # (..., C)
    if save_stats:
        return _LayerNorm.apply(x, None, weight, bias, eps, 0.0, None)  # (..., C)
    return _ln_forward(x, None, weight, bias, eps, 0.0, None, False)[0]  # (..., C)


layer_norm.__doc__ = _DOCS["layer_norm"]  # the public text, kernels/__init__.py


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, dropout_p=0.0, seed=None):
    _check("kernels.add_layer_norm", x, residual, weight, bias, eps)
    dropout_p = check_dropout_p(dropout_p)
    seed_t = seed_tensor(seed, x.device) if dropout_p > 0.0 else None  # (1,) int64
    x, residual = x.contiguous(), residual.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    save_stats = _needs_grad(x, residual, weight, bias)
    eps = float(eps)
    if traced():
        y, s, _, _ = _ln_forward_op(x, residual, weight, bias, eps, dropout_p, seed_t, save_stats)
        return y, s  # (..., C) each
    if save_stats:
        return _LayerNorm.apply(x, residual, weight, bias, eps, dropout_p, seed_t)  # (..., C) each
    y, s, _, _ = _ln_forward(x, residual, weight, bias, eps, dropout_p, seed_t, False)
    return y, s  # (..., C) each


add_layer_norm.__doc__ = _DOCS["add_layer_norm"]  # the public text, kernels/__init__.py


def dropout_keep_mask(seed, n_rows, n_cols, dropout_p, device):
    """The bool (n_rows, n_cols) mask of elements add_layer_norm keeps for this seed and p.

    Drawn by the kernels' own helper (see the module docstring for the layout): exactly what
    add_layer_norm's forward and backward apply to x viewed as (n_rows, n_cols).
    """
    dropout_p = check_dropout_p(dropout_p)
    for name, n in (("n_rows", n_rows), ("n_cols", n_cols)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return _keep_mask(seed, 0, n_rows, n_cols, dropout_p, torch.device(device))


def _keep_mask(seed, row0, n_rows, n_cols, dropout_p, device):
    """dropout_keep_mask for rows row0 .. row0 + n_rows - 1 (the tests reach rows past 2^32)."""
    seed_t = seed_tensor(seed, device)  # (1,) int64
    keep = torch.empty(n_rows, n_cols, dtype=torch.int8, device=device)  # (rows, C)
    if n_rows * n_cols > 0:
        block_c, rows = _mask_config(n_cols)
        _dropout_mask_kernel[(triton.cdiv(n_rows, rows), triton.cdiv(n_cols, block_c))](
            seed_t, keep, row0, n_rows, n_cols, dropout_threshold(dropout_p).threshold << 16,
            BLOCK_C=block_c, ROWS=rows, num_warps=4,
        )
    return keep != 0
