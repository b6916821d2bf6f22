"""The training package: resume, seeds, the ranks' agreement, checkpoint writes, CUDA graphs, compile.

Each fault listed in the trainer issue has a test here that failed before its fix. The GPU ones skip
on the CPU and run in the GPU report's test shards.
"""

import ast
import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

from model import GPT, GPTConfig
from tests.test_train_cli import ROOT, assert_one_line_error
from tests.test_train_features import SMALL, _retry_torchrun, run_main, step_lines, wait_for_line
from training.checkpoint import CheckpointWriter, best_path, load_checkpoint, load_optimizer_state
from training.config import SEED_LIMIT, parse_flags
from training.runner import WARMUP, Batches, Precision, StepRunner, eval_seed

FIXTURE = ROOT / "tests" / "fixtures" / "checkpoint_v0.pth"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in the GPU report)")


def fixture_text():
    """The text the fixture checkpoint was trained on (tests/fixtures/README.md)."""
    return "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(120))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "input.txt"
    path.write_text(fixture_text())
    return path


# ----------------------------------------------------------------------------- compatibility


def test_checkpoint_written_before_resumes_with_the_same_losses(corpus, tmp_path, capsys):
    """A checkpoint saved by train.py before the split into training/ resumes as it did then."""
    ckpt = tmp_path / "v0.pth"
    ckpt.write_bytes(FIXTURE.read_bytes())
    code, out, err = run_main(capsys, ["--resume", ckpt, "--data", corpus, "--max-iters", "4", "--device", "cpu",
                                       "--log-interval", "0", "--sample-tokens", "20", "--backend", "reference"])
    assert code == 0, err
    # What that version printed for the same command (tests/fixtures/README.md).
    want = [(2, 3.7092, 3.6865), (3, 3.6822, 3.6935)]
    got = [(int(ln.split()[1][:-1]), float(ln.split()[4][:-1]), float(ln.split()[-1])) for ln in step_lines(out)]
    assert [g[0] for g in got] == [w[0] for w in want]
    for (_, gt, gv), (_, wt, wv) in zip(got, want):
        assert gt == pytest.approx(wt, abs=2e-4) and gv == pytest.approx(wv, abs=2e-4), (got, want)
    assert load_checkpoint(ckpt)["iter"] == 4


def test_checkpoint_written_before_loads_and_samples():
    model, tokenizer = GPT.from_checkpoint(FIXTURE)
    assert not model.training and model.config.n_layer == 2
    context = torch.tensor([tokenizer.encode("Line")])  # (1, 4)
    ids = model.generate(context, 20, generator=torch.Generator().manual_seed(0))  # (1, 24)
    assert tokenizer.decode(ids[0].tolist()) == "Linehc821k2gl4lr4vakq.iq"  # as that version sampled it


# ----------------------------------------------------------------------------- resume keeps this run's optimizer


def _optimizer_state_with_flags(**flags):
    """The fixture's AdamW state as a run with other settings (a GPU run's, say) would have saved it."""
    saved = torch.load(FIXTURE, weights_only=True)
    saved["optimizer"]["param_groups"] = [{**g, **flags} for g in saved["optimizer"]["param_groups"]]
    return saved


def test_resumed_optimizer_takes_this_runs_settings_and_keeps_its_state():
    saved = _optimizer_state_with_flags(capturable=True, fused=True, lr=1.0, foreach=True)
    model, _ = GPT.from_checkpoint(saved)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=False, capturable=False)
    load_optimizer_state(optimizer, saved["optimizer"])
    for group in optimizer.param_groups:
        assert (group["lr"], group["capturable"], group["fused"], group["foreach"]) == (3e-4, False, False, None)
    for i, p in enumerate(model.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], saved["optimizer"]["state"][i][key]), (i, key)


