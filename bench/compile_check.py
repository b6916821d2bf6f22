"""Compile every Triton kernel variant our launchers can launch for an H100 (sm_90), without a GPU.

    python bench/compile_check.py                 # the full grid (~1200 variants, ~10 min on 2 cores)
    python bench/compile_check.py --quick         # every kernel, fp32 and bf16, flags all off / all on
    python bench/compile_check.py --only attention --kernel dkdv -j 8
    python bench/compile_check.py --list          # the variants, without compiling

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

Exit status: 0 all variants compile; 1 at least one FAIL; 77 compilation cannot run here (no CUDA
backend or no ptxas in this Triton), so a test can skip. TRITON_INTERPRET is removed from the
environment before triton is imported: under the interpreter @triton.jit gives interpreted
functions, which cannot be compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    print("compile_check: removing TRITON_INTERPRET from the environment (the interpreter cannot compile)",
          file=sys.stderr)
os.environ.pop("TRITON_INTERPRET", None)

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


class Recorder:
    """Replaces JITFunction.run while launchers run; records each launch with the current case."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.group = ""
        self.case = ""

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.jit import JITFunction
        original = JITFunction.run
        recorder = self

        def record(fn, *args, grid, warmup, **kwargs):
            recorder.launches.append(Launch(
                kernel=fn.__name__, group=recorder.group, fn=fn,
                args=tuple(_strip(a) for a in args), kwargs={k: _strip(v) for k, v in kwargs.items()},
                label=recorder.case))
            return None

        JITFunction.run = record
        try:
            yield self
        finally:
            JITFunction.run = original


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
                scale = D ** -0.5
                seed_t = seed_tensor(SEED, cpu)
                for causal, dropout, need_lse in fwd_flags:
                    p = DROPOUT_P if dropout else 0.0
                    rec.case = (f"{dname} D={D} {'causal ' if causal else ''}{'dropout ' if dropout else ''}"
                                f"{'lse ' if need_lse else ''}[{pname}]")
                    A._attn_forward(q, k, v, p, causal, scale, seed_t if dropout else None, need_lse)
                for causal, dropout in bwd_flags:
                    p = DROPOUT_P if dropout else 0.0
                    rec.case = f"{dname} D={D} {'causal ' if causal else ''}{'dropout ' if dropout else ''}[{pname}]"
                    # What _attn_forward returns with need_lse (made here, so no extra forward is recorded).
                    o = torch.empty(q.shape, dtype=dtype)  # (B, T, H, D), contiguous
                    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)  # (B, H, T)
                    A._attn_backward(torch.empty_like(o), q, k, v, o, lse, p, causal, scale,
                                     seed_t if dropout else None)
        rec.case = f"[{pname}]"
        A.dropout_keep_mask(SEED, 1, prof["H"], prof["T"], prof["T"], DROPOUT_P, cpu)


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
                mean = torch.empty(n_rows, dtype=torch.float32)  # (rows,)
                rstd = torch.empty(n_rows, dtype=torch.float32)  # (rows,)
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
                        r = None if mode == "plain" else res
                        p = DROPOUT_P if mode.endswith("dropout") else 0.0
                        rec.case = (f"x={dname}{' w,b=' + pdname if mixed else ''} C={C} "
                                    f"{'weight ' if has_w else ''}{'bias ' if has_b else ''}"
                                    f"{'' if mode == 'plain' else mode + ' '}{'stats ' if save_stats else ''}"
                                    f"[{pname}]")
                        L._ln_forward(x, r, w, b, 1e-5, p, seed_t if p else None, save_stats)
                    for has_w, has_b, dropout, has_ds in bwd_flags:
                        if mixed and not (has_w and has_b):
                            continue
                        w, b = (w_full if has_w else None), (b_full if has_b else None)
                        p = DROPOUT_P if dropout else 0.0
                        rec.case = (f"x={dname}{' w,b=' + pdname if mixed else ''} C={C} "
                                    f"{'weight ' if has_w else ''}{'bias ' if has_b else ''}"
                                    f"{'dropout ' if dropout else ''}{'ds ' if has_ds else ''}[{pname}]")
                        L._ln_backward(torch.empty_like(x), res if has_ds else None, x, w, b, mean, rstd, p,
                                       seed_t if p else None)
            rec.case = f"C={C} [{pname}]"
            L.dropout_keep_mask(SEED, n_rows, C, DROPOUT_P, cpu)


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
    return ap.parse_args(argv)


def main(argv=None) -> int:
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
          f"{ptxas} ({ptxas_version[-1] if ptxas_version else '?'})")

    rec = Recorder()
    with rec.active():
        plans = QUICK_PLANS if args.quick else FULL_PLANS
        for group, capture in (("attention", capture_attention), ("layernorm", capture_layernorm)):
            if args.only in (None, group):
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
    global _LAUNCHES
    _LAUNCHES = list(variants.values())
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
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
