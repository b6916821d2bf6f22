"""Host time per call: our ops' Python layers against the torch ops', at tiny shapes.

    pytest bench/test_bench_host.py --benchmark-only      (runs on the CPU too)

What one call costs the host before the GPU sees any work. A captured CUDA graph replays the
kernels without it, but every other path pays it on every op: DDP, the eager parts of --compile,
fp16, sampling, a capture fallback. At the model's sizes the step then waits on the host, so our
ops must cost no more host time than the torch ops they replace.

Launch "stubbed" (any machine): Triton's launches are replaced by a no-op (JITFunction.run, and
InterpretedFunction.run under TRITON_INTERPRET=1), so what is timed is our layer alone: input checks,
the seed, allocating the outputs, autograd, the launchers' arithmetic. Triton's own launcher is not
in it (it is in "real"). The torch ops run for real: on a GPU they launch asynchronously; on the CPU
they compute, at shapes where that is a small part of their time (a (1, 16, 2, 16) attention, a
(16, 32) layer norm). On the CPU, where no compiled kernel can run, our ops' device check is widened
to the CPU for the stubbed launch (the check is one set lookup either way).
Launch "real" (GPU only): our kernels launch too, through Triton's launcher.

Providers, called as model/backends.py calls them: "triton" (kernels.flash_attention, layer_norm,
add_layer_norm, with a seed tensor handed in as the model does) and "torch" (SDPA on transposed
views, F.layer_norm, and dropout + add + F.layer_norm). Modes: "fwd" is an evaluation or sampling
call (no gradient, dropout 0); "fwd+bwd" a training call (inputs that require grad, dropout 0.2,
torch.autograd.grad over every input). Op "model" is the whole model with each backend: a 2-block
GPT of width 32 on 16 tokens, an eval forward or a training forward and backward (the Linear layers
and the loss run for real in both; with the triton backend its 7 op calls are ours).
The timed call synchronizes the GPU before each round (not timed), so queued work never holds up the
host. host_us in extra_info is the median per call. test_bench_host_autograd_floor times a
torch.autograd.Function that only allocates what our layer_norm allocates: the floor of any Python
autograd layer, which F.layer_norm (C++ autograd) does not pay.
"""

import pytest
import torch

from bench.conftest import gpu_info, requires_cuda
from model.backends import backend_ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TRAIN_P = 0.2
ROUNDS = 2000


def _inputs(op: str):
    """The op's tensor arguments (leaves, requiring grad) at a tiny shape."""
    def leaf(*shape):
        return torch.randn(shape, device=DEVICE, dtype=DTYPE).requires_grad_()
    if op == "attention":
        return [leaf(1, 16, 2, 16) for _ in range(3)]  # q, k, v (B, T, H, D)
    if op == "layer_norm":
        return [leaf(16, 32), leaf(32), leaf(32)]  # x (rows, C), weight, bias
    return [leaf(16, 32), leaf(16, 32), leaf(32), leaf(32)]  # x, residual (rows, C), weight, bias


def _call(op: str, provider: str, mode: str, tensors):
    """f() -> the op's output(s), as the model calls it in this mode."""
    ops = backend_ops(provider)
    p = TRAIN_P if mode == "fwd+bwd" else 0.0
    # The model hands the triton ops a seed tensor (one draw per forward); the torch ops draw their own.
    seed = torch.randint(0, 2**63 - 1, (1,), device=DEVICE) if provider == "triton" and p else None
    args = tensors if mode == "fwd+bwd" else [t.detach() for t in tensors]
    if op == "attention":
        return lambda: ops.attention(*args, p, seed=seed)
    if op == "layer_norm":
        return lambda: ops.layer_norm(*args, 1e-5)
    return lambda: ops.add_layer_norm(*args, 1e-5, p, seed=seed)


def _model_step(provider: str, mode: str):
    """A small GPT of the seed's design with `provider`'s ops: an eval forward, or a training
    forward and backward to every parameter (fp32, no autocast)."""
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_embd=32, n_head=2, n_layer=2, dropout=TRAIN_P,
                          backend=provider)).to(DEVICE)
    idx = torch.randint(0, 11, (1, 16), device=DEVICE)  # (B, T)
    if mode == "fwd":
        model.eval()
        return torch.no_grad()(lambda: model(idx))
    params = list(model.parameters())
    return lambda: torch.autograd.grad(model(idx, idx)[1], params)


