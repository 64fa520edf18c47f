"""Generation: greedy decoding equals Hugging Face's, the cache changes nothing, the sampling rules keep exactly
the tokens they say, streaming prints only whole characters, and ``gpt2 sample`` rejects bad options with one
line."""

from __future__ import annotations

import io
from dataclasses import asdict

import pytest
import torch

from gpt2.checkpoint import save_checkpoint
from gpt2.cli import main
from gpt2.model import GPT, GPTConfig
from gpt2.sample import stream_text
from gpt2.sampling import check_sampling, choose_next, next_token_probs, top_p_keep
from gpt2.tokenizer import encode

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small random transformers GPT-2 saved to a folder."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=1000, n_positions=48, n_embd=64, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # larger-than-init weights so the argmax is decided by real margins
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    d = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(d, safe_serialization=True)
    return d


def test_greedy_matches_transformers(hf_dir):
    import transformers

    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    ours = GPT.from_pretrained(str(hf_dir), backend="torch").eval()
    prompt = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(1))
    want = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                       pad_token_id=0)
    got = ours.generate(prompt, 30, greedy=True)
    assert torch.equal(got, want)


def test_cache_and_no_cache_agree_and_generation_slides_past_the_context():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"), backend="torch").eval()
    prompt = torch.randint(0, 512, (3, 5))
    cached = model.generate(prompt, 30, greedy=True, use_cache=True)
    full = model.generate(prompt, 30, greedy=True, use_cache=False)
    assert torch.equal(cached, full)
    long = model.generate(prompt, 75, greedy=True)  # 80 tokens > block_size 64
    assert long.shape == (3, 80) and torch.equal(long[:, :35], cached)


# A hand-made distribution over 8 tokens, in a shuffled order. Sorted: 0.5 (token 5), 0.25 (2), 0.125 (7),
# 0.0625 (0), 0.03125 (3), 0.015625 (6), 0.0078125 (1), 0.0078125 (4). Powers of two: every prefix sum is exact.
PROBS = torch.tensor([[0.0625, 0.0078125, 0.25, 0.03125, 0.0078125, 0.5, 0.015625, 0.125]])
BY_RANK = [5, 2, 7, 0, 3, 6, 1, 4]


def _survivors(mask_or_probs: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask_or_probs[0] > 0).flatten().tolist())


@pytest.mark.parametrize("top_p,kept", [
    (0.5, 1),  # the likeliest token alone reaches 0.5: nothing else
    (0.5001, 2),
    (0.75, 2),  # 0.5 + 0.25 reaches 0.75 exactly: the third token is not needed
    (0.7501, 3),
    (0.9, 4),
    (0.99, 7),
    (1.0, 8),
])
def test_top_p_keeps_the_smallest_prefix_whose_mass_reaches_top_p(top_p, kept):
    assert _survivors(top_p_keep(PROBS, top_p)) == set(BY_RANK[:kept])
    # The same through the logits (float32 softmax: boundaries away from exact prefix sums only).
    if top_p not in (0.5, 0.75):
        assert _survivors(next_token_probs(PROBS.log(), top_p=top_p)) == set(BY_RANK[:kept])


@pytest.mark.parametrize("top_k", [1, 2, 3, 5, 8, 100])
def test_top_k_keeps_the_k_likeliest_tokens(top_k):
    probs = next_token_probs(PROBS.log(), temperature=0.7, top_k=top_k)
    assert _survivors(probs) == set(BY_RANK[:top_k])
    assert torch.allclose(probs.sum(), torch.tensor(1.0))  # renormalised among the survivors


def test_top_k_then_top_p_on_the_renormalised_survivors_and_no_limit_is_zero():
    # top-k 3 leaves 0.5, 0.25, 0.125 (renormalised: 4/7, 2/7, 1/7); top-p 0.8 then needs the first two only
    # (6/7 >= 0.8), where on the whole distribution it would need three (0.75 < 0.8).
    assert _survivors(next_token_probs(PROBS.log(), top_k=3, top_p=0.8)) == {5, 2}
    assert _survivors(next_token_probs(PROBS.log(), top_p=0.8)) == {5, 2, 7}
    for no_limit in (None, 0):
        assert _survivors(next_token_probs(PROBS.log(), top_k=no_limit)) == set(range(8))


