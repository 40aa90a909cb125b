"""Tiny random transformers models for tests of what depends on a real model (calibration cards, the startup
identity checks): a Llama of a few layers, a word-level tokenizer over a fixed vocabulary, folders SGLang can
read, and a stand-in for the layout SGLang's loaded model has (one fused ``qkv_proj`` per attention layer).

Two models made with different seeds have the same architecture, shapes and tokenizer (one card would fit both
by its shapes) and different weights: the "same-shape wrong model" of the startup checks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there one all we their can has been more when will would who so no").split()


def tiny_llama_config(**overrides: Any) -> dict[str, Any]:
    """config.json of a 2-layer Llama: hidden 64, 4 attention heads, 2 KV heads of head_dim 16."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "head_dim": 16, "rope_theta": 10000.0, "max_position_embeddings": 512, "vocab_size": len(WORDS) + 3,
              "rms_norm_eps": 1e-5, "torch_dtype": "float32", "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2}
    config.update(overrides)
    return config


def tiny_tokenizer(words: tuple[str, ...] = tuple(WORDS)) -> Any:
    """A word-level PreTrainedTokenizerFast: ids 0-2 are <unk>, <s>, </s>, then ``words`` in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, **config_overrides: Any) -> Any:
    """A random-weight ``LlamaForCausalLM`` (float32, eager attention, eval mode) of ``tiny_llama_config``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = {k: v for k, v in tiny_llama_config(**config_overrides).items() if k != "architectures"}
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="eager"))
    return model.eval()


def save_tiny_model(model: Any, tokenizer: Any, directory: str | Path) -> Path:
    """``save_pretrained`` of the model and its tokenizer into ``directory`` (what ``--model-path`` names)."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def sglang_like_model(model: Any, *, tp_size: int = 1, tp_rank: int = 0, dtype: torch.dtype | None = None) -> Any:
    """A stand-in with the attribute layout of SGLang's loaded Llama: ``model.layers[i].self_attn.qkv_proj`` with
    ``num_heads``, ``num_kv_heads``, ``head_size``, ``tp_rank``, ``tp_size`` and a fused weight ``[(q + 2 kv) rows,
    hidden]`` holding this rank's query heads, then its KV heads' key rows, then their value rows (as
    ``QKVParallelLinear`` shards them), optionally cast to ``dtype``."""
    layers = []
    for layer in model.get_decoder().layers:
        attn = layer.self_attn
        d = attn.head_dim
        n_q = attn.q_proj.weight.shape[0] // d // tp_size
        n_kv = attn.k_proj.weight.shape[0] // d // tp_size
        q = attn.q_proj.weight[tp_rank * n_q * d:(tp_rank + 1) * n_q * d]
        k = attn.k_proj.weight[tp_rank * n_kv * d:(tp_rank + 1) * n_kv * d]
        v = attn.v_proj.weight[tp_rank * n_kv * d:(tp_rank + 1) * n_kv * d]
        weight = torch.cat([q, k, v]).detach().clone()
        if dtype is not None:
            weight = weight.to(dtype)
        qkv = torch.nn.Module()
        qkv.weight = torch.nn.Parameter(weight, requires_grad=False)
        qkv.num_heads, qkv.num_kv_heads, qkv.head_size = n_q, n_kv, d
        qkv.tp_rank, qkv.tp_size = tp_rank, tp_size
        qkv.quant_method = UnquantizedLinearMethod()  # its class name is what the check reads
        block = torch.nn.Module()
        block.self_attn = torch.nn.Module()
        block.self_attn.qkv_proj = qkv
        layers.append(block)
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList(layers)
    return root


class UnquantizedLinearMethod:
    """Name twin of SGLang's method of plain (unquantized) linear layers."""


class Fp8LinearMethod:
    """Name twin of a quantized linear method."""
