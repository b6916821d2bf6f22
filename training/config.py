"""The run configuration: one dataclass, from which the command line, its defaults and --help come.

Each field of RunConfig is one flag (`n_embd` is `--n-embd`). Its default is written once, here
(the model's come from GPTConfig); `python train.py --help` and the README's flag table are built
from these fields. A value comes from, highest first: the flag as given; when resuming, the
checkpoint (model fields always; the saved loop fields unless given); the --preset; the default.
Device-dependent defaults (backend, dtype, CUDA graphs) are settled in resolve_execution().
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model import GPTConfig
from model.backends import BACKENDS
from model.data import DEFAULT_DATA_PATH

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
SEED_LIMIT = 2**62  # torch.manual_seed takes any 64-bit value; this leaves room for the per-rank offset
MODEL_FIELDS = ("n_embd", "n_head", "n_layer", "block_size", "dropout")
# What `--preset cpu` sets: the seed's design, smaller, to a val loss under 2.0 in minutes on 2 cores.
PRESETS = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, batch_size=32, max_iters=2000,
                learning_rate=1e-3, eval_interval=200, eval_iters=20, device="cpu"),
}


class UsageError(Exception):
    """A flag, file or input the run cannot use; printed as one line, exit status 2."""


def _flag(default, help, group, metavar=None, *, saved=False, shown=None, **argparse_kw):
    """A RunConfig field. saved: a loop setting that a checkpoint keeps; shown: how --help shows a
    default that depends on the device."""
    return field(default=default, metadata=dict(help=help, group=group, metavar=metavar, saved=saved,
                                                shown=shown, argparse=argparse_kw))


MODEL, LOOP, EXECUTION, FILES, SAMPLING = ("model (fixed by the checkpoint when resuming)",
                                          "training (a resumed run keeps its own values unless given)",
                                          "execution", "input and output", "sampling")


@dataclass
class RunConfig:
    """Everything one run of train.py is told: the model's shape, the loop, where it runs, its files."""

    n_embd: int = _flag(GPTConfig.n_embd, "width C of the residual stream", MODEL, "N", type=int)
    n_head: int = _flag(GPTConfig.n_head, "attention heads, must divide --n-embd", MODEL, "N", type=int)
    n_layer: int = _flag(GPTConfig.n_layer, "transformer blocks", MODEL, "N", type=int)
    block_size: int = _flag(GPTConfig.block_size, "context length in characters", MODEL, "N", type=int)
    dropout: float = _flag(GPTConfig.dropout, "dropout probability, in [0, 1)", MODEL, "P", type=float)

    batch_size: int = _flag(64, "sequences per optimizer step, over all ranks", LOOP, "N", saved=True, type=int)
    grad_accum: int = _flag(1, "micro-batches per optimizer step on each rank; must divide the batch per rank",
                            LOOP, "N", saved=True, type=int)
    max_iters: int = _flag(5000, "optimizer steps in all; a resumed run counts on", LOOP, "N", saved=True, type=int)
    learning_rate: float = _flag(3e-4, "AdamW learning rate", LOOP, "LR", saved=True, type=float)
    eval_interval: int = _flag(500, "evaluate and checkpoint every this many steps, and at the last step", LOOP,
                               "N", saved=True, type=int)
    eval_iters: int = _flag(200, "batches per split in each evaluation", LOOP, "N", saved=True, type=int)
    seed: int = _flag(0, "torch.manual_seed for the run, in [0, 2**62)", LOOP, "N", saved=True, type=int)
    log_interval: int = _flag(100, "steps between progress lines on standard error, 0 for none", LOOP, "N",
                              type=int)
    resume: Path | None = _flag(None, "continue the run saved at PATH: model, optimizer, step, best val loss, "
                                "random state; its checkpoints go back to PATH unless --out is given", LOOP,
                                "PATH", type=Path)
    preset: str | None = _flag(None, "start from a preset's values (flags given still win); cpu: a smaller model "
                               "of the same design that trains in minutes on a CPU ("
                               + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["cpu"].items()) + ")",
                               LOOP, choices=tuple(PRESETS), shown="none")

    device: str = _flag("auto", "where to run; auto picks cuda when a GPU is available", EXECUTION,
                        choices=("auto", "cpu", "cuda"))
    backend: str | None = _flag(None, "ops: reference (the seed's math, for checking), torch (SDPA, "
                                "F.layer_norm: the fastest on a CPU) or triton (our kernels)", EXECUTION,
                                choices=BACKENDS, shown="triton on a GPU, torch on the CPU")
    dtype: str | None = _flag(None, "compute dtype; bfloat16/float16 run under autocast with float32 weights",
                              EXECUTION, choices=tuple(DTYPES), shown="bfloat16 on a GPU, float32 on the CPU")
    compile: str | None = _flag(None, "run the model under torch.compile; MODE is default (when left out), "
                                "reduce-overhead or max-autotune; our own CUDA graphs are then off", EXECUTION,
                                "MODE", shown="off", nargs="?", const="default", choices=COMPILE_MODES)
    cuda_graphs: bool | None = _flag(None, "capture the training step and the evaluation forward in CUDA "
                                     "graphs", EXECUTION, shown="on where possible: a GPU, one process, not "
                                     "float16, not --compile", action=argparse.BooleanOptionalAction)

    data: Path | None = _flag(None, "UTF-8 training text, relative to the working directory", FILES, "PATH",
                              type=Path, shown=f"{DEFAULT_DATA_PATH}, downloaded when missing")
    out: Path | None = _flag(None, "checkpoint, written at evaluations (off the training thread) and at the "
                             "end; the best-val one goes beside it with .best before the suffix", FILES, "PATH",
                             type=Path, shown="model.pth; the resumed file with --resume")
    plot: Path | None = _flag(None, "write the loss curves as a PNG at each evaluation", FILES, "PATH",
                              type=Path, shown="none")

    sample_tokens: int = _flag(500, "characters sampled at the end", SAMPLING, "N", type=int)
    sample_from: Path | None = _flag(None, "only print a sample from the checkpoint at PATH and exit", SAMPLING,
                                     "PATH", type=Path)
    prompt: str = _flag("", "text the sample continues, with --sample-from", SAMPLING, "TEXT", shown="none")
    temperature: float = _flag(1.0, "softmax temperature, > 0", SAMPLING, "T", type=float)
    top_k: int | None = _flag(None, "sample among the k likeliest characters only", SAMPLING, "N", type=int,
                              shown="all")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def loop_settings(self) -> dict:
        """The loop fields a checkpoint keeps, so that a resumed run goes on with them."""
        return {f.name: getattr(self, f.name) for f in FIELDS if f.metadata["saved"]}


