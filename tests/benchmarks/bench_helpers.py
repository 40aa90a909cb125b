"""Helpers of the benchmark tests: tiny model folders, a word-level tokenizer with a chat template, and a
``python`` wrapper that starts the fake server instead of ``sglang.launch_server``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

FAKE_SERVER = Path(__file__).resolve().parent / "fake_sglang.py"
TINY_CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                      "{% if add_generation_prompt %}<s> assistant {% endif %}")


def model_dir(tmp_path: Path, name: str = "tiny-llama", **over) -> Path:
    """A model folder holding only a Llama-style config.json (2 layers, 2 KV heads of 16, vocab 1000)."""
    d = tmp_path / name
    d.mkdir(exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "vocab_size": 1000,
           "torch_dtype": "bfloat16", "max_position_embeddings": 8192, **over}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def add_word_tokenizer(folder: Path, words: int = 300) -> Path:
    """Save a word-level tokenizer ("w0".."w{words-1}", whitespace split) with a chat template into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return folder


def fake_python(tmp_path: Path) -> Path:
    """An executable that runs the fake server with the arguments a launcher passes to ``python``."""
    wrapper = tmp_path / "fake-python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_SERVER}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper
