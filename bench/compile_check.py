"""Compile every Triton kernel variant our launchers can launch for an H100 (sm_90), without a GPU.

    python bench/compile_check.py                 # the full grid (~1200 variants, ~10 min on 2 cores)
    python bench/compile_check.py --quick         # every kernel, fp32 and bf16, flags all off / all on
    python bench/compile_check.py --only attention --kernel dkdv -j 8
    python bench/compile_check.py --list          # the variants, without compiling
    python bench/compile_check.py --cost --json cost.json --dump-dir sass/   # the static cost report

Triton compiles ahead of time without a driver: Triton IR -> TTGIR -> LLVM IR -> PTX -> cubin, the
last step by the ptxas that ships in the triton wheel (Triton 3.6 runs its CUDA 12.8 ptxas for
sm_90, 3.9 its CUDA 13 "ptxas-blackwell"). This script runs that whole pipeline for
GPUTarget("cuda", 90, 32), the target an H100 reports, with whichever Triton is installed (the GPU
machine has 3.6, the CPU machines 3.9; run it under each, from the repository root; with another
virtual environment set PYTHONPATH to the root).

How the variants are found, so they are the ones a real run would compile:

1. Capture. `JITFunction.run` (what `kernel[grid](...)` calls) is replaced by a recorder, and the
   real private launchers (`_attn_forward`, `_attn_backward`, `_ln_forward`, `_ln_backward`) and the
   public `dropout_keep_mask` functions are called on CPU tensors, over dtypes, head dims, widths,
   every flag combination a launcher can derive, and a few shape profiles. Each launch is recorded
   with its exact arguments, constexprs, num_warps and num_stages; tensors are then replaced by
   stand-ins that keep only their dtype and address (all Triton reads from a tensor), so memory stays
   small.
2. Deduplicate on Triton's own specialization key: argument types, 16-divisibility of ints and
   pointers, ints equal to 1 and None arguments become constexprs, exactly as on the GPU.
3. Compile. A stand-in driver reports device 0 and GPUTarget("cuda", 90, 32), and the original
   `JITFunction.run` is called with warmup=True: Triton's own code path up to the launch, with no
   launch. The compiled kernel gives the shared memory Triton will request at launch; ptxas's -v log
   (or cuobjdump on a cached cubin) gives registers, stack frame and spills.

A variant FAILs when it does not compile, when its shared memory exceeds what one H100 block may use
(227 KB; the launch would raise OutOfResources), or when its registers leave too few for num_warps.
Spills are reported (the summary counts them) but are not failures.

The static cost report (--cost), a measure of the kernels that runs without a GPU and is deterministic
(same Triton, same kernels, same numbers). It compiles the model's training calls at the model's
shapes (attention bf16 (B, T, H, D) = (64, 256, 6, 64), causal: the forward with dropout 0.2 and lse,
with lse at dropout 0, and without lse (eval); the backward (dQ, whose kernel also computes delta,
then dK/dV) at dropout 0.2 and 0. LayerNorm over (16384, 384) bf16 with fp32 weight and bias, as under autocast: layer_norm
and add_layer_norm forward (stats saved; the latter with and without dropout) and the backward with
the flags the model uses, and the kernel that sums the dweight/dbias partials)
and reads each variant's SASS (cuobjdump -sass, from Triton's package):

- registers, spill bytes (ptxas -v), shared memory (what the launch requests), block, warps, stages;
- HGMMA: every tl.dot became a warpgroup MMA: as many ttng.warp_group_dot in the TTGIR as tt.dot in
  the TTIR, and HGMMA in the SASS. "-" for a kernel without dots or with fp32 "ieee" dots only (the
  exact FMA path, no tensor cores by design);
- memory instructions, static counts: LDG and STG by width in bits (128 is a 16-byte vector access;
  per-row scalars such as lse or mean are 32 by nature), LDGSTS (cp.async) and TMA, LDL/STL (local
  memory: spills or a stack array);
- loops: a backward branch (a BRA whose target lies before it) closes a loop whose body runs from the
  target to the branch (several back edges to one target: to the last). A nested loop is counted on
  its own and left out of the loop around it. The branch to itself that ends every kernel (a trap
  after EXIT) and the padding after it are not code. Everything outside the loops is straight-line
  code (set-up, the pipeline's prologue loads, the epilogue), counted once per program. Both sides of
  an if are counted, as if both ran: an upper bound for code outside the loops, and for loop bodies
  with branches inside them;
- warp-instructions a launch issues: for every program of the launch's grid, the straight-line code
  once plus each loop body times its trip count in that program (TRIP_MODELS, below: causal structure
  included), times the warps of a program; and the issue-bound time, warp-instructions /
  (132 SMs x 4 schedulers x 1.755 GHz), a floor that ignores memory and latency.

Then per call (a launcher call: the backward is three launches) the sums, their total over one
training step (STEP_CALLS), and issues 10 and 11's static targets as ratios. --json writes one record per variant (kernel, variant, regs, smem,
spill_bytes, hgmma, loop_instructions, trips, straight_instructions, programs, warp_instructions,
issue_us, and more); --dump-dir keeps each variant's ttir, ttgir, ptx, cubin and sass. --quick with
--cost: the calls with dropout only, one variant of each kernel (the test).

When a kernel's loops change (a loop added, removed, split, or new bounds), change its function in
TRIP_MODELS (below, "Trip-count models") in the same commit: it returns, for one program, the trips
of each SASS loop in SASS (address) order. ptxas lays these kernels' sequential loops out in the
order they run (dK/dV's masked loop, first in its source, is first in its SASS); to check, read the
dumped .sass, or the records' loop_inf_selects (selects of -inf per loop: the causally masked loops
have them). A new kernel needs an entry too. A model that gives another number of loops than the
SASS has is an error: the report names it and leaves the warp-instructions unknown.

Exit status: 0 all variants compile (and with --cost, every cost is known); 1 at least one FAIL (or
a cost left unknown: a kernel without a trip-count model, or one whose loops changed); 77
compilation cannot run here (no CUDA backend or no ptxas in this Triton), so a test can skip.
TRITON_INTERPRET is removed from the environment before triton is imported: under the interpreter
@triton.jit gives interpreted functions, which cannot be compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EXIT_UNAVAILABLE = 77
SM90_MAX_SHARED = 232448  # bytes of shared memory one block may use on an H100 (227 KB, opt-in)
SM90_REGS_PER_BLOCK = 65536
TARGET_ARCH, WARP_SIZE = 90, 32

DTYPES = ("fp32", "fp16", "bf16")
ATTN_HEAD_DIMS = (16, 32, 40, 64, 128)  # 40 is padded to BLOCK_D = 64
LN_WIDTHS = (33, 384, 1000, 1024, 4097, 8192)
DROPOUT_P = 0.1
SEED = 1234


# ------------------------------------------------------------------------------------------------
# Capture: what each launch passes to kernel[grid](...)
# ------------------------------------------------------------------------------------------------

class _Ptr:
    """A tensor as Triton's specialization sees it: a dtype and an address (for its alignment)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = t.data_ptr()

    def data_ptr(self):
        return self._ptr


def _strip(value):
    import torch
    return _Ptr(value) if isinstance(value, torch.Tensor) else value


@dataclass
class Launch:
    kernel: str  # e.g. "_attn_fwd_kernel"
    group: str  # "attention" or "layernorm"
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    label: str = ""  # the first case that made this launch
    key: str = ""
    grid: tuple = (1, 1, 1)  # programs along each axis, as the launcher asked (--cost)
    call: str = ""  # the launcher call that made it (--cost: summed per call)


