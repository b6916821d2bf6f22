"""The model: GPTConfig and GPT (nn.Modules that hold parameters and call the ops)."""

from model.gpt import GPT, Block, CausalSelfAttention, FeedForward, GPTConfig

__all__ = ["GPT", "GPTConfig", "Block", "CausalSelfAttention", "FeedForward"]
