"""Helpers shared by the Triton ops: input checks and the dropout seed."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_tensor(name: str, t) -> None:
    """TypeError unless t is a tensor of a dtype the kernels support."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_dropout_p(dropout_p) -> float:
    """ValueError unless 0 <= dropout_p < 1; returns it as a float."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The dropout seed as a 1-element int64 tensor on `device`, which the kernels load.

    A tensor seed lets a CUDA graph replay a step with fresh dropout bits: the seed is drawn on the
    device by torch's generator (graph-safe) instead of being baked into the kernel's arguments.
    None draws a 63-bit one from torch's generator for that device (on the device, so graph-safe),
    and torch.manual_seed makes runs repeat. Both 32-bit halves of the seed key the generator
    (kernels.dropout), so two draws give the same mask only if all 63 bits agree.
    """
    if seed is None:
        return torch.randint(0, 2**63 - 1, (1,), device=device, dtype=torch.int64)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"a tensor seed must hold one int32/int64 value, got {seed.dtype} of shape {tuple(seed.shape)}")
        want = torch.device(device)
        # "cuda" and "cuda:0" name one device when the index is left out on one side.
        if seed.device.type != want.type or (None not in (seed.device.index, want.index)
                                             and seed.device.index != want.index):
            raise ValueError(f"seed is on {seed.device}, the inputs on {device}")
        return seed.reshape(1).to(torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, a 1-element integer tensor or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)
