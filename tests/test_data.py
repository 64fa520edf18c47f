"""Data sources, llm.c shards, and the batcher."""

import numpy as np
import pytest
import torch

from gpt2.data import Batcher, DataError, load_dataset, play_to_text, read_shard, shakespeare_texts, write_shard
from gpt2.tokenizer import EOT_ID, encode


def test_shakespeare_is_plain_text_with_speakers():
    texts = shakespeare_texts()
    assert len(texts) == 38
    joined = "\n".join(texts)
    assert 3_000_000 < len(joined) < 6_000_000
    for mark in ("**", "##", "_Enter", "_Exit"):
        assert mark not in joined
    assert "Theseus:\nNow, fair Hippolyta, our nuptial hour" in texts[0]


def test_play_to_text_drops_markup():
    md = "# T\n\n## ACT I\n\n_Enter A_\n\n**HAMLET**  \nTo be, or *not* to be  \n\n_Exit_\n\nThat is it.\n"
    assert play_to_text(md) == "Hamlet:\nTo be, or not to be\nThat is it.\n"


def test_shakespeare_split_is_deterministic_and_disjoint_in_size():
    a, b = load_dataset("shakespeare"), load_dataset("shakespeare")
    assert np.array_equal(a.train[0], b.train[0]) and np.array_equal(a.val[0], b.val[0])
    n_tr, n_va = a.num_tokens("train"), a.num_tokens("val")
    assert 0.08 < n_va / (n_tr + n_va) < 0.12


def test_validation_split_shares_no_token_with_training(tmp_path):
    """Every token of a corpus lands in exactly one split, training the head and validation the tail. A corpus whose
    tokens are their own positions makes any overlap (or gap) show as a shared (or missing) value."""
    n = 10_007
    corpus = np.arange(n)
    write_shard(tmp_path / "corpus.bin", corpus)
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "c_train_000000.bin", corpus)  # no val shard: the tail is split off
    for source in (tmp_path / "corpus.bin", tmp_path / "shards"):
        ds = load_dataset(str(source))
        train, val = np.concatenate(ds.train), np.concatenate(ds.val)
        shared = np.intersect1d(train, val)
        assert shared.size == 0, f"{source.name}: {shared.size} positions in both splits, from {shared[0]}"
        assert val.size > 0
        assert np.array_equal(np.concatenate([train, val]), corpus), f"{source.name}: not head + tail of the corpus"
    # Text: the document's tokens and its end-of-text token, split the same way.
    text = "".join(f"Line {i} of a corpus that is split once.\n" for i in range(300))
    (tmp_path / "doc.txt").write_text(text)
    ds = load_dataset(str(tmp_path / "doc.txt"))
    assert np.array_equal(np.concatenate(ds.train + ds.val), np.array(encode(text) + [EOT_ID]))
    assert ds.num_tokens("val") > 0


def test_shard_round_trip_and_memory_map(tmp_path):
    toks = np.random.default_rng(0).integers(0, 50257, 10_001)
    write_shard(tmp_path / "x.bin", toks)
    back = read_shard(tmp_path / "x.bin")
    assert isinstance(back, np.memmap) and np.array_equal(back, toks)
    header = np.fromfile(tmp_path / "x.bin", dtype=np.int32, count=3)
    assert list(header) == [20240520, 1, 10_001]


def test_bad_shards(tmp_path):
    write_shard(tmp_path / "ok.bin", np.arange(100))
    data = (tmp_path / "ok.bin").read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_shard(tmp_path / "trunc.bin")
    (tmp_path / "foreign.bin").write_bytes(b"\x00" * 2000)
    with pytest.raises(DataError, match="magic 0"):
        read_shard(tmp_path / "foreign.bin")
    (tmp_path / "tiny.bin").write_bytes(b"abc")
    with pytest.raises(DataError, match="shorter than the 1024-byte header"):
        read_shard(tmp_path / "tiny.bin")
    with pytest.raises(DataError, match="must fit in uint16"):
        write_shard(tmp_path / "big.bin", [70000])


