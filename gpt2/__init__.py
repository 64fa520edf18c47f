"""GPT-2 from scratch: model, tokenizer, data, training, sampling, checkpoints and CLI."""

__all__ = ["GPT", "GPTConfig"]


def __getattr__(name):
    # Lazy, so that `gpt2.cli` can set torch's allocator options before torch is first imported.
    if name in __all__:
        from gpt2 import model

        return getattr(model, name)
    raise AttributeError(f"module 'gpt2' has no attribute {name!r}")
