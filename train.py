"""Train the seed's character GPT on tiny Shakespeare, resume it, or sample from a checkpoint.

    python train.py > output.txt                      # the seed's run
    python train.py --resume model.pth --max-iters 8000
    python train.py --sample-from model.pth --prompt "ROMEO:"
    torchrun --nproc_per_node 2 train.py ...          # data-parallel

Standard output carries the seed's lines (the parameter count, a loss line at every evaluation,
the sample); progress, notes and timings go to standard error. `python train.py --help` explains
every flag.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from model import GPT, GPTConfig
from model.backends import BACKENDS
from model.data import DEFAULT_DATA_PATH, CharTokenizer, DataError, get_batch, load_text, train_val_split

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_FLAGS = ("n_embd", "n_head", "n_layer", "block_size", "dropout")
# The training loop's flags and the seed's values for them.
LOOP_DEFAULTS = {"batch_size": 64, "grad_accum": 1, "max_iters": 5000, "learning_rate": 3e-4,
                 "eval_interval": 500, "eval_iters": 200, "seed": 0}
CHECKPOINT_KEYS = {"model", "optimizer", "config", "vocab", "iter", "best_val_loss"}

# Dense bf16/fp16 tensor-core peaks in FLOP/s, by a substring of torch.cuda.get_device_name().
# Most specific first. MFU is reported against these whatever the run's dtype.
GPU_PEAK_FLOPS = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A10G", 70e12), ("A10", 125e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12),
    ("T4", 65e12),
)


class UsageError(Exception):
    """A flag, file or input the run cannot use; printed as one line, exit status 2."""


class TrainingStopped(Exception):
    """The run cannot go on (a non-finite loss); printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage dump: the message names the flag and what is allowed.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = GPTConfig()
    p = _Parser(
        prog="train.py",
        description="Train the seed's character-level GPT on tiny Shakespeare, print its losses and a "
        "sample, and save checkpoints; or resume a run; or sample from a checkpoint. Defaults are the "
        "seed's hyperparameters.",
        epilog="Values in [brackets] are the defaults.",
    )
    # Model flags default to None so that --resume can tell what was given; None means the seed's value.
    g = p.add_argument_group("model (fixed by the checkpoint when resuming)")
    g.add_argument("--n-embd", type=int, metavar="N", help=f"width C of the residual stream [{d.n_embd}]")
    g.add_argument("--n-head", type=int, metavar="N", help=f"attention heads, must divide --n-embd [{d.n_head}]")
    g.add_argument("--n-layer", type=int, metavar="N", help=f"transformer blocks [{d.n_layer}]")
    g.add_argument("--block-size", type=int, metavar="N", help=f"context length in characters [{d.block_size}]")
    g.add_argument("--dropout", type=float, metavar="P", help=f"dropout probability, in [0, 1) [{d.dropout}]")
    g = p.add_argument_group("training (a resumed run keeps its own values unless given)")
    g.add_argument("--batch-size", type=int, metavar="N", help="sequences per optimizer step, over all ranks [64]")
    g.add_argument("--grad-accum", type=int, metavar="N",
                   help="micro-batches per optimizer step on each rank; must divide the batch per rank [1]")
    g.add_argument("--max-iters", type=int, metavar="N", help="optimizer steps in all; a resumed run counts on [5000]")
    g.add_argument("--learning-rate", type=float, metavar="LR", help="AdamW learning rate [3e-4]")
    g.add_argument("--eval-interval", type=int, metavar="N",
                   help="evaluate and checkpoint every this many steps, and at the last step [500]")
    g.add_argument("--eval-iters", type=int, metavar="N", help="batches per split in each evaluation [200]")
    g.add_argument("--seed", type=int, metavar="N", help="torch.manual_seed for the run [0]")
    g.add_argument("--log-interval", type=int, metavar="N", default=100,
                   help="steps between progress lines on standard error, 0 for none [100]")
    g.add_argument("--resume", type=Path, metavar="PATH",
                   help="continue the run saved at PATH: model, optimizer, step, best val loss, random state")
    g = p.add_argument_group("execution")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run; auto picks cuda when a GPU is available [auto]")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="ops: reference (the seed's math), torch (SDPA, F.layer_norm) or triton (our "
                   "kernels); default: triton on a GPU, reference on the CPU")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="compute dtype; bfloat16/float16 run under autocast with float32 weights; "
                   "default: bfloat16 on a GPU, float32 on the CPU")
    g.add_argument("--compile", action="store_true", help="run the model under torch.compile")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the training step and the evaluation forward in CUDA graphs; "
                   "default: on where possible (a GPU, one process, not float16)")
    g = p.add_argument_group("input and output")
    g.add_argument("--data", type=Path, metavar="PATH", default=None,
                   help=f"UTF-8 training text [{DEFAULT_DATA_PATH}, downloaded when missing]")
    g.add_argument("--out", type=Path, metavar="PATH", default=Path("model.pth"),
                   help="checkpoint, written at every evaluation and at the end; the best-val one goes "
                   "beside it with .best before the suffix [model.pth]")
    g.add_argument("--plot", type=Path, metavar="PATH", help="write the loss curves as a PNG at each evaluation")
    g = p.add_argument_group("sampling")
    g.add_argument("--sample-tokens", type=int, metavar="N", default=500, help="characters sampled at the end [500]")
    g.add_argument("--sample-from", type=Path, metavar="PATH",
                   help="only print a sample from the checkpoint at PATH and exit")
    g.add_argument("--prompt", metavar="TEXT", default="", help="text the sample continues, with --sample-from [none]")
    g.add_argument("--temperature", type=float, metavar="T", default=1.0, help="softmax temperature, > 0 [1.0]")
    g.add_argument("--top-k", type=int, metavar="N", default=None, help="sample among the k likeliest characters only [all]")
    return p


