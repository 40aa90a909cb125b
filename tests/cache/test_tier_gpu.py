"""The tier on a CUDA device (skipped without one): zero host syncs on compress, evict, load-back and acks under
``torch.cuda.set_sync_debug_mode("error")``, no kernel compile after warm-up, KV reads ordered after the forward
that writes them (a CUDA-graph replay on another stream included), release after read with a busy device, and the
layer-wise decode signalling SGLang's LayerDoneCounter.

The pool is SGLang's MHATokenToKVPool on the GPU, the codec the batched pool codec (Triton kernels unless
KVTC_REFERENCE=1), the calibration the synthetic artifact of the CPU tests.
"""

from __future__ import annotations

from array import array

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.sglang]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

compat = pytest.importorskip("kvtc_sglang.sglang_compat")

from tests.cache.conftest import L, KVData, make_artifact  # noqa: E402

DEV = torch.device("cuda")


def gpu_tier(pool_tokens=512, page_size=1, counter=True, **option_values):
    from kvtc_sglang.cache.options import KVTCOptions
    from kvtc_sglang.cache.radix_cache import KVTCRadixCache
    from kvtc_sglang.codec.dispatch import make_batched_codec
    from kvtc_sglang.codec.codec import KVTCCodec

    art = make_artifact()
    L_, H, D = art.num_layers, art.num_kv_heads, art.head_dim
    pool = compat.MHATokenToKVPool(size=pool_tokens, page_size=page_size, dtype=torch.bfloat16, head_num=H,
                                   head_dim=D, layer_num=L_, device="cuda", enable_memory_saver=False,
                                   enable_alt_stream=False)
    if page_size == 1:
        allocator = compat.TokenToKVPoolAllocator(size=pool_tokens, dtype=torch.bfloat16, device="cuda",
                                                  kvcache=pool, need_sort=False)
    else:
        allocator = compat.PagedTokenToKVPoolAllocator(size=pool_tokens, page_size=page_size, dtype=torch.bfloat16,
                                                       device="cuda", kvcache=pool, need_sort=False)
    rtp = compat.ReqToTokenPool(size=8, max_context_len=pool_tokens, device="cuda", enable_memory_saver=False)
    params = compat.CacheInitParams(disable=False, req_to_token_pool=rtp, token_to_kv_pool_allocator=allocator,
                                    page_size=page_size, eviction_policy="lru")
    values = dict(kv_compress="kvtc", sink_tokens=2, window_tokens=4, min_compress_tokens=4,
                  compress_ahead_watermark=0.0)
    values.update(option_values)
    options = KVTCOptions.from_values(**values).validate()
    codec = make_batched_codec(KVTCCodec(art, 16, device=DEV, entropy="none"), torch.bfloat16)
    layer_counter = None
    if counter:
        layer_counter = compat.LayerDoneCounter(L_)
        compat.register_layer_counter(pool, None, layer_counter)
    cache = KVTCRadixCache(params, codec, options, layer_counter=layer_counter)
    cache.codec.warmup(cache.pool_rows)
    torch.cuda.synchronize()
    return cache, pool, allocator, KVData(art, vocab=2048)  # token ids here reach 1,113


def write(pool, kv, slots, tokens, start=0):
    k, v = kv.kv(tokens, start)
    for layer in range(L):
        pool.k_buffer[layer][slots] = k[:, layer].to(DEV, torch.bfloat16)
        pool.v_buffer[layer][slots] = v[:, layer].to(DEV, torch.bfloat16)


def insert(cache, pool, allocator, kv, tokens):
    slots = allocator.alloc(len(tokens))
    write(pool, kv, slots, tokens)
    cache.insert(compat.InsertParams(key=compat.RadixKey(array("q", tokens)), value=slots))
    return slots


def load(cache, tokens):
    m = cache.match_prefix(compat.MatchPrefixParams(key=compat.RadixKey(array("q", tokens))))
    out, _ = cache.init_load_back(compat.InitLoadBackParams(best_match_node=m.best_match_node,
                                                            host_hit_length=m.host_hit_length))
    index = cache.start_loading()
    return out, index


def rows_close(pool, kv, slots, tokens, atol=0.25):
    k, v = kv.kv(tokens)
    got = torch.stack([b[slots] for b in pool.k_buffer], 1).float().cpu()
    return torch.allclose(got, k.to(torch.bfloat16).float(), atol=atol)


def busy(n=20):
    x = torch.randn(2048, 2048, device=DEV)
    for _ in range(n):
        x = x @ x / 64
    return x


def test_compress_evict_load_back_and_acks_never_sync_the_host():
    cache, pool, allocator, kv = gpu_tier()
    seqs = [list(range(b, b + 96)) for b in (1, 200, 400)]
    for s in seqs:
        insert(cache, pool, allocator, kv, s)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        busy()
        cache.step()          # compress ahead: encode batch launched on the compress stream
        busy()
        cache.step()          # acks polled (maybe not ready: no wait)
        cache.evict(compat.EvictParams(num_tokens=200))   # frees / in-place compressions
        out, index = load(cache, seqs[0] + [7])
        busy()
        cache.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    cache.step()
    assert len(out) > 0 and rows_close(pool, kv, out, seqs[0][:len(out)])
    cache.check_consistency()


