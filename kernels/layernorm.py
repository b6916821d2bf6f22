"""Fused LayerNorm in Triton: y = layer_norm(x) and (y, s) = (layer_norm(s), s), s = residual + dropout(x).

The math (over one row of C values, all in fp32):

    mean = sum(s) / C          rstd = 1 / sqrt(sum((s - mean)^2) / C + eps)
    xhat = (s - mean) * rstd   y = xhat * w + b

Backward, with dy the upstream gradient and dxhat = dy * w (dy when there is no weight):

    dweight = sum over rows of dy * xhat        dbias = sum over rows of dy
    ds = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))  (+ the gradient that reaches s
                                                                    directly, from its later use)
    dresidual = ds             dx = ds * keep / (1 - p)   (dx = ds without dropout)

The two means come from differentiating through mean and rstd: d(mean)/ds = 1/C and
d(rstd)/ds = -rstd^3 (s - mean) / C, which collapse to the mean(dxhat) and xhat * mean(dxhat * xhat)
terms. Only mean and rstd (fp32, one each per row) are saved; xhat is recomputed from s.

dweight and dbias are reduced without atomics: the backward grid has a fixed number of programs,
each walks a fixed set of row blocks and keeps fp32 partial sums in registers, writes one row of
partials, and one torch .sum over those rows finishes the job. Same device, same bits, every run.

Dropout bits are not stored: backward draws them again with the forward's helper, `_dropout_keep`,
which `dropout_keep_mask` runs too. Philox (tl.randint4x, the generator behind tl.rand) returns four
32-bit words per counter. Element (row, col) of x viewed as (rows, C) takes word col % 4 of counter
row * ceil(C / 4) + col // 4, mapped to [0, 1) as tl.rand does, and is kept when that is >= p. One
Philox call thus serves four columns, and the bits depend on (seed, row, col) only, never on ROWS,
BLOCK_C or the grid. The counter is an int64 (Philox takes its low and high halves as two of its
32-bit counters), so it never wraps.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from torch import Tensor

from kernels._common import check_dropout_p, check_float_tensor, seed_tensor

MAX_COLS = 16384  # a row lives in registers (<= 32 fp32 values a thread per tensor at 16 warps)
_PROGRAMS_PER_SM = 4  # backward programs per SM; a fixed count keeps the dweight/dbias order fixed
_INTERPRETER_SMS = 2  # the "SM count" used off the GPU (Triton's interpreter)


@triton.jit
def _dropout_keep(seed, rows, offs_g, n_groups, dropout_p):
    """Bool keep mask (len(rows), 4 * len(offs_g)) for int64 row indices rows and column groups offs_g.

    n_groups = ceil(C / 4); column 4 g + w is kept when word w of counter row * n_groups + g is >= p.
    Columns past C draw counters that belong to the next row; callers mask them out.
    """
    counter = rows[:, None] * n_groups + offs_g[None, :]  # (ROWS, BLOCK_C / 4) int64
    r0, r1, r2, r3 = tl.rand4x(seed, counter)
    # [r0, r2] and [r1, r3] interleaved, then interleaved again: column 4 g + w holds word w of group g.
    u = tl.interleave(tl.interleave(r0, r2), tl.interleave(r1, r3))  # (ROWS, BLOCK_C)
    return u >= dropout_p


@triton.jit
def _ln_fwd_kernel(
    x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, s_ptr, mean_ptr, rstd_ptr, seed_ptr,
    n_rows, n_cols, eps, dropout_p, dropout_scale,
    BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, SAVE_STATS: tl.constexpr,
):
    # One program normalizes ROWS rows held as a [ROWS, BLOCK_C] block.
    tl.static_assert(ROWS * BLOCK_C <= 16384, "a program's block must fit in registers")
    tl.static_assert(BLOCK_C % 4 == 0, "a block holds whole groups of four columns (dropout bits)")
    pid = tl.program_id(0)
    offs_r = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    offs_c = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    mask_r = offs_r < n_rows
    mask_c = offs_c < n_cols
    mask = mask_r[:, None] & mask_c[None, :]  # (ROWS, BLOCK_C)
    # Element index row * C + col in int64: addresses past 2^31 stay exact.
    offs = offs_r.to(tl.int64)[:, None] * n_cols + offs_c[None, :]  # (ROWS, BLOCK_C)

    # s = residual + dropout(x) in fp32 (just x for a plain layer norm); masked lanes hold 0.
    s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        offs_g = tl.arange(0, BLOCK_C // 4)  # (BLOCK_C / 4,)
        keep = _dropout_keep(tl.load(seed_ptr), offs_r.to(tl.int64), offs_g, (n_cols + 3) // 4, dropout_p)
        s = tl.where(keep, s * dropout_scale, 0.0)
    if HAS_RESIDUAL:
        s += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(s_ptr + offs, s.to(s_ptr.dtype.element_ty), mask=mask)

    mean = tl.sum(s, axis=1) / n_cols  # (ROWS,)
    xc = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / n_cols
    rstd = tl.rsqrt(var + eps)  # (ROWS,)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if SAVE_STATS:
        tl.store(mean_ptr + offs_r, mean, mask=mask_r)
        tl.store(rstd_ptr + offs_r, rstd, mask=mask_r)


@triton.jit
def _ln_bwd_kernel(
    dy_ptr, ds_ptr, s_ptr, w_ptr, mean_ptr, rstd_ptr, seed_ptr,
    dx_ptr, dres_ptr, dw_partial_ptr, db_partial_ptr,
    n_rows, n_cols, dropout_p, dropout_scale,
    BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_DS: tl.constexpr,
):
    # Program pid handles row blocks pid, pid + P, pid + 2P, ... (P = number of programs), so which
    # rows feed which partial sum, and in what order, depends only on the shape and P.
    tl.static_assert(ROWS * BLOCK_C <= 16384, "a program's block must fit in registers")
    tl.static_assert(BLOCK_C % 4 == 0, "a block holds whole groups of four columns (dropout bits)")
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    n_blocks = tl.cdiv(n_rows, ROWS)
    offs_c = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    mask_c = offs_c < n_cols
    if HAS_WEIGHT:
        w = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)  # (BLOCK_C,)
        acc_dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        acc_db = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        offs_g = tl.arange(0, BLOCK_C // 4)  # (BLOCK_C / 4,)
        n_groups = (n_cols + 3) // 4

    for block in range(pid, n_blocks, n_progs):
        offs_r = block * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        mask_r = offs_r < n_rows
        mask = mask_r[:, None] & mask_c[None, :]  # (ROWS, BLOCK_C)
        offs = offs_r.to(tl.int64)[:, None] * n_cols + offs_c[None, :]  # (ROWS, BLOCK_C)

        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + offs_r, mask=mask_r, other=0.0)
        rstd = tl.load(rstd_ptr + offs_r, mask=mask_r, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            dxhat = dy * w[None, :]
            acc_dw += tl.sum(dy * xhat, axis=0)
        else:
            dxhat = dy
        if HAS_BIAS:
            acc_db += tl.sum(dy, axis=0)
        mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / n_cols  # (ROWS,)
        mean_dxhat = tl.sum(dxhat, axis=1) / n_cols  # (ROWS,)
        ds = (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None]) * rstd[:, None]
        if HAS_DS:
            ds += tl.load(ds_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, offs_r.to(tl.int64), offs_g, n_groups, dropout_p)
            tl.store(dres_ptr + offs, ds.to(dres_ptr.dtype.element_ty), mask=mask)
            tl.store(dx_ptr + offs, tl.where(keep, ds * dropout_scale, 0.0).to(dx_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(dx_ptr + offs, ds.to(dx_ptr.dtype.element_ty), mask=mask)

    if HAS_WEIGHT:
        tl.store(dw_partial_ptr + pid * n_cols + offs_c, acc_dw, mask=mask_c)
    if HAS_BIAS:
        tl.store(db_partial_ptr + pid * n_cols + offs_c, acc_db, mask=mask_c)


@triton.jit
def _dropout_mask_kernel(seed_ptr, keep_ptr, n_rows, n_cols, dropout_p,
                         BLOCK_C: tl.constexpr, ROWS: tl.constexpr):
    # The same helper as the forward and backward kernels; the bits depend on (seed, row, col) only.
    tl.static_assert(BLOCK_C % 4 == 0, "a block holds whole groups of four columns")
    pid = tl.program_id(0)
    offs_r = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    offs_c = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    mask = (offs_r < n_rows)[:, None] & (offs_c < n_cols)[None, :]  # (ROWS, BLOCK_C)
    offs = offs_r.to(tl.int64)[:, None] * n_cols + offs_c[None, :]  # (ROWS, BLOCK_C)
    offs_g = tl.arange(0, BLOCK_C // 4)  # (BLOCK_C / 4,)
    keep = _dropout_keep(tl.load(seed_ptr), offs_r.to(tl.int64), offs_g, (n_cols + 3) // 4, dropout_p)
    tl.store(keep_ptr + offs, keep.to(tl.int8), mask=mask)


def _config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_C, ROWS, num_warps) for a width: about 4096 elements a program, 16 a thread at most.

    BLOCK_C is at least 4: the dropout bits come in groups of four columns.
    """
    block_c = max(4, triton.next_power_of_2(n_cols))
    rows = max(1, min(64, 4096 // block_c))
    num_warps = max(1, min(16, rows * block_c // 512))
    return block_c, rows, num_warps


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def _bwd_programs(n_rows: int, n_cols: int, device: torch.device) -> int:
    """Backward grid size: a few programs per SM, never more than there are row blocks."""
    _, rows, _ = _config(n_cols)
    return max(1, min(triton.cdiv(n_rows, rows), _PROGRAMS_PER_SM * _sm_count(device)))


def _ln_forward(x2d, residual2d, weight, bias, eps, dropout_p, seed_t, save_stats):
    """(y, s, mean, rstd) for contiguous (rows, C) inputs. s is None without a residual (s = x);
    mean and rstd (fp32, (rows,)) are None unless save_stats; seed_t is needed only with dropout."""
    n_rows, n_cols = x2d.shape
    has_residual = residual2d is not None
    has_dropout = dropout_p > 0.0
    y = torch.empty_like(x2d)  # (rows, C)
    s = torch.empty_like(x2d) if has_residual else None  # (rows, C)
    mean = torch.empty(n_rows, dtype=torch.float32, device=x2d.device) if save_stats else None  # (rows,)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device) if save_stats else None  # (rows,)
    if n_rows == 0:
        return y, s, mean, rstd
    block_c, rows, num_warps = _config(n_cols)
    _ln_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        x2d, residual2d, weight, bias, y, s, mean, rstd, seed_t,
        n_rows, n_cols, eps, dropout_p, 1.0 / (1.0 - dropout_p),
        BLOCK_C=block_c, ROWS=rows,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=has_residual,
        HAS_DROPOUT=has_dropout, SAVE_STATS=save_stats, num_warps=num_warps,
    )
    return y, s, mean, rstd


def _ln_backward(dy2d, ds2d, s2d, weight, bias, mean, rstd, dropout_p, seed_t):
    """(dx, dresidual, dweight, dbias) for contiguous (rows, C) tensors.

    s2d is what was normalized (x for layer_norm); ds2d the gradient that reaches s directly, or
    None. dresidual is None when it equals dx (no dropout); dweight/dbias are None without a
    weight/bias and otherwise in the parameter's dtype. bias is read only for its dtype.
    """
    n_rows, n_cols = s2d.shape
    has_dropout = dropout_p > 0.0
    dx = torch.empty_like(s2d)  # (rows, C)
    dres = torch.empty_like(s2d) if has_dropout else None  # (rows, C)
    n_progs = _bwd_programs(n_rows, n_cols, s2d.device)
    # Every program writes its row of partials; with no rows there is no launch, hence zeros.
    new = torch.empty if n_rows > 0 else torch.zeros
    dw_partial = new(n_progs, n_cols, dtype=torch.float32, device=s2d.device) if weight is not None else None  # (P, C)
    db_partial = new(n_progs, n_cols, dtype=torch.float32, device=s2d.device) if bias is not None else None  # (P, C)
    if n_rows > 0:
        block_c, rows, num_warps = _config(n_cols)
        _ln_bwd_kernel[(n_progs,)](
            dy2d, ds2d, s2d, weight, mean, rstd, seed_t,
            dx, dres, dw_partial, db_partial,
            n_rows, n_cols, dropout_p, 1.0 / (1.0 - dropout_p),
            BLOCK_C=block_c, ROWS=rows,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout,
            HAS_DS=ds2d is not None, num_warps=num_warps,
        )
    dweight = dw_partial.sum(0).to(weight.dtype) if weight is not None else None  # (C,)
    dbias = db_partial.sum(0).to(bias.dtype) if bias is not None else None  # (C,)
    return dx, dres, dweight, dbias


# The launchers registered as torch.library custom ops, so torch.compile treats each as one opaque
# node (no graph break) and autograd runs _ln_backward. Custom ops return tensors only, never None
# nor an input: an absent output is an empty tensor.
@torch.library.custom_op("triton_gpt::layer_norm_fwd", mutates_args=())
def _ln_forward_op(x2d: Tensor, residual2d: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                   eps: float, dropout_p: float, seed_t: Optional[Tensor], save_stats: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, s, mean, rstd = _ln_forward(x2d, residual2d, weight, bias, eps, dropout_p, seed_t, save_stats)
    return (y, x2d.new_empty(0) if s is None else s,
            x2d.new_empty(0, dtype=torch.float32) if mean is None else mean,
            x2d.new_empty(0, dtype=torch.float32) if rstd is None else rstd)


@_ln_forward_op.register_fake
def _(x2d, residual2d, weight, bias, eps, dropout_p, seed_t, save_stats):
    n_stats = x2d.shape[0] if save_stats else 0
    stats = x2d.new_empty(n_stats, dtype=torch.float32)  # (rows,) or (0,)
    s = torch.empty_like(x2d) if residual2d is not None else x2d.new_empty(0)
    return torch.empty_like(x2d), s, stats, torch.empty_like(stats)


@torch.library.custom_op("triton_gpt::layer_norm_bwd", mutates_args=())
def _ln_backward_op(dy2d: Tensor, ds2d: Optional[Tensor], s2d: Tensor, weight: Optional[Tensor],
                    bias: Optional[Tensor], mean: Tensor, rstd: Tensor, dropout_p: float, seed_t: Optional[Tensor]
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, dres, dweight, dbias = _ln_backward(dy2d, ds2d, s2d, weight, bias, mean, rstd, dropout_p, seed_t)
    return (dx, s2d.new_empty(0) if dres is None else dres, s2d.new_empty(0) if dweight is None else dweight,
            s2d.new_empty(0) if dbias is None else dbias)


@_ln_backward_op.register_fake
def _(dy2d, ds2d, s2d, weight, bias, mean, rstd, dropout_p, seed_t):
    dres = torch.empty_like(s2d) if dropout_p > 0.0 else s2d.new_empty(0)
    dweight = torch.empty_like(weight) if weight is not None else s2d.new_empty(0)
    dbias = torch.empty_like(bias) if bias is not None else s2d.new_empty(0)
    return torch.empty_like(s2d), dres, dweight, dbias


def _setup_context(ctx, inputs, output):
    x2d, residual2d, weight, bias, eps, dropout_p, seed_t, save_stats = inputs
    y, s, mean, rstd = output
    # What was normalized: s with a residual, else x itself. xhat is recomputed from it.
    ctx.save_for_backward(s if residual2d is not None else x2d, weight, bias, mean, rstd, seed_t)
    ctx.has_residual = residual2d is not None
    ctx.dropout_p = dropout_p
    ctx.set_materialize_grads(False)  # dy or ds is None when y or s is not used later


def _backward(ctx, dy, ds, _dmean, _drstd):
    s2d, weight, bias, mean, rstd, seed_t = ctx.saved_tensors
    dy = torch.zeros_like(s2d) if dy is None else dy.contiguous()  # (rows, C)
    ds = ds.contiguous() if ds is not None and ds.numel() else None  # (rows, C)
    dx, dres, dweight, dbias = _ln_backward_op(dy, ds, s2d, weight, bias, mean, rstd, ctx.dropout_p, seed_t)
    dres = (dres if ctx.dropout_p > 0.0 else dx) if ctx.has_residual else None
    return (dx, dres, dweight if weight is not None else None, dbias if bias is not None else None,
            None, None, None, None)


_ln_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, residual, weight, bias, eps) -> int:
    """Validate the inputs (before anything is allocated); returns C."""
    check_float_tensor("x", x)
    if x.dim() == 0 or not 1 <= x.shape[-1] <= MAX_COLS:
        raise ValueError(f"x must have a last dimension C in [1, {MAX_COLS}], got shape {tuple(x.shape)}")
    n_cols = x.shape[-1]
    if residual is not None:
        check_float_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_float_tensor(name, t)
            if tuple(t.shape) != (n_cols,):
                raise ValueError(f"{name} must have shape (C,) = ({n_cols},), got {tuple(t.shape)}")
    for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}: all tensors must share a device")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return n_cols


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """layer_norm over the last dimension of x (..., C); y in x's dtype, weight and bias optional.

    Differentiable in x, weight and bias; dweight/dbias come back in the parameters' dtype.
    """
    n_cols = _check(x, None, weight, bias, eps)
    eps = float(eps)
    x = x.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    save_stats = _needs_grad(x, weight, bias)
    y, _, _, _ = _ln_forward_op(x.view(-1, n_cols), None, weight, bias, eps, 0.0, None, save_stats)  # (rows, C)
    return y.view(x.shape)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, dropout_p=0.0, seed=None):
    """(y, s) with s = residual + dropout(x) and y = layer_norm(s, weight, bias, eps).

    Dropout keeps an element with probability 1 - dropout_p and scales it by 1 / (1 - dropout_p);
    its bits depend only on seed (an int, a 1-element integer tensor, or None to draw one from
    torch's generator) and the element's (row, col) in x viewed as (rows, C): see dropout_keep_mask.
    """
    n_cols = _check(x, residual, weight, bias, eps)
    eps = float(eps)
    dropout_p = check_dropout_p(dropout_p)
    seed_t = seed_tensor(seed, x.device) if dropout_p > 0.0 else None  # (1,) int64
    x, residual = x.contiguous(), residual.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    save_stats = _needs_grad(x, residual, weight, bias)
    x2d, res2d = x.view(-1, n_cols), residual.view(-1, n_cols)  # (rows, C) each
    y, s, _, _ = _ln_forward_op(x2d, res2d, weight, bias, eps, dropout_p, seed_t, save_stats)  # (rows, C) x2
    return y.view(x.shape), s.view(x.shape)


def dropout_keep_mask(seed, n_rows, n_cols, dropout_p, device):
    """The bool (n_rows, n_cols) mask of elements add_layer_norm keeps for this seed and p.

    Drawn by the kernels' own helper: (row, col) is kept when word col % 4 of Philox counter
    row * ceil(n_cols / 4) + col // 4 (key seed), mapped to [0, 1) as tl.rand does, is >= p.
    """
    dropout_p = check_dropout_p(dropout_p)
    device = torch.device(device)
    seed_t = seed_tensor(seed, device)  # (1,) int64
    keep = torch.empty(n_rows, n_cols, dtype=torch.int8, device=device)  # (rows, C)
    if n_rows * n_cols > 0:
        block_c, rows, num_warps = _config(n_cols)
        _dropout_mask_kernel[(triton.cdiv(n_rows, rows),)](
            seed_t, keep, n_rows, n_cols, dropout_p, BLOCK_C=block_c, ROWS=rows, num_warps=num_warps,
        )
    return keep != 0
