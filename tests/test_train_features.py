"""train.py as a tool: resume, sampling from a checkpoint, plots, SIGINT, NaN stops, torchrun."""

import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import train
from tests.test_train_cli import ROOT, assert_one_line_error

SMALL = [
    "--n-embd", "32", "--n-head", "2", "--n-layer", "1", "--block-size", "16", "--batch-size", "8",
    "--eval-iters", "4", "--sample-tokens", "40", "--device", "cpu", "--log-interval", "0",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "input.txt"
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(120))
    path.write_text(text)
    return path


def wait_for_line(stream, text, limit=50):
    """Read lines from a child's stream until one contains text (at most limit lines); return it."""
    for _ in range(limit):
        line = stream.readline()
        if text in line:
            return line
        assert line, f"the stream ended before a line with {text!r}"
    raise AssertionError(f"no line with {text!r} in the first {limit}")


def run_main(capsys, argv):
    code = train.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def step_lines(out):
    return [ln for ln in out.splitlines() if ln.startswith("step ")]


def test_resume_continues_bitwise(corpus, tmp_path, capsys):
    """Stopped by --max-iters 20 and resumed to 40: the same losses and sample as one run to 40."""
    common = [*SMALL, "--data", corpus, "--eval-interval", "10", "--dropout", "0.2"]
    code, whole, _ = run_main(capsys, [*common, "--max-iters", "40", "--out", tmp_path / "whole.pth"])
    assert code == 0
    part = tmp_path / "part.pth"
    code, first, _ = run_main(capsys, [*common, "--max-iters", "20", "--out", part])
    assert code == 0 and step_lines(first)[-1].startswith("step 19:")
    code, resumed, _ = run_main(capsys, ["--resume", part, "--data", corpus, "--max-iters", "40", "--out", part,
                                         "--device", "cpu", "--log-interval", "0", "--sample-tokens", "40"])
    assert code == 0
    want = [ln for ln in step_lines(whole) if int(ln.split()[1][:-1]) >= 20]
    assert step_lines(resumed) == want
    # The sample after the last step line is the same text too.
    assert resumed.split(want[-1])[1] == whole.split(want[-1])[1]
    ckpt = torch.load(part, weights_only=True)
    assert ckpt["iter"] == 40
    assert ckpt["best_val_loss"] == pytest.approx(min(float(ln.split()[-1]) for ln in step_lines(whole)), abs=1e-4)


def test_best_checkpoint_beside_the_last(corpus, tmp_path, capsys):
    out = tmp_path / "run.pth"
    code, stdout, _ = run_main(capsys, [*SMALL, "--data", corpus, "--max-iters", "30", "--eval-interval", "10",
                                        "--out", out])
    assert code == 0
    best = torch.load(tmp_path / "run.best.pth", weights_only=True)
    vals = [float(ln.split()[-1]) for ln in step_lines(stdout)]
    steps = [int(ln.split()[1][:-1]) for ln in step_lines(stdout)]
    assert best["iter"] == steps[vals.index(min(vals))]
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_refuses_model_flags(corpus, tmp_path, capsys):
    out = tmp_path / "m.pth"
    assert run_main(capsys, [*SMALL, "--data", corpus, "--max-iters", "2", "--eval-interval", "1", "--out", out])[0] == 0
    assert_one_line_error(capsys, ["--resume", str(out), "--data", str(corpus), "--n-embd", "64", "--device", "cpu"],
                          r"--n-embd 64 differs from the checkpoint's 32")


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    """One small trained model, shared by the sampling tests (which only read it)."""
    out = tmp_path_factory.mktemp("ckpt") / "m.pth"
    code = train.main([str(a) for a in [*SMALL, "--data", corpus, "--max-iters", "30", "--eval-interval", "10",
                                        "--out", out]])
    assert code == 0
    return out


def test_sample_from_checkpoint(checkpoint, capsys):
    argv = ["--sample-from", checkpoint, "--prompt", "Line 7: the", "--sample-tokens", "60", "--seed", "3",
            "--device", "cpu"]
    code, a, _ = run_main(capsys, argv)
    assert code == 0
    assert a.startswith("Line 7: the") and len(a) == len("Line 7: the") + 60 + 1
    assert run_main(capsys, argv)[1] == a  # same seed, same text
    assert run_main(capsys, [*argv[:-4], "--seed", "4", "--device", "cpu"])[1] != a
    greedy = [*argv, "--top-k", "1", "--temperature", "0.5"]
    assert run_main(capsys, greedy)[1] == run_main(capsys, [*greedy[:-6], "--seed", "9", *greedy[-4:]])[1]


@pytest.mark.parametrize(
    "case, match",
    [
        ("prompt", r"--prompt: characters not in the vocabulary: '\{'"),
        ("missing", r"checkpoint .*nope.pth does not exist"),
        ("corrupt", r"checkpoint .*corrupt.pth cannot be read"),
        ("foreign", r"foreign.pth is not a checkpoint of this program \(missing "),
        ("temperature", r"--temperature must be > 0, got 0.0"),
        ("top-k", r"--top-k must be a positive integer, got 0"),
    ],
)
def test_sample_from_errors(case, match, checkpoint, tmp_path, capsys):
    path, extra = checkpoint, []
    if case == "prompt":
        extra = ["--prompt", "{"]
    elif case == "missing":
        path = tmp_path / "nope.pth"
    elif case == "corrupt":
        path = tmp_path / "corrupt.pth"
        path.write_bytes(os.urandom(1000))
    elif case == "foreign":
        path = tmp_path / "foreign.pth"
        torch.save({"state_dict": {}}, path)
    elif case == "temperature":
        extra = ["--temperature", "0"]
    elif case == "top-k":
        extra = ["--top-k", "0"]
    assert_one_line_error(capsys, ["--sample-from", str(path), "--device", "cpu", *extra], match)


