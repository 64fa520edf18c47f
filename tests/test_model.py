"""The model: presets, shapes, initialisation, input checks, and Hugging Face parity both ways."""

import math

import pytest
import torch

from gpt2.model import GPT, PRESETS, ConfigError, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", **kw), backend="torch")


@pytest.mark.parametrize("name,layers,heads,width,params_m", [
    ("gpt2", 12, 12, 768, 124), ("gpt2-medium", 24, 16, 1024, 355), ("gpt2-large", 36, 20, 1280, 774),
    ("gpt2-xl", 48, 25, 1600, 1558)])
def test_openai_presets(name, layers, heads, width, params_m):
    cfg = GPTConfig.from_preset(name)
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size) == (layers, heads, width, 50257,
                                                                                    1024)
    # Parameter count from the shapes alone (no need to build the big ones): embeddings + blocks.
    C, L, V, T = width, layers, cfg.vocab_size, cfg.block_size
    n = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
    assert round(n / 1e6) == params_m
    if name == "gpt2":
        m = GPT(cfg, backend="torch")
        assert m.num_params(non_embedding=False) - (cfg.padded_vocab_size - V) * C == n


def test_all_presets_build_and_unknown_preset_fails():
    assert {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "shakespeare"} <= set(PRESETS)
    with pytest.raises(ConfigError, match="unknown preset 'gpt3'.*presets are"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ConfigError, match="not divisible by n_head"):
        GPTConfig(n_embd=100, n_head=12)
    with pytest.raises(ConfigError, match="unknown GPTConfig field"):
        GPTConfig.from_preset("tiny", n_layers=3)


def test_forward_shapes_tied_weights_and_padded_vocab():
    m = tiny(vocab_size=500)
    assert m.config.padded_vocab_size == 512
    assert m.lm_head.weight is m.transformer.wte.weight
    idx = torch.randint(0, 500, (3, 11))
    logits, loss = m(idx)
    assert logits.shape == (3, 11, 500) and loss is None
    none, loss = m(idx, idx)
    assert none is None and loss.ndim == 0
    # The loss ignores padded rows: making them huge changes nothing.
    with torch.no_grad():
        m.transformer.wte.weight[500:] = 1e4
    assert torch.equal(m(idx, idx)[1], loss)
    # ... and they are never sampled.
    out = m.generate(idx[:, :2], 30, temperature=5.0, generator=torch.Generator().manual_seed(0))
    assert out.max() < 500


def test_loss_is_cross_entropy_of_logits_and_ignores_minus_one():
    m = tiny()
    idx = torch.randint(0, 512, (2, 9))
    tgt = idx.clone()
    tgt[0, :4] = -1
    logits, _ = m(idx)
    _, loss = m(idx, tgt)
    ref = torch.nn.functional.cross_entropy(logits.view(-1, 512), tgt.view(-1), ignore_index=-1)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


def test_gpt2_initialisation():
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=1000)
    m = GPT(cfg, backend="torch")
    sd = dict(m.named_parameters())
    assert abs(sd["transformer.h.0.attn.c_attn.weight"].std().item() - 0.02) < 2e-3
    assert abs(sd["transformer.h.0.mlp.c_proj.weight"].std().item() - 0.02 / math.sqrt(16)) < 1e-3
    assert sd["transformer.h.0.attn.c_attn.bias"].abs().max() == 0
    assert torch.equal(sd["transformer.h.3.ln_1.weight"], torch.ones(256))


def test_no_bias_config():
    m = tiny(bias=False)
    assert m.transformer.h[0].attn.c_attn.bias is None and m.transformer.ln_f.bias is None
    _, loss = m(torch.randint(0, 512, (1, 5)), torch.randint(0, 512, (1, 5)))
    loss.backward()