class Recorder:
    """Replaces JITFunction.run while launchers run; records each launch with the current case."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.group = ""
        self.case = ""
        self.call = ""

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.jit import JITFunction
        original = JITFunction.run
        recorder = self

        def record(fn, *args, grid, warmup, **kwargs):
            # Constexprs passed positionally (kernels._common.launch_meta) are recorded by name, as
            # the report and the trip models read them.
            n_runtime = min(len(args), len(fn.arg_names) - len(fn.constexprs))
            kwargs = {**dict(zip(fn.arg_names[n_runtime:], args[n_runtime:])), **kwargs}
            args = args[:n_runtime]
            recorder.launches.append(Launch(
                kernel=fn.__name__, group=recorder.group, fn=fn,
                args=tuple(_strip(a) for a in args), kwargs={k: _strip(v) for k, v in kwargs.items()},
                label=recorder.case, grid=_grid3(fn, grid, args, kwargs), call=recorder.call))
            return None

        JITFunction.run = record
        self.original_run = original  # what a stand-in that must compile for real calls
        try:
            yield self
        finally:
            JITFunction.run = original


def _grid3(fn, grid, args, kwargs) -> tuple:
    """The launch grid as three ints; a callable grid gets the arguments by name, as Triton gives them."""
    if callable(grid):
        grid = grid({**dict(zip(fn.arg_names, args)), **kwargs})
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# Shape profiles. Shapes matter only through Triton's specialization of integer arguments (a value of
# 1 becomes a constexpr, a multiple of 16 gets a divisibility hint) and of pointers (16-byte aligned).
# B never reaches a kernel (only the grid), so B = 1 loses nothing.
ATTN_PROFILES = {
    # The model's call: q, k, v strided views into one packed (B, T, 3, H, D) projection, T = 256, H = 6.
    "model": dict(T=256, H=6, packed=True),
    # Ragged T (not a multiple of 16 or of any block) with separate contiguous (B, T, H, D) tensors.
    "ragged": dict(T=77, H=3, packed=False),
    # Sampling from a one-token prompt with one head: T_Q = T_K = H = 1 become constexprs.
    "t1": dict(T=1, H=1, packed=True),
}
LN_PROFILES = {"model": 64, "ragged": 7, "t1": 1}  # rows (B * T) of the (rows, C) view


@dataclass
class Plan:
    """One block of the enumeration: the cartesian product of its fields.

    all_flags: every flag combination the launchers can derive; otherwise only all-off and all-on.
    mixed_params (layer norm): also fp32 weight and bias with fp16/bf16 x, as autocast training has.
    """
    profiles: tuple
    dtypes: tuple
    sizes: tuple  # head dims (attention) or widths C (layer norm)
    all_flags: bool = True
    mixed_params: bool = False


# The full check: the brief's grid on the model's shapes, and the awkward shapes on a smaller grid
# (one precision path each: fp32 exact FMA dots with no pipelining, bf16 wgmma with pipelining).
FULL_PLANS = {
    "attention": [Plan(("model",), DTYPES, ATTN_HEAD_DIMS),
                  Plan(("ragged", "t1"), ("fp32", "bf16"), (40,))],
    "layernorm": [Plan(("model",), DTYPES, LN_WIDTHS, mixed_params=True),
                  Plan(("ragged", "t1"), ("fp32", "bf16"), (33, 8192), all_flags=False)],
}
# Every kernel, once per precision path with every flag off and with every flag on (the test).
QUICK_PLANS = {
    "attention": [Plan(("model",), ("fp32", "bf16"), (40,), all_flags=False)],
    "layernorm": [Plan(("model",), ("fp32", "bf16"), (33, 8192), all_flags=False)],
}


def _attn_qkv(prof, dtype, D):
    import torch
    T, H = prof["T"], prof["H"]
    if prof["packed"]:
        qkv = torch.empty((1, T, 3, H, D), dtype=dtype)  # (B, T, 3, H, D)
        return qkv.unbind(2)  # each (B, T, H, D), strided
    return tuple(torch.empty((1, T, H, D), dtype=dtype) for _ in range(3))  # (B, T, H, D) each


def _attn_label(dname, D, causal, dropout, lse, pname) -> str:
    """The case's words, e.g. 'bf16 D=64 causal dropout lse [model]' (lse: the forward stores it)."""
    return (f"{dname} D={D} {'causal ' if causal else ''}{'dropout ' if dropout else ''}"
            f"{'lse ' if lse else ''}[{pname}]")


def _attn_forward_call(q, k, v, causal, p, need_lse, seed_t):
    from kernels import attention as A
    A._attn_forward(q, k, v, p, causal, q.shape[-1] ** -0.5, seed_t if p else None, need_lse)


def _attn_backward_call(q, k, v, causal, p, seed_t):
    import torch
    from kernels import attention as A
    # What _attn_forward returns with need_lse (made here, so no extra forward is recorded).
    o = torch.empty(q.shape, dtype=q.dtype)  # (B, T, H, D), contiguous
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)  # (B, H, T)
    A._attn_backward(torch.empty_like(o), q, k, v, o, lse, p, causal, q.shape[-1] ** -0.5,
                     seed_t if p else None)


def capture_attention(rec: Recorder, plan: Plan):
    """The launches the attention launchers make: forward over causal x dropout x need_lse (lse is
    stored only when a gradient is needed), backward over causal x dropout (it always has lse), and
    the dropout-mask kernel of dropout_keep_mask."""
    import torch
    from kernels import attention as A
    from kernels._common import seed_tensor

    rec.group = "attention"
    cpu = torch.device("cpu")
    fwd_flags = [(c, d, s) for c in (False, True) for d in (False, True) for s in (False, True)]
    bwd_flags = [(c, d) for c in (False, True) for d in (False, True)]
    if not plan.all_flags:
        fwd_flags, bwd_flags = [(False,) * 3, (True,) * 3], [(False,) * 2, (True,) * 2]
    for pname in plan.profiles:
        prof = ATTN_PROFILES[pname]
        for dname in plan.dtypes:
            dtype = _torch_dtype(dname)
            for D in plan.sizes:
                q, k, v = _attn_qkv(prof, dtype, D)
                seed_t = seed_tensor(SEED, cpu)
                for causal, dropout, need_lse in fwd_flags:
                    rec.case = _attn_label(dname, D, causal, dropout, need_lse, pname)
                    _attn_forward_call(q, k, v, causal, DROPOUT_P if dropout else 0.0, need_lse, seed_t)
                for causal, dropout in bwd_flags:
                    rec.case = _attn_label(dname, D, causal, dropout, False, pname)
                    _attn_backward_call(q, k, v, causal, DROPOUT_P if dropout else 0.0, seed_t)
        rec.case = f"[{pname}]"
        A.dropout_keep_mask(SEED, 1, prof["H"], prof["T"], prof["T"], DROPOUT_P, cpu)


def _ln_fwd_label(dname, pdname, C, has_w, has_b, mode, save_stats, pname) -> str:
    """e.g. 'x=bf16 w,b=fp32 C=384 weight bias residual+dropout stats [model]'."""
    return (f"x={dname}{' w,b=' + pdname if pdname != dname else ''} C={C} "
            f"{'weight ' if has_w else ''}{'bias ' if has_b else ''}"
            f"{'' if mode == 'plain' else mode + ' '}{'stats ' if save_stats else ''}[{pname}]")


def _ln_bwd_label(dname, pdname, C, has_w, has_b, dropout, has_ds, pname) -> str:
    """e.g. 'x=bf16 w,b=fp32 C=384 weight bias dropout ds [model]' (ds: a gradient reaches s)."""
    return (f"x={dname}{' w,b=' + pdname if pdname != dname else ''} C={C} "
            f"{'weight ' if has_w else ''}{'bias ' if has_b else ''}"
            f"{'dropout ' if dropout else ''}{'ds ' if has_ds else ''}[{pname}]")


