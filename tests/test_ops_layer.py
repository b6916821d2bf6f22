"""The ops' Python layer: what an eager call runs, how tracers see the ops, the device error, help(kernels).

These check structure, never speed (the host time per call is measured by bench/test_bench_host.py):
an eager call allocates its outputs and nothing else, goes through no dispatcher op, and draws no
seed when it is handed one; the model draws all the dropout seeds of a forward in one call; a traced
call (torch.compile, FakeTensorMode) goes through the registered op, and torch.compile sees the
Triton kernels inside it; a device Triton cannot use gets one error that says what to do.

Tests that need Triton without its interpreter (which conftest.py turns on for this process) run a
script in a subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernels
from model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (compiled kernels under Inductor)")


def _run_python(code: str, interpret: bool = False) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter at the repo root, without TRITON_INTERPRET unless asked."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def _last_json(proc: subprocess.CompletedProcess):
    report = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{report}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the eager path


@pytest.fixture
def no_launches(monkeypatch):
    """Triton launches do nothing: what is left of a call is the ops' Python layer."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def no_launch(self, *args, grid, warmup, **kwargs):
        return None

    monkeypatch.setattr(JITFunction, "run", no_launch)
    monkeypatch.setattr(InterpretedFunction, "run", no_launch)


def _aten_calls(fn) -> list[str]:
    """The aten ops fn runs, outermost only (an empty_like, not also the empty it calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    calls = []
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith(("aten::", "triton_gpt::")) and not (parent and parent.name.startswith("aten::")):
            calls.append(e.name)
    return calls


def _qkv(requires_grad):
    return [torch.randn(1, 8, 2, 16).requires_grad_(requires_grad) for _ in range(3)]  # (B, T, H, D) each


def _ln_inputs(requires_grad):
    return [torch.randn(*shape).requires_grad_(requires_grad) for shape in ((2, 3, 8), (2, 3, 8), (8,), (8,))]


SEED = torch.tensor([7])  # what the model hands an op: a (1,) int64 tensor on the inputs' device
# op -> (call on fresh inputs, its inputs, what the forward allocates without and with a gradient,
# what the backward allocates). Each allocation is an output, or a kernel's workspace.
EAGER_CASES = {
    "flash_attention": (lambda t: kernels.flash_attention(*t, 0.2, seed=SEED), _qkv,
                        ["aten::empty_like"],  # o
                        ["aten::empty_like", "aten::new_empty"],  # o, lse
                        ["aten::empty_like"] * 3 + ["aten::new_empty"]),  # dq, dk, dv, delta (dQ's kernel writes it)
    "layer_norm": (lambda t: kernels.layer_norm(t[0], *t[2:]), _ln_inputs,
                   ["aten::empty_like"],  # y
                   ["aten::empty_like", "aten::new_empty", "aten::new_empty"],  # y, mean, rstd
                   ["aten::empty_like"] * 3 + ["aten::new_empty"]),  # dx, dweight, dbias, partial sums
    "add_layer_norm": (lambda t: kernels.add_layer_norm(*t, 1e-5, 0.2, SEED), _ln_inputs,
                       ["aten::empty_like"] * 2,  # y, s
                       ["aten::empty_like"] * 2 + ["aten::new_empty"] * 2,  # y, s, mean, rstd
                       ["aten::empty_like"] * 4 + ["aten::new_empty"]),  # dx, dresidual, dweight, dbias, partials
}


def _leaves(op, inputs):
    return [inputs[0], *inputs[2:]] if op == "layer_norm" else inputs


@pytest.mark.parametrize("op", EAGER_CASES)
def test_an_eager_call_allocates_its_outputs_only(op, no_launches):
    """Forward and backward run no dispatcher op (triton_gpt::...) and no aten op but the allocation
    of their outputs (and of a kernel's workspace): no copy of the seed, no view, no empty stand-in
    for an absent output. Triton's launches are stubbed out (the interpreter's launch is not ours)."""
    call, make_inputs, fwd, fwd_grad, bwd = EAGER_CASES[op]
    inputs = make_inputs(False)
    assert _aten_calls(lambda: call(inputs)) == fwd
    inputs = make_inputs(True)
    out = []
    assert _aten_calls(lambda: out.append(call(inputs))) == fwd_grad
    outs = out[0] if isinstance(out[0], tuple) else (out[0],)
    grads = [torch.ones_like(o) for o in outs]
    assert _aten_calls(lambda: torch.autograd.grad(outs, _leaves(op, inputs), grads)) == bwd


def test_launch_meta_passes_the_constexprs_in_the_kernels_order():
    """The launchers' cached split of a launch's keywords: the kernel's trailing parameters in its own
    order (whatever order the dict was written in), the rest as options; a parameter left out of the
    middle is refused rather than shifted into another's place."""
    from kernels import attention, layernorm
    from kernels._common import launch_meta

    kernel = layernorm._ln_bwd_reduce_kernel  # (partial_ptr, dw_ptr, db_ptr, n_progs, n_cols, HAS_WEIGHT, ...)
    consts, options = launch_meta(kernel, dict(BLOCK_N=64, num_warps=4, HAS_BIAS=False, BLOCK_P=32, HAS_WEIGHT=True))
    assert consts == (True, False, 32, 64) and options == {"num_warps": 4}
    with pytest.raises(ValueError, match="BLOCK_P"):
        launch_meta(kernel, dict(HAS_WEIGHT=True, HAS_BIAS=False, BLOCK_N=64))
    # Every launcher's cached split names each trailing parameter of its kernel once.
    cfg = layernorm._config(384)
    for kernel, (consts, options) in [
        (layernorm._ln_fwd_kernel, layernorm._fwd_meta(cfg, 384, torch.bfloat16, True, True, True, True, True)),
        (layernorm._ln_bwd_kernel, layernorm._bwd_meta(cfg, 384, 2, True, True, True, True)),
        (attention._attn_fwd_kernel, attention._fwd_meta(attention._Config(64, 64, 4, 2), True, True, True, 64,
                                                         torch.bfloat16)),
    ]:
        names = kernel.arg_names[len(kernel.arg_names) - len(consts):]
        assert all(name.isupper() for name in names) and not set(names) & set(options), (kernel.__name__, names)