# ----------------------------------------------------------------------------- checks and set-up


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_args(args, world_size: int) -> None:
    """Every flag checked before any work starts; flags still None (not given) are skipped."""
    for name in ("batch_size", "eval_interval", "eval_iters", "grad_accum", *MODEL_FLAGS[:4]):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"{_flag(name)} must be a positive integer, got {value}")
    for name in ("max_iters", "sample_tokens", "log_interval"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"{_flag(name)} must be >= 0, got {value}")
    if args.n_embd is not None and args.n_head is not None and args.n_embd % args.n_head:
        raise UsageError(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    lr = args.learning_rate
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"--learning-rate must be a positive number, got {lr}")
    if args.seed is not None and not 0 <= args.seed < 2**62:
        raise UsageError(f"--seed must be in [0, 2**62), got {args.seed}")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_k is not None and args.top_k <= 0:
        raise UsageError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.batch_size is not None and args.grad_accum is not None:
        per_rank, rem = divmod(args.batch_size, world_size)
        if rem or per_rank % args.grad_accum:
            raise UsageError(
                f"--grad-accum {args.grad_accum} does not divide --batch-size {args.batch_size} over "
                f"{world_size} rank(s): the batch must be a multiple of ranks x grad-accum "
                f"({world_size * args.grad_accum})"
            )
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None:
            _check_writable(flag, path)
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install matplotlib (or the project's [plot] extra)") from None


def _fill_defaults(args, ckpt) -> None:
    """Model flags: the checkpoint's when resuming (a different value given is refused), else the
    seed's. Loop flags: as given, else the checkpoint's, else the seed's."""
    config_defaults = GPTConfig()
    for name in MODEL_FLAGS:
        given = getattr(args, name)
        if ckpt is None:
            if given is None:
                setattr(args, name, getattr(config_defaults, name))
            continue
        saved = ckpt["config"].get(name)
        if given is not None and given != saved:
            raise UsageError(f"{_flag(name)} {given} differs from the checkpoint's {saved}: a resumed run "
                             "keeps its model; drop the flag")
        setattr(args, name, saved)
    saved_loop = ckpt.get("loop", {}) if ckpt else {}
    for name, default in LOOP_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, saved_loop.get(name, default))


