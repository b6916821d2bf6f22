"""The step runner: one training step and one evaluation, eager, compiled, or replayed from CUDA graphs.

No host synchronisation inside a step: batches are sampled on the device, and a non-finite loss is
recorded on the device (the first bad step) to be read by check() at the points where the loop reads
the device anyway (progress lines and evaluations). Under torchrun, check() is also where the ranks
agree: on the earliest bad step of any rank, and on stopping when any rank was asked to.

With CUDA graphs, the first WARMUP steps run eagerly (compiling the Triton kernels), then the whole
step (sampling, forward, backward, AdamW) is captured once and replayed; the evaluation forward
likewise. The random draws inside (batch offsets, dropout seeds) come from torch's CUDA generator,
which advances on every replay, so each replay gets fresh batches and dropout bits.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from model.data import get_batch
from training.dist import Ranks
from training.metrics import note

WARMUP = 3  # eager steps before the training step is captured
NO_BAD_STEP = 2**62  # "no non-finite loss yet", as the cross-rank minimum sees it


class TrainingStopped(Exception):
    """The run cannot go on (a non-finite loss, a failed CUDA graph capture that left the device
    unusable); printed as one line, exit status 1."""


@dataclass(frozen=True)
class Batches:
    """Where the batches come from: token ids on the device, and how many of them per step."""

    train: torch.Tensor  # (N_train,) token ids
    val: torch.Tensor  # (N_val,)
    batch_size: int  # sequences per optimizer step over all ranks; an evaluation batch has as many
    block_size: int  # T
    grad_accum: int = 1  # micro-batches per step on each rank
    eval_iters: int = 200  # batches per split in one evaluation, shared out among the ranks
    seed: int = 0  # the run's seed, from which each evaluation batch's own seed is made


@dataclass(frozen=True)
class Precision:
    """The compute dtype: float32, or bfloat16/float16 under autocast with float32 weights."""

    dtype: torch.dtype = torch.float32

    def autocast(self, device: torch.device, cache: bool = True):
        if self.dtype == torch.float32:
            return nullcontext()
        # Autocast's weight-cast cache would outlive a graph capture, so graphs run without it.
        return torch.autocast(device.type, dtype=self.dtype, cache_enabled=cache)


def eval_seed(seed: int, step: int, split: int, k: int) -> int:
    """Each evaluation batch has its own seed: evaluation never touches the training's random stream,
    and its result does not depend on how many ranks share the batches. Taken modulo 2**64, which
    torch's generators accept whatever the run's seed."""
    return ((seed * 1_000_003 + step * 1009 + split) * 100_003 + k) % 2**64


class StepRunner:
    """Runs the training step (train_step) and the evaluation (evaluate) of one model.

    model: the GPT (not wrapped); the runner wraps it in DistributedDataParallel for ranks.world_size
    > 1 and in torch.compile(mode=compile_mode) when compile_mode is given, and evaluates through the
    compiled model too (one process). graphs: capture the step and the evaluation forward in CUDA
    graphs (a GPU, one process, no float16, no compile_mode). start_step: the steps already done.
    """

    def __init__(self, model, optimizer, batches: Batches, precision: Precision = Precision(),
                 ranks: Ranks = Ranks(), graphs: bool = False, compile_mode: str | None = None,
                 start_step: int = 0):
        self.model, self.optimizer, self.batches, self.ranks = model, optimizer, batches, ranks
        self.device = batches.train.device
        if graphs:  # what train.py's flags already refuse, refused here too for code that builds a runner
            why = ("a CUDA device" if self.device.type != "cuda" else "one process" if ranks.world_size > 1
                   else "no float16 (GradScaler reads the device)" if precision.dtype == torch.float16
                   else "no compile_mode (torch.compile captures its own)" if compile_mode is not None else None)
            if why is not None:
                raise ValueError(f"graphs=True needs {why}")
        self.micro_batch = batches.batch_size // ranks.world_size // batches.grad_accum
        train_model = model
        if ranks.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(model, device_ids=[ranks.local_rank] if self.device.type == "cuda"
                                                  else None)
        if compile_mode is not None:
            train_model = torch.compile(train_model, mode=compile_mode)
        self.train_model = train_model
        # A compiled model evaluates compiled too; under DDP the bare module evaluates (no gradient sync).
        self.eval_model = train_model if ranks.world_size == 1 else model
        # CUDA graphs that torch.compile captures (reduce-overhead, max-autotune) reuse their outputs'
        # memory: each call is marked as a new step, and no output is held across calls.
        self.mark_step = compile_mode in ("reduce-overhead", "max-autotune")
        self.autocast = precision.autocast(self.device, cache=not graphs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision.dtype == torch.float16)
        self.step_t = torch.full((), start_step, dtype=torch.long, device=self.device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self._train = self._eval = None
        if graphs:
            self._train = _GraphedCall(self._step, WARMUP, "training step", self.device)
            self.static_x = torch.zeros(batches.batch_size, batches.block_size, dtype=torch.long, device=self.device)
            self.static_y = torch.zeros_like(self.static_x)
            self._eval = _GraphedCall(self._static_eval_loss, 1, "evaluation forward", self.device)

    @property
    def graphed(self) -> bool:
        """Whether the training step is being replayed from a CUDA graph."""
        return self._train is not None and self._train.graph is not None

    # ------------------------------------------------------------------------- training

    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns the mean loss of its micro-batches, a scalar on the device
        (not read here: reading it waits for the step)."""
        return self._train() if self._train is not None else self._step()

    def _step(self):
        accum, model = self.batches.grad_accum, self.train_model
        # Inside a capture this only drops the references: backward then allocates the gradients
        # from the graph's pool, and every replay writes them afresh.
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            xb, yb = get_batch(self.batches.train, self.micro_batch, self.batches.block_size)  # (B, T) x2
            sync = model.no_sync() if self.ranks.world_size > 1 and micro < accum - 1 else nullcontext()
            if self.mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            with sync:
                with self.autocast:
                    _, loss = model(xb, yb)
                self.scaler.scale(loss / accum).backward()
            total += loss.detach().float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loss = total / accum
        bad_now = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(bad_now, self.step_t, self.first_bad))
        self.step_t += 1
        return loss

    def check(self, interrupted: bool = False) -> tuple[int | None, bool]:
        """(the first step whose loss was not finite, or None; whether to stop), read from the device.

        Under torchrun the ranks agree, in one all-reduce: the earliest bad step of any rank, and a
        stop when any rank was interrupted. Every rank must call it at the same steps.
        """
        bad = torch.where(self.first_bad >= 0, self.first_bad, NO_BAD_STEP)
        flags = torch.stack([bad, torch.full_like(bad, -int(interrupted))])
        if self.ranks.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        bad, stop = flags.tolist()
        return (None if bad == NO_BAD_STEP else bad), stop < 0

    # ------------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, step: int, progress=None, stop=None) -> dict | None:
        """Mean loss over eval_iters batches of each split: {"train": ..., "val": ...}.

        The batches are shared out among the ranks and summed with one all-reduce. progress(done,
        total) is called after each batch; stop() before each, and a True ends the evaluation early
        with None (one process only: under torchrun every rank must reach the all-reduce).
        """
        b = self.batches
        gen = torch.Generator(device=self.device)
        mine = [(split, k) for split in (0, 1) for k in range(self.ranks.rank, b.eval_iters, self.ranks.world_size)]
        sums = torch.zeros(2, device=self.device)
        self.model.eval()
        try:
            for done, (split, k) in enumerate(mine):
                if stop is not None and stop():
                    return None
                gen.manual_seed(eval_seed(b.seed, step, split, k))
                xb, yb = get_batch(b.val if split else b.train, b.batch_size, b.block_size, gen)  # (B, T) x2
                sums[split] += self.eval_loss(xb, yb).float()
                if progress is not None:
                    progress(done + 1, len(mine))
        finally:
            self.model.train()
        if self.ranks.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        means = (sums / b.eval_iters).tolist()
        return {"train": means[0], "val": means[1]}

    def eval_loss(self, xb, yb) -> torch.Tensor:
        """The loss of one batch (B, T), replayed from a CUDA graph when graphs are on; call it in eval
        mode under no_grad (as evaluate does)."""
        if self._eval is None:
            if self.mark_step:
                torch.compiler.cudagraph_mark_step_begin()
            with self.autocast:
                return self.eval_model(xb, yb)[1]
        self.static_x.copy_(xb)
        self.static_y.copy_(yb)
        return self._eval()

    def _static_eval_loss(self):
        with self.autocast:
            return self.eval_model(self.static_x, self.static_y)[1]