def _ln_forward_call(x, res, w, b, mode, p, save_stats, seed_t):
    """mode: 'plain' (layer_norm), 'residual' or 'residual+dropout' (add_layer_norm, dropout p)."""
    from kernels import layernorm as L
    p = p if mode.endswith("dropout") else 0.0
    L._ln_forward(x, None if mode == "plain" else res, w, b, 1e-5, p, seed_t if p else None, save_stats)


def _ln_backward_call(x, res, w, b, p, has_ds, seed_t):
    import torch
    from kernels import layernorm as L
    mean = torch.empty(x.shape[0], dtype=torch.float32)  # (rows,)
    rstd = torch.empty(x.shape[0], dtype=torch.float32)  # (rows,)
    L._ln_backward(torch.empty_like(x), res if has_ds else None, x, w, b, mean, rstd, p, seed_t if p else None)


def capture_layernorm(rec: Recorder, plan: Plan):
    """The launches the layer-norm launchers make.

    Forward: layer_norm (no residual, no dropout) and add_layer_norm (a residual, with or without
    dropout), weight and bias each present or None, stats saved or not (saved when a gradient is
    needed). Backward: weight and bias present or None, dropout or not, a gradient reaching s
    directly (ds) or not. Parameters in x's dtype; with mixed_params also weight and bias in fp32
    under fp16/bf16 x, the model's autocast training (nn.LayerNorm holds both).
    """
    import torch
    from kernels import layernorm as L
    from kernels._common import seed_tensor

    rec.group = "layernorm"
    cpu = torch.device("cpu")
    modes = ("plain", "residual", "residual+dropout")
    fwd_flags = [(w, b, m, st) for w in (False, True) for b in (False, True) for m in modes for st in (False, True)]
    bwd_flags = [(w, b, d, ds) for w in (False, True) for b in (False, True) for d in (False, True)
                 for ds in (False, True)]
    if not plan.all_flags:
        fwd_flags = [(False, False, "plain", False), (True, True, "residual+dropout", True)]
        bwd_flags = [(False,) * 4, (True,) * 4]
    for pname in plan.profiles:
        n_rows = LN_PROFILES[pname]
        for C in plan.sizes:
            for dname in plan.dtypes:
                dtype = _torch_dtype(dname)
                x = torch.empty((n_rows, C), dtype=dtype)  # (rows, C)
                res = torch.empty((n_rows, C), dtype=dtype)  # (rows, C)
                seed_t = seed_tensor(SEED, cpu)
                param_dtypes = [dname] + (["fp32"] if plan.mixed_params and dname != "fp32" else [])
                for pdname in param_dtypes:
                    pdtype = _torch_dtype(pdname)
                    mixed = pdname != dname
                    w_full = torch.empty(C, dtype=pdtype)  # (C,)
                    b_full = torch.empty(C, dtype=pdtype)  # (C,)
                    for has_w, has_b, mode, save_stats in fwd_flags:
                        if mixed and not (has_w and has_b):
                            continue
                        w, b = (w_full if has_w else None), (b_full if has_b else None)
                        rec.case = _ln_fwd_label(dname, pdname, C, has_w, has_b, mode, save_stats, pname)
                        _ln_forward_call(x, res, w, b, mode, DROPOUT_P, save_stats, seed_t)
                    for has_w, has_b, dropout, has_ds in bwd_flags:
                        if mixed and not (has_w and has_b):
                            continue
                        w, b = (w_full if has_w else None), (b_full if has_b else None)
                        rec.case = _ln_bwd_label(dname, pdname, C, has_w, has_b, dropout, has_ds, pname)
                        _ln_backward_call(x, res, w, b, DROPOUT_P if dropout else 0.0, has_ds, seed_t)
            rec.case = f"C={C} [{pname}]"
            L.dropout_keep_mask(SEED, n_rows, C, DROPOUT_P, cpu)


# The model's training launches at its own shapes (--cost): the grid is the real one, so the trip-count
# models below see the programs a training step runs.
COST_ATTN_SHAPE = dict(B=64, T=256, H=6, D=64)  # (B, T, H, D) of every attention call
COST_LN_SHAPE = (64 * 256, 384)  # (rows, C) = (B * T, C) of every layer-norm call
COST_DROPOUT_P = 0.2  # the model's dropout
H100_SMS = 132  # SMs of an H100 SXM (and an H200): what the launchers size their grids by on a GPU


def capture_cost(rec: Recorder, group: str, quick: bool):
    """The launches of one training step's calls, at the model's shapes (bf16 activations, fp32
    LayerNorm weight and bias as under autocast). Each call's launches are tagged with a call name,
    so the report can sum a call (the backward is dQ + dK/dV). quick: only the calls
    with dropout, one variant of each kernel (the test's subset)."""
    import torch
    from kernels._common import seed_tensor

    seed_t = seed_tensor(SEED, torch.device("cpu"))
    p = COST_DROPOUT_P
    rec.group = group
    if group == "attention":
        B, T, H, D = (COST_ATTN_SHAPE[k] for k in "BTHD")
        qkv = torch.empty((B, T, 3, H, D), dtype=torch.bfloat16)  # (B, T, 3, H, D), the packed projection
        q, k, v = qkv.unbind(2)  # each (B, T, H, D), strided, as the model passes them
        calls = [("attention forward, dropout, lse", _attn_forward_call, (True, p, True), (True, True)),
                 ("attention backward, dropout", _attn_backward_call, (True, p), (True, False)),
                 ("attention forward, lse", _attn_forward_call, (True, 0.0, True), (False, True)),
                 ("attention forward (eval)", _attn_forward_call, (True, 0.0, False), (False, False)),
                 ("attention backward", _attn_backward_call, (True, 0.0), (False, False))]
        for call, fn, flags, (dropout, lse) in calls[:2] if quick else calls:
            rec.call, rec.case = call, _attn_label("bf16", D, True, dropout, lse, "model")
            fn(q, k, v, *flags, seed_t)
        return
    from kernels import layernorm as L
    rows, C = COST_LN_SHAPE
    x = torch.empty((rows, C), dtype=torch.bfloat16)  # (rows, C)
    res = torch.empty((rows, C), dtype=torch.bfloat16)  # (rows, C)
    w, b = torch.empty(C), torch.empty(C)  # (C,) fp32 each, nn.LayerNorm's parameters under autocast
    fwd = [("add_layer_norm forward, dropout", "residual+dropout"), ("layer_norm forward", "plain"),
           ("add_layer_norm forward", "residual")]
    # (call, dropout, ds): add_layer_norm's s feeds the next block, except after the last block (ln_f).
    bwd = [("add_layer_norm backward, dropout, ds", True, True), ("layer_norm backward", False, False),
           ("add_layer_norm backward, dropout (ln_f)", True, False), ("add_layer_norm backward, ds", False, True)]
    # The backward grid is what fits on the GPU at once: the launcher compiles the kernel and reads its
    # registers and shared memory. Here the same rule (_blocks_per_sm) runs on the kernel compiled
    # offline, for an H100's SMs.
    bwd_programs = getattr(L, "_bwd_programs", None)
    if bwd_programs is not None and hasattr(L, "_blocks_per_sm"):
        def h100_programs(n_blocks, args, meta, device):
            res = _offline_resources(rec, L._ln_bwd_kernel, args, meta)
            return max(1, min(n_blocks, H100_SMS * L._blocks_per_sm(res["regs"], res["shared"], res["num_warps"])))

        L._bwd_programs = h100_programs
    else:
        print("compile_check: warning: kernels/layernorm.py has no _bwd_programs/_blocks_per_sm to stand in for: "
              "the backward's grid is what its launcher picks on the CPU, not an H100's (update capture_cost)")
    try:
        for call, mode in fwd[:1] if quick else fwd:
            rec.call, rec.case = call, _ln_fwd_label("bf16", "fp32", C, True, True, mode, True, "model")
            _ln_forward_call(x, res, w, b, mode, p, True, seed_t)
        for call, dropout, has_ds in bwd[:1] if quick else bwd:
            rec.call, rec.case = call, _ln_bwd_label("bf16", "fp32", C, True, True, dropout, has_ds, "model")
            _ln_backward_call(x, res, w, b, p if dropout else 0.0, has_ds, seed_t)
    finally:
        if bwd_programs is not None:
            L._bwd_programs = bwd_programs


