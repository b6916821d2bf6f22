"""train.py end to end on a tiny config, and every bad input as a one-line error."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from model import GPT, GPTConfig
from model.data import CharTokenizer

ROOT = Path(__file__).resolve().parent.parent
TINY_FLAGS = [
    "--n-embd", "32", "--n-head", "2", "--n-layer", "1", "--block-size", "16", "--batch-size", "8",
    "--max-iters", "30", "--eval-interval", "10", "--eval-iters", "4", "--sample-tokens", "50",
    "--device", "cpu", "--log-interval", "10",
]


@pytest.fixture
def corpus(tmp_path):
    """A small text of its own (no download): 5,000 characters of verse."""
    path = tmp_path / "input.txt"
    path.write_text(("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 80)[:5000])
    return path


def run_cli(*flags, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *flags], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def assert_one_line_error(capsys, argv, match):
    """main() exits with status 2 and one line on stderr naming the problem; nothing on stdout."""
    with pytest.raises(SystemExit) as exc:
        sys.exit(train.main(argv))
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(match, lines[0]), lines[0]


def test_end_to_end_stdout_checkpoint_and_reload(corpus, tmp_path):
    out = tmp_path / "ckpt.pth"
    proc = run_cli(*TINY_FLAGS, "--data", str(corpus), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"\d+\.\d+ M parameters", lines[0]), lines[0]
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert [int(s.split()[1][:-1]) for s in steps] == [0, 10, 20, 29]
    for s in steps:
        assert re.fullmatch(r"step \d+: train loss \d+\.\d{4}, val loss \d+\.\d{4}", s), s
    sample = proc.stdout.split(steps[-1] + "\n", 1)[1]
    assert len(sample) == 1 + 50 + 1  # the context character, 50 sampled, print's newline
    # Progress and timings on stderr, not stdout.
    assert "ms/iter" in proc.stderr and "tok/s" in proc.stderr and "left" in proc.stderr
    assert "ms/iter" not in proc.stdout

    ckpt = torch.load(out, weights_only=False)
    assert {"model", "optimizer", "config", "vocab", "iter", "best_val_loss"} <= ckpt.keys()
    assert ckpt["iter"] == 30
    val_losses = [float(s.split()[-1]) for s in steps]
    assert ckpt["best_val_loss"] == pytest.approx(min(val_losses), abs=1e-4)
    assert val_losses[-1] < val_losses[0]
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"], strict=True)
    tok = CharTokenizer(ckpt["vocab"])
    ids = model.eval().generate(torch.zeros((1, 1), dtype=torch.long), 20)[0].tolist()
    assert len(tok.decode(ids)) == 21
    assert not (tmp_path / "ckpt.pth.tmp").exists()


def test_help_explains_every_flag():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for flag in ("--batch-size", "--block-size", "--max-iters", "--eval-interval", "--eval-iters",
                 "--learning-rate", "--n-embd", "--n-head", "--n-layer", "--dropout", "--seed", "--device",
                 "--backend", "--dtype", "--data", "--out", "--sample-tokens"):
        assert flag in proc.stdout, flag


def test_same_seed_same_output(corpus, tmp_path, capsys):
    flags = [*TINY_FLAGS, "--data", str(corpus), "--out", str(tmp_path / "a.pth"), "--max-iters", "5"]
    assert train.main(flags) == 0
    first = capsys.readouterr().out
    assert train.main(flags) == 0
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--n-embd", "30", "--n-head", "4"], r"--n-embd 30 is not divisible by --n-head 4"),
        (["--batch-size", "0"], r"--batch-size must be a positive integer, got 0"),
        (["--block-size", "-3"], r"--block-size must be a positive integer, got -3"),
        (["--n-layer", "0"], r"--n-layer must be a positive integer"),
        (["--eval-iters", "0"], r"--eval-iters must be a positive integer"),
        (["--eval-interval", "0"], r"--eval-interval must be a positive integer"),
        (["--max-iters", "-1"], r"--max-iters must be >= 0, got -1"),
        (["--sample-tokens", "-5"], r"--sample-tokens must be >= 0"),
        (["--dropout", "1.5"], r"--dropout must be in \[0, 1\), got 1.5"),
        (["--learning-rate", "0"], r"--learning-rate must be a positive number"),
        (["--device", "tpu"], r"argument --device: invalid choice: 'tpu'"),
        (["--backend", "jax"], r"argument --backend: invalid choice: 'jax'"),
        (["--batch-size", "many"], r"argument --batch-size: invalid int value: 'many'"),
        (["--block-size", "4096"], r"too short for --block-size 4096"),
    ],
    ids=["width-not-divisible", "zero-batch", "negative-block", "zero-layers", "zero-eval-iters",
         "zero-eval-interval", "negative-iters", "negative-sample", "dropout-above-1", "zero-lr",
         "unknown-device", "unknown-backend", "non-integer", "block-longer-than-data"],
)
def test_bad_flags(flags, match, corpus, tmp_path, capsys):
    assert_one_line_error(capsys, [*TINY_FLAGS, "--data", str(corpus), "--out", str(tmp_path / "m.pth"), *flags],
                          match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_gpu(corpus, tmp_path, capsys):
    assert_one_line_error(capsys, [*TINY_FLAGS, "--data", str(corpus), "--device", "cuda"],
                          r"--device cuda: no CUDA GPU is available")


def _data_file(tmp_path, kind):
    path = tmp_path / "data.txt"
    if kind == "missing":
        return tmp_path / "nope.txt"
    if kind == "empty":
        path.write_text("")
    elif kind == "not-utf8":
        path.write_bytes(b"caf\xe9 au lait\n" * 100)
    elif kind == "too-short":
        path.write_text("abc" * 10)
    elif kind == "directory":
        return tmp_path
    return path


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", r"data file .*nope.txt does not exist"),
        ("empty", r"data file .* is empty"),
        ("not-utf8", r"is not UTF-8 text"),
        ("too-short", r"too short for --block-size 16"),
        ("directory", r"is a directory"),
    ],
)
def test_bad_data_file(kind, match, tmp_path, capsys):
    assert_one_line_error(capsys, [*TINY_FLAGS, "--data", str(_data_file(tmp_path, kind)),
                                   "--out", str(tmp_path / "m.pth")], match)


def test_out_folder_must_exist(corpus, tmp_path, capsys):
    assert_one_line_error(capsys, [*TINY_FLAGS, "--data", str(corpus), "--out", str(tmp_path / "no" / "m.pth")],
                          r"--out .*: folder .* does not exist")


@pytest.mark.parametrize(
    "paths, match",
    [
        ({"--out": "input.txt"}, r"--out .*input.txt is also --data .*input.txt: it would be overwritten"),
        ({"--plot": "input.txt"}, r"--plot .*input.txt is also --data"),
        ({"--out": "m.pth", "--plot": "m.pth"}, r"--plot .*m.pth is also --out .*m.pth"),
        ({"--out": "m.pth", "--plot": "m.best.pth"}, r"--plot .*m.best.pth is also the best-val checkpoint of --out"),
        ({"--out": "./sub/../m.pth", "--plot": "m.pth"}, r"--plot .*m.pth is also --out"),
        ({"--out": "link.txt"}, r"--out .*link.txt is also --data"),  # a symbolic link to the data
    ],
    ids=["out-is-data", "plot-is-data", "plot-is-out", "plot-is-best", "same-file-other-name", "symlink"],
)
def test_an_output_over_an_input_or_another_output_is_refused(paths, match, corpus, tmp_path, capsys):
    """Before any work: a checkpoint or a plot written over the text, or two outputs on one file, would
    lose one of them silently (the data file was replaced by a checkpoint before this check)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.txt").symlink_to(corpus)
    text = corpus.read_text()
    flags = [x for flag, name in paths.items() for x in (flag, str(tmp_path / name))]
    pytest.importorskip("matplotlib")
    assert_one_line_error(capsys, [*TINY_FLAGS, "--data", str(corpus), *flags], match)
    assert corpus.read_text() == text


