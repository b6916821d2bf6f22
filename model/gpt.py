"""The seed's character GPT: pre-LayerNorm blocks, causal multi-head attention, tied LM head.

The math is the seed's. Two things are arranged so the Triton backend can fuse them, and every
backend runs the same arrangement:
- key, query and value are one Linear(C, 3C) whose output, viewed (B, T, 3, H, D), gives q, k and
  v as strided views, with no transpose or copy;
- each branch's closing dropout, the residual add and the LayerNorm that follows are one op,
  add_layer_norm(branch, x) -> (ln(x + dropout(branch)), x + dropout(branch)). The LayerNorm after
  a block's feed-forward is the next block's ln1 (or ln_f after the last block), so a block takes
  that next LayerNorm as an argument.
A state dict saved by the seed's own script (separate key/query/value, a `tril` buffer) loads too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.backends import BACKENDS, backend_ops


@dataclass
class GPTConfig:
    vocab_size: int = 65  # characters in tiny Shakespeare
    block_size: int = 256  # longest context, in characters
    n_embd: int = 384  # width C of the residual stream
    n_head: int = 6  # attention heads H; head dim D = n_embd // n_head
    n_layer: int = 6  # transformer blocks
    dropout: float = 0.2  # on attention weights, after the attention projection and the feed-forward
    backend: str = "reference"  # which ops run: reference | torch | triton

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

    def to_dict(self) -> dict:
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

    def forward(self, h):
        B, T, C = h.shape
        qkv = self.qkv(h).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, H, D)
        q, k, v = qkv.unbind(2)  # each (B, T, H, D), a strided view
        p = self.dropout if self.training else 0.0
        y = self.ops.attention(q, k, v, p)  # (B, T, H, D)
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
        return self.net(h)


class Block(nn.Module):
    """x = x + dropout(attn(ln1(x))); x = x + dropout(ffwd(ln2(x))), with ln1(x) given."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dropout = config.dropout
        self.sa = CausalSelfAttention(config)
        self.ffwd = FeedForward(config)
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.ops = backend_ops(config.backend)

    def forward(self, h, x, next_ln: nn.LayerNorm):
        """h = ln1(x) on entry; returns (next_ln(x'), x') for the updated residual stream x'."""
        p = self.dropout if self.training else 0.0
        ln2 = self.ln2
        h, x = self.ops.add_layer_norm(self.sa(h), x, ln2.weight, ln2.bias, ln2.eps, p)  # (B, T, C) x2
        h, x = self.ops.add_layer_norm(self.ffwd(h), x, next_ln.weight, next_ln.bias, next_ln.eps, p)
        return h, x


class GPT(nn.Module):
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

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # the tied weight counts once

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.token_embedding_table(idx) + self.position_embedding_table(pos)  # (B, T, C)
        if self.residual_in_compute_dtype and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        ln1 = self.blocks[0].ln1 if self.blocks else self.ln_f
        h = self.ops.layer_norm(x, ln1.weight, ln1.bias, ln1.eps)  # (B, T, C)
        for i, block in enumerate(self.blocks):
            next_ln = self.blocks[i + 1].ln1 if i + 1 < len(self.blocks) else self.ln_f
            h, x = block(h, x, next_ln)
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Append max_new_tokens sampled tokens to idx (B, T); the context is cropped to block_size."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]  # (B, <= block_size)
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float() / temperature  # (B, V)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)  # (B, V)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        return idx
