"""bench/report.py: its staging (fake stages on the CPU), its tables and plot, and on a GPU its outputs.

The staging tests run real processes: a stage that hangs (with a grandchild), one that fails, one
killed midway through a pytest run, the budget planner; each checks what the report wrote.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bench import report as rep

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


# ----------------------------------------------------------------------------- tables and plot


def _report():
    att = [{"name": f"test_bench_attention[{p}]", "provider": p, "mode": mode, "shape": [64, 256, 6, 64],
            "dropout_p": 0.2, "do_bench_median_us": us * (1 if mode == "fwd+bwd" else 0.3)}
           for p, us in (("triton", 100.0), ("sdpa-flash", 250.0), ("sdpa-cudnn", 200.0), ("reference", 800.0))
           for mode in ("fwd", "fwd+bwd")]
    ln = [{"name": f"test_bench_layernorm[{p}]", "op": "layer_norm", "provider": p, "mode": "fwd",
           "shape": [16384, 384], "dtype": "torch.bfloat16", "do_bench_median_us": us, "gb_per_s": gbs}
          for p, us, gbs in (("triton", 10.0, 2500.0), ("torch", 30.0, 830.0))]
    step = [{"name": f"test_train_step[{loop}-{mode}]", "loop": loop, "mode": mode, "ms_per_step": ms,
             "tokens_per_s": int(16384 / ms * 1000), "mfu": 0.3}
            for loop, ms in (("seed", 40.0), ("torch-compile-rog", 6.6), ("triton-graphs", 4.0))
            for mode in ("train-step", "eval-batch")]
    training = {"triton-bf16": {"steps": [[0, 4.2, 4.21], [250, 2.0, 2.05]], "command": "python train.py",
                                "outcome": 0},
                "reference-fp32": {"steps": [[0, 4.2, 4.2], [250, 2.0, 2.07]], "command": "python train.py",
                                   "outcome": 0}}
    host = [{"name": f"test_bench_host[attention-{p}-fwd-{launch}]", "op": "attention", "provider": p,
             "mode": "fwd", "launch": launch, "host_us": us}
            for p, launch, us in (("triton", "stubbed", 6.0), ("torch", "stubbed", 8.0), ("triton", "real", 12.0),
                                  ("torch", "real", 8.0))]
    host.append({"name": "test_bench_host_autograd_floor", "op": "layer_norm", "provider": "autograd-floor",
                 "mode": "fwd+bwd", "launch": "none", "host_us": 7.0})
    report = rep.new_report(gpu="NVIDIA H100 80GB HBM3", torch="2.11", triton="3.6.0", cuda="13.0",
                            command="python bench/report.py", date="2026-11-28 07:00 UTC")
    report.update(benchmarks=att + ln + step + host, training=training, budget_s=360, seconds=300.0)
    report["stages"] = {"tests": {"what": "tests/", "kind": "tests", "estimate_s": 75, "limit_s": 150,
                                  "status": "failed", "reason": "tests failed (worker0)", "seconds": 90.0,
                                  "exits": {"worker0": 1, "worker1": 0}, "counts": {"passed": 300, "failed": 1},
                                  "failures": ["tests/test_x.py::test_y: failed: assert 0"],
                                  "skips": {"needs two GPUs": 2}, "not_run": 0}}
    return report


def test_render_computes_ratios_from_the_same_run():
    text = rep.render(_report())
    assert "| (64, 256, 6, 64) | 0.2 | fwd+bwd | 100.0 | 250.0 | 200.0 | - | 800.0 | 2.00x |" in text
    assert "| layer_norm | fwd | bfloat16 | (16384, 384) | 10.0 (2500) | torch 30.0 | 3.00x |" in text
    assert "| torch-compile-rog | 6.60 |" in text and "| 1.65x |" in text
    assert "| attention | fwd | real | 12.0 | 8.0 | 1.50 |" in text  # host time, ours / torch
    assert "| attention | fwd | stubbed | 6.0 | 8.0 | 0.75 |" in text
    assert "only allocates layer_norm's outputs, fwd+bwd: 7.0 us" in text and "| none |" not in text
    assert "| 250 | 2.0500 | 2.0700 | -0.0200 |" in text
    assert text.startswith("## 2026-11-28 07:00 UTC: NVIDIA H100 80GB HBM3")
    assert "300 passed, 1 failed" in text and "- tests/test_x.py::test_y: failed: assert 0" in text
    assert "2 x needs two GPUs" in text


def test_a_table_that_cannot_be_drawn_costs_only_that_table():
    report = _report()
    report["benchmarks"].append({"name": "test_bench_attention[odd]", "provider": "triton"})  # no shape
    text = rep.render(report)
    assert "(this table could not be drawn: KeyError" in text
    assert "| layer_norm | fwd | bfloat16 |" in text  # the next table is still there


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "r.png"
    rep.plot(_report(), path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_plot_without_figures_still_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    report = _report()
    report["benchmarks"] = []
    report["full_run"] = {"ours": {"wall_s": 40.0}, "torch": {"wall_s": 90.0}}
    rep.plot(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_only_from_saved_json(tmp_path):
    pytest.importorskip("matplotlib")
    saved = tmp_path / "report.json"
    saved.write_text(json.dumps(_report()))
    assert rep.main(["--plot-only", str(saved), str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- the command line


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the report would run")
def test_without_a_gpu_one_line_says_what_it_needs():
    proc = subprocess.run([PY, "bench/report.py"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], proc.stderr


def test_help_explains_every_option():
    parser = rep.build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 20, action.option_strings


def test_the_stage_names_are_the_ones_built():
    built = [s.name for argv in ([], ["--full-run"]) for s in rep.build_stages(rep.parse_args(argv), Path("/x"))]
    assert built == rep.STAGE_NAMES


def test_plan_needs_no_gpu_and_names_every_stage(tmp_path, capsys):
    assert rep.main(["--plan", "--data", str(tmp_path / "missing.txt")]) == 0
    out = capsys.readouterr().out
    for name in rep.STAGE_NAMES[:-2]:
        assert name in out
    assert f"train-compare      dropped: no data at {tmp_path / 'missing.txt'}" in out
    assert rep.main(["--plan", "--full-run", "--data", __file__]) == 0
    out = capsys.readouterr().out
    assert "race-ours" in out and "race-torch" in out and "dropped" not in out


def test_the_default_plan_fits_the_budget_even_when_every_stage_runs_to_its_limit():
    for argv, budget in (([], rep.DEFAULT_BUDGET_S), (["--full-run"], rep.FULL_RUN_BUDGET_S)):
        args = rep.parse_args([*argv, "--data", __file__])
        assert args.budget == budget
        stages = rep.build_stages(args, Path("/nonexistent"))
        # Our figures come first: by the estimates, the headline stages all run.
        kept = {s.name for s, limit, _ in rep.predict(stages, budget) if limit is not None}
        headline = {"ours-attention", "ours-layernorm", "ours-loop", "tests", "cost", "train-compare", "compile-loops"}
        assert kept >= ({"race-ours", "race-torch"} if argv else headline)
        # Worst case: each stage that runs takes its whole (cut) limit; the steps still sum within the budget.
        by_step = {}
        for s, limit, _ in rep.predict(stages, budget, worst_case=True):
            if limit is not None:
                by_step[s.step] = max(by_step.get(s.step, 0), limit)
        assert sum(by_step.values()) <= budget - rep.OUTPUT_RESERVE_S, by_step


# ----------------------------------------------------------------------------- fake stages


class _Outputs(rep.Outputs):
    """Outputs that keep a copy of report.json as it was after each write."""

    def __init__(self, out_dir):
        self.lines = []
        super().__init__(out_dir, None, log=self.lines.append)
        self.snapshots = []

    def write(self, report, draw=False):
        super().write(report, draw=False)
        self.snapshots.append(json.loads(self.json_path.read_text()))


def _stage(name, code, step=0, estimate=1, limit=20, kind="train", pool="main", n=1, record=False, tmp=None):
    """A stage running `python -c code` (n processes side by side); with record, a pytest-like record file."""
    commands = {}
    for i in range(n):
        rec = tmp / f"{name}.{i}.jsonl" if record else None
        commands[f"p{i}"] = rep.Command([PY, "-c", code], record=rec)
    return rep.Stage(name, f"fake {name}", kind, estimate, limit, commands, step, pool=pool)


def _run(tmp_path, stages, budget=300):
    outputs = _Outputs(tmp_path / "out")
    report = rep.new_report(gpu="fake", torch="x", triton="y", cuda="z", command="test")
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    run = rep.Run(report, stages, budget, outputs, work, log=outputs.lines.append)
    run.run()
    outputs.write(report)
    return report, outputs


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a zombie has ended; nobody has reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


HANGS_WITH_A_GRANDCHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
open(sys.argv[1] if len(sys.argv) > 1 else {pidfile!r}, "w").write(str(child.pid))
print("started", flush=True)
time.sleep(30)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to see the grandchild")
def test_a_hanging_stage_is_killed_at_its_limit_with_its_children(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    hang = _stage("hang", HANGS_WITH_A_GRANDCHILD.format(pidfile=str(pidfile)), step=0, limit=2)
    after = _stage("after", "print('ran')", step=1)
    t0 = time.monotonic()
    report, outputs = _run(tmp_path, [hang, after])
    assert time.monotonic() - t0 < 15  # the fakes sleep 30 s: the limit, not the fake, ended the stage
    entry = report["stages"]["hang"]
    assert entry["status"] == "killed" and entry["reason"] == "killed at its limit (2 s) (p0)", entry
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the stage's grandchild outlived the stage"
    assert report["stages"]["after"]["status"] == "ok"
    log = outputs.log_path.read_text()
    assert "hang / p0: killed at its limit (2 s)" in log and "started" in log
    assert rep.exit_status(report) == 1


def test_a_failing_stage_costs_only_that_stage(tmp_path):
    fail = _stage("fail", "import sys; print('something broke'); sys.exit(3)", step=0)
    ok = _stage("ok", "print('fine')", step=1)
    missing = rep.Stage("missing", "a command that does not exist", "train", 1, 5,
                        {"p0": rep.Command([str(tmp_path / "no-such-program")])}, 2)
    report, outputs = _run(tmp_path, [fail, ok, missing])
    assert report["stages"]["fail"]["status"] == "failed"
    assert report["stages"]["fail"]["reason"] == "exit 3 (p0)"
    assert report["stages"]["ok"]["status"] == "ok"
    assert report["stages"]["missing"]["status"] == "failed"
    assert "could not start" in report["stages"]["missing"]["reason"]
    assert "something broke" in outputs.log_path.read_text()
    section = outputs.section_path.read_text()
    assert "| fail | fake fail |" in section and "failed: exit 3 (p0)" in section


KILLED_MIDWAY = '''
import time

def test_one():
    pass

def test_two():
    pass

def test_skipped():
    import pytest
    pytest.skip("not here")

def test_measured(benchmark):
    benchmark.extra_info.update(provider="triton", do_bench_median_us=12.5)
    benchmark.pedantic(lambda: None, rounds=1)

def test_hangs():
    time.sleep(30)

def test_never_reached():
    pass
'''


def test_a_stage_killed_midway_keeps_what_it_had_run(tmp_path):
    pytest.importorskip("pytest_benchmark")
    test_file = tmp_path / "test_fake.py"
    test_file.write_text(KILLED_MIDWAY)
    rec = tmp_path / "bench.jsonl"
    cmd = rep._pytest(str(test_file), "--rootdir", str(tmp_path), "-v", record=rec)
    stage = rep.Stage("bench-fake", "a pytest run killed midway", "bench", 1, 10, {"pytest": cmd}, 0)
    report, outputs = _run(tmp_path, [stage])
    entry = report["stages"]["bench-fake"]
    assert entry["status"] == "killed"
    assert entry["counts"] == {"passed": 3, "skipped": 1}, entry
    assert entry["skips"] == {"not here": 1}
    assert entry["running"] == {"pytest": "test_fake.py::test_hangs"}
    assert entry["not_run"] == 2  # the one it was running and the one after
    assert report["benchmarks"] == [{"stage": "bench-fake", "name": "test_measured", "provider": "triton",
                                     "do_bench_median_us": 12.5}]
    # Written the moment it was measured, while the stage still ran:
    assert any(s["benchmarks"] and s["stages"]["bench-fake"]["status"] == "running" for s in outputs.snapshots)
    section = outputs.section_path.read_text()
    assert "killed (3 passed, 1 skipped; 2 not run)" in section and "was running `test_fake.py::test_hangs`" in section
    # Where it hung: its Python stack, dumped on the SIGTERM that ended it.
    log = outputs.log_path.read_text()
    assert "[its Python stacks when it was ended]" in log and 'line 19 in test_hangs' in log, log[-3000:]


BROKEN_CONTEXT = '''
def test_first():
    pass

def test_crashes():
    raise RuntimeError("CUDA error: an illegal memory access was encountered")

def test_after():
    pass

def test_last():
    pass
'''


def test_a_sticky_cuda_error_stops_the_process_and_says_so(tmp_path):
    """After an illegal memory access every later launch in the process fails: it stops instead."""
    (tmp_path / "test_cuda.py").write_text(BROKEN_CONTEXT)
    cmd = rep._pytest(str(tmp_path / "test_cuda.py"), "--rootdir", str(tmp_path), record=tmp_path / "r.jsonl")
    report, outputs = _run(tmp_path, [rep.Stage("crash", "a crash", "bench", 1, 30, {"pytest": cmd}, 0)])
    entry = report["stages"]["crash"]
    assert entry["counts"] == {"passed": 1, "failed": 1} and entry["not_run"] == 2, entry
    assert entry["stopped"] == ["pytest: a sticky CUDA error in test_cuda.py::test_crashes: this process's CUDA "
                                "context is broken"]
    assert "stopped early: pytest: a sticky CUDA error" in outputs.section_path.read_text()


def test_a_module_that_does_not_import_costs_only_its_own_tests(tmp_path):
    (tmp_path / "test_good.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    (tmp_path / "test_bad.py").write_text("import no_such_module\n\ndef test_c():\n    pass\n")
    commands = {f"worker{i}": rep._pytest(str(tmp_path), "--rootdir", str(tmp_path), "--share-dir",
                                          str(tmp_path / "share"), record=tmp_path / f"w{i}.jsonl") for i in range(2)}
    report, _ = _run(tmp_path, [rep.Stage("tests", "shared", "tests", 1, 60, commands, 0)])
    entry = report["stages"]["tests"]
    assert entry["counts"] == {"passed": 2, "error": 1}, entry  # each process reports it: counted once
    assert entry["not_run"] == 0
    assert entry["failures"] == ["test_bad.py: error: E   ModuleNotFoundError: No module named 'no_such_module'"]


SHARED = '''
import time, pytest

@pytest.mark.parametrize("i", range(10))
def test_many(i):
    time.sleep(0.1)
    assert i != 7

def test_skip():
    pytest.skip("why not")

@pytest.fixture
def broken():
    raise RuntimeError("no")

def test_error(broken):
    pass
'''


def test_processes_sharing_the_list_run_each_test_once(tmp_path):
    test_file = tmp_path / "test_shared.py"
    test_file.write_text(SHARED)
    commands = {f"worker{i}": rep._pytest(str(test_file), "--rootdir", str(tmp_path), "--share-dir",
                                          str(tmp_path / "share"), record=tmp_path / f"w{i}.jsonl")
                for i in range(2)}
    stage = rep.Stage("tests", "shared", "tests", 1, 60, commands, 0)
    report, _ = _run(tmp_path, [stage])
    entry = report["stages"]["tests"]
    assert entry["counts"] == {"passed": 9, "failed": 1, "skipped": 1, "error": 1}, entry
    assert entry["not_run"] == 0
    ran = []
    for i in range(2):
        ran += [r["nodeid"] for r in json.loads("[" + ",".join((tmp_path / f"w{i}.jsonl").read_text().split("\n")[:-1])
                                                + "]") if r["event"] == "outcome"]
    assert len(ran) == len(set(ran)) == 12
    assert entry["status"] == "failed" and "tests failed" in entry["reason"]
    assert sorted(entry["failures"]) == ["test_shared.py::test_error: error: RuntimeError: no",
                                         "test_shared.py::test_many[7]: failed: assert 7 != 7"]


def test_the_budget_drops_what_does_not_fit_and_says_so(tmp_path):
    first = _stage("first", "pass", step=0, estimate=5)
    big = _stage("big", "pass", step=1, estimate=100)
    small = _stage("small", "pass", step=2, estimate=5)
    report, outputs = _run(tmp_path, [first, big, small], budget=40)
    assert report["stages"]["first"]["status"] == "ok" and report["stages"]["small"]["status"] == "ok"
    big_entry = report["stages"]["big"]
    assert big_entry["status"] == "dropped" and big_entry["reason"].startswith("needs about 100 s; ")
    assert any("big: dropped: needs about 100 s" in line for line in outputs.lines)
    assert "| big | fake big | 100 | - | - | dropped: needs about 100 s;" in outputs.section_path.read_text()
    # The limit of what runs is cut to what is left of the budget.
    assert report["stages"]["first"]["limit_s"] <= 40 - rep.OUTPUT_RESERVE_S


def test_the_compile_peers_have_a_share_of_their_own():
    main_stage = rep.Stage("main", "m", "bench", 35, 60, {}, 0)
    compile_stage = rep.Stage("compile", "c", "bench", 15, 30, {}, 1, pool="compile")
    after = rep.Stage("after", "a", "bench", 5, 30, {}, 2)
    plan = {s.name: (limit, why) for s, limit, why in rep.predict([main_stage, compile_stage, after], 60)}
    # 60 s: 10 kept for the outputs, 18 (30 %) held for the compile peers: 32 left for the rest.
    assert plan["main"][0] is None and "needs about 35 s; 32 s of the budget left" == plan["main"][1]
    assert plan["compile"][0] == 30
    assert plan["after"][0] == 30  # once the compile peers had their turn, their share is free again
    # Without compile peers to wait for, nothing is held back.
    assert rep.predict([main_stage], 60)[0][1] == 50


def test_an_interrupted_report_kills_its_stages_and_writes_what_it_had(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    hang = _stage("hang", HANGS_WITH_A_GRANDCHILD.format(pidfile=str(pidfile)), limit=60)
    old = signal.signal(signal.SIGTERM, rep._raise_interrupted)
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        with pytest.raises(rep.Interrupted):
            _run(tmp_path, [hang])
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, old)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["stages"]["hang"]["status"] == "interrupted"
    if pidfile.exists() and Path("/proc").exists():
        time.sleep(0.5)
        assert not _alive(int(pidfile.read_text()))


TRAIN_OUTPUT = r'''
import sys, time
print("10.76 M parameters")
print("step 0: train loss 4.2000, val loss 4.2100")
print("iter 100/200 | loss 2.5000 | 5.0 ms/iter | 3,276,800 tok/s | MFU 30.0% | 0.5 s left", file=sys.stderr)
print("step 100: train loss 2.0000, val loss 2.0500")
print("step 199: train loss 1.9000, val loss 2.0600")
print("time: 3.0 s = start-up 1.0 + training 1.6 + evaluation 0.3 + sampling 0.1; 3,200,000 tok/s; MFU 29.0%; "
      "checkpoint model.pth", file=sys.stderr)
'''


def test_a_training_run_is_read_from_its_output(tmp_path):
    race = [_stage("race-ours", TRAIN_OUTPUT, kind="race", step=0),
            _stage("race-torch", "import sys; print('step 0: train loss 4.2, val loss 4.3'); sys.exit(1)",
                   kind="race", step=1)]
    report, outputs = _run(tmp_path, race)
    ours = report["full_run"]["ours"]
    assert ours["steps"] == [[0, 4.2, 4.21], [100, 2.0, 2.05], [199, 1.9, 2.06]]
    assert ours["best_val"] == 2.05 and ours["final_val"] == 2.06
    assert (ours["total_s"], ours["startup_s"], ours["training_s"]) == (3.0, 1.0, 1.6)
    assert ours["tokens_per_s"] == 3_200_000 and ours["mfu"] == "29.0%"
    assert ours["steps_per_s"] == pytest.approx(200 / 1.6)
    assert ours["wall_s"] > 0 and ours["startup_from_launch_s"] == pytest.approx(ours["wall_s"] - 2.0, abs=0.01)
    torch_run = report["full_run"]["torch"]
    assert torch_run["outcome"] == 1 and torch_run["best_val"] == 4.3 and "step 0" in torch_run["error"]
    report["mode"] = "full-run"
    text = rep.render(report)
    assert "| best val loss | 2.0500 | 4.3000 |" in text and "| outcome | exit 0 | exit 1 |" in text


def test_parse_training_reads_the_time_line_behind_a_prefix():
    run = rep.parse_training(["step 0: train loss 4.2000, val loss 4.2100",
                              "train.py: time: 41.2 s = start-up 3.1 + training 30.0 + evaluation 6.0 + sampling 2.1; "
                              "6.0 ms/iter | 2,730,667 tok/s | MFU 31.5%; checkpoint model.pth"])
    assert (run["total_s"], run["startup_s"], run["training_s"], run["evaluation_s"], run["sampling_s"]) == (
        41.2, 3.1, 30.0, 6.0, 2.1)
    assert run["tokens_per_s"] == 2_730_667 and run["mfu"] == "31.5%"


def test_parse_training_without_a_time_line():
    lines = [f"iter {i}/5000 | loss 2.5 | {ms} ms/iter | x" for i, ms in ((100, 4.0), (200, 6.0), (300, 5.0))]
    run = rep.parse_training(lines)
    assert run["best_val"] is None and "training_s" not in run
    assert run["iters_done"] == 300 and run["max_iters"] == 5000
    assert run["steps_per_s"] == pytest.approx(200.0)  # from the median ms/iter


COST = [
    {"kernel": "_attn_fwd_kernel", "variant": "bf16 D=64 causal dropout lse [model]", "regs": 168, "smem": 65536,
     "spill_bytes": 0, "hgmma": True, "loop_instructions": [600], "warp_instructions": 9_000_000, "issue_us": 10.0},
    {"kernel": "_attn_fwd_kernel", "variant": "bf16 D=64 causal dropout [model]", "regs": 128, "smem": 65536,
     "spill_bytes": 0, "hgmma": True, "loop_instructions": [500], "warp_instructions": 8_000_000, "issue_us": 9.0},
    {"kernel": "_attn_bwd_dkdv_kernel", "variant": "bf16 D=64 causal dropout [model]", "regs": 232, "smem": 98304,
     "spill_bytes": 0, "hgmma": True, "loop_instructions": [800], "warp_instructions": 20_000_000, "issue_us": 25.0},
    {"kernel": "_attn_bwd_dq_kernel", "variant": "bf16 D=64 causal dropout [model]", "regs": 200, "smem": 65536,
     "spill_bytes": 0, "hgmma": True, "loop_instructions": [700], "warp_instructions": 12_000_000, "issue_us": 15.0},
    # No dropout flag: compiled once, recorded under the first call (with dropout); it serves both.
    {"kernel": "_attn_bwd_preprocess_kernel", "variant": "bf16 D=64 causal dropout [model]", "regs": 32, "smem": 256,
     "spill_bytes": 0, "hgmma": None, "loop_instructions": [], "warp_instructions": 1_000_000, "issue_us": 2.0},
    {"kernel": "_attn_bwd_dkdv_kernel", "variant": "bf16 D=64 causal [model]", "regs": 190, "smem": 98304,
     "spill_bytes": 0, "hgmma": True, "loop_instructions": [500], "warp_instructions": 16_000_000, "issue_us": 20.0},
    {"kernel": "_attn_bwd_dq_kernel", "variant": "bf16 D=64 causal [model]", "regs": 140, "smem": 49152,
     "spill_bytes": 0, "hgmma": True, "loop_instructions": [400], "warp_instructions": 7_000_000, "issue_us": 8.0},
    {"kernel": "_ln_fwd_kernel", "variant": "x=bf16 w,b=fp32 C=384 weight bias residual+dropout stats [model]",
     "regs": 40, "smem": 0, "spill_bytes": 0, "hgmma": None, "loop_instructions": [], "warp_instructions": 1_000_000,
     "issue_us": 2.0},
    {"kernel": "_ln_fwd_kernel", "variant": "x=bf16 w,b=fp32 C=384 weight bias stats [model]",
     "regs": 40, "smem": 0, "spill_bytes": 0, "hgmma": None, "loop_instructions": [], "warp_instructions": 500_000,
     "issue_us": 1.0},
    {"kernel": "_ln_bwd_kernel", "variant": "x=bf16 w,b=fp32 C=384 weight bias dropout ds [model]",
     "regs": 100, "smem": 8192, "spill_bytes": 0, "hgmma": None, "loop_instructions": [900],
     "warp_instructions": 3_000_000, "issue_us": 6.0},
    {"kernel": "_ln_bwd_kernel", "variant": "x=bf16 w,b=fp32 C=384 weight bias [model]",
     "regs": 100, "smem": 8192, "spill_bytes": 0, "hgmma": None, "loop_instructions": [500],
     "warp_instructions": 2_000_000, "issue_us": 4.0},
    # A reduction whose variant does not depend on dropout or ds: one record, under the first call.
    {"kernel": "_ln_bwd_reduce_kernel", "variant": "x=bf16 w,b=fp32 C=384 weight bias dropout ds [model]",
     "regs": 30, "smem": 0, "spill_bytes": 0, "hgmma": None, "loop_instructions": [50],
     "warp_instructions": 100_000, "issue_us": 0.5},
    {"kernel": "_dropout_mask_kernel", "variant": "[model]", "error": "did not compile"},
]


def test_the_cost_report_is_read_and_shown_beside_the_measured(tmp_path):
    cost_json = tmp_path / "cost.json"
    write = f"import json; open({str(cost_json)!r}, 'w').write(json.dumps({COST!r}))"
    stage = rep.Stage("cost", "fake cost", "cost", 1, 20,
                      {"compile_check": rep.Command([PY, "-c", write], output=cost_json)}, 0)
    report, _ = _run(tmp_path, [stage])
    assert report["cost"] == COST
    att = [{"name": "test_bench_attention[triton-...]", "provider": "triton", "mode": mode, "shape": [64, 256, 6, 64],
            "dropout_p": p, "do_bench_median_us": us}
           for mode, p, us in (("fwd", 0.2, 30.0), ("fwd+bwd", 0.2, 114.0), ("fwd", 0.0, 20.0), ("fwd+bwd", 0.0, 64.0))]
    ln = [{"name": "test_bench_layernorm[...]", "provider": "triton", "op": "add_layer_norm", "mode": "fwd",
           "shape": [16384, 384], "dtype": "torch.bfloat16", "do_bench_median_us": 9.0, "gb_per_s": 1.0}]
    report["benchmarks"] = att + ln
    text = rep.render(report)
    assert ("| _attn_fwd_kernel | bf16 D=64 causal dropout lse [model] | 168 | 65536 | 0 | yes | 600 | 9,000,000 "
            "| 10.00 |") in text
    assert "| attention | fwd | 0.2 | _attn_fwd_kernel | 10.00 | 30.0 | 3.00 |" in text
    # The backward: its kernels' issue-bound times summed, against fwd+bwd less fwd; the preprocess
    # kernel, recorded once, counts for both dropout settings.
    assert ("| attention | bwd | 0.2 | _attn_bwd_dkdv_kernel + _attn_bwd_dq_kernel + _attn_bwd_preprocess_kernel | "
            "42.00 | 84.0 | 2.00 |") in text
    assert ("| attention | bwd | 0.0 | _attn_bwd_dkdv_kernel + _attn_bwd_dq_kernel + _attn_bwd_preprocess_kernel | "
            "30.00 | 44.0 | 1.47 |") in text
    assert "| _attn_bwd_preprocess_kernel | bf16 D=64 causal dropout [model] | 32 | 256 | 0 | - | - |" in text
    assert "| add_layer_norm | fwd | 0.2 | _ln_fwd_kernel | 2.00 | 9.0 | 4.50 |" in text
    assert "| layer_norm | fwd | 0.0 | _ln_fwd_kernel | 1.00 | - | - |" in text
    assert "| add_layer_norm | bwd | 0.2 | _ln_bwd_kernel + _ln_bwd_reduce_kernel | 6.50 | - | - |" in text
    assert "| layer_norm | bwd | 0.0 | _ln_bwd_kernel + _ln_bwd_reduce_kernel | 4.50 | - | - |" in text
    assert "| _dropout_mask_kernel | [model] | FAIL: did not compile |" in text


def test_a_cost_stage_without_json_says_so(tmp_path):
    stage = rep.Stage("cost", "fake cost", "cost", 1, 20,
                      {"compile_check": rep.Command([PY, "-c", "pass"], output=tmp_path / "none.json")}, 0)
    report, _ = _run(tmp_path, [stage])
    assert report["cost"] == [] and report["stages"]["cost"]["note"] == "the cost report wrote no JSON"


def test_stages_that_cannot_run_here_are_dropped_with_the_reason(tmp_path):
    args = rep.parse_args(["--data", str(tmp_path / "none.txt"), "--skip", "peers-loops"])
    stages = rep.build_stages(args, tmp_path)
    rep.mark_unrunnable(stages, args)
    why = {s.name: s.dropped for s in stages}
    assert why["train-compare"].startswith(f"no data at {tmp_path / 'none.txt'}")
    assert why["peers-loops"] == "left out (--skip)"
    assert why["ours-attention"] == "" and why["tests"] == ""
    args = rep.parse_args(["--only", "tests", "--data", __file__])
    stages = rep.build_stages(args, tmp_path)
    rep.mark_unrunnable(stages, args)
    assert [s.name for s in stages if not s.dropped] == ["tests"]


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: it runs bench/report.py itself")
@pytest.mark.skipif(os.environ.get(rep.IN_REPORT_ENV) == "1",
                    reason="inside bench/report.py's own test stage: running the report there would recurse")
def test_the_report_on_a_gpu_writes_its_outputs_after_each_stage(tmp_path):
    """A tiny report (our kernels' benchmarks, and a 20-step training comparison on a small text):
    report.json after each stage and each benchmark, the section, the PNG, the log."""
    corpus = tmp_path / "input.txt"
    corpus.write_text(("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 400)[:20000])
    out = tmp_path / "out"
    proc = subprocess.Popen([PY, "bench/report.py", "--only", "ours-attention", "--only", "train-compare",
                             "--iters", "20", "--data", str(corpus), "--out-dir", str(out), "--no-results-md",
                             "--budget", "200"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snapshots = []
    while proc.poll() is None:
        if (out / "report.json").exists():
            snapshots.append(json.loads((out / "report.json").read_text()))  # always whole: written atomically
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    assert proc.returncode in (0, 1), stderr
    final = json.loads((out / "report.json").read_text())
    stages = final["stages"]
    assert stages["ours-attention"]["status"] in ("ok", "failed"), stages["ours-attention"]
    assert stages["tests"]["status"] == "dropped" and stages["tests"]["reason"] == "not selected (--only)"
    ours = [b for b in final["benchmarks"] if b["stage"] == "ours-attention"]
    assert ours and all(b["provider"] == "triton" for b in ours)
    # Each benchmark was in report.json while its stage still ran, and the stage's figures before the next stage.
    assert any(s["benchmarks"] and s["stages"]["ours-attention"]["status"] == "running" for s in snapshots)
    assert any(s["stages"]["ours-attention"]["status"] != "running" and s["stages"]["train-compare"]["status"] in
               ("planned", "running") and s["benchmarks"] for s in snapshots)
    assert set(final["training"]) == {"triton-bf16", "reference-fp32"}
    assert all(run["steps"] for run in final["training"].values()), final["training"]
    section = (out / "RESULTS-section.md").read_text()
    assert "| ours-attention |" in section and "| (64, 256, 6, 64) |" in section
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "ours-attention / pytest" in (out / "report.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["RESULTS-section.md", "report.json", "report.log", "report.png"]


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="on a GPU the benchmark stage would measure for real (the GPU test below covers it)")
def test_main_on_a_pretend_gpu_runs_the_stages_and_writes_the_files(tmp_path, monkeypatch, capsys):
    """The whole command on the CPU with torch told there is a GPU: the benchmark stage runs for real
    (its benchmarks skip in the subprocess, which sees no GPU), the training stages are skipped for
    want of data, and the four files are written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "pretend GPU")
    out = tmp_path / "out"
    code = rep.main(["--only", "ours-attention", "--only", "train-compare", "--data", str(tmp_path / "none.txt"),
                     "--out-dir", str(out), "--no-results-md"], log=lambda msg: None)
    assert code == 0
    saved = json.loads((out / "report.json").read_text())
    kernels = saved["stages"]["ours-attention"]
    assert kernels["status"] == "ok" and kernels["counts"] == {"skipped": 4}, kernels
    assert kernels["skips"] == {"needs a CUDA GPU": 4}
    assert saved["stages"]["train-compare"]["status"] == "dropped"
    assert saved["notes"] == [f"no training text at {tmp_path / 'none.txt'}: the training stages were skipped"]
    files = {"RESULTS-section.md", "report.json", "report.log"} | ({"report.png"} if _has_matplotlib() else set())
    assert {p.name for p in out.iterdir()} == files
    section = capsys.readouterr().out
    assert section.startswith("## ") and "| ours-attention | our attention" in section
    assert "ok (4 skipped); skipped 4 x: needs a CUDA GPU |" in section


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(torch.cuda.is_available(), reason="pretends there is a GPU; on one the GPU test covers main")
def test_a_fault_in_the_report_itself_keeps_what_it_had_written(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "pretend GPU")
    first = _stage("first", "print('measured')", step=0, kind="cost")
    second = _stage("second", "print('step 0: train loss 4.2, val loss 4.3')", step=1, kind="train")
    monkeypatch.setattr(rep, "build_stages", lambda args, work: [first, second])

    def broken(proc):
        raise KeyError("a field the parser expected")

    monkeypatch.setattr(rep, "summarize_training", broken)
    out = tmp_path / "out"
    assert rep.main(["--out-dir", str(out), "--no-results-md", "--data", __file__], log=lambda msg: None) == 1
    saved = json.loads((out / "report.json").read_text())
    assert saved["stages"]["first"]["status"] == "ok"
    assert saved["notes"][-1].startswith("the report itself failed after ")
    assert "KeyError" in saved["notes"][-1]
    assert "second / p0" in (out / "report.log").read_text()
