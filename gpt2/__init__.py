"""GPT-2 from scratch: model, tokenizer, data, training, sampling, checkpoints and CLI."""

from gpt2.model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
