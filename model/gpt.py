"""The seed's character GPT: pre-LayerNorm blocks, causal multi-head attention, tied LM head.

The math is the seed's. Two things are arranged so the Triton backend can fuse them, and every
backend runs the same arrangement:
- key, query and value are one Linear(C, 3C) whose output, viewed (B, T, 3, H, D), gives q, k and
  v as strided views, with no transpose or copy;
- each branch's closing dropout, the residual add and the LayerNorm that follows are one op,
  add_layer_norm(branch, x) -> (ln(x + dropout(branch)), x + dropout(branch)). So a block takes
  (branch, residual): the previous block's feed-forward output, not yet added, and the residual
  stream; it adds them in its first add_layer_norm and hands its own feed-forward output on. After
  the last block, GPT adds it in the add_layer_norm of ln_f.
A state dict saved by the seed's own script (separate key/query/value, a `tril` buffer) loads too.

Shapes: B batch, T sequence (at most block_size), C width (n_embd), H heads, D = C // H, V vocab.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels._common import MAX_HEAD_DIM
from model.backends import BACKENDS, backend_ops
from model.data import CharTokenizer

# What a checkpoint needs for GPT.from_checkpoint; train.py's checkpoints hold more (optimizer, step).
MODEL_CHECKPOINT_KEYS = ("model", "config", "vocab")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not hold a model; the message says which and why."""


@dataclass
class GPTConfig:
    """The model's shape and which ops it runs; the defaults are the seed's model.

    GPT(GPTConfig()) is the seed's 10.76 M-parameter model (with vocab_size 65, tiny Shakespeare's).
    Every field is checked here: a bad value raises ValueError naming it.
    """

    vocab_size: int = 65  # characters in tiny Shakespeare (V)
    block_size: int = 256  # longest context, in characters (the largest T)
    n_embd: int = 384  # width C of the residual stream
    n_head: int = 6  # attention heads H; head dim D = n_embd // n_head
    n_layer: int = 6  # transformer blocks
    dropout: float = 0.2  # on attention weights, after the attention projection and the feed-forward
    backend: str = "reference"  # which ops run: reference | torch | triton (see model/backends.py)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.backend == "triton" and self.n_embd // self.n_head > MAX_HEAD_DIM:
            raise ValueError(f"the triton backend's attention takes head dims up to {MAX_HEAD_DIM}, got "
                             f"n_embd // n_head = {self.n_embd // self.n_head}: use more heads, or another backend")

    def to_dict(self) -> dict:
        """The fields as a plain dict (what a checkpoint stores under "config")."""
        return dataclasses.asdict(self)


class CausalSelfAttention(nn.Module):
    """All heads at once from one fused projection; the closing dropout lives in add_layer_norm."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.ops = backend_ops(config.backend)

    def forward(self, h, seed=None):
        """h (B, T, C), the normed residual stream -> the attention branch's output (B, T, C).
        seed: the dropout seed for the triton backend (see GPT._dropout_seeds), else None."""
        B, T, C = h.shape
        qkv = self.qkv(h).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, H, D)
        q, k, v = qkv.unbind(2)  # each (B, T, H, D), a strided view
        p = self.dropout if self.training else 0.0
        y = self.ops.attention(q, k, v, p, seed=seed)  # (B, T, H, D)
        return self.proj(y.reshape(B, T, C))  # (B, T, C)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The seed's layout: separate query/key/value weights and a causal-mask buffer.
        names = [prefix + n + ".weight" for n in ("query", "key", "value")]
        if all(n in state_dict for n in names):
            state_dict[prefix + "qkv.weight"] = torch.cat([state_dict.pop(n) for n in names], dim=0)
            state_dict.pop(prefix + "tril", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class FeedForward(nn.Module):
    """Linear(C, 4C), ReLU, Linear(4C, C); the closing dropout lives in add_layer_norm."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        # Indices 0 and 2 as in the seed's nn.Sequential (its dropout was index 3).
        self.net = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.ReLU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
        )

    def forward(self, h):
        """h (B, T, C) -> (B, T, C)."""
        return self.net(h)