def _check_writable(flag: str, path: Path) -> None:
    folder = path.resolve().parent
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file path")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: folder {folder} is not writable")


def _resolve_device(args, local_rank: int = 0) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available; use --device cpu")
    if args.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def _resolve_backend_dtype(args, device, head_dim: int):
    on_gpu = device.type == "cuda"
    backend = args.backend or ("triton" if on_gpu else "reference")
    dtype = DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    if backend == "triton":
        if not on_gpu:
            if dtype == torch.bfloat16:
                raise UsageError("--backend triton on the CPU runs in Triton's interpreter, whose bfloat16 "
                                 "dot products are wrong (a Triton bug); use --dtype float32")
            # The interpreter must be chosen before triton is first imported (kernels import it).
            if "triton" not in sys.modules:
                os.environ["TRITON_INTERPRET"] = "1"
            elif os.environ.get("TRITON_INTERPRET") != "1":
                raise UsageError("--backend triton on the CPU needs Triton's interpreter, which this process "
                                 "can no longer switch on (triton is already imported); use --device cuda")
        try:
            from kernels.attention import MAX_HEAD_DIM
        except ImportError:
            raise UsageError("--backend triton needs the triton package (Linux only); "
                             "use --backend torch or reference") from None
        if head_dim > MAX_HEAD_DIM:
            raise UsageError(f"--backend triton supports head dims up to {MAX_HEAD_DIM}; --n-embd / --n-head "
                             f"= {head_dim}: use more heads, or --backend torch or reference")
        if not on_gpu:
            _note("no GPU, so the triton backend runs in Triton's interpreter (slow)")
    return backend, dtype


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


