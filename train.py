"""Train the seed's character GPT on tiny Shakespeare, resume it, or sample from a checkpoint.

    python train.py > output.txt                      # the seed's run (meant for a GPU)
    python train.py --preset cpu                      # a smaller model, in minutes on a CPU
    python train.py --resume model.pth --max-iters 8000
    python train.py --sample-from model.pth --prompt "ROMEO:"
    torchrun --nproc_per_node 2 train.py ...          # data-parallel

Standard output carries the seed's lines (the parameter count, a loss line at every evaluation,
the sample); progress, notes and timings go to standard error. `python train.py --help` explains
every flag. What the loop is built from lives in training/; this file is the command line and the
loop, read top-down: main(), train() (set-up, the loop, the end), sample_from().
"""

import signal
import sys

if __name__ == "__main__":
    # Ctrl-C or SIGTERM while torch is being imported: nothing has started, so leave quietly.
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, lambda signum, frame: sys.exit(128 + signum))

import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from model import GPT, CheckpointError, GPTConfig, read_checkpoint  # noqa: E402
from model.data import DEFAULT_DATA_PATH, DataError, load_dataset  # noqa: E402
from training import dist  # noqa: E402
from training.checkpoint import (  # noqa: E402
    CheckpointWriter, best_path, load_checkpoint, load_optimizer_state, rng_state, set_rng_state, to_cpu,
)
from training.config import (  # noqa: E402
    UsageError, check_distinct, check_flags, check_writable, parse_flags, refuse_ignored, resolve_execution, settle,
)
from training.interrupt import Interrupt, Interrupted  # noqa: E402
from training.metrics import LossPlot, flops_per_token, fmt_seconds, mfu_peak, rates  # noqa: E402
from training.runner import Batches, Precision, StepRunner, TrainingStopped, time_steps  # noqa: E402

EVAL_PROGRESS_AFTER, EVAL_PROGRESS_EVERY = 1.0, 10.0  # seconds into an evaluation: first line, then
SAMPLE_CHUNK = 32  # characters generated between two looks at Ctrl-C


def main(argv=None) -> int:
    interrupt = Interrupt().install()
    ranks = code = None
    try:
        given = parse_flags(argv)
        check_flags(given)
        refuse_ignored(given)
        if "sample_from" in given:
            return sample_from(given, interrupt)
        ranks = dist.start(given.get("device", "auto"))
        interrupt.announce = ranks.is_main
        code = train(given, ranks, interrupt)
        return code
    except (UsageError, DataError, CheckpointError) as e:
        if ranks is None or ranks.is_main:
            print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        if ranks is None or ranks.is_main:
            print(f"train.py: stopped: {e}", file=sys.stderr)
        return 1
    except Interrupted as e:
        if ranks is None or ranks.is_main:
            print(f"train.py: {e}", file=sys.stderr)
        return e.code
    finally:
        interrupt.restore()
        if ranks is not None and ranks.world_size > 1:
            dist.stop(clean=code == 0)


def say(msg: str) -> None:
    print(f"train.py: {msg}", file=sys.stderr, flush=True)