def test_draws_come_only_from_the_survivors_and_greedy_is_the_argmax():
    # top-k 4 renormalises to 8/15, 4/15, 2/15, 1/15; top-p 0.85 then needs three (12/15 = 0.8 < 0.85)
    logits = PROBS.log().expand(4096, -1)
    draws = choose_next(logits, top_k=4, top_p=0.85, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (4096, 1) and set(draws.flatten().tolist()) == {5, 2, 7}
    assert choose_next(PROBS.log(), greedy=True).tolist() == [[5]]


# ----------------------------------------------------------------------------- the distribution, exactly

def reference_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None):
    """The distribution the rules define, in float64, written from their definition: divide by the temperature,
    keep every token whose logit is >= the k-th largest (ties kept), softmax, then keep the smallest prefix of the
    survivors sorted by probability (ties in token order) whose mass reaches top_p, renormalised.
    Returns ((B, V) float64 probabilities, the smallest |prefix sum - top_p| over all rows: the margin the float32
    sampler has for deciding the cut the same way)."""
    x = logits.double() / temperature
    if top_k:
        kth = x.sort(dim=-1, descending=True).values[:, min(top_k, x.shape[-1]) - 1:][:, :1]  # (B, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    margin = float("inf")
    if top_p is not None and top_p < 1.0:
        for row in probs:
            order = sorted(range(row.numel()), key=lambda i: (-row[i].item(), i))
            mass, kept = 0.0, []
            for i in order:
                kept.append(i)
                mass += row[i].item()
                margin = min(margin, abs(mass - top_p))
                if mass >= top_p:
                    break
            row[[i for i in range(row.numel()) if i not in kept]] = 0.0
    return probs / probs.sum(dim=-1, keepdim=True), margin


def _drawn_from(logits, temperature, top_k, top_p) -> torch.Tensor:
    p = next_token_probs(logits, temperature, top_k, top_p).double()  # what choose_next hands torch.multinomial
    return p / p.sum(dim=-1, keepdim=True)


# Ties at the k-th largest logit: 3.0, 2.5, 2.0 and four tokens at 1.0.
TIED = torch.tensor([[1.0, 2.0, -1.0, 1.0, 3.0, 0.5, 1.0, 0.0, 2.5, 1.0]])


@pytest.mark.parametrize("temperature,top_k,top_p,kept", [
    (1.0, 4, None, 7),  # the 4th largest is 1.0: all four tokens at 1.0 stay
    (1.0, 6, None, 7),
    (0.6, 5, None, 7),
    (1.0, 3, None, 3),  # the 3rd largest is 2.0, above the tie: exactly 3
    (1.0, 8, None, 8),
    (0.8, 4, 0.97, 7),  # top-p 0.97 needs the whole tie
    (1.7, 4, 0.9, 6),  # the top-p cut falls inside the tie: its lower token ids are kept, id 9 is not
])
def test_top_k_keeps_every_token_tied_with_the_kth(temperature, top_k, top_p, kept):
    want, margin = reference_probs(TIED, temperature, top_k, top_p)
    assert margin > 1e-4
    got = _drawn_from(TIED, temperature, top_k, top_p)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if kept is not None:
        assert int((got > 0).sum()) == kept


def _random_logits(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 50, generator=g) * 2.0  # 4 rows, 50 tokens: a spread of nucleus sizes


TEMPERATURE_CASES = [(t, k, p) for t in (0.5, 0.8, 1.6) for k in (None, 12) for p in (0.6, 0.9)]


@pytest.mark.parametrize("temperature,top_k,top_p", TEMPERATURE_CASES)
def test_distribution_equals_the_float64_reference(temperature, top_k, top_p):
    logits = _random_logits(11)
    want, margin = reference_probs(logits, temperature, top_k, top_p)
    assert margin > 1e-5, "a prefix sum within float32 error of top_p: choose other logits"
    torch.testing.assert_close(_drawn_from(logits, temperature, top_k, top_p), want, atol=1e-6, rtol=1e-5)


def test_temperature_comes_before_the_nucleus():
    # The same top-p cut on the T = 1 distribution, then tempered, would keep another set: these cases tell the two
    # orders apart, so the reference test above fails for the wrong order.
    logits = _random_logits(11)
    differ = 0
    for temperature, top_k, top_p in TEMPERATURE_CASES:
        cut_first = reference_probs(logits, 1.0, top_k, top_p)[0] > 0
        differ += int((cut_first != (_drawn_from(logits, temperature, top_k, top_p) > 0)).any(dim=-1).sum())
    assert differ >= 6, differ


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 4, None), (1.0, 4, 0.97), (1.6, None, 0.9),
                                                     (0.5, 12, 0.6)])
def test_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    """The same distribution as transformers' warpers in their order (temperature, top-k, top-p), in float64."""
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = torch.cat([TIED.expand(4, -1), _random_logits(11)[:, :10]]).double()
    scores = lp.TemperatureLogitsWarper(temperature)(None, logits)
    if top_k:
        scores = lp.TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = lp.TopPLogitsWarper(top_p)(None, scores)
    torch.testing.assert_close(_drawn_from(logits.float(), temperature, top_k, top_p), torch.softmax(scores, -1),
                               atol=1e-6, rtol=1e-5)


