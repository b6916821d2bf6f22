"""Dropout bits for the Triton kernels: Philox4x32 with 7 rounds, 16-bit slices, an integer threshold.

Every dropout mask the kernels apply is a pure function of (seed, stream, element indices): it does
not depend on block shapes, grid, warps or launch order, so a backward pass can draw the forward's
bits again instead of storing them, and `dropout_keep_mask` in each op's module can return exactly
what its kernels apply.

The generator. Philox4x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
maps a 128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1) to four 32-bit words. The key is
the seed: an int64 (a kernel argument, or loaded from a 1-element int64 tensor), k0 its low 32 bits
and k1 its high 32 bits, so every bit of a 63-bit seed matters. We run 7 rounds where tl.rand runs
10, a deliberate choice: 7 is what the public flash-attention kernels use, the paper reports
Philox4x32 with 7 rounds passing TestU01's BigCrush and recommends 10 as a safety margin, and each
round costs about 4 instructions a call in our hot loops. The bits therefore differ from
tl.randint4x's; the tests check them against an independent implementation, not against tl.rand.
On the GPU each round's two 32 x 32 -> 64-bit products are inline PTX (`_mul_wide`: one
IMAD.WIDE.U32 each, where LLVM splits some products written in Triton); Triton's interpreter runs
the Triton form of the same products, so the bits are the same on both paths by construction.

Streams. Counter word c2 names the op, so no two ops share bits unless they are given the same seed
on purpose and even then their masks come from different counters:

    STREAM_ATTENTION = 1, STREAM_LAYERNORM = 2.

Slices and the threshold. Each 32-bit word holds two 16-bit slices, low (bits 0-15) and high (bits
16-31), so one Philox call yields 8 slices for 8 elements. An element is kept when its slice, an
integer u in [0, 65536), is >= threshold, threshold = round(p * 65536) (at most 65535). The
probability of keeping is then exactly 1 - threshold / 65536: the kernels drop with the effective
p_eff = threshold / 65536 (p quantized to 1/65536, at most 2^-17 from the p asked for) and scale the
kept values by 1 / (1 - p_eff), so the kept fraction and the rescaling agree. `dropout_threshold(p)`
returns (threshold, p_eff, scale) and is the one definition the launchers, the mask functions and the
tests use. In a kernel the compare runs on the slice moved to the top of the word, with the threshold
shifted likewise: high slice: word >= threshold << 16; low slice: word << 16 >= threshold << 16.

Bit layouts: which element takes which slice of which counter.

Attention, element (b, h, i, j) (batch, head, query, key), with Tq queries, Tk keys, H heads:

    counter  c0 = (j // 16) * 4 + (j // 2) % 4    the key with bits 0 and 3 taken out
             c1 = (i // 16) * 8 + i % 8           the query with bit 3 taken out
             c2 = STREAM_ATTENTION
             c3 = b * H + h
    slice    word 2 * ((i // 8) % 2) + (j // 8) % 2, high half when j is odd, low half when even

So one call serves the 8 elements (i + {0, 8}) x (j + {0, 1, 8, 9}) with i % 16 < 8 and j % 16 in
{0, 2, 4, 6}: exactly the 8 elements one thread holds in one 16 x 16 tile of a tensor-core
accumulator (mma.sync m16n8 and wgmma alike give a thread rows r and r + 8 and column pairs c, c + 1
and c + 8, c + 9). `attention_keep` builds the (BLOCK_M, BLOCK_N) mask from (BLOCK_M / 2, BLOCK_N / 4)
counters with tl.join / tl.reshape / tl.permute, and Triton (3.6 and later) gives the Philox words
the accumulator's own layout: the mask needs no layout conversion (no trip through shared memory).
No index is multiplied, so nothing can wrap: each counter word holds an index below 2^32.

Layer norm, element (r, c) of x viewed as (rows, C):

    counter  c0 = (r // 2) % 2^32, c1 = c // 4, c2 = STREAM_LAYERNORM, c3 = (r // 2) // 2^32
    slice    4 (r % 2) + c % 4: word 2 (r % 2) + (c % 4) // 2, high half when c is odd, low half when even

So one call serves a 2 x 4 block, rows 2m and 2m + 1 by columns 4q to 4q + 3: exactly what a thread
of the LayerNorm kernels holds (the same 4 consecutive columns of both rows of a pair), so each call
is made once per thread and tile, in the data's own register layout, and only for real columns (a
column past C never takes a call a real column needs). `layernorm_keep` builds the mask of any rows
and columns; the forward and backward kernels and `kernels.layernorm.dropout_keep_mask` all call it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import triton
import triton.language as tl
from triton.language.target_info import current_target

# tl.constexpr, so the @triton.jit helpers may read them; `.value` is the int.
STREAM_ATTENTION = tl.constexpr(1)
STREAM_LAYERNORM = tl.constexpr(2)
PHILOX_ROUNDS = tl.constexpr(7)
SLICE_BITS = 16  # p is quantized to 1 / 2**SLICE_BITS

# Philox4x32 constants (Salmon et al. 2011; the same as tl.randint4x's and cuRAND's).
_PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
_PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
_PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
_PHILOX_KEY_B = tl.constexpr(0xBB67AE85)


class DropoutThreshold(NamedTuple):
    """What the kernels do for a requested p: keep a 16-bit slice u when u >= threshold."""
    threshold: int  # in [0, 2**16): round(p * 2**16)
    p: float  # the effective p, threshold / 2**16: the fraction the kernels drop
    scale: float  # 1 / (1 - p): what kept values are multiplied by


@functools.lru_cache(maxsize=256)  # a launcher asks on every call, with one or two distinct p a run
def dropout_threshold(p: float) -> DropoutThreshold:
    """(threshold, effective p, scale) for a dropout probability 0 <= p < 1."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    threshold = min(round(p * 2**SLICE_BITS), 2**SLICE_BITS - 1)
    p_eff = threshold / 2**SLICE_BITS
    return DropoutThreshold(threshold, p_eff, 1.0 / (1.0 - p_eff))


