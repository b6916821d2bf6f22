"""The one GPU report: our kernels and training loop against the PyTorch peers, and the tests, on a GPU.

    python bench/report.py                    # about 6 minutes (--budget 360); figures in $OUT or bench/report
    python bench/report.py --full-run         # the whole default run, ours against the best PyTorch loop (4 min)
    python bench/report.py --plan             # the stages, their estimates and limits; needs no GPU

Built for a GPU lent for minutes, a fresh machine each time: every stage is a subprocess in its own
process group, killed whole at its limit, and every figure is written the moment it exists, so a
stage that fails, hangs or is killed costs only that stage, and a run cut short still brings back
everything measured before.

The stages, in order. The estimates are reasoned from what each stage runs, for an H100/H200 with
cold Triton and inductor caches (each includes about 8 s to start a process that imports torch and
initialises CUDA; a Triton kernel variant takes 1-2 s to compile), not yet measured: replace them
with the seconds the first GPU run reports (the section's "took s" column).

  stage              what it runs                                                    estimate  limit
  ours-attention     our attention at the model's shape (B64-T256, p 0 and 0.2, fwd and      25 s   60 s
                     fwd+bwd): 4 benchmarks, 7 kernel variants to compile
  ours-layernorm     our layer_norm and add_layer_norm at (16384, 384), fwd and fwd+bwd,     20 s   45 s
                     fp32 and bf16: 8 benchmarks, 8 kernel variants
  ours-loop          our training loop (triton-graphs): a training step and an              35 s   80 s
                     evaluation batch (the model's variants compiled, CUDA graphs captured)
  tests              tests/ on the GPU, bf16 included, in --test-workers processes side     75 s  150 s
                     by side sharing one list (about 300 kernel variants to compile over
                     16 cores; the longest single test about 30 s)
  cost               beside the tests (CPU only, 2 processes): bench/compile_check.py       40 s  120 s
                     --cost, the static cost of the model's kernel variants (skipped when
                     the script has no --cost)
  train-compare      beside the tests: 500 steps of the triton backend in bf16 and the       60 s  150 s
                     reference backend in fp32, same seed, their val losses (needs --data)
  peers-attention    SDPA's flash, cuDNN and efficient backends and the reference at         25 s   60 s
                     B64-T256 (16 benchmarks, no compile)
  peers-layernorm    F.layer_norm and the unfused dropout + add + layer_norm, eager           15 s   40 s
  peers-loops        the seed's loop, torch-eager and triton-eager (no graphs)               35 s   70 s
  compile-loops      torch-compile-rog: the torch loop under torch.compile(mode=             80 s  120 s
                     "reduce-overhead"), step and evaluation (two whole-model compiles)
  compile-layernorm  the torch.compile'd LayerNorm peers at (16384, 384) bf16 (4 compiles)   55 s   90 s
  host               host time per call, our ops' Python layers against the torch ops', at    35 s   50 s
                     tiny shapes, our launches stubbed and real (bench/test_bench_host.py)
  attention-long     every attention provider at B16-T1024                                   35 s   60 s

cost and train-compare run beside the tests; every other stage runs alone, one after another, so
nothing disturbs a timing. The budget (--budget, 360 s by default) is planned in two pools: the
compile-based peers (compile-*) have 30% of it to themselves, the rest is for everything else, and
10 s is kept for writing the outputs. A stage runs only when its estimate fits what is left of its
pool when its turn comes, and then with its limit cut to what is left, so the whole report stays
within the budget even when every stage runs to its limit; a stage that does not fit is dropped,
and the output and the section say which and why. By the estimates, the default budget runs
everything up to compile-loops, and host; compile-layernorm and attention-long run when the stages
before them finished early. `--plan` prints this plan for the given options.

--full-run is a report of its own: `python train.py` (ours: triton, bf16, CUDA graphs, the defaults
on a GPU) and then `python train.py --backend torch --dtype bfloat16 --compile reduce-overhead` (the
best PyTorch loop we know: SDPA and F.layer_norm, bf16 autocast, fused AdamW, torch.compile with CUDA
graphs), the whole default run each (5000 steps, evaluations, the sample), same seed, one after the
other (race-ours: estimate 70 s, limit 100 s; race-torch: estimate 120 s, limit 140 s; --budget 240 s
by default): wall time from launch to the last line, start-up, steps per second, best and final val
loss, side by side.

Files under --out-dir (4 files, each rewritten through a .tmp beside it and a rename, so a copy taken
at any moment is whole; a lent GPU machine brings back at most 8 files of 16 MiB):
  report.json          every figure and every stage's outcome (after each stage, test and benchmark)
  RESULTS-section.md   the section for bench/RESULTS.md (likewise)
  report.png           ours against the peers, drawn after each stage (needs matplotlib; else
                       `python bench/report.py --plot-only report.json report.png` elsewhere)
  report.log           each stage's whole output, appended when it ends (each process's output
                       capped at 512 KB: its first 128 KB and last 384 KB)
Without --no-results-md the section is also kept appended to bench/RESULTS.md as it grows.
Give the command that runs the report a time limit of at least the budget plus a minute, and bring
the training text along (data/ is not in git, and a lent machine has no network).

Exit status: 0 every stage that ran finished cleanly; 1 a stage failed or was killed, or a test
failed; 2 the report cannot run here (no CUDA GPU; --full-run without data); 130 interrupted (the
running stages are killed and what they had is written).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.record import read_records  # noqa: E402 - after the path set-up above

ROOT = Path(__file__).resolve().parent.parent
RESULTS_MD = ROOT / "bench" / "RESULTS.md"
DEFAULT_DATA = ROOT / "data" / "input.txt"
DEFAULT_BUDGET_S, FULL_RUN_BUDGET_S = 360, 240
OUTPUT_RESERVE_S = 10  # kept back from the budget for writing the outputs
COMPILE_POOL_SHARE = 0.3  # of the budget, held for the compile-* stages until their turn
KILL_GRACE_S = 3  # between SIGTERM and SIGKILL to a stage's process group
STACKS_WAIT_S = 0.5  # for a pytest process to write its Python stacks before it is killed
LOG_HEAD, LOG_TAIL = 128 * 1024, 384 * 1024  # of each process's output kept in report.log
# Set in every stage's environment: tests/test_report.py's GPU test skips inside the report's own
# test stage, which would otherwise start the report again from within itself.
IN_REPORT_ENV = "TRITON_GPT_REPORT"
# Left out of the GPU test stage: an offline compile that needs no GPU (CI runs it; the cost stage
# compiles the model's variants).
TESTS_LEFT_OUT = ["tests/test_compile_sm90.py"]


# ----------------------------------------------------------------------------- the stages


@dataclass
class Command:
    argv: list
    record: Path | None = None  # pytest's per-test record (bench/record.py --record-to)
    output: Path | None = None  # a file the command writes (the cost JSON)


@dataclass
class Stage:
    name: str
    what: str  # one line, for the plan and the section
    kind: str  # "bench" | "tests" | "train" | "race" | "cost": how its results are read
    estimate_s: float
    limit_s: float
    commands: dict  # process name -> Command; several run side by side
    step: int  # stages of one step run side by side, steps one after another
    pool: str = "main"  # "main" or "compile" (the compile-based peers' own share of the budget)
    dropped: str = ""  # why it will not run (set before the run: not selected, no data, ...)


def _pytest(*args, record: Path) -> Command:
    # A module that fails to import costs its own tests only (it is recorded as an error).
    return Command([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "bench.record",
                    "--record-to", str(record), "--continue-on-collection-errors", *args], record=record)


def _bench(work: Path, name: str, files: list, select: str) -> dict:
    return {"pytest": _pytest(*files, "--benchmark-only", "-v", "-k", select, record=work / f"{name}.jsonl")}


def _train(data: Path, out: Path, *flags) -> Command:
    return Command([sys.executable, "train.py", "--data", str(data), "--out", str(out), *flags])


ATTN, LN, LOOPS = "bench/test_bench_attention.py", "bench/test_bench_layernorm.py", "bench/test_bench_train_step.py"
HOST = "bench/test_bench_host.py"


def build_stages(args, work: Path) -> list:
    """Every stage of the report asked for, in order; see the module docstring for the estimates."""
    if args.full_run:
        race = [(0, "race-ours", "ours: python train.py (triton, bf16, CUDA graphs)", 70, 100, []),
                (1, "race-torch", "the best PyTorch loop: torch backend, bf16, torch.compile reduce-overhead",
                 120, 140, ["--backend", "torch", "--dtype", "bfloat16", "--compile", "reduce-overhead"])]
        return [Stage(name, what, "race", est, limit,
                      {"train": _train(args.data, work / f"{name}.pth", *flags, "--seed", "0")}, step)
                for step, name, what, est, limit, flags in race]

    workers = args.test_workers
    tests = {f"worker{i}": _pytest("tests", "-v", "--tb=short", "--share-dir", str(work / "share"),
                                   *(f"--ignore={p}" for p in TESTS_LEFT_OUT), record=work / f"tests.{i}.jsonl")
             for i in range(workers)}
    cost_json = work / "cost.json"
    short = ["--max-iters", str(args.iters), "--eval-interval", str(max(1, args.iters // 2)), "--eval-iters", "50",
             "--sample-tokens", "0", "--log-interval", "0", "--seed", "0"]
    return [
        # Our two kernels in two processes: a crash that breaks one's CUDA context leaves the other measured.
        Stage("ours-attention", "our attention at B64-T256, p 0 and 0.2, fwd and fwd+bwd", "bench", 25, 60,
              _bench(work, "ours-attention", [ATTN], "triton and B64-T256"), 0),
        Stage("ours-layernorm", "our layer_norm and add_layer_norm at 16384x384, fp32 and bf16", "bench", 20, 45,
              _bench(work, "ours-layernorm", [LN], "triton and 16384x384"), 1),
        Stage("ours-loop", "our training loop (triton-graphs): a step and an evaluation batch", "bench", 35, 80,
              _bench(work, "ours-loop", [LOOPS], "triton-graphs"), 2),
        Stage("tests", f"tests/ on the GPU in {workers} processes sharing the list", "tests", 75, 150, tests, 3),
        Stage("cost", "bench/compile_check.py --cost: the static cost of the model's kernels (CPU)", "cost", 40, 120,
              {"compile_check": Command([sys.executable, "bench/compile_check.py", "--cost", "--json", str(cost_json),
                                         "--jobs", "2"], output=cost_json)}, 3),
        Stage("train-compare", f"{args.iters} steps: triton bf16 against reference fp32, same seed", "train", 60, 150,
              {"triton-bf16": _train(args.data, work / "triton-bf16.pth", "--backend", "triton", "--dtype", "bfloat16",
                                     *short),
               "reference-fp32": _train(args.data, work / "reference-fp32.pth", "--backend", "reference", "--dtype",
                                        "float32", "--no-cuda-graphs", *short)}, 3),
        Stage("peers-attention", "SDPA's flash, cuDNN and efficient backends and the reference at B64-T256", "bench",
              25, 60, _bench(work, "peers-attention", [ATTN], "B64-T256 and not triton"), 4),
        Stage("peers-layernorm", "F.layer_norm and the unfused dropout + add + layer_norm at 16384x384", "bench",
              15, 40, _bench(work, "peers-layernorm", [LN], "16384x384 and not triton and not compile"), 5),
        Stage("peers-loops", "the seed's loop, torch-eager and triton-eager", "bench", 35, 70,
              _bench(work, "peers-loops", [LOOPS], "seed or torch-eager or triton-eager"), 6),
        Stage("compile-loops", "torch-compile-rog: torch.compile(mode='reduce-overhead'), step and evaluation",
              "bench", 80, 120, _bench(work, "compile-loops", [LOOPS], "torch-compile-rog"), 7, pool="compile"),
        Stage("compile-layernorm", "the torch.compile'd LayerNorm peers at 16384x384 bf16", "bench", 55, 90,
              _bench(work, "compile-layernorm", [LN], "16384x384 and compile and bf16"), 8, pool="compile"),
        Stage("host", "host time per call: our ops' Python layers against the torch ops'", "bench", 35, 50,
              _bench(work, "host", [HOST], "host"), 9),
        Stage("attention-long", "every attention provider at B16-T1024", "bench", 35, 60,
              _bench(work, "attention-long", [ATTN], "B16-T1024"), 10),
    ]


STAGE_NAMES = ["ours-attention", "ours-layernorm", "ours-loop", "tests", "cost", "train-compare", "peers-attention",
               "peers-layernorm", "peers-loops", "compile-loops", "compile-layernorm", "host", "attention-long",
               "race-ours", "race-torch"]


def mark_unrunnable(stages: list, args) -> None:
    """Drop, with the reason, what was not asked for or cannot run here (before any budget is spent)."""
    data_ok = args.data.is_file()
    has_cost = "--cost" in (ROOT / "bench" / "compile_check.py").read_text()
    for s in stages:
        if args.only and s.name not in args.only:
            s.dropped = "not selected (--only)"
        elif s.name in args.skip:
            s.dropped = "left out (--skip)"
        elif s.kind in ("train", "race") and not data_ok:
            s.dropped = f"no data at {args.data} (give --data PATH: tiny Shakespeare)"
        elif s.kind == "cost" and not has_cost:
            s.dropped = "bench/compile_check.py has no --cost yet"


# ----------------------------------------------------------------------------- the budget


class Budget:
    """What is left of the budget for a stage when its turn comes.

    The compile-based peers have a share of their own: until they have had their turn, the other
    stages leave it untouched."""

    def __init__(self, total_s: float, stages: list):
        self.total_s = total_s
        has_compile = any(s.pool == "compile" and not s.dropped for s in stages)
        self.compile_share_s = round(total_s * COMPILE_POOL_SHARE) if has_compile else 0
        self.pending_compile = {s.name for s in stages if s.pool == "compile" and not s.dropped}

    def left(self, stage: Stage, elapsed_s: float) -> float:
        held = self.compile_share_s if (stage.pool != "compile" and self.pending_compile) else 0
        return self.total_s - OUTPUT_RESERVE_S - held - elapsed_s

    def decide(self, stage: Stage, elapsed_s: float):
        """(limit in seconds, "") to run it, or (None, why) to drop it."""
        self.pending_compile.discard(stage.name)
        left = self.left(stage, elapsed_s)
        if stage.estimate_s > left:
            return None, f"needs about {stage.estimate_s:.0f} s; {max(0, left):.0f} s of the budget left"
        return min(stage.limit_s, left), ""


def predict(stages: list, budget_s: float, worst_case: bool = False) -> list:
    """The plan, without running anything: [(stage, limit or None, why)], each stage taking its
    estimate (or, with worst_case, its whole limit), the same decisions the run makes."""
    budget, elapsed, plan = Budget(budget_s, stages), 0.0, []
    for step in sorted({s.step for s in stages}):
        took = 0.0
        for s in (s for s in stages if s.step == step):
            if s.dropped:
                plan.append((s, None, s.dropped))
                continue
            limit, why = budget.decide(s, elapsed)
            plan.append((s, limit, why))
            if limit is not None:
                took = max(took, limit if worst_case else s.estimate_s)
        elapsed += took
    return plan


def plan_text(plan: list, budget_s: float) -> str:
    lines = [f"plan for a {budget_s:.0f} s budget (estimate, limit; stages of one step side by side):"]
    for s, limit, why in plan:
        if limit is None:
            lines.append(f"  {s.name:<18} dropped: {why}")
        else:
            lines.append(f"  {s.name:<18} step {s.step}  ~{s.estimate_s:>3.0f} s  limit {limit:>3.0f} s  {s.what}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running processes


class Interrupted(Exception):
    """SIGTERM or SIGINT reached the report."""


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def kill_group(popen: subprocess.Popen) -> None:
    """End the process and everything it started (its process group): SIGTERM, a grace period for
    the leader, then SIGKILL to whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            break  # nothing of the group is left
        if sig == signal.SIGTERM:
            try:
                popen.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
    if popen.poll() is None:  # not in its group any more (it made a group of its own): end it alone
        popen.kill()
    popen.wait()


