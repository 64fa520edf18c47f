"""``gpt2 sample``: generate text from a training checkpoint or a Hugging Face GPT-2 folder.

Text streams out as it is generated: each new token's bytes go through an incremental UTF-8
decoder, so a character split across tokens is printed once it is complete, never as a
replacement mark in between.
"""

from __future__ import annotations

import argparse
import codecs
import sys

import torch

from gpt2 import runtime
from gpt2.sampling import check_sampling


def add_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``sample`` flags to ``parser``."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a training checkpoint: a run's out dir (holding ckpt.pt) or the .pt file")
    src.add_argument("--pretrained", help="a Hugging Face GPT-2 folder (config.json + model.safetensors)")
    parser.add_argument("--prompt", default="\n", help="text to continue (default a newline)")
    parser.add_argument("--num-samples", type=int, default=1, help="how many samples (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="> 0; logits are divided by it (default 0.8)")
    parser.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens; 0 = all "
                        "(default 200)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling, in (0, 1]: sample among the "
                        "smallest set of likeliest tokens whose probability reaches it (default off)")
    parser.add_argument("--greedy", action="store_true", help="always take the likeliest token (no sampling)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole context every token instead "
                        "of using the key/value cache")
    parser.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    parser.add_argument("--backend", default="auto", help="kernel backend spec (default auto)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bf16 on GPUs of compute capability 8.0 or newer, fp16 on older ones; float32 "
                        "on the CPU")


def encode_prompt(model, prompt: str, device) -> torch.Tensor:
    """The prompt as (1, T) token ids, checked against the model's context and vocabulary."""
    from gpt2.tokenizer import encode

    ids = encode(prompt)
    if not ids:
        raise ValueError("--prompt is empty; give at least one character of text")
    ctx = model.config.block_size
    if len(ids) > ctx:
        raise ValueError(f"--prompt is {len(ids)} tokens long, more than the model's context of {ctx} tokens")
    top = max(ids)
    if top >= model.config.vocab_size:
        raise ValueError(f"--prompt holds token id {top}, outside the model's vocabulary of {model.config.vocab_size}")
    return torch.tensor([ids], dtype=torch.long, device=device)


def stream_text(model, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 200,
                top_p: float | None = None, greedy: bool = False, use_cache: bool = True,
                generator: torch.Generator | None = None, out=None) -> list[int]:
    """Continue ``prompt``, writing text to ``out`` (a text stream) as tokens are chosen.

    Args:
        model: a ``GPT``.
        prompt: the text to continue (printed first).
        max_new_tokens: how many tokens to generate.
        temperature, top_k, top_p, greedy, use_cache, generator: as ``GPT.generate`` (rules: ``gpt2.sampling``).
        out: where the text goes (default ``sys.stdout``).
    Returns:
        The new token ids.
    """
    from gpt2.tokenizer import get_encoding

    out = out or sys.stdout
    enc = get_encoding()
    device = model.transformer.wte.weight.device
    idx = encode_prompt(model, prompt, device)
    out.write(prompt)
    out.flush()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    new = []
    was_training = model.training
    model.eval()
    try:
        for tok in model.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                         use_cache=use_cache, generator=generator, greedy=greedy):
            t = int(tok[0, 0])
            new.append(t)
            text = decoder.decode(enc.decode_single_token_bytes(t))
            if text:
                out.write(text)
                out.flush()
        out.write(decoder.decode(b"", final=True))
        out.flush()
    finally:
        model.train(was_training)
    return new


def run(args) -> int:
    """Run ``gpt2 sample``; returns the exit status."""
    from gpt2.checkpoint import load_inference_model

    check_sampling(args.temperature, args.top_k, args.top_p, args.greedy, args.max_new_tokens, flags=True)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    rt = runtime.start(args.device, args.dtype, distributed=False)
    model = load_inference_model(args.ckpt, args.pretrained, args.backend, rt.device)
    encode_prompt(model, args.prompt, rt.device)  # a bad prompt fails before anything is printed
    gen = torch.Generator(device=rt.device).manual_seed(args.seed)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples} ---", flush=True)
        with rt.autocast():
            stream_text(model, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, greedy=args.greedy, use_cache=not args.no_cache, generator=gen)
        print(flush=True)
    return 0