def _load_data(path, block_size, device, vocab=None):
    text = load_text(path or DEFAULT_DATA_PATH, download_if_missing=path is None)
    tokenizer = CharTokenizer.from_text(text) if vocab is None else CharTokenizer(vocab)
    try:
        data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    except ValueError as e:
        raise UsageError(f"the data does not fit the checkpoint's vocabulary: {e}") from None
    train_data, val_data = train_val_split(data)
    shortest = min(len(train_data), len(val_data))
    if shortest <= block_size:
        raise UsageError(
            f"the data ({len(data)} characters) is too short for --block-size {block_size}: each split "
            f"needs more than {block_size} characters (the smaller has {shortest})"
        )
    # Copies held on the device: batches are sampled there, with no per-step host work.
    return tokenizer, train_data.to(device), val_data.to(device)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a temporary file beside the target, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def best_path(path: Path) -> Path:
    """model.pth -> model.best.pth: where the best-val checkpoint goes."""
    return path.with_name(f"{path.stem}.best{path.suffix}")


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by this program, or a one-line UsageError saying what is wrong with it."""
    if not path.exists():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged or foreign file
        raise UsageError(f"checkpoint {path} cannot be read ({type(e).__name__}); is it a torch checkpoint?") from None
    missing = CHECKPOINT_KEYS - set(ckpt) if isinstance(ckpt, dict) else CHECKPOINT_KEYS
    if missing:
        raise UsageError(f"{path} is not a checkpoint of this program (missing {', '.join(sorted(missing))})")
    return ckpt


def _model_from_checkpoint(ckpt, path, backend):
    try:
        config = GPTConfig(**{**ckpt["config"], "backend": backend})
        model = GPT(config)
        model.load_state_dict(ckpt["model"], strict=True)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"checkpoint {path} does not hold a model this program can build: {first}") from None
    return model


# ----------------------------------------------------------------------------- sampling


def sample_from(args) -> int:
    _check_args(args, world_size=1)
    args.seed = LOOP_DEFAULTS["seed"] if args.seed is None else args.seed
    ckpt = load_checkpoint(args.sample_from)
    device = _resolve_device(args)
    head_dim = ckpt["config"].get("n_embd", 0) // max(ckpt["config"].get("n_head", 1), 1)
    backend, dtype = _resolve_backend_dtype(args, device, head_dim)
    model = _model_from_checkpoint(ckpt, args.sample_from, backend).to(device).eval()
    tokenizer = CharTokenizer(ckpt["vocab"])
    try:
        prompt = tokenizer.encode(args.prompt)
    except ValueError as e:
        raise UsageError(f"--prompt: {e}") from None
    # No prompt: start from token 0 as the seed does (the newline in tiny Shakespeare).
    context = torch.tensor([prompt or [0]], dtype=torch.long, device=device)  # (1, T)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    with autocast:
        ids = model.generate(context, args.sample_tokens, args.temperature, args.top_k, generator)[0].tolist()
    print(tokenizer.decode(ids), flush=True)
    return 0


# ----------------------------------------------------------------------------- training


def _eval_seed(seed: int, step: int, split: int, k: int) -> int:
    """Each evaluation batch has its own seed: evaluation never touches the training's random stream,
    and its result does not depend on how many ranks share the batches."""
    return (seed * 1_000_003 + step * 1009 + split) * 100_003 + k


def _rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def mfu_peak(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)


def flops_per_token(model, config):
    """Training FLOPs per token: 6 per parameter plus attention's 12 * L * T * C (as nanoGPT counts)."""
    return 6 * model.num_parameters() + 12 * config.n_layer * config.block_size * config.n_embd


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Interrupt:
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop) sets a flag that the loop checks between
    steps, to checkpoint and exit; a second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested is not None:
            self.restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Plot:
    def __init__(self, path: Path):
        import matplotlib

        matplotlib.use("Agg")
        self.path = path

    def write(self, history):
        import matplotlib.pyplot as plt

        steps = [h[0] for h in history]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(steps, [h[1] for h in history], marker="o", label="train")
        ax.plot(steps, [h[2] for h in history], marker="o", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean over the evaluation batches)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.path.with_name(self.path.name + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.path)


def _use_cuda_graphs(args, device, world, dtype) -> bool:
    """On by default where the step can be captured: a GPU, one process, no float16 loss scaling."""
    if args.cuda_graphs is False:
        return False
    reason = None
    if device.type != "cuda":
        reason = "they need a GPU"
    elif world > 1:
        reason = "not with data-parallel runs"
    elif dtype == torch.float16:
        reason = "float16's loss scaling is not captured"
    elif args.compile:
        reason = "not together with --compile"
    if reason and args.cuda_graphs:
        _note(f"--cuda-graphs ignored: {reason}")
    return reason is None


