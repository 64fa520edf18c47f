"""CI check: transformers' from_pretrained (which imports Hugging Face's `kernels`) and this project's gpt2_kernels
work in one process, from whatever directory CI runs this in. Read from stdin (``python - FOLDER < this``), so the
current directory is first on sys.path as in a notebook. Argument: a folder to save the small GPT-2 to."""

import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import gpt2_kernels.hf

try:
    import kernels as hub_kernels
except ImportError:  # transformers no longer needs it: nothing to clash with
    hub_kernels = None
if hub_kernels is not None:
    where = getattr(hub_kernels, "__file__", None) or "a namespace package"
    assert "site-packages" in str(where), f"`import kernels` is {where}, not Hugging Face's installed package"

folder = sys.argv[1]
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=512, n_positions=64)).save_pretrained(folder)
model = GPT2LMHeadModel.from_pretrained(folder).eval()
ids = torch.randint(0, 512, (2, 16))
with torch.no_grad():
    want = model(ids).logits
    got = gpt2_kernels.hf.patch_gpt2(model, "torch")(ids).logits
assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
print(f"from_pretrained({folder}) and patch_gpt2 side by side: ok (kernels = {getattr(hub_kernels, '__file__', None)})")
