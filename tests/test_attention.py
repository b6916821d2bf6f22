"""kernels.flash_attention against kernels.reference.attention: output and every gradient, by name.

The float64 reference is the truth; the same PyTorch computation in the kernel's dtype is the
yardstick (tests.conftest.assert_matches_reference). Dropout is checked exactly by handing the
kernels' own mask (dropout_keep_mask) to the reference.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from kernels import flash_attention
from kernels._common import seed_tensor
from kernels.attention import _DEFAULT_CONFIGS, _attn_backward, _attn_forward, _Config, dropout_keep_mask
from kernels.dropout import dropout_threshold
from kernels.reference import attention
from tests.conftest import DTYPES, assert_matches_reference
from tests.test_dropout import attention_keep_np


def _randn(shape, dtype, device):
    return torch.randn(shape, dtype=dtype, device=device)


def _out_and_grads(fn, q, k, v, do, **kwargs):
    """fn's output and (dq, dk, dv) for the output gradient do; leaves keep the inputs' strides."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    return (out.detach(), *torch.autograd.grad(out, leaves, do))


def _check(q, k, v, keep_mask=None, **kwargs):
    """Kernel out, dq, dk, dv vs the float64 reference; returns the kernel's four tensors.

    With dropout the reference gets the kernels' mask and their effective p (a multiple of 2^-16).
    """
    do = _randn(q.shape, q.dtype, q.device)  # (B, T, H, D)
    got = _out_and_grads(flash_attention, q, k, v, do, **kwargs)
    if "dropout_p" in kwargs:
        kwargs = dict(kwargs, dropout_p=dropout_threshold(kwargs["dropout_p"]).p)
    ref64 = _out_and_grads(attention, q.double(), k.double(), v.double(), do.double(),
                           keep_mask=keep_mask, **kwargs)
    same = _out_and_grads(attention, q, k, v, do, keep_mask=keep_mask, **kwargs)
    for name, actual, r64, s in zip(("out", "dq", "dk", "dv"), got, ref64, same):
        assert_matches_reference(name, actual, r64, s)
    return got


