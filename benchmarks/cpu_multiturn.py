"""CPU end-to-end check: multi-turn chats on SmolLM2-135M-Instruct with the KV in a real sglang pool, KVTC-tiered vs
an uncompressed reference.

One command (CPU only; calibrates the SmolLM2 artifact first if none is cached):
    python benchmarks/cpu_multiturn.py

Both engines run ``kvtc_sglang.eval.chat_engine.MiniEngine`` (SGLang's scheduling of one request: match_prefix,
init_load_back, prefill the suffix, greedy decode, cache_finished_req) over a bf16 CPU ``MHATokenToKVPool``:
  - tested: a ``KVTCRadixCache`` over a small pool, so earlier conversations are compressed when the pool runs short
    and decompressed into slots when their user returns;
  - reference: sglang's plain ``RadixCache`` over a pool large enough that nothing is evicted.
Users (MT-bench 2-turn questions and real ShareGPT conversations) are interleaved round-robin, so every user's
earlier turns have been pushed out of the small pool before the user returns. Both engines see identical prompts;
the tested engine is teacher-forced on the reference's greedy answer (its own greedy choices are recorded), which gives
the free-running first divergence and next-token agreement after it, and keeps both trees caching the same sequences.

Writes benchmarks/results/cpu_multiturn.json (settings, machine, agreement, cache stats, per-request records) and
cpu_multiturn.md (summary).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvtc_sglang.codec.defaults import SERVING_EXACT

HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default=None, help="calibration artifact dir (default: the cached SmolLM2 artifact, "
                                                     "calibrated on first use)")
    ap.add_argument("--data", default=str(HERE / "data"), help="folder with mt_bench_question.jsonl and "
                                                              "dialogstudio_sharegpt_original_example.json")
    ap.add_argument("--mt-bench-users", type=int, default=6, help="MT-bench users (2 turns each)")
    ap.add_argument("--sharegpt-users", type=int, default=5, help="ShareGPT users (up to --turns turns each)")
    ap.add_argument("--turns", type=int, default=3, help="most turns per user")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--pool-tokens", type=int, default=2304, help="slots of the KVTC engine's (and the fp8 engine's) KV "
                                                                 "pool; blobs live in it (2,304 = the memory of the "
                                                                 "earlier 1,536-slot pool plus its separate store)")
    ap.add_argument("--reference-pool-tokens", type=int, default=16384, help="slots of the reference pool (never "
                                                                             "evicts)")
    ap.add_argument("--no-fp8", action="store_true", help="skip the fp8 engine's lockstep run")
    ap.add_argument("--ratio", type=int, default=16, help="KVTC target ratio (a plan of the artifact)")
    ap.add_argument("--sink-tokens", type=int, default=SERVING_EXACT.sink_tokens)
    ap.add_argument("--window-tokens", type=int, default=SERVING_EXACT.window_tokens,
                    help="recent tokens kept exact at the end of a cached sequence (default: the tier's, "
                         f"{SERVING_EXACT.window_tokens})")
    ap.add_argument("--min-compress-tokens", type=int, default=32)
    ap.add_argument("--entropy", default="deflate")
    ap.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared 2-core machine)")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    return ap.parse_args(argv)


def build_conversations(args):
    from kvtc_sglang.eval.conversations import load_mt_bench, load_sharegpt

    data = Path(args.data)
    mt = load_mt_bench(data / "mt_bench_question.jsonl", args.mt_bench_users, turns=min(2, args.turns))
    share = load_sharegpt(data / "dialogstudio_sharegpt_original_example.json", args.sharegpt_users,
                          turns=args.turns)
    out = []  # alternate the sources so long and short chats mix in every round
    for i in range(max(len(mt), len(share))):
        out += [c for c in (share[i] if i < len(share) else None, mt[i] if i < len(mt) else None) if c is not None]
    return out


def cache_summary(stats: dict, peak: dict) -> dict:
    keys = ("compress_count", "compress_tokens", "decompress_count", "decompress_tokens", "hit_hot_tokens",
            "hit_compressed_tokens", "hit_host_tokens", "miss_tokens", "hit_rate", "evicted_tokens", "deleted_tokens",
            "integrity_failures", "integrity_dropped_tokens", "demotions", "drops", "dropped_tokens",
            "revived_tokens", "compress_seconds", "decompress_seconds")
    out = {k: stats[k] for k in keys}
    out["at_end"] = {k: stats[k] for k in ("hot_tokens", "compressed_tokens", "num_blobs", "blob_bytes",
                                           "blob_raw_bytes", "realized_ratio", "blob_slots",
                                           "effective_ratio", "tail_waste_bytes")}
    out["peak"] = peak
    return out


def markdown(result: dict) -> str:
    s, a, c = result["settings"], result["agreement"], result["cache"]
    per_turn = ", ".join(f"turn {t}: {v['exact_match_rate']:.0%} of {v['requests']}" for t, v in a["per_turn"].items())
    lb = a["with_load_back"]
    div = a["first_divergences"]
    peak = c["peak"]
    lines = [
        "# CPU multi-turn end-to-end check (SmolLM2-135M-Instruct, KVTC-tiered sglang RadixCache)",
        "",
        f"Machine: {result['machine']}. Commit: {result['commit']}. Artifact {result['artifact_id']}, "
        f"ratio {s['ratio']}x, sinks {s['sink_tokens']}, window {s['window_tokens']}, min compress "
        f"{s['min_compress_tokens']}, entropy {s['entropy']}.",
        "",
        f"{a['requests']} requests ({s['users']} users interleaved, up to {s['turns']} turns, <= "
        f"{s['max_new_tokens']} new tokens, greedy, model {s['model_dtype']}, bf16 KV pool). KVTC engine: pool "
        f"{s['pool_tokens']} tokens ({result['memory']['kvtc_pool_bytes'] / 2**20:.1f} MiB), blobs in the pool's "
        f"own slots; fp8 engine: plain RadixCache (a pool that never evicts) whose KV is stored rounded to "
        f"float8_e4m3 (scale 1.0); reference: plain RadixCache, pool {s['reference_pool_tokens']} tokens, no "
        f"eviction.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| greedy agreement before first divergence (of reference tokens): all / requests with a load-back | "
        f"{a['prefix_agreement']:.3f} / {lb['prefix_agreement']:.3f} |",
        f"| teacher-forced next-token agreement: all / requests with a load-back | "
        f"{a['next_token_agreement']:.3f} / {lb['next_token_agreement']:.3f} |",
        f"| identical answers | {a['exact_match_rate']:.0%} ({per_turn}; with a load-back: "
        f"{lb['exact_match_rate']:.0%} of {lb['requests']}) |",
        f"| first divergence (token index) of diverged answers | {sorted(div) if div else 'none'} |",
        f"| tokens compressed / blobs made | {c['compress_tokens']} / {c['compress_count']} |",
        f"| tokens restored by load-back / ranges decoded | {c['decompress_tokens']} / {c['decompress_count']} |",
        f"| prefix hits: hot / compressed / miss tokens | {c['hit_hot_tokens']} / {c['hit_compressed_tokens']} / "
        f"{c['miss_tokens']} (hit rate {c['hit_rate']:.1%}) |",
        f"| reference prefix hits: hot / miss tokens | {result['reference_hits']['hot']} / "
        f"{result['reference_hits']['miss']} |",
        f"| effective ratio: compressed tokens / pool slots their blobs take (exact rows and tail waste included), "
        f"peak | {peak['effective_ratio']:.2f}x at {peak['compressed_tokens']} compressed tokens |",
        f"| realized ratio of the live blobs' payload bytes (exact rows included), at that peak | "
        f"{peak['realized_ratio']:.2f}x |",
        f"| teacher-forced next-token agreement on returning turns: kvtc / fp8 | "
        f"{a['returning']['next_token_agreement']:.3f} / "
        f"{(result.get('fp8') or {}).get('returning', {}).get('next_token_agreement', float('nan')):.3f} |",
        f"| identical answers on returning turns: kvtc / fp8 | {a['returning']['exact_match_rate']:.0%} / "
        f"{(result.get('fp8') or {}).get('returning', {}).get('exact_match_rate', float('nan')):.0%} |",
        f"| nominal coded ratio of the plan (before entropy, sink/window excluded) | "
        f"{result['plan_nominal_ratio']:.1f}x |",
        f"| evicted by deletion / compressed nodes dropped for room | {c['deleted_tokens']} tok / {c['drops']} "
        f"({c['dropped_tokens']} tok) |",
        f"| integrity failures | {c['integrity_failures']} |",
        f"| compress / decompress time (reference codec, CPU) | {c['compress_seconds']:.2f} s / "
        f"{c['decompress_seconds']:.2f} s |",
        f"| allocator full after reset() | {result['allocator_full_after_reset']} |",
        f"| wall time (all engines) | {result['timing']['total_s']:.0f} s |",
        "",
        "Agreement: the KVTC engine is teacher-forced on the reference's greedy answer, on identical prompts "
        "(earlier turns carry the recorded ShareGPT answer, or the reference's answer for MT-bench). Its greedy "
        "choices equal its free-running answer up to the first divergence, so the first divergence, the agreement "
        "before it and the identical-answer rate are those of free-running greedy decoding; next-token agreement "
        "also scores the positions after a divergence.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch

    from kvtc_sglang.cache.factory import make_kvtc_cache
    from kvtc_sglang.cache.options import KVTCOptions
    from kvtc_sglang.codec.codec import KVTCCodec
    from kvtc_sglang.eval.agreement import agreement
    from kvtc_sglang.eval.chat_engine import (
        MiniEngine, cache_init_params, kv_shape, make_kv_pool, make_radix_cache, run_lockstep)
    from kvtc_sglang.eval.provenance import git_commit, machine_description
    from kvtc_sglang.models.calibration import ensure_artifact
    from kvtc_sglang.models.smollm2 import load_model

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, tok = load_model(dtype=getattr(torch, args.model_dtype))
    artifact = ensure_artifact(args.artifact, model, tok)
    options = KVTCOptions.from_values(kv_compress="kvtc", ratio=args.ratio,
                                      sink_tokens=args.sink_tokens, window_tokens=args.window_tokens,
                                      min_compress_tokens=args.min_compress_tokens, entropy=args.entropy).validate()
    max_context = 8192
    pool, allocator = make_kv_pool(model.config, args.pool_tokens)
    cache = make_kvtc_cache(cache_init_params(allocator, max_context), artifact, options, host_budget_bytes=0,
                            reference=True, stats_interval_s=float("inf"))
    ref_pool, ref_allocator = make_kv_pool(model.config, args.reference_pool_tokens)
    ref_cache = make_radix_cache(ref_allocator, max_context)
    tested = MiniEngine(model, tok, cache, pool, allocator)
    reference = MiniEngine(model, tok, ref_cache, ref_pool, ref_allocator)
    conversations = build_conversations(args)
    machine, commit = machine_description(), git_commit()
    print(f"machine: {machine}\ncommit: {commit}")
    print(f"{len(conversations)} users: {', '.join(c.name + f' ({len(c.user_turns)})' for c in conversations)}")

    peak = {"compressed_tokens": 0, "realized_ratio": 0.0, "effective_ratio": 0.0, "num_blobs": 0}

    def after_each(record: dict) -> None:
        cache.check_consistency()
        s = cache.stats()
        if s.compressed_tokens >= peak["compressed_tokens"]:
            peak.update(compressed_tokens=s.compressed_tokens, realized_ratio=s.realized_ratio,
                        effective_ratio=s.effective_ratio, num_blobs=s.num_blobs)
        t = record["tested"]
        d = record["first_divergence"]
        ref, got = record["reference_ids"], record["tested_ids"]
        agree = sum(a == b for a, b in zip(ref, got)) / len(ref)
        print(f"{record['user']:>22} turn {record['turn'] + 1}: prompt {t['prompt_tokens']:4d}, "
              f"hot {t['hot_hit_tokens']:4d}, compressed hit {t['host_hit_tokens']:4d} (restored "
              f"{t['loaded_back_tokens']:4d}), computed {t['computed_tokens']:4d}, new {t['new_tokens']:3d} | "
              f"{'identical' if ref == got else f'diverges at {d}'}, next-token {agree:.2f} | compressed now "
              f"{s.compressed_tokens}, effective ratio {s.effective_ratio:.2f}x", flush=True)

    t_run = time.perf_counter()
    records = run_lockstep(reference, tested, conversations, args.max_new_tokens, after_each=after_each)
    run_s = time.perf_counter() - t_run
    stats = cache.stats().as_dict()
    agree = agreement(records)
    agree["returning"] = agreement([r for r in records if r["turn"] > 0])
    fp8 = None
    if not args.no_fp8:  # the same conversations with the KV stored as an fp8 cache holds it (no eviction needed)
        fp8_pool, fp8_allocator = make_kv_pool(model.config, args.reference_pool_tokens)
        fp8_engine = MiniEngine(model, tok, make_radix_cache(fp8_allocator, max_context), fp8_pool, fp8_allocator,
                                kv_round_dtype=torch.float8_e4m3fn)
        ref2_pool, ref2_allocator = make_kv_pool(model.config, args.reference_pool_tokens)
        reference2 = MiniEngine(model, tok, make_radix_cache(ref2_allocator, max_context), ref2_pool, ref2_allocator)
        fp8_records = run_lockstep(reference2, fp8_engine, conversations, args.max_new_tokens)
        fp8 = agreement(fp8_records)
        fp8["returning"] = agreement([r for r in fp8_records if r["turn"] > 0])

    # release everything: the tree gives back every slot and blob
    cache.reset()
    allocator_full = allocator.available_size() == args.pool_tokens and cache.blobs.device_slots == 0
    if ref_allocator.available_size() + ref_cache.evictable_size() != args.reference_pool_tokens:
        raise RuntimeError("the reference pool leaked slots")
    ref_evicted = sum(r["reference"]["evict_requested_tokens"] for r in records)

    layers, heads, head_dim = kv_shape(model.config)
    row_bytes = 2 * layers * heads * head_dim * 2
    codec = KVTCCodec(artifact, args.ratio, device="cpu", entropy="none")
    result = {
        "benchmark": "cpu_multiturn",
        "machine": machine,
        "commit": commit,
        "artifact_id": artifact.artifact_id()[:16],
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("out_dir", "data")},
                     "users": len(conversations), "kv_dtype": "bfloat16", "page_size": 1,
                     "kv_shape": [layers, heads, head_dim]},
        "memory": {"kvtc_pool_bytes": int(sum(pool.get_kv_size_bytes())), "blob_cap_bytes": (cache.blobs.cap_slots or 0) * cache.slot_bytes,
                   "reference_pool_bytes": int(sum(ref_pool.get_kv_size_bytes()))},
        "plan_nominal_ratio": row_bytes / codec.coded_bytes_per_token(),
        "agreement": agree,
        "fp8": fp8,
        "effective_ratio": peak["effective_ratio"],
        "cache": cache_summary(stats, peak),
        "reference_hits": {"hot": sum(r["reference"]["hot_hit_tokens"] for r in records),
                           # looked-up tokens: all but the last prompt token (the match limit, as sglang's)
                           "miss": sum(r["reference"]["prompt_tokens"] - 1 - r["reference"]["hot_hit_tokens"]
                                       for r in records),
                           "evict_requested_tokens": ref_evicted},
        "allocator_full_after_reset": allocator_full,
        "timing": {"total_s": time.perf_counter() - t_start, "run_s": run_s,
                   "tested_s": sum(r["tested"]["load_back_s"] + r["tested"]["prefill_s"] + r["tested"]["decode_s"]
                                   for r in records),
                   "reference_s": sum(r["reference"]["prefill_s"] + r["reference"]["decode_s"] for r in records)},
        "records": records,
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_multiturn.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "cpu_multiturn.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'cpu_multiturn.json'} and cpu_multiturn.md")
    failures = []
    if stats["compress_tokens"] == 0 or stats["decompress_tokens"] == 0:
        failures.append("no compression or no load-back happened (pool too large for the workload?)")
    if stats["integrity_failures"]:
        failures.append(f"{stats['integrity_failures']} integrity failures")
    if not allocator_full:
        failures.append("slots or store bytes leaked after reset()")
    if ref_evicted:
        failures.append(f"the reference evicted ({ref_evicted} tokens): raise --reference-pool-tokens")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
