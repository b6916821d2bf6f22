"""Train the seed's character GPT on tiny Shakespeare.

    python train.py > output.txt

Standard output carries the seed's lines (the parameter count, a loss line at every evaluation,
the sample); progress and timings go to standard error. Run `python train.py --help` for the flags.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from model import GPT, GPTConfig
from model.backends import BACKENDS
from model.data import DEFAULT_DATA_PATH, CharTokenizer, DataError, get_batch, load_text, train_val_split

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """A flag or input the run cannot use; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage dump: the message names the flag and what is allowed.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    d = GPTConfig()
    p = _Parser(
        prog="train.py",
        description="Train the seed's character-level GPT on tiny Shakespeare, print its losses and "
        "a sample, and save a checkpoint. Defaults are the seed's hyperparameters.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--n-embd", type=int, default=d.n_embd, help="width C of the residual stream")
    g.add_argument("--n-head", type=int, default=d.n_head, help="attention heads (must divide --n-embd)")
    g.add_argument("--n-layer", type=int, default=d.n_layer, help="transformer blocks")
    g.add_argument("--block-size", type=int, default=d.block_size, help="context length in characters")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout probability, in [0, 1)")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=64, help="sequences per training step")
    g.add_argument("--max-iters", type=int, default=5000, help="training steps")
    g.add_argument("--learning-rate", type=float, default=3e-4, help="AdamW learning rate")
    g.add_argument("--eval-interval", type=int, default=500,
                   help="evaluate every this many steps (and at the last step)")
    g.add_argument("--eval-iters", type=int, default=200, help="batches per split in each evaluation")
    g.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the run")
    g.add_argument("--log-interval", type=int, default=100,
                   help="steps between progress lines on standard error (0: none)")
    g = p.add_argument_group("execution")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run; auto picks cuda when a GPU is available")
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="ops implementation: reference (the seed's math), torch (SDPA, F.layer_norm) or "
                   "triton (our kernels); default: triton on a GPU, reference on the CPU")
    g.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="compute dtype; bfloat16/float16 run under autocast with float32 weights; "
                   "default: bfloat16 on a GPU, float32 on the CPU")
    g = p.add_argument_group("input and output")
    g.add_argument("--data", type=Path, default=None,
                   help=f"UTF-8 training text; default {DEFAULT_DATA_PATH}, downloaded when missing")
    g.add_argument("--out", type=Path, default=Path("model.pth"), help="checkpoint written at the end")
    g.add_argument("--sample-tokens", type=int, default=500, help="characters sampled at the end")
    return p


