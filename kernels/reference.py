"""Plain PyTorch reference ops: the seed's math, written out op for op.

Each function here has the signature of its Triton twin in this package, so a test, a benchmark
and the model's reference backend all agree on what "correct" means. They run on any device and
in any dtype (float64 is what the tests compare against).

Dropout: the Triton kernels draw their bits from a counter-based generator; these functions draw
theirs from torch's generator (seeded by `seed` when one is given). To compare the two exactly, a
test passes the kernel's own mask (`kernels.attention.dropout_keep_mask`,
`kernels.layernorm.dropout_keep_mask`) as `keep_mask`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _dropout(x: torch.Tensor, p: float, seed: int | None, keep_mask: torch.Tensor | None):
    """nn.Dropout's semantics: zero with probability p, scale the kept values by 1 / (1 - p)."""
    if keep_mask is not None:
        return x * keep_mask.to(x.dtype) / (1.0 - p) if p > 0.0 else x
    if p == 0.0:
        return x
    if seed is None:
        return F.dropout(x, p, training=True)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
    return x * keep.to(x.dtype) / (1.0 - p)


def attention(q, k, v, dropout_p=0.0, causal=True, softmax_scale=None, seed=None, *, keep_mask=None):
    """softmax(q k^T * scale, causal) with dropout on the weights, times v.

    q, k, v: (B, T, H, D). Returns (B, T, H, D). keep_mask, when given, is the bool (B, H, Tq, Tk)
    mask of kept attention weights.
    """
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    wei = (qh @ kh.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        # Query i sees keys 0..i (queries and keys aligned at the start, as in the seed).
        tril = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()  # (Tq, Tk)
        wei = wei.masked_fill(~tril, float("-inf"))
    wei = torch.softmax(wei, dim=-1)
    wei = _dropout(wei, dropout_p, seed, keep_mask)
    out = wei @ vh  # (B, H, Tq, D)
    return out.transpose(1, 2).contiguous()  # (B, Tq, H, D)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dimension (biased variance)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, dropout_p=0.0, seed=None, *,
                   keep_mask=None):
    """s = residual + dropout(x); y = layer_norm(s). Returns (y, s).

    keep_mask, when given, is the bool mask of kept elements of x viewed as (rows, C).
    """
    if keep_mask is not None:
        keep_mask = keep_mask.view(x.shape)
    s = residual + _dropout(x, dropout_p, seed, keep_mask)
    return layer_norm(s, weight, bias, eps), s