def _timed(op: str, provider: str, mode: str):
    if op == "model":
        return _model_step(provider, mode)
    tensors = _inputs(op)
    f = _call(op, provider, mode, tensors)
    if mode == "fwd":
        return f
    n_out = 2 if op == "add_layer_norm" else 1
    grads = [torch.randn(tensors[0].shape, device=DEVICE, dtype=DTYPE) for _ in range(n_out)]

    def fwd_bwd():
        outs = f()
        torch.autograd.grad(outs if isinstance(outs, tuple) else (outs,), tensors, grads)
    return fwd_bwd


def _stub_launches(monkeypatch):
    """Every Triton launch a no-op; our ops' device check let through to it on this device."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from kernels import attention, layernorm

    def no_launch(self, *args, grid, warmup, **kwargs):
        return None

    monkeypatch.setattr(JITFunction, "run", no_launch)
    monkeypatch.setattr(InterpretedFunction, "run", no_launch)
    for module in (attention, layernorm):
        if hasattr(module, "DEVICE_TYPES"):
            monkeypatch.setattr(module, "DEVICE_TYPES", module.DEVICE_TYPES | {DEVICE.type})


def _can_launch() -> bool:
    from kernels import attention
    return DEVICE.type in attention.DEVICE_TYPES


@pytest.mark.parametrize("launch", ["stubbed", pytest.param("real", marks=requires_cuda)])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["triton", "torch"])
@pytest.mark.parametrize("op", ["attention", "layer_norm", "add_layer_norm", "model"])
def test_bench_host(benchmark, monkeypatch, op, provider, mode, launch):
    fn = _timed(op, provider, mode)
    if provider == "torch" or _can_launch():
        fn()  # compiles our kernels and fills the launchers' caches, outside the timing
    if provider == "triton" and launch == "stubbed":
        _stub_launches(monkeypatch)

    def sync():
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"host {op} {mode} {launch}"
    benchmark.pedantic(fn, setup=sync, rounds=ROUNDS, warmup_rounds=ROUNDS // 10, iterations=1)
    benchmark.extra_info.update(gpu_info(DTYPE))
    benchmark.extra_info.update({"op": op, "provider": provider, "mode": mode, "launch": launch, "device": DEVICE.type})
    if benchmark.stats is not None:  # None under --benchmark-disable, which runs fn once
        benchmark.extra_info["host_us"] = round(benchmark.stats.stats.median * 1e6, 2)


class _AllocatesOnly(torch.autograd.Function):
    """What a Python autograd layer over layer_norm costs before any work of its own: the outputs and
    saved statistics ours allocates (y, mean, rstd; dx, dweight, dbias), nothing else."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        mean, rstd = x.new_empty(x.shape[0]), x.new_empty(x.shape[0])  # (rows,) each
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return torch.empty_like(x)  # (rows, C)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, _, _ = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), None


def test_bench_host_autograd_floor(benchmark):
    """layer_norm fwd+bwd through a torch.autograd.Function that only allocates: the floor under our
    layer_norm's figure (F.layer_norm's autograd is C++ and pays none of it)."""
    tensors = _inputs("layer_norm")
    grads = [torch.randn(tensors[0].shape, device=DEVICE, dtype=DTYPE)]

    def fwd_bwd():
        torch.autograd.grad((_AllocatesOnly.apply(*tensors, 1e-5),), tensors, grads)

    def sync():
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.group = "host layer_norm fwd+bwd stubbed"
    benchmark.pedantic(fwd_bwd, setup=sync, rounds=ROUNDS, warmup_rounds=ROUNDS // 10, iterations=1)
    benchmark.extra_info.update(gpu_info(DTYPE))
    benchmark.extra_info.update({"op": "layer_norm", "provider": "autograd-floor", "mode": "fwd+bwd",
                                 "launch": "none", "device": DEVICE.type})
    if benchmark.stats is not None:
        benchmark.extra_info["host_us"] = round(benchmark.stats.stats.median * 1e6, 2)
