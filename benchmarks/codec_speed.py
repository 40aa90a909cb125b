#!/usr/bin/env python3
"""Codec speed: Triton KVTC encode/decode GB/s of raw KV, beside the PyTorch reference codec, a pinned
host->device copy of the uncompressed KV (what HiCache reloads) and recomputing the prefix.

GPU box (one command, see benchmarks/gpu_check.sh):
    python3 benchmarks/codec_speed.py --out DIR [--artifact CALIBRATION_DIR] [--tune] [--budget SECONDS]
CI smoke test (CPU, Triton interpreter, tiny shapes, < 1 min):
    python3 benchmarks/codec_speed.py --smoke --out DIR

Workload: Llama-3.1-8B KV shapes (32 layers x 8 KV heads x 128 = p 32768 per kind, bf16 pool, 8192
tokens = 1 GiB of raw K+V) with a synthetic artifact (random orthonormal bases, DP-like plans of kept
rank r in {1024, 2048, 4096, 8192}: a few 8-bit size-1 groups, 8-bit groups of 16/64 over r/4, 4-bit
groups of 64/256 over the next 3r/8, 2-bit groups of 256/1024 after) and tokens that are low rank in
that basis plus noise; with --artifact, a real calibration artifact's plans at its own shapes.
GB/s = bytes of raw K+V in the pool dtype / time. Timings: CUDA events, median of repeats after a
warm-up call. Every implementation is checked against the reference codec before it is timed.

Rows (JSON/markdown): op (encode, decode, decode_layerwise, h2d_copy, recompute, d2d_copy, gemm_bf16),
impl (triton = the per-node API, triton-batched = the batched pool codec of the compressed tier, torch-reference,
torch-pinned, flop-derived, cublas), model, rank, plan (the plan a rank comes from: "8x"/"16x"/"32x" with
--plan-ranks, else "r<rank>"), nodes (jobs of one batched call; the same tokens split evenly), launches
(kernel launches of one batched call), tokens, entropy ("none" = kernels only on the raw payload, "none+blob" =
blob framing without entropy, else the nvCOMP coder), ratio (raw KV bytes / stored bytes), ms, gbps, gpu, commit.
Batched decode rows: op "decode" = one decode_layers call for all layers ("all-layers"), op "decode_layerwise" =
one decode_layers call per layer (what overlaps with the prefill); both include decode_begin (unpack).

    --plan-ranks CARD   synthetic plans at the kept ranks of a calibrated card's 8/16/32 plans (card.json or its
                        folder), e.g. the Llama-3.1-8B card: the decode rate at the served ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from kvtc_sglang.eval.provenance import git_commit, pyplot_or_none

ROOT = Path(__file__).resolve().parents[1]
LLAMA = dict(model="llama-3.1-8b-synthetic", L=32, H=8, D=128, params=8.03e9, n_q_heads=32)
SMOKE = dict(model="tiny-synthetic", L=2, H=2, D=32, params=1.0e6, n_q_heads=4)
LLAMA_ROPE = dict(head_dim=128, rotary_dim=128, theta=500000.0, style="neox",
                  scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192})
ENTROPIES = ("deflate", "gdeflate", "ans")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="output folder")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ranks", default="1024,2048,4096,8192")
    ap.add_argument("--artifact", default=None, help="calibration artifact folder (card.json + tensors.pt)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--chunk-tokens", type=int, default=4096, help="encode token chunk (bounds scratch memory)")
    ap.add_argument("--tune", action="store_true", help="sweep a few GEMM launch configs at r=2048 first")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; optional parts are skipped past it")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (Triton interpreter) or GPU")
    ap.add_argument("--plan-ranks", default=None, metavar="CARD",
                    help="use the kept ranks of this card's 8/16/32 plans (card.json or its folder) instead of --ranks")
    ap.add_argument("--nodes", default=None, help="jobs per batched call, comma separated (default 1,8,32)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.tokens, args.ranks, args.repeats = 96, "32,64", 1
    args.ranks = [int(r) for r in str(args.ranks).split(",") if r]
    args.nodes = [int(x) for x in str(args.nodes or ("1,4" if args.smoke else "1,8,32")).split(",") if x]
    if args.plan_ranks:
        args.card_ranks = card_plan_ranks(args.plan_ranks)
    return args


def card_plan_ranks(path: str) -> dict[int, tuple[int, int]]:
    """{ratio: (K rank, V rank)} of the 8/16/32 plans of a calibration card (largest rank over feature blocks)."""
    card = Path(path)
    if card.is_dir():
        card = card / "card.json"
    try:
        plans = json.loads(card.read_text())["plans"]
        out = {int(r): (max(b["rank"] for b in plans[r]["k"]), max(b["rank"] for b in plans[r]["v"]))
               for r in ("8", "16", "32") if r in plans}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--plan-ranks {path}: not a calibration card with plans ({type(e).__name__}: {e})")
    if not out:
        raise SystemExit(f"--plan-ranks {path}: the card has none of the 8/16/32 plans")
    return out


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.cuda = torch.cuda.is_available()
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        self.rows: list[dict] = []
        self.meta: dict = {}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.gpu = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.commit = args.commit or git_commit()

    # -------------------------------------------------------------- utilities
    def elapsed(self) -> float:
        return time.time() - self.t0

    def have_time(self, need: float) -> bool:
        ok = self.elapsed() + need <= self.args.budget
        if not ok:
            log(f"  (skipped: {self.elapsed():.0f}s used of a {self.args.budget:.0f}s budget)")
        return ok

    def time_ms(self, fn, repeats: int | None = None, warmup: int = 1) -> float:
        repeats = repeats or self.args.repeats
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def add(self, **row) -> dict:
        row.setdefault("gpu", self.gpu)
        row.setdefault("commit", self.commit)
        for key in ("rank", "tokens", "entropy", "ratio", "model", "plan", "nodes", "launches"):
            row.setdefault(key, None)
        if row.get("ms") and row.get("bytes"):
            gbps = row["bytes"] / (row["ms"] * 1e-3) / 1e9
            row["gbps"] = round(gbps, 2) if gbps >= 1 else float(f"{gbps:.3g}")
        row.setdefault("gbps", None)
        row["ms"] = round(row["ms"], 4) if row.get("ms") is not None else None
        self.rows.append(row)
        log(f"  {row['op']:<16} {row['impl']:<16} r={row['rank']!s:<5} {row['entropy'] or '':<10} "
            + (f"nodes={row['nodes']:<3} " if row.get("nodes") else "")
            + f"{row['ms'] if row['ms'] is not None else '-':>9} ms  {row['gbps'] if row['gbps'] is not None else '-':>8} GB/s"
            + (f"  ratio {row['ratio']:.2f}" if row.get("ratio") else "") + (f"  [{row['note']}]" if row.get("note") else ""))
        return row

    def save(self) -> None:
        self.meta.update(gpu=self.gpu, commit=self.commit, torch=torch.__version__, elapsed_s=round(self.elapsed(), 1),
                         argv=sys.argv[1:])
        (self.out / "codec_speed.json").write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1) + "\n")
        (self.out / "codec_speed.md").write_text(markdown(self.rows, self.meta))
        plot(self.rows, self.out / "codec_speed.png")


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------ baselines
def ceilings(b: Bench, model: dict) -> float:
    """Measured device copy bandwidth and bf16 GEMM rate; returns the GEMM rate in FLOP/s."""
    n = 1024 if b.args.smoke else 8192
    x = torch.randn(n, n, device=b.dev, dtype=torch.bfloat16 if b.cuda else torch.float32)
    y = torch.randn(n, n, device=b.dev, dtype=x.dtype)
    ms = b.time_ms(lambda: x @ y, repeats=5 if b.cuda else 1)
    rate = 2 * n**3 / (ms * 1e-3)
    b.add(op="gemm_bf16", impl="cublas" if b.cuda else "torch-cpu", ms=ms, note=f"{n}^3: {rate / 1e12:.0f} TFLOP/s")
    b.meta["gemm_flops_per_s"] = rate
    if b.cuda:
        src = torch.empty(1 << 30, dtype=torch.uint8, device=b.dev)
        dst = torch.empty_like(src)
        ms = b.time_ms(lambda: dst.copy_(src), repeats=5)
        b.add(op="d2d_copy", impl="torch", ms=ms, bytes=2 * src.numel(), note="bytes read + written")
        del src, dst
    return rate


def h2d_copy(b: Bench, raw_bytes: int, model: dict) -> None:
    if not b.cuda:
        b.add(op="h2d_copy", impl="torch-pinned", tokens=b.args.tokens, model=model["model"], ms=None, note="no GPU")
        return
    host = torch.empty(raw_bytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(raw_bytes, dtype=torch.uint8, device=b.dev)
    ms = b.time_ms(lambda: dev.copy_(host, non_blocking=True), repeats=5)
    b.add(op="h2d_copy", impl="torch-pinned", tokens=b.args.tokens, model=model["model"], ms=ms, bytes=raw_bytes)
    del host, dev


def recompute(b: Bench, raw_bytes: int, model: dict, rate: float) -> None:
    """Prefill FLOPs of the prefix over the measured GEMM rate (a lower bound on recompute time)."""
    n, L, hq, D = b.args.tokens, model["L"], model["n_q_heads"], model["D"]
    flops = 2 * model["params"] * n + 2 * n * n * hq * D * L  # linear layers + causal QK^T and PV
    ms = flops / rate * 1e3
    b.add(op="recompute", impl="flop-derived", tokens=n, model=model["model"], ms=ms, bytes=raw_bytes,
          note=f"2*{model['params']:.3g}*n + 2*n^2*{hq}*{D}*{L} = {flops:.3g} FLOP at the measured GEMM rate")


# ------------------------------------------------------------------ codec rows
def make_pool(b: Bench, model: dict, n: int):
    L, H, D = model["L"], model["H"], model["D"]
    kb = [torch.zeros(2 * n + 1, H, D, dtype=torch.bfloat16, device=b.dev) for _ in range(L)]
    vb = [torch.zeros(2 * n + 1, H, D, dtype=torch.bfloat16, device=b.dev) for _ in range(L)]
    perm = torch.randperm(2 * n, device=b.dev) + 1
    return kb, vb, perm[:n].contiguous(), perm[n:].contiguous()


def fill_pool(kb, vb, slots, k, v) -> None:
    for layer in range(len(kb)):
        kb[layer][slots] = k[:, layer]
        vb[layer][slots] = v[:, layer]


def gather(bufs, slots) -> torch.Tensor:
    return torch.stack([x[slots] for x in bufs], 1)


def check_codec(b: Bench, tri, kb, vb, enc_slots, dec_slots, k, v, start) -> dict:
    """Triton blob -> reference decode and Triton decode; Triton vs reference relative difference and the
    reconstruction error of each against the original rows. Exact rows must come back bit-exact."""
    n = enc_slots.numel()
    n_head, n_tail = min(4, n // 8), min(128, n // 8)
    blob = tri.encode_slots(kb, vb, enc_slots, start, n_head, n_tail)
    tri.decode_into(blob, kb, vb, dec_slots)
    ref = tri.codec.decode(blob)
    out = {}
    for name, bufs, orig, want in (("k", kb, k, ref.k), ("v", vb, v, ref.v)):
        got = gather(bufs, dec_slots)
        exact_ok = torch.equal(got[:n_head], orig[:n_head]) and torch.equal(got[n - n_tail :], orig[n - n_tail :])
        diff = ((got.float() - want.float()).norm() / want.float().norm()).item()
        mid = slice(n_head, n - n_tail)
        err_t = ((got[mid].float() - orig[mid].float()).norm() / orig[mid].float().norm()).item()
        err_r = ((want[mid].float() - orig[mid].float()).norm() / orig[mid].float().norm()).item()
        out[name] = dict(exact_bit_exact=exact_ok, rel_diff_vs_reference=diff, rel_err_triton=err_t, rel_err_reference=err_r)
        del got
    del ref
    ok = all(o["exact_bit_exact"] and o["rel_diff_vs_reference"] < 3e-3 and o["rel_err_triton"] <= 1.05 * o["rel_err_reference"] + 1e-4
             for o in out.values())
    out["ok"] = ok
    log(f"  check: {'OK' if ok else 'FAILED'} " + ", ".join(
        f"{kk}: exact={o['exact_bit_exact']} diff={o['rel_diff_vs_reference']:.2e} err={o['rel_err_triton']:.4f}/{o['rel_err_reference']:.4f}"
        for kk, o in out.items() if kk != "ok"))
    return out


def bench_rank(b: Bench, art, ratio_key: int, model: dict, kb, vb, enc_slots, dec_slots, k, v, start: int,
               raw_bytes: int, *, full: bool, plan: str | None = None) -> None:
    from kvtc_sglang.codec.codec import KVTCCodec
    from kvtc_sglang.codec.entropy import NoEntropy
    from kvtc_sglang.codec.pool_codec import ReferencePoolCodec
    from kvtc_sglang.codec.triton import TritonPoolCodec

    n = enc_slots.numel()
    codec = KVTCCodec(art, ratio_key, b.dev, entropy="none")
    tri = TritonPoolCodec(codec, chunk_tokens=b.args.chunk_tokens)
    rank = max(bc.plan.rank for kc in codec.kinds.values() for bc in kc.blocks)
    nominal = 16.0 * 2 * codec.p / (8 * codec.coded_bytes_per_token())
    common = dict(rank=rank, tokens=n, model=model["model"], bytes=raw_bytes, plan=plan or f"r{rank}")
    log(f"[{model['model']} plan {ratio_key}: rank {rank}, {codec.coded_bytes_per_token()} B/token, nominal {nominal:.1f}x]")
    chk = check_codec(b, tri, kb, vb, enc_slots, dec_slots, k, v, start)
    b.meta.setdefault("checks", {})[f"{model['model']}:{ratio_key}"] = chk

    payload = tri.encode_payload(kb, vb, enc_slots, start, 0, 0)
    header = tri.payload_header(payload, torch.bfloat16, n, start, 0, 0)
    ratio = raw_bytes / payload.numel()
    ms = b.time_ms(lambda: tri.encode_payload(kb, vb, enc_slots, start, 0, 0))
    b.add(op="encode", impl="triton", entropy="none", ms=ms, ratio=ratio, check="ok" if chk["ok"] else "FAILED", **common)
    ms = b.time_ms(lambda: tri.decode_payload_into(payload, header, kb, vb, dec_slots))
    b.add(op="decode", impl="triton", entropy="none", ms=ms, ratio=ratio, check="ok" if chk["ok"] else "FAILED", **common)
    want = (kb[0][dec_slots].clone(), vb[-1][dec_slots].clone())  # blobs of every coder must decode to these rows
    if full and b.have_time(20):
        def layerwise():
            job = tri.begin_decode_payload(payload, header, dec_slots)
            for layer in range(model["L"]):
                tri.decode_layer_into(job, layer, kb[layer], vb[layer])

        ms = b.time_ms(layerwise)
        b.add(op="decode_layerwise", impl="triton", entropy="none", ms=ms, ratio=ratio, **common)

    coders = [("none+blob", NoEntropy())]
    if b.cuda:
        from kvtc_sglang.codec.nvcomp_coder import NvcompCoder, nvcomp_available

        if nvcomp_available():
            coders += [(name, NvcompCoder(name)) for name in (ENTROPIES if full else ENTROPIES[:1])]
        elif full:
            log("  nvCOMP not importable: entropy rows skipped")
    for name, coder in coders:
        if not b.have_time(15):
            break
        codec.coder = coder
        try:
            blob = tri.encode_slots(kb, vb, enc_slots, start, 0, 0)
            tri.decode_into(blob, kb, vb, dec_slots)
            ms_e = b.time_ms(lambda: tri.encode_slots(kb, vb, enc_slots, start, 0, 0), repeats=max(3, b.args.repeats // 2))
            ms_d = b.time_ms(lambda: tri.decode_into(blob, kb, vb, dec_slots), repeats=max(3, b.args.repeats // 2))
        except Exception as e:  # report and go on: one coder failing must not lose the other rows
            log(f"  {name}: FAILED {type(e).__name__}: {e}")
            b.add(op="encode", impl="triton", entropy=name, ms=None, note=f"failed: {type(e).__name__}: {e}"[:200], **common)
            continue
        r = raw_bytes / blob.numel()
        same = torch.equal(kb[0][dec_slots], want[0]) and torch.equal(vb[-1][dec_slots], want[1])
        if not same:
            log(f"  {name}: decoded rows differ from the payload decode")
            b.meta.setdefault("checks", {})[f"{model['model']}:{ratio_key}:{name}"] = {"ok": False}
        b.add(op="encode", impl="triton", entropy=name, ms=ms_e, ratio=r, check="ok" if same else "FAILED", **common)
        b.add(op="decode", impl="triton", entropy=name, ms=ms_d, ratio=r, check="ok" if same else "FAILED", **common)
        del blob
    codec.coder = NoEntropy()

    if full or b.have_time(60):
        ref = ReferencePoolCodec(codec)
        reps = 1 if b.args.smoke else 3
        ms = b.time_ms(lambda: ref.encode_slots(kb, vb, enc_slots, start, 0, 0), repeats=reps)
        b.add(op="encode", impl="torch-reference", entropy="none+blob", ms=ms, ratio=ratio, **common)
        blob = ref.encode_slots(kb, vb, enc_slots, start, 0, 0)
        ms = b.time_ms(lambda: ref.decode_into(blob, kb, vb, dec_slots), repeats=reps)
        b.add(op="decode", impl="torch-reference", entropy="none+blob", ms=ms, ratio=ratio, **common)
        del blob, ref
    bench_batched(b, codec, model, k, v, start, raw_bytes, common, chk)
    del tri, codec, payload
    if b.cuda:
        torch.cuda.empty_cache()


def bench_batched(b: Bench, codec, model: dict, k, v, start: int, raw_bytes: int, common: dict, chk: dict) -> None:
    """The batched pool codec (what the compressed tier calls): the same tokens as `nodes` jobs in one call,
    payloads written into blob rows of the pool; decode all layers at once and layer by layer. Checked: decoded
    rows as close to the originals as the per-node path's, exact rows bit-exact; no compile after warmup."""
    from kvtc_sglang.codec import launches
    from kvtc_sglang.codec.triton.batched import BatchedPoolCodec
    from kvtc_sglang.codec.jobs import DecodeJob, EncodeJob

    if not b.have_time(30):
        return
    L, H, D = model["L"], model["H"], model["D"]
    n = k.shape[0]
    bc = BatchedPoolCodec(codec, torch.bfloat16, reference=False, chunk_tokens=b.args.chunk_tokens,
                          decode_chunk_tokens=max(8192, n))
    lay_all = bc.blob_layout(n, 0, 0)
    n_slots = 2 * n + lay_all.n_slots + 64 * max(b.args.nodes) + 1
    kb = [torch.zeros(n_slots, H, D, dtype=torch.bfloat16, device=b.dev) for _ in range(L)]
    vb = [torch.zeros(n_slots, H, D, dtype=torch.bfloat16, device=b.dev) for _ in range(L)]
    slots = torch.arange(1, n + 1, device=b.dev)
    dst = torch.arange(n + 1, 2 * n + 1, device=b.dev)
    fill_pool(kb, vb, slots, k, v)
    pool = bc.pool_rows(kb, vb)
    compiles = bc.warmup(pool)
    before = launches.jit_compiles()
    for nodes in b.args.nodes:
        if nodes > n or not b.have_time(20):
            continue
        per = n // nodes
        jobs, djobs, nxt = [], [], 2 * n + 1
        for i in range(nodes):
            m = per if i < nodes - 1 else n - per * (nodes - 1)
            nh = min(4, m) if i == 0 else 0
            lay = bc.blob_layout(m, nh, 0)
            blob_slots = torch.arange(nxt, nxt + lay.n_slots, device=b.dev)
            nxt += lay.n_slots
            rows = pool.rows_of_slots(blob_slots, lay.n_rows)
            jobs.append(EncodeJob(slots[i * per : i * per + m], start + i * per, nh, 0, rows))
            djobs.append(DecodeJob(rows, lay, start + i * per, (0, m), dst[i * per : i * per + m]))
        stored = sum(bc.blob_layout(j.src_slots.numel(), j.n_head, 0).nbytes for j in jobs)
        eb = bc.encode(pool, jobs)

        def all_layers():
            db = bc.decode_begin(pool, djobs)
            bc.decode_layers(db, range(0, L))
            return db

        def layerwise():
            db = bc.decode_begin(pool, djobs)
            for layer in range(L):
                bc.decode_layers(db, range(layer, layer + 1))
            return db

        db = all_layers()
        got_k = gather(kb, dst)
        mid = slice(4, n)
        err = ((got_k[mid].float() - k[mid].float()).norm() / k[mid].float().norm()).item()
        ok = torch.equal(got_k[:4], k[:4]) and err <= 1.05 * chk["k"]["rel_err_triton"] + 1e-3
        b.meta.setdefault("checks", {})[f"{common['model']}:{common['plan']}:batched:{nodes}"] = dict(
            ok=ok, rel_err=err, per_node_rel_err=chk["k"]["rel_err_triton"])
        row = dict(common, impl="triton-batched", entropy="none", nodes=nodes, ratio=raw_bytes / stored,
                   check="ok" if ok else "FAILED")
        ms = b.time_ms(lambda: bc.encode(pool, jobs))
        b.add(op="encode", ms=ms, launches=eb.launches, **row)
        ms = b.time_ms(all_layers)
        b.add(op="decode", ms=ms, launches=db.launches, note="all-layers", **row)
        ms = b.time_ms(layerwise)
        b.add(op="decode_layerwise", ms=ms, launches=layerwise().launches, note="layerwise", **row)
    b.meta.setdefault("batched_compiles", {})[common["plan"]] = dict(
        warmup=compiles, after_warmup=launches.jit_compiles() - before)
    del kb, vb, pool, bc