def test_bad_inputs():
    m = tiny()
    with pytest.raises(ValueError, match="longer than block_size 64"):
        m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m(torch.tensor([[-3, 1]]))
    with pytest.raises(TypeError, match="int64 or int32"):
        m(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="targets shape"):
        m(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        m.generate(torch.zeros(1, 1, dtype=torch.long), 3, temperature=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        m.generate(torch.zeros(1, 1, dtype=torch.long), 3, top_p=1.5)
    with pytest.raises(ValueError, match="longer than the context"):
        m.generate(torch.zeros(1, 70, dtype=torch.long), 3)


def test_set_backend_keeps_parameters_and_results():
    m = tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    idx = torch.randint(0, 512, (2, 7))
    a = m(idx, idx)[1]
    m.set_backend("torch,attention=torch")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert torch.equal(a, m(idx, idx)[1])
    with pytest.raises(ValueError, match="unknown backend"):
        m.set_backend("fast")


def test_kv_cache_matches_full_forward_and_sliding():
    m = tiny().eval()
    idx = torch.randint(0, 512, (2, 20))
    full, _ = m(idx)
    cache = m.new_kv_cache(2)
    a, _ = m(idx[:, :12], kv_cache=cache)
    b, _ = m(idx[:, 12:13], kv_cache=cache)
    c, _ = m(idx[:, 13:], kv_cache=cache)
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, atol=1e-5, rtol=1e-5)
    g1 = m.generate(idx[:, :5], 40, greedy=True)
    g2 = m.generate(idx[:, :5], 40, greedy=True, use_cache=False)
    assert torch.equal(g1, g2)
    # Past block_size the context slides instead of failing.
    assert m.generate(idx[:, :5], 70, greedy=True).shape == (2, 75)


def test_top_k_one_is_greedy_and_top_p_small_is_greedy():
    m = tiny().eval()
    idx = torch.randint(0, 512, (2, 4))
    g = m.generate(idx, 15, greedy=True)
    assert torch.equal(m.generate(idx, 15, top_k=1, generator=torch.Generator().manual_seed(1)), g)
    assert torch.equal(m.generate(idx, 15, top_p=1e-6, generator=torch.Generator().manual_seed(2)), g)


def test_estimate_mfu_and_flops():
    m = tiny()
    assert m.flops_per_token(64) == 6 * m.num_params() + 12 * 2 * 64 * 64
    assert m.estimate_mfu(4, 0.5, peak=1e12) == pytest.approx(m.flops_per_token() * 64 * 4 / 0.5 / 1e12)
    assert m.estimate_mfu(4, 0.5) is None  # CPU: no known peak


# ------------------------------------------------------------------ Hugging Face interop

transformers = pytest.importorskip("transformers", reason="Hugging Face parity needs transformers (extra 'dev')")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=48, n_layer=2, n_head=4)
    hm = transformers.GPT2LMHeadModel(cfg).eval()
    d = tmp_path_factory.mktemp("hf")
    hm.save_pretrained(d)
    return d, hm


def test_load_hf_checkpoint_logits_equal(hf_dir):
    d, hm = hf_dir
    m = GPT.from_pretrained(str(d), backend="torch").eval()
    idx = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        diff = (m(idx)[0] - hm(idx).logits).abs().max().item()
    assert diff < 1e-4


def test_save_pretrained_loads_in_transformers(hf_dir, tmp_path):
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=300, block_size=32, n_embd=48, n_layer=2, n_head=4), backend="torch").eval()
    m.save_pretrained(tmp_path)
    hm = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 300, (3, 32))
    with torch.no_grad():
        assert (m(idx)[0] - hm(idx).logits).abs().max().item() < 1e-4
    # and back again, bit for bit
    m2 = GPT.from_pretrained(str(tmp_path), backend="torch").eval()
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        n = 300 if k in ("transformer.wte.weight", "lm_head.weight") else None  # padded rows are not saved
        assert torch.equal(a[:n], b[:n]), k


def test_pytorch_model_bin_is_read(hf_dir, tmp_path):
    _, hm = hf_dir
    hm.config.save_pretrained(tmp_path)
    torch.save(hm.state_dict(), tmp_path / "pytorch_model.bin")
    m = GPT.from_pretrained(str(tmp_path), backend="torch").eval()
    idx = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert (m(idx)[0] - hm(idx).logits).abs().max().item() < 1e-4


def test_bad_checkpoints(hf_dir, tmp_path):
    d, _ = hf_dir
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        GPT.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        GPT.from_pretrained(str(tmp_path / "empty"))
    foreign = tmp_path / "bert"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="'bert' model, not a GPT-2"):
        GPT.from_pretrained(str(foreign))
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "config.json").write_bytes((d / "config.json").read_bytes())
    (trunc / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        GPT.from_pretrained(str(trunc))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_bytes((d / "config.json").read_bytes())
    with pytest.raises(ConfigError, match="neither model.safetensors nor pytorch_model.bin"):
        GPT.from_pretrained(str(noweights))
