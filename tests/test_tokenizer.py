"""The offline GPT-2 tokenizer."""

import subprocess
import sys

from gpt2.data import shakespeare_texts
from gpt2.tokenizer import EOT_ID, decode, encode, get_encoding


def test_known_ids_and_special_token():
    enc = get_encoding()
    assert enc.n_vocab == 50257 and enc.eot_token == EOT_ID == 50256
    assert encode("Hello world") == [15496, 995]  # GPT-2's ids
    assert encode("a<|endoftext|>b")[1] == 50256


def test_round_trip_on_the_corpus():
    text = "".join(shakespeare_texts()[:3])
    ids = encode(text)
    assert len(ids) < len(text) / 2.5  # BPE compresses English prose
    assert decode(ids) == text


def test_works_with_no_network():
    # tiktoken downloads its ranks on first use; ours must never touch the network.
    code = ("import socket\n"
            "def no(*a, **k): raise OSError('network disabled in this test')\n"
            "socket.socket.connect = no; socket.create_connection = no; socket.getaddrinfo = no\n"
            "from gpt2.tokenizer import encode, decode\n"
            "print(decode(encode('To be, or not to be')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "To be, or not to be"
