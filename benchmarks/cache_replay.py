"""CPU trace replay of the cache classes: prefix hit rate vs working set for plain radix, fp8/fp4-sized pools, a host
tier, an unlimited cache and the compressed tier at the 8x/16x/32x plans.

One command (CPU; minutes):
    python benchmarks/cache_replay.py [--out-dir benchmarks/results] [--requests 400]

Workloads are the serving suite's trace generators (``benchmarks/serving/workloads.py``): ``multiturn`` (open-loop
Poisson arrivals, think time, a shared system prompt, MT-Bench-like turn lengths: 2,048-token first turns, 256-token
follow-ups, 128-token answers, 8 turns) and ``cyclic`` (every user's turn t before any turn t+1: the no-reuse case),
at working set x in {0.5, 1, 1.5, 2, 2.5, 3, 4, 6} times a Llama-3.1-8B-shaped pool of 32,768 slots. Requests are
replayed in trace order, one at a time, the way SGLang's scheduler serves one (match with the request, lock,
init_load_back, the batch forms: start_loading, allocate the rest evicting if short, cache_finished_req with the
placeholder answer), through SGLang's real RadixCache / KVTCRadixCache and allocator over a CPU pool.

Configs (capacities in Llama-3.1-8B bf16 slot units):
    radix          RadixCache, 32,768 slots;  fp8 / fp4: RadixCache with 2x / 3.56x the slots (the same bytes);
    host-2x/-8x    a HiCache-like inclusive host tier of 2x / 8x: for hits it is an LRU of that capacity (the device
                   part is a subset of it); its load latency is not modelled here;
    unlimited      RadixCache that never evicts;
    kvtc-8x/16x/32x  KVTCRadixCache, 32,768 slots, blobs in the pool's own slots with the exact payload sizes of the
                   codec's layout for Llama-3.1-8B (32 layers x 8 KV heads x 128, bf16) at a plan of that nominal
                   ratio (bit mix of the calibrated plans: 8-bit, 4-bit and 2-bit groups), sinks 4, window 0. The
                   codec's arithmetic is not run (hit rates depend only on sizes); the pool is a one-layer stand-in
                   whose slot holds exactly what a Llama slot holds in proportion.

Writes ``cache_replay.json`` (rows {config, workload, working_set_x, hit_rate, hit_rate_returning, capacity_tokens,
effective_ratio, compressed_dropped_frac, tail_waste_frac, commit}) and ``cache_replay.png`` (hit rate vs x, one line
per config, the radix pool's capacity marked).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

POOL = 32768
LLAMA = (32, 8, 128)  # layers, KV heads, head_dim
XS = (0.5, 1, 1.5, 2, 2.5, 3, 4, 6)
CONFIGS = ("radix", "fp8", "fp4", "host-2x", "host-8x", "unlimited", "kvtc-8x", "kvtc-16x", "kvtc-32x")
SLOTS = {"radix": 1.0, "fp8": 2.0, "fp4": 3.56, "host-2x": 2.0, "host-8x": 8.0}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--requests", type=int, default=400, help="requests per trace")
    ap.add_argument("--xs", type=float, nargs="+", default=list(XS))
    ap.add_argument("--workloads", nargs="+", default=["multiturn", "cyclic"], choices=["multiturn", "cyclic"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


# --- the codec's sizes, without its arithmetic --------------------------------------------------------------------------

def plan_bytes_per_token(ratio: float) -> dict[str, tuple[int]]:
    """Coded bytes per token of K and V for a Llama-3.1-8B plan of nominal ``ratio`` (bf16): the kept rank whose
    DP-like bit mix lands closest to the ratio."""
    from kvtc_sglang.testing.synthetic import dp_like_plan

    L, H, D = LLAMA
    p = L * H * D
    raw = p * 2  # bf16 bytes of one kind per token
    best = None
    for rank in range(64, p, 64):
        bpt = dp_like_plan(p, rank, int(ratio)).layout.bytes_per_token
        err = abs(raw / bpt - ratio)
        if best is None or err < best[0]:
            best = (err, bpt)
    return {"k": (best[1],), "v": (best[1],)}


@dataclass(frozen=True)
class SizedLayout:
    """A Llama-sized payload expressed in the stand-in pool: ``nbytes`` fills exactly the slots the Llama payload
    needs (``llama_nbytes``), so the cache's slot arithmetic is the Llama one."""

    n_tokens: int
    n_head: int
    n_tail: int
    n_coded: int
    nbytes: int
    llama_nbytes: int
    llama_slots: int