def test_draws_follow_the_distribution_with_ties():
    # 8000 draws among TIED's 7 top-k survivors: every survivor appears, at its frequency within 4 standard errors.
    n = 8000
    want, _ = reference_probs(TIED, 0.9, 4, None)
    draws = choose_next(TIED.expand(n, -1), temperature=0.9, top_k=4, generator=torch.Generator().manual_seed(5))
    freq = torch.bincount(draws.flatten(), minlength=TIED.shape[1]).double() / n
    se = (want[0] * (1 - want[0]) / n).sqrt()
    assert set(torch.nonzero(freq).flatten().tolist()) == set(torch.nonzero(want[0]).flatten().tolist())
    assert ((freq - want[0]).abs() <= 4 * se + 1e-12).all(), (freq, want[0])


@pytest.mark.parametrize("kwargs,needle", [
    ({"temperature": 0}, "temperature must be > 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
])
def test_model_and_cli_share_one_rule(kwargs, needle):
    args = {"temperature": 1.0, "top_k": None, "top_p": None, "greedy": False, "max_new_tokens": 1, **kwargs}
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("]", r"\]")):
        check_sampling(**args)
    flag = "--" + needle.replace("_", "-")
    with pytest.raises(ValueError, match=flag.replace("(", r"\(").replace("]", r"\]")):
        check_sampling(**args, flags=True)
    model = GPT(GPTConfig.from_preset("tiny"), backend="torch")
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("]", r"\]")):
        model.generate(torch.zeros(1, 1, dtype=torch.long), args["max_new_tokens"], temperature=args["temperature"],
                       top_k=args["top_k"], top_p=args["top_p"])
    # top_k 0 means no limit for the model too (it was an error there, and "all" in the CLI)
    assert model.generate(torch.zeros(1, 1, dtype=torch.long), 2, top_k=0).shape == (1, 3)


class _Scripted(torch.nn.Module):
    """A stand-in model whose generate_stream yields fixed tokens."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens
        self.config = GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=1, n_embd=4)
        self.transformer = torch.nn.ModuleDict({"wte": torch.nn.Embedding(1, 1)})

    def generate_stream(self, idx, max_new_tokens, **kw):
        for t in self.tokens[:max_new_tokens]:
            yield torch.tensor([[t]])


class _Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.chunks = []

    def write(self, s):
        self.chunks.append(s)
        return super().write(s)


def test_streaming_prints_only_whole_characters():
    text = " naïve café — 日本語 🙂🎭!"
    toks = encode(text)
    assert len(toks) > len(text.split())  # some characters span several byte-level tokens
    out = _Recorder()
    new = stream_text(_Scripted(toks), "A", len(toks), greedy=True, out=out)
    assert new == toks
    assert out.getvalue() == "A" + text
    assert not any("\ufffd" in c for c in out.chunks)


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("gpt2 sample: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("flags,needles", [
    (["--temperature", "0"], ["--temperature must be > 0", "--greedy"]),
    (["--temperature", "-1"], ["--temperature must be > 0"]),
    (["--top-p", "0"], ["--top-p must be in (0, 1]"]),
    (["--top-p", "1.5"], ["--top-p must be in (0, 1]"]),
    (["--top-k", "-3"], ["--top-k must be >= 0"]),
])
def test_bad_sampling_options(hf_dir, capsys, flags, needles):
    assert main(["sample", "--pretrained", str(hf_dir), "--device", "cpu", *flags]) == 2
    _one_error_line(capsys, *needles)


def test_prompt_longer_than_context(hf_dir, capsys):
    prompt = " ".join(["word"] * 60)  # 60 tokens > n_positions 48
    assert main(["sample", "--pretrained", str(hf_dir), "--device", "cpu", "--prompt", prompt]) == 2
    _one_error_line(capsys, "--prompt is 60 tokens long", "context of 48")
    assert capsys.readouterr().out == ""  # nothing printed before the error


def test_missing_checkpoint(tmp_path, capsys):
    assert main(["sample", "--ckpt", str(tmp_path), "--device", "cpu"]) == 2
    _one_error_line(capsys, "no checkpoint at")


def test_sample_from_training_checkpoint_is_reproducible(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny"), backend="torch")
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_config": asdict(model.config),
                                           "step": 1})
    argv = ["sample", "--ckpt", str(tmp_path), "--device", "cpu", "--backend", "torch", "--prompt", "The",
            "--max-new-tokens", "12", "--top-p", "0.9", "--seed", "7", "--num-samples", "2"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert first.count("--- sample") == 2 and "\nThe" in first
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    assert main(["sample", "--ckpt", str(tmp_path / "ckpt.pt"), "--device", "cpu", "--backend", "torch",
                 "--prompt", "The", "--max-new-tokens", "12", "--greedy"]) == 0
    greedy = capsys.readouterr().out
    ids = model.eval().generate(torch.tensor([encode("The")]), 12, greedy=True)[0, 1:].tolist()
    from gpt2.tokenizer import decode

    assert greedy == "The" + decode(ids) + "\n"
