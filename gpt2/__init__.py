"""GPT-2 from scratch: model, tokenizer, data, training, sampling, checkpoints and CLI."""
