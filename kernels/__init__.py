"""The op library: Triton kernels with plain PyTorch twins in `kernels.reference`.

    flash_attention(q, k, v, ...)              causal attention with dropout      kernels/attention.py
    layer_norm(x, weight, bias, eps)           LayerNorm over the last dimension  kernels/layernorm.py
    add_layer_norm(x, residual, ...)           (layer_norm(s), s), s = residual + dropout(x)

The ops run on a CUDA GPU, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1 set before
the first import of triton); elsewhere they raise TritonDeviceError, which says so.

`import kernels` does not import Triton: `import kernels.reference` works on a machine without it,
and a caller can still choose the interpreter after importing this package. So the three functions
below are stand-ins with the ops' signatures and docstrings (what help(kernels) shows): the first
call of any imports the ops' modules, puts the ops themselves in kernels.<op> and calls its own; a
stand-in kept from before that (`from kernels import layer_norm`) finds its op in a dict on every
later call, about 0.1 us (bench/test_bench_host.py measures an op at several microseconds).
"""

from kernels._common import TritonDeviceError

__all__ = ["flash_attention", "layer_norm", "add_layer_norm", "TritonDeviceError"]

_OPS: dict = {}  # op name -> the op itself, once the ops' modules are imported


def _load_ops() -> dict:
    """Import the ops' modules (and so Triton) and put the ops in the stand-ins' place."""
    global flash_attention, layer_norm, add_layer_norm
    from kernels import attention, layernorm

    flash_attention, layer_norm = attention.flash_attention, layernorm.layer_norm
    add_layer_norm = layernorm.add_layer_norm
    _OPS.update(flash_attention=flash_attention, layer_norm=layer_norm, add_layer_norm=add_layer_norm)
    return _OPS


def flash_attention(q, k, v, dropout_p=0.0, causal=True, softmax_scale=None, seed=None):
    """softmax(q k^T * scale, causal) with dropout on the weights, times v; kernels.reference.attention's twin.

    q (B, Tq, H, D), k and v (B, Tk, H, D): any strides with a unit last one (views into a packed
    (B, T, 3, H, D) projection go in as they are), fp32/fp16/bf16, 1 <= D <= 128, on a CUDA GPU (or
    the CPU under Triton's interpreter; elsewhere kernels.TritonDeviceError says what to do).
    Causal: query i sees keys 0..i. softmax_scale defaults to 1/sqrt(D). dropout_p is applied as the
    nearest multiple of 2^-16 (kernels.dropout.dropout_threshold), and kept weights are scaled by
    1 / (1 - that). seed (int, 1-element int tensor on q's device, or None to draw a 63-bit one from
    torch's generator) picks the dropout mask, see kernels.attention.dropout_keep_mask; it is unused
    when dropout_p == 0. Returns (B, Tq, H, D), contiguous.

    An eager call runs the launchers directly (through a torch.autograd.Function when a gradient is
    needed); a traced one (torch.compile, FakeTensorMode) the registered op triton_gpt::flash_attn_fwd.
    """
    return (_OPS or _load_ops())["flash_attention"](q, k, v, dropout_p, causal, softmax_scale, seed)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """layer_norm over the last dimension of x (..., C); y in x's dtype, weight and bias optional.

    Differentiable in x, weight and bias; dweight/dbias come back in the parameters' dtype.
    On a CUDA GPU (or the CPU under Triton's interpreter; elsewhere kernels.TritonDeviceError).
    """
    return (_OPS or _load_ops())["layer_norm"](x, weight, bias, eps)


def add_layer_norm(x, residual, weight=None, bias=None, eps=1e-5, dropout_p=0.0, seed=None):
    """(y, s) with s = residual + dropout(x) and y = layer_norm(s, weight, bias, eps).

    Dropout drops an element with probability p_eff = round(dropout_p * 65536) / 65536 (dropout_p
    quantized to 1/65536: kernels.dropout.dropout_threshold) and scales the kept ones by
    1 / (1 - p_eff); its bits depend only on seed (an int below 2^63, a 1-element integer tensor on
    x's device, or None to draw one from torch's generator) and the element's (row, col) in x
    viewed as (rows, C): see kernels.layernorm.dropout_keep_mask. On a CUDA GPU (or the CPU under
    Triton's interpreter; elsewhere kernels.TritonDeviceError).
    """
    return (_OPS or _load_ops())["add_layer_norm"](x, residual, weight, bias, eps, dropout_p, seed)


# The ops' docstrings live here only: kernels.attention and kernels.layernorm give their functions
# these texts (help() on either shows the same), so the two cannot drift apart.
_DOCS = {f.__name__: f.__doc__ for f in (flash_attention, layer_norm, add_layer_norm)}
