"""The three implementations of the model's ops, chosen by GPTConfig.backend.

Each backend is a namespace of three functions whose leading positional arguments are those of
the Triton ops (the model passes these positionally, and `seed` by name):
  attention(q, k, v, dropout_p, seed=None)   q, k, v (B, T, H, D) -> (B, T, H, D), causal
  layer_norm(x, weight, bias, eps)           -> y
  add_layer_norm(x, residual, weight, bias, eps, dropout_p, seed=None) -> (y, s), s = residual + dropout(x)
and two attributes:
  draws_seeds    whether the model hands its ops their dropout seeds (True for triton only): a
                 (1,) int64 tensor each, all of one forward drawn on the device in one call
  check_device   check_device(device) raises kernels.TritonDeviceError where the ops cannot run

- reference: the seed's math op for op (kernels.reference), the ground truth.
- torch: what a PyTorch user would write instead: F.scaled_dot_product_attention, F.layer_norm.
- triton: our fused kernels (kernels.flash_attention, kernels.layer_norm, kernels.add_layer_norm).
The reference and torch ops draw their dropout masks from torch's generator, as nn.Dropout does;
the model passes them seed=None.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch.nn.functional as F

from kernels import reference

BACKENDS = ("reference", "torch", "triton")


def _torch_attention(q, k, v, dropout_p=0.0, seed=None):
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    out = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=dropout_p, is_causal=True)  # (B, H, T, D)
    return out.transpose(1, 2)  # (B, T, H, D)


def _torch_layer_norm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _torch_add_layer_norm(x, residual, weight, bias, eps=1e-5, dropout_p=0.0, seed=None):
    # training=True: dropout_p is 0.0 in eval mode, where F.dropout returns x as it is. (Not
    # training=dropout_p > 0: under torch.compile dropout_p can be symbolic, and that a SymBool.)
    s = residual + F.dropout(x, dropout_p, training=True)
    return _torch_layer_norm(s, weight, bias, eps), s


def _any_device(device) -> None:
    """The reference and torch ops run wherever torch does."""


def backend_ops(backend: str) -> SimpleNamespace:
    """The op namespace for `backend`; ValueError for an unknown one, ImportError without Triton."""
    if backend == "reference":
        return SimpleNamespace(
            attention=reference.attention,
            layer_norm=reference.layer_norm,
            add_layer_norm=reference.add_layer_norm,
            draws_seeds=False,
            check_device=_any_device,
        )
    if backend == "torch":
        return SimpleNamespace(
            attention=_torch_attention, layer_norm=_torch_layer_norm, add_layer_norm=_torch_add_layer_norm,
            draws_seeds=False, check_device=_any_device,
        )
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise ImportError(
                "backend 'triton' needs the triton package (Linux only); "
                "use backend 'torch' or 'reference' instead"
            ) from None
        from kernels import attention, layernorm
        from kernels._common import device_error

        def check_device(device) -> None:
            if device.type not in attention.DEVICE_TYPES:
                raise device_error("GPT(backend='triton')", device,
                                   " Or build the model with backend='torch', which runs anywhere.")

        return SimpleNamespace(
            attention=attention.flash_attention,
            layer_norm=layernorm.layer_norm,
            add_layer_norm=layernorm.add_layer_norm,
            draws_seeds=True,
            check_device=check_device,
        )
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