def test_resume_from_a_checkpoint_with_other_optimizer_flags(corpus, tmp_path, capsys):
    """Through train.py: the run goes on with its own flags, and they are what its checkpoint keeps."""
    ckpt = tmp_path / "gpu-like.pth"
    torch.save(_optimizer_state_with_flags(capturable=True, fused=True, lr=1.0), ckpt)
    code, out, err = run_main(capsys, ["--resume", ckpt, "--data", corpus, "--max-iters", "4", "--device", "cpu",
                                       "--log-interval", "0", "--sample-tokens", "0", "--backend", "reference"])
    assert code == 0, err
    assert [ln.split(":")[0] for ln in step_lines(out)] == ["step 2", "step 3"]
    groups = load_checkpoint(ckpt)["optimizer"]["param_groups"]
    assert all((g["capturable"], g["fused"], g["lr"]) == (False, False, 3e-4) for g in groups), groups


@requires_cuda
def test_resumed_gpu_run_keeps_cuda_graphs(corpus, tmp_path, capsys):
    """A checkpoint from a CPU run (AdamW neither capturable nor fused) resumed on the GPU is captured."""
    ckpt = tmp_path / "cpu.pth"
    code, _, err = run_main(capsys, [*SMALL, "--data", corpus, "--max-iters", "2", "--eval-interval", "1",
                                     "--out", ckpt])
    assert code == 0, err
    code, _, err = run_main(capsys, ["--resume", ckpt, "--data", corpus, "--max-iters", "12", "--device", "cuda",
                                     "--backend", "triton", "--log-interval", "0", "--sample-tokens", "0"])
    assert code == 0, err
    assert "CUDA graphs" in err and "capture" not in err, err
    saved = load_checkpoint(ckpt)
    model, _ = GPT.from_checkpoint(saved, backend="triton")
    model.cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True, capturable=True)
    load_optimizer_state(optimizer, saved["optimizer"])
    data = torch.randint(0, model.config.vocab_size, (500,), device="cuda")
    runner = StepRunner(model, optimizer, Batches(data, data, batch_size=4, block_size=16),
                        Precision(torch.bfloat16), graphs=True, start_step=saved["iter"])
    for _ in range(WARMUP + 2):
        runner.train_step()
    assert runner.graphed
    assert all(g["capturable"] and g["fused"] for g in optimizer.param_groups)


# ----------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("seed", [1_000_000_000, SEED_LIMIT - 1], ids=["1e9", "largest"])
def test_every_seed_that_validation_accepts_works(seed, corpus, tmp_path, capsys):
    code, out, err = run_main(capsys, [*SMALL, "--data", corpus, "--max-iters", "2", "--eval-interval", "1",
                                       "--seed", str(seed), "--out", tmp_path / "m.pth"])
    assert code == 0, err
    assert len(step_lines(out)) == 2


def test_eval_seeds_fit_a_generator():
    gen = torch.Generator()
    for seed in (0, 1_000_000_000, SEED_LIMIT - 1):
        for step in (0, 4999, 10**9):
            gen.manual_seed(eval_seed(seed, step, 1, 199))
    # Unchanged where the old formula fitted (checkpoints' evaluation batches stay the same).
    assert eval_seed(3, 500, 1, 7) == (3 * 1_000_003 + 500 * 1009 + 1) * 100_003 + 7


# ----------------------------------------------------------------------------- checkpoint writes


def test_checkpoint_writes_are_few_and_off_the_training_thread(corpus, tmp_path, capsys, monkeypatch):
    """Evaluations at 0, 10, 20, 29: the latest at 0, 10, 20, the end's, and the best once: 5 files
    (before: the latest and the best at every evaluation, and the end's: up to 9), none of them
    written on the training thread."""
    writes = []
    real_save = torch.save

    def counting_save(obj, path, *args, **kwargs):
        writes.append((Path(path).name, obj["iter"], threading.current_thread() is threading.main_thread()))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", counting_save)
    out = tmp_path / "m.pth"
    code, stdout, err = run_main(capsys, [*SMALL, "--data", corpus, "--max-iters", "30", "--eval-interval", "10",
                                          "--out", out])
    assert code == 0, err
    assert [w[:2] for w in writes if w[0] == "m.pth.tmp"] == [("m.pth.tmp", 0), ("m.pth.tmp", 10),
                                                              ("m.pth.tmp", 20), ("m.pth.tmp", 30)]
    vals = [float(ln.split()[-1]) for ln in step_lines(stdout)]
    best_step = [0, 10, 20, 29][vals.index(min(vals))]
    assert [w[:2] for w in writes if w[0] == "m.best.pth.tmp"] == [("m.best.pth.tmp", best_step)]
    assert not any(on_main for *_, on_main in writes)
    assert load_checkpoint(best_path(out))["iter"] == best_step