def _offline_resources(rec: Recorder, fn, args, kwargs) -> dict:
    """Registers, shared memory and warps of fn compiled for sm_90 with these arguments (during a
    capture: through the JITFunction.run the recorder stands in for, against the offline driver).
    kwargs: the launch's keyword arguments, or kernels._common.launch_meta's (constexprs, options)."""
    from triton import knobs
    from triton.runtime.driver import driver
    driver.set_active(OfflineDriver())  # as the compile step sets it; there is no other driver to go back to
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log), warnings.catch_warnings():
        knobs.nvidia.dump_ptxas_log = True
        warnings.simplefilter("ignore")
        consts, options = kwargs if isinstance(kwargs, tuple) else ((), kwargs)  # launch_meta's split, or a dict
        kernel = rec.original_run(fn, *args, *consts, grid=None, warmup=True, **options)
        if hasattr(kernel, "result"):  # an async-compile future
            kernel = kernel.result()
    res = resource_usage(log.getvalue(), kernel.asm["cubin"])
    return dict(regs=res["regs"], shared=kernel.metadata.shared, num_warps=kernel.metadata.num_warps)


# The calls one training step makes (6 blocks: attention and two add_layer_norm each; the first
# block's ln1 is a layer_norm; the last add_layer_norm applies ln_f and its s has no later use).
STEP_CALLS = {"attention forward, dropout, lse": 6, "attention backward, dropout": 6, "layer_norm forward": 1,
              "add_layer_norm forward, dropout": 12, "layer_norm backward": 1,
              "add_layer_norm backward, dropout, ds": 11, "add_layer_norm backward, dropout (ln_f)": 1}

# Issues 10 and 11's static targets, as ratios of calls' warp-instructions:
# (what, numerator call, denominator call, kernel-name regex restricting both sides or None, target).
COST_RATIOS = [
    ("attention forward, dropout 0.2 / 0", "attention forward, dropout, lse", "attention forward, lse", None, 1.75),
    ("dK/dV, dropout 0.2 / 0", "attention backward, dropout", "attention backward", "dkdv", 1.5),
    ("dQ, dropout 0.2 / 0", "attention backward, dropout", "attention backward", "_dq", 1.5),
    ("attention backward / forward, dropout 0.2", "attention backward, dropout",
     "attention forward, dropout, lse", None, 2.5),
    ("add_layer_norm forward, dropout 0.2 / 0", "add_layer_norm forward, dropout", "add_layer_norm forward", None, 1.3),
]


# ------------------------------------------------------------------------------------------------
# SASS: loops, instruction counts, memory widths
# ------------------------------------------------------------------------------------------------

@dataclass
class SassInstr:
    addr: int
    pred: str  # "@P0", "@!P3", or ""
    opcode: str  # "LDG.E.128"
    operands: str  # "R4, desc[UR4][R2.64]"


_SASS_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][\w.]*)\s*([^;]*);")


def parse_sass(text: str) -> list[SassInstr]:
    """The instructions of cuobjdump -sass output (one kernel), in address order."""
    out = []
    for line in text.splitlines():
        m = _SASS_LINE.match(line)
        if m:
            out.append(SassInstr(int(m[1], 16), (m[2] or "").strip(), m[3], m[4].strip()))
    return out


def _branch_target(ins: SassInstr):
    """The address a direct branch (BRA, BRA.U, BRA.DIV ..) jumps to, else None."""
    if ins.opcode.split(".")[0] != "BRA":
        return None
    m = re.search(r"0x([0-9a-fA-F]+)\s*$", ins.operands)
    return int(m[1], 16) if m else None


def find_loops(instrs: list[SassInstr]) -> tuple[list[dict], list[str]]:
    """The loops of a kernel's SASS, in SASS order (by the address of their first instruction).

    A loop is a backward branch: a BRA whose target lies at or before it, the body runs from the target
    to the last backward branch to that target. A branch to itself is not a loop (ptxas ends every
    kernel with one, after EXIT, as a trap). Each loop: head and tail (indices into instrs), `size`
    (instructions from head to tail) and `instructions`: size less the sizes of the loops nested in
    it, so that a nested body is counted once, with its own trip count. Returns (loops, warnings).
    """
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    tails = {}
    for i, ins in enumerate(instrs):
        target = _branch_target(ins)
        if target is not None and target < ins.addr and target in index:
            head = index[target]
            tails[head] = max(tails.get(head, i), i)
    loops = [dict(head=h, tail=t, size=t - h + 1) for h, t in sorted(tails.items())]
    warnings_ = []
    for a in loops:
        inner = [b for b in loops if b is not a and a["head"] <= b["head"] and b["tail"] <= a["tail"]]
        direct = [b for b in inner if not any(c is not b and c["head"] <= b["head"] and b["tail"] <= c["tail"]
                                              for c in inner)]
        a["instructions"] = a["size"] - sum(b["size"] for b in direct)
        a["depth"] = sum(1 for b in loops if b is not a and b["head"] <= a["head"] and a["tail"] <= b["tail"])
        for b in loops:
            if a["head"] < b["head"] <= a["tail"] < b["tail"]:
                warnings_.append(f"SASS loops at {instrs[a['head']].addr:#x} and {instrs[b['head']].addr:#x} "
                                 f"overlap without nesting")
    return loops, warnings_


def _code_length(instrs: list[SassInstr]) -> int:
    """Instructions that can run: up to the trap (an unpredicated branch to itself) ending the kernel;
    what follows it is alignment padding."""
    for i, ins in enumerate(instrs):
        if not ins.pred and _branch_target(ins) == ins.addr:
            return i
    return len(instrs)


def _width(opcode: str) -> int:
    """Bits moved per thread by an LDG/STG/LDGSTS: .128, .64, .U16/.S16, .U8/.S8, else 32."""
    mods = opcode.split(".")[1:]
    for mod, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if mod in mods:
            return bits
    return 32


