"""The model: GPTConfig and GPT (nn.Modules that hold parameters and call the ops)."""

from model.gpt import GPT, Block, CausalSelfAttention, CheckpointError, FeedForward, GPTConfig, read_checkpoint

__all__ = ["GPT", "GPTConfig", "Block", "CausalSelfAttention", "FeedForward", "CheckpointError", "read_checkpoint"]
