"""A newcomer's first hour (the newcomer issue): what a CPU run says first, the CPU preset, Ctrl-C,
resume, output paths, refused flags, the model's docstrings and loader, and the README."""

import os
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch

from model import GPT, CheckpointError, GPTConfig
from tests.test_train_cli import ROOT, assert_one_line_error
from tests.test_train_features import SMALL, run_main, step_lines, wait_for_line
from training.checkpoint import load_checkpoint
from training.config import PRESETS, RunConfig, build_parser, flag_table, resolve_execution, settle
from training.interrupt import Interrupt
from training.metrics import rates


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "input.txt"
    path.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(120)))
    return path


def popen(*flags, cwd=ROOT, stderr=subprocess.PIPE):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *map(str, flags)], stdout=subprocess.PIPE,
                            stderr=stderr, text=True, cwd=cwd)


def train_two_steps(capsys, corpus, out):
    argv = [*SMALL, "--data", corpus, "--max-iters", "2", "--eval-interval", "1", "--out", out]
    code, _, err = run_main(capsys, argv)
    assert code == 0, err


# ----------------------------------------------------------------------------- a CPU run says what it will do


def test_cpu_run_says_what_and_how_long_before_the_first_evaluation(corpus, tmp_path):
    """The plan and an estimate from timed steps come before the step-0 evaluation; a long run names
    --preset cpu."""
    proc = popen(*SMALL, "--data", corpus, "--max-iters", "100000000", "--out", tmp_path / "m.pth",
                 stderr=subprocess.STDOUT)
    try:
        lines = []
        while not lines or "--preset cpu" not in lines[-1]:
            lines.append(proc.stdout.readline())
            assert lines[-1] and len(lines) < 20, lines
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, out
    # stdout and stderr are one stream here, in the order printed.
    text = "".join(lines) + out
    assert "step 0:" not in text.split("--preset cpu")[0]
    plan = re.search(r"training a [\d.]+ M-parameter GPT .* on the CPU: torch ops, float32", text)
    estimate = re.search(r"estimate: about [\d.]+ s a step .* in all", text)
    assert plan and estimate, text


def test_cpu_default_ops_are_torch_and_reference_is_one_flag_away():
    ex = resolve_execution(RunConfig(device="cpu"))
    assert (ex.backend, ex.dtype, ex.cuda_graphs) == ("torch", torch.float32, False)
    assert resolve_execution(RunConfig(device="cpu", backend="reference")).backend == "reference"


def test_cpu_preset_is_a_smaller_model_of_the_same_design():
    cfg = settle({"preset": "cpu"})
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.device) == (4, 4, 128, 64, "cpu")
    # A plot with a point per evaluation: enough of them to read the curves.
    assert cfg.max_iters // cfg.eval_interval + 1 >= 10
    assert settle({"preset": "cpu", "max_iters": 7}).max_iters == 7  # a flag given wins
    assert set(PRESETS["cpu"]) <= {f for f in RunConfig.__dataclass_fields__}


def test_cpu_preset_runs(corpus, tmp_path, capsys):
    code, out, err = run_main(capsys, ["--preset", "cpu", "--data", corpus, "--max-iters", "10", "--eval-interval",
                                       "5", "--eval-iters", "2", "--sample-tokens", "0", "--out",
                                       tmp_path / "m.pth"])
    assert code == 0, err
    vals = [float(ln.split()[-1]) for ln in step_lines(out)]
    assert len(vals) == 3 and vals[-1] < vals[0]
    assert load_checkpoint(tmp_path / "m.pth")["config"]["n_embd"] == 128


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM


def test_ctrl_c_during_a_long_evaluation_stops_it_with_a_checkpoint(corpus, tmp_path):
    out = tmp_path / "m.pth"
    proc = popen(*SMALL, "--data", corpus, "--eval-iters", "1000000", "--out", out)
    try:
        wait_for_line(proc.stderr, "evaluating at step 0: ")  # progress on stderr
        proc.send_signal(signal.SIGINT)
        ack = wait_for_line(proc.stderr, "received")
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert ack.startswith("train.py: SIGINT received: stopping at the next safe point"), ack
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"interrupted (SIGINT) after iteration 0: checkpoint saved to {out}" in err
    assert load_checkpoint(out)["iter"] == 0


