"""The compressed tier's hot path: kernel launches, host syncs and host time of compress, evict and load-back.

One command (CPU or CUDA):
    python benchmarks/hot_path.py [--out benchmarks/results/hot_path.json] [--tokens 256]

For each model shape (Llama-3.1-8B: 32 layers x 8 KV heads x 128, SmolLM2-135M: 30 x 3 x 64) and N in {1, 8, 32}
nodes of ``--tokens`` tokens, N nodes forming one conversation's chain (turn after turn) sit hot in SGLang's
MHATokenToKVPool under a ``KVTCRadixCache`` with the batched pool codec (synthetic calibration, a 16x-like plan):
    compress    one scheduler step launching the compression ahead of all N nodes, and the step acknowledging it;
    evict       evicting the N nodes, each holding a blob (frees hot slots; no codec work);
    load_back   init_load_back of the N-node chain, start_loading (the batch forms), the acknowledging step.
Measured per operation: ``launches`` (codec kernel launches, counted by the codec as its kernel route would make
them, plus the tier's own tensor operations outside the codec's calls, each a kernel on a GPU), ``syncs`` (host
reads of device-side data, by the tier's torch-function audit ``kvtc_sglang.cache.audit.SyncAudit``, strict on CPU:
every tensor counts as device-side unless marked host-side; on CUDA the GPU tests also run the hot path under
``torch.cuda.set_sync_debug_mode("error")``),
``host_ms`` (wall time of the tier's calls: on CPU this includes the codec's arithmetic), ``gpu_ms`` (CUDA events on a
GPU; None on CPU). On CPU the Llama shape runs with ``--cpu-layers`` of its 32 layers (the row says so).

Writes rows {op, impl, device, model_shape, tokens, nodes, launches, syncs, host_ms, gpu_ms, commit, machine}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from array import array
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHAPES = {"llama-3.1-8b": (32, 8, 128), "smollm2-135m": (30, 3, 64)}
NODES = (1, 8, 32)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results" / "hot_path.json"))
    ap.add_argument("--tokens", type=int, default=256, help="tokens per node")
    ap.add_argument("--cpu-layers", type=int, default=4, help="layers of the Llama shape on CPU (the pool and the "
                                                              "codec's arithmetic are scaled down; counts are per op)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per row (the median host_ms is reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    return ap.parse_args(argv)


_ARTIFACTS: dict = {}


def artifact_for(shape, device):
    """The synthetic 16x artifact of ``shape`` (L, H, D), made once per shape: its random orthonormal bases come from
    a QR on ``device`` (on the CPU, a Llama-3.1-8B-sized QR takes minutes)."""
    from kvtc_sglang.testing.synthetic import dp_like_plan, synthetic_artifact

    key = (tuple(shape), str(device))
    if key not in _ARTIFACTS:
        L, H, D = shape
        p = L * H * D
        rank = max(16, (p // 4) // 16 * 16)  # ~16x at bf16 with the plan's bit mix
        _ARTIFACTS[key] = synthetic_artifact(L, H, D, {16: [(dp_like_plan(p, rank, 16), dp_like_plan(p, rank, 16))]},
                                             seed=0, device=device)
    return _ARTIFACTS[key]


def build(shape, n_nodes: int, tokens: int, device):
    import torch

    from kvtc_sglang import sglang_compat as compat
    from kvtc_sglang.cache.factory import make_kvtc_cache
    from kvtc_sglang.cache.options import KVTCOptions
    from kvtc_sglang.testing.synthetic import synthetic_kv

    L, H, D = shape
    art = artifact_for(shape, device)
    pool_tokens = n_nodes * tokens * 2 + 1024
    pool = compat.MHATokenToKVPool(size=pool_tokens, page_size=1, dtype=torch.bfloat16, head_num=H, head_dim=D,
                                   layer_num=L, device=str(device), enable_memory_saver=False, enable_alt_stream=False)
    allocator = compat.TokenToKVPoolAllocator(size=pool_tokens, dtype=torch.bfloat16, device=str(device),
                                              kvcache=pool, need_sort=False)
    rtp = compat.ReqToTokenPool(size=4, max_context_len=n_nodes * tokens + 16, device=str(device),
                                enable_memory_saver=False)
    params = compat.CacheInitParams(disable=False, req_to_token_pool=rtp, token_to_kv_pool_allocator=allocator,
                                    page_size=1, eviction_policy="lru")
    options = KVTCOptions.from_values(kv_compress="kvtc", ratio=16, sink_tokens=4, window_tokens=0,
                                      min_compress_tokens=16, compress_ahead_watermark=0.0,
                                      compress_ahead_tokens=n_nodes * tokens).validate()
    counter = None
    if device.type == "cuda":
        counter = compat.LayerDoneCounter(L)
        compat.register_layer_counter(pool, None, counter)
    cache = make_kvtc_cache(params, art, options, layer_counter=counter, stats_interval_s=1e9)
    k, v = synthetic_kv(art, n_nodes * tokens, 0, device=device)
    ids = [1000 + i for i in range(n_nodes * tokens)]
    for i in range(1, n_nodes + 1):  # the chain: one node per turn
        n = i * tokens
        prev = (i - 1) * tokens
        slots = allocator.alloc(tokens)
        for layer in range(L):
            pool.k_buffer[layer][slots] = k[prev:n, layer]
            pool.v_buffer[layer][slots] = v[prev:n, layer]
        key = compat.RadixKey(array("q", ids[:n]))
        m = cache.match_prefix(compat.MatchPrefixParams(key=key))
        result = cache.insert(compat.InsertParams(key=key, value=torch.cat([m.device_indices, slots])))
        cache.queue_compression(result.last_device_node)  # as cache_finished_req does for each finished turn
    return cache, pool, allocator, ids


def measure(cache, pool, allocator, fn, device):
    """(launches, syncs, host_ms, gpu_ms, sample sync names) of fn().

    launches: the codec's kernel launches (its own counter: what its kernel route launches) plus the tier's own
    kernel-running tensor operations outside the codec's calls. syncs: host reads of device-side data counted by the
    tier's audit (``cache.audit.SyncAudit``; strict on CPU: every tensor counts unless marked host-side).
    """
    import torch

    from kvtc_sglang.cache.audit import SyncAudit
    from kvtc_sglang.codec.launches import LAUNCHES

    if device.type == "cuda":
        torch.cuda.synchronize()
    inside = [0]
    codec = cache.codec
    saved = {}
    for name in ("encode", "decode_begin", "decode_layers", "copy_rows"):
        method = getattr(codec, name, None)
        if callable(method):
            saved[name] = method

            def wrapped(*a, _m=method, **k):
                inside[0] += 1
                try:
                    return _m(*a, **k)
                finally:
                    inside[0] -= 1

            setattr(codec, name, wrapped)
    tier_ops = _tier_ops(inside)
    audit = SyncAudit(strict_cpu=device.type == "cpu")
    codec_before = LAUNCHES.total
    start = end = None
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    try:
        with audit, tier_ops:
            fn()
    finally:
        for name, method in saved.items():
            setattr(codec, name, method)
    host_ms = (time.perf_counter() - t0) * 1e3
    gpu_ms = None
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize()
        gpu_ms = start.elapsed_time(end)
    launches = (LAUNCHES.total - codec_before) + tier_ops.count
    return launches, audit.total, host_ms, gpu_ms, sorted(audit.counts)[:5]


def _tier_ops(inside):
    """A dispatch-mode counter of the tier's own kernel-running tensor operations (outside the codec's calls, whose
    launches the codec counts itself)."""
    from kvtc_sglang.cache.audit import LaunchCounter

    class TierOps(LaunchCounter):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if inside[0]:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    return TierOps()


def run_op(op: str, shape, n_nodes: int, tokens: int, device):
    import torch

    from kvtc_sglang import sglang_compat as compat

    cache, pool, allocator, ids = build(shape, n_nodes, tokens, device)
    if op in ("evict", "load_back"):
        cache.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        cache.step()
        assert cache.blobs.device_slots > 0 and cache.kvtc_counters.compress_ahead_count == n_nodes
    if op == "load_back":
        cache.evict(compat.EvictParams(num_tokens=n_nodes * tokens))

    def compress():
        cache.step()
        cache.step()

    def evict():
        cache.evict(compat.EvictParams(num_tokens=n_nodes * tokens))

    def load_back():
        key = compat.RadixKey(array("q", ids + [7]))
        m = cache.match_prefix(compat.MatchPrefixParams(key=key))
        out, _ = cache.init_load_back(compat.InitLoadBackParams(best_match_node=m.best_match_node,
                                                                host_hit_length=m.host_hit_length))
        assert len(out) == n_nodes * tokens, len(out)
        cache.start_loading()
        cache.step()

    fn = {"compress": compress, "evict": evict, "load_back": load_back}[op]
    result = measure(cache, pool, allocator, fn, device)
    if op == "compress":
        assert cache.kvtc_counters.compress_ahead_count == n_nodes
    cache.check_consistency()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from kvtc_sglang.eval.provenance import git_commit, machine_description

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impl = "triton" if device.type == "cuda" else "reference"
    machine, commit = machine_description(), git_commit()
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        run_shape = shape
        label = f"{name} (L={shape[0]}, H={shape[1]}, D={shape[2]})"
        if device.type == "cpu" and name.startswith("llama") and args.cpu_layers < shape[0]:
            run_shape = (args.cpu_layers, shape[1], shape[2])
            label = f"{name} (L={args.cpu_layers} of {shape[0]} on CPU, H={shape[1]}, D={shape[2]})"
        for op in ("compress", "evict", "load_back"):
            for n in NODES:
                runs = [run_op(op, run_shape, n, args.tokens, device) for _ in range(args.repeats)]
                launches, syncs, _, gpu_ms, sample = runs[0]
                host = sorted(r[2] for r in runs)[len(runs) // 2]
                rows.append({"op": op, "impl": impl, "device": device.type, "model_shape": label,
                             "tokens": args.tokens, "nodes": n, "launches": launches,
                             "syncs": max(r[1] for r in runs), "host_ms": round(host, 3),
                             "gpu_ms": None if gpu_ms is None else round(sorted(r[3] for r in runs)[len(runs) // 2], 3),
                             "commit": commit, "machine": machine})
                print(f"{label:48s} {op:9s} nodes {n:2d}: launches {launches:4d}, syncs {syncs}, "
                      f"host {host:8.1f} ms{'' if not sample else f' (e.g. {sample[0]})'}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {out}")
    bad = [r for r in rows if r["syncs"]]
    for name in args.shapes:
        for op in ("compress", "evict", "load_back"):
            by_n = {r["nodes"]: r["launches"] for r in rows if r["op"] == op and r["model_shape"].startswith(name)}
            if by_n[32] > 1.5 * max(by_n[1], 1):
                bad.append(f"{name} {op}: launches {by_n}")
    for b in bad:
        print(f"FAILED: {b}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
