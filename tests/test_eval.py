"""``gpt2 eval``: the windowed loss and HellaSwag scores against transformers' GPT-2 on the same weights, and
its one-line errors.

The reference model is a random ``transformers.GPT2LMHeadModel`` with GPT-2's vocabulary (text is tokenized
with GPT-2's BPE), initialised wide (std 0.3) so that its predictions differ clearly from token to token and a
window scored one position off, or a token scored twice, moves the loss well past the tolerance.
"""

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch

from gpt2.cli import main
from gpt2.data import DataError, write_shard
from gpt2.evaluate import count_windows, windows
from gpt2.hellaswag import Example, load_hellaswag, score_hellaswag
from gpt2.tokenizer import encode

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes: a second thread only spins

T = 32  # the test model's context

TEXT = ("The lighthouse keeper counted the ships each evening, writing their names in a blue ledger. "
        "When the fog rolled in, she lit the lamp early and listened for bells across the water. "
        "Her brother sent letters from the mainland, full of questions about the weather and the gulls. "
        "One winter a schooner ran aground on the northern rocks, and the crew waded ashore at dawn. "
        "They stayed for a week, mending sails and trading stories, then left with the spring tide. "
        "The ledger still holds their ship's name, underlined twice in red ink.")

# Made-up HellaSwag items: (ctx, four endings, label). The last context is longer than the model's context.
ITEMS = [
    ("A man is standing on a ladder next to a tree. He", ["picks apples and drops them into a basket.",
     "swims across the lake.", "reads a newspaper upside down.", "sings to the moon loudly."], 0),
    ("The chef cracks three eggs into a bowl. She", ["paints the ceiling green.", "whisks them with a fork.",
     "drives to the airport.", "plants tulips in the snow."], 1),
    ("A girl ties her running shoes at the start line. The whistle blows and she",
     ["falls asleep.", "orders a pizza.", "sprints down the track ahead of the others.", "knits a scarf."], 2),
    ("Two kids build a sandcastle on the beach. A wave", ["sends an email.", "bakes bread.",
     "plays the violin.", "washes over the walls and they laugh."], 3),
    ("The mechanic opens the hood of the car. He", ["checks the oil level with a dipstick.",
     "flies away.", "writes a symphony for the engine and its many pistons.", "eats the tire."], 0),
    ("On a quiet morning the baker " + "slowly and carefully kneads the heavy dough " * 4 + "and then she",
     ["shapes it into loaves.", "jumps.", "goes to the moon on a rocket made of bread.", "sleeps."], 0),
]


# ----------------------------------------------------------------------------- fixtures and references

@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(transformers model, its save_pretrained folder): 2 layers, 32 wide, context 32, GPT-2's vocabulary."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=T, vocab_size=50257,
                                  initializer_range=0.3)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return model, folder


@pytest.fixture(scope="module")
def guide_model(hf_model):
    """The test model with one more position (n_positions T + 1) for the loop of transformers' perplexity guide.

    The guide's window is ``max_length`` tokens fed as both inputs and labels; the model shifts the labels inside, so a
    window scores at most max_length - 1 targets. A window of ours, T inputs and their T next tokens, spans T + 1
    tokens: the guide's rule at max_length = T + 1. The extra position row feeds only a window's last input, whose
    logits the shift never uses and which causal attention keeps out of every other position: no scored logit
    depends on it.
    """
    import transformers

    model, _ = hf_model
    big = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**model.config.to_dict(), "n_positions": T + 1}))
    state = model.state_dict()
    with torch.no_grad():
        for name, p in big.state_dict().items():
            p[:state[name].shape[0]].copy_(state[name])  # wpe: rows 0..T-1; row T stays as drawn
    return big.eval()


def guide_nll(model, ids, stride, max_length=T + 1) -> tuple[float, int]:
    """The loop of transformers' guide "Perplexity of fixed-length models" on its model: windows of ``max_length``
    tokens every ``stride``, labels the window's tokens with those an earlier window scored set to -100, the loss the
    model computes from them (shifted inside); each window's mean weighted by its number of valid targets after the
    shift. (The guide's own count, valid labels - batch size, is that number for the first window only: a later
    window's first label is already -100, so the shift drops no valid one.) Returns (nats, count)."""
    ids = torch.tensor(ids)[None]  # (1, n)
    nats, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        inputs = ids[:, begin:end]
        labels = inputs.clone()
        labels[:, :-(end - prev_end)] = -100  # the targets up to prev_end were scored by an earlier window
        with torch.no_grad():
            loss = model(inputs, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nats += loss.item() * n
        count += n
        prev_end = end
        if end == ids.shape[1]:
            break
    return nats, count


def hf_hellaswag(model, items) -> tuple[list, list]:
    """Predictions (summed, mean) of transformers' model: each ending alone, no padding, its context cut to the
    last T + 1 tokens."""
    preds, preds_norm = [], []
    for ctx, endings, _ in items:
        sums, means = [], []
        for ending in endings:
            end = encode(" " + ending)
            ids = torch.tensor(encode(ctx) + end)[-(T + 1):]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[None, :-1]).logits[0], dim=-1)
            nll = -logp[-len(end):].gather(1, ids[-len(end):, None])
            sums.append(nll.sum().item())
            means.append(nll.mean().item())
        preds.append(int(np.argmin(sums)))
        preds_norm.append(int(np.argmin(means)))
    return preds, preds_norm


