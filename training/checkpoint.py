"""Checkpoints: what one holds, atomic writes off the training thread, loading and resuming.

A checkpoint is a dict: the seed's two keys (`model`, `optimizer`) plus `config` (GPTConfig's
fields), `vocab`, `iter` (the steps completed), `best_val_loss`, `history` (step, train, val),
`rng` (the random generators' states) and `loop` (the loop settings a resumed run keeps).

During a run the latest state is written at every evaluation, and the best (lowest val loss) is
kept in memory and written when the run ends, however it ends (the end, Ctrl-C, a non-finite loss,
an error). Each write copies the state to the CPU on the training thread, then saves it on a
background thread: a temporary file beside the target, then a rename, so a crash or a kill at any
moment leaves the previous file whole.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from model import CheckpointError, read_checkpoint
from training.config import UsageError

CHECKPOINT_KEYS = {"model", "optimizer", "config", "vocab", "iter", "best_val_loss"}
# Optimizer settings that belong to the run, not to the saved state: a resumed optimizer takes this
# run's (a checkpoint from a CPU run must not turn a GPU run's capturable, fused AdamW off).
RUN_OWNED_OPTIMIZER_SETTINGS = ("lr", "capturable", "fused", "foreach", "differentiable")


def best_path(path: Path) -> Path:
    """model.pth -> model.best.pth: where the best-val checkpoint goes."""
    return path.with_name(f"{path.stem}.best{path.suffix}")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a temporary file beside the target, then a rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by train.py, or a one-line UsageError saying what is wrong with it."""
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    missing = CHECKPOINT_KEYS - set(ckpt)
    if missing:
        raise UsageError(f"{path} is not a checkpoint of this program (missing {', '.join(sorted(missing))})")
    return ckpt


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load a saved optimizer state (moments, step counts) under this run's settings.

    torch's load_state_dict would bring back the saved run's lr, capturable, fused and foreach flags;
    these stay as this optimizer was built. Loading with them in place also puts each `step` count
    where this run's flags want it (on the device for a capturable or fused AdamW).
    """
    current = optimizer.state_dict()["param_groups"]
    if len(current) != len(saved["param_groups"]):
        raise UsageError("the checkpoint's optimizer has a different number of parameter groups")
    groups = []
    for mine, theirs in zip(current, saved["param_groups"]):
        groups.append({**theirs, **{k: mine[k] for k in RUN_OWNED_OPTIMIZER_SETTINGS if k in mine}})
    optimizer.load_state_dict({**saved, "param_groups": groups})


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def to_cpu(obj):
    """A copy of a (nested) state with every tensor copied to the CPU: training may go on meanwhile."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class CheckpointWriter:
    """Saves checkpoints to `path` (the latest) and best_path(path) (the best) off the training thread.

    write(state): the latest, saved in the background; waits first for the write before, so at most
    one is in flight. keep_best(state): held in memory. finish(state): the last latest and the best,
    in the background; close() waits for them. Every state must already be a CPU copy (to_cpu).
    """

    def __init__(self, path: Path):
        self.path = path
        self.best = None
        self.best_written = False
        self.last_written_step = None  # the step of the newest file on disk, once a write has finished
        self.writes = 0  # files written, for the curious and the tests
        self._thread = None
        self._error = None

    def keep_best(self, state: dict) -> None:
        self.best, self.best_written = state, False

    def write(self, state: dict) -> None:
        self._start([(self.path, state)])

    def finish(self, state: dict | None = None) -> None:
        """Write the latest state (when given) and the best kept in memory (when not yet written)."""
        jobs = [(self.path, state)] if state is not None else []
        if self.best is not None and not self.best_written:
            jobs.append((best_path(self.path), self.best))
            self.best_written = True
        self._start(jobs)

    def close(self) -> None:
        """Wait for the writes in flight; a write that failed is a UsageError."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise UsageError(f"could not write checkpoint {self.path}: {error}")

    def _start(self, jobs) -> None:
        self.close()
        if not jobs:
            return
        self._thread = threading.Thread(target=self._run, args=(jobs,), name="checkpoint-writer")
        self._thread.start()

    def _run(self, jobs) -> None:
        try:
            for path, state in jobs:
                save_checkpoint(path, state)
                self.writes += 1
                if path == self.path:
                    self.last_written_step = state["iter"]
        except Exception as e:  # reported on the training thread, at the next write or close()
            self._error = e