def train(given: dict, ranks: dist.Ranks, interrupt: Interrupt) -> int:
    # ------------------------------------------------------------------------- set-up
    t_start = time.perf_counter()
    is_main = ranks.is_main
    check_flags(given, ranks.world_size)
    out = given.get("out") or given.get("resume") or Path("model.pth")
    plot_path = given.get("plot")
    if is_main:
        for flag, path in (("--out", out), ("--out", best_path(out)), ("--plot", plot_path)):
            if path is not None:
                check_writable(flag, path)
        # Writing back to the --resume file is what --resume does; anything else over an input is not.
        out_flag = "--out" if given.get("out") else "--resume" if given.get("resume") else "--out (default)"
        check_distinct([(out_flag, out), (f"the best-val checkpoint of {out_flag}", best_path(out)),
                        ("--plot", plot_path)], [("--data", given.get("data") or DEFAULT_DATA_PATH)])
        if plot_path is not None and "resume" in given:
            check_distinct([("--plot", plot_path)], [("--resume", given["resume"])])
    ckpt = load_checkpoint(given["resume"]) if "resume" in given else None
    cfg = settle(given, ckpt)
    check_flags(vars(cfg), ranks.world_size)  # again, now that every value is known
    if ckpt is not None:
        if cfg.max_iters <= ckpt["iter"]:
            raise UsageError(f"--max-iters {cfg.max_iters} is not beyond the checkpoint's step {ckpt['iter']}: "
                             "give a larger --max-iters to train on")
        if is_main:
            say(f"resumed from step {ckpt['iter']} of {given['resume']}; checkpoints go to {out}")
    ex = resolve_execution(cfg, ranks.world_size, ranks.local_rank)
    tokenizer, train_data, val_data = load_dataset(cfg.data, cfg.block_size, ex.device,
                                                   ckpt["vocab"] if ckpt else None)
    interrupt.stop_here("during start-up, before any training: nothing to save")

    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        model, _ = GPT.from_checkpoint(ckpt, ex.backend)
    else:
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=cfg.block_size, n_embd=cfg.n_embd,
                              n_head=cfg.n_head, n_layer=cfg.n_layer, dropout=cfg.dropout, backend=ex.backend))
    model.to(ex.device).train()
    if is_main:
        print(model.num_parameters() / 1e6, "M parameters", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, fused=ex.device.type == "cuda",
                                  capturable=ex.cuda_graphs)
    start, best_val, history = 0, float("inf"), []
    if ckpt is not None:
        load_optimizer_state(optimizer, ckpt["optimizer"])  # this run's lr and flags, the saved moments
        start, best_val, history = ckpt["iter"], ckpt["best_val_loss"], list(ckpt.get("history", []))
        set_rng_state(ckpt["rng"], ex.device)
    if ranks.world_size > 1:
        # Each rank its own batches and dropout (DDP starts every rank from rank 0's weights). A resumed
        # data-parallel run reseeds from the step, as one checkpoint holds only rank 0's random state.
        torch.manual_seed((cfg.seed + 7919 * start + ranks.rank) % 2**64)
    batches = Batches(train_data, val_data, cfg.batch_size, cfg.block_size, cfg.grad_accum, cfg.eval_iters, cfg.seed)
    precision = Precision(ex.dtype)
    runner = StepRunner(model, optimizer, batches, precision, ranks, graphs=ex.cuda_graphs,
                        compile_mode=ex.compile_mode, start_step=start)
    eval_steps = [it for it in range(start, cfg.max_iters) if it % cfg.eval_interval == 0 or it == cfg.max_iters - 1]
    if is_main:
        announce(cfg, ex, model, ranks, start, len(eval_steps))
        if ex.device.type == "cpu" and ranks.world_size == 1:
            estimate(cfg, model, batches, precision, start, len(eval_steps), interrupt)
    interrupt.stop_here("during start-up, before any training: nothing to save")

    writer = CheckpointWriter(out) if is_main else None
    plot = LossPlot(plot_path, plot_title(cfg, ex, model)) if plot_path is not None and is_main else None
    peak = mfu_peak(ex.device)
    tokens_per_step = cfg.batch_size * cfg.block_size
    flops_per_step = flops_per_token(model, model.config) * tokens_per_step
    one_process = ranks.world_size == 1

    def snapshot(step):
        return to_cpu({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                       "config": model.config.to_dict(), "vocab": tokenizer.chars, "iter": step,
                       "best_val_loss": best_val, "history": history, "rng": rng_state(ex.device),
                       "loop": cfg.loop_settings()})

    def agree():
        """The ranks' shared verdict, read where the loop syncs anyway: stop on a non-finite loss."""
        bad, stop = runner.check(interrupt.requested)
        if bad is not None:
            stop_nonfinite(bad, "training")
        return stop

    def stop_nonfinite(bad_step, where):
        last = "; no checkpoint was written"
        if writer is not None:
            writer.finish()  # the best, kept in memory
            writer.close()
            if out.exists():
                last = f"; the last good checkpoint is {out} (step {load_checkpoint(out)['iter']})"
        # Steps counted from 0, as the "step N:" lines count them; the progress lines count steps done.
        when = f"step {bad_step}" + (f" (iter {bad_step + 1} of the progress lines)" if where == "training" else "")
        raise TrainingStopped(f"the {where} loss became NaN or infinite at {when}{last}")

    def stop_interrupted(done):
        if writer is not None:
            writer.finish(snapshot(done))
            writer.close()
            say(f"interrupted ({interrupt.name}) after iteration {done}: checkpoint saved to {out} "
                f"(continue with --resume {out})")
        return interrupt.exit_code

    # ------------------------------------------------------------------------- the loop
    try:
        t_train0 = time.perf_counter()
        startup, eval_time, last_eval = t_train0 - t_start, 0.0, 0.0
        t_log, steps_since_log = time.perf_counter(), 0
        for it in range(start, cfg.max_iters):
            if it == eval_steps[0]:
                eval_steps.pop(0)
                t0 = time.perf_counter()
                if agree():
                    return stop_interrupted(it)
                progress = eval_progress(it) if is_main else None
                losses = runner.evaluate(it, progress, stop=(lambda: interrupt.requested) if one_process else None)
                if losses is None:
                    return stop_interrupted(it)
                if not all(map(math.isfinite, losses.values())):
                    stop_nonfinite(it, "evaluation")
                history.append((it, losses["train"], losses["val"]))
                improved, best_val = losses["val"] < best_val, min(best_val, losses["val"])
                if is_main:
                    print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
                    state = snapshot(it)
                    if improved:
                        writer.keep_best(state)
                    if eval_steps:  # the last evaluation's state is written at the end, one step later
                        writer.write(state)
                    if plot is not None:
                        plot.write(history)
                last_eval = time.perf_counter() - t0
                eval_time += last_eval
                t_log += last_eval
            loss = runner.train_step()
            done = it + 1
            steps_since_log += 1
            if cfg.log_interval and done % cfg.log_interval == 0:
                stop = agree()  # reads the device: a sync, at progress points only
                now = time.perf_counter()
                if is_main:
                    left = (cfg.max_iters - done) * (now - t_log) / steps_since_log + len(eval_steps) * last_eval
                    print(f"iter {done}/{cfg.max_iters} | loss {loss.item():.4f} | "
                          f"{rates(now - t_log, steps_since_log, tokens_per_step, flops_per_step, peak)} | "
                          f"{fmt_seconds(left)} left", file=sys.stderr, flush=True)
                t_log, steps_since_log = now, 0
                if stop:
                    return stop_interrupted(done)
            elif one_process and interrupt.requested:
                agree()
                return stop_interrupted(done)
        agree()
        if ex.device.type == "cuda":
            torch.cuda.synchronize()
        train_time = time.perf_counter() - t_train0 - eval_time

        # ------------------------------------------------------------------------- the end
        if writer is not None:
            writer.finish(snapshot(cfg.max_iters))  # written while the sample is drawn
        t0 = time.perf_counter()
        sampled = True
        if cfg.sample_tokens and is_main:
            context = torch.zeros((1, 1), dtype=torch.long, device=ex.device)  # (1, 1): a newline, as the seed
            sampled = sample(model, tokenizer, context, cfg, precision, ex.device, interrupt)
        sample_time = time.perf_counter() - t0
        if writer is not None:
            writer.close()
            trained = cfg.max_iters - start
            total = time.perf_counter() - t_start
            say(f"time: {total:.1f} s = start-up {startup:.1f} + training {train_time:.1f} + evaluation "
                f"{eval_time:.1f} + sampling {sample_time:.1f}; "
                f"{rates(train_time, trained, tokens_per_step, flops_per_step, peak)}; checkpoint {out}")
        if not sampled:
            say(f"interrupted ({interrupt.name}) while sampling; the checkpoint at step {cfg.max_iters} is {out}")
            return interrupt.exit_code
        return 0
    finally:  # however the run ends, the best state kept in memory is written and every write finished
        if writer is not None:
            writer.finish()
            writer.close()