def write_items(path, items, extra=None) -> None:
    rows = [{"ind": i, "activity_label": "made up", "ctx": c, "endings": e, "label": lab, **(extra or {})}
            for i, (c, e, lab) in enumerate(items)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_eval(argv, capsys) -> tuple[int, str, str]:
    """``gpt2 eval ARGV`` on the CPU, where the transformers model it is compared with runs (the test model's head
    size, 16, is also one the Triton attention refuses) in float32 (auto is bf16 on a CPU with native bf16), unless
    ARGV names a device or dtype."""
    rc = main(["eval", "--device", "cpu", "--dtype", "float32", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def close(a, b, rel=1e-4) -> bool:
    return abs(a - b) <= rel * abs(b)


# ----------------------------------------------------------------------------- windows

@pytest.mark.parametrize("n,ctx,stride", [(2, 4, 2), (10, 4, 4), (10, 4, 1), (11, 4, 3), (5, 8, 4), (97, 16, 5)])
def test_windows_score_every_token_but_the_first_once(n, ctx, stride):
    scored = []
    prev_end = 0
    for begin, end, skip in windows(n, ctx, stride):
        assert 0 < end - begin <= ctx and 0 <= skip < end - begin
        scored += range(begin + 1 + skip, end + 1)  # target j of the window is token begin + 1 + j
        if begin > 0:
            assert begin + 1 + skip == prev_end + 1  # starts right after the last scored token
        prev_end = end
    assert scored == list(range(1, n))
    assert count_windows(n, ctx, stride) == len(list(windows(n, ctx, stride)))


# ----------------------------------------------------------------------------- the loss

@pytest.mark.parametrize("stride", [T, 12])
def test_text_loss_matches_transformers(hf_model, guide_model, tmp_path, capsys, stride):
    _, folder = hf_model
    src = tmp_path / "story.txt"
    src.write_text(TEXT)
    ids = encode(TEXT)
    assert len(ids) > 3 * T
    out = tmp_path / "res.json"
    rc, stdout, _ = run_eval(["--pretrained", str(folder), "--data", str(src), "--stride", str(stride),
                              "--batch-size", "3", "--json", str(out)], capsys)
    assert rc == 0
    res = json.loads(out.read_text())
    nats, count = guide_nll(guide_model, ids, stride)
    assert res["tokens"] == count == len(ids) - 1
    assert close(res["loss"], nats / count, rel=1e-5), (res["loss"], nats / count)
    assert close(res["perplexity"], math.exp(nats / count))
    assert close(res["bits_per_byte"], nats / math.log(2) / len(TEXT.encode("utf-8")))
    assert f"{res['loss']:.4f}" in stdout


@pytest.mark.parametrize("stride", [T, 10])
def test_shard_loss_matches_transformers_each_file_alone(hf_model, guide_model, tmp_path, capsys, stride):
    _, folder = hf_model
    rng = np.random.default_rng(0)
    shards = {"a_val_000000.bin": rng.integers(0, 50257, 90), "b_train_000001.bin": rng.integers(0, 50257, 41)}
    for name, toks in shards.items():
        write_shard(tmp_path / name, toks)
    out = tmp_path / "res.json"
    rc, _, _ = run_eval(["--pretrained", str(folder), "--data", str(tmp_path), "--stride", str(stride),
                         "--backend", "torch", "--json", str(out)], capsys)
    assert rc == 0
    res = json.loads(out.read_text())
    ref = [guide_nll(guide_model, toks.tolist(), stride) for toks in shards.values()]
    nats, count = sum(r[0] for r in ref), sum(r[1] for r in ref)
    assert res["tokens"] == count == 89 + 40
    assert close(res["loss"], nats / count, rel=1e-5), (res["loss"], nats / count)
    assert res["bits_per_byte"] is None


@pytest.mark.parametrize("stride", [T, T // 2, 12, 5])
def test_strided_loss_is_the_guides_rule_to_1e5(hf_model, guide_model, stride):
    """600 random tokens, strides from disjoint windows to 5: the loss and token count of ``lm_loss`` in float32
    are the guide's to 1e-5 relative. (With the guide's loop at max_length = T instead, each window holds one target
    less and every window after the first is weighted by one token less: 2.7e-3 apart at stride T, 1.6e-3 at T / 2,
    on these tokens.)"""
    from gpt2.evaluate import Stream, lm_loss
    from gpt2.model import GPT

    ids = np.random.default_rng(3).integers(0, 50257, 600)
    ours = GPT.from_pretrained(str(hf_model[1]), backend="torch")
    res = lm_loss(ours, [Stream("random", ids, None)], stride, batch_size=5)
    nats, count = guide_nll(guide_model, ids.tolist(), stride)
    assert res["tokens"] == count == 599
    assert close(res["loss"], nats / count, rel=1e-5), (res["loss"], nats / count, abs(res["loss"] / nats * count - 1))


def test_checkpoint_gives_the_pretrained_loss(hf_model, tmp_path, capsys):
    from gpt2.checkpoint import save_checkpoint
    from gpt2.model import GPT

    _, folder = hf_model
    ours = GPT.from_pretrained(str(folder))
    save_checkpoint(tmp_path / "run" / "ckpt.pt", {"model": ours.state_dict(), "model_config": asdict(ours.config),
                                                   "step": 0})
    src = tmp_path / "story.txt"
    src.write_text(TEXT[:200])
    results = []
    for flag, where in (("--ckpt", tmp_path / "run"), ("--pretrained", folder)):
        rc, _, _ = run_eval([flag, str(where), "--data", str(src), "--json", str(tmp_path / "r.json")], capsys)
        assert rc == 0
        results.append(json.loads((tmp_path / "r.json").read_text()))
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)
    assert results[0]["stride"] == T // 2


# ----------------------------------------------------------------------------- hellaswag

def test_hellaswag_matches_transformers(hf_model, tmp_path, capsys):
    model, folder = hf_model
    assert len(encode(ITEMS[-1][0])) > T  # the last example is cut from the left
    items = tmp_path / "hs.jsonl"
    write_items(items, ITEMS)
    out = tmp_path / "res.json"
    rc, stdout, stderr = run_eval(["--pretrained", str(folder), "--hellaswag", str(items), "--json", str(out)],
                                  capsys)
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"accuracy", "accuracy_norm", "n", "predictions", "predictions_norm"}  # no --data: no loss
    preds, preds_norm = hf_hellaswag(model, ITEMS)
    labels = [lab for _, _, lab in ITEMS]
    assert res["predictions"] == preds and res["predictions_norm"] == preds_norm
    assert len(set(preds + preds_norm)) > 1, "a random model that always picks the same ending tests little"
    assert res["n"] == len(ITEMS)
    assert res["accuracy"] == pytest.approx(np.mean(np.array(preds) == labels))
    assert res["accuracy_norm"] == pytest.approx(np.mean(np.array(preds_norm) == labels))
    assert "1 HellaSwag ending(s)" not in stderr and "4 HellaSwag ending(s) did not fit" in stderr
    assert "hellaswag: accuracy" in stdout


def test_hellaswag_padding_does_not_change_an_endings_loss(hf_model):
    """Each ending's summed and mean loss in its right-padded batch of four equals its loss alone, and
    transformers' (predictions alone can hide a padded position counted in: short endings win anyway)."""
    from gpt2.hellaswag import _ending_losses, _rows
    from gpt2.model import GPT

    model, folder = hf_model
    ours = GPT.from_pretrained(str(folder), backend="torch").eval()
    ctx, endings, label = ITEMS[2]
    rows, cut = _rows(Example(ctx, tuple(endings), label), encode, T, 50257)
    assert cut == 0 and len({len(ids) for ids, _ in rows}) > 1  # endings of different lengths: padding
    with torch.no_grad():
        total, mean = _ending_losses(ours, rows, "cpu")
        for r, (ids, first) in enumerate(rows):
            alone = _ending_losses(ours, [(ids, first)], "cpu")
            torch.testing.assert_close((total[r], mean[r]), (alone[0][0], alone[1][0]), rtol=1e-5, atol=1e-5)
            logp = torch.log_softmax(model(torch.tensor(ids[:-1])[None]).logits[0], dim=-1)
            ref = -logp[first - 1:].gather(1, torch.tensor(ids[first:])[:, None]).sum()
            assert close(total[r].item(), ref.item()), (total[r].item(), ref.item())


def test_hellaswag_api_restores_training_mode(hf_model, tmp_path):
    from gpt2.model import GPT

    model, folder = hf_model
    items = tmp_path / "hs.jsonl"
    write_items(items, ITEMS[:3], extra={"split": "val"})
    examples = load_hellaswag(items)
    ours = GPT.from_pretrained(str(folder), backend="torch").train()
    res = score_hellaswag(ours, examples, tokenizer=encode, device="cpu")
    assert ours.training
    assert res["predictions"] == hf_hellaswag(model, ITEMS[:3])[0]


def test_hellaswag_with_data_gives_both(hf_model, tmp_path, capsys):
    _, folder = hf_model
    items, src, out = tmp_path / "hs.jsonl", tmp_path / "t.txt", tmp_path / "res.json"
    write_items(items, ITEMS[:2])
    src.write_text(TEXT[:150])
    rc, _, _ = run_eval(["--pretrained", str(folder), "--hellaswag", str(items), "--data", str(src),
                         "--json", str(out)], capsys)
    assert rc == 0
    res = json.loads(out.read_text())
    assert {"loss", "perplexity", "tokens", "bits_per_byte", "accuracy", "n"} <= set(res) and res["n"] == 2


# ----------------------------------------------------------------------------- bad input

GOOD = {"ctx": "A cat sits.", "endings": ["a", "b", "c", "d"], "label": 1}
BAD_LINES = [
    ({"ctx": "A cat sits.", "endings": ["a", "b", "c", "d"]}, "missing key label"),
    ({"endings": ["a", "b", "c", "d"], "label": 0}, "missing key ctx"),
    ({**GOOD, "endings": ["a", "b", "c"]}, "list of 4 strings, got 3 items"),
    ({**GOOD, "label": 4}, "'label' must be an integer 0..3, got 4"),
    ({**GOOD, "label": "1"}, "(a str)"),
    ({**GOOD, "label": 1.0}, "(a float)"),
]


@pytest.mark.parametrize("bad,message", BAD_LINES)
def test_bad_hellaswag_line_is_one_line_naming_file_and_line(hf_model, tmp_path, capsys, bad, message):
    items = tmp_path / "hs.jsonl"
    items.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    out = tmp_path / "res.json"
    rc, _, err = run_eval(["--pretrained", str(hf_model[1]), "--hellaswag", str(items), "--json", str(out)], capsys)
    assert rc == 2 and err.strip().count("\n") == 0
    assert f"{items}:2:" in err and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("content,message", [(json.dumps(GOOD) + "\n{'ctx': 1}\n", ":2: not valid JSON"),
                                             ("", "holds no examples"), ("\n\n", "holds no examples")])
def test_bad_hellaswag_file(hf_model, tmp_path, capsys, content, message):
    items = tmp_path / "hs.jsonl"
    items.write_text(content)
    with pytest.raises(DataError, match=message):
        load_hellaswag(items)
    rc, _, err = run_eval(["--pretrained", str(hf_model[1]), "--hellaswag", str(items)], capsys)
    assert rc == 2 and err.strip().count("\n") == 0 and message in err


@pytest.mark.parametrize("flags,message", [
    (["--pretrained", "HF", "--data", "STORY", "--stride", "0"], "--stride must be >= 1, got 0"),
    (["--pretrained", "HF", "--data", "STORY", "--stride", str(T + 1)],
     f"--stride {T + 1} is more than the model's context of {T} tokens"),
    (["--pretrained", "HF", "--data", "TINY"], "--data TINY: fewer than two tokens in it"),
    (["--pretrained", "HF", "--data", "EMPTY"], "fewer than two tokens"),
    (["--pretrained", "HF", "--data", "MISSING"], "does not exist"),
    (["--data", "STORY"], "give exactly one of --pretrained DIR and --ckpt DIR"),
    (["--pretrained", "HF", "--ckpt", "HF", "--data", "STORY"], "(both were given)"),
    (["--pretrained", "HF", "--data", "STORY", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_flags_are_one_line(hf_model, tmp_path, capsys, flags, message):
    names = {"HF": hf_model[1], "STORY": tmp_path / "story.txt", "TINY": tmp_path / "tiny.txt",
             "EMPTY": tmp_path / "empty.txt", "MISSING": tmp_path / "nope.txt"}
    names["STORY"].write_text(TEXT)
    names["TINY"].write_text("Hello")  # one token
    names["EMPTY"].write_text("")
    out = tmp_path / "res.json"
    rc, _, err = run_eval([str(names.get(f, f)) for f in flags] + ["--backend", "torch", "--json", str(out)], capsys)
    assert rc == 2 and err.strip().count("\n") == 0, err
    assert message.replace("TINY", str(names["TINY"])) in err, err
    assert not out.exists()