@pytest.mark.parametrize("op", EAGER_CASES)
def test_double_backward_is_refused(op):
    """The backward kernels are not differentiable: create_graph=True says so instead of returning
    gradients that silently lack a graph of their own."""
    call, make_inputs, *_ = EAGER_CASES[op]
    inputs = make_inputs(True)
    out = call(inputs)
    out = out[0] if isinstance(out, tuple) else out
    with pytest.raises(RuntimeError, match=f"kernels.{op} has no second derivative"):
        torch.autograd.grad(out.sum(), inputs[0], create_graph=True)


def _count_calls(monkeypatch, module, name):
    """Spy on module.name: the list of the positional arguments of each call."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("op", ["flash_attention", "add_layer_norm"])
def test_a_seed_tensor_is_used_as_it_is(op, monkeypatch):
    """Handed a (1,) int64 seed on the device, an op draws nothing and hands that very tensor to its
    launcher; with seed=None it draws one (so the spy would have seen a draw)."""
    import kernels.attention as attention
    import kernels.layernorm as layernorm

    draws = _count_calls(monkeypatch, torch, "randint")
    launches = _count_calls(monkeypatch, *((attention, "_attn_forward") if op == "flash_attention"
                                           else (layernorm, "_ln_forward")))
    call, make_inputs, *_ = EAGER_CASES[op]
    call(make_inputs(False))
    assert draws == [] and launches[-1][6] is SEED
    inputs = make_inputs(False)
    kernels.flash_attention(*inputs, 0.2) if op == "flash_attention" else kernels.add_layer_norm(*inputs, 1e-5, 0.2)
    assert len(draws) == 1


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_model_draws_the_dropout_seeds_of_a_forward_in_one_call(training, monkeypatch):
    """Training: one torch.randint for the 3 n_layer dropout calls of a forward (n_layer attention,
    2 n_layer add-and-norm), each handed its own (1,) view of that draw. Eval: no draw at all."""
    import kernels.attention as attention
    import kernels.layernorm as layernorm

    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_embd=32, n_head=2, n_layer=2, dropout=0.1,
                          backend="triton")).train(training)
    idx = torch.randint(0, 11, (2, 8))
    draws = _count_calls(monkeypatch, torch, "randint")
    attn_calls = _count_calls(monkeypatch, attention, "_attn_forward")
    ln_calls = _count_calls(monkeypatch, layernorm, "_ln_forward")
    model(idx, idx)
    assert len(draws) == (1 if training else 0)
    # Every call but block 0's ln1, a plain layer_norm (no residual, no dropout).
    seeds = [a[6] for a in attn_calls] + [a[6] for a in ln_calls if a[1] is not None]
    assert len(seeds) == 3 * 2
    if training:
        assert all(s.shape == (1,) and s.dtype == torch.int64 for s in seeds)
        assert all(s._base is seeds[0]._base is not None for s in seeds), "views of one draw"
        assert len({s.storage_offset() for s in seeds}) == len(seeds), "each op its own seed"
        # 16-byte aligned as a fresh tensor is, so Triton compiles one variant of each dropout kernel.
        assert all(s.data_ptr() % 16 == 0 for s in seeds), [s.data_ptr() % 16 for s in seeds]
    else:
        assert seeds == [None] * 6


@pytest.mark.parametrize("op", EAGER_CASES)
def test_traced_calls_go_through_the_registered_op(op):
    """Under FakeTensorMode (as torch.compile and make_fx trace) the eager path would launch a kernel
    on fake tensors; the registered op's fake implementation gives the outputs' shapes instead."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    call, make_inputs, *_ = EAGER_CASES[op]
    real = make_inputs(True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        inputs = [mode.from_tensor(t) for t in real]
        out = call(inputs)
    for o in out if isinstance(out, tuple) else (out,):
        assert type(o).__name__ == "FakeTensor" and o.shape == real[0].shape and o.requires_grad


# ----------------------------------------------------------------------------- torch.compile


_COMPILE_SCRIPT = """
import json
import torch
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

import kernels
from kernels import attention, layernorm
from bench.compile_check import OfflineDriver

if not hasattr(torch.library, "triton_op"):
    print(json.dumps({"skip": f"torch {torch.__version__} has no torch.library.triton_op"}))
    raise SystemExit
# No GPU here: Triton's front end (which torch runs to find what each kernel writes) gets an sm_90
# target from a stand-in driver, and the launches the traced graph makes do nothing.
driver.set_active(OfflineDriver())
JITFunction.run = lambda self, *args, grid, warmup, **kwargs: None
for module in (attention, layernorm):
    if hasattr(module, "DEVICE_TYPES"):
        module.DEVICE_TYPES = frozenset({"cpu"})

from torch._dynamo.backends.common import aot_autograd

seed = torch.tensor([5])
w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)  # (C,) each
def f(x, r):
    q, k, v = x.unbind(2)  # (B, T, H, D) each
    a = kernels.flash_attention(q, k, v, 0.2, seed=seed)  # (B, T, H, D)
    y, s = kernels.add_layer_norm(a, r, w, b, 1e-5, 0.2, seed)  # over D; (B, T, H, D) each
    return (kernels.layer_norm(y, w, b) * s).sum()

found = {}
for dynamic in (False, True):  # True: symbolic B, T, H reach the launchers
    graphs = []
    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm
    torch._dynamo.reset()
    x = torch.randn(2, 13, 3, 3, 16, requires_grad=True)  # (B, T, 3, H, D)
    r = torch.randn(2, 13, 3, 16, requires_grad=True)  # (B, T, H, D)
    compiled = torch.compile(f, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True,
                             dynamic=dynamic)
    compiled(x, r).backward()
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function":
                name = str(node.target)
                if "triton_kernel_wrapper" in name:
                    side_table = torch._higher_order_ops.triton_kernel_wrap.kernel_side_table
                    kernel = side_table.get_kernel(node.kwargs["kernel_idx"])
                    name = getattr(kernel, "fn", kernel).__name__  # an Autotuner holds launch options
                key = f"{name} dynamic={dynamic}"
                found[key] = found.get(key, 0) + 1
import torch._library.triton as T
for op in ("triton_gpt::flash_attn_fwd", "triton_gpt::flash_attn_bwd", "triton_gpt::layer_norm_fwd",
           "triton_gpt::layer_norm_bwd"):
    found[op + " kernels"] = sorted(k.__name__ for k in T.get_triton_kernels_for_op(op))
print(json.dumps(found))
"""


def test_torch_compile_sees_the_triton_kernels():
    """With compiled kernels and torch.library.triton_op, the graphs torch.compile hands its backend
    hold the Triton kernels themselves (Inductor can schedule them), not an opaque custom op; and
    torch finds the kernels behind each op (its caches key on their source)."""
    found = _last_json(_run_python(_COMPILE_SCRIPT))
    if "skip" in found:
        pytest.skip(found["skip"])
    assert not any(name.startswith("triton_gpt") for name in found if not name.endswith("kernels")), found
    launches = {"_attn_fwd_kernel": 1, "_attn_bwd_dq_kernel": 1, "_attn_bwd_dkdv_kernel": 1, "_ln_fwd_kernel": 2,
                "_ln_bwd_kernel": 2, "_ln_bwd_reduce_kernel": 2}
    for dynamic in (False, True):
        for kernel, n in launches.items():
            assert found.get(f"{kernel} dynamic={dynamic}") == n, (kernel, dynamic, found)
    assert found["triton_gpt::flash_attn_fwd kernels"] == ["_attn_fwd_kernel"]
    assert found["triton_gpt::flash_attn_bwd kernels"] == ["_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"]
    assert found["triton_gpt::layer_norm_fwd kernels"] == ["_ln_fwd_kernel"]
    assert found["triton_gpt::layer_norm_bwd kernels"] == ["_ln_bwd_kernel", "_ln_bwd_reduce_kernel"]


@requires_cuda
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_inductor_compiles_the_ops_and_matches_eager(dynamic):
    """torch.compile with Inductor, fullgraph: the kernels inside the graph give eager's values and
    gradients (dynamic: symbolic B, T, H reach the launchers)."""
    torch._dynamo.reset()
    device = torch.device("cuda")
    seed = torch.tensor([5], device=device)
    qkv = torch.randn(2, 33, 3, 2, 16, device=device, requires_grad=True)  # (B, T, 3, H, D)
    r = torch.randn(2, 33, 2, 16, device=device, requires_grad=True)  # (B, T, H, D)
    w = torch.randn(16, device=device, requires_grad=True)  # (C,)

    def f(qkv, r):
        q, k, v = qkv.unbind(2)
        a = kernels.flash_attention(q, k, v, dropout_p=0.2, seed=seed)  # (B, T, H, D)
        y, s = kernels.add_layer_norm(a, r, w, None, 1e-5, 0.2, seed)  # over D
        return (kernels.layer_norm(y, w) * s).square().sum()

    got = torch.compile(f, fullgraph=True, dynamic=dynamic)(qkv, r)
    got.backward()
    grads = [t.grad.clone() for t in (qkv, r, w)]
    qkv.grad = r.grad = w.grad = None
    want = f(qkv, r)
    want.backward()
    torch.testing.assert_close(got, want)
    for name, g, t in zip(("dqkv", "dresidual", "dweight"), grads, (qkv, r, w)):
        torch.testing.assert_close(g, t.grad, msg=lambda m, name=name: f"{name}: {m}")
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- the device error


_DEVICE_SCRIPT = """
import json
import torch
import kernels
from model import GPT, GPTConfig

x = torch.randn(2, 8, 2, 16)  # (B, T, H, D)
calls = {
    "flash_attention": lambda: kernels.flash_attention(x, x, x),
    "layer_norm": lambda: kernels.layer_norm(x),
    "add_layer_norm": lambda: kernels.add_layer_norm(x, x),
    "GPT": lambda: GPT(GPTConfig(vocab_size=11, block_size=8, n_embd=32, n_head=2, n_layer=1,
                                 backend="triton"))(torch.zeros(1, 4, dtype=torch.long)),
}
out = {}
for name, call in calls.items():
    try:
        call()
        out[name] = None
    except Exception as e:
        out[name] = [type(e).__name__, isinstance(e, kernels.TritonDeviceError), isinstance(e, RuntimeError), str(e)]
print(json.dumps(out))
"""


def test_a_device_triton_cannot_use_gets_one_clear_error():
    """CPU inputs without the interpreter: kernels.TritonDeviceError (a RuntimeError) naming
    the op and the device and both ways out, from each op and from the model's forward; the model is
    built on the CPU as usual (it is moved to the GPU after). With a GPU too: CPU inputs are refused."""
    out = _last_json(_run_python(_DEVICE_SCRIPT))
    for name, got in out.items():
        assert got is not None, f"{name} ran on the CPU without the interpreter"
        kind, is_ours, is_runtime, message = got
        assert is_ours and is_runtime, f"{name} raised {kind}: {message}"
        assert "the inputs are on cpu, where Triton cannot run" in message, message
        assert "CUDA GPU" in message and "TRITON_INTERPRET=1 before the first import of triton" in message, message
    assert out["flash_attention"][3].startswith("kernels.flash_attention: ")
    assert out["layer_norm"][3].startswith("kernels.layer_norm: ")
    assert out["GPT"][3].startswith("GPT(backend='triton'): ") and "backend='torch'" in out["GPT"][3]


# ----------------------------------------------------------------------------- help(kernels)


_HELP_SCRIPT = """
import inspect, json, pydoc, sys
import kernels
out = {"triton_imported": "triton" in sys.modules}
out["text"] = pydoc.render_doc(kernels, renderer=pydoc.plaintext)
out["triton_imported_by_help"] = "triton" in sys.modules
names = ("flash_attention", "layer_norm", "add_layer_norm")
stand_ins = {name: getattr(kernels, name) for name in names}
from kernels import attention, layernorm  # now Triton
for name, stand_in in stand_ins.items():
    op = getattr(attention if name == "flash_attention" else layernorm, name)
    out[name] = {"stand_in": [str(inspect.signature(stand_in)), inspect.getdoc(stand_in)],
                 "op": [str(inspect.signature(op)), inspect.getdoc(op)]}
print(json.dumps(out))
"""


def test_help_shows_the_ops_without_importing_triton():
    """help(kernels) lists each op with its full signature and docstring, and neither it nor
    `import kernels` imports Triton. The stand-ins it shows say what the ops themselves say."""
    out = _last_json(_run_python(_HELP_SCRIPT))
    assert not out["triton_imported"], "import kernels imported triton"
    assert not out["triton_imported_by_help"], "help(kernels) imported triton"
    for name in ("flash_attention", "layer_norm", "add_layer_norm"):
        signature, doc = out[name]["op"]
        assert out[name]["stand_in"] == [signature, doc], f"kernels.{name} and the op itself disagree"
        assert f"{name}{signature}" in out["text"], f"{name}'s signature is not in help(kernels)"
        assert doc.splitlines()[0] in out["text"], f"{name}'s docstring is not in help(kernels)"
    assert "class TritonDeviceError(builtins.RuntimeError)" in out["text"]


_STAND_IN_SCRIPT = """
import json
import torch
from kernels import flash_attention as stand_in  # before any call: the stand-in
import kernels
from kernels import attention

q = torch.randn(1, 8, 2, 16)
first = stand_in(q, q, q, 0.2, seed=3)
rebound = kernels.flash_attention is attention.flash_attention
again = stand_in(q, q, q, 0.2, seed=3)
same = torch.equal(first, attention.flash_attention(q, q, q, 0.2, seed=3)) and torch.equal(first, again)
print(json.dumps({"rebound": rebound, "stand_in_kept": stand_in is not attention.flash_attention, "same": same}))
"""


def test_a_stand_in_calls_the_op_and_the_first_call_rebinds_it():
    out = _last_json(_run_python(_STAND_IN_SCRIPT, interpret=True))
    assert out == {"rebound": True, "stand_in_kept": True, "same": True}
