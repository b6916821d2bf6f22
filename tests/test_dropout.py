"""kernels.dropout: Philox4x32-7, the 16-bit threshold and the documented bit layouts.

The Triton helpers are checked bit for bit against an independent NumPy Philox written here, which
is itself checked against the Random123 known-answer vectors; the layouts against the formulas of
the module docstring; the kept fraction against 1 - p_eff.
"""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from kernels._common import seed_tensor
from kernels.dropout import (STREAM_ATTENTION, STREAM_LAYERNORM, attention_keep, dropout_threshold, layernorm_keep,
                             philox)

M32 = 0xFFFFFFFF

# Random123's kat_vectors (D. E. Shaw Research): counter words, key words, the four output words.
PHILOX4X32_KAT = {
    7: [((0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
        ((M32,) * 4, (M32, M32), (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A))],
    10: [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8))],
}


def philox_np(k0, k1, c0, c1, c2, c3, rounds=7):
    """Philox4x32-`rounds` in NumPy uint64 arithmetic: (key words, counter arrays) -> 4 uint32 arrays."""
    c = [np.asarray(x, dtype=np.uint64) & M32 for x in (c0, c1, c2, c3)]
    k0, k1 = np.uint64(k0 & M32), np.uint64(k1 & M32)
    for _ in range(rounds):
        prod_b = c[2] * np.uint64(0xCD9E8D57)  # both factors < 2^32: exact in uint64
        prod_a = c[0] * np.uint64(0xD2511F53)
        c = [(prod_b >> np.uint64(32)) ^ c[1] ^ k0, prod_b & np.uint64(M32),
             (prod_a >> np.uint64(32)) ^ c[3] ^ k1, prod_a & np.uint64(M32)]
        k0 = (k0 + np.uint64(0x9E3779B9)) & np.uint64(M32)
        k1 = (k1 + np.uint64(0xBB67AE85)) & np.uint64(M32)
    return [x.astype(np.uint32) for x in c]


def _seed_words(seed):
    return seed & M32, (seed >> 32) & M32


@pytest.mark.parametrize("rounds", [7, 10])
def test_numpy_philox_matches_random123_known_answers(rounds):
    for ctr, key, want in PHILOX4X32_KAT[rounds]:
        got = philox_np(*key, *ctr, rounds=rounds)
        assert [int(w) for w in got] == list(want), f"philox4x32-{rounds} {ctr} {key}"


@triton.jit
def _philox_kernel(seed_ptr, c_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out[w, e] = word w of philox(seed, c[0, e], c[1, e], c[2, e], c[3, e]); int64 in and out."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c0 = tl.load(c_ptr + offs, mask=mask, other=0).to(tl.uint32)
    c1 = tl.load(c_ptr + n + offs, mask=mask, other=0).to(tl.uint32)
    c2 = tl.load(c_ptr + 2 * n + offs, mask=mask, other=0).to(tl.uint32)
    c3 = tl.load(c_ptr + 3 * n + offs, mask=mask, other=0).to(tl.uint32)
    w0, w1, w2, w3 = philox(tl.load(seed_ptr), c0, c1, c2, c3)
    tl.store(out_ptr + offs, w0.to(tl.int64), mask=mask)
    tl.store(out_ptr + n + offs, w1.to(tl.int64), mask=mask)
    tl.store(out_ptr + 2 * n + offs, w2.to(tl.int64), mask=mask)
    tl.store(out_ptr + 3 * n + offs, w3.to(tl.int64), mask=mask)


def _philox_triton(seed, counters, device):
    """philox over the columns of counters (4, n), int64 values < 2^32; seed any int64 bit pattern."""
    counters = torch.as_tensor(np.asarray(counters, dtype=np.int64), device=device)
    n = counters.shape[1]
    out = torch.empty((4, n), dtype=torch.int64, device=device)
    seed_t = torch.tensor([seed - 2**64 if seed >= 2**63 else seed], dtype=torch.int64, device=device)
    _philox_kernel[(triton.cdiv(n, 128),)](seed_t, counters, out, n, BLOCK=128)
    return out.cpu().numpy()


def test_philox_kernel_matches_random123_known_answers(device):
    for ctr, (k0, k1), want in PHILOX4X32_KAT[7]:
        got = _philox_triton(k0 | (k1 << 32), np.array(ctr).reshape(4, 1), device)
        assert got[:, 0].tolist() == list(want), f"philox4x32-7 {ctr} key {(k0, k1)}"


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32 + 7, 2**62 + 12345, 2**63 - 1],
                         ids=["0", "1", "2^32-1", "2^32+7", "2^62+12345", "2^63-1"])
def test_philox_kernel_matches_numpy(seed, device):
    rng = np.random.default_rng(seed % 1000)
    counters = rng.integers(0, 2**32, size=(4, 300), dtype=np.int64)
    got = _philox_triton(seed, counters, device)
    want = np.stack(philox_np(*_seed_words(seed), *counters))
    np.testing.assert_array_equal(got, want.astype(np.int64))


