"""The Triton route of the batched pool codec (triton/payload_rows.py) against its PyTorch route.

Without CUDA the kernels run in Triton's CPU interpreter at small shapes (TRITON_INTERPRET=1 set before
Triton is imported; when another module imported Triton first, the CPU cases run in an interpreter
subprocess). Cases marked `gpu` run the same checks with compiled kernels on a CUDA device (skipped, never
passed, without one); `test_gpu_*` add what only a GPU can show (sync debug mode, real compile counts).

On `exact_artifact` (every float operation of the encode exact) the two routes must write identical payload
bytes and CRCs; on random bases the kernels' fp16 GEMM operands may move a coefficient across a rounding
boundary, so there decoded rows are compared within one unit in the last place.
"""

from __future__ import annotations

import importlib
import os
import random
import subprocess
import sys

import torch

_CUDA = torch.cuda.is_available()
_ENV_BEFORE = os.environ.get("TRITON_INTERPRET")
if not _CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kvtc_sglang.codec.triton import gemm, jitlib, payload_rows, pool_codec, quant, rows  # noqa: E402

_IN_PROCESS = _CUDA or isinstance(triton.language.zeros, InterpretedFunction)
if not _CUDA and _IN_PROCESS and not isinstance(payload_rows._copy_rows_kernel, InterpretedFunction):
    for _m in (jitlib, rows, quant, gemm, pool_codec, payload_rows):
        importlib.reload(_m)
if not _IN_PROCESS:
    if _ENV_BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _ENV_BEFORE

from kvtc_sglang.codec import launches  # noqa: E402
from kvtc_sglang.codec.triton.batched import BatchedPoolCodec  # noqa: E402
from kvtc_sglang.codec.triton.batched_reference import gather_rows  # noqa: E402
from kvtc_sglang.codec.codec import KVTCCodec  # noqa: E402
from kvtc_sglang.codec.jobs import DecodeJob, EncodeJob  # noqa: E402
from kvtc_sglang.testing.codec_cases import FP8, Pool, exact_artifact, exact_kv, random_kv, small_artifact  # noqa: E402
from kvtc_sglang.testing.sync_audit import SyncAudit  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.uint8]
DT_IDS = ["bf16", "fp16", "fp8"]
SHAPES = [
    pytest.param((2, 2, 32), id="small"),
    pytest.param((4, 2, 64), id="gpu-4x2x64", marks=pytest.mark.gpu),
    pytest.param((30, 3, 64), id="gpu-smollm2", marks=pytest.mark.gpu),
]
RUNS = [(30, 2, 5, 0), (17, 0, 0, 100), (50, 4, 8, 7), (3, 3, 0, 0), (9, 0, 9, 40), (1, 0, 0, 5)]


@pytest.fixture
def device(request):
    if request.node.get_closest_marker("gpu") is not None and not _CUDA:
        pytest.skip("needs a CUDA device")
    if not _IN_PROCESS:
        pytest.skip("Triton was imported without the interpreter: run by test_interpreter_cases_in_a_subprocess")
    return torch.device("cuda" if _CUDA else "cpu")


def test_interpreter_cases_in_a_subprocess():
    if _IN_PROCESS:
        pytest.skip("the interpreter cases run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", __file__],
                          env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


_ARTS: dict = {}


def _art(shape, kind):
    key = (shape, kind)
    if key not in _ARTS:
        L, H, D = shape
        if kind == "exact":
            _ARTS[key] = exact_artifact(L, H, D, n_blocks=2, rank=min(48, H * D), seed=3)
        else:
            _ARTS[key] = small_artifact(L, H, D, n_blocks=2, seed=3, device="cuda" if _CUDA else "cpu")
    return _ARTS[key]


def _kv(art, n, start, dtype, seed, device):
    if art.model["name"].startswith("exact"):
        return exact_kv(art, n, dtype=dtype, seed=seed, device=device)
    return random_kv(art, n, start, dtype=dtype, seed=seed, device=device)