def test_plot_written_at_each_evaluation(corpus, tmp_path, capsys):
    plot = tmp_path / "loss.png"
    code, _, _ = run_main(capsys, [*SMALL, "--data", corpus, "--max-iters", "20", "--eval-interval", "10",
                                   "--out", tmp_path / "m.pth", "--plot", plot])
    assert code == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert_one_line_error(capsys, [*SMALL, "--data", str(corpus), "--plot", str(tmp_path / "p.png")],
                          r"--plot needs matplotlib: pip install matplotlib")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "m.pth"
    code, stdout, err = run_main(capsys, [*SMALL, "--data", corpus, "--max-iters", "200", "--eval-interval", "20",
                                          "--log-interval", "5", "--learning-rate", "1e30", "--out", out])
    assert code == 1, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "loss became NaN or infinite at step" in line and f"last good checkpoint is {out}" in line, line
    ckpt = torch.load(out, weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert ckpt["iter"] <= int(line.split("at step ")[1].split(" ")[0])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_writes_a_checkpoint_and_exits(sig, corpus, tmp_path):
    out = tmp_path / "m.pth"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *SMALL, "--data", str(corpus), "--max-iters", "100000",
         "--eval-interval", "100000", "--log-interval", "20", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        wait_for_line(proc.stderr, "iter 20/")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert f"checkpoint saved to {out}" in err and f"--resume {out}" in err
    ckpt = torch.load(out, weights_only=True)
    assert 20 <= ckpt["iter"] < 100000
    assert f"interrupted ({sig.name}) after iteration {ckpt['iter']}:" in err


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--grad-accum", "3"], r"--grad-accum 3 does not divide --batch-size 8 over 1 rank"),
        (["--grad-accum", "0"], r"--grad-accum must be a positive integer"),
        (["--n-embd", "288", "--n-head", "1", "--backend", "triton", "--dtype", "float32"],
         r"--backend triton supports head dims up to 128; .* = 288: use more heads, or --backend torch"),
        (["--backend", "triton", "--dtype", "bfloat16"], r"Triton's interpreter, whose bfloat16"),
        (["--log-interval", "-1"], r"--log-interval must be >= 0"),
        (["--seed", "-1"], r"--seed must be in \[0, 2\*\*62\), got -1"),
    ],
    ids=["grad-accum-not-dividing", "zero-grad-accum", "head-dim-too-big", "bf16-in-interpreter",
         "negative-log-interval", "negative-seed"],
)
def test_bad_flags(flags, match, corpus, tmp_path, capsys):
    assert_one_line_error(capsys, [*SMALL, "--data", str(corpus), "--out", str(tmp_path / "m.pth"), *flags], match)


def test_unwritable_out_folder(corpus, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_line_error(capsys, [*SMALL, "--data", str(corpus), "--out", str(locked / "m.pth")], r"not writable")


# torchrun's own start-up (a free port picked, then bound again by the store) can lose a race with
# another process on a busy machine; that is retried once. So is one other failure, seen once in CI
# (never reproduced on purpose) before train.py met at a barrier ahead of tearing down the process
# group: a rank aborting in gloo's teardown ("terminate called") after the whole run, checkpoint
# included, had finished. Anything else fails at once.
_RENDEZVOUS_ERRORS = ("Address already in use", "RendezvousConnectionError", "RendezvousTimeoutError",
                      "DistNetworkError", "Connection refused")


def _retry_torchrun(proc, last_step_line: str) -> bool:
    if any(e in proc.stderr for e in _RENDEZVOUS_ERRORS):
        return True
    finished = last_step_line in proc.stdout and "checkpoint " in proc.stderr
    return finished and "terminate called" in proc.stderr


def test_torchrun_two_processes_with_gloo(corpus, tmp_path):
    out = tmp_path / "ddp.pth"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train.py"), *SMALL, "--data", str(corpus), "--max-iters", "60", "--eval-interval", "20",
           "--grad-accum", "2", "--out", str(out)]
    for attempt in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
        if proc.returncode == 0 or attempt or not _retry_torchrun(proc, "step 59: "):
            break
        warnings.warn(f"torchrun run retried once after: {proc.stderr[-600:]}")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-6000:]}"
    lines = proc.stdout.splitlines()
    assert sum("M parameters" in ln for ln in lines) == 1  # rank 0 alone prints
    vals = [float(ln.split()[-1]) for ln in step_lines(proc.stdout)]
    assert len(vals) == 4 and vals[-1] < vals[0] - 0.3, vals
    # Rank 0 alone writes: the checkpoint and the best one, nothing else.
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pth") == ["ddp.best.pth", "ddp.pth"]
    assert torch.load(out, weights_only=True)["iter"] == 60
