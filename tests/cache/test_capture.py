"""Calibration capture: a server-side radix cache that records finished requests' KV rows, and
calibrating from those records (`kvtc-sglang calibrate --kv-dumps`)."""

from __future__ import annotations

import json
from array import array

import pytest
import torch

from tests.cache.conftest import D, H, L, make_pool_and_allocator

pytestmark = pytest.mark.sglang


def _capture_cache(tmp_path, capture_tokens):
    from kvtc_sglang import sglang_compat as compat
    from kvtc_sglang.cache.capture import KVCaptureRadixCache

    pool, allocator = make_pool_and_allocator("token", 1, 512)
    rtp = compat.ReqToTokenPool(size=8, max_context_len=600, device="cpu", enable_memory_saver=False)
    params = compat.CacheInitParams(disable=False, req_to_token_pool=rtp, token_to_kv_pool_allocator=allocator,
                                    page_size=1, eviction_policy="lru")
    return KVCaptureRadixCache(params, tmp_path / "tp1-rank0", capture_tokens), pool, allocator, rtp


def _finish(cache, pool, allocator, rtp, n, seed):
    import types

    g = torch.Generator().manual_seed(seed)
    slots = allocator.alloc(n)
    k = torch.randn(n, L, H, D, generator=g).to(pool.dtype)
    v = torch.randn(n, L, H, D, generator=g).to(pool.dtype)
    for layer in range(L):
        pool.k_buffer[layer][slots] = k[:, layer]
        pool.v_buffer[layer][slots] = v[:, layer]
    idx = rtp.free_slots.pop(0)
    rtp.write((idx, slice(0, n)), slots.to(torch.int32))
    tokens = array("q", torch.randint(0, 1000, (n,), generator=g).tolist())
    req = types.SimpleNamespace(req_pool_idx=idx, origin_input_ids=tokens, output_ids=array("q"),
                                cache_protected_len=0, last_node=None, extra_key=None, priority=0)
    cache.cache_finished_req(req, kv_len_to_handle=n)
    rtp.free_slots.append(idx)
    return k, v


def test_finished_requests_are_recorded_until_the_budget(tmp_path):
    cache, pool, allocator, rtp = _capture_cache(tmp_path, capture_tokens=150)
    k0, v0 = _finish(cache, pool, allocator, rtp, 100, 0)
    _finish(cache, pool, allocator, rtp, 20, 1)  # too short to be useful: not recorded
    _finish(cache, pool, allocator, rtp, 80, 2)
    _finish(cache, pool, allocator, rtp, 90, 3)  # after the budget: not recorded
    files = sorted((tmp_path / "tp1-rank0").glob("seq*.pt"))
    assert len(files) == 2 and (tmp_path / "tp1-rank0" / "DONE").is_file()
    first = torch.load(files[0], weights_only=True)
    assert torch.equal(first["k"], k0) and torch.equal(first["v"], v0) and first["k"].dtype == pool.dtype
    # the tree still caches as a plain radix cache
    assert cache.evictable_size() == 100 + 20 + 80 + 90


def test_calibrate_from_captured_kv(tmp_path):
    """A capture directory plus a config.json calibrates without the model's weights."""
    from kvtc_sglang.codec.artifact import load_artifact
    from kvtc_sglang.codec.calibrate import CalibrationSettings
    from kvtc_sglang.models.calibration import calibrate_from_dumps

    cache, pool, allocator, rtp = _capture_cache(tmp_path / "dumps", capture_tokens=600)
    for seed in range(5):
        _finish(cache, pool, allocator, rtp, 100, seed)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": L, "hidden_size": H * D * 2,
        "num_attention_heads": H * 2, "num_key_value_heads": H, "head_dim": D, "vocab_size": 1000,
        "rope_theta": 10000.0, "max_position_embeddings": 4096}))
    settings = CalibrationSettings(ratios=(4, 8), dp_samples=256, device="cpu", progress=False)
    cards = calibrate_from_dumps(tmp_path / "dumps", model, tmp_path / "art", settings)
    art = load_artifact(cards[0])
    assert (art.num_layers, art.num_kv_heads, art.head_dim) == (L, H, D)
    assert sorted(art.plans) == [4, 8]
    assert art.calibration["tokens"] == 5 * (100 - 4)