def announce(cfg, ex, model, ranks, start, n_evals) -> None:
    """What the run is about to do, before any of it (the first evaluation can take long on a CPU)."""
    c = model.config
    where = "the CPU" if ex.device.type == "cpu" else f"{ex.device} ({torch.cuda.get_device_name(ex.device)})"
    ops = f"{ex.backend} ops"
    if ex.backend == "triton" and ex.device.type == "cpu":
        ops += " in Triton's interpreter (slow)"
    how = [ops, str(ex.dtype).removeprefix("torch.")]
    if ex.compile_mode:
        how.append(f"torch.compile {ex.compile_mode}")
    if ex.cuda_graphs:
        how.append("CUDA graphs")
    if ranks.world_size > 1:
        how.append(f"{ranks.world_size} ranks")
    say(f"training a {model.num_parameters() / 1e6:.2f} M-parameter GPT ({c.n_layer} layers, width {c.n_embd}, "
        f"context {c.block_size}) from step {start} to {cfg.max_iters}, {cfg.batch_size} sequences a step, on "
        f"{where}: {', '.join(how)}; {n_evals} evaluations of 2 x {cfg.eval_iters} batches")


def estimate(cfg, model, batches, precision, start, n_evals, interrupt) -> None:
    """How long the run will take on the CPU, from a few timed steps on a copy of the model."""
    say("timing a few steps to estimate how long this takes (Ctrl-C stops)")
    step_s, eval_s = time_steps(model, batches, precision)
    interrupt.stop_here("during start-up, before any training: nothing to save")
    train_s, evals_s = step_s * (cfg.max_iters - start), eval_s * 2 * cfg.eval_iters * n_evals
    say(f"estimate: about {step_s:.2f} s a step and {eval_s:.2f} s an evaluation batch: {fmt_seconds(train_s)} "
        f"of training and {fmt_seconds(evals_s)} of evaluation, about {fmt_seconds(train_s + evals_s)} in all")
    if train_s + evals_s > 600 and cfg.preset is None:
        say("that is long for a CPU (the seed's model is meant for a GPU); a smaller model of the same design "
            "reaches a val loss under 2.0 in minutes on a CPU: python train.py --preset cpu")


