"""Attention benchmarks: kernels.flash_attention against the reference and PyTorch's SDPA backends.

    pytest bench/test_bench_attention.py --benchmark-only

GPU time is triton.testing.do_bench's median (in extra_info, with TFLOP/s); pytest-benchmark's own
table times the same call on the host with a device synchronize after each round.

Providers: "triton" (ours, seed=None so a fresh seed is drawn on the device each call, as in
training); "reference" (kernels.reference.attention, the seed's math); "sdpa-flash", "sdpa-cudnn",
"sdpa-efficient" (F.scaled_dot_product_attention pinned to one backend with sdpa_kernel; its inputs
are made (B, H, T, D) contiguous before timing). A backend that cannot run a case skips with its
reason. All causal, bf16. The inputs require grad in both modes, so "fwd" is a training forward
(the log-sum-exp is kept for backward).

TFLOP/s counts 4 B H T^2 D for the two matmuls, halved for the causal mask, times 2.5 more for the
backward (so fwd+bwd is 3.5x the forward), the same for every provider.
"""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.conftest import do_bench_us, gpu_info, requires_cuda

pytestmark = requires_cuda

DTYPE = torch.bfloat16
SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
}
PROVIDERS = ["triton", "reference", *SDPA_BACKENDS]
SHAPES = [pytest.param(s, id="B{}-T{}-H{}-D{}".format(*s)) for s in [(64, 256, 6, 64), (16, 1024, 6, 64)]]


def _flops(mode: str, B: int, T: int, H: int, D: int) -> float:
    """Matmul FLOPs of causal attention: 4 B H T^2 D / 2 forward, 2.5x that again for backward."""
    fwd = 4 * B * H * T * T * D * 0.5
    return fwd if mode == "fwd" else 3.5 * fwd


def _provider_fn(provider: str, dropout_p: float, q, k, v):
    """(f, leaves): f() runs provider's causal attention on q, k, v (B, T, H, D) or its own copies."""
    from kernels import flash_attention
    from kernels.reference import attention

    if provider == "triton":
        return (lambda: flash_attention(q, k, v, dropout_p, causal=True)), [q, k, v]
    if provider == "reference":
        return (lambda: attention(q, k, v, dropout_p, causal=True)), [q, k, v]
    # SDPA wants (B, H, T, D); the transposed copies are made here, outside the timing.
    qh, kh, vh = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    return (lambda: F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout_p, is_causal=True)), [qh, kh, vh]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["p0", "p0.2"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_attention(benchmark, provider, mode, dropout_p, shape):
    B, T, H, D = shape
    device = torch.device("cuda")
    q, k, v = (torch.randn(shape, device=device, dtype=DTYPE, requires_grad=True) for _ in range(3))
    f, leaves = _provider_fn(provider, dropout_p, q, k, v)
    backend = SDPA_BACKENDS.get(provider)

    if mode == "fwd":
        def fn():
            return f()
    else:
        do = torch.randn_like(leaves[0])  # the output's gradient, in the provider's layout

        def fn():
            f().backward(do)

    def synced():
        fn()
        torch.cuda.synchronize()

    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                synced()  # compile (Triton) and check the backend runs, outside the timing
            except RuntimeError as e:
                if backend is None:  # ours or the reference: an error is a failure, never a skip
                    raise
                why = " ".join(str(w.message) for w in caught) or str(e)
                pytest.skip(f"{provider} does not run here: {why}")
        median_us = do_bench_us(fn, grad_to_none=leaves)
        benchmark.pedantic(synced, rounds=20, iterations=1, warmup_rounds=2)

    benchmark.group = f"attention {mode} B{B}-T{T}-H{H}-D{D} p={dropout_p} bf16"
    benchmark.extra_info.update(gpu_info(DTYPE))
    benchmark.extra_info.update({
        "provider": provider, "mode": mode, "shape": list(shape), "dropout_p": dropout_p, "causal": True, "do_bench_median_us": round(median_us, 2),
        "tflops": round(_flops(mode, B, T, H, D) / (median_us * 1e-6) / 1e12, 1),
    })
    for t in leaves:
        t.grad = None
