"""RoPE undo/redo: exact inverse, hand-checked rotations, config parsing, agreement with transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.rope import RopeConfig, apply_rope, rope_inv_freq, undo_rope

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
LINEAR = {"rope_type": "linear", "factor": 2.0}

LLAMA31_8B_CONFIG = {  # config.json of meta-llama/Llama-3.1-8B (the fields that matter here)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
SMOLLM2_CONFIG = {  # config.json of SmolLM2-135M-Instruct as transformers 5 writes it
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "head_dim": 64,
    "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30, "vocab_size": 49152,
    "max_position_embeddings": 8192, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
}


def _keys(n: int, d: int, seed: int = 0, extra: tuple[int, ...] = (3, 2)) -> torch.Tensor:
    return torch.randn((n, *extra, d), generator=torch.Generator().manual_seed(seed))


def _positions(n: int, high: int = 100_000, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("theta", [1e4, 1e5, 5e5])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_undo_then_apply_restores_keys(style, theta, rotary_dim):
    cfg = RopeConfig(head_dim=64, rotary_dim=rotary_dim, theta=theta, style=style)
    k, pos = _keys(200, 64), _positions(200)
    pre = undo_rope(k, pos, cfg)
    torch.testing.assert_close(apply_rope(pre, pos, cfg), k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(undo_rope(apply_rope(k, pos, cfg), pos, cfg), k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scaling", [LLAMA3, LINEAR, YARN], ids=lambda s: s["rope_type"])
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_roundtrip_with_scaling(scaling, style):
    cfg = RopeConfig(head_dim=128, rotary_dim=128, theta=5e5, style=style, scaling=scaling)
    k, pos = _keys(100, 128, extra=(4,)), _positions(100, high=131072)
    torch.testing.assert_close(apply_rope(undo_rope(k, pos, cfg), pos, cfg), k, rtol=1e-5, atol=1e-5)


def test_rotation_keeps_norm_of_each_pair():
    cfg = RopeConfig(head_dim=64, rotary_dim=64, theta=1e4)
    k, pos = _keys(50, 64), _positions(50)
    out = apply_rope(k, pos, cfg)
    pair_norm = lambda x: x[..., :32] ** 2 + x[..., 32:] ** 2  # noqa: E731 (neox pairs (i, i + 32))
    torch.testing.assert_close(pair_norm(out), pair_norm(k), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("scaling", [None, LLAMA3, LINEAR], ids=lambda s: s and s["rope_type"])
def test_position_zero_is_identity(style, scaling):
    cfg = RopeConfig(head_dim=64, rotary_dim=64, theta=1e5, style=style, scaling=scaling)
    k, zero = _keys(10, 64), torch.zeros(10, dtype=torch.int64)
    assert torch.equal(apply_rope(k, zero, cfg), k)
    assert torch.equal(undo_rope(k, zero, cfg), k)


def test_hand_computed_2d_rotation():
    cfg = RopeConfig(head_dim=2, rotary_dim=2, theta=10000.0)  # one pair, inv_freq = [1.0]
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    pos = torch.tensor([1, 1, 2])
    c1, s1, c2, s2 = math.cos(1), math.sin(1), math.cos(2), math.sin(2)
    want = torch.tensor([[c1, s1], [-s1, c1], [3 * c2 - 4 * s2, 4 * c2 + 3 * s2]])
    torch.testing.assert_close(apply_rope(k, pos, cfg), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(undo_rope(want, pos, cfg), k, rtol=1e-6, atol=1e-6)


def test_pair_layout_neox_vs_gptj():
    # D = 4, theta = 100: inv_freq = [1, 0.1]; at position 3 pair 0 rotates by 3 rad
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    pos = torch.tensor([3])
    neox = apply_rope(x, pos, RopeConfig(head_dim=4, rotary_dim=4, theta=100.0, style="neox"))
    gptj = apply_rope(x, pos, RopeConfig(head_dim=4, rotary_dim=4, theta=100.0, style="gptj"))
    torch.testing.assert_close(neox, torch.tensor([[math.cos(3), 0.0, math.sin(3), 0.0]]))  # pair (0, 2)
    torch.testing.assert_close(gptj, torch.tensor([[math.cos(3), math.sin(3), 0.0, 0.0]]))  # pair (0, 1)


def test_partial_rotary_passes_tail_through_and_keeps_dtype():
    cfg = RopeConfig(head_dim=64, rotary_dim=16, theta=1e4)
    k, pos = _keys(20, 64).to(torch.bfloat16), _positions(20)
    out = apply_rope(k, pos, cfg)
    assert out.dtype == torch.bfloat16 and out.shape == k.shape
    assert torch.equal(out[..., 16:], k[..., 16:])
    assert not torch.equal(out[..., :16], k[..., :16])


def test_one_layer_layout_n_h_d():
    cfg = RopeConfig(head_dim=64, rotary_dim=64, theta=1e5)
    k, pos = _keys(30, 64, extra=(3,)), _positions(30)
    full = apply_rope(k[:, None], pos, cfg)[:, 0]  # [n, 1, H, D] vs [n, H, D]
    assert torch.equal(apply_rope(k, pos, cfg), full)


@pytest.mark.parametrize("bad", ["positions_length", "last_dim", "positions_float", "positions_2d", "int_keys"])
def test_bad_inputs_raise_shape_error(bad):
    cfg = RopeConfig(head_dim=64, rotary_dim=64, theta=1e4)
    k, pos = _keys(8, 64), _positions(8)
    if bad == "positions_length":
        pos = pos[:7]
    elif bad == "last_dim":
        k = _keys(8, 32)
    elif bad == "positions_float":
        pos = pos.float()
    elif bad == "positions_2d":
        pos = pos[None]
    else:
        k = k.long()
    with pytest.raises(ShapeError):
        undo_rope(k, pos, cfg)
    with pytest.raises(ShapeError):
        apply_rope(k, pos, cfg)


def test_invalid_config_values():
    with pytest.raises(ValueError, match="rotary_dim"):
        RopeConfig(head_dim=64, rotary_dim=65, theta=1e4)
    with pytest.raises(ValueError, match="style"):
        RopeConfig(head_dim=64, rotary_dim=64, theta=1e4, style="rotate")
    with pytest.raises(ValueError, match="needs"):
        RopeConfig(head_dim=64, rotary_dim=64, theta=1e4, scaling={"rope_type": "llama3", "factor": 8.0})


def test_from_hf_config_llama31_8b():
    cfg = RopeConfig.from_hf_config(LLAMA31_8B_CONFIG)
    assert (cfg.head_dim, cfg.rotary_dim, cfg.theta, cfg.style) == (128, 128, 500000.0, "neox")
    assert cfg.scaling == LLAMA3 and cfg.max_position_embeddings == 131072
    inv = rope_inv_freq(cfg)
    plain = rope_inv_freq(RopeConfig(head_dim=128, rotary_dim=128, theta=500000.0))
    assert inv.shape == (64,) and inv.dtype == torch.float32
    assert torch.equal(inv[:20], plain[:20])  # short wavelengths (< 8192 / 4) untouched
    torch.testing.assert_close(inv[-10:], plain[-10:] / 8)  # long wavelengths (> 8192) divided by factor


def test_from_hf_config_smollm2_new_and_legacy_layout_agree():
    cfg = RopeConfig.from_hf_config(SMOLLM2_CONFIG)
    assert (cfg.head_dim, cfg.rotary_dim, cfg.theta, cfg.scaling, cfg.style) == (64, 64, 100000.0, None, "neox")
    legacy = {k: v for k, v in SMOLLM2_CONFIG.items() if k not in ("rope_parameters", "head_dim")}
    assert RopeConfig.from_hf_config({**legacy, "rope_theta": 100000.0}) == cfg


def test_from_hf_config_partial_rotary_factor():
    cfg = RopeConfig.from_hf_config({**SMOLLM2_CONFIG, "partial_rotary_factor": 0.5})
    assert cfg.rotary_dim == 32


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_sequence_dependent_scaling_is_rejected(rope_type):
    config = {**LLAMA31_8B_CONFIG, "rope_scaling": {"rope_type": rope_type, "factor": 2.0}}
    with pytest.raises(ValueError, match=rf"{rope_type}.*not supported.*sequence length"):
        RopeConfig.from_hf_config(config)


def test_yarn_attention_factor_on_which_hf_and_sglang_disagree_is_rejected():
    with pytest.raises(ValueError, match="SGLang"):
        RopeConfig(head_dim=64, rotary_dim=64, theta=1e4, scaling={**YARN, "attention_factor": 1.0})


def test_yarn_scales_cos_sin_by_attention_factor():
    cfg = RopeConfig(head_dim=64, rotary_dim=64, theta=1e4, scaling=YARN)
    assert cfg.attention_scaling == pytest.approx(0.1 * math.log(4.0) + 1.0)
    k = _keys(4, 64)
    zero = torch.zeros(4, dtype=torch.int64)
    torch.testing.assert_close(apply_rope(k, zero, cfg), k * cfg.attention_scaling)


@pytest.mark.parametrize("scaling", [None, LLAMA3, YARN], ids=lambda s: s and s["rope_type"])
def test_to_dict_from_dict_roundtrip(scaling):
    cfg = RopeConfig(head_dim=128, rotary_dim=64, theta=5e5, style="gptj", scaling=scaling,
                     max_position_embeddings=131072)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert RopeConfig.from_dict(d) == cfg
    assert hash(RopeConfig.from_dict(d)) == hash(cfg)


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 1e5},
    {**LLAMA3, "rope_theta": 5e5},
    {**LINEAR, "rope_theta": 1e4},
    {**YARN, "rope_theta": 1e6},
    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "original_max_position_embeddings": 4096,
     "mscale": 1.0, "mscale_all_dim": 0.707},
], ids=["default", "llama3", "linear", "yarn", "yarn-mscale"])
def test_matches_transformers_llama_rope_bitwise(rope_parameters):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf_config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=2,
                                         head_dim=128, num_hidden_layers=1, vocab_size=16,
                                         max_position_embeddings=131072, rope_parameters=rope_parameters)
    cfg = RopeConfig.from_hf_config(hf_config)
    rotary = LlamaRotaryEmbedding(hf_config)
    assert torch.equal(rope_inv_freq(cfg), rotary.inv_freq.float())
    k, pos = _keys(40, 128, extra=(2,)), _positions(40)  # [n, H, D]
    cos, sin = rotary(k, pos[None])
    _, hf_post = apply_rotary_pos_emb(k.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    hf_post = hf_post[0].transpose(0, 1)
    assert torch.equal(apply_rope(k, pos, cfg), hf_post)
    torch.testing.assert_close(undo_rope(hf_post, pos, cfg), k, rtol=1e-5, atol=1e-5)