def test_plot_over_the_resumed_checkpoint_is_refused(corpus, tmp_path, capsys):
    ckpt = tmp_path / "r.pth"
    assert train.main([*TINY_FLAGS, "--data", str(corpus), "--out", str(ckpt), "--max-iters", "2",
                       "--sample-tokens", "0"]) == 0
    capsys.readouterr()
    assert_one_line_error(capsys, ["--resume", str(ckpt), "--data", str(corpus), "--max-iters", "4",
                                   "--plot", str(ckpt)], r"--plot .*r.pth is also --resume .*r.pth")
    assert torch.load(ckpt, weights_only=True)["iter"] == 2


def test_default_data_missing_and_download_failing(tmp_path, monkeypatch, capsys):
    """Without data/input.txt the default downloads; when that fails, the error says where to put it."""
    import model.data as data_mod

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_mod, "LOCAL_COPIES", (tmp_path / "no-copy.txt",))
    monkeypatch.setattr(data_mod, "DATA_URL", "http://127.0.0.1:9/input.txt")  # nothing listens there
    with pytest.raises(SystemExit) as exc:
        sys.exit(train.main([*TINY_FLAGS, "--out", str(tmp_path / "m.pth")]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "downloading tiny Shakespeare" in err
    assert re.search(r"could not download .* put the text file at data/input.txt", err), err
    assert "Traceback" not in err


def test_default_data_missing_is_copied_from_a_local_copy(tmp_path, monkeypatch, corpus):
    """A machine without network (CI) keeps tiny Shakespeare beside the checkout: it is copied, not downloaded."""
    import model.data as data_mod

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_mod, "LOCAL_COPIES", (tmp_path / "absent.txt", corpus))
    monkeypatch.setattr(data_mod, "DATA_URL", "http://127.0.0.1:9/input.txt")  # would fail if tried
    text = data_mod.load_text(data_mod.DEFAULT_DATA_PATH, download_if_missing=True)
    assert text == corpus.read_text()
    assert (tmp_path / "data" / "input.txt").read_text() == text