def analyze_sass(text: str) -> dict:
    """Loop bodies, straight-line code and memory traffic of one kernel's SASS (static counts)."""
    instrs = parse_sass(text)
    n_code = _code_length(instrs)
    code = instrs[:n_code]
    loops, warnings_ = find_loops(code)
    if any(ins.opcode.startswith("CALL") for ins in code):
        warnings_.append("the SASS calls a subroutine: its body is counted as straight-line code, once")
    outer = [l for l in loops if l["depth"] == 0]
    ldg, stg = {}, {}
    for ins in code:
        op = ins.opcode.split(".")[0]
        if op in ("LDG", "STG"):
            counts = ldg if op == "LDG" else stg
            counts[_width(ins.opcode)] = counts.get(_width(ins.opcode), 0) + 1
    ops = [ins.opcode.split(".")[0] for ins in code]

    def in_loop(loop, test):  # instructions of the loop's own body (not of a loop nested in it) passing test
        nested = [m for m in loops if m["depth"] > loop["depth"] and loop["head"] <= m["head"] <= loop["tail"]]
        return sum(1 for i in range(loop["head"], loop["tail"] + 1)
                   if test(code[i]) and not any(m["head"] <= i <= m["tail"] for m in nested))

    return dict(
        instructions=n_code,
        loop_instructions=[l["instructions"] for l in loops],
        loop_barriers=[in_loop(l, lambda ins: ins.opcode.startswith("BAR.SYNC")) for l in loops],
        loop_hgmma=[in_loop(l, lambda ins: ins.opcode.startswith("HGMMA")) for l in loops],
        # Selects of -inf: a causal mask's mark, which tells a masked loop from an unmasked one.
        loop_inf_selects=[in_loop(l, lambda ins: ins.opcode.startswith("FSEL") and "-INF" in ins.operands)
                          for l in loops],
        loop_depth=[l["depth"] for l in loops],
        loop_addresses=[f"{code[l['head']].addr:#x}-{code[l['tail']].addr:#x}" for l in loops],
        straight_instructions=n_code - sum(l["size"] for l in outer),
        ldg=dict(sorted(ldg.items(), reverse=True)), stg=dict(sorted(stg.items(), reverse=True)),
        ldgsts=ops.count("LDGSTS"), tma=sum(op.startswith(("UTMALDG", "UTMASTG", "UBLKCP")) for op in ops),
        ldl=ops.count("LDL"), stl=ops.count("STL"), hgmma_sass=ops.count("HGMMA"),
        hgmma_shapes=sorted({ins.opcode.split(".")[1] for ins in code if ins.opcode.startswith("HGMMA.")}),
        barriers=sum(ins.opcode.startswith("BAR.SYNC") for ins in code),
        sass_warnings=warnings_,
    )


_TTIR_DOT = re.compile(r"= tt\.dot .*")
_TTGIR_WGMMA = re.compile(r"= ttng\.warp_group_dot ")


def dot_paths(ttir: str, ttgir: str, hgmma_sass: int):
    """Whether every tl.dot became a warpgroup MMA (wgmma, HGMMA in SASS): True, False, or None when
    the kernel has no dot or all its dots are fp32 'ieee' (the exact FMA path, no tensor cores by design).
    Also the counts: tt.dot in TTIR, ttng.warp_group_dot in TTGIR."""
    dots = _TTIR_DOT.findall(ttir)
    wgmma = len(_TTGIR_WGMMA.findall(ttgir))
    tensor_core = [d for d in dots if "inputPrecision = ieee" not in d]
    if not tensor_core:
        return None, len(dots), wgmma
    return wgmma >= len(tensor_core) and hgmma_sass > 0, len(dots), wgmma


def disassemble(cubin: bytes) -> str:
    """cuobjdump -sass of a cubin, with the cuobjdump that ships in Triton's package."""
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("no cuobjdump in this Triton's package nor on PATH")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout


# ------------------------------------------------------------------------------------------------
# Trip-count models: how many times each SASS loop of a kernel runs in each program (--cost)
# ------------------------------------------------------------------------------------------------
#
# TRIP_MODELS maps a Triton kernel's name to a function trips(a, pid) -> tuple of ints: for program
# pid = (pid0, pid1, pid2) of the launch `a`, how many times each of the kernel's SASS loops runs its
# body, one int per loop in SASS (address) order, which for these kernels is the order the loops run
# in, i.e. the source's order after inlining (an inner loop's count is over all the iterations of
# the loop around it). A kernel without a loop returns ().
# `a` reads the launch's arguments by the kernel's parameter names (a.T_K, a.BLOCK_N, a.IS_CAUSAL:
# runtime ints and constexprs alike), and a.grid (3 ints) and a.num_warps. Each function mirrors the
# kernel's own loop bounds; when a kernel's loops change, change its function in the same commit.
# When the number of loops in the SASS differs from the tuple's length, the report says so and leaves
# the kernel's warp-instructions unknown (exit status 1) rather than guess.
#
# Triton's software pipelining (Triton 3.6 and 3.9) keeps a loop's trip count: the loads of the first
# num_stages - 1 iterations are issued before the loop (straight-line code) and the in-loop prefetches
# are predicated off at the end, so the SASS loop runs as often as the source loop.

