"""cache/factory.py: the tree cache built from sglang's build context (this rank's artifact, the batched pool codec,
the optional blob cap, the host spill budget)."""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang import sglang_compat as compat  # imports sglang lazily

pytestmark = pytest.mark.sglang

SEQ = list(range(1, 33))  # 32 tokens: a multiple of the page size


def build_context(pool_allocator, page_size: int, **overrides):
    import types

    _, allocator = pool_allocator
    params = compat.CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator,
                                    page_size=page_size)
    fields = dict(server_args=types.SimpleNamespace(tp_size=1, enable_dp_attention=False), params=params,
                  is_hybrid_swa=False, is_hybrid_ssm=False, enable_hierarchical_cache=False,
                  disable_radix_cache=False, effective_chunked_prefill_size=None, tp_worker=None, model_config=None,
                  tp_size=1, tp_rank=0, tp_group=None)
    fields.update(overrides)
    return compat.TreeCacheBuildContext(**fields)


def test_the_factory_builds_a_working_cache_from_a_build_context(artifact, tmp_path):
    from kvtc_sglang.cache.factory import kvtc_cache_for_rank
    from kvtc_sglang.cache.options import KVTCOptions
    from kvtc_sglang.codec.errors import CalibrationMismatchError

    artifact.save(tmp_path / "card")
    options = KVTCOptions.from_values(kv_compress="kvtc", calibration=str(tmp_path / "card"), ratio=16,
                                      store_budget="0.5", host_spill="64KiB", entropy="deflate", sink_tokens=2,
                                      window_tokens=4, min_compress_tokens=4).validate()
    pool = compat.MHATokenToKVPool(size=64, page_size=4, dtype=torch.bfloat16, head_num=2, head_dim=16, layer_num=2,
                                   device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    allocator = compat.PagedTokenToKVPoolAllocator(size=64, page_size=4, dtype=torch.bfloat16, device="cpu",
                                                   kvcache=pool, need_sort=False)
    ctx = build_context((pool, allocator), 4)
    cache = kvtc_cache_for_rank(ctx, options)
    assert cache.blobs.cap_slots == 64 // 2  # a cap of half the pool's memory, in slots
    assert cache.host.capacity_bytes == 64 << 10
    assert cache.codec.shape == (2, 2, 16) and cache.codec.kv_dtype is None
    assert cache.layer_counter is None and cache.transfer.mode == "inline"  # CPU
    slots = allocator.alloc(32)
    for layer in range(2):
        pool.k_buffer[layer][slots] = torch.randn(32, 2, 16).to(torch.bfloat16)
        pool.v_buffer[layer][slots] = torch.randn(32, 2, 16).to(torch.bfloat16)
    from array import array

    key = compat.RadixKey(array("q", SEQ))
    cache.insert(compat.InsertParams(key=key, value=slots))
    cache.evict(compat.EvictParams(num_tokens=1))
    m = cache.match_prefix(compat.MatchPrefixParams(key=key))
    assert m.host_hit_length == 32
    indices, _ = cache.init_load_back(compat.InitLoadBackParams(best_match_node=m.best_match_node,
                                                                host_hit_length=32))
    cache.start_loading()
    assert len(indices) == 32
    cache.check_consistency()

    wide = compat.MHATokenToKVPool(size=64, page_size=4, dtype=torch.bfloat16, head_num=4, head_dim=16, layer_num=2,
                                   device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    wide_alloc = compat.PagedTokenToKVPoolAllocator(size=64, page_size=4, dtype=torch.bfloat16, device="cpu",
                                                    kvcache=wide, need_sort=False)
    with pytest.raises(CalibrationMismatchError, match=r"num_kv_heads \(per rank\): model 4, calibration 2.*"
                                                       r"kvtc-sglang calibrate"):
        kvtc_cache_for_rank(build_context((wide, wide_alloc), 4), options)