# (B, T, H, D): every T in {1, 2, 17, 64, 100, 256}, D in {16, 32, 64}, B in {1, 2}, H in {1, 3}
# appears at least once, plus D = 128 and head dims that are padded (8, 40).
SHAPES = [
    pytest.param((1, 1, 1, 16), id="B1-T1-H1-D16"),
    pytest.param((2, 2, 3, 32), id="B2-T2-H3-D32"),
    pytest.param((1, 17, 3, 64), id="B1-T17-H3-D64"),
    pytest.param((2, 64, 1, 16), id="B2-T64-H1-D16"),
    pytest.param((2, 100, 3, 32), id="B2-T100-H3-D32"),
    pytest.param((1, 256, 1, 64), id="B1-T256-H1-D64"),
    pytest.param((1, 64, 2, 128), id="B1-T64-H2-D128"),
    pytest.param((2, 33, 1, 40), id="B2-T33-H1-D40"),
    pytest.param((1, 17, 2, 8), id="B1-T17-H2-D8"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_causal_matches_reference(shape, dtype, device):
    q, k, v = (_randn(shape, dtype, device) for _ in range(3))
    out = _check(q, k, v)[0]
    assert out.shape == shape and out.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_causal_with_scale_matches_reference(dtype, device):
    q, k, v = (_randn((2, 100, 3, 32), dtype, device) for _ in range(3))
    _check(q, k, v, causal=False, softmax_scale=0.3)


@pytest.mark.parametrize("scale", [-0.7, 0.0], ids=["negative", "zero"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_negative_and_zero_scale(scale, causal, device):
    """The kernels fold a positive scale into exp2; a negative one runs as -q, zero as a tiny one."""
    q, k, v = (_randn((1, 40, 2, 16), torch.float32, device) for _ in range(3))
    _check(q, k, v, causal=causal, softmax_scale=scale, dropout_p=0.25, seed=3,
           keep_mask=dropout_keep_mask(3, 1, 2, 40, 40, 0.25, device))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("t_q, t_k", [(17, 100), (100, 17)], ids=["Tq17-Tk100", "Tq100-Tk17"])
def test_different_query_and_key_lengths(t_q, t_k, causal, device):
    q = _randn((2, t_q, 2, 32), torch.float32, device)
    k, v = (_randn((2, t_k, 2, 32), torch.float32, device) for _ in range(2))
    _check(q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_projection_views(dtype, device):
    """q, k, v as views of one (B, T, 3, H, D) projection go in without a copy."""
    B, T, H, D = 2, 100, 3, 32
    qkv = _randn((B, T, 3, H, D), dtype, device)  # (B, T, 3, H, D)
    q, k, v = qkv.unbind(2)  # (B, T, H, D) each, strides (T*3*H*D, 3*H*D, D, 1)
    out = _check(q, k, v)[0]
    assert out.shape == (B, T, H, D) and out.is_contiguous()


def test_transposed_inputs(device):
    """(B, H, T, D) storage seen as (B, T, H, D): any strides with a unit last one."""
    q, k, v = (_randn((2, 3, 64, 32), torch.float32, device).transpose(1, 2) for _ in range(3))
    out, dq, _, _ = _check(q, k, v)
    assert out.is_contiguous() and dq.stride() == q.stride()


@pytest.mark.parametrize("shape, causal", [
    pytest.param((2, 100, 3, 32), True, id="B2-T100-H3-D32-causal"),
    pytest.param((2, 100, 3, 32), False, id="B2-T100-H3-D32-full"),
    pytest.param((1, 256, 2, 64), True, id="B1-T256-H2-D64-causal"),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_matches_reference_with_kernel_mask(shape, causal, dtype, device):
    (B, T, H, D), p = shape, 0.2
    q, k, v = (_randn((B, T, H, D), dtype, device) for _ in range(3))
    mask = dropout_keep_mask(1234, B, H, T, T, p, device)
    _check(q, k, v, keep_mask=mask, dropout_p=p, causal=causal, seed=1234)


def test_dropout_below_half_a_step_is_no_dropout(device):
    """p < 2^-17 rounds to a threshold of 0: nothing is dropped and nothing is rescaled."""
    q, k, v = (_randn((1, 33, 2, 16), torch.float32, device) for _ in range(3))
    assert dropout_threshold(1e-6) == (0, 0.0, 1.0)
    assert torch.equal(flash_attention(q, k, v, dropout_p=1e-6, seed=3), flash_attention(q, k, v))


def _binomial_close(count, n, prob, what):
    """count of n Bernoulli(prob) draws is within 6 standard deviations of n * prob."""
    sigma = math.sqrt(n * prob * (1 - prob))
    assert abs(count - n * prob) <= 6 * sigma, f"{what}: {count} of {n}, expected {n * prob:.0f} +- {sigma:.0f}"


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_is_one_minus_p(p, device):
    mask = dropout_keep_mask(7, 2, 3, 256, 256, p, device).cpu()  # (B, H, T, T)
    p_eff = dropout_threshold(p).p
    _binomial_close(mask.sum().item(), mask.numel(), 1 - p_eff, "kept")
    # Each of the 8 slices of a Philox call (word 2 (i // 8 % 2) + j // 8 % 2, half j % 2) alone, and
    # neighbouring keys and queries together, look independent.
    tiles = mask.reshape(2, 3, 16, 2, 8, 16, 2, 4, 2)  # (b, h, i//16, i//8%2, i%8, j//16, j//8%2, j//2%4, j%2)
    for i3, j3, j0 in itertools.product(range(2), repeat=3):
        part = tiles[:, :, :, i3, :, :, j3, :, j0]
        _binomial_close(part.sum().item(), part.numel(), 1 - p_eff, f"kept in word {2 * i3 + j3}, half {j0}")
    for name, a, b in (("keys", mask[..., 1:], mask[..., :-1]), ("queries", mask[..., 1:, :], mask[..., :-1, :]),
                       ("keys 8 apart", mask[..., 8:], mask[..., :-8])):
        both = a & b
        _binomial_close(both.sum().item(), both.numel(), (1 - p_eff) ** 2, f"neighbouring {name} kept")
    assert not torch.equal(mask[0, 0], mask[0, 1]), "heads share dropout bits"
    assert not torch.equal(mask[0, 0], mask[1, 0]), "batch rows share dropout bits"


@pytest.mark.parametrize("seed", [5, 2**40 + 3, 2**62 + 1])  # the seed's high half matters too
def test_mask_is_the_documented_function_of_seed_batch_head_query_key(seed, device):
    """dropout_keep_mask follows kernels.dropout's layout, checked by an independent NumPy Philox."""
    B, H, T_q, T_k, p = 2, 3, 37, 50, 0.4
    got = dropout_keep_mask(seed, B, H, T_q, T_k, p, device).cpu().numpy()
    threshold = dropout_threshold(p).threshold
    i, j = np.arange(T_q)[:, None], np.arange(T_k)[None, :]
    for b in range(B):
        for h in range(H):
            want = attention_keep_np(seed, b * H + h, i, j, threshold)
            np.testing.assert_array_equal(got[b, h], want, err_msg=f"batch {b}, head {h}")


def _dropout_run(device, seed, p=0.3):
    q, k, v = (_randn((2, 64, 3, 32), torch.float32, device) for _ in range(3))
    do = _randn(q.shape, q.dtype, device)
    return q, k, v, do, _out_and_grads(flash_attention, q, k, v, do, dropout_p=p, seed=seed)


def test_same_seed_is_bitwise_equal_and_another_differs(device):
    q, k, v, do, first = _dropout_run(device, seed=123)
    again = _out_and_grads(flash_attention, q, k, v, do, dropout_p=0.3, seed=123)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, again):
        assert torch.equal(a, b), f"{name} differs between two runs with seed 123"
    as_tensor = _out_and_grads(flash_attention, q, k, v, do, dropout_p=0.3,
                               seed=torch.tensor(123, device=device))
    assert torch.equal(first[0], as_tensor[0]), "an int seed and the same seed as a tensor differ"
    other = _out_and_grads(flash_attention, q, k, v, do, dropout_p=0.3, seed=124)
    assert not torch.equal(first[0], other[0]), "seeds 123 and 124 gave the same output"


def test_seed_none_repeats_under_manual_seed(device):
    q, k, v = (_randn((1, 64, 2, 16), torch.float32, device) for _ in range(3))
    torch.manual_seed(5)
    first = flash_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    again = flash_attention(q, k, v, dropout_p=0.5)
    later = flash_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(first, again), "seed=None did not repeat after torch.manual_seed"
    assert not torch.equal(first, later), "seed=None drew the same bits twice in a row"


def test_gradients_are_bitwise_repeatable(device):
    q, k, v, do, first = _dropout_run(device, seed=9, p=0.2)
    for _ in range(2):
        again = _out_and_grads(flash_attention, q, k, v, do, dropout_p=0.2, seed=9)
        for name, a, b in zip(("dq", "dk", "dv"), first[1:], again[1:]):
            assert torch.equal(a, b), f"{name} is not bitwise repeatable"


def _table_configs():
    """Every configuration the launchers can pick: the defaults and the measured table's entries."""
    from kernels.attention_configs import TABLE
    return ({cfg for table in _DEFAULT_CONFIGS.values() for cfg in table.values()}
            | {_Config(*cfg) for entry in TABLE.values() for cfg in entry.values()})


def _tune_candidates():
    """What bench/tune.py may write into the table (for the model's head dim)."""
    from bench.tune import KERNELS, candidates
    return {cfg for kernel in KERNELS for cfg in candidates(kernel, 64)}


def _config_id(c):
    return f"M{c.block_m}-N{c.block_n}-w{c.num_warps}-s{c.num_stages}"


TABLE_CONFIGS = sorted(_table_configs() | {_Config(16, 16, 4, 1), _Config(32, 128, 4, 1)})
CONFIG_CASES = ([pytest.param(c, torch.float32, id=f"{_config_id(c)}-fp32") for c in TABLE_CONFIGS]
                + [pytest.param(c, torch.float16, id=f"{_config_id(c)}-fp16")
                   for c in sorted(set(TABLE_CONFIGS) | _tune_candidates())])


@pytest.mark.parametrize("config, dtype", CONFIG_CASES)
def test_every_config_applies_the_same_mask_and_is_correct(config, dtype, device):
    """Every block shape the table, the defaults or bench/tune.py can choose applies
    dropout_keep_mask's mask, forward and backward, and matches the reference."""
    B, T, H, D, p, seed = 1, 100, 2, 32, 0.3, 11
    q, k, v = (_randn((B, T, H, D), dtype, device) for _ in range(3))
    do = _randn((B, T, H, D), dtype, device)
    scale, seed_t = D ** -0.5, seed_tensor(seed, device)
    out, lse = _attn_forward(q, k, v, p, True, scale, seed_t, _config=config)
    grads = _attn_backward(do, q, k, v, out, lse, p, True, scale, seed_t, _configs=(config, config))
    mask, p_eff = dropout_keep_mask(seed, B, H, T, T, p, device), dropout_threshold(p).p
    ref64 = _out_and_grads(attention, q.double(), k.double(), v.double(), do.double(),
                           dropout_p=p_eff, keep_mask=mask)
    same = _out_and_grads(attention, q, k, v, do, dropout_p=p_eff, keep_mask=mask)
    for name, actual, r64, s in zip(("out", "dq", "dk", "dv"), (out, *grads), ref64, same):
        assert_matches_reference(name, actual, r64, s)


def test_inference_path_saves_nothing(device, monkeypatch):
    """Without grad, the forward neither stores the log-sum-exp nor builds an autograd node."""
    import kernels.attention as attn

    calls = []
    real_forward = attn._attn_forward

    def spy(*args, **kwargs):
        calls.append(args[7])  # need_lse
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(attn, "_attn_forward", spy)
    q, k, v = (_randn((1, 17, 2, 16), torch.float32, device).requires_grad_() for _ in range(3))
    with torch.no_grad():
        out = flash_attention(q, k, v)
    plain = flash_attention(q.detach(), k.detach(), v.detach())
    trained = flash_attention(q, k, v)
    assert calls == [False, False, True]
    assert out.grad_fn is None and plain.grad_fn is None and trained.grad_fn is not None
    assert torch.equal(out, trained.detach())


def _qkv(shape=(1, 8, 2, 16), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


def _strided_q():
    q, k, v = _qkv()
    return torch.randn(1, 8, 2, 32)[..., ::2], k, v


BAD_INPUTS = [
    pytest.param(lambda: ([1.0], *_qkv()[1:]), {}, TypeError, "q must be a torch.Tensor", id="not-a-tensor"),
    pytest.param(lambda: (torch.zeros(1, 8, 2, 16, dtype=torch.int64), *_qkv()[1:]), {}, TypeError,
                 "q must be float32, float16 or bfloat16, got torch.int64", id="integer"),
    pytest.param(lambda: (torch.randn(8, 2, 16), *_qkv()[1:]), {}, ValueError,
                 r"q must be 4-d \(B, T, H, D\), got shape \(8, 2, 16\)", id="not-4d"),
    pytest.param(lambda: (*_qkv()[:2], torch.randn(1, 8, 2, 16, dtype=torch.float16)), {}, TypeError,
                 "share one dtype, got torch.float32, torch.float32, torch.float16", id="mixed-dtypes"),
    pytest.param(lambda: (*_qkv()[:2], torch.randn(1, 8, 2, 16, device="meta")), {}, ValueError,
                 "one device, got cpu, cpu, meta", id="mixed-devices"),
    pytest.param(lambda: (_qkv()[0], torch.randn(1, 9, 2, 16), torch.randn(1, 8, 2, 16)), {}, ValueError,
                 r"k and v must have the same shape, got \(1, 9, 2, 16\) and \(1, 8, 2, 16\)", id="k-v-shapes"),
    pytest.param(lambda: (_qkv()[0], *_qkv((1, 8, 3, 16))[1:]), {}, ValueError,
                 r"q \(1, 8, 2, 16\) and k \(1, 8, 3, 16\) must agree in B, H and D", id="heads-disagree"),
    pytest.param(lambda: _qkv((1, 8, 2, 160)), {}, ValueError, r"head_dim must be in \[1, 128\], got 160",
                 id="head-dim-160"),
    pytest.param(lambda: _qkv((1, 0, 2, 16)), {}, ValueError, "must be non-empty", id="empty"),
    pytest.param(_strided_q, {}, ValueError, r"q must have unit stride in its last dimension", id="strided-last-dim"),
    pytest.param(_qkv, {"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\), got 1.0", id="dropout-1"),
    pytest.param(_qkv, {"dropout_p": -0.1}, ValueError, r"dropout_p must be in \[0, 1\), got -0.1",
                 id="dropout-negative"),
    pytest.param(_qkv, {"causal": 1}, TypeError, "causal must be a bool, got int", id="causal-int"),
    pytest.param(_qkv, {"softmax_scale": float("nan")}, ValueError, "softmax_scale must be finite, got nan",
                 id="scale-nan"),
    pytest.param(_qkv, {"dropout_p": 0.1, "seed": -1}, ValueError, r"seed must be in \[0, 2\*\*63\), got -1",
                 id="seed-negative"),
]


@pytest.mark.parametrize("make, kwargs, error, match", BAD_INPUTS)
def test_bad_input_raises(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        flash_attention(*make(), **kwargs)


def test_dropout_keep_mask_bad_input():
    with pytest.raises(ValueError, match="seqlen_q must be a positive int, got 0"):
        dropout_keep_mask(0, 1, 1, 0, 8, 0.1, "cpu")
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.5"):
        dropout_keep_mask(0, 1, 1, 8, 8, 1.5, "cpu")


@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["p0", "p0.2"])
def test_custom_ops_pass_opcheck(dropout_p, device):
    """The torch.library registrations (schema, fake tensors, autograd) that torch.compile relies on."""
    import kernels.attention as attn

    q, k, v = (_randn((1, 17, 2, 16), torch.float32, device).requires_grad_() for _ in range(3))
    seed_t = torch.tensor([7], device=device) if dropout_p else None
    torch.library.opcheck(attn._attn_forward_op, (q, k, v, dropout_p, True, 0.25, seed_t, True))


def test_compiles_without_graph_breaks(device):
    """fullgraph=True fails on any graph break; the compiled op gives the eager op's values."""
    qkv = _randn((2, 33, 3, 2, 16), torch.float32, device).requires_grad_()  # (B, T, 3, H, D)

    def f(qkv):
        q, k, v = qkv.unbind(2)
        return flash_attention(q, k, v, dropout_p=0.2, seed=5).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = compiled(qkv)
    got.backward()
    grad = qkv.grad.clone()
    qkv.grad = None
    want = f(qkv)
    want.backward()
    assert torch.equal(got, want)
    assert torch.equal(grad, qkv.grad), "dqkv"