FIELDS = dataclasses.fields(RunConfig)
FIELD = {f.name: f for f in FIELDS}
# The flags that mean something with --sample-from; the rest are refused there.
SAMPLING_FLAGS = {"sample_from", "prompt", "temperature", "top_k", "seed", "sample_tokens", "device", "backend",
                  "dtype"}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def shown_default(f: dataclasses.Field) -> str:
    """The default as --help and the README show it."""
    if f.metadata["shown"] is not None:
        return f.metadata["shown"]
    if f.default is None:
        return "none"
    return str(f.default)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage dump: the message names the flag and what is allowed.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line, one flag per RunConfig field. Flags not given are absent from the result
    (argparse.SUPPRESS), so that a run can tell a value given from a default."""
    p = _Parser(
        prog="train.py",
        description="Train the seed's character-level GPT on tiny Shakespeare, print its losses and a "
        "sample, and save checkpoints; or resume a run; or sample from a checkpoint. Defaults are the "
        "seed's hyperparameters; --preset cpu trains a smaller model in minutes on a CPU.",
        epilog="Values in [brackets] are the defaults.",
        argument_default=argparse.SUPPRESS,
    )
    groups = {}
    for f in FIELDS:
        meta = f.metadata
        group = groups.get(meta["group"]) or groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        kw = dict(meta["argparse"])
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        group.add_argument(flag_name(f.name), help=f"{meta['help']} [{shown_default(f)}]", **kw)
    return p


def parse_flags(argv=None) -> dict:
    """{field name: value} for the flags given on the command line (argparse exits 2 on a bad one)."""
    return vars(build_parser().parse_args(argv))


def flag_table() -> str:
    """The README's table of flags, from the same fields as --help."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in FIELDS:
        meta = f.metadata
        name = flag_name(f.name)
        if meta["argparse"].get("action") is argparse.BooleanOptionalAction:
            name = f"{name}, --no-{name[2:]}"
        elif "choices" in meta["argparse"]:
            name = f"{name} {{{','.join(meta['argparse']['choices'])}}}"
        elif meta["metavar"]:
            name = f"{name} {meta['metavar']}"
        if meta["argparse"].get("nargs") == "?":
            name = f"{flag_name(f.name)} [{meta['metavar']}]"
        rows.append(f"| `{name}` | {shown_default(f)} | {meta['help']} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- checks


def check_flags(given: dict, world_size: int = 1) -> None:
    """Every value given (or settled) checked before any work starts: UsageError naming the flag."""
    for name in ("batch_size", "eval_interval", "eval_iters", "grad_accum", "n_embd", "n_head", "n_layer",
                 "block_size"):
        value = given.get(name)
        if value is not None and value <= 0:
            raise UsageError(f"{flag_name(name)} must be a positive integer, got {value}")
    for name in ("max_iters", "sample_tokens", "log_interval"):
        value = given.get(name)
        if value is not None and value < 0:
            raise UsageError(f"{flag_name(name)} must be >= 0, got {value}")
    n_embd, n_head = given.get("n_embd"), given.get("n_head")
    if n_embd is not None and n_head is not None and n_embd % n_head:
        raise UsageError(f"--n-embd {n_embd} is not divisible by --n-head {n_head}")
    dropout = given.get("dropout")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {dropout}")
    lr = given.get("learning_rate")
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"--learning-rate must be a positive number, got {lr}")
    seed = given.get("seed")
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"--seed must be in [0, 2**62), got {seed}")
    temperature = given.get("temperature")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise UsageError(f"--temperature must be > 0, got {temperature}")
    top_k = given.get("top_k")
    if top_k is not None and top_k <= 0:
        raise UsageError(f"--top-k must be a positive integer, got {top_k}")
    batch, accum = given.get("batch_size"), given.get("grad_accum")
    if batch is not None and accum is not None:
        per_rank, rem = divmod(batch, world_size)
        if rem or per_rank % accum:
            raise UsageError(
                f"--grad-accum {accum} does not divide --batch-size {batch} over {world_size} rank(s): the "
                f"batch must be a multiple of ranks x grad-accum ({world_size * accum})"
            )
    if given.get("plot") is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib (or the project's [plot] extra)") from None


def refuse_ignored(given: dict) -> None:
    """A flag that would do nothing in the mode chosen is refused, saying why."""
    if "sample_from" in given:
        extra = sorted(set(given) - SAMPLING_FLAGS, key=list(FIELD).index)
        if extra:
            raise UsageError(f"{flag_name(extra[0])} does nothing with --sample-from, which only samples from "
                             "the checkpoint; drop it")
        return
    if "prompt" in given:
        raise UsageError("--prompt is for --sample-from; a training run's sample starts from a newline, as the "
                         "seed's does")
    if "resume" in given and "preset" in given:
        raise UsageError("--preset does nothing with --resume, which keeps the checkpoint's settings; drop it")
    if given.get("sample_tokens") == 0:
        for name in ("temperature", "top_k"):
            if name in given:
                raise UsageError(f"{flag_name(name)} does nothing with --sample-tokens 0 (no sample); drop it")


def settle(given: dict, saved: dict | None = None) -> RunConfig:
    """The run's configuration: the flags given over, when resuming, the checkpoint's model and loop
    settings (a model flag that differs is refused), over the preset, over the defaults."""
    values = dict(PRESETS[given["preset"]]) if "preset" in given else {}
    if saved is not None:
        for name in MODEL_FIELDS:
            value = saved["config"].get(name)
            if name in given and given[name] != value:
                raise UsageError(f"{flag_name(name)} {given[name]} differs from the checkpoint's {value}: a "
                                 "resumed run keeps its model; drop the flag")
            values[name] = value
        values.update({k: v for k, v in saved.get("loop", {}).items() if k in FIELD and FIELD[k].metadata["saved"]})
    values.update(given)
    return RunConfig(**values)


def check_writable(flag: str, path: Path) -> None:
    """UsageError unless a file can be created at path: by creating and removing the temporary file
    that an atomic write would use beside it."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file path")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    probe = path.with_name(path.name + ".tmp")
    try:
        with open(probe, "xb"):
            pass
        os.remove(probe)
    except FileExistsError:  # a stale one from an earlier run, replaced at the first write: can we write it?
        try:
            open(probe, "ab").close()
        except OSError as e:
            raise UsageError(f"{flag} {path}: cannot write there ({e.strerror or type(e).__name__})") from None
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write there ({e.strerror or type(e).__name__})") from None


def check_distinct(outputs: list[tuple[str, Path | None]], inputs: list[tuple[str, Path | None]]) -> None:
    """UsageError when one file (however it is named) would be two of the run's outputs, or an output
    and an input: a checkpoint written over the text, a plot over a checkpoint. outputs and inputs:
    (what, path) pairs, None for a path not in use."""
    seen: list[tuple[str, Path]] = []
    for what, path in outputs:
        if path is None:
            continue
        for other, other_path in seen + [(w, p) for w, p in inputs if p is not None]:
            if _same_file(path, other_path):
                raise UsageError(f"{what} {path} is also {other} {other_path}: it would be overwritten; give "
                                 "each output a path of its own")
        seen.append((what, path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # hard links and symbolic links too
    except OSError:
        pass
    return a.resolve() == b.resolve()


# ----------------------------------------------------------------------------- where and how it runs


@dataclass(frozen=True)
class Execution:
    """Where the run computes and with what: settled from the flags and the machine."""

    device: torch.device
    backend: str
    dtype: torch.dtype
    cuda_graphs: bool
    compile_mode: str | None


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available; use --device cpu")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def resolve_execution(cfg: RunConfig, world_size: int = 1, local_rank: int = 0, training: bool = True) -> Execution:
    """The device, the ops, the dtype and whether to capture CUDA graphs; a combination that cannot
    run, or a flag that would be ignored, is a UsageError."""
    device = resolve_device(cfg.device, local_rank)
    on_gpu = device.type == "cuda"
    backend = cfg.backend or ("triton" if on_gpu else "torch")
    dtype = DTYPES[cfg.dtype or ("bfloat16" if on_gpu else "float32")]
    if backend == "triton":
        _check_triton(on_gpu, dtype, cfg.head_dim)
    graphs = False
    if training:
        reason = None
        if not on_gpu:
            reason = "they need a GPU"
        elif world_size > 1:
            reason = "not with data-parallel runs"
        elif dtype == torch.float16:
            reason = "float16's loss scaling is not captured"
        elif cfg.compile is not None:
            reason = "--compile captures its own (reduce-overhead, max-autotune)"
        if cfg.cuda_graphs and reason:
            raise UsageError(f"--cuda-graphs cannot be used here: {reason}; drop it")
        graphs = reason is None and cfg.cuda_graphs is not False
    return Execution(device, backend, dtype, graphs, cfg.compile if training else None)


def _check_triton(on_gpu: bool, dtype, head_dim) -> None:
    if not on_gpu:
        if dtype == torch.bfloat16:
            raise UsageError("--backend triton on the CPU runs in Triton's interpreter, whose bfloat16 dot "
                             "products are wrong (a Triton bug); use --dtype float32")
        # The interpreter must be chosen before triton is first imported (kernels import it).
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        elif os.environ.get("TRITON_INTERPRET") != "1":
            raise UsageError("--backend triton on the CPU needs Triton's interpreter, which this process can "
                             "no longer switch on (triton is already imported); use --device cuda")
    try:
        import kernels.attention  # noqa: F401  (imports triton: the check that it is installed)
    except ImportError:
        raise UsageError("--backend triton needs the triton package (Linux only); use --backend torch or "
                         "reference") from None
    from kernels._common import MAX_HEAD_DIM

    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        raise UsageError(f"--backend triton supports head dims up to {MAX_HEAD_DIM}; --n-embd / --n-head = "
                         f"{head_dim}: use more heads, or --backend torch or reference")


if __name__ == "__main__":
    print(flag_table())  # python -m training.config: the README's flag table
