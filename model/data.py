"""The data: tiny Shakespeare as characters, the 90/10 split, and batches sampled on the device."""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import torch

DEFAULT_DATA_PATH = Path("data") / "input.txt"
# The char-rnn repository's copy, the data set's well-known public home.
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Copies of the same file that may already lie on this machine, tried before the network: the
# project's own machines (CI among them, which has no network) keep one beside the checkout.
LOCAL_COPIES = (Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt",)


class DataError(Exception):
    """A data file that cannot be used; the message says why and what to do."""


def load_text(path: str | Path, download_if_missing: bool = False) -> str:
    """Read a UTF-8 text file; when it is missing and download_if_missing, fetch tiny Shakespeare
    (from a local copy in LOCAL_COPIES when there is one, else from DATA_URL)."""
    path = Path(path)
    if not path.exists():
        if not download_if_missing:
            raise DataError(f"data file {path} does not exist")
        _fetch(path)
    if path.is_dir():
        raise DataError(f"data path {path} is a directory, not a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    if not text:
        raise DataError(f"data file {path} is empty")
    return text


def _fetch(path: Path) -> None:
    local = next((copy for copy in LOCAL_COPIES if copy.is_file()), None)
    source = local or DATA_URL
    print(f"{path} not found: {'copying' if local else 'downloading'} tiny Shakespeare from {source}",
          file=sys.stderr)
    try:
        if local:
            payload = local.read_bytes()
        else:
            with urllib.request.urlopen(DATA_URL, timeout=30) as response:
                payload = response.read()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_bytes(payload)
        tmp.replace(path)
    except OSError as e:
        raise DataError(
            f"could not {'copy' if local else 'download'} tiny Shakespeare ({e}); put the text file at {path} "
            f"or pass --data PATH"
        ) from None


class CharTokenizer:
    """Characters to integers: the sorted set of the text's characters, as in the seed."""

    def __init__(self, chars: str):
        self.chars = chars
        self.stoi = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> list[int]:
        unknown = sorted(set(s) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return [self.stoi[c] for c in s]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)


def train_val_split(data: torch.Tensor, train_fraction: float = 0.9):
    """The first 90% is train, the rest val (the seed's split)."""
    n = int(train_fraction * len(data))
    return data[:n], data[n:]


def load_dataset(path: str | Path | None, block_size: int, device, vocab: str | None = None):
    """(tokenizer, train ids, val ids) from a text file, the ids on `device` (batches are sampled there,
    with no per-step host work). path None: data/input.txt relative to the working directory,
    downloaded when missing. vocab: a checkpoint's characters, which the text must fit; None: the
    text's own. Raises DataError for a file that cannot be used.
    """
    text = load_text(path or DEFAULT_DATA_PATH, download_if_missing=path is None)
    tokenizer = CharTokenizer.from_text(text) if vocab is None else CharTokenizer(vocab)
    try:
        data = torch.tensor(tokenizer.encode(text), dtype=torch.long)  # (N,)
    except ValueError as e:
        raise DataError(f"the data does not fit the checkpoint's vocabulary: {e}") from None
    train_data, val_data = train_val_split(data)
    shortest = min(len(train_data), len(val_data))
    if shortest <= block_size:
        raise DataError(
            f"the data ({len(data)} characters) is too short for --block-size {block_size}: each split "
            f"needs more than {block_size} characters (the smaller has {shortest})"
        )
    return tokenizer, train_data.to(device), val_data.to(device)


def get_batch(data: torch.Tensor, batch_size: int, block_size: int, generator=None):
    """A random batch of (inputs, targets), each (B, T), sampled where `data` lives.

    No host work per step: the offsets are drawn on data's device and gathered there.
    """
    ix = torch.randint(len(data) - block_size, (batch_size,), device=data.device, generator=generator)  # (B,)
    offsets = ix[:, None] + torch.arange(block_size, device=data.device)  # (B, T)
    return data[offsets], data[offsets + 1]  # (B, T), (B, T)