@triton.constexpr_function
def inline_ptx():
    """Whether a kernel being compiled may use inline PTX: for an NVIDIA GPU, not in Triton's
    interpreter (which runs the pure-Triton form of each helper: the same values, bit for bit)."""
    target = current_target()
    return not triton.knobs.runtime.interpret and target is not None and target.backend == "cuda"


@triton.jit
def _mul_wide(a, M: tl.constexpr):
    """(low, high) 32-bit words of the 64-bit product a * M, a a uint32 tensor, M a Philox constant.

    On the GPU one PTX mul.wide.u32, which ptxas issues as one IMAD.WIDE.U32. Written in Triton (a
    64-bit product of zero-extended words), LLVM splits some products into separate high and low
    multiplies, some of them 64-bit, and narrows the constant where only low bits are used: the
    LayerNorm forward with dropout issued 723 instructions a warp for 16 rows that way, 690 this way
    (sm_90, Triton 3.6). The interpreter runs the Triton form, which gives the same words.
    """
    if inline_ptx():
        if M == _PHILOX_ROUND_A:
            lo, hi = tl.inline_asm_elementwise("{ .reg .b64 t; mul.wide.u32 t, $2, 0xD2511F53; mov.b64 {$0, $1}, t; }",
                                               "=r,=r,r", [a], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
        else:
            tl.static_assert(M == _PHILOX_ROUND_B, "_mul_wide multiplies by a Philox round constant")
            lo, hi = tl.inline_asm_elementwise("{ .reg .b64 t; mul.wide.u32 t, $2, 0xCD9E8D57; mov.b64 {$0, $1}, t; }",
                                               "=r,=r,r", [a], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
    else:
        prod = a.to(tl.uint64) * M
        lo = prod.to(tl.uint32)
        hi = (prod >> 32).to(tl.uint32)
    return lo, hi


@triton.jit
def philox(seed, c0, c1, c2, c3):
    """Philox4x32-7: four uint32 words for counters (c0, c1, c2, c3) under key seed (an int64).

    The counters are uint32 tensors of one shape. Each round takes two 32 x 32 -> 64-bit
    products (_mul_wide: one IMAD.WIDE.U32 each) and two three-way XORs (one LOP3 each), so a call
    costs at most 28 instructions and the key schedule, fewer where the calls of a thread share
    counter words (what they share, the compiler computes once).
    """
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(PHILOX_ROUNDS):
        lo_b, hi_b = _mul_wide(c2, _PHILOX_ROUND_B)
        lo_a, hi_a = _mul_wide(c0, _PHILOX_ROUND_A)
        # The key first: where a product is the same for all of a thread's calls (the first
        # round's c2 * B, c2 a stream constant), its XOR with the key is made once.
        c0 = hi_b ^ k0 ^ c1
        c2 = hi_a ^ k1 ^ c3
        c1 = lo_b
        c3 = lo_a
        k0 += _PHILOX_KEY_A
        k1 += _PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def attention_keep(seed, off_bh, start_m, start_n, threshold,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Bool keep mask (BLOCK_M, BLOCK_N) of queries start_m.. and keys start_n.. of head off_bh = b H + h.

    start_m and start_n are multiples of 16; threshold from dropout_threshold. See the module
    docstring for the layout; the words come out in the tensor-core accumulator's layout.
    """
    tl.static_assert(BLOCK_M % 16 == 0 and BLOCK_N % 16 == 0, "attention dropout works on 16 x 16 tiles")
    c1 = (start_m // 2 + tl.arange(0, BLOCK_M // 2)).to(tl.uint32)  # (M/2,): i // 16 * 8 + i % 8
    c0 = (start_n // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)  # (N/4,): j // 16 * 4 + j // 2 % 4
    zero = tl.zeros([BLOCK_M // 2, BLOCK_N // 4], tl.uint32)
    w0, w1, w2, w3 = philox(seed, c0[None, :] + zero, c1[:, None] + zero, zero + STREAM_ATTENTION,
                            zero + off_bh.to(tl.uint32))  # (M/2, N/4) each
    # Word 2 (i // 8 % 2) + j // 8 % 2; each slice moved to the top 16 bits (the low one shifted).
    x = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # (M/2, N/4, j // 8 % 2, i // 8 % 2)
    x = tl.join(x << 16, x)  # (M/2, N/4, j // 8 % 2, i // 8 % 2, j % 2)
    x = tl.reshape(x, [BLOCK_M // 16, 8, BLOCK_N // 16, 4, 2, 2, 2])  # (i//16, i%8, j//16, j//2%4, j//8%2, i//8%2, j%2)
    x = tl.permute(x, [0, 5, 1, 2, 4, 3, 6])  # (i//16, i//8%2, i%8, j//16, j//8%2, j//2%4, j%2)
    x = tl.reshape(x, [BLOCK_M, BLOCK_N])
    return x >= (threshold.to(tl.uint32) << 16)


@triton.jit
def layernorm_keep(seed, rows, start_c, offs_c, threshold_hi, HALF: tl.constexpr):
    """Bool keep mask (R, N) of rows (R,) and columns start_c + offs_c (N,) of x viewed as (rows, C).

    rows: int32 or int64 row indices; start_c: a multiple of 4; offs_c: the column offsets, from
    tl.arange, so the compiler knows every offset mod 4 (it then sees that a thread's 4 columns of a
    call share c1 = start_c // 4 + offs_c // 4, and makes the call once); threshold_hi: the
    threshold of dropout_threshold shifted left by 16; HALF: r % 2 when every row has the same parity
    (0 or 1: the kernels' row tiles), -1 otherwise. See the module docstring for the layout. Called
    once for each row of a pair, the two identical Philox calls are merged by the compiler.
    """
    pairs = (rows & -2) >> 1  # r // 2, written so that both rows of a pair visibly give the same value
    if rows.dtype == tl.int64:
        c0 = (pairs & 0xFFFFFFFF).to(tl.uint32)
        c3 = (pairs >> 32).to(tl.uint32)
    else:  # int32 rows: r // 2 < 2^30, c3 = 0
        c0 = pairs.to(tl.uint32)
        c3 = tl.zeros_like(c0)
    zero = tl.zeros([rows.shape[0], offs_c.shape[0]], tl.uint32)
    c1 = (start_c // 4 + (offs_c >> 2)).to(tl.uint32)  # (N,)
    w0, w1, w2, w3 = philox(seed, c0[:, None] + zero, c1[None, :] + zero, zero + STREAM_LAYERNORM,
                            c3[:, None] + zero)  # (R, N) each
    # Slice 4 (r % 2) + c % 4: word 2 (r % 2) + (c % 4) // 2, half c % 2 (start_c % 4 == 0).
    low_pair = (offs_c % 4 < 2)[None, :]  # words 0 and 2 hold columns 4q and 4q + 1
    if HALF == 0:
        word = tl.where(low_pair, w0, w1)
    elif HALF == 1:
        word = tl.where(low_pair, w2, w3)
    else:
        word = tl.where((rows % 2 == 1)[:, None], tl.where(low_pair, w2, w3), tl.where(low_pair, w0, w1))
    # The compare runs on the slice moved to the top 16 bits (the low one shifted), against the
    # threshold moved there too.
    return tl.where((offs_c % 2 == 1)[None, :], word, word << 16) >= threshold_hi.to(tl.uint32)
