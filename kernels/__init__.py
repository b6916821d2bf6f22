"""The op library: Triton kernels with plain PyTorch twins in `kernels.reference`.

The Triton ops are imported on first use, so `import kernels.reference` works on a machine without
Triton (and before a caller has chosen whether Triton runs in its interpreter).
"""

__all__ = ["flash_attention", "layer_norm", "add_layer_norm"]


def __getattr__(name):
    if name == "flash_attention":
        from kernels.attention import flash_attention

        return flash_attention
    if name in ("layer_norm", "add_layer_norm"):
        from kernels import layernorm

        return getattr(layernorm, name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
