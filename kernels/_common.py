"""What the Triton ops share: the device rule, the input checks, the dropout seed, and how an op is
registered with torch.library.

Each op has two paths to its launchers. An eager call (what DDP, fp16, sampling, a CUDA graph's
warm-up and any uncaptured step make) checks its inputs and calls the launchers directly, through a
torch.autograd.Function when a gradient is needed. A traced call (torch.compile, FakeTensorMode,
make_fx: see `traced`) goes through the op registered by `define_op`, which tracers understand.

Every function here but `define_op` runs on every call of an op, so each is written for the hot path:
a few attribute reads and comparisons when the inputs are right; the detailed message is built only
when they are not. This module imports torch only: `kernels` re-exports TritonDeviceError from here
without importing Triton.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # the attention kernels' largest head dim D (GPTConfig checks it without importing Triton)


class TritonDeviceError(RuntimeError):
    """The inputs of a Triton op are on a device where Triton cannot run them in this process.

    Triton compiles for CUDA GPUs; on the CPU it runs only in its interpreter, which is chosen by
    TRITON_INTERPRET=1 in the environment when the kernels are defined (set it before the first
    import of triton). The message names the op and the device and says both ways out.
    """

    __module__ = "kernels"  # raised and caught as kernels.TritonDeviceError


def triton_device_types(kernel) -> frozenset:
    """The torch device types whose tensors `kernel` (a @triton.jit function) can be launched on.

    A compiled kernel runs on CUDA tensors. Under Triton's interpreter the kernel is an
    InterpretedFunction, which runs on the host and copies GPU tensors there and back: CPU and CUDA.
    Decided once per module at import (from the kernel object, so no driver is touched): the hot-path
    check is then one set lookup.
    """
    from triton.runtime.jit import JITFunction

    return frozenset({"cuda"}) if isinstance(kernel, JITFunction) else frozenset({"cpu", "cuda"})


def device_error(caller: str, device, hint: str = "") -> TritonDeviceError:
    """The one error for inputs on a device Triton cannot use; `hint` adds a sentence at the end."""
    return TritonDeviceError(
        f"{caller}: the inputs are on {device}, where Triton cannot run in this process. Put them on a "
        "CUDA GPU, or set TRITON_INTERPRET=1 before the first import of triton to run Triton's "
        f"interpreter on the CPU (slow: for checking the kernels, not for training).{hint}"
    )


def check_float_tensor(name: str, t) -> None:
    """TypeError unless t is a tensor of a dtype the kernels support."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_dropout_p(dropout_p) -> float:
    """ValueError unless 0 <= dropout_p < 1; returns it as a float."""
    if type(dropout_p) is float and 0.0 <= dropout_p < 1.0:  # the hot path: one type test, one compare
        return dropout_p
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def seed_tensor(seed, device: torch.device) -> torch.Tensor:
    """The dropout seed as a (1,) int64 tensor on `device`, which the kernels load.

    A tensor seed lets a CUDA graph replay a step with fresh dropout bits: the seed is drawn on the
    device by torch's generator (graph-safe) instead of being baked into the kernel's arguments. A
    (1,) int64 tensor on the device is used as it is, with no copy and no new tensor: the model
    draws all the seeds of a forward in one call and hands each op a view (model.gpt).
    None draws a 63-bit one from torch's generator for that device (on the device, so graph-safe),
    and torch.manual_seed makes runs repeat. Both 32-bit halves of the seed key the generator
    (kernels.dropout), so two draws give the same mask only if all 63 bits agree.
    """
    if isinstance(seed, torch.Tensor):
        if seed.dtype is torch.int64 and seed.shape == (1,) and seed.device == device:
            return seed  # the hot path
        if seed.numel() != 1 or seed.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"a tensor seed must hold one int32/int64 value, got {seed.dtype} of shape "
                            f"{tuple(seed.shape)}")
        want = torch.device(device)
        # "cuda" and "cuda:0" name one device when the index is left out on one side.
        if seed.device.type != want.type or (None not in (seed.device.index, want.index)
                                             and seed.device.index != want.index):
            raise ValueError(f"seed is on {seed.device}, the inputs on {device}")
        return seed.reshape(1).to(torch.int64)
    if seed is None:
        return torch.randint(0, 2**63 - 1, (1,), device=device, dtype=torch.int64)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, a 1-element integer tensor or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def no_double_backward(caller: str) -> None:
    """Raise in a backward asked for a graph of its own (create_graph=True): the backward kernels are
    not differentiable. once_differentiable's guard, for one test instead of a wrapper's microseconds."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{caller} has no second derivative: its backward kernels are not differentiable "
                           "(create_graph=True)")


def traced() -> bool:
    """Whether this call is being traced rather than run: torch.compile (Dynamo), or a dispatch mode
    such as FakeTensorMode or make_fx's. Traced calls go through the registered op (define_op); eager
    ones call the launchers directly.

    Under Dynamo this is the constant True (is_compiling), so the second test is never traced.
    """
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def launch_meta(kernel, meta: dict) -> tuple[tuple, dict]:
    """A launch's keyword arguments split for `kernel.run(*args, *consts, grid=, warmup=, **options)`.

    consts: the values of the kernel's parameters named in meta (its constexprs, which follow all of
    its runtime parameters) in the kernel's own order, to pass positionally after the runtime
    arguments; options: the rest of meta (num_warps, num_stages, maxnreg). Built once per launch
    configuration by the launchers' caches: a call that spreads a dozen keywords costs about 0.6 us
    more of host time than one that passes them in a tuple (Triton binds either the same way, and so
    do torch's wrap_triton and Triton's interpreter, by the kernel's parameter names).
    """
    names = list(kernel.arg_names)
    params = [name for name in names if name in meta]
    if params != names[len(names) - len(params):]:
        missing = [name for name in names[names.index(params[0]):] if name not in meta]
        raise ValueError(f"{kernel.__name__}: the parameters after {params[0]!r} must all be given with it, "
                         f"to pass them in order: missing {missing}")
    return tuple(meta[name] for name in params), {k: v for k, v in meta.items() if k not in params}


def _traceable(kernel) -> bool:
    """Whether torch can trace launches of `kernel`: torch.library.triton_op and wrap_triton exist
    (torch 2.6 and later) and the kernel is compiled (wrap_triton cannot trace the interpreter's)."""
    from triton.runtime.jit import JITFunction

    has_api = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
    return has_api and isinstance(kernel, JITFunction)


def _no_wrap(kernel):
    """The kernel itself: wrap_triton's stand-in where launches are not traced."""
    return kernel


def op_wrap(kernel):
    """What the registered op's body passes to its launcher as wrap_triton: torch.library.wrap_triton
    where define_op makes a triton_op (so the launches are traced), else the identity."""
    return torch.library.wrap_triton if _traceable(kernel) else _no_wrap


def define_op(name: str, body, fake, kernel):
    """Register `body` (typed: torch.library infers the schema) as the op `name`, for tracers.

    Where _traceable(kernel): a torch.library.triton_op. Its body's launches go through
    torch.library.wrap_triton, so torch.compile sees the Triton kernels themselves (Inductor
    schedules them with the rest of the graph) and the fake implementation is the body run on fake
    tensors. Elsewhere (torch before 2.6; Triton's interpreter): a torch.library.custom_op with `fake`
    as its fake implementation, one opaque node to torch.compile.

    Eager calls do not use the op, whichever it is: measured with the launches stubbed out (CPU,
    torch 2.13, Triton 3.9), attention's forward costs 17.4 us through the triton_op against 4.2 us
    for the launcher called directly, 36.4 us against 10.5 us through a torch.autograd.Function when
    a gradient is needed, and 89 us against 38 us forward and backward. So the public functions call
    the launchers directly, through a plain torch.autograd.Function when a gradient is needed, and
    the op only when traced() (bench/test_bench_host.py has the per-op figures against torch's).
    """
    if _traceable(kernel):
        return torch.library.triton_op(name, body, mutates_args=())
    op = torch.library.custom_op(name, body, mutates_args=())
    op.register_fake(fake)
    return op