def _range_len(lo: int, hi: int, step: int) -> int:
    """len(range(lo, hi, step)): the trips of `for _ in range(lo, hi, step)` (tl.range alike)."""
    return max(0, -(-(hi - lo) // step))


def _key_split(start_m, T_K, IS_CAUSAL, BLOCK_M, BLOCK_N):
    """kernels/attention.py's _key_split: (mid, hi), keys < mid unmasked, keys >= hi skipped."""
    if IS_CAUSAL:
        return (min(start_m + 1, T_K) // BLOCK_N) * BLOCK_N, min(start_m + BLOCK_M, T_K)
    return (T_K // BLOCK_N) * BLOCK_N, T_K


def _trips_attn_fwd(a, pid):
    """Two loops over key blocks: unmasked [0, mid), then MASKED [mid, hi)."""
    mid, hi = _key_split(pid[0] * a.BLOCK_M, a.T_K, a.IS_CAUSAL, a.BLOCK_M, a.BLOCK_N)
    return _range_len(0, mid, a.BLOCK_N), _range_len(mid, hi, a.BLOCK_N)


def _trips_attn_dq(a, pid):
    """As the forward: unmasked key blocks [0, mid), then MASKED [mid, hi)."""
    return _trips_attn_fwd(a, pid)


def _trips_attn_dkdv(a, pid):
    """Causal: the MASKED query blocks straddling the diagonal [lo, mid), then [mid, T_Q) unmasked.
    Not causal: one loop over all query blocks."""
    start_n = pid[0] * a.BLOCK_N
    if not a.IS_CAUSAL:
        return (_range_len(0, a.T_Q, a.BLOCK_M),)
    mid = min(-(-(start_n + a.BLOCK_N) // a.BLOCK_M) * a.BLOCK_M, a.T_Q)
    return _range_len((start_n // a.BLOCK_M) * a.BLOCK_M, mid, a.BLOCK_M), _range_len(mid, a.T_Q, a.BLOCK_M)


def _trips_ln_bwd(a, pid):
    """Program pid walks row blocks pid, pid + P, .. < cdiv(n_rows, ROWS), P = the grid's size."""
    return (_range_len(pid[0], -(-a.n_rows // a.ROWS), a.grid[0]),)


def _trips_ln_bwd_reduce(a, pid):
    """One loop over the backward's P partial rows, BLOCK_P at a time."""
    return (_range_len(0, a.n_progs, a.BLOCK_P),)


def _no_loop(a, pid):
    return ()


TRIP_MODELS = {
    "_attn_fwd_kernel": _trips_attn_fwd,
    "_attn_bwd_dkdv_kernel": _trips_attn_dkdv,
    "_attn_bwd_dq_kernel": _trips_attn_dq,
    "_dropout_mask_kernel": _no_loop,  # both ops' (attention's and layer norm's)
    "_ln_fwd_kernel": _no_loop,
    "_ln_bwd_kernel": _trips_ln_bwd,
    "_ln_bwd_reduce_kernel": _trips_ln_bwd_reduce,
}


class LaunchArgs:
    """A launch's arguments by parameter name, plus grid and num_warps: what a trip model reads."""

    def __init__(self, launch: "Launch", num_warps: int):
        self.__dict__.update(zip(launch.fn.arg_names, launch.args))
        self.__dict__.update(launch.kwargs)
        self.grid, self.num_warps = launch.grid, num_warps


def launch_cost(launch: "Launch", res: dict) -> dict:
    """Warp-instructions one launch issues: for every program, the straight-line code once plus each
    SASS loop body times its trip count in that program, times the warps of a program.

    Returns programs, trips (per loop, summed over the programs), warp_instructions and issue_us, or
    an error (no model, or a model that expects another number of loops) with those unknown.
    """
    model = TRIP_MODELS.get(launch.kernel)
    loops = res["loop_instructions"]
    unknown = dict(programs=None, trips=None, warp_instructions=None, issue_us=None)
    if model is None:
        return dict(unknown, error=f"no trip-count model for {launch.kernel}: add one to TRIP_MODELS in "
                                   f"bench/compile_check.py ({len(loops)} SASS loops)")
    a = LaunchArgs(launch, res["num_warps"])
    g0, g1, g2 = launch.grid
    trips = [0] * len(loops)
    for p0 in range(g0):
        for p2 in range(g2):
            for p1 in range(g1):
                t = tuple(model(a, (p0, p1, p2)))
                if len(t) != len(loops):
                    return dict(unknown, error=(
                        f"trip-count model out of date: {model.__name__} gives {len(t)} loop(s), the SASS of "
                        f"{launch.kernel} has {len(loops)} (bodies {loops}); update TRIP_MODELS in "
                        f"bench/compile_check.py"))
                for i, n in enumerate(t):
                    trips[i] += n
    programs = g0 * g1 * g2
    per_warp = programs * res["straight_instructions"] + sum(n * t for n, t in zip(loops, trips))
    warp_instructions = per_warp * res["num_warps"]
    return dict(programs=programs, trips=trips, warp_instructions=warp_instructions,
                issue_us=issue_us(warp_instructions))


ISSUE_RATE = H100_SMS * 4 * 1.755e9  # warp-instructions a second: 132 SMs x 4 schedulers x 1.755 GHz


def issue_us(warp_instructions: int) -> float:
    """The issue-bound time: every scheduler of every SM issuing one warp-instruction a cycle."""
    return round(warp_instructions / ISSUE_RATE * 1e6, 3)


# ------------------------------------------------------------------------------------------------
# Compile
# ------------------------------------------------------------------------------------------------

class OfflineDriver:
    """Just enough of a Triton driver for JITFunction.run(warmup=True): an H100 target, no device."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", TARGET_ARCH, WARP_SIZE)

    def get_active_torch_device(self):
        import torch
        return torch.device("cpu")

    def is_active(self):
        return True


def _run_kwargs(launch: Launch) -> dict:
    return dict(launch.kwargs)


def specialization_key(launch: Launch, binder) -> str:
    """Triton's own cache key for this launch: the binder's specialization plus the options."""
    _, specialization, options = binder(*launch.args, **_run_kwargs(launch))
    return f"{launch.kernel}|{specialization}|{sorted(options.items())}"


def make_binders():
    """One binder per JITFunction, built as JITFunction.create_binder does, for the sm_90 target."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(OfflineDriver().get_current_target())
    cache = {}

    def binder_for(fn):
        if fn not in cache:
            cache[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        return cache[fn]

    return binder_for


def _tool(name: str) -> str | None:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else shutil.which(name)


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_CUOBJDUMP = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(ptxas_log: str, cubin: bytes) -> dict:
    """Registers, stack frame and spill bytes: from ptxas -v when it ran, else from cuobjdump."""
    regs, spill = _PTXAS_REGS.search(ptxas_log), _PTXAS_SPILL.search(ptxas_log)
    if regs and spill:
        return dict(regs=int(regs[1]), stack=int(spill[1]), spill_st=int(spill[2]), spill_ld=int(spill[3]),
                    source="ptxas")
    cuobjdump = _tool("cuobjdump")
    if cuobjdump is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = _CUOBJDUMP.search(out)
    if not m:
        return {}
    # cuobjdump has no spill counts; a stack frame in a Triton kernel is spill space.
    return dict(regs=int(m[1]), stack=int(m[2]), spill_st=None, spill_ld=None, source="cuobjdump")


def max_warps_for(regs: int) -> int:
    """Warps one block may have on sm_90 with `regs` registers a thread (allocated 256 a warp)."""
    per_warp = -(-regs * WARP_SIZE // 256) * 256
    return min(32, SM90_REGS_PER_BLOCK // per_warp) if per_warp else 32


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text


_LAUNCHES: list[Launch] = []  # read by the forked workers
_COST = False  # --cost: disassemble and analyze each variant (set before the workers fork)
_DUMP_DIR: Path | None = None  # --dump-dir


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")


def static_analysis(launch: Launch, kernel) -> dict:
    """--cost and --dump-dir: the SASS's loops and memory instructions, the dot paths; keeps the files."""
    sass = disassemble(kernel.asm["cubin"])
    if _DUMP_DIR is not None:
        stem = _DUMP_DIR / f"{launch.group}.{launch.kernel}.{_slug(launch.label)}"
        for ext in ("ttir", "ttgir", "ptx"):
            Path(f"{stem}.{ext}").write_text(kernel.asm[ext])
        Path(f"{stem}.cubin").write_bytes(kernel.asm["cubin"])
        Path(f"{stem}.sass").write_text(sass)
    if not _COST:
        return {}
    out = analyze_sass(sass)
    out["hgmma"], out["dots_ttir"], out["wgmma_ttgir"] = dot_paths(kernel.asm["ttir"], kernel.asm["ttgir"],
                                                                   out["hgmma_sass"])
    return out


def compile_one(index: int) -> dict:
    """Compile launch `index` through Triton's own JITFunction.run(warmup=True)."""
    from triton.runtime.jit import JITFunction
    launch = _LAUNCHES[index]
    result = dict(index=index, ok=False, error=None, problems=[])
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kernel = JITFunction.run(launch.fn, *launch.args, grid=None, warmup=True, **_run_kwargs(launch))
        if hasattr(kernel, "result"):  # an async-compile future
            kernel = kernel.result()
    except Exception as exc:  # noqa: BLE001 - every compiler error is a result, not a crash
        result["error"] = _short_error(exc)
        result["seconds"] = time.perf_counter() - start
        return result
    result["seconds"] = time.perf_counter() - start
    md = kernel.metadata
    result.update(shared=md.shared, num_warps=md.num_warps, num_stages=md.num_stages)
    result.update(resource_usage(log.getvalue(), kernel.asm["cubin"]))
    if _COST or _DUMP_DIR is not None:
        try:
            result.update(static_analysis(launch, kernel))
        except Exception as exc:  # noqa: BLE001 - reported with the variant
            result["problems"].append(f"static analysis failed: {_short_error(exc)}")
    if md.shared > SM90_MAX_SHARED:
        result["problems"].append(f"shared memory {md.shared} B > {SM90_MAX_SHARED} B ({SM90_MAX_SHARED // 1024} KB), "
                                  f"the most an H100 block may use: the launch would raise OutOfResources")
    if result.get("regs") and md.num_warps > max_warps_for(result["regs"]):
        result["problems"].append(f"{result['regs']} registers a thread allow {max_warps_for(result['regs'])} "
                                  f"warps, the kernel asks for {md.num_warps}")
    result["ok"] = not result["problems"]
    return result


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def _config_text(launch: Launch, res: dict) -> str:
    kw = launch.kwargs
    parts = []
    for name, short in (("HEAD_DIM", "HD"), ("BLOCK_D", "BD"), ("BLOCK_M", "BM"), ("BLOCK_N", "BN"),
                        ("BLOCK_C", "BC"), ("ROWS", "R")):
        if name in kw:
            parts.append(f"{short}{kw[name]}")
    if res.get("num_warps") is not None:
        parts.append(f"w{res['num_warps']} s{res['num_stages']}")
    else:
        parts.append(f"w{kw.get('num_warps', 'd')} s{kw.get('num_stages', 'd')}")
    return " ".join(parts)


def _resources_text(res: dict) -> str:
    if "shared" not in res:
        return ""
    text = f"smem {res['shared']:>6}"
    if res.get("regs") is not None:
        text += f"  regs {res['regs']:>3}"
        if res.get("spill_st") is not None:
            text += f"  spill {res['spill_st']}/{res['spill_ld']} B"
        text += f"  stack {res['stack']}"
    return text


def is_spilling(res: dict) -> bool:
    if res.get("spill_st") is not None:
        return bool(res["spill_st"] or res["spill_ld"])
    return bool(res.get("stack"))


_BLOCK_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "ROWS", "BLOCK_C")


def cost_record(launch: Launch, res: dict) -> dict:
    """One variant's --cost record (a row of the table, an element of --json's list)."""
    rec = dict(kernel=launch.kernel, variant=launch.label, group=launch.group, call=launch.call,
               block={k: launch.kwargs[k] for k in _BLOCK_KEYS if k in launch.kwargs})
    if "shared" not in res or "loop_instructions" not in res:
        problems = res["problems"] + ([res["error"].strip().splitlines()[-1]] if res.get("error") else [])
        return dict(rec, error="; ".join(problems) or "not compiled", warp_instructions=None, issue_us=None)
    spill = (res["spill_st"] + res["spill_ld"]) if res.get("spill_st") is not None else res.get("stack")
    rec.update(
        warps=res["num_warps"], stages=res["num_stages"], regs=res.get("regs"), smem=res["shared"],
        spill_bytes=spill, hgmma=res["hgmma"], dots=dict(ttir=res["dots_ttir"], ttgir_wgmma=res["wgmma_ttgir"],
                                                           sass_hgmma=res["hgmma_sass"],
                                                           hgmma_shapes=res["hgmma_shapes"]),
        ldg={str(k): v for k, v in res["ldg"].items()}, stg={str(k): v for k, v in res["stg"].items()},
        ldg128=res["ldg"].get(128, 0), stg128=res["stg"].get(128, 0), ldgsts=res["ldgsts"], tma=res["tma"],
        local_memory=dict(ldl=res["ldl"], stl=res["stl"]), barriers=res["barriers"],
        instructions=res["instructions"], loop_instructions=res["loop_instructions"],
        loop_barriers=res["loop_barriers"], loop_hgmma=res["loop_hgmma"], loop_inf_selects=res["loop_inf_selects"],
        loop_depth=res["loop_depth"], loop_addresses=res["loop_addresses"],
        straight_instructions=res["straight_instructions"], grid=list(launch.grid))
    rec.update(launch_cost(launch, res))
    warnings_ = list(res["sass_warnings"]) + res["problems"]
    if spill:
        warnings_.append(f"{spill} bytes of register spills")
    if warnings_:
        rec["warning"] = "; ".join(warnings_)
    return rec


def _widths(counts: dict) -> str:
    return " ".join(f"{n}x{bits}" for bits, n in counts.items()) or "-"


def _cost_row(r: dict) -> str:
    block = "x".join(str(v) for k, v in r["block"].items() if k != "BLOCK_D") or "-"
    if "smem" not in r:
        return f"| {r['kernel']} | {r['variant']} | {block} | FAIL: {r['error']} |" + " |" * 14
    hgmma = {True: "yes", False: "NO", None: "-"}[r["hgmma"]]
    if r["dots"]["hgmma_shapes"]:
        hgmma += f" ({', '.join(r['dots']['hgmma_shapes'])})"
    local = f"{r['local_memory']['ldl']}/{r['local_memory']['stl']}"
    extra = [f"{r['ldgsts']} LDGSTS"] * bool(r["ldgsts"]) + [f"{r['tma']} TMA"] * bool(r["tma"])
    loops = " + ".join(str(n) for n in r["loop_instructions"]) or "-"
    bars = f"{r['barriers']} ({' + '.join(str(n) for n in r['loop_barriers'])})" if r["loop_barriers"] else \
        str(r["barriers"])
    if r["warp_instructions"] is None:
        trips, warp, us = "?", "unknown", "?"
    else:
        trips = " + ".join(f"{t / r['programs']:.2f}".rstrip("0").rstrip(".") for t in r["trips"]) or "-"
        warp, us = f"{r['warp_instructions']:,}", f"{r['issue_us']:.2f}"
    return (f"| {r['kernel']} | {r['variant']} | {block} | {r['warps']}/{r['stages']} | {r['regs']} | {r['smem']:,} | "
            f"{r['spill_bytes']} | {hgmma} | {_widths(r['ldg'])}{' ' + ' '.join(extra) if extra else ''} | "
            f"{_widths(r['stg'])} | {local} | {bars} | {loops} | {trips} | {r['straight_instructions']} | "
            f"{r['programs'] if r['programs'] is not None else '?'} | {warp} | {us} |")


def print_cost_report(records: list[dict], launches: list[Launch], results_by_key: dict) -> list[str]:
    """The --cost tables: one row per variant, then per call (a launcher call's launches summed) and
    the issues' target ratios. Returns the errors (a trip model out of date, a failed variant)."""
    print()
    print("| kernel | variant | block | warps/stages | regs | smem B | spill B | HGMMA | LDG (count x bits) | "
          "STG | LDL/STL | BAR (in loops) | loop instr. (SASS order) | trips/program | straight instr. | programs | "
          "warp-instr. | issue us |")
    print("|---|---|---|---|---:|---:|---:|---|---|---|---|---|---|---|---:|---:|---:|---:|")
    for r in records:
        print(_cost_row(r))
    errors = [f"{r['kernel']} {r['variant']}: {r['error']}" for r in records if r.get("error")]
    for r in records:
        if r.get("warning"):
            print(f"warning: {r['kernel']} {r['variant']}: {r['warning']}")

    # Per call: each launch costed with its own grid (a kernel launched twice counts twice).
    calls: dict[str, list] = {}
    for launch in launches:
        res = results_by_key[launch.key]
        cost = launch_cost(launch, res) if "loop_instructions" in res else dict(warp_instructions=None)
        calls.setdefault(launch.call, []).append((launch.kernel, cost["warp_instructions"]))
    print()
    print("| call (model shapes) | launches | warp-instr. | issue us |")
    print("|---|---|---:|---:|")
    for call, parts in calls.items():
        total = None if any(w is None for _, w in parts) else sum(w for _, w in parts)
        names = " + ".join(k for k, _ in parts)
        print(f"| {call} | {names} | {'unknown' if total is None else f'{total:,}'} | "
              f"{'?' if total is None else f'{issue_us(total):.2f}'} |")

    def call_sum(call, kernel_re=None):  # None when the call (or its kernels) was not captured or is unknown
        parts = [w for k, w in calls.get(call, []) if kernel_re is None or re.search(kernel_re, k)]
        return None if not parts or any(w is None for w in parts) else sum(parts)

    step = [(n, call_sum(call)) for call, n in STEP_CALLS.items()]
    if all(w is not None for _, w in step):
        total = sum(n * w for n, w in step)
        print(f"| one training step's attention and LayerNorm calls ({sum(STEP_CALLS.values())}) | | "
              f"{total:,} | {issue_us(total):.2f} |")

    lines = []
    for what, num, den, kernel_re, target in COST_RATIOS:
        a, b = call_sum(num, kernel_re), call_sum(den, kernel_re)
        if a is not None and b:
            lines.append(f"| {what} | {a / b:.2f} | <= {target} | {'met' if a / b <= target else 'not met'} |")
    if lines:
        print()
        print("| ratio of warp-instructions (issues 10, 11) | now | target | |")
        print("|---|---:|---:|---|")
        print("\n".join(lines))
    return errors


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("attention", "layernorm"), help="one op's kernels only")
    ap.add_argument("--kernel", metavar="REGEX", help="only kernels whose name matches")
    ap.add_argument("--quick", action="store_true",
                    help="every kernel once per precision path (fp32, bf16) with all flags off and all on, "
                         "model shapes only: the test's subset")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    ap.add_argument("--cache-dir", help="Triton cache to use (default: a fresh temporary one, so ptxas "
                                        "really runs and its -v log gives the spill counts)")
    ap.add_argument("--list", action="store_true", help="list the variants, compile nothing")
    ap.add_argument("-v", "--verbose", action="store_true", help="full error text under each failure")
    ap.add_argument("--cost", action="store_true",
                    help="the static cost report: the model's training variants at its shapes, with SASS loop "
                         "bodies, memory widths, HGMMA and the warp-instructions a launch issues (--quick: "
                         "one variant per kernel, the dropout calls)")
    ap.add_argument("--json", metavar="PATH", help="with --cost: write the records as a JSON list")
    ap.add_argument("--dump-dir", metavar="DIR", help="keep each variant's ttir, ttgir, ptx, cubin and sass here")
    args = ap.parse_args(argv)
    if args.json and not args.cost:
        ap.error("--json needs --cost")
    return args


def main(argv=None) -> int:
    # Before triton is imported (nothing above imports it): the interpreter's kernels cannot compile.
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: removing TRITON_INTERPRET from the environment (the interpreter cannot compile)",
              file=sys.stderr)
    os.environ.pop("TRITON_INTERPRET", None)
    args = parse_args(argv)
    t0 = time.perf_counter()
    cache_tmp = None
    if args.cache_dir:
        os.environ["TRITON_CACHE_DIR"] = os.path.abspath(args.cache_dir)
    else:
        cache_tmp = tempfile.mkdtemp(prefix="compile_check_cache_")
        os.environ["TRITON_CACHE_DIR"] = cache_tmp
    try:
        return _main(args, t0)
    finally:
        if cache_tmp:
            shutil.rmtree(cache_tmp, ignore_errors=True)


def _main(args, t0) -> int:
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    try:
        import torch
        import triton
        from triton.backends import backends
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
    except ImportError as exc:
        print(f"compile_check: cannot import triton/torch: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if "nvidia" not in backends:
        print("compile_check: this Triton has no NVIDIA backend", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:  # the ptxas Triton itself runs for this arch (3.9 runs its CUDA 13 "ptxas-blackwell" for sm_90)
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(TARGET_ARCH).path
    except Exception as exc:  # noqa: BLE001 - any failure here means there is nothing to compile with
        print(f"compile_check: no usable ptxas in this Triton: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    from kernels import attention, layernorm
    for mod in (attention, layernorm):
        for name in dir(mod):
            obj = getattr(mod, name)
            if name.endswith("_kernel") and type(obj).__name__ == "InterpretedFunction":
                print("compile_check: kernels were built for Triton's interpreter", file=sys.stderr)
                return EXIT_UNAVAILABLE

    try:
        probe = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"compile_check: {ptxas} does not run here: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    ptxas_version = probe.stdout.strip().splitlines()
    print(f"triton {triton.__version__} | torch {torch.__version__} | GPUTarget('cuda', {TARGET_ARCH}, {WARP_SIZE}) | "
          f"{ptxas} ({', '.join(ptxas_version[-2:]) or '?'})")

    rec = Recorder()
    with rec.active():
        plans = QUICK_PLANS if args.quick else FULL_PLANS
        for group, capture in (("attention", capture_attention), ("layernorm", capture_layernorm)):
            if args.only in (None, group):
                if args.cost:
                    capture_cost(rec, group, args.quick)
                    continue
                for plan in plans[group]:
                    capture(rec, plan)
    launches = rec.launches
    if args.kernel:
        launches = [l for l in launches if re.search(args.kernel, l.kernel)]

    binder_for = make_binders()
    variants: dict[str, Launch] = {}
    for launch in launches:
        launch.key = specialization_key(launch, binder_for(launch.fn))
        variants.setdefault(launch.key, launch)
    global _LAUNCHES, _COST, _DUMP_DIR
    _LAUNCHES = list(variants.values())
    _COST = args.cost
    if args.dump_dir:
        _DUMP_DIR = Path(args.dump_dir).resolve()
        _DUMP_DIR.mkdir(parents=True, exist_ok=True)
    print(f"{len(launches)} launches captured, {len(_LAUNCHES)} distinct specializations to compile "
          f"({time.perf_counter() - t0:.1f} s)")
    if args.list:
        for launch in _LAUNCHES:
            print(f"{launch.kernel:<28} {launch.label}  {_config_text(launch, {})}")
        return 0

    # The original JITFunction.run, against a driver that has no device but says sm_90.
    driver.set_active(OfflineDriver())
    from triton import knobs
    knobs.nvidia.dump_ptxas_log = True

    t_compile = time.perf_counter()
    results = []
    jobs = max(1, min(args.jobs, len(_LAUNCHES)))
    if jobs > 1:
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(jobs)
        it = pool.imap(compile_one, range(len(_LAUNCHES)))
    else:
        pool, it = None, map(compile_one, range(len(_LAUNCHES)))
    try:
        for res in it:
            launch = _LAUNCHES[res["index"]]
            results.append(res)
            status = "OK" if res["ok"] else "FAIL"
            if res["ok"] and is_spilling(res):
                status = "SPILL"
            print(f"{status:<5} {launch.kernel:<28} {launch.label:<58} {_config_text(launch, res):<32} "
                  f"{_resources_text(res)}  {res['seconds']:.1f}s", flush=True)
            if not res["ok"]:
                for problem in res["problems"]:
                    print(f"      {problem}")
                if res["error"]:
                    lines = res["error"].splitlines()
                    for line in (lines if args.verbose else lines[:25]):
                        print(f"      | {line}")
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    compile_s = time.perf_counter() - t_compile

    # Summary: per kernel, counts and ranges.
    print()
    print(f"summary: triton {triton.__version__}, sm_{TARGET_ARCH}, {len(results)} variants in {compile_s:.1f} s "
          f"({jobs} processes; {time.perf_counter() - t0:.1f} s in all)")
    header = f"{'kernel':<38} {'variants':>8} {'ok':>5} {'fail':>5} {'spill':>6} {'max smem':>9} {'max regs':>9}"
    print(header)
    print("-" * len(header))
    kernels_seen = []
    for launch in _LAUNCHES:
        name = f"{launch.group}.{launch.kernel}"
        if name not in kernels_seen:
            kernels_seen.append(name)
    for name in kernels_seen:
        rs = [r for r in results if f"{_LAUNCHES[r['index']].group}.{_LAUNCHES[r['index']].kernel}" == name]
        smem = max((r.get("shared", 0) for r in rs), default=0)
        regs = max((r.get("regs") or 0 for r in rs), default=0)
        print(f"{name:<38} {len(rs):>8} {sum(r['ok'] for r in rs):>5} {sum(not r['ok'] for r in rs):>5} "
              f"{sum(r['ok'] and is_spilling(r) for r in rs):>6} {smem:>9} {regs:>9}")
    failed = [r for r in results if not r["ok"]]
    spilled = [r for r in results if r["ok"] and is_spilling(r)]
    print(f"total: {len(results)} variants, {len(results) - len(failed)} ok, {len(failed)} failed, "
          f"{len(spilled)} compile with register spills")
    if failed:
        print("\nFAILED:")
        for r in failed:
            launch = _LAUNCHES[r["index"]]
            lines = (r["error"] or "").strip().splitlines()
            reason = r["problems"][0] if r["problems"] else (lines[-1] if lines else "?")
            print(f"  {launch.kernel} {launch.label} {_config_text(launch, r)}: {reason}")
    if not args.cost:
        return 1 if failed else 0

    results_by_key = {_LAUNCHES[r["index"]].key: r for r in results}
    records = [cost_record(_LAUNCHES[r["index"]], r) for r in results]
    errors = print_cost_report(records, launches, results_by_key)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
        print(f"\n{len(records)} records written to {args.json}")
    if errors:
        print("\nCOST REPORT INCOMPLETE:")
        for e in errors:
            print(f"  {e}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