def test_no_kernel_compiles_after_warm_up():
    from kvtc_sglang.cache.codec_info import codec_compile_count

    cache, pool, allocator, kv = gpu_tier(pool_tokens=2048)
    before = codec_compile_count(cache.codec)
    for n, base in ((37, 1), (130, 300), (513, 600)):  # odd sizes, offsets and partial ranges
        insert(cache, pool, allocator, kv, list(range(base, base + n)))
    cache.step()
    torch.cuda.synchronize()
    cache.step()
    cache.evict(compat.EvictParams(num_tokens=1500))
    out, _ = load(cache, list(range(300, 300 + 65)) + [1])
    torch.cuda.synchronize()
    cache.step()
    assert codec_compile_count(cache.codec) == before


def test_kv_reads_are_ordered_after_the_forward_that_writes_them():
    """A "forward" on another stream (a CUDA graph replay) writes a node's last rows; the tier is told its event
    and compresses ahead right away: the blob must hold the rows the graph wrote, not the ones before."""
    cache, pool, allocator, kv = gpu_tier()
    tokens = list(range(1, 65))
    slots = insert(cache, pool, allocator, kv, tokens)
    torch.cuda.synchronize()
    # the graph writes the final KV of the last 8 tokens, after a long delay
    final_k, final_v = kv.kv(tokens)
    src_k = [final_k[-8:, layer].to(DEV, torch.bfloat16).contiguous() for layer in range(L)]
    src_v = [final_v[-8:, layer].to(DEV, torch.bfloat16).contiguous() for layer in range(L)]
    for layer in range(L):  # stale content before the forward
        pool.k_buffer[layer][slots[-8:]] = 0
        pool.v_buffer[layer][slots[-8:]] = 0
    torch.cuda.synchronize()
    forward = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    x = torch.randn(2048, 2048, device=DEV)
    with torch.cuda.stream(forward):
        with torch.cuda.graph(graph, stream=forward):
            y = x
            for _ in range(30):
                y = y @ x / 64
            for layer in range(L):
                pool.k_buffer[layer][slots[-8:]] = src_k[layer]
                pool.v_buffer[layer][slots[-8:]] = src_v[layer]
    torch.cuda.synchronize()
    for layer in range(L):
        pool.k_buffer[layer][slots[-8:]] = 0
    torch.cuda.synchronize()
    with torch.cuda.stream(forward):
        graph.replay()
        done = torch.cuda.Event()
        done.record(forward)
    cache.on_forward_launched(done)
    cache.step()  # encode on the compress stream: must wait for the replay
    torch.cuda.synchronize()
    cache.step()
    cache.evict(compat.EvictParams(num_tokens=64))
    out, _ = load(cache, tokens + [1])
    torch.cuda.synchronize()
    assert rows_close(pool, kv, out, tokens)  # the last 8 rows are the window: exact copies of the graph's rows


def test_slots_are_released_only_after_the_kernels_reading_them():
    """A blob dropped while its decode is queued behind a busy load stream keeps its slots until the ack; new
    allocations never get them before."""
    cache, pool, allocator, kv = gpu_tier(pool_tokens=256, compress_ahead_watermark=1.0)
    tokens = list(range(1, 129))
    insert(cache, pool, allocator, kv, tokens)
    cache.evict(compat.EvictParams(num_tokens=1))  # compressed in place
    busy(40)
    out, _ = load(cache, tokens[:64] + [1])  # half of it: the other half still references the blob
    blob = next(iter(cache.blobs.blobs()))
    held = set(blob.slots.tolist())
    cache.evict(compat.EvictParams(num_tokens=10_000))
    free = set(torch.cat([allocator.free_pages, allocator.release_pages]).tolist())
    assert not (held & free) or not cache._load_ops  # still protected while the decode may run
    torch.cuda.synchronize()
    cache.step()
    assert rows_close(pool, kv, out, tokens[:64])
    cache.check_consistency()


def test_layer_wise_load_signals_the_layer_done_counter():
    cache, pool, allocator, kv = gpu_tier()
    tokens = list(range(1, 97))
    insert(cache, pool, allocator, kv, tokens)
    cache.evict(compat.EvictParams(num_tokens=1))
    out, index = load(cache, tokens + [1])
    assert index >= 0
    consumer = torch.cuda.Stream()
    counter = cache.layer_counter
    counter.set_consumer(index)
    with torch.cuda.stream(consumer):
        for layer in range(L):
            counter.wait_until(layer)  # what get_key_buffer does before attention of this layer
            pool.k_buffer[layer][out].float().sum()
    counter.set_consumer(-1)
    torch.cuda.synchronize()
    assert rows_close(pool, kv, out, tokens)
    cache.step()
    cache.check_consistency()