def test_a_second_signal_quits_at_once(monkeypatch, capfd):
    """The second signal ends the process from the watcher thread, even while the main thread is busy."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    exits = []
    done = threading.Event()
    monkeypatch.setattr(os, "_exit", lambda code: (exits.append(code), done.set()))
    interrupt = Interrupt().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200):
            if interrupt.requested:
                break
            threading.Event().wait(0.01)
        assert interrupt.requested and interrupt.exit_code == 143
        os.kill(os.getpid(), signal.SIGINT)
        assert done.wait(5)
    finally:
        interrupt.restore()
    assert exits == [130]
    err = capfd.readouterr().err
    assert "SIGTERM received: stopping at the next safe point" in err and "second SIGINT: quitting at once" in err


# ----------------------------------------------------------------------------- resume


def test_resume_writes_back_to_its_file_and_says_from_which_step(corpus, tmp_path):
    ckpt = tmp_path / "d.pth"
    args = [*SMALL, "--data", corpus, "--eval-interval", "1", "--sample-tokens", "0"]
    assert subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args), "--max-iters", "2", "--out",
                           str(ckpt)], capture_output=True, cwd=tmp_path).returncode == 0
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", str(ckpt), "--data", str(corpus),
                           "--max-iters", "4", "--device", "cpu", "--sample-tokens", "0"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == f"train.py: resumed from step 2 of {ckpt}; checkpoints go to {ckpt}"
    assert load_checkpoint(ckpt)["iter"] == 4
    assert not (tmp_path / "model.pth").exists()


@pytest.mark.parametrize("extra, match", [
    (["--max-iters", "2"], r"--max-iters 2 is not beyond the checkpoint's step 2"),
    (["--max-iters", "1"], r"--max-iters 1 is not beyond the checkpoint's step 2"),
    ([], r"--max-iters 2 is not beyond the checkpoint's step 2"),  # the checkpoint's own: a finished run
], ids=["equal", "below", "finished-run"])
def test_resume_refuses_a_max_iters_not_beyond_the_checkpoint(extra, match, corpus, tmp_path, capsys):
    ckpt = tmp_path / "s.pth"
    train_two_steps(capsys, corpus, ckpt)
    assert_one_line_error(capsys, ["--resume", str(ckpt), "--data", str(corpus), "--device", "cpu", *extra], match)


def test_no_negative_or_meaningless_rates(corpus, tmp_path, capsys):
    assert rates(0.0, 0, 100, 1e6, None) == "n/a ms/iter | n/a tok/s | MFU n/a"
    assert rates(1.0, -1, 100, 1e6, None) == "n/a ms/iter | n/a tok/s | MFU n/a"
    code, _, err = run_main(capsys, [*SMALL, "--data", corpus, "--max-iters", "0", "--out", tmp_path / "m.pth"])
    assert code == 0, err
    time_line = next(ln for ln in err.splitlines() if "time:" in ln)
    assert "n/a ms/iter | n/a tok/s" in time_line
    assert not re.search(r"\s-\d", err), err


# ----------------------------------------------------------------------------- paths and flags checked first


@pytest.mark.parametrize("flag", ["--out", "--plot"])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(flag, corpus, capsys):
    if not os.path.isdir("/sys"):
        pytest.skip("needs /sys (Linux)")
    argv = [*SMALL, "--data", str(corpus), flag, "/sys/m.pth"]
    assert_one_line_error(capsys, argv, rf"{flag} /sys/m.pth: cannot write there")


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "ROMEO:"], r"--prompt is for --sample-from"),
    (["--sample-from", "m.pth", "--n-layer", "2"], r"--n-layer does nothing with --sample-from"),
    (["--sample-from", "m.pth", "--max-iters", "9"], r"--max-iters does nothing with --sample-from"),
    (["--sample-from", "m.pth", "--resume", "m.pth"], r"--resume does nothing with --sample-from"),
    (["--sample-from", "m.pth", "--out", "x.pth"], r"--out does nothing with --sample-from"),
    (["--resume", "m.pth", "--preset", "cpu"], r"--preset does nothing with --resume"),
    (["--sample-tokens", "0", "--top-k", "5"], r"--top-k does nothing with --sample-tokens 0"),
], ids=["prompt-without-sample-from", "model-flag", "loop-flag", "resume", "out", "preset-with-resume",
        "top-k-without-sample"])
def test_a_flag_that_would_be_ignored_is_refused(argv, match, capsys):
    assert_one_line_error(capsys, argv, match)


# ----------------------------------------------------------------------------- the model's own documentation


def test_model_docstrings_give_shapes():
    for obj in (GPT, GPT.forward, GPT.generate, GPT.from_checkpoint):
        assert obj.__doc__ and re.search(r"\(B, T", obj.__doc__), obj
    assert GPTConfig.__doc__ and "seed" in GPTConfig.__doc__
    for obj in (GPT.num_parameters, GPTConfig.to_dict):
        assert obj.__doc__, obj


def test_from_checkpoint_gives_a_ready_model_and_its_vocabulary(corpus, tmp_path, capsys):
    out = tmp_path / "m.pth"
    train_two_steps(capsys, corpus, out)
    model, tokenizer = GPT.from_checkpoint(out)
    assert not model.training and model.config.backend == "torch"
    assert tokenizer.chars == "".join(sorted(set(corpus.read_text())))
    assert GPT.from_checkpoint(out, backend="reference")[0].config.backend == "reference"
    ids = model.generate(torch.tensor([tokenizer.encode("Line")]), 5)  # (1, 9)
    assert tokenizer.decode(ids[0].tolist()).startswith("Line")


def test_from_checkpoint_errors_name_the_fault(corpus, tmp_path, capsys):
    """A bad backend is the caller's ValueError, not the file's; a vocabulary that does not match the
    model's vocab_size is the file's CheckpointError (decoding would fail later with an IndexError)."""
    out = tmp_path / "m.pth"
    train_two_steps(capsys, corpus, out)
    with pytest.raises(ValueError, match=r"backend must be one of .*; got 'bogus'") as exc:
        GPT.from_checkpoint(out, backend="bogus")
    assert not isinstance(exc.value, CheckpointError)
    ckpt = torch.load(out, weights_only=True)
    ckpt["vocab"] = ckpt["vocab"][:-1]
    with pytest.raises(CheckpointError, match=r"vocabulary of \d+ characters for a model of vocab_size \d+"):
        GPT.from_checkpoint(ckpt)


def test_train_py_samples_through_the_public_loader(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pth"
    train_two_steps(capsys, corpus, out)
    calls = []
    loader = GPT.from_checkpoint.__func__
    counted = classmethod(lambda cls, *a, **k: calls.append(a) or loader(cls, *a, **k))
    monkeypatch.setattr(GPT, "from_checkpoint", counted)
    code, text, _ = run_main(capsys, ["--sample-from", out, "--sample-tokens", "5", "--device", "cpu"])
    assert code == 0 and len(calls) == 1 and len(text) == 1 + 5 + 1


def test_the_loss_plot_has_a_title(corpus, tmp_path, capsys, monkeypatch):
    import matplotlib.axes

    titles = []
    real = matplotlib.axes.Axes.set_title
    recorded = lambda self, t, *a, **k: titles.append(t) or real(self, t, *a, **k)  # noqa: E731
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", recorded)
    code, _, err = run_main(capsys, [*SMALL, "--data", corpus, "--max-iters", "4", "--eval-interval", "2",
                                     "--out", tmp_path / "m.pth", "--plot", tmp_path / "loss.png"])
    assert code == 0, err
    assert titles and re.match(r"[\d.]+ M-parameter GPT: 1 layers, width 32, context 16\nbatch 8", titles[-1])


# ----------------------------------------------------------------------------- the README


README = (ROOT / "README.md").read_text()


def test_readme_flag_table_is_the_one_help_is_built_from():
    assert flag_table() in README
    help_flags = set(re.findall(r"\[(--[a-z][a-z-]+)", build_parser().format_usage()))  # every flag, once
    table = README.split(flag_table().splitlines()[0])[1].split("\n\n")[0]
    assert help_flags - {"--help"} <= set(re.findall(r"(--[a-z][a-z-]+)", table))


def test_readme_order_is_what_a_newcomer_needs():
    def at(pattern):
        m = re.search(pattern, README)
        assert m, pattern
        return m.start()

    # The first block: a virtual environment, the CPU build of torch, the project; then the CPU run.
    order = [at(r"python3? -m venv"), at(r"pip install torch==\S+ -e \"\.\[dev\]\""),
             at(r"python train\.py --preset cpu"), at(r"## The seed"), at(r"## What to expect")]
    assert order == sorted(order), order
    first_block = README.split("```bash\n")[1].split("```")[0].strip().splitlines()
    assert len(first_block) == 2, first_block  # one command installs, one runs
    assert "download.pytorch.org/whl/cpu" in README  # the CPU build for machines without the pinned file


def test_readme_says_the_small_things():
    assert "bench/compile_check.py --quick" in README
    assert re.search(r"`data/input\.txt`[^.]*relative to the working directory", README)
    assert re.search(r"On a GPU: none measured yet", README)
    assert "output.txt" in (ROOT / ".gitignore").read_text().split()