def test_a_kill_at_an_evaluation_leaves_a_loadable_checkpoint(corpus, tmp_path):
    out = tmp_path / "m.pth"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *SMALL, "--data", str(corpus), "--max-iters", "100000",
         "--eval-interval", "5", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
    )
    try:
        wait_for_line(proc.stdout, "step 10:")  # the step-0 write has finished by the third evaluation
        proc.kill()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert load_checkpoint(out)["iter"] in (0, 5, 10)


def test_checkpoint_writer_waits_for_each_write_and_reports_a_failure(tmp_path):
    writer = CheckpointWriter(tmp_path / "c.pth")
    writer.keep_best({"iter": 3})
    writer.write({"iter": 3})
    writer.write({"iter": 6})
    writer.finish({"iter": 9})
    writer.close()
    assert writer.writes == 4 and writer.last_written_step == 9
    assert torch.load(tmp_path / "c.best.pth")["iter"] == 3
    broken = CheckpointWriter(tmp_path / "missing-folder" / "c.pth")
    broken.write({"iter": 1})
    with pytest.raises(Exception, match="could not write checkpoint"):
        broken.close()


# ----------------------------------------------------------------------------- ranks agree on a non-finite loss


def test_torchrun_ranks_agree_on_a_nonfinite_loss_on_one_rank(corpus, tmp_path):
    """Rank 1 alone sees a NaN loss (tests/nan_on_rank_one.py); both ranks stop at the same step, and rank 0
    says so in one line (before, rank 1 stopped alone and rank 0 waited for it in the next all-reduce)."""
    out = tmp_path / "ddp.pth"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "nan_on_rank_one.py"), *SMALL, "--data", str(corpus), "--max-iters", "60",
           "--eval-interval", "20", "--log-interval", "10", "--out", str(out)]
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        if attempt or not _retry_torchrun(proc, "never"):
            break
        warnings.warn(f"torchrun run retried once after: {proc.stderr[-600:]}")
    assert proc.returncode == 1, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-6000:]}"
    # torchrun prints its own report (with a traceback of the launcher) when a rank exits non-zero;
    # no traceback comes from the ranks themselves.
    assert not re.search(r'File ".*(train\.py|training/)', proc.stderr), proc.stderr[-4000:]
    stops = [ln for ln in proc.stderr.splitlines() if "loss became NaN or infinite" in ln]
    assert len(stops) == 1 and "at step 25 (iter 26 " in stops[0], stops
    assert f"last good checkpoint is {out} (step 20)" in stops[0]


# ----------------------------------------------------------------------------- CUDA graphs


def test_a_runner_refuses_graphs_where_they_cannot_run():
    """train.py's flags refuse these; code that builds a StepRunner itself (the benchmarks) gets the
    same rule instead of a capture that fails on the GPU."""
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_embd=16, n_head=2, n_layer=1))
    data = torch.randint(0, 11, (200,))
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="graphs=True needs a CUDA device"):
        StepRunner(model, optimizer, Batches(data, data, batch_size=4, block_size=16), graphs=True)


class _FailingCapture:
    """torch.cuda.graph's stand-in: the capture ends in an error, as a CUDA call inside it would."""

    def __init__(self, graph):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")


@pytest.mark.parametrize("usable", [True, False], ids=["falls-back", "stops"])
def test_a_failed_capture_runs_eagerly_or_stops_in_one_line(usable, monkeypatch, capsys):
    """After a failed capture, the run goes on eagerly (one note) only if the device still draws random
    numbers eagerly; a capture ended by a CUDA error leaves torch's generator in capture state (then the
    next eager step raised "Offset increment outside graph capture", a traceback), so the run stops with
    one line saying to run without graphs. CUDA itself is stood in for: this runs on the CPU."""
    from training import runner

    calls = []
    stream = object()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", _FailingCapture)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: calls.append(("set_stream", s)))
    monkeypatch.setattr(runner, "_eager_draws_work", lambda device: usable)
    graphed = runner._GraphedCall(lambda: calls.append("fn") or 7, warmup=0, what="training step",
                                  device=torch.device("cpu"))
    if usable:
        assert graphed() == 7 and graphed() == 7
        assert calls == ["fn", ("set_stream", stream), "fn", "fn"]  # captured, the stream put back, eager
        err = capsys.readouterr().err
        assert "capture of the training step failed (CUDA error: operation not permitted" in err
        assert "running it eagerly" in err and "more detail" not in err
    else:
        with pytest.raises(runner.TrainingStopped, match=r"capture of the training step failed \(CUDA error: "
                           r"operation not permitted when stream is capturing\) and left .* --no-cuda-graphs$"):
            graphed()
        assert calls == ["fn", ("set_stream", stream)]