def _distributed(args):
    """(rank, world_size, local_rank), starting the process group under torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if _resolve_device(args, local).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend)
    return rank, world, local


def train(args, rank: int, world: int, local_rank: int) -> int:
    t_start = time.perf_counter()
    is_main = rank == 0
    _check_args(args, world)
    ckpt = load_checkpoint(args.resume) if args.resume is not None else None
    _fill_defaults(args, ckpt)
    _check_args(args, world)  # again, now that every value is known
    device = _resolve_device(args, local_rank)
    backend, dtype = _resolve_backend_dtype(args, device, args.n_embd // args.n_head)
    tokenizer, train_data, val_data = _load_data(args.data, args.block_size, device,
                                                 ckpt["vocab"] if ckpt else None)

    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_embd=args.n_embd,
                       n_head=args.n_head, n_layer=args.n_layer, dropout=args.dropout, backend=backend)
    model = _model_from_checkpoint(ckpt, args.resume, backend) if ckpt else GPT(config)
    model.to(device)
    if is_main:
        print(model.num_parameters() / 1e6, "M parameters", flush=True)
    use_graphs = _use_cuda_graphs(args, device, world, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=device.type == "cuda",
                                  capturable=use_graphs)
    start_iter, best_val, history = 0, float("inf"), []
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate
        start_iter, best_val, history = ckpt["iter"], ckpt["best_val_loss"], list(ckpt.get("history", []))
        _set_rng_state(ckpt["rng"], device)
    if world > 1:
        # Each rank its own batches and dropout (DDP starts every rank from rank 0's weights). A resumed
        # data-parallel run reseeds from the step, as one checkpoint holds only rank 0's random state.
        torch.manual_seed(args.seed + 7919 * start_iter + rank)

    raw_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    # Autocast's weight-cast cache would outlive a graph capture, so graphs run without it.
    autocast = (torch.autocast(device.type, dtype=dtype, cache_enabled=not use_graphs)
                if dtype != torch.float32 else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    micro_batch = args.batch_size // world // args.grad_accum
    steps = TrainSteps(model, raw_model, optimizer, scaler, autocast, train_data, val_data, micro_batch,
                        args, device, rank, world, start_iter, use_graphs)
    plot = _Plot(args.plot) if args.plot is not None and is_main else None

    def checkpoint(it, path=None):
        if not is_main:
            return
        save_checkpoint(path or args.out, {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "config": config.to_dict(),
            "vocab": tokenizer.chars, "iter": it, "best_val_loss": best_val, "history": history,
            "rng": _rng_state(device), "loop": {name: getattr(args, name) for name in LOOP_DEFAULTS},
        })

    def stop_nonfinite(bad_iter, where):
        # Checkpoints are written only after a check like this one, so the one on disk is good.
        last = "; no checkpoint was written"
        if is_main and args.out.exists():
            last = f"; the last good checkpoint is {args.out} (step {load_checkpoint(args.out)['iter']})"
        raise TrainingStopped(f"the {where} loss became NaN or infinite at iteration {bad_iter}{last}")

    peak = mfu_peak(device)
    flops_per_step = flops_per_token(raw_model, config) * args.batch_size * args.block_size
    tokens_per_step = args.batch_size * args.block_size
    t_train0 = time.perf_counter()
    startup, eval_time = t_train0 - t_start, 0.0
    t_log, steps_since_log = time.perf_counter(), 0
    # Signal handlers can only be installed from the main thread (not so when embedded elsewhere).
    interrupt = _Interrupt() if threading.current_thread() is threading.main_thread() else None
    try:
        for it in range(start_iter, args.max_iters):
            if it % args.eval_interval == 0 or it == args.max_iters - 1:
                t0 = time.perf_counter()
                bad = steps.first_nonfinite()
                if bad is not None:
                    stop_nonfinite(bad, "training")
                losses = steps.evaluate(it)
                if not all(map(math.isfinite, losses.values())):
                    stop_nonfinite(it, "evaluation")
                history.append((it, losses["train"], losses["val"]))
                if is_main:
                    print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
                if losses["val"] < best_val:
                    best_val = losses["val"]
                    checkpoint(it, best_path(args.out))
                checkpoint(it)
                if plot:
                    plot.write(history)
                dt = time.perf_counter() - t0
                eval_time += dt
                t_log += dt
            loss = steps.train_step()
            steps_since_log += 1
            if args.log_interval and (it + 1) % args.log_interval == 0:
                bad = steps.first_nonfinite()  # reads the device: a sync, at progress points only
                if bad is not None:
                    stop_nonfinite(bad, "training")
                now = time.perf_counter()
                ms = 1000 * (now - t_log) / steps_since_log
                left = (args.max_iters - it - 1) * ms / 1000
                mfu = f"{flops_per_step / (ms / 1000) / peak:.1%}" if peak else "n/a"
                if is_main:
                    print(f"iter {it + 1}/{args.max_iters} | loss {loss.item():.4f} | {ms:.1f} ms/iter | "
                          f"{tokens_per_step / ms * 1000:,.0f} tok/s | MFU {mfu} | {_fmt_seconds(left)} left",
                          file=sys.stderr, flush=True)
                t_log, steps_since_log = now, 0
            if interrupt is not None and interrupt.requested:
                bad = steps.first_nonfinite()
                if bad is not None:
                    stop_nonfinite(bad, "training")
                checkpoint(it + 1)
                if is_main:
                    print(f"interrupted ({interrupt.requested}) after iteration {it + 1}: checkpoint saved to "
                          f"{args.out} (continue with --resume {args.out})", file=sys.stderr, flush=True)
                return 130
        bad = steps.first_nonfinite()
        if bad is not None:
            stop_nonfinite(bad, "training")
    finally:
        if interrupt is not None:
            interrupt.restore()
    if device.type == "cuda":
        torch.cuda.synchronize()
    trained = args.max_iters - start_iter
    train_time = time.perf_counter() - t_train0 - eval_time

    t0 = time.perf_counter()
    if args.sample_tokens and is_main:
        raw_model.eval()
        generator = torch.Generator(device=device).manual_seed(args.seed)
        context = torch.zeros((1, 1), dtype=torch.long, device=device)  # (1, 1)
        with autocast:
            ids = raw_model.generate(context, args.sample_tokens, args.temperature, args.top_k, generator)
        print(tokenizer.decode(ids[0].tolist()), flush=True)
        raw_model.train()
    sample_time = time.perf_counter() - t0
    checkpoint(args.max_iters)
    if is_main:
        tok_s = trained * tokens_per_step / train_time if train_time > 0 and trained else 0.0
        mfu = f"{tok_s * flops_per_step / tokens_per_step / peak:.1%}" if peak and tok_s else "n/a"
        total = time.perf_counter() - t_start
        print(f"time: {total:.1f} s = start-up {startup:.1f} + training {train_time:.1f} + evaluation "
              f"{eval_time:.1f} + sampling {sample_time:.1f}; {tok_s:,.0f} tok/s; MFU {mfu}; "
              f"checkpoint {args.out}", file=sys.stderr, flush=True)
    return 0


class TrainSteps:
    """The training step and the evaluation, eager or replayed from CUDA graphs.

    No host synchronisation inside a step: batches are sampled on the device, and a non-finite loss
    is recorded on the device (the first bad iteration) to be read at progress and evaluation points.
    With CUDA graphs, the first WARMUP steps run eagerly (compiling the Triton kernels), then the
    whole step (sampling, forward, backward, AdamW) is captured once and replayed; the evaluation
    forward likewise. The random draws inside (batch offsets, dropout seeds) come from torch's CUDA
    generator, which advances on every replay, so each replay gets fresh batches and dropout bits.
    """

    WARMUP = 3

    def __init__(self, model, raw_model, optimizer, scaler, autocast, train_data, val_data, micro_batch,
                 args, device, rank, world, start_iter, use_graphs):
        self.model, self.raw_model, self.optimizer, self.scaler = model, raw_model, optimizer, scaler
        self.autocast, self.train_data, self.val_data = autocast, train_data, val_data
        self.micro_batch, self.args, self.device = micro_batch, args, device
        self.rank, self.world, self.use_graphs = rank, world, use_graphs
        # A compiled model evaluates compiled too; under DDP the bare module evaluates (no gradient sync).
        self.eval_model = model if world == 1 else raw_model
        self.step_t = torch.full((), start_iter, dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.eager_steps = 0
        self.train_graph = self.eval_graph = None

    def _step(self, zero_grad: bool):
        args, model = self.args, self.model
        total = torch.zeros((), device=self.device)
        for micro in range(args.grad_accum):
            xb, yb = get_batch(self.train_data, self.micro_batch, args.block_size)  # (B, T) x2
            sync = model.no_sync() if self.world > 1 and micro < args.grad_accum - 1 else nullcontext()
            with sync:
                with self.autocast:
                    _, loss = model(xb, yb)
                self.scaler.scale(loss / args.grad_accum).backward()
            total += loss.detach().float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        loss = total / args.grad_accum
        bad_now = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(bad_now, self.step_t, self.first_bad))
        self.step_t += 1
        return loss

    def train_step(self):
        if self.train_graph is not None:
            self.train_graph.replay()
            return self.static_loss
        if not self.use_graphs:
            return self._step(zero_grad=True)
        if self.eager_steps < self.WARMUP:
            # Warm-up on a side stream, as graph capture wants (PyTorch's CUDA graphs notes).
            self.eager_steps += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                loss = self._step(zero_grad=True)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return loss
        try:
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # backward allocates the grads in the graph's pool
            with torch.cuda.graph(graph):
                self.static_loss = self._step(zero_grad=False)
        except Exception as e:  # capture is all or nothing: fall back to the eager step
            self._fall_back("training step", e)
            return self._step(zero_grad=True)
        self.train_graph = graph
        graph.replay()
        return self.static_loss

    def _fall_back(self, what, error):
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        _note(f"CUDA graph capture of the {what} failed ({first}); running it eagerly")
        torch.cuda.synchronize(self.device)
        self.use_graphs = False
        self.optimizer.zero_grad(set_to_none=True)

    def first_nonfinite(self):
        bad = int(self.first_bad)
        return bad if bad >= 0 else None

    def eval_loss(self, xb, yb):
        """The evaluation loss of one batch (B, T), replayed from a CUDA graph when graphs are on."""
        if not self.use_graphs:
            with self.autocast:
                return self.eval_model(xb, yb)[1]
        if self.eval_graph is None:
            self.static_x, self.static_y = xb.clone(), yb.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), self.autocast:
                self.eval_model(self.static_x, self.static_y)  # compiles the inference kernels
            torch.cuda.current_stream(self.device).wait_stream(side)
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph), self.autocast:
                    self.static_eval_loss = self.eval_model(self.static_x, self.static_y)[1]
            except Exception as e:
                self._fall_back("evaluation forward", e)
                return self.eval_loss(xb, yb)
            self.eval_graph = graph
        self.static_x.copy_(xb)
        self.static_y.copy_(yb)
        self.eval_graph.replay()
        return self.static_eval_loss

    @torch.no_grad()
    def evaluate(self, step):
        """Mean loss over eval_iters batches of each split; the batches shared out among the ranks."""
        args, device = self.args, self.device
        gen = torch.Generator(device=device)
        self.raw_model.eval()
        sums = torch.zeros(2, device=device)
        for split, data in enumerate((self.train_data, self.val_data)):
            for k in range(self.rank, args.eval_iters, self.world):
                gen.manual_seed(_eval_seed(args.seed, step, split, k))
                xb, yb = get_batch(data, args.batch_size, args.block_size, gen)  # (B, T) x2
                sums[split] += self.eval_loss(xb, yb).float()
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        self.raw_model.train()
        means = (sums / args.eval_iters).tolist()
        return {"train": means[0], "val": means[1]}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rank = world = local_rank = code = None
    try:
        if args.sample_from is not None:
            return sample_from(args)
        rank, world, local_rank = _distributed(args)
        code = train(args, rank, world, local_rank)
        return code
    except (UsageError, DataError) as e:
        if not rank:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        if not rank:
            print(f"train.py: stopped: {e}", file=sys.stderr)
        return 1
    finally:
        if world and world > 1:
            _leave_process_group(clean=code == 0)


def _leave_process_group(clean: bool) -> None:
    """Tear down the process group. After a clean finish every rank first meets the others at a
    barrier, so that no rank closes its connections while a peer is still at work (once, in CI, a rank
    that left early aborted in gloo's teardown). After an error or an interrupt the ranks may not be at the same point, and
    a barrier could wait forever: skip it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