def _check_args(args) -> None:
    positive = ("batch_size", "block_size", "eval_interval", "eval_iters", "n_embd", "n_head", "n_layer")
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name in ("max_iters", "sample_tokens", "log_interval"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.n_embd % args.n_head:
        raise UsageError(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if not 0.0 <= args.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {args.dropout}")
    if not (args.learning_rate > 0 and math.isfinite(args.learning_rate)):
        raise UsageError(f"--learning-rate must be a positive number, got {args.learning_rate}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    out_dir = args.out.resolve().parent
    if not out_dir.is_dir():
        raise UsageError(f"--out {args.out}: folder {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK):
        raise UsageError(f"--out {args.out}: folder {out_dir} is not writable")
    if args.out.is_dir():
        raise UsageError(f"--out {args.out} is a folder; give a file path")


def _resolve_execution(args):
    """(device, backend, dtype) from the flags and the machine."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available; use --device cpu")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    backend = args.backend or ("triton" if on_gpu else "reference")
    dtype = DTYPES[args.dtype or ("bfloat16" if on_gpu else "float32")]
    if backend == "triton" and not on_gpu:
        if dtype == torch.bfloat16:
            raise UsageError("--backend triton on the CPU runs in Triton's interpreter, whose bfloat16 "
                             "dot products are wrong (a Triton bug); use --dtype float32")
        # The interpreter must be chosen before triton is first imported (the model imports it).
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        print("note: no GPU, so the triton backend runs in Triton's interpreter (slow)", file=sys.stderr)
    return device, backend, dtype


def _load_data(args, device):
    text = load_text(args.data or DEFAULT_DATA_PATH, download_if_missing=args.data is None)
    tokenizer = CharTokenizer.from_text(text)
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    train_data, val_data = train_val_split(data)
    shortest = min(len(train_data), len(val_data))
    if shortest <= args.block_size:
        raise UsageError(
            f"the data ({len(data)} characters) is too short for --block-size {args.block_size}: each split "
            f"needs more than {args.block_size} characters (the smaller has {shortest})"
        )
    # Copies held on the device: batches are sampled there, with no per-step host work.
    return tokenizer, train_data.to(device), val_data.to(device)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a temporary file beside the target, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run(args) -> int:
    t_start = time.perf_counter()
    _check_args(args)
    device, backend, dtype = _resolve_execution(args)
    tokenizer, train_data, val_data = _load_data(args, device)

    torch.manual_seed(args.seed)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=args.block_size, n_embd=args.n_embd,
        n_head=args.n_head, n_layer=args.n_layer, dropout=args.dropout, backend=backend,
    )
    try:
        model = GPT(config).to(device)
    except ImportError as e:
        raise UsageError(str(e)) from None
    print(model.num_parameters() / 1e6, "M parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, fused=device.type == "cuda")
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    # Evaluation draws its batches from its own generator, so it never moves the training's stream.
    eval_gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    @torch.no_grad()
    def estimate_loss():
        model.eval()
        out = {}
        for split, data in (("train", train_data), ("val", val_data)):
            losses = torch.zeros(args.eval_iters, device=device)
            for k in range(args.eval_iters):
                xb, yb = get_batch(data, args.batch_size, args.block_size, eval_gen)
                with autocast:
                    losses[k] = model(xb, yb)[1]
            out[split] = losses.mean().item()
        model.train()
        return out

    def checkpoint(it, best_val):
        save_checkpoint(args.out, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "config": config.to_dict(),
            "vocab": tokenizer.chars, "iter": it, "best_val_loss": best_val,
        })

    t_train0 = time.perf_counter()
    startup = t_train0 - t_start
    eval_time = 0.0
    best_val = float("inf")
    tokens_per_step = args.batch_size * args.block_size
    t_log, steps_since_log = time.perf_counter(), 0
    for it in range(args.max_iters):
        if it % args.eval_interval == 0 or it == args.max_iters - 1:
            t0 = time.perf_counter()
            losses = estimate_loss()
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            best_val = min(best_val, losses["val"])
            checkpoint(it, best_val)
            dt = time.perf_counter() - t0
            eval_time += dt
            t_log += dt
        xb, yb = get_batch(train_data, args.batch_size, args.block_size)
        with autocast:
            _, loss = model(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        steps_since_log += 1
        if args.log_interval and (it + 1) % args.log_interval == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            ms = 1000 * (now - t_log) / steps_since_log
            left = (args.max_iters - it - 1) * ms / 1000
            print(f"iter {it + 1}/{args.max_iters} | {ms:.1f} ms/iter | "
                  f"{tokens_per_step / ms * 1000:,.0f} tok/s | {_fmt_seconds(left)} left", file=sys.stderr)
            t_log, steps_since_log = now, 0
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.perf_counter() - t_train0 - eval_time

    t0 = time.perf_counter()
    if args.sample_tokens:
        model.eval()
        sample_gen = torch.Generator(device=device).manual_seed(args.seed)
        context = torch.zeros((1, 1), dtype=torch.long, device=device)  # (1, 1)
        with autocast:
            ids = model.generate(context, args.sample_tokens, generator=sample_gen)[0].tolist()
        print(tokenizer.decode(ids), flush=True)
    sample_time = time.perf_counter() - t0
    checkpoint(args.max_iters, best_val)
    tok_s = args.max_iters * tokens_per_step / train_time if train_time > 0 else float("nan")
    print(f"time: start-up {startup:.1f} s, training {train_time:.1f} s, evaluation {eval_time:.1f} s, "
          f"sampling {sample_time:.1f} s; {tok_s:,.0f} tok/s; checkpoint {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (UsageError, DataError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