@requires_cuda
def test_dropout_masks_are_fresh_on_every_graph_replay():
    """One fixed batch and lr 0 (the weights never change): two replays differ only by their dropout
    masks; the same replay after resetting the generator's seed gives the same loss."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_embd=32, n_head=2, n_layer=2, dropout=0.2,
                          backend="triton")).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True, capturable=True)
    data = torch.arange(17, device=device) % 11  # block_size + 1 ids: every batch starts at 0
    runner = StepRunner(model, optimizer, Batches(data, data, batch_size=4, block_size=16), Precision(torch.bfloat16),
                        graphs=True)
    for _ in range(WARMUP + 1):
        runner.train_step()
    assert runner.graphed
    torch.cuda.manual_seed(1234)
    a, b = runner.train_step().item(), runner.train_step().item()
    torch.cuda.manual_seed(1234)
    c = runner.train_step().item()
    assert a != b, "two replays drew the same dropout masks"
    assert a == c, "the same seed did not give the same masks"


# ----------------------------------------------------------------------------- --compile MODE


@pytest.mark.parametrize("flags, want", [([], None), (["--compile"], "default"),
                                         (["--compile", "reduce-overhead"], "reduce-overhead"),
                                         (["--compile", "max-autotune", "--seed", "1"], "max-autotune")])
def test_compile_takes_an_optional_mode(flags, want):
    assert parse_flags(flags).get("compile") == want


def test_compile_refuses_an_unknown_mode(capsys):
    assert_one_line_error(capsys, ["--compile", "fast"], r"argument --compile: invalid choice: 'fast'")


@pytest.mark.slow
def test_compile_trains_and_evaluates_with_two_graphs_only(tmp_path, capsys, corpus):
    """torch backend under --compile on the CPU: one graph for the step and one for the evaluation
    (eval mode, no grad), however often the loop goes from one to the other; sampling runs eagerly."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    code, out, err = run_main(capsys, [*SMALL, "--data", corpus, "--max-iters", "6", "--eval-interval", "2",
                                       "--eval-iters", "2", "--sample-tokens", "10", "--backend", "torch",
                                       "--compile", "--out", tmp_path / "m.pth"])
    assert code == 0, err
    assert len(step_lines(out)) == 4
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert "torch.compile default" in err
    torch._dynamo.reset()  # later tests compile other models of the same classes


def test_cuda_graphs_refused_where_they_cannot_run(corpus, tmp_path, capsys):
    assert_one_line_error(capsys, [*SMALL, "--data", str(corpus), "--cuda-graphs", "--out", str(tmp_path / "m.pth")],
                          r"--cuda-graphs cannot be used here: they need a GPU")


# ----------------------------------------------------------------------------- structure


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""


def test_nothing_imports_the_script_but_its_command_line_tests():
    """Data flows train.py -> training -> model -> kernels; tests may call train.main (the command
    line) and nothing else of the script."""
    for folder in ("kernels", "model", "training", "bench"):
        for path in (ROOT / folder).glob("*.py"):
            assert "train" not in set(_imports(path)), path
    for path in (ROOT / "tests").glob("*.py"):
        if "train" in set(_imports(path)):
            used = {n.attr for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "train"}
            assert used <= {"main"}, (path, used)
    for path in (ROOT / "model").glob("*.py"):
        assert not any(m.startswith("training") for m in _imports(path)), path
    for path in (ROOT / "kernels").glob("*.py"):
        assert not any(m.startswith(("training", "model")) for m in _imports(path)), path