def tune(b: Bench, art, ratio_key, kb, vb, enc_slots, dec_slots, start) -> None:
    """Try a few launch configs of the two GEMMs at one rank; keep the fastest in gemm.TUNING."""
    from kvtc_sglang.codec.codec import KVTCCodec
    from kvtc_sglang.codec.triton import TritonPoolCodec, gemm

    tri = TritonPoolCodec(KVTCCodec(art, ratio_key, b.dev, entropy="none"), chunk_tokens=b.args.chunk_tokens)
    n = enc_slots.numel()
    payload = tri.encode_payload(kb, vb, enc_slots, start, 0, 0)
    header = tri.payload_header(payload, torch.bfloat16, n, start, 0, 0)
    candidates = {
        "project": [{}, dict(num_stages=4), dict(BN=128, num_warps=4, num_stages=4)],
        "reconstruct_k": [{}, dict(num_stages=4), dict(BM=64, num_warps=4, num_stages=4)],
        "reconstruct_v": [{}, dict(num_stages=4), dict(max_tile_n=128, num_stages=4)],
    }
    results = {}
    for key, cands in candidates.items():
        best = None
        for cand in cands:
            if not b.have_time(40):
                break
            gemm.TUNING[key] = cand
            fn = (lambda: tri.encode_payload(kb, vb, enc_slots, start, 0, 0)) if key == "project" else \
                (lambda: tri.decode_payload_into(payload, header, kb, vb, dec_slots))
            try:
                ms = b.time_ms(fn, repeats=5)
            except Exception as e:  # a config the compiler rejects (e.g. out of shared memory)
                log(f"  tune {key} {cand}: failed ({type(e).__name__})")
                continue
            results.setdefault(key, []).append(dict(config=cand, ms=round(ms, 4)))
            log(f"  tune {key} {cand}: {ms:.3f} ms")
            if best is None or ms < best[1]:
                best = (cand, ms)
        gemm.TUNING[key] = best[0] if best else {}
    b.meta["tuning"] = dict(results=results, chosen={k: v for k, v in gemm.TUNING.items()})
    del tri, payload
    if b.cuda:
        torch.cuda.empty_cache()