class _GraphedCall:
    """fn() replayed from one CUDA graph.

    The first `warmup` calls run fn eagerly on a side stream, as capture wants (PyTorch's CUDA graphs
    notes); the next call captures fn and replays it, and so does every call after. If the capture
    fails, that call and all later ones run fn eagerly, after one note saying why, unless the failure
    left the device unusable: a CUDA error inside the capture makes torch's capture_end raise before
    it restores the stream and the generator (torch/cuda/graphs.py, CUDAGraph.cpp), and the next eager
    random draw then fails ("Offset increment outside graph capture"). That stops the run with
    TrainingStopped, saying to run without graphs.
    """

    def __init__(self, fn, warmup: int, what: str, device: torch.device):
        self.fn, self.warmup, self.what, self.device = fn, warmup, what, device
        self.calls = 0
        self.graph = self.out = None
        self.failed = False

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if self.failed:
            return self.fn()
        if self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                out = self.fn()
            torch.cuda.current_stream(self.device).wait_stream(side)
            return out
        stream = torch.cuda.current_stream(self.device)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.fn()
        except Exception as e:  # capture is all or nothing: run eagerly from now on
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            torch.cuda.set_stream(stream)  # a capture ended by a CUDA error leaves its own stream current
            if not _eager_draws_work(self.device):
                raise TrainingStopped(f"CUDA graph capture of the {self.what} failed ({first}) and left the "
                                      "device's random generator unusable; run again with --no-cuda-graphs") from None
            note(f"CUDA graph capture of the {self.what} failed ({first}); running it eagerly")
            self.failed = True
            return self.fn()
        self.graph, self.out = graph, out
        graph.replay()
        return out