def test_sources_text_folder_shards(tmp_path):
    (tmp_path / "a.txt").write_text("Once upon a time there was a kernel. " * 50)
    (tmp_path / "b.txt").write_text("It ran fast on every GPU. " * 50)
    ds = load_dataset(str(tmp_path))
    assert ds.num_tokens("train") > 0 and ds.num_tokens("val") > 0
    one = load_dataset(str(tmp_path / "a.txt"))
    assert one.num_tokens("train") < ds.num_tokens("train")
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "c_val_000000.bin", np.arange(300))
    write_shard(shards / "c_train_000000.bin", np.arange(1000))
    write_shard(shards / "c_train_000001.bin", np.arange(500))
    sd = load_dataset(str(shards))
    assert sd.num_tokens("val") == 300 and sd.num_tokens("train") == 1500


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "missing"))
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(DataError, match="holds no text"):
        load_dataset(str(tmp_path / "empty.txt"))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="holds no .txt files"):
        load_dataset(str(tmp_path / "d"))


def test_batcher_reproducible_next_token_and_resumable():
    arrays = [np.arange(1000, dtype=np.uint16), np.arange(5000, 5100, dtype=np.uint16)]
    b1, b2 = Batcher(arrays, 4, 16, seed=3), Batcher(arrays, 4, 16, seed=3)
    x1, y1 = b1.next()
    x2, y2 = b2.next()
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.dtype == torch.int64 and x1.shape == (4, 16)
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and torch.equal(y1 - x1, torch.ones_like(x1))  # never crosses arrays
    state = b1.state_dict()
    after = b1.next()
    b3 = Batcher(arrays, 4, 16, seed=99)
    b3.load_state_dict(state)
    assert torch.equal(b3.next()[0], after[0])


def test_batcher_shards_the_global_batch_by_rank():
    arrays = [np.arange(3000, dtype=np.uint16)]
    whole = Batcher(arrays, 6, 8, seed=1).next()[0]
    parts = [Batcher(arrays, 3, 8, seed=1, rank=r, world_size=2).next()[0] for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)


def test_batcher_corpus_too_small():
    with pytest.raises(DataError, match="too small for block_size 64"):
        Batcher([np.arange(20, dtype=np.uint16)], 2, 64)


def test_batcher_checks_ids_on_the_host_when_asked():
    """For corpora too large to check up front, each batch is checked before it goes to the device."""
    arrays = [np.arange(100, dtype=np.uint16) % 50, np.full(40, 60, dtype=np.uint16)]
    ok = Batcher(arrays[:1], 2, 8, seed=0, vocab_size=50)
    for _ in range(5):
        ok.next()
    bad = Batcher(arrays, 4, 8, seed=0, vocab_size=50)
    with pytest.raises(DataError, match="token id 60, outside the model's vocabulary of 50"):
        for _ in range(50):
            bad.next()


def test_a_lone_validation_shard_says_what_is_missing(tmp_path):
    """``gpt2 train --data eval_val_000000.bin``: the shard is validation data by its name and there is no train
    shard; the error says so and how to name one, instead of a block-size complaint about its 10% tail."""
    from gpt2.cli import main

    shard = tmp_path / "eval_val_000000.bin"
    write_shard(shard, np.arange(600) % 500)
    with pytest.raises(DataError, match=r"validation shard .* no train shard .* e\.g\. eval_train_000000\.bin"):
        load_dataset(str(shard))
    args = ["train", "--preset", "tiny", "--data", str(shard), "--block-size", "64", "--max-iters", "2", "--device",
            "cpu", "--backend", "torch", "--out-dir", str(tmp_path / "out")]
    assert main(args) == 2


def test_a_split_too_small_names_the_split(tmp_path, capsys):
    """A 600-token shard at block_size 64: its 60-token validation tail is the part too small, and the message
    names that split and what to change."""
    from gpt2.cli import main

    shard = tmp_path / "small.bin"
    write_shard(shard, np.arange(600) % 500)
    args = ["train", "--preset", "tiny", "--data", str(shard), "--block-size", "64", "--max-iters", "2", "--device",
            "cpu", "--backend", "torch", "--batch-size", "2", "--out-dir", str(tmp_path / "out")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the validation split of" in err and "has 60 tokens, need at least 65" in err, err
    assert "smaller --block-size" in err, err