def run_synthetic(b: Bench, model: dict) -> None:
    from kvtc_sglang.codec.rope import RopeConfig
    from kvtc_sglang.testing.synthetic import dp_like_plan, synthetic_artifact, synthetic_kv

    L, H, D = model["L"], model["H"], model["D"]
    p, n = L * H * D, b.args.tokens
    rope = RopeConfig(**LLAMA_ROPE) if not b.args.smoke else RopeConfig(head_dim=D, rotary_dim=D, theta=10000.0)
    t = time.time()
    labels: dict[int, str] = {}
    if getattr(b.args, "card_ranks", None):  # plan keys = ratios; ranks from the card, clipped to this model's p
        plans = {}
        for ratio, (rk, rv) in sorted(b.args.card_ranks.items()):
            plans[ratio] = [(dp_like_plan(p, min(rk, p), ratio), dp_like_plan(p, min(rv, p), ratio))]
            labels[ratio] = f"{ratio}x"
        b.meta["plan_ranks"] = {f"{r}x": dict(k=rk, v=rv) for r, (rk, rv) in b.args.card_ranks.items()}
        ranks = list(plans)
    else:
        ranks = [r for r in b.args.ranks if r <= p]
        plans = {r: [(dp_like_plan(p, r, r), dp_like_plan(p, r, r))] for r in ranks}
    art = synthetic_artifact(L, H, D, plans, rope=rope, seed=0, device=b.dev)
    start = 1000
    k, v = synthetic_kv(art, n, start, dtype=torch.bfloat16, device=b.dev, seed=1)
    kb, vb, enc_slots, dec_slots = make_pool(b, model, n)
    fill_pool(kb, vb, enc_slots, k, v)
    log(f"[synthetic artifact and {n} tokens ready in {time.time() - t:.1f}s]")
    raw_bytes = 2 * n * p * 2
    first = 2048 if 2048 in ranks else ranks[0]
    if b.args.tune and b.cuda and b.have_time(120):
        log("[tuning GEMM launch configs]")
        tune(b, art, first, kb, vb, enc_slots, dec_slots, start)
    for r in [first] + [r for r in ranks if r != first]:
        if r != first and not b.have_time(40 + r / 256):
            continue
        bench_rank(b, art, r, model, kb, vb, enc_slots, dec_slots, k, v, start, raw_bytes, full=(r == first),
                   plan=labels.get(r))
        b.save()
    del kb, vb, k, v


