"""LayerNorm benchmarks: kernels.layer_norm and kernels.add_layer_norm against their torch peers.

    pytest bench/test_bench_layernorm.py --benchmark-only

GPU time is triton.testing.do_bench's median (in extra_info, with GB/s); pytest-benchmark's own
table times the same call on the host with a device synchronize after each round.

Providers: "triton" (ours); for layer_norm "torch" (F.layer_norm) and "torch-compile" (the same
under torch.compile); for add_layer_norm (dropout 0.2) the unfused PyTorch sequence dropout, add,
layer_norm, eager ("torch-unfused") and compiled ("torch-unfused-compile").

GB/s counts the op's compulsory traffic, the same for every provider: each input read once and each
output written once (mean and rstd included, 8 bytes a row, since a training forward keeps them).
Implementation extras (our dweight/dbias partials, torch's dropout mask) are not counted.
"""

import pytest
import torch
import torch.nn.functional as F

from bench.conftest import do_bench_us, gpu_info, requires_cuda

pytestmark = requires_cuda

EPS = 1e-5
DROPOUT_P = 0.2

CASES = [pytest.param("layer_norm", p, id=f"layer_norm-{p}") for p in ("triton", "torch", "torch-compile")] + [
    pytest.param("add_layer_norm", p, id=f"add_layer_norm-{p}")
    for p in ("triton", "torch-unfused", "torch-unfused-compile")
]
SHAPES = [pytest.param(s, id=f"{s[0]}x{s[1]}") for s in [(16384, 384), (16384, 1024), (4096, 4097)]]
BENCH_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _torch_layer_norm(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, EPS)


def _torch_add_layer_norm(x, residual, weight, bias):
    s = residual + F.dropout(x, DROPOUT_P, training=True)
    return F.layer_norm(s, (x.shape[-1],), weight, bias, EPS), s


def _op_fn(op: str, provider: str):
    """The callable provider runs for op: f(x, residual, weight, bias) -> output or (y, s)."""
    from kernels import add_layer_norm, layer_norm

    if provider == "triton":
        if op == "layer_norm":
            return lambda x, r, w, b: layer_norm(x, w, b, EPS)
        # seed=None: a seed drawn on the device each call, as in training.
        return lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS, DROPOUT_P)
    if op == "layer_norm":
        fn = lambda x, r, w, b: _torch_layer_norm(x, w, b)  # noqa: E731
    else:
        fn = _torch_add_layer_norm
    if provider.endswith("-compile"):
        torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no stale dynamic shapes
        fn = torch.compile(fn, dynamic=False)
    return fn


def _bytes(op: str, mode: str, n_rows: int, n_cols: int, dtype: torch.dtype) -> int:
    """Compulsory bytes read + written (weight and bias fp32, as the model holds them; mean/rstd fp32)."""
    act = n_rows * n_cols * dtype.itemsize  # one (rows, C) tensor
    param = n_cols * 4  # one (C,) fp32 tensor
    stats = 2 * n_rows * 4  # mean and rstd
    n_act_fwd, n_act_bwd = (2, 3) if op == "layer_norm" else (4, 5)  # x,y | x,dy,dx  /  x,r,y,s | s,dy,ds,dx,dres
    fwd = n_act_fwd * act + 2 * param + stats  # read weight, bias
    bwd = n_act_bwd * act + 3 * param + stats  # read weight; write dweight, dbias
    return fwd if mode == "fwd" else fwd + bwd


@pytest.mark.parametrize("dtype", BENCH_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op, provider", CASES)
def test_bench_layernorm(benchmark, op, provider, mode, shape, dtype):
    n_rows, n_cols = shape
    device = torch.device("cuda")
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)  # (rows, C)
    r = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)  # (rows, C)
    # The model's parameters: fp32 weight and bias whatever the activations' dtype (as under autocast).
    w = (1 + 0.1 * torch.randn(n_cols, device=device)).requires_grad_()  # (C,) fp32
    b = (0.1 * torch.randn(n_cols, device=device)).requires_grad_()  # (C,) fp32
    leaves = [x, w, b] + ([r] if op == "add_layer_norm" else [])
    f = _op_fn(op, provider)

    if mode == "fwd":
        def fn():
            return f(x, r, w, b)
    else:
        # The residual stream uses s later, so add_layer_norm's backward gets a gradient for s too.
        grads = [torch.randn(shape, device=device, dtype=dtype) for _ in range(2)]  # (rows, C) each

        def fn():
            outs = f(x, r, w, b)
            outs = outs if isinstance(outs, tuple) else (outs,)
            torch.autograd.backward(outs, grads[: len(outs)])

    fn()  # compile (torch.compile, Triton) outside the timing
    torch.cuda.synchronize()
    median_us = do_bench_us(fn, grad_to_none=leaves)
    gb_per_s = _bytes(op, mode, n_rows, n_cols, dtype) / (median_us * 1e-6) / 1e9

    benchmark.group = f"{op} {mode} {n_rows}x{n_cols} {str(dtype).removeprefix('torch.')}"
    benchmark.extra_info.update(gpu_info(dtype))
    benchmark.extra_info.update({
        "op": op, "provider": provider, "mode": mode, "shape": list(shape),
        "dtype": str(dtype), "do_bench_median_us": round(median_us, 2), "gb_per_s": round(gb_per_s, 1),
    })

    def synced():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=2)
    for t in leaves:
        t.grad = None