def eval_progress(step):
    """A progress(done, total) for a long evaluation: a line on stderr once it has run a second, then
    every ten seconds."""
    t0 = time.perf_counter()
    next_at = t0 + EVAL_PROGRESS_AFTER

    def progress(done, total):
        nonlocal next_at
        now = time.perf_counter()
        if now >= next_at and done < total:
            say(f"evaluating at step {step}: {done}/{total} batches, {fmt_seconds(now - t0)}")
            next_at = now + EVAL_PROGRESS_EVERY

    return progress


def plot_title(cfg, ex, model) -> str:
    c = model.config
    return (f"{model.num_parameters() / 1e6:.2f} M-parameter GPT: {c.n_layer} layers, width {c.n_embd}, context "
            f"{c.block_size}\nbatch {cfg.batch_size}, lr {cfg.learning_rate:g}, {ex.backend} ops on {ex.device.type}")


def sample(model, tokenizer, context, cfg, precision, device, interrupt) -> bool:
    """Print the context and sample_tokens characters after it, as they come; False when interrupted.

    Drawn in chunks, to look at Ctrl-C between them; a chunked draw is the same as one long draw
    (each character is drawn from the same generator, in the same order)."""
    model.eval()
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    print(tokenizer.decode(context[0].tolist()), end="", flush=True)
    ids = context
    left = cfg.sample_tokens
    with precision.autocast(device):
        while left > 0:
            if interrupt.requested:
                print(flush=True)
                return False
            n = min(SAMPLE_CHUNK, left)
            ids = model.generate(ids, n, cfg.temperature, cfg.top_k, generator)  # (1, T + n)
            print(tokenizer.decode(ids[0, -n:].tolist()), end="", flush=True)
            ids, left = ids[:, -model.config.block_size:], left - n
    print(flush=True)
    model.train()
    return True


def sample_from(given: dict, interrupt: Interrupt) -> int:
    ckpt = read_checkpoint(given["sample_from"])
    cfg = settle(given, {"config": ckpt["config"]})
    ex = resolve_execution(cfg, training=False)
    model, tokenizer = GPT.from_checkpoint(ckpt, ex.backend)
    model.to(ex.device)
    try:
        prompt = tokenizer.encode(cfg.prompt)
    except ValueError as e:
        raise UsageError(f"--prompt: {e}") from None
    # No prompt: start from token 0 as the seed does (the newline in tiny Shakespeare).
    context = torch.tensor([prompt or [0]], dtype=torch.long, device=ex.device)  # (1, T)
    if not sample(model, tokenizer, context, cfg, Precision(ex.dtype), ex.device, interrupt):
        say(f"interrupted ({interrupt.name}) while sampling")
        return interrupt.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
