"""Shared benchmark helpers: the CUDA skip, the card and versions for extra_info, GPU timing.

Import them as `from bench.conftest import ...`. Nothing here runs a benchmark or needs a GPU to import.
"""

import pytest
import torch
import triton
import triton.testing

HAS_CUDA = torch.cuda.is_available()

# Without a GPU every benchmark skips with this one reason.
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def gpu_info(dtype: torch.dtype | None = None) -> dict:
    """The card, the dtype (when given) and the library versions, for benchmark.extra_info."""
    info = {
        "gpu": torch.cuda.get_device_name() if HAS_CUDA else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    if dtype is not None:
        info["dtype"] = str(dtype)
    return info


def do_bench_us(fn, grad_to_none=None) -> float:
    """Median GPU time of fn in microseconds (triton.testing.do_bench, which flushes the L2 between calls)."""
    return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median") * 1e3