class Proc:
    """One process of a stage: started in a new session (so its own process group), its combined
    output pumped line by line into a log file, with the time of its first and last line."""

    def __init__(self, stage: Stage, name: str, cmd: Command, limit_s: float, work: Path, env: dict,
                 keep_lines: bool):
        self.stage, self.name, self.cmd, self.limit_s = stage, name, cmd, limit_s
        self.log_path = work / f"{stage.name}.{name}.log"
        self.lines = [] if keep_lines else None
        self.t_first = self.t_last = None
        self.outcome = None  # the exit code, "killed at its limit", "interrupted" or "could not start: ..."
        self.record_offset = 0
        self.t_launch = time.monotonic()
        self.deadline = self.t_launch + limit_s
        self.t_end = None
        self.stacks_asked = None  # when SIGUSR1 went to it, at its limit
        self.logged = False  # its output is in report.log and its figures in the report
        self.log = open(self.log_path, "wb")
        self.pump = threading.Thread(target=self._pump, daemon=True)
        try:
            self.popen = subprocess.Popen(cmd.argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            self.popen, self.outcome = None, f"could not start: {e}"
            self._close()
            return
        self.pump.start()

    def _pump(self):
        try:
            for line in iter(self.popen.stdout.readline, b""):
                now = time.monotonic()
                self.t_first = self.t_first or now
                self.t_last = now
                self.log.write(line)
                self.log.flush()
                if self.lines is not None:
                    self.lines.append(line.decode(errors="replace").rstrip("\n"))
        except ValueError:  # the log was closed: a process outside the group kept the pipe open
            pass

    def poll(self, now: float) -> bool:
        """True once the process has ended (by itself, or killed here at its limit)."""
        if self.outcome is not None:
            return True
        code = self.popen.poll()
        if code is None and now < self.deadline:
            return False
        if code is None:
            # First its Python stacks (a pytest process writes them on SIGUSR1), then the kill.
            if self.stacks_asked is None and self.request_stacks():
                self.stacks_asked = now
            if self.stacks_asked is not None and now < self.stacks_asked + STACKS_WAIT_S:
                return False
            kill_group(self.popen)
            self.outcome = f"killed at its limit ({self.limit_s:.0f} s)"
        else:
            kill_group(self.popen)  # whatever it left running in its group
            self.outcome = code
        self._close()
        return True

    def request_stacks(self) -> bool:
        """Ask a pytest process for its Python stacks (bench/record.py writes them on SIGUSR1);
        True when asked (they are written within STACKS_WAIT_S)."""
        if self.cmd.record is None or self.outcome is not None or not hasattr(signal, "SIGUSR1"):
            return False
        try:
            os.kill(self.popen.pid, signal.SIGUSR1)
        except ProcessLookupError:
            return False
        return True

    def stop(self, why: str) -> None:
        if self.outcome is None:
            kill_group(self.popen)
            self.outcome = why
            self._close()

    def _close(self):
        self.t_end = time.monotonic()
        if self.pump.is_alive():
            self.pump.join(timeout=5)  # a process that left the group may hold the pipe: don't wait on it
        self.log.close()

    @property
    def seconds(self) -> float:
        return (self.t_end or time.monotonic()) - self.t_launch

    def text(self, head=LOG_HEAD, tail=LOG_TAIL) -> str:
        data = self.log_path.read_bytes() if self.log_path.exists() else b""
        if len(data) > head + tail:
            data = data[:head] + f"\n[... {len(data) - head - tail} bytes left out ...]\n".encode() + data[-tail:]
        return data.decode(errors="replace")


def stage_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{IN_REPORT_ENV: "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# ----------------------------------------------------------------------------- reading what a stage left


PYTEST_EXIT = {0: "ok", 1: "tests failed", 2: "pytest stopped", 3: "internal error", 4: "usage error",
               5: "no test selected"}


def new_stage_entry(s: Stage) -> dict:
    return {"what": s.what, "kind": s.kind, "step": s.step, "pool": s.pool, "estimate_s": s.estimate_s,
            "limit_s": None, "status": "dropped" if s.dropped else "planned", "reason": s.dropped,
            "seconds": None, "exits": {}}


def ingest_records(entry: dict, stage: Stage, proc: Proc, report: dict, seen: set) -> bool:
    """Read the new lines of a pytest process's record into the stage's entry (and a benchmark's
    extra_info into report["benchmarks"]). True when something new was read. seen: the node ids
    with an outcome so far in this stage (processes sharing a list all report a module that does
    not import; it counts once)."""
    if proc.cmd.record is None:
        return False
    records, proc.record_offset = read_records(proc.cmd.record, proc.record_offset)
    counts = entry.setdefault("counts", {})
    running = entry.setdefault("running", {})
    for r in records:
        event = r.get("event")
        if event == "collected":
            entry.setdefault("collected", {})[proc.name] = r["n"]
        elif event == "start":
            running[proc.name] = r["nodeid"]
        elif event == "stopped":
            entry.setdefault("stopped", []).append(f"{proc.name}: {r['why']}")
        elif event == "outcome":
            running.pop(proc.name, None)
            if r["nodeid"] in seen:
                continue
            seen.add(r["nodeid"])
            if r.get("collecting"):
                entry["collect_errors"] = entry.get("collect_errors", 0) + 1
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
            if r["outcome"] in ("failed", "error"):
                entry.setdefault("failures", []).append(f"{r['nodeid']}: {r['outcome']}: {r.get('message', '')}")
            elif r["outcome"] == "skipped":
                skips = entry.setdefault("skips", {})
                skips[r.get("message", "")] = skips.get(r.get("message", ""), 0) + 1
            if r.get("extra_info"):
                report["benchmarks"].append({"stage": stage.name, **r["extra_info"]})
    return bool(records)


def not_run(entry: dict, stage: Stage):
    """Tests selected but never finished (a killed process), or None when no process said how many
    it selected. Processes sharing one list each select all of it."""
    collected = entry.get("collected", {})
    if not collected:
        return None
    total = max(collected.values()) if stage.kind == "tests" else sum(collected.values())
    return max(0, total - (sum(entry.get("counts", {}).values()) - entry.get("collect_errors", 0)))


STEP_LINE = re.compile(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
ITER_LINE = re.compile(r"iter (\d+)/(\d+) \| loss ([\d.]+) \| ([\d.]+) ms/iter")
TIME_LINE = re.compile(r"\btime: [\d.]+ s = ")
TIME_FIELDS = {"total_s": r"time: ([\d.]+) s", "startup_s": r"start-up ([\d.]+)", "training_s": r"training ([\d.]+)",
               "evaluation_s": r"evaluation ([\d.]+)", "sampling_s": r"sampling ([\d.]+)",
               "tokens_per_s": r"([\d,]+) tok/s", "mfu": r"MFU ([\d.]+%|n/a)"}


def parse_training(lines: list) -> dict:
    """What train.py's output says: the evaluations, the progress lines and its closing time line;
    any part missing stays missing (None or empty)."""
    steps = [[int(m[1]), float(m[2]), float(m[3])] for m in (STEP_LINE.search(ln) for ln in lines) if m]
    iters = [(int(m[1]), int(m[2]), float(m[4])) for m in (ITER_LINE.search(ln) for ln in lines) if m]
    # "time: 41.2 s = start-up ...", maybe behind a prefix ("train.py: time: ...").
    time_line = next((ln for ln in reversed(lines) if TIME_LINE.search(ln)), "")
    timing = {}
    for key, pattern in TIME_FIELDS.items():
        m = re.search(pattern, time_line)
        if m:
            timing[key] = m[1] if key == "mfu" else float(m[1].replace(",", ""))
    run = {"steps": steps, "best_val": min((v for _, _, v in steps), default=None),
           "final_val": steps[-1][2] if steps else None, "time_line": time_line, **timing}
    run["iters_done"] = iters[-1][0] if iters else None
    run["max_iters"] = iters[-1][1] if iters else None
    if timing.get("training_s") and run["max_iters"]:
        run["steps_per_s"] = run["max_iters"] / timing["training_s"]
    elif iters:
        ms = sorted(ms for _, _, ms in iters)
        run["steps_per_s"] = 1000 / ms[len(ms) // 2]
    return run


def summarize_training(proc: Proc) -> dict:
    run = parse_training(proc.lines or [])
    run.update(outcome=proc.outcome, command=" ".join(["python", *proc.cmd.argv[1:]]), limit_s=proc.limit_s,
               wall_s=round(proc.t_last - proc.t_launch, 2) if proc.t_last else None, seconds=round(proc.seconds, 1))
    if "total_s" in run and run["wall_s"] is not None and "startup_s" in run:
        # train.py's clock starts after the interpreter and imports: count those as start-up too.
        run["startup_from_launch_s"] = round(run["wall_s"] - run["total_s"] + run["startup_s"], 2)
    if proc.outcome != 0:
        run["error"] = "\n".join((proc.lines or [])[-6:])[-800:]
    return run


def read_cost(path: Path):
    """The cost report's records (a JSON list), or a note saying why there are none."""
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError:
        return None, "the cost report wrote no JSON"
    except ValueError as e:
        return None, f"the cost JSON does not parse: {e}"
    if not isinstance(records, list):
        return None, "the cost JSON is not a list of records"
    return records, ""


# ----------------------------------------------------------------------------- the run


class Run:
    """The report's state, its outputs, and the stages run step by step within the budget."""

    def __init__(self, report: dict, stages: list, budget_s: float, outputs, work: Path, log=print):
        self.report, self.stages, self.outputs, self.work, self.log = report, stages, outputs, work, log
        self.budget = Budget(budget_s, stages)
        self.env = stage_env()
        self.t0 = time.monotonic()
        self.seen = {s.name: set() for s in stages}  # node ids with an outcome, per stage
        report["budget_s"] = budget_s
        report["stages"] = {s.name: new_stage_entry(s) for s in stages}

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def run(self) -> None:
        self.outputs.write(self.report)
        for step in sorted({s.step for s in self.stages}):
            todo = []
            for s in (s for s in self.stages if s.step == step and not s.dropped):
                limit, why = self.budget.decide(s, self.elapsed())
                entry = self.report["stages"][s.name]
                if limit is None:
                    entry.update(status="dropped", reason=why)
                    self.log(f"[{self.elapsed():4.0f} s] {s.name}: dropped: {why}")
                else:
                    todo.append((s, limit))
            if todo:
                self.run_side_by_side(todo)
            else:
                self.outputs.write(self.report)

    def run_side_by_side(self, todo: list) -> None:
        procs = []
        try:
            for s, limit in todo:
                self.report["stages"][s.name].update(status="running", limit_s=round(limit))
                self.log(f"[{self.elapsed():4.0f} s] {s.name}: started (limit {limit:.0f} s): {s.what}")
                for name, cmd in s.commands.items():
                    procs.append(Proc(s, name, cmd, limit, self.work, self.env, keep_lines=s.kind in ("train", "race")))
            self.outputs.write(self.report)
            while not all(p.logged for p in procs):
                changed = stage_ended = False
                now = time.monotonic()
                for p in procs:
                    ended = p.poll(now)
                    changed |= ingest_records(self.report["stages"][p.stage.name], p.stage, p, self.report,
                                              self.seen[p.stage.name])
                    if ended and not p.logged:
                        self.finish_proc(p)
                        changed = True
                for s, _ in todo:
                    if self.report["stages"][s.name]["status"] == "running" and \
                            all(p.logged for p in procs if p.stage is s):
                        self.finish_stage(s, [p for p in procs if p.stage is s])
                        changed = stage_ended = True
                if changed:
                    self.outputs.write(self.report, draw=stage_ended)
                if not all(p.logged for p in procs):
                    time.sleep(0.2)
        finally:
            if [p.request_stacks() for p in procs if p.outcome is None and p.stacks_asked is None].count(True):
                time.sleep(STACKS_WAIT_S)
            for p in procs:
                if p.outcome is None:
                    p.stop("interrupted")
                if not p.logged:
                    ingest_records(self.report["stages"][p.stage.name], p.stage, p, self.report,
                                              self.seen[p.stage.name])
                    self.finish_proc(p)
            for s, _ in todo:
                if self.report["stages"][s.name]["status"] == "running":
                    self.finish_stage(s, [p for p in procs if p.stage is s])
                    self.outputs.write(self.report)

    def finish_proc(self, p: Proc) -> None:
        """A process has ended: its output into report.log, its figures into the report."""
        p.logged = True
        entry = self.report["stages"][p.stage.name]
        entry["exits"][p.name] = p.outcome
        stacks = Path(f"{p.cmd.record}.stacks") if p.cmd.record else None
        stacks_text = stacks.read_text(errors="replace") if stacks and stacks.exists() else ""
        if stacks_text:
            stacks_text = f"\n[its Python stacks when it was ended]\n{stacks_text[-LOG_TAIL:]}"
        self.outputs.append_log(f"{p.stage.name} / {p.name}: {p.outcome} after {p.seconds:.1f} s",
                                shlex.join(map(str, p.cmd.argv)), p.text() + stacks_text)
        try:
            p.log_path.unlink()
        except FileNotFoundError:
            pass
        if p.stage.kind == "train":
            self.report["training"][p.name] = summarize_training(p)
        elif p.stage.kind == "race":
            self.report["full_run"][p.stage.name.removeprefix("race-")] = summarize_training(p)
        elif p.stage.kind == "cost" and p.cmd.output is not None:
            records, why = read_cost(p.cmd.output)
            if records is not None:
                self.report["cost"] = records
            else:
                entry["note"] = why

    def finish_stage(self, s: Stage, procs: list) -> None:
        entry = self.report["stages"][s.name]
        entry["seconds"] = round(max((p.seconds for p in procs), default=0.0), 1)
        outcomes = [p.outcome for p in procs]
        pytest_kind = s.kind in ("bench", "tests")
        if any(o == "interrupted" for o in outcomes):
            status = "interrupted"
        elif any(isinstance(o, str) and o.startswith("killed") for o in outcomes):
            status = "killed"
        elif all(o == 0 for o in outcomes):
            status = "ok"
        else:
            status = "failed"
        entry["status"] = status
        if pytest_kind:
            missing = not_run(entry, s)
            if missing is not None:
                entry["not_run"] = missing
        # One phrase per kind of ending, with the processes that ended so: "tests failed (worker3)".
        ends = {}
        for name, o in entry["exits"].items():
            if o != 0:
                text = (PYTEST_EXIT.get(o, f"exit {o}") if pytest_kind else f"exit {o}") if isinstance(o, int) else o
                ends.setdefault(text, []).append(name)
        if ends:
            entry["reason"] = "; ".join(f"{text} ({', '.join(names)})" for text, names in ends.items())
        self.log(f"[{self.elapsed():4.0f} s] {s.name}: {status} in {entry['seconds']:.0f} s"
                 + (f" ({stage_counts_text(entry)})" if pytest_kind else "")
                 + (f": {entry['reason']}" if entry.get("reason") else ""))


# ----------------------------------------------------------------------------- tables


def _fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def _guard(table, *args) -> list:
    """A table, or one line saying why it could not be drawn: a renamed field costs that table only."""
    try:
        return table(*args)
    except Exception as e:  # noqa: BLE001 - any error in one table must not lose the others
        return [f"(this table could not be drawn: {type(e).__name__}: {e})"]


def _rows(results, prefix):
    return [r for r in results if str(r.get("name", "")).startswith(prefix)]


def attention_table(results):
    rows = _rows(results, "test_bench_attention")
    if not rows:
        return ["(not measured)"]
    providers = ["triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "reference"]
    keys = sorted({(tuple(r["shape"]), r["dropout_p"], r["mode"]) for r in rows})
    lines = ["| shape (B,T,H,D) | dropout | mode | " + " | ".join(f"{p} us" for p in providers)
             + " | ours vs best SDPA |", "|" + "---|" * (len(providers) + 4)]
    for shape, p, mode in keys:
        us = {r["provider"]: r["do_bench_median_us"] for r in rows
              if (tuple(r["shape"]), r["dropout_p"], r["mode"]) == (shape, p, mode)}
        peers = [us[k] for k in providers[1:4] if k in us]
        ratio = f"{min(peers) / us['triton']:.2f}x" if peers and "triton" in us else "-"
        lines.append(f"| {shape} | {p} | {mode} | " + " | ".join(_fmt(us.get(k)) for k in providers)
                     + f" | {ratio} |")
    return lines


def layernorm_table(results):
    rows = _rows(results, "test_bench_layernorm")
    if not rows:
        return ["(not measured)"]
    keys = sorted({(r["op"], r["mode"], r["dtype"], tuple(r["shape"])) for r in rows})
    lines = ["| op | mode | dtype | shape | ours us (GB/s) | peers us | best peer / ours |",
             "|---|---|---|---|---|---|---|"]
    for key in keys:
        op, mode, dtype, shape = key
        sel = {r["provider"]: r for r in rows if (r["op"], r["mode"], r["dtype"], tuple(r["shape"])) == key}
        ours = sel.get("triton")
        peers = {k: v["do_bench_median_us"] for k, v in sel.items() if k != "triton"}
        peer_txt = ", ".join(f"{k} {v:.1f}" for k, v in sorted(peers.items())) or "-"
        ratio = f"{min(peers.values()) / ours['do_bench_median_us']:.2f}x" if ours and peers else "-"
        ours_txt = f"{ours['do_bench_median_us']:.1f} ({ours['gb_per_s']:.0f})" if ours else "-"
        lines.append(f"| {op} | {mode} | {dtype.removeprefix('torch.')} | {shape} | {ours_txt} | {peer_txt} "
                     f"| {ratio} |")
    return lines


def host_table(results):
    """Host time per call (bench/test_bench_host.py): ours against the torch ops, launches stubbed
    (our Python layer alone) and real (Triton's launcher too; the torch ops launch for real in both)."""
    rows = [r for r in _rows(results, "test_bench_host") if r.get("host_us") is not None]
    if not rows:
        return ["(not measured)"]
    by = {(r["op"], r["mode"], r["launch"], r["provider"]): r["host_us"] for r in rows
          if r["provider"] in ("triton", "torch")}
    lines = ["| op | mode | our launches | ours us | torch us | ours / torch |", "|---|---|---|---:|---:|---:|"]
    for op, mode, launch in sorted({k[:3] for k in by}):
        ours, torch_us = by.get((op, mode, launch, "triton")), by.get((op, mode, launch, "torch"))
        ratio = f"{ours / torch_us:.2f}" if ours and torch_us else "-"
        lines.append(f"| {op} | {mode} | {launch} | {ours if ours is not None else '-'} "
                     f"| {torch_us if torch_us is not None else '-'} | {ratio} |")
    floor = [r["host_us"] for r in rows if r["provider"] == "autograd-floor"]
    if floor:
        lines += ["", f"A torch.autograd.Function that only allocates layer_norm's outputs, fwd+bwd: {floor[0]} us."]
    return lines


LOOP_ORDER = ["triton-graphs", "triton-eager", "torch-compile-rog", "torch-eager", "seed"]


def train_step_table(results):
    rows = _rows(results, "test_train_step")
    if not rows:
        return ["(not measured)"]
    by = {(r["loop"], r["mode"]): r for r in rows}
    lines = ["| loop | ms / step | tok/s | MFU | ms / eval batch | triton-graphs is faster by |",
             "|---|---|---|---|---|---|"]
    ours = by.get(("triton-graphs", "train-step"))
    loops = LOOP_ORDER + sorted({loop for loop, _ in by} - set(LOOP_ORDER))
    for loop in loops:
        step, ev = by.get((loop, "train-step")), by.get((loop, "eval-batch"))
        if not step and not ev:
            continue
        ms = _fmt(step["ms_per_step"], 2) if step else "-"
        tok_s = f"{step['tokens_per_s']:,}" if step else "-"
        mfu = f"{step['mfu']:.1%}" if step and step.get("mfu") is not None else "-"
        ev_ms = _fmt(ev["ms_per_step"], 2) if ev else "-"
        speed = f"{step['ms_per_step'] / ours['ms_per_step']:.2f}x" if step and ours else "-"
        lines.append(f"| {loop} | {ms} | {tok_s} | {mfu} | {ev_ms} | {speed} |")
    return lines


def training_table(runs):
    names = list(runs)
    steps = sorted({s for r in runs.values() for s, _, _ in r["steps"]})
    lines = ["| step | " + " | ".join(f"{n} val" for n in names) + " | difference |",
             "|" + "---|" * (len(names) + 2)]
    for step in steps:
        vals = [next((v for s, _, v in runs[n]["steps"] if s == step), None) for n in names]
        diff = f"{vals[0] - vals[1]:+.4f}" if len(vals) == 2 and None not in vals else "-"
        lines.append(f"| {step} | " + " | ".join(_fmt(v, 4) for v in vals) + f" | {diff} |")
    for n in names:
        status = ("" if runs[n]["outcome"] == 0 else
                  f" ({_outcome_text(runs[n]['outcome'])}: {runs[n].get('error', '')[-200:]})")
        lines.append(f"\n{n}: `{runs[n]['command']}`{status}")
    lines.append("\n(These runs share the GPU with the tests, so their times are not reported.)")
    return lines


def _outcome_text(o):
    return f"exit {o}" if isinstance(o, int) else str(o)


def race_table(full):
    """The whole default run, ours and the best PyTorch loop side by side."""
    roles = [r for r in ("ours", "torch") if r in full]
    if not roles:
        return ["(not run)"]
    fields = [("wall time, launch to last line (s)", "wall_s", 1),
              ("start-up, launch to the loop (s)", "startup_from_launch_s", 1),
              ("start-up, train.py's own (s)", "startup_s", 1), ("training (s)", "training_s", 1),
              ("evaluation (s)", "evaluation_s", 1), ("sampling (s)", "sampling_s", 1),
              ("steps per second", "steps_per_s", 1), ("tokens per second", "tokens_per_s", 0),
              ("best val loss", "best_val", 4), ("final val loss", "final_val", 4)]
    lines = ["| | " + " | ".join(roles) + " |", "|---|" + "---|" * len(roles)]
    for label, key, nd in fields:
        lines.append(f"| {label} | " + " | ".join(_fmt(full[r].get(key), nd) for r in roles) + " |")
    lines.append("| MFU | " + " | ".join(str(full[r].get("mfu") or "-") for r in roles) + " |")
    done = [f"{full[r].get('iters_done') or '-'}/{full[r].get('max_iters') or '-'}" for r in roles]
    lines.append("| steps done (progress lines) | " + " | ".join(done) + " |")
    lines.append("| outcome | " + " | ".join(_outcome_text(full[r]["outcome"]) for r in roles) + " |")
    if len(roles) == 2 and all(full[r].get("wall_s") and full[r]["outcome"] == 0 for r in roles):
        lines.append(f"\nWall time: ours is {full['torch']['wall_s'] / full['ours']['wall_s']:.2f}x faster "
                     "than the PyTorch loop, launch to last line.")
    for r in roles:
        lines.append(f"\n{r}: `{full[r]['command']}`"
                     + (f"\n\n    {full[r]['error'][-400:]}" if full[r].get("error") else ""))
    return lines


def _cost_op(record: dict):
    """Which measured op a cost record's kernel belongs to: (op, mode, dropout) or None.

    From the kernel's name and the words of its variant (compile_check's labels, e.g.
    `bf16 D=64 causal dropout lse [model]`, `x=bf16 w,b=fp32 C=384 weight bias residual+dropout stats
    [model]`). mode is "fwd" or "bwd"; a backward is measured as fwd+bwd less fwd."""
    kernel, words = record.get("kernel", ""), record.get("variant", "").split()
    mode = "bwd" if "bwd" in kernel else "fwd" if "fwd" in kernel else None
    if mode is None:
        return None
    if "_attn_" in kernel:
        if mode == "fwd" and "lse" not in words:
            return None  # an inference forward: the benchmark times the training one, which keeps lse
        return ("attention", mode, 0.2 if "dropout" in words else 0.0)
    if "_ln_" in kernel:
        if mode == "fwd":
            op = "add_layer_norm" if "residual+dropout" in words else None if "residual" in words else "layer_norm"
        else:
            dropout, ds = "dropout" in words, "ds" in words
            op = "add_layer_norm" if dropout and ds else "layer_norm" if not (dropout or ds) else None
        return (op, mode, 0.2 if op == "add_layer_norm" else 0.0) if op else None
    return None


def _measured_us(results, op, mode, p):
    """Our do_bench time for (op, mode) at the model's shape in bf16; a backward as fwd+bwd - fwd."""
    def us(m):
        for r in results:
            if r.get("provider") != "triton" or r.get("mode") != m:
                continue
            if op == "attention" and str(r.get("name", "")).startswith("test_bench_attention") and \
                    list(r.get("shape", [])) == [64, 256, 6, 64] and r.get("dropout_p") == p:
                return r["do_bench_median_us"]
            if op != "attention" and r.get("op") == op and list(r.get("shape", [])) == [16384, 384] and \
                    "bfloat16" in str(r.get("dtype")):
                return r["do_bench_median_us"]
        return None
    fwd = us("fwd")
    if mode == "fwd":
        return fwd
    both = us("fwd+bwd")
    return both - fwd if both is not None and fwd is not None else None


def cost_table(records, results):
    """The static cost report's kernels (their issue-bound time) beside our measured times."""
    lines = ["| kernel | variant | regs | smem B | spill B | HGMMA | loop instr. | warp-instr. | issue us |",
             "|---|---|---:|---:|---:|---|---|---:|---:|"]
    hgmma = {True: "yes", False: "NO", None: "-"}
    ops = {}
    for r in records:
        if r.get("error"):
            lines.append(f"| {r.get('kernel')} | {r.get('variant')} | FAIL: {r['error']} | | | | | | |")
            continue
        loops = r.get("loop_instructions")
        loops = (" + ".join(map(str, loops)) or "-") if isinstance(loops, list) else _fmt(loops, 0)
        warp = r.get("warp_instructions")
        lines.append(f"| {r.get('kernel')} | {r.get('variant')} | {r.get('regs', '-')} | {r.get('smem', '-')} | "
                     f"{r.get('spill_bytes', '-')} | {hgmma.get(r.get('hgmma'), r.get('hgmma'))} | {loops} | "
                     f"{'-' if warp is None else f'{warp:,}'} | {_fmt(r.get('issue_us'), 2)} |")
        key = _cost_op(r)
        if key is not None and r.get("issue_us") is not None:
            ops.setdefault(key, []).append(r)
    # A kernel whose variant does not depend on the op's flags (attention's backward preprocess, a
    # LayerNorm reduction) is compiled, and recorded, once, under the first call that launched it:
    # it serves the other calls of its kind (attention or LayerNorm) and mode too.
    def kind(op):
        return "attention" if op == "attention" else "layernorm"

    recorded_under = {}  # (kind, mode, kernel) -> the (op, dropout) it has records for
    for (op, mode, p), recs in ops.items():
        for r in recs:
            recorded_under.setdefault((kind(op), mode, r["kernel"]), set()).add((op, p))
    for (op, mode, p), recs in ops.items():
        for (k, mode2, kernel), under in recorded_under.items():
            if (k, mode2) == (kind(op), mode) and len(under) == 1 and (op, p) not in under:
                (op1, p1), = under
                recs += [r for r in ops[(op1, mode, p1)] if r["kernel"] == kernel]
    if ops:
        lines += ["", "Issue-bound time (warp-instructions over 132 SMs x 4 schedulers x 1.755 GHz: a floor, "
                  "summed over the op's kernels) against our measured time (do_bench median at the model's shape, "
                  "bf16; a backward is fwd+bwd less fwd; the LayerNorm benchmark's weight and bias may differ "
                  "in dtype from the model's fp32 ones):", "",
                  "| op | mode | dropout | kernels | issue-bound us | measured us | measured / issue-bound |",
                  "|---|---|---|---|---:|---:|---:|"]
        for (op, mode, p), recs in sorted(ops.items()):
            predicted = sum(r["issue_us"] for r in recs)
            measured = _measured_us(results, op, mode, p)
            ratio = f"{measured / predicted:.2f}" if measured and predicted else "-"
            names = " + ".join(sorted({r["kernel"] for r in recs}))
            lines.append(f"| {op} | {mode} | {p} | {names} | {predicted:.2f} | {_fmt(measured, 1)} | {ratio} |")
    return lines


def stage_counts_text(entry: dict) -> str:
    counts = entry.get("counts", {})
    text = ", ".join(f"{n} {w}" for w, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "nothing finished"
    if entry.get("not_run"):
        text += f"; {entry['not_run']} not run"
    return text


def stage_table(report) -> list:
    lines = ["| stage | what | estimate s | limit s | took s | outcome |", "|---|---|---:|---:|---:|---|"]
    for name, e in report["stages"].items():
        outcome = e["status"]
        if e.get("counts") or e.get("not_run"):
            outcome += f" ({stage_counts_text(e)})"
        if e.get("reason"):
            outcome += f": {e['reason']}"
        if e.get("running") and e["status"] in ("killed", "interrupted"):
            outcome += "; was running " + ", ".join(f"`{n}`" for n in e["running"].values())
        if e.get("note"):
            outcome += f"; {e['note']}"
        outcome += "".join(f"; stopped early: {why}" for why in e.get("stopped", []))
        if name != "tests":  # the tests' failures and skips have lines of their own below
            outcome += "".join(f"; {f[:200]}" for f in e.get("failures", [])[:5])
            outcome += "".join(f"; skipped {n} x: {why[:150]}" for why, n in e.get("skips", {}).items())
        lines.append(f"| {name} | {e['what']} | {e['estimate_s']:.0f} | {_fmt(e.get('limit_s'), 0)} | "
                     f"{_fmt(e.get('seconds'), 0)} | {outcome.replace('|', '/')} |")
    return lines


def tests_lines(report) -> list:
    e = report["stages"].get("tests")
    if not e or e["status"] in ("planned", "dropped"):
        return [f"Tests on the GPU: not run{': ' + e['reason'] if e and e.get('reason') else ''}."]
    lines = [f"Tests on the GPU (tests/, {len(e['exits']) or '?'} processes sharing the list; left out: "
             f"{', '.join(TESTS_LEFT_OUT)}, an offline compile CI runs): {stage_counts_text(e)} "
             f"in {_fmt(e.get('seconds'), 0)} s ({e['status']})."]
    lines += [f"- {f}" for f in e.get("failures", [])[:30]]
    if len(e.get("failures", [])) > 30:
        lines.append(f"- ... and {len(e['failures']) - 30} more (report.json)")
    skips = sorted(e.get("skips", {}).items(), key=lambda kv: -kv[1])
    if skips:
        lines += ["", "Skipped: " + "; ".join(f"{n} x {why}" for why, n in skips[:10])]
    return lines


def render(report) -> str:
    """The markdown section for bench/RESULTS.md: our figures first, the peers beside them."""
    title = "the whole default run" if report.get("mode") == "full-run" else "the GPU report"
    parts = [f"## {report['date']}: {report['gpu']}, {title}", "",
             f"torch {report['torch']}, Triton {report['triton']}, CUDA {report['cuda']}, Python {report['python']}"
             + (f", commit {report['commit']}" if report.get("commit") else "") + f". Command: `{report['command']}`.",
             f"Budget {report.get('budget_s', '-')} s; "
             + (f"took {report['seconds']} s." if report.get("seconds") is not None else "still running."), "",
             "Stages (each killed whole at its limit; dropped ones say why):", "", *_guard(stage_table, report), ""]
    if report.get("mode") == "full-run":
        parts += ["The whole default run (5000 steps, evaluations, the sample), same seed, one after the other:", "",
                  *_guard(race_table, report.get("full_run", {})), ""]
    else:
        parts += ["Attention, GPU time (triton.testing.do_bench median), causal, bf16:", "",
                  *_guard(attention_table, report["benchmarks"]), "",
                  "LayerNorm, GPU time (do_bench median) and our GB/s:", "",
                  *_guard(layernorm_table, report["benchmarks"]), "",
                  "Host time per call, median (bench/test_bench_host.py; our launches stubbed out, or real):", "",
                  *_guard(host_table, report["benchmarks"]), "",
                  "Training step (B=64, T=256, the model's shape; a loop of 50 steps, one synchronize):", "",
                  *_guard(train_step_table, report["benchmarks"]), "",
                  *_guard(tests_lines, report), ""]
        if report.get("training"):
            parts += ["Short training comparison (same seed):", "", *_guard(training_table, report["training"]), ""]
        if report.get("cost"):
            parts += ["Static cost (bench/compile_check.py --cost, sm_90, this machine's Triton) beside the measured:",
                      "", *_guard(cost_table, report["cost"], report["benchmarks"]), ""]
    if report.get("notes"):
        parts += ["Notes: " + "; ".join(report["notes"]), ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the plot


def plot(report, png_path):
    """Bar charts, ours (red) against the peers (grey): attention and LayerNorm GPU time at the
    model's shapes, the training step, and the whole run when there is one. A panel without figures
    says so."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report.get("benchmarks", [])
    att = [r for r in _rows(res, "test_bench_attention") if list(r.get("shape", []))[1:2] == [256]
           and r.get("dropout_p") == 0.2]
    ln = [r for r in _rows(res, "test_bench_layernorm") if "bfloat16" in str(r.get("dtype"))
          and list(r.get("shape", [])) == [16384, 384]]
    steps = [r for r in _rows(res, "test_train_step") if r.get("mode") == "train-step"]
    full = report.get("full_run", {})
    panels = [
        ("attention (64,256,6,64) bf16 p=0.2: us", att, lambda r: f"{r['provider']}\n{r['mode']}",
         "do_bench_median_us", lambda r: r["provider"] == "triton"),
        ("LayerNorm (16384,384) bf16: us", ln,
         lambda r: f"{r['provider']}\n{'add+ln' if r['op'] == 'add_layer_norm' else 'ln'} {r['mode']}",
         "do_bench_median_us", lambda r: r["provider"] == "triton"),
        ("training step: ms", steps, lambda r: r["loop"], "ms_per_step", lambda r: r["loop"].startswith("triton")),
    ]
    if full:
        runs = [{"role": k, **v} for k, v in full.items() if v.get("wall_s")]
        panels.append(("whole default run: s, launch to last line", runs, lambda r: r["role"], "wall_s",
                       lambda r: r["role"] == "ours"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 5))
    for ax, (title, rows, label, key, is_ours) in zip(axes, panels):
        rows = [r for r in rows if r.get(key) is not None]
        if rows:
            ax.barh([label(r) for r in rows], [r[key] for r in rows],
                    color=["tab:red" if is_ours(r) else "tab:gray" for r in rows])
            ax.tick_params(axis="y", labelsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
    fig.suptitle(f"{report['gpu']} | {report['date']} | torch {report['torch']} triton {report['triton']}")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- outputs


def _write_atomic(path: Path, text) -> None:
    """A reader (or a copy taken when the report is killed) sees the old file or the new one whole."""
    tmp = path.with_name(path.name + ".tmp")
    (tmp.write_bytes if isinstance(text, bytes) else tmp.write_text)(text)
    os.replace(tmp, path)


class Outputs:
    """report.json, RESULTS-section.md, report.png and report.log under out_dir, and the section kept
    appended to bench/RESULTS.md (when results_md is given)."""

    def __init__(self, out_dir: Path, results_md: Path | None, log=print):
        self.out_dir, self.results_md, self.log = out_dir, results_md, log
        out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path, self.section_path = out_dir / "report.json", out_dir / "RESULTS-section.md"
        self.png_path, self.log_path = out_dir / "report.png", out_dir / "report.log"
        self.log_path.write_text("")
        self.results_md_text = (results_md.read_text() if results_md.exists() else "") if results_md else None
        self.plot_note = ""

    def write(self, report: dict, draw: bool = False) -> None:
        _write_atomic(self.json_path, json.dumps(report, indent=1, default=str))
        text = render(report)
        _write_atomic(self.section_path, text + "\n")
        if self.results_md is not None:
            _write_atomic(self.results_md, self.results_md_text.rstrip("\n") + "\n\n" + text + "\n")
        if draw and not self.plot_note:
            try:
                tmp = self.png_path.with_name("report.tmp.png")
                plot(report, tmp)
                os.replace(tmp, self.png_path)
            except ImportError:
                self.plot_note = (f"no matplotlib here: draw the PNG elsewhere with python bench/report.py "
                                  f"--plot-only {self.json_path} report.png")
                self.log(self.plot_note)
            except Exception as e:  # noqa: BLE001 - a plot that fails must not stop the report
                self.log(f"the plot failed ({type(e).__name__}: {e}); the figures are in {self.json_path}")

    def append_log(self, title: str, command: str, text: str) -> None:
        with self.log_path.open("a") as f:
            f.write(f"{'=' * 100}\n{title}\n$ {command}\n{'=' * 100}\n{text}\n")


# ----------------------------------------------------------------------------- main


def new_report(**header) -> dict:
    """The report's state before any stage: the header (card, versions, command) and empty results."""
    return {"mode": "report", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "gpu": None, "torch": None, "triton": None, "cuda": None, "python": platform.python_version(),
            "commit": None, "command": "", "data": None, **header,
            "stages": {}, "benchmarks": [], "training": {}, "full_run": {}, "cost": [], "notes": []}


def _git_commit():
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="The stages, their estimates and limits, and the files written: see "
                                       "the docstring of bench/report.py, or --plan.")
    p.add_argument("--out-dir", type=Path, default=Path(os.environ.get("OUT") or ROOT / "bench" / "report"),
                   help="where report.json, RESULTS-section.md, report.png and report.log go [$OUT, else bench/report]")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help="the training text for the training stages; without it they are skipped with a note "
                        "[data/input.txt]")
    p.add_argument("--budget", type=float, metavar="SECONDS", default=None,
                   help=f"the time the whole report may take: stages that do not fit are dropped, and said so "
                        f"[{DEFAULT_BUDGET_S}; {FULL_RUN_BUDGET_S} with --full-run]")
    p.add_argument("--full-run", action="store_true",
                   help="instead of the stages, the whole default run: python train.py against the torch backend "
                        "under torch.compile reduce-overhead, one after the other (about 4 minutes; needs --data)")
    p.add_argument("--only", action="append", default=[], choices=STAGE_NAMES, metavar="STAGE",
                   help="run only this stage (repeatable); the names are in --plan")
    p.add_argument("--skip", action="append", default=[], choices=STAGE_NAMES, metavar="STAGE",
                   help="leave this stage out (repeatable)")
    p.add_argument("--test-workers", type=int, metavar="N", default=max(2, min(12, (os.cpu_count() or 4) - 4)),
                   help="pytest processes sharing the tests side by side [CPU cores less 4, 2 to 12]")
    p.add_argument("--iters", type=int, metavar="N", default=500, help="steps of the short training comparison [500]")
    p.add_argument("--no-results-md", action="store_true", help="do not append the section to bench/RESULTS.md")
    p.add_argument("--plan", action="store_true",
                   help="print the stages, their estimates and limits and what the budget drops, then exit "
                        "(needs no GPU)")
    p.add_argument("--plot-only", nargs=2, type=Path, metavar=("JSON", "PNG"),
                   help="only draw the PNG from a saved report.json (needs no GPU)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.budget is None:
        args.budget = FULL_RUN_BUDGET_S if args.full_run else DEFAULT_BUDGET_S
    if args.test_workers < 1:
        p.error(f"--test-workers must be at least 1, got {args.test_workers}")
    args.data = args.data.resolve()
    return args


def main(argv=None, log=None) -> int:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    args = parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.plot_only[0].read_text()), args.plot_only[1])
        return 0
    if args.plan:
        with tempfile.TemporaryDirectory() as work:
            stages = build_stages(args, Path(work))
            mark_unrunnable(stages, args)
            print(plan_text(predict(stages, args.budget), args.budget))
        return 0

    import torch

    if not torch.cuda.is_available():
        print("bench/report.py: error: needs a CUDA GPU, and torch sees none here (the tests run anywhere: pytest; "
              "the plan: python bench/report.py --plan)", file=sys.stderr)
        return 2
    if args.full_run and not args.data.is_file():
        print(f"bench/report.py: error: --full-run needs the training text, and there is none at {args.data} "
              "(give --data PATH)", file=sys.stderr)
        return 2
    import triton

    report = new_report(
        mode="full-run" if args.full_run else "report", gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, cuda=torch.version.cuda, commit=_git_commit(),
        command="python bench/report.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        data=str(args.data) if args.data.is_file() else None)
    outputs = Outputs(args.out_dir, None if args.no_results_md else RESULTS_MD, log)
    work = Path(tempfile.mkdtemp(prefix="triton-gpt-report-"))
    old_handlers = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        stages = build_stages(args, work)
        mark_unrunnable(stages, args)
        log(f"bench/report.py on {report['gpu']}; figures in {args.out_dir}")
        log(plan_text(predict(stages, args.budget), args.budget))
        if not report["data"] and not args.full_run:
            report["notes"].append(f"no training text at {args.data}: the training stages were skipped")
        run = Run(report, stages, args.budget, outputs, work, log)
        try:
            run.run()
        except Interrupted as e:
            report["notes"].append(f"interrupted by {e} after {run.elapsed():.0f} s")
            code = 130
        except Exception as e:  # noqa: BLE001 - a fault of the report's own keeps what it had written
            traceback.print_exc()
            report["notes"].append(f"the report itself failed after {run.elapsed():.0f} s: {type(e).__name__}: {e}")
            code = 1
        report["seconds"] = round(run.elapsed(), 1)
        outputs.write(report, draw=True)
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        shutil.rmtree(work, ignore_errors=True)
    print(render(report))
    log(f"report: {report['seconds']} s of a {args.budget:.0f} s budget; files in {args.out_dir}: "
        + ", ".join(p.name for p in sorted(args.out_dir.iterdir()) if p.is_file()))
    return code or exit_status(report)


def exit_status(report: dict) -> int:
    """0 when every stage that ran finished cleanly, else 1 (a failed test fails its stage)."""
    return 1 if any(e["status"] in ("failed", "killed", "interrupted") for e in report["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