def _world(art, dtype, device, runs, *, page_size=1, seed=0, scratch_rows=0, **codec_kw):
    """Both routes, each with its own identical pool holding the runs, and the runs' encode jobs."""
    L, H, D = art.num_layers, art.num_kv_heads, art.head_dim
    codec = KVTCCodec(art, 1, device, entropy="none")
    kvd = FP8 if dtype == torch.uint8 else None
    out = []
    for ref in (True, False):
        bc = BatchedPoolCodec(codec, dtype, kvd, reference=ref, **codec_kw)
        need = sum(8 * (n + page_size) + bc.blob_layout(n, nh, nt).n_slots + page_size for n, nh, nt, _ in runs)
        pool = Pool(L, H, D, need // page_size + 8, dtype, page_size=page_size, seed=seed, device=device)
        pr = bc.pool_rows(pool.k, pool.v, scratch_rows=scratch_rows)
        jobs = []
        for i, (n, nh, nt, start) in enumerate(runs):
            slots = pool.alloc_tokens(n)
            pool.write(slots, *_kv(art, n, start, dtype, seed * 100 + i, device))
            lay = bc.blob_layout(n, nh, nt)
            rows = pr.rows_of_slots(pool.alloc_pages(lay.n_pages(page_size)), lay.n_rows)
            jobs.append(EncodeJob(slots, start, nh, nt, rows, torch.zeros(1, dtype=torch.int64, device=device)))
        out.append((bc, pool, pr, jobs))
    return out


def _payloads(pr, jobs, layouts):
    return [gather_rows(pr, j.dst_rows).reshape(-1)[: lay.nbytes] for j, lay in zip(jobs, layouts)]


def _logical(t, dtype):
    return t.view(FP8).float() if dtype == torch.uint8 else t.float()


# ----------------------------------------------------------------------------------------------- encode
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_encode_payload_bytes_and_crc_equal_the_pytorch_route(shape, dtype, device):
    art = _art(shape, "exact")
    (rbc, rpool, rpr, rjobs), (tbc, tpool, tpr, tjobs) = _world(art, dtype, device, RUNS, seed=2)
    rb, tb = rbc.encode(rpr, rjobs), tbc.encode(tpr, tjobs)
    assert tb.launches == rb.launches
    for a, b in zip(_payloads(rpr, rjobs, rb.layouts), _payloads(tpr, tjobs, tb.layouts)):
        assert torch.equal(a, b)
    assert torch.equal(tb.crc, rb.crc)
    assert [int(j.crc_out[0]) for j in tjobs] == tb.crc.tolist()
    for buf_r, buf_t in zip(rpool.k + rpool.v, tpool.k + tpool.v):  # nothing else written differently
        assert torch.equal(buf_r.view(torch.uint8), buf_t.view(torch.uint8))


@pytest.mark.parametrize("page_size", [16, 64])
def test_encode_with_paged_blob_slots(page_size, device):
    art = _art((2, 2, 32), "exact")
    (rbc, _, rpr, rjobs), (tbc, _, tpr, tjobs) = _world(art, torch.bfloat16, device, RUNS[:3], page_size=page_size)
    rb, tb = rbc.encode(rpr, rjobs), tbc.encode(tpr, tjobs)
    for a, b in zip(_payloads(rpr, rjobs, rb.layouts), _payloads(tpr, tjobs, tb.layouts)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("clip", [False, True], ids=["minmax", "clipped"])
def test_quantize_rows_matches_reference_on_random_coefficients(clip, device):
    """group_params_rows + pack_rows vs the PyTorch records on random coefficients (ties, constant groups):
    identical bytes for min/max ranges; clipped ranges (one-pass mean/std in the kernel) agree to within one
    fp16 step on >= 98% of bytes."""
    from kvtc_sglang.codec import batch_plan as bp
    from kvtc_sglang.codec.triton import batched_reference as ref

    art = small_artifact(2, 2, 32, seed=5, clip=clip)
    (rbc, _, rpr, rjobs), (tbc, _, tpr, tjobs) = _world(art, torch.bfloat16, device, RUNS[:3], seed=4)
    g = torch.Generator().manual_seed(7)
    layouts = [tbc.blob_layout(j.src_slots.numel(), j.n_head, j.n_tail) for j in tjobs]
    plans = [bp.plan_encode(js, layouts, pr.crc_segment, device) for js, pr in ((rjobs, rpr), (tjobs, tpr))]
    M = plans[0].n_rows
    st = ref.begin_encode(rpr, plans[0])
    for kt in tbc.kinds:
        for bt in kt.blocks:
            c = (torch.randn(128 * 2, bt.r_enc, generator=g) * 3).to(device)
            grp = bt.coder.plan.groups[len(bt.coder.plan.groups) // 2]
            c[0, grp.start : grp.start + grp.size] = 1.25  # constant group: scale 0
            params = torch.zeros(2, bt.n_groups, 256, device=device)
            s = tbc.section_of[kt.kind, bt.index]
            payload_rows.quantize(tpr, plans[1], None, bt, s, c, params, 0, M)
            ref.quantize(rpr, plans[0], st, bt, s, c, params.clone(), 0, M)
    ref.finish_encode(rpr, plans[0], st)
    for lay, rj, tj in zip(layouts, rjobs, tjobs):
        a = gather_rows(rpr, rj.dst_rows).reshape(-1)[lay.exact_bytes : lay.nbytes]
        b = gather_rows(tpr, tj.dst_rows).reshape(-1)[lay.exact_bytes : lay.nbytes]
        if clip:
            assert float((a == b).float().mean()) >= 0.98
        else:
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- decode
# pool dtype -> (rtol, atol as a fraction of the rows' RMS, max ||delta|| / ||ref||): the decode GEMM takes fp16
# coefficients and fp16 basis / scale (fp32 accumulation) where the reference uses float32 (one unit in the last
# place of the pool dtype at most)
DECODE_TOL = {torch.bfloat16: (2.0**-7, 2.0**-8, 2e-3), torch.float16: (2.0**-9, 2.0**-9, 1e-3),
              torch.uint8: (2.0**-3, 2.0**-6, 3e-2)}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_decode_ranges_and_layer_groups_match_the_pytorch_route(shape, dtype, device):
    """The same stored payloads (encoded once, pools then identical) decoded by both routes, any token range,
    layer groups in any order: exact rows bit-identical, coded rows within DECODE_TOL."""
    art = _art(shape, "random")
    L = shape[0]
    (rbc, rpool, rpr, rjobs), (tbc, tpool, tpr, tjobs) = _world(art, dtype, device, RUNS, seed=6)
    batch = rbc.encode(rpr, rjobs)
    for dst, src in zip(tpool.k + tpool.v, rpool.k + rpool.v):
        dst.copy_(src)
    outs = []
    for bc, pool, pr, jobs in ((rbc, rpool, rpr, rjobs), (tbc, tpool, tpr, tjobs)):
        djobs = []
        for j, lay in zip(jobs, batch.layouts):
            n = lay.n_tokens
            for a, b in sorted({(0, n), (1, max(1, n - 1)), (lay.n_head, n), (0, lay.n_head)}):
                djobs.append(DecodeJob(j.dst_rows, lay, j.start_pos, (a, b), pool.alloc_tokens(b - a)))
        db = bc.decode_begin(pr, djobs)
        for gr in ([range(L - 1, L), range(0, L - 1)] if L > 1 else [range(0, 1)]):
            bc.decode_layers(db, gr)
        assert db.complete
        outs.append([(dj, pool.read(dj.dst_slots)) for dj in djobs])
    rtol, atol_rel, norm_rel = DECODE_TOL[dtype]
    for (dj, (kr, vr)), (_, (kt, vt)) in zip(*outs):
        tr = dj.layout.clip_range(*dj.token_range)
        ex = list(range(tr.head_n)) + list(range(tr.tail_dst0, tr.tail_dst0 + tr.tail_n))
        assert torch.equal(kr[ex].view(torch.uint8), kt[ex].view(torch.uint8))
        assert torch.equal(vr[ex].view(torch.uint8), vt[ex].view(torch.uint8))
        for r, t in ((kr, kt), (vr, vt)):
            rf, tf = _logical(r, dtype), _logical(t, dtype)
            assert torch.isfinite(tf).all()
            if rf.numel():
                rms = float(rf.pow(2).mean().sqrt())
                torch.testing.assert_close(tf, rf, rtol=rtol, atol=atol_rel * rms)
                assert (tf - rf).norm() <= norm_rel * rf.norm() + 1e-6
    for a, b in zip(rpool.k + rpool.v, tpool.k + tpool.v):
        written = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
        for dj, _ in outs[0]:
            written[dj.dst_slots] = True
        assert torch.equal(a[~written].view(torch.uint8), b[~written].view(torch.uint8))


def test_scratch_encode_copy_rows_and_crc_recompute(device):
    art = _art((2, 2, 32), "exact")
    worlds = _world(art, torch.bfloat16, device, [(60, 4, 8, 17)], scratch_rows=256)
    got = []
    for bc, pool, pr, jobs in worlds:
        j = jobs[0]
        lay = bc.blob_layout(60, 4, 8)
        scratch = pr.scratch_addresses(0, lay.n_rows)
        b = bc.encode(pr, [EncodeJob(j.src_slots, 17, 4, 8, scratch)])
        own = pr.rows_of_slots(j.src_slots[: lay.n_slots], lay.n_rows)
        bc.copy_rows(pr, scratch, own)
        crc = bc.payload_crc(pr, own, lay)
        assert int(crc[0]) == int(b.crc[0])
        flat = bc.read_payload(pr, own, lay)
        assert torch.equal(flat, gather_rows(pr, own).reshape(-1)[: lay.nbytes])
        again = pr.rows_of_slots(pool.alloc_pages(lay.n_slots), lay.n_rows)
        bc.write_payload(pr, flat, again, lay)
        assert torch.equal(gather_rows(pr, again).reshape(-1)[: lay.nbytes], flat)
        got.append(flat)
    assert torch.equal(got[0], got[1])


# ----------------------------------------------------------------------------------------------- launches, compiles
def test_launch_count_does_not_depend_on_the_number_of_jobs(device, monkeypatch):
    """Every Triton launch is counted (a wrapper around the launcher sees each one); a batch of 1 job and one of
    6 jobs with the same total tokens make the same launches, kernel by kernel."""
    from triton.runtime.jit import KernelInterface

    seen = []
    orig = KernelInterface.__getitem__
    monkeypatch.setattr(KernelInterface, "__getitem__", lambda self, grid: (seen.append(self), orig(self, grid))[1])
    art = _art((2, 2, 32), "random")
    per = []
    for runs in ([(120, 2, 8, 0)], [(20, 2, 8, 30 * i) for i in range(6)]):
        (_, _, _, _), (bc, pool, pr, jobs) = _world(art, torch.bfloat16, device, runs, seed=3)
        before, seen[:] = launches.LAUNCHES.snapshot(), []
        eb = bc.encode(pr, jobs)
        djobs = [DecodeJob(j.dst_rows, lay, j.start_pos, (1, lay.n_tokens), pool.alloc_tokens(lay.n_tokens - 1))
                 for j, lay in zip(jobs, eb.layouts)]
        db = bc.decode_begin(pr, djobs)
        bc.decode_layers(db, range(0, 1))
        bc.decode_layers(db, range(1, 2))
        after = launches.LAUNCHES.snapshot()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
        assert len(seen) == sum(delta.values()) == eb.launches + db.launches
        per.append(delta)
    assert per[0] == per[1], per
    assert per[0]["crc32_rows"] == 1 and per[0]["gather_exact_rows"] == 1 and per[0]["scatter_exact_rows"] == 2


def test_no_new_kernel_variant_after_warmup(device):
    """warmup() runs every variant; then batches of other sizes, job counts, offsets, partial ranges, layer
    groups, chunk boundaries, scratch rows and page sizes reuse them (specialization keys computed with
    Triton's own binder; on a GPU also Triton's compile hook)."""
    art = _art((2, 2, 32), "random")
    codec = KVTCCodec(art, 1, device, entropy="none")
    bc = BatchedPoolCodec(codec, torch.bfloat16, reference=False, chunk_tokens=128, decode_chunk_tokens=128)
    pool = Pool(2, 2, 32, 3000, torch.bfloat16, page_size=1, seed=1, device=device)
    pr = bc.pool_rows(pool.k, pool.v, scratch_rows=200)
    launches.SPECIALIZATIONS.active = True
    try:
        launches.SPECIALIZATIONS.keys.clear()
        compiled = bc.warmup(pr)
        keys = set(launches.SPECIALIZATIONS.keys)
        assert keys and (compiled > 0 or not _CUDA)
        before = launches.jit_compiles()
        rng = random.Random(0)
        for step in range(3):
            runs = [(rng.randrange(1, 200), rng.randrange(0, 4), rng.randrange(0, 20), rng.randrange(0, 5000))
                    for _ in range(rng.randrange(1, 5))]
            runs = [(n, min(nh, n), min(nt, n - min(nh, n)), s) for n, nh, nt, s in runs]
            jobs = []
            for i, (n, nh, nt, start) in enumerate(runs):
                slots = pool.alloc_tokens(n + 1)[step % 2 :][:n]  # views at varying offsets
                pool.write(slots, *random_kv(art, n, start, seed=step * 10 + i, device=device))
                lay = bc.blob_layout(n, nh, nt)
                if i == 0 and step % 2 == 0 and lay.n_rows <= 200:
                    rows = pr.scratch_addresses(rng.randrange(0, 200 - lay.n_rows + 1), lay.n_rows)
                else:
                    rows = pr.rows_of_slots(pool.alloc_pages(lay.n_slots), lay.n_rows)
                jobs.append(EncodeJob(slots, start, nh, nt, rows))
            eb = bc.encode(pr, jobs)
            djobs = []
            for j, lay in zip(jobs, eb.layouts):
                a = rng.randrange(0, lay.n_tokens + 1)
                b = rng.randrange(a, lay.n_tokens + 1)
                dst = pool.alloc_tokens(b - a + 1)[1:]
                djobs.append(DecodeJob(j.dst_rows, lay, j.start_pos, (a, b), dst))
            db = bc.decode_begin(pr, djobs)
            bc.decode_layers(db, range(1, 2))
            bc.decode_layers(db, range(0, 1))
            bc.copy_rows(pr, jobs[0].dst_rows[1:], jobs[0].dst_rows[1:])
        new = launches.SPECIALIZATIONS.keys - keys
        assert not new, sorted(k[0] for k in new)
        assert launches.jit_compiles() == before
    finally:
        launches.SPECIALIZATIONS.active = False


def test_triton_route_never_reads_device_tensors_on_the_host(device):
    art = _art((2, 2, 32), "random")
    _, (bc, pool, pr, jobs) = _world(art, torch.uint8, device, RUNS, seed=9)
    import kvtc_sglang.codec.crc32 as crc32
    import kvtc_sglang.codec.triton.tables as tables
    from kvtc_sglang.codec.artifact import CalibrationArtifact, FeatureBlock
    from kvtc_sglang.codec.plan import BitPlan, PlanLayout

    for _ in range(2):  # cold, warm
        djobs = [DecodeJob(j.dst_rows, bc.blob_layout(j.src_slots.numel(), j.n_head, j.n_tail), j.start_pos,
                           (0, j.src_slots.numel()), pool.alloc_tokens(j.src_slots.numel())) for j in jobs]
        with SyncAudit() as audit:
            audit.mark(pool.k, pool.v, pr, bc, crc32._DEVICE_TABLES, tables._INV_FREQ, payload_rows._TABLES,
                       jobs, djobs, skip_types=(CalibrationArtifact, FeatureBlock, BitPlan, PlanLayout, KVTCCodec))
            bc.encode(pr, jobs)
            db = bc.decode_begin(pr, djobs)
            bc.decode_layers(db, range(0, 2))
            bc.copy_rows(pr, jobs[0].dst_rows[:1], jobs[0].dst_rows[:1])
        assert audit.violations == []
        assert audit.launches > 10


# ----------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_gpu_encode_decode_never_synchronize(device):
    """After warmup, a batch of encodes and a layer-wise decode run with CUDA's sync debug mode set to error."""
    art = _art((2, 2, 32), "random")
    _, (bc, pool, pr, jobs) = _world(art, torch.bfloat16, device, RUNS, seed=1)
    bc.warmup(pr)
    eb = bc.encode(pr, jobs)
    djobs = [DecodeJob(j.dst_rows, lay, j.start_pos, (0, lay.n_tokens), pool.alloc_tokens(lay.n_tokens))
             for j, lay in zip(jobs, eb.layouts)]
    torch.cuda.synchronize()
    busy = torch.randn(4096, 4096, device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):  # keep the GPU busy, as a forward pass would
            busy = busy @ busy / 64
        bc.encode(pr, jobs)
        db = bc.decode_begin(pr, djobs)
        for layer in range(2):
            bc.decode_layers(db, range(layer, layer + 1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 8, 128), (30, 3, 64)], ids=["llama8b", "smollm2"])
def test_gpu_real_shapes_warmup_then_zero_compiles(shape, device):
    art = _art(shape, "random")
    codec = KVTCCodec(art, 1, device, entropy="none")
    bc = BatchedPoolCodec(codec, torch.bfloat16, reference=False)
    pool = Pool(*shape, 12000, torch.bfloat16, device=device)  # never freed: room for the three batches
    pr = bc.pool_rows(pool.k, pool.v)
    bc.warmup(pr)
    before = launches.jit_compiles()
    for n_jobs, n in ((1, 2000), (7, 300), (3, 17)):
        jobs = []
        for i in range(n_jobs):
            slots = pool.alloc_tokens(n)
            lay = bc.blob_layout(n, 4, min(32, n - 4))
            jobs.append(EncodeJob(slots, 100 * i, 4, min(32, n - 4), pr.rows_of_slots(pool.alloc_pages(lay.n_slots),
                                                                                    lay.n_rows)))
        eb = bc.encode(pr, jobs)
        db = bc.decode_begin(pr, [DecodeJob(j.dst_rows, lay, j.start_pos, (3, lay.n_tokens), pool.alloc_tokens(n - 3))
                                  for j, lay in zip(jobs, eb.layouts)])
        for layer in range(shape[0]):
            bc.decode_layers(db, range(layer, layer + 1))
    torch.cuda.synchronize()
    assert launches.jit_compiles() == before