class Block(nn.Module):
    """One transformer block, in the fused add-and-norm form: forward(branch, residual).

    The seed's block is x = x + dropout(sa(ln1(x))); x = x + dropout(ffwd(ln2(x))). Here each residual
    add is fused with the LayerNorm that follows it, so a block receives the previous block's
    feed-forward output (the branch, not yet added) with the residual stream, and hands on its own:

        x = residual + dropout(branch);  h = ln1(x)      one add_layer_norm (just ln1 for the first block)
        x = x + dropout(sa(h));          h = ln2(x)      one add_layer_norm
        return ffwd(h), x                                the next block (or GPT's ln_f) adds it
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dropout = config.dropout
        self.sa = CausalSelfAttention(config)
        self.ffwd = FeedForward(config)
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.ops = backend_ops(config.backend)

    def forward(self, branch, residual, seeds=(None, None, None)):
        """branch: the previous block's feed-forward output (B, T, C), or None for the first block;
        residual: the residual stream (B, T, C); seeds: the dropout seeds of the block's three
        dropout calls, in order (see GPT._dropout_seeds). Returns (this block's feed-forward output,
        the residual stream it is to be added to), both (B, T, C)."""
        p = self.dropout if self.training else 0.0
        ln1, ln2 = self.ln1, self.ln2
        if branch is None:
            x = residual
            h = self.ops.layer_norm(x, ln1.weight, ln1.bias, ln1.eps)  # (B, T, C)
        else:
            h, x = self.ops.add_layer_norm(branch, residual, ln1.weight, ln1.bias, ln1.eps, p,
                                           seed=seeds[0])  # (B, T, C) x2
        y = self.sa(h, seed=seeds[1])  # (B, T, C)
        h, x = self.ops.add_layer_norm(y, x, ln2.weight, ln2.bias, ln2.eps, p, seed=seeds[2])  # (B, T, C) x2
        return self.ffwd(h), x  # (B, T, C) x2


class GPT(nn.Module):
    """The character GPT: token and position embeddings, n_layer blocks, ln_f, a tied LM head.

    model = GPT(GPTConfig(vocab_size=65))               # the seed's model, random weights
    logits, loss = model(idx, targets)                  # idx, targets (B, T) -> (B, T, V), scalar
    model, tokenizer = GPT.from_checkpoint("model.pth")  # a trained one, ready to generate
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.lm_head.weight = self.token_embedding_table.weight  # tied: one tensor
        self.ops = backend_ops(config.backend)
        # The fused kernels take the residual stream and the branch in one dtype, so under autocast
        # the triton backend holds the residual stream in the compute dtype (bf16/fp16); the other
        # backends keep PyTorch's autocast behaviour (a float32 residual stream).
        self.residual_in_compute_dtype = config.backend == "triton"
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | dict, backend: str | None = None):
        """(model, tokenizer) from a checkpoint written by train.py (or a dict read from one).

        The model is on the CPU, in eval mode, with the checkpoint's weights; move it with .to(device).
        backend: which ops to run; None keeps the checkpoint's, except that a triton checkpoint runs
        the torch ops where no CUDA GPU is available: the same math, where the triton ops would raise
        kernels.TritonDeviceError (or, under Triton's interpreter, run orders of magnitude slower).
        Pass backend="triton" to have the kernels all the same.
        The tokenizer (model.data.CharTokenizer) is the checkpoint's vocabulary: encode, decode.
        Raises CheckpointError (a ValueError) with a one-line reason for a file it cannot use.

            model, tokenizer = GPT.from_checkpoint("model.pth")
            idx = torch.tensor([tokenizer.encode("ROMEO:")])  # (B, T) = (1, 6)
            print(tokenizer.decode(model.generate(idx, 100)[0].tolist()))  # from (1, 6 + 100)
        """
        if backend is not None and backend not in BACKENDS:  # the caller's argument, not the file's fault
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None; got {backend!r}")
        if isinstance(checkpoint, dict):
            ckpt, where = checkpoint, "the checkpoint"
            _check_keys(ckpt, where)
        else:
            ckpt, where = read_checkpoint(checkpoint), checkpoint
        saved = dict(ckpt["config"])
        if backend is None:
            backend = saved.get("backend", "reference")
            if backend == "triton" and not torch.cuda.is_available():
                backend = "torch"
        try:
            model = cls(GPTConfig(**{**saved, "backend": backend}))
            model.load_state_dict(ckpt["model"], strict=True)
        except (TypeError, ValueError, RuntimeError, KeyError) as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"{where} does not hold a model this program can build: {first}") from None
        vocab = ckpt["vocab"]  # the characters, as train.py saves them
        if not isinstance(vocab, str) or len(vocab) != model.config.vocab_size:
            size = f"{len(vocab)} characters" if isinstance(vocab, str) else f"a {type(vocab).__name__}"
            raise CheckpointError(f"{where} has a vocabulary of {size} for a model of vocab_size "
                                  f"{model.config.vocab_size}")
        return model.eval(), CharTokenizer(vocab)

    def num_parameters(self) -> int:
        """Trainable parameters; the tied embedding / LM-head weight counts once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        """idx: token ids (B, T), T <= block_size; targets: the next ids (B, T), or None.

        Returns (logits (B, T, V), loss): loss is the mean cross-entropy over the B * T positions, a
        scalar tensor, or None without targets. Dropout is on in train mode only.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        self.ops.check_device(idx.device)  # the triton backend: kernels.TritonDeviceError, saying what to do
        seeds = self._dropout_seeds(idx.device)
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.token_embedding_table(idx) + self.position_embedding_table(pos)  # (B, T, C)
        if self.residual_in_compute_dtype and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        branch = None
        for i, block in enumerate(self.blocks):
            branch, x = block(branch, x, seeds[3 * i : 3 * i + 3])  # (B, T, C) x2
        p = self.config.dropout if self.training else 0.0
        ln_f = self.ln_f
        h, _ = self.ops.add_layer_norm(branch, x, ln_f.weight, ln_f.bias, ln_f.eps, p, seed=seeds[-1])  # (B, T, C)
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def _dropout_seeds(self, device) -> tuple:
        """One dropout seed per dropout call of a forward: each block's three (its first add-and-norm,
        which the first block does not have, attention, its second add-and-norm), then ln_f's.

        For the triton backend in training: (1,) int64 views of ONE draw from torch's generator on the
        device, instead of a draw inside every op (one launch and one small allocation each). Drawn in
        the forward, so a captured CUDA graph draws fresh seeds, hence fresh masks, on every replay.
        Otherwise Nones: the other backends draw from torch's generator inside each op, and eval mode
        draws nothing. The draw is (n, 2) and the seeds its first column, so every seed starts on a
        16-byte boundary as a fresh tensor does: Triton specializes a pointer argument on that
        alignment, and seeds 8 bytes apart would compile each dropout kernel twice (and the LayerNorm
        backward's grid, sized from a kernel compiled for aligned stand-ins, would come from the other one).
        """
        n = 3 * self.config.n_layer + 1
        if self.ops.draws_seeds and self.training and self.config.dropout > 0.0:
            draw = torch.randint(0, 2**63 - 1, (n, 2), device=device, dtype=torch.int64)  # (n, 2)
            return draw[:, 0].split(1)  # n x (1,), 16 bytes apart
        return (None,) * n

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Append max_new_tokens sampled ids to idx (B, T); returns (B, T + max_new_tokens).

        Each new id is drawn from softmax(logits / temperature), among the top_k likeliest only when
        top_k is given, with `generator` (a torch.Generator on idx's device) when given. The context
        is cropped to the last block_size ids. Call it in eval mode for the trained model's samples.
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]  # (B, <= block_size)
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()  # (B, V)
            # Shifted so the largest is 0 before the division: a tiny temperature then sends the others
            # to -inf (a greedy pick) instead of every logit to +-inf and the probabilities to NaN.
            # softmax shifts the same way, so at temperature 1 the probabilities are bit for bit the same.
            logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (B, V)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        return idx


def read_checkpoint(path: str | Path) -> dict:
    """The dict a checkpoint file holds, read onto the CPU without running any pickled code.

    Raises CheckpointError when the file is missing, is not a torch checkpoint, or lacks what a
    model needs (its weights, config and vocabulary).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give a file path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged or foreign file
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); is it a torch checkpoint?") from None
    _check_keys(ckpt, path)
    return ckpt


def _check_keys(ckpt, where) -> None:
    missing = [k for k in MODEL_CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else MODEL_CHECKPOINT_KEYS
    if missing:
        raise CheckpointError(f"{where} is not a checkpoint of this program (missing {', '.join(sorted(missing))})")
