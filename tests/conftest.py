"""Shared test set-up: the device, the seed, the tolerance rule and the dtypes.

Without a GPU, the Triton kernels run in Triton's interpreter, which must be switched on before
triton is first imported; this file is imported before any test module, so it does that here.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The small absolute slack allowed on top of twice PyTorch's own error, per dtype: the project's
# tolerance rule (see assert_matches_reference below).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# Triton's interpreter (3.9) computes bf16 tl.dot wrongly and converts fp32 to bf16 by truncation,
# not to nearest (1 + 2^-8 + 2^-10 becomes 1.0, not 1.0078125): bf16 results cannot be judged there.
BF16_SKIP_REASON = ("Triton's interpreter computes bf16 tl.dot wrongly and rounds fp32 to bf16 by truncation (Triton "
                    "bugs); bf16 runs on the GPU only")

# The dtypes the kernels are tested in: bf16 only where there is a GPU.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(not HAS_CUDA, reason=BF16_SKIP_REASON)),
]


def assert_matches_reference(name, actual, ref64, same_dtype):
    """Pass when |actual - ref64| <= 2 * |same_dtype - ref64| + ATOL[dtype], elementwise max.

    ref64: the reference computed in float64; same_dtype: the same PyTorch computation done in the
    kernel's dtype, whose error is the yardstick.
    """
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == same_dtype.dtype, f"{name}: dtype {actual.dtype} != {same_dtype.dtype}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual.double() - ref64).abs().max().item() if actual.numel() else 0.0
    torch_err = (same_dtype.double() - ref64).abs().max().item() if actual.numel() else 0.0
    atol = ATOL[actual.dtype]
    assert err <= 2 * torch_err + atol, (
        f"{name}: kernel error {err:.3e} > 2 x torch error {torch_err:.3e} + atol {atol:.0e}"
    )


@pytest.fixture
def device():
    """Where the kernels run: the GPU when there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    return 0