def run_artifact(b: Bench, path: str) -> None:
    from kvtc_sglang.codec.artifact import load_artifact
    from kvtc_sglang.testing.synthetic import synthetic_kv

    try:
        art = load_artifact(path)
    except Exception as e:
        log(f"[artifact {path}: not usable ({type(e).__name__}: {e})]")
        b.meta["artifact_error"] = f"{type(e).__name__}: {e}"
        return
    name = str(art.model.get("name", "artifact")).split("/")[-1]
    model = dict(model=name, L=art.num_layers, H=art.num_kv_heads, D=art.head_dim)
    n, p = b.args.tokens, art.p
    start = 1000
    k, v = synthetic_kv(art, n, start, dtype=torch.bfloat16, device=b.dev, seed=2)
    kb, vb, enc_slots, dec_slots = make_pool(b, model, n)
    fill_pool(kb, vb, enc_slots, k, v)
    for ratio in sorted(art.plans):
        if not b.have_time(40):
            break
        bench_rank(b, art, ratio, model, kb, vb, enc_slots, dec_slots, k, v, start, 2 * n * p * 2, full=False)
        b.save()


# ------------------------------------------------------------------ outputs
def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"# Codec speed ({meta.get('gpu')}, commit {str(meta.get('commit'))[:12]})", ""]
    if "gemm_flops_per_s" in meta:
        out.append(f"Measured bf16 GEMM rate: {meta['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s. "
                   "GB/s = raw K+V bytes (pool dtype) / time; ratio = raw KV bytes / stored bytes.")
        out.append("")
    out.append("| op | impl | model | plan | rank | nodes | launches | entropy | tokens | ms | GB/s | ratio | note |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        out.append("| " + " | ".join(str(x) if x is not None else "" for x in (
            r["op"], r["impl"], r.get("model"), r.get("plan"), r.get("rank"), r.get("nodes"), r.get("launches"),
            r.get("entropy"), r.get("tokens"), r.get("ms"), r.get("gbps"), f"{r['ratio']:.2f}" if r.get("ratio") else None,
            r.get("note") or r.get("check"))) + " |")
    return "\n".join(out) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot_or_none()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict = {}
    model = next((r["model"] for r in rows if r["op"] in ("encode", "decode") and r.get("model")), None)
    for r in rows:
        if r["op"] in ("encode", "decode") and r.get("gbps") and r.get("model") == model and r.get("nodes") in (None, 1):
            series.setdefault(f"{r['op']} {r['impl']} {r['entropy']}", []).append((r["rank"], r["gbps"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    for r in rows:
        if r["op"] in ("h2d_copy", "recompute") and r.get("gbps"):
            ax.axhline(r["gbps"], linestyle="--", color="gray" if r["op"] == "h2d_copy" else "red", linewidth=1)
            ax.annotate(f"{r['op']} {r['gbps']:.0f} GB/s", (0.01, r["gbps"]), xycoords=("axes fraction", "data"), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("kept rank r")
    ax.set_ylabel("GB/s of raw KV")
    ax.set_title(f"KVTC codec speed, {model} ({rows[0].get('gpu') if rows else ''})")
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(rows: list[dict]) -> str:
    keep = [r for r in rows if r["op"] in ("h2d_copy", "recompute", "gemm_bf16") or
            (r["op"] in ("encode", "decode", "decode_layerwise") and r.get("entropy") in ("none", "deflate", "none+blob"))]
    lines = [f"{'op':<16} {'impl':<16} {'model':<24} {'rank':>5} {'entropy':<10} {'ms':>9} {'GB/s':>8} {'ratio':>6}"]
    for r in keep:
        lines.append(f"{r['op']:<16} {r['impl']:<16} {str(r.get('model') or ''):<24} {str(r.get('rank') or ''):>5} "
                     f"{str(r.get('entropy') or ''):<10} {str(r.get('ms') if r.get('ms') is not None else '-'):>9} "
                     f"{str(r.get('gbps') if r.get('gbps') is not None else '-'):>8} "
                     f"{(format(r['ratio'], '.1f') if r.get('ratio') else ''):>6}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        if not args.smoke:
            log("codec_speed.py needs a CUDA device (use --smoke for the CPU interpreter run)")
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    b = Bench(args)
    model = SMOKE if args.smoke else LLAMA
    p = model["L"] * model["H"] * model["D"]
    raw_bytes = 2 * args.tokens * p * 2
    log(f"[codec speed on {b.gpu}, commit {b.commit[:12]}, {args.tokens} tokens, {raw_bytes / 2**30:.3f} GiB raw KV]")
    torch.manual_seed(0)
    rate = ceilings(b, model)
    h2d_copy(b, raw_bytes, model)
    recompute(b, raw_bytes, model, rate)
    b.save()
    run_synthetic(b, model)
    if args.artifact:
        if b.have_time(60):
            run_artifact(b, args.artifact)
    b.save()
    log("\n" + summary(b.rows))
    log(f"\n[done in {b.elapsed():.0f}s; results in {b.out}]")
    checks = b.meta.get("checks", {})
    return 0 if all(c.get("ok") for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