def test_seed_high_words_matter(device):
    """Seeds that differ only in bit 32 or in bit 62 give other words."""
    counters = np.arange(4 * 64, dtype=np.int64).reshape(4, 64)
    base = _philox_triton(5, counters, device)
    for other in (5 + 2**32, 5 + 2**62):
        assert (base != _philox_triton(other, counters, device)).mean() > 0.99


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.1, 0.2, 0.5, 1 / 3, 0.9, 1 - 1e-9])
def test_threshold_effective_p_and_scale_agree(p):
    threshold, p_eff, scale = dropout_threshold(p)
    assert isinstance(threshold, int) and 0 <= threshold < 2**16
    assert p_eff == threshold / 2**16, "the kept fraction is (2^16 - threshold) / 2^16 exactly"
    assert abs(p_eff - p) <= 2**-17 or threshold == 2**16 - 1, f"p {p} quantized to {p_eff}"
    assert scale == 1.0 / (1.0 - p_eff)
    if p == 0.0:
        assert (threshold, p_eff, scale) == (0, 0.0, 1.0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_threshold_rejects_p_outside_0_1(p):
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        dropout_threshold(p)


def _slices_np(words):
    """(4, ...) uint32 words -> (8, ...) 16-bit slices, slice 2 w + h = half h (0 low, 1 high) of word w."""
    words = np.asarray(words, dtype=np.uint64)
    return np.stack([(words[w] >> np.uint64(16 * h)) & np.uint64(0xFFFF) for w in range(4) for h in range(2)])


def attention_keep_np(seed, bh, i, j, threshold):
    """The attention layout of the module docstring, for broadcastable index arrays i, j."""
    i, j = np.broadcast_arrays(np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64))
    c0 = (j // 16) * 4 + (j // 2) % 4
    c1 = (i // 16) * 8 + i % 8
    words = philox_np(*_seed_words(seed), c0, c1, np.full_like(c0, STREAM_ATTENTION.value), np.full_like(c0, bh))
    word = 2 * ((i // 8) % 2) + (j // 8) % 2
    slices = _slices_np(words)  # (8, ...)
    u = np.take_along_axis(slices, (2 * word + j % 2)[None], axis=0)[0]
    return u >= threshold


def layernorm_keep_np(seed, r, c, threshold):
    """The layer-norm layout of the module docstring, for broadcastable index arrays r, c: (r, c) takes
    slice 4 (r % 2) + c % 4 of the call on counter ((r // 2) % 2^32, c // 4, STREAM_LAYERNORM, (r // 2) // 2^32)."""
    r, c = np.broadcast_arrays(np.asarray(r, dtype=np.int64), np.asarray(c, dtype=np.int64))
    pairs = r // 2
    words = philox_np(*_seed_words(seed), pairs & M32, c // 4, np.full_like(c, STREAM_LAYERNORM.value), pairs >> 32)
    slices = _slices_np(words)  # (8, ...)
    u = np.take_along_axis(slices, (4 * (r % 2) + c % 4)[None], axis=0)[0]
    return u >= threshold


@triton.jit
def _attention_keep_kernel(seed_ptr, out_ptr, bh, start_m, start_n, threshold,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    keep = attention_keep(tl.load(seed_ptr), bh, start_m, start_n, threshold, BLOCK_M, BLOCK_N)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(out_ptr + offs, keep.to(tl.int8))


@pytest.mark.parametrize("block_m, block_n, start_m, start_n", [
    (16, 16, 0, 0), (32, 64, 48, 16), (64, 32, 2**20, 2**21 + 32), (16, 128, 112, 0)])
@pytest.mark.parametrize("seed", [3, 2**62 + 9], ids=["seed3", "seed2^62+9"])
def test_attention_keep_is_the_documented_layout(block_m, block_n, start_m, start_n, seed, device):
    bh, threshold = 1234567, dropout_threshold(0.3).threshold
    out = torch.empty((block_m, block_n), dtype=torch.int8, device=device)
    _attention_keep_kernel[(1,)](seed_tensor(seed, device), out, bh, start_m, start_n, threshold,
                                 BLOCK_M=block_m, BLOCK_N=block_n)
    i = start_m + np.arange(block_m)[:, None]
    j = start_n + np.arange(block_n)[None, :]
    np.testing.assert_array_equal(out.cpu().numpy().astype(bool), attention_keep_np(seed, bh, i, j, threshold))


@triton.jit
def _layernorm_keep_kernel(seed_ptr, out_ptr, row0, row_step, start_c, threshold_hi,
                           ROWS: tl.constexpr, BLOCK_C: tl.constexpr, HALF: tl.constexpr, ROWS64: tl.constexpr):
    """out[i, j] = layernorm_keep of row row0 + i row_step (int64 or int32 indices), column start_c + j."""
    offs_r = tl.arange(0, ROWS)
    if ROWS64:
        rows = row0 + offs_r.to(tl.int64) * row_step
    else:
        rows = row0 + offs_r * row_step
    keep = layernorm_keep(tl.load(seed_ptr), rows, start_c, tl.arange(0, BLOCK_C), threshold_hi, HALF)
    tl.store(out_ptr + offs_r[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :], keep.to(tl.int8))


@pytest.mark.parametrize("rows, block_c, row0, row_step, start_c, half, rows64", [
    (4, 8, 0, 1, 0, -1, True), (8, 64, 1001, 1, 24, -1, True), (2, 32, 2**32 - 1, 1, 2**20, -1, True),
    (4, 16, 5 * 2**32 + 3, 1, 8, -1, True), (4, 16, 2**33 + 6, 2, 0, 0, True), (8, 16, 3, 1, 4, -1, False),
    (4, 32, 10, 2, 128, 0, False), (4, 32, 7, 2, 256, 1, False)],
    ids=["rows0", "odd-row0", "rows-2^32", "rows-5x2^32", "even-rows-64", "int32", "even-rows", "odd-rows"])
@pytest.mark.parametrize("p", [0.25, 0.7])  # threshold << 16 below and above 2^31
def test_layernorm_keep_is_the_documented_layout(rows, block_c, row0, row_step, start_c, half, rows64, p, device):
    seed, threshold = 2**40 + 17, dropout_threshold(p).threshold
    out = torch.empty((rows, block_c), dtype=torch.int8, device=device)
    _layernorm_keep_kernel[(1,)](seed_tensor(seed, device), out, row0, row_step, start_c, threshold << 16,
                                 ROWS=rows, BLOCK_C=block_c, HALF=half, ROWS64=rows64)
    r = row0 + row_step * np.arange(rows)[:, None]
    c = start_c + np.arange(block_c)[None, :]
    np.testing.assert_array_equal(out.cpu().numpy().astype(bool), layernorm_keep_np(seed, r, c, threshold))


def _binomial_close(count, n, prob, what):
    """count of n Bernoulli(prob) draws is within 6 standard deviations of n * prob."""
    sigma = math.sqrt(n * prob * (1 - prob))
    assert abs(count - n * prob) <= 6 * sigma, f"{what}: {count} of {n}, expected {n * prob:.0f} +- {sigma:.0f}"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_is_one_minus_effective_p(p, device):
    """Over 2^17 elements, and in each of the 8 slice positions, about 1 - p_eff is kept."""
    threshold, p_eff, _ = dropout_threshold(p)
    out = torch.empty((256, 512), dtype=torch.int8, device=device)
    _attention_keep_kernel[(1,)](seed_tensor(99, device), out, 0, 0, 0, threshold, BLOCK_M=256, BLOCK_N=512)
    keep = out.cpu().numpy().astype(bool)
    _binomial_close(keep.sum(), keep.size, 1 - p_eff, "kept")
    for i3 in range(2):
        for j3 in range(2):
            for j0 in range(2):
                part = keep.reshape(16, 2, 8, 32, 2, 4, 2)[:, i3, :, :, j3, :, j0]
                _binomial_close(part.sum(), part.size, 1 - p_eff, f"kept in word {2 * i3 + j3}, half {j0}")


def test_streams_and_heads_give_different_bits(device):
    """The same seed and indices in the attention and layer-norm streams, or in two heads, differ."""
    seed, threshold = 42, dropout_threshold(0.5).threshold
    i, j = np.arange(64)[:, None], np.arange(64)[None, :]
    attn = attention_keep_np(seed, 0, i, j, threshold)
    # Layer norm's stream at the same four counter words but c2 = STREAM_LAYERNORM.
    c0, c1 = (j // 16) * 4 + (j // 2) % 4, (i // 16) * 8 + i % 8
    c0, c1 = np.broadcast_arrays(c0, c1)
    ln_words = np.stack(philox_np(*_seed_words(seed), c0, c1, np.full_like(c0, STREAM_LAYERNORM.value), 0 * c0))
    attn_words = np.stack(philox_np(*_seed_words(seed), c0, c1, np.full_like(c0, STREAM_ATTENTION.value), 0 * c0))
    assert (ln_words != attn_words).mean() > 0.99
    assert (attn != attention_keep_np(seed, 1, i, j, threshold)).mean() > 0.4


def test_seed_tensor_draws_63_bit_seeds_on_the_device(device):
    torch.manual_seed(1)
    seeds = torch.cat([seed_tensor(None, device) for _ in range(64)])
    assert seeds.dtype == torch.int64 and seeds.device.type == device.type
    assert (seeds >= 0).all() and (seeds >= 2**32).float().mean() > 0.9, "the high word is drawn too"
    torch.manual_seed(1)
    assert torch.equal(seed_tensor(None, device), seeds[:1]), "not repeatable under torch.manual_seed"


@pytest.mark.parametrize("seed", [0, 2**32 + 1, 2**62 + 3, 2**63 - 1])
def test_seed_tensor_keeps_int_and_tensor_seeds(seed, device):
    assert seed_tensor(seed, device).tolist() == [seed]
    assert seed_tensor(torch.tensor(seed), device).tolist() == [seed]
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        seed_tensor(2**63, device)