class SizingCodec:
    """The pool-codec contract with the codec's exact payload sizes and no data movement (see the module docstring).
    Encodes and decodes queue nothing; a replay only needs what blobs cost in slots."""

    def __init__(self, ratio: float, stand_in_shape: tuple[int, int, int], page_size: int):
        import types

        import torch

        from kvtc_sglang.codec.payload_layout import payload_layout

        self._layout = payload_layout
        self._bpt = plan_bytes_per_token(ratio)
        self.shape = stand_in_shape
        L, H, D = LLAMA
        self.llama_row = H * D * 2
        self.llama_slot = 2 * L * self.llama_row
        sl, sh, sd = stand_in_shape
        self.slot = 2 * sl * sh * sd * 2
        self.page = page_size
        self._torch = torch
        self._ns = types.SimpleNamespace
        self.nominal_ratio = (L * H * D * 2 * 2) / (2 * self._bpt["k"][0])

    def blob_layout(self, n_tokens: int, n_head: int, n_tail: int) -> SizedLayout:
        L = LLAMA[0]
        lay = self._layout(n_tokens, n_head, n_tail, n_layers=L, row_bytes=self.llama_row, esize=2,
                           bytes_per_token=self._bpt)
        slots = -(-lay.nbytes // self.llama_slot)
        slots = -(-slots // self.page) * self.page
        return SizedLayout(n_tokens, n_head, n_tail, lay.n_coded, slots * self.slot, lay.nbytes, slots)

    def pool_rows(self, k_buffers, v_buffers):
        return None

    def encode(self, pool, jobs):
        return self._ns(crc=self._torch.zeros(len(jobs), dtype=self._torch.int64))

    def decode_begin(self, pool, jobs):
        return None

    def decode_layers(self, batch, layers) -> None:
        pass

    encode_reads_before_writes = True  # sizes only: compression in place needs no scratch

    def warmup(self, pool) -> int:
        return 0


# --- one replay ------------------------------------------------------------------------------------------------------

def make_cache(config: str, page_size: int, unlimited_tokens: int):
    import torch

    from kvtc_sglang import sglang_compat as compat

    stand_in = (1, 1, 8)
    slots = POOL
    if config in SLOTS:
        slots = int(POOL * SLOTS[config])
    elif config == "unlimited":
        slots = unlimited_tokens
    slots = -(-slots // page_size) * page_size
    pool = compat.MHATokenToKVPool(size=slots, page_size=page_size, dtype=torch.bfloat16, head_num=stand_in[1],
                                   head_dim=stand_in[2], layer_num=stand_in[0], device="cpu",
                                   enable_memory_saver=False, enable_alt_stream=False)
    if page_size == 1:
        allocator = compat.TokenToKVPoolAllocator(size=slots, dtype=torch.bfloat16, device="cpu", kvcache=pool,
                                                  need_sort=False)
    else:
        allocator = compat.PagedTokenToKVPoolAllocator(size=slots, page_size=page_size, dtype=torch.bfloat16,
                                                       device="cpu", kvcache=pool, need_sort=False)
    rtp = compat.ReqToTokenPool(size=4, max_context_len=64 * 1024, device="cpu", enable_memory_saver=False)
    params = compat.CacheInitParams(disable=False, req_to_token_pool=rtp, token_to_kv_pool_allocator=allocator,
                                    page_size=page_size, eviction_policy="lru")
    if not config.startswith("kvtc"):
        return compat.RadixCache(params), allocator, rtp, None
    from kvtc_sglang.cache.options import KVTCOptions
    from kvtc_sglang.cache.radix_cache import KVTCRadixCache

    ratio = float(config.split("-")[1].rstrip("x"))
    codec = SizingCodec(ratio, stand_in, page_size)
    options = KVTCOptions.from_values(kv_compress="kvtc", ratio=ratio, sink_tokens=4, window_tokens=0,
                                      min_compress_tokens=32, compress_ahead_watermark=0.75,
                                      stats_interval_s=1e9).validate()
    return KVTCRadixCache(params, codec, options), allocator, rtp, codec


def replay(trace, config: str, page_size: int) -> dict:
    import types

    import torch

    from kvtc_sglang import sglang_compat as compat

    prompts = trace.replay_prompts()
    unlimited = sum(len(p) + r.output_len for p, r in zip(prompts, trace.requests)) + 1024
    cache, allocator, rtp, codec = make_cache(config, page_size, unlimited)
    kvtc = codec is not None
    looked = hit = looked_ret = hit_ret = 0
    capacity = 0
    waste = [0, 0]
    ratio_peak = 0.0
    for r, prompt in zip(trace.requests, prompts):
        answer = trace.placeholder_answer(r)
        ids = list(prompt) + list(answer)
        kv_len = len(ids) - 1  # the last sampled token has no KV
        if kvtc:
            cache.step()
        req = types.SimpleNamespace(req_pool_idx=None, origin_input_ids=array("q", prompt),
                                    output_ids=array("q", answer), extra_key=None, priority=0, last_node=None,
                                    cache_protected_len=0)
        rtp.alloc([req])
        key = compat.RadixKey(array("q", prompt), limit=len(prompt) - 1)
        m = cache.match_prefix(compat.MatchPrefixParams(key=key, req=req))
        prefix, req.last_node = m.device_indices, m.last_device_node
        if m.host_hit_length > 0:
            cache.inc_lock_ref(req.last_node)
            new, last = cache.init_load_back(compat.InitLoadBackParams(best_match_node=m.best_match_node,
                                                                       host_hit_length=m.host_hit_length, req=req))
            cache.dec_lock_ref(req.last_node)
            req.last_node = last
            prefix = torch.cat([prefix, new])
            cache.start_loading([req])
        cache.inc_lock_ref(req.last_node)
        req.cache_protected_len = len(prefix)
        n_looked = len(prompt) - 1
        looked += n_looked
        hit += len(prefix)
        if r.returning:
            looked_ret += n_looked
            hit_ret += len(prefix)
        need = kv_len - len(prefix)
        pages = -(-need // page_size) * page_size
        if allocator.available_size() < pages:
            cache.evict(compat.EvictParams(num_tokens=pages - allocator.available_size()))
        slots = allocator.alloc(pages) if pages else prefix[:0]
        if slots is None:  # the pool cannot hold this request: served uncached
            cache.dec_lock_ref(req.last_node)
            rtp.free(req)
            continue
        rtp.write((req.req_pool_idx, slice(0, kv_len)), torch.cat([prefix, slots[:need]]).to(torch.int32))
        cache.cache_finished_req(req, kv_len_to_handle=kv_len)  # frees the unaligned tail's page too
        rtp.free(req)
        if kvtc:
            s = cache.stats()
            capacity = max(capacity, s.cached_tokens)
            ratio_peak = max(ratio_peak, s.effective_ratio)
            live = cache.blobs.blobs()
            waste[0] += sum(b.layout.llama_slots * codec.llama_slot - b.layout.llama_nbytes for b in live)
            waste[1] += sum(b.layout.llama_slots * codec.llama_slot for b in live)
        else:
            capacity = max(capacity, cache.total_size())
    out = {"hit_rate": hit / looked if looked else 0.0,
           "hit_rate_returning": hit_ret / looked_ret if looked_ret else 0.0,
           "capacity_tokens": int(capacity)}
    if kvtc:
        s = cache.stats()
        out.update(effective_ratio=round(ratio_peak, 3), compressed_dropped_frac=round(s.compressed_dropped_frac, 4),
                   tail_waste_frac=round(waste[0] / waste[1], 4) if waste[1] else 0.0,
                   nominal_ratio=round(codec.nominal_ratio, 2), compress_ahead=s.compress_ahead_count,
                   compress_at_evict=s.compress_at_evict_count, restored_tokens=s.decompress_tokens)
        cache.check_consistency()
    else:
        out.update(effective_ratio=None, compressed_dropped_frac=None, tail_waste_frac=None)
    return out


def make_trace(workload: str, x: float, requests: int, seed: int):
    from benchmarks.serving import workloads

    if workload == "multiturn":
        return workloads.multiturn(vocab_size=32000, seed=seed, x=x, budget_tokens=POOL, num_requests=requests,
                                   think_mean_s=5.0, system_tokens=256)
    return workloads.cyclic(vocab_size=32000, seed=seed, x=x, budget_tokens=POOL, history_tokens=2048, rounds=3)


def plot(rows: list[dict], path: Path) -> None:
    from kvtc_sglang.eval.provenance import pyplot_or_none

    plt = pyplot_or_none()
    if plt is None:
        return
    workloads_ = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(workloads_), figsize=(6.5 * len(workloads_), 4.5), squeeze=False)
    for ax, w in zip(axes[0], workloads_):
        for config in CONFIGS:
            pts = sorted((r["working_set_x"], r["hit_rate"]) for r in rows if r["workload"] == w
                         and r["config"] == config)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=config,
                        linestyle="-" if config.startswith("kvtc") else "--")
        for cap, name in ((1, "radix pool"), (2, "fp8"), (3.56, "fp4")):
            ax.axvline(cap, color="grey", linewidth=0.6, linestyle=":")
            ax.text(cap, 0.02, name, rotation=90, fontsize=7, color="grey")
        ax.set_title(f"{w}: prefix hit rate vs working set")
        ax.set_xlabel("working set / Llama-3.1-8B pool of 32,768 slots")
        ax.set_ylabel("hit rate (matched / looked-up tokens)")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from kvtc_sglang.eval.provenance import git_commit, machine_description

    torch.set_num_threads(1)
    commit, machine = git_commit(), machine_description()
    rows = []
    t0 = time.perf_counter()
    for workload in args.workloads:
        for x in args.xs:
            trace = make_trace(workload, x, args.requests, args.seed)
            for config in args.configs:
                t = time.perf_counter()
                res = replay(trace, config, args.page_size)
                row = {"config": config, "workload": workload, "working_set_x": x, **res,
                       "requests": len(trace.requests), "page_size": args.page_size, "commit": commit}
                rows.append(row)
                print(f"{workload:9s} x={x:<4} {config:10s} hit {res['hit_rate']:.3f} returning "
                      f"{res['hit_rate_returning']:.3f} capacity {res['capacity_tokens']:7d} "
                      f"ratio {res['effective_ratio']} dropped {res['compressed_dropped_frac']} "
                      f"({time.perf_counter() - t:.1f}s)", flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "cache_replay" if args.page_size == 1 else f"cache_replay_page{args.page_size}"
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "commit": commit, "pool_slots": POOL,
                                                  "seconds": round(time.perf_counter() - t0, 1), "rows": rows},
                                                 indent=1) + "\n")
    plot(rows, out / f"{stem}.png")
    print(f"wrote {out / (stem + '.json')} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