def _eager_draws_work(device: torch.device) -> bool:
    """Whether the device still runs eager work and random draws from its default generator (what
    the step and the batches use) after a failed capture."""
    try:
        torch.cuda.synchronize(device)
        torch.empty(1, device=device).uniform_()
        torch.cuda.synchronize(device)
        return True
    except RuntimeError:
        return False


def time_steps(model, batches: Batches, precision: Precision = Precision(), steps: int = 1,
               probe_tokens: int = 2048) -> tuple[float, float]:
    """Estimated seconds per training step and per evaluation batch at the run's batch size.

    Timed on a copy of the model with an AdamW of its own (the run's model, optimizer and random state
    are untouched), on a smaller batch of about probe_tokens tokens when the run's is larger, scaled
    up by the batch: one untimed step, then `steps` timed ones and one evaluation batch per split.
    Meant for the CPU, where a step is timed by the host clock (a GPU would want a synchronize).
    """
    b = max(1, min(batches.batch_size, probe_tokens // batches.block_size))
    model_copy = copy.deepcopy(model)
    optimizer_copy = torch.optim.AdamW(model_copy.parameters())
    probe = StepRunner(model_copy, optimizer_copy, replace(batches, batch_size=b, grad_accum=1, eval_iters=1),
                       precision)
    with torch.random.fork_rng(devices=[]):
        probe.train_step()
        t0 = time.perf_counter()
        for _ in range(steps):
            probe.train_step()
        t_step = (time.perf_counter() - t0) / steps
        t0 = time.perf_counter()
        probe.evaluate(0)
        t_eval = (time.perf_counter() - t0) / 2
    scale = batches.batch_size / b
    return t_step * scale, t_eval * scale
