"""The batched pool codec contract (codec/triton/batched.py) on its PyTorch route, against the reference KVTCCodec.

The reference KVTCCodec (tokens in, framed blob out) is the oracle: the batched codec must write the same
payload bytes into blob rows scattered over a pool (any page size, any dtype including fp8 bytes), give the
zlib CRC-32 of them, and decode any token range, layer range by layer range, to the same rows. Byte-for-byte
comparisons use `exact_artifact` (signed-permutation bases, grid-valued KV: every float operation is exact,
so the batch's GEMM shapes cannot change a rounding); behavioural tests use random bases and clipping. Around that:
no host reads of device-side tensors (SyncAudit), launch and torch-call counts that do not depend on the
number of jobs, chunking, scratch rows, and typed errors for bad jobs.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from kvtc_sglang.codec.triton.batched import BatchedPoolCodec
from kvtc_sglang.codec.triton.batched_reference import gather_rows
from kvtc_sglang.codec.codec import KVTCCodec
from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.jobs import DecodeJob, EncodeJob
from kvtc_sglang.testing.codec_cases import FP8, Pool, exact_artifact, exact_kv, random_kv, small_artifact
from kvtc_sglang.testing.sync_audit import SyncAudit

DTYPES = [torch.bfloat16, torch.float16, torch.uint8]
DT_IDS = ["bf16", "fp16", "fp8"]
L, H, D = 2, 2, 32

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def art():
    """Exact arithmetic: byte-for-byte comparisons with the reference codec."""
    return exact_artifact(L, H, D, seed=3)


@pytest.fixture(scope="module")
def rnd():
    """Random bases, random plans, clipping: behaviour."""
    return small_artifact(L, H, D, seed=3)


def _kv(art, n, start, dtype, seed):
    if art.model["name"].startswith("exact"):
        return exact_kv(art, n, dtype=dtype, seed=seed)
    return random_kv(art, n, start, dtype=dtype, seed=seed)


def _codec(art, dtype, **kw):
    codec = KVTCCodec(art, 1, "cpu", entropy="none")
    return codec, BatchedPoolCodec(codec, dtype, FP8 if dtype == torch.uint8 else None, reference=True, **kw)


def _setup(art, dtype, runs, *, page_size=1, n_pages=None, seed=0, codec_kw=None):
    """A pool holding `runs` [(n, n_head, n_tail, start)], their encode jobs and blob slots (and room for
    several decodes of every run)."""
    codec, bc = _codec(art, dtype, **(codec_kw or {}))
    need = sum(8 * (n + page_size) + bc.blob_layout(n, nh, nt).n_slots + page_size for n, nh, nt, _ in runs)
    pool = Pool(L, H, D, n_pages or (need // page_size + 8), dtype, page_size=page_size, seed=seed)
    pr = bc.pool_rows(pool.k, pool.v)
    jobs, kvs = [], []
    for i, (n, nh, nt, start) in enumerate(runs):
        slots = pool.alloc_tokens(n)
        k, v = _kv(art, n, start, dtype, seed * 100 + i)
        pool.write(slots, k, v)
        lay = bc.blob_layout(n, nh, nt)
        blob_slots = pool.alloc_pages(lay.n_pages(page_size))
        jobs.append(EncodeJob(slots, start, nh, nt, pr.rows_of_slots(blob_slots, lay.n_rows),
                              torch.full((1,), -1, dtype=torch.int64)))
        kvs.append((k, v))
    return codec, bc, pool, pr, jobs, kvs


def _reference_payload(codec, k, v, job, dtype):
    blob = codec.encode(k, v, job.start_pos, job.n_head, job.n_tail, coded_view=FP8 if dtype == torch.uint8 else None)
    return codec.payload(blob, codec.read_header(blob)), blob


RUNS = [(30, 2, 5, 0), (17, 0, 0, 100), (50, 4, 8, 7), (3, 3, 0, 0), (9, 0, 9, 40), (1, 0, 0, 5)]


# ----------------------------------------------------------------------------------------------- layout
def test_blob_layout_is_host_arithmetic_and_consistent(art):
    _, bc = _codec(art, torch.bfloat16)
    with SyncAudit() as audit:
        lay = bc.blob_layout(1000, 4, 32)
    assert sum(audit.calls.values()) == 0  # no tensor work at all
    row = H * D * 2
    assert lay.row_bytes == row and lay.exact_bytes == 36 * 2 * L * row and lay.n_coded == 964
    end = lay.exact_bytes
    for s in lay.sections:
        assert s.offset == end and s.nbytes == 964 * s.bytes_per_token
        end += s.nbytes
    assert lay.nbytes == end == 36 * 2 * L * row + 964 * KVTCCodec(art, 1, "cpu").coded_bytes_per_token()
    assert lay.n_rows == -(-lay.nbytes // row) and lay.n_slots == -(-lay.n_rows // (2 * L))
    for P in (1, 16, 64):
        assert lay.n_pages(P) * P >= lay.n_slots > (lay.n_pages(P) - 1) * P
        assert 0 <= lay.tail_waste_bytes(P) < P * 2 * L * row
    assert lay.exact_row(3, 1, 1) == 3 * 2 * L + L + 1
    with pytest.raises(ShapeError):
        bc.blob_layout(10, 8, 3)


# ----------------------------------------------------------------------------------------------- encode
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_encode_writes_the_reference_payload_into_blob_rows(art, dtype, page_size):
    runs = RUNS if page_size == 1 else RUNS[:3]
    codec, bc, pool, pr, jobs, kvs = _setup(art, dtype, runs, page_size=page_size, seed=page_size)
    before = pool.snapshot()
    batch = bc.encode(pr, jobs)
    written = set()
    for job, lay, (k, v) in zip(jobs, batch.layouts, kvs):
        want, _ = _reference_payload(codec, k, v, job, dtype)
        got = gather_rows(pr, job.dst_rows).view(-1)
        assert lay.nbytes == want.numel()
        assert torch.equal(got[: lay.nbytes], want)
        crc = zlib.crc32(want.numpy().tobytes())
        assert int(job.crc_out[0]) == crc
        written.update(job.dst_rows.tolist())
    assert batch.crc.tolist() == [int(j.crc_out[0]) for j in jobs]
    # nothing else changed: other rows, and the bytes past each payload in its last row
    after = pool.snapshot()
    nb = 2 * L
    for b in range(nb):
        changed = (after[b].view(torch.uint8) != before[b].view(torch.uint8)).view(after[b].shape[0], -1).any(1)
        changed = changed.nonzero().flatten().tolist()
        assert all(s * nb + b in written for s in changed)
    for job, lay in zip(jobs, batch.layouts):
        last = int(job.dst_rows[-1])
        used = lay.nbytes - (lay.n_rows - 1) * lay.row_bytes
        buf = before[last % nb].view(torch.uint8).view(-1, lay.row_bytes)[last // nb]
        assert torch.equal(gather_rows(pr, job.dst_rows[-1:]).view(-1)[used:], buf[used:])


def test_chunked_encode_equals_one_chunk(art):
    runs = [(300, 2, 10, 3), (90, 0, 0, 11)]
    _, bc1, _, pr1, jobs1, _ = _setup(art, torch.bfloat16, runs, seed=5)
    _, bc2, _, pr2, jobs2, _ = _setup(art, torch.bfloat16, runs, seed=5, codec_kw=dict(chunk_tokens=128))
    b1, b2 = bc1.encode(pr1, jobs1), bc2.encode(pr2, jobs2)
    assert b2.launches > b1.launches  # 3 chunks
    for j1, j2, lay in zip(jobs1, jobs2, b1.layouts):
        assert torch.equal(gather_rows(pr1, j1.dst_rows).view(-1)[: lay.nbytes],
                           gather_rows(pr2, j2.dst_rows).view(-1)[: lay.nbytes])
    assert torch.equal(b1.crc, b2.crc)


# ----------------------------------------------------------------------------------------------- decode
def _ranges(n, nh, nt):
    m = n - nh - nt
    out = {(0, n), (0, 0), (n, n)}
    if n > 2:
        out |= {(1, n - 1), (n // 2, n)}
    if nh:
        out.add((0, nh))
    if nt:
        out.add((n - nt, n))
    if m:
        out.add((nh, nh + m))
        out.add((nh + m // 2, nh + m))
    return sorted(out)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_any_token_range_equals_reference_decode(art, dtype, page_size):
    codec, bc, pool, pr, jobs, kvs = _setup(art, dtype, RUNS, page_size=page_size, seed=11)
    batch = bc.encode(pr, jobs)
    djobs, want = [], []
    for job, lay, (k, v) in zip(jobs, batch.layouts, kvs):
        _, blob = _reference_payload(codec, k, v, job, dtype)
        for a, b in _ranges(lay.n_tokens, lay.n_head, lay.n_tail):
            dst = pool.alloc_tokens(b - a) if b > a else torch.zeros(0, dtype=torch.int64)
            djobs.append(DecodeJob(job.dst_rows, lay, job.start_pos, (a, b), dst))
            want.append(codec.decode(blob, token_range=(a, b), out_dtype=FP8 if dtype == torch.uint8 else None))
    untouched = pool.snapshot()
    dbatch = bc.decode_begin(pr, djobs)
    order = list(range(L))
    random.Random(2).shuffle(order)
    for layer in order:
        bc.decode_layers(dbatch, range(layer, layer + 1))
    assert dbatch.complete and dbatch.state is None
    dst_all = set()
    for dj, w in zip(djobs, want):
        k, v = pool.read(dj.dst_slots)
        wk, wv = (w.k.view(torch.uint8), w.v.view(torch.uint8)) if dtype == torch.uint8 else (w.k, w.v)
        assert torch.equal(k, wk) and torch.equal(v, wv)
        dst_all.update(dj.dst_slots.tolist())
    keep = torch.ones(pool.k[0].shape[0], dtype=torch.bool)
    keep[list(dst_all)] = False
    for buf, old in zip(pool.k + pool.v, untouched):  # bytes: blob rows viewed as bf16 hold NaN patterns
        assert torch.equal(buf[keep].view(torch.uint8), old[keep].view(torch.uint8))


def test_layer_groups_and_all_layers_write_the_same_rows():
    art4 = small_artifact(4, H, D, n_blocks=2, seed=4)
    codec = KVTCCodec(art4, 1, "cpu", entropy="none")
    bc = BatchedPoolCodec(codec, torch.bfloat16, reference=True)
    pools = [Pool(4, H, D, 200, torch.bfloat16, seed=1) for _ in range(2)]
    outs = []
    for pool, groups in zip(pools, ([range(0, 4)], [range(2, 3), range(0, 2), range(3, 4)])):
        pr = bc.pool_rows(pool.k, pool.v)
        slots = torch.arange(1, 41)
        k, v = random_kv(art4, 40, 9, seed=1)
        pool.write(slots, k, v)
        lay = bc.blob_layout(40, 2, 6)
        rows = pr.rows_of_slots(torch.arange(50, 50 + lay.n_slots), lay.n_rows)
        bc.encode(pr, [EncodeJob(slots, 9, 2, 6, rows)])
        dst = torch.arange(120, 157)
        batch = bc.decode_begin(pr, [DecodeJob(rows, lay, 9, (2, 39), dst)])
        for gr in groups:
            bc.decode_layers(batch, gr)
        outs.append(pool.read(dst))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_large_decode_batch_is_chunked(art):
    runs = [(300, 2, 10, 3), (200, 0, 0, 11)]
    codec, bc, pool, pr, jobs, kvs = _setup(art, torch.bfloat16, runs, seed=6,
                                            codec_kw=dict(decode_chunk_tokens=128))
    batch = bc.encode(pr, jobs)
    djobs = [DecodeJob(j.dst_rows, lay, j.start_pos, (0, lay.n_tokens), pool.alloc_tokens(lay.n_tokens))
             for j, lay in zip(jobs, batch.layouts)]
    db = bc.decode_begin(pr, djobs)
    assert not db.state.unpacked
    bc.decode_layers(db, range(0, 1))
    bc.decode_layers(db, range(1, 2))
    for dj, (k, v), job in zip(djobs, kvs, jobs):
        _, blob = _reference_payload(codec, k, v, job, torch.bfloat16)
        w = codec.decode(blob)
        got = pool.read(dj.dst_slots)
        assert torch.equal(got[0], w.k) and torch.equal(got[1], w.v)


def test_two_open_decode_batches_do_not_share_a_workspace(rnd):
    codec, bc, pool, pr, jobs, kvs = _setup(rnd, torch.bfloat16, RUNS[:2], seed=8)
    batch = bc.encode(pr, jobs)
    djobs = [DecodeJob(j.dst_rows, lay, j.start_pos, (0, lay.n_tokens), pool.alloc_tokens(lay.n_tokens))
             for j, lay in zip(jobs, batch.layouts)]
    b1 = bc.decode_begin(pr, djobs[:1])
    b2 = bc.decode_begin(pr, djobs[1:])
    assert b1.state.ws is not b2.state.ws
    bc.decode_layers(b2, range(0, L))
    bc.decode_layers(b1, range(0, L))
    for dj, (k, v) in zip(djobs, kvs):
        got = pool.read(dj.dst_slots)
        # values decoded from the right blob: close to the originals (coded), equal on exact rows
        lay = dj.layout
        assert torch.equal(got[0][: lay.n_head], k[: lay.n_head])
        err = (got[0].float() - k.float()).norm() / k.float().norm()
        assert err < 0.5
    with pytest.raises(ShapeError):
        bc.decode_layers(b1, range(0, 1))


# ----------------------------------------------------------------------------------------------- scratch
def test_encode_into_scratch_then_copy_rows_into_the_nodes_own_slots(art):
    codec, bc = _codec(art, torch.bfloat16)
    pool = Pool(L, H, D, 200, torch.bfloat16, seed=2)
    lay = bc.blob_layout(60, 4, 8)
    pr = bc.pool_rows(pool.k, pool.v, scratch_rows=lay.n_rows)
    slots = pool.alloc_tokens(60)
    k, v = random_kv(art, 60, 17, seed=2)
    pool.write(slots, k, v)
    scratch = pr.scratch_addresses(0, lay.n_rows)
    bc.encode(pr, [EncodeJob(slots, 17, 4, 8, scratch)])
    own = pr.rows_of_slots(slots[: lay.n_slots], lay.n_rows)  # the node's first slots receive its blob
    bc.copy_rows(pr, scratch, own)
    dst = pool.alloc_tokens(60)
    batch = bc.decode_begin(pr, [DecodeJob(own, lay, 17, (0, 60), dst)])
    bc.decode_layers(batch, range(0, L))
    w = codec.decode(codec.encode(k, v, 17, 4, 8))
    got = pool.read(dst)
    assert torch.equal(got[0], w.k) and torch.equal(got[1], w.v)
    assert int(bc.payload_crc(pr, own, lay)[0]) == int(bc.payload_crc(pr, scratch, lay)[0])


# ----------------------------------------------------------------------------------------------- hot-path properties
def _audit_roots(bc, pool, pr, jobs):
    import kvtc_sglang.codec.crc32 as crc32
    import kvtc_sglang.codec.triton.tables as tables
    from kvtc_sglang.codec.artifact import CalibrationArtifact, FeatureBlock
    from kvtc_sglang.codec.plan import BitPlan, PlanLayout

    skip = (CalibrationArtifact, FeatureBlock, BitPlan, PlanLayout, KVTCCodec)
    return dict(roots=(pool.k, pool.v, pr, bc, crc32._DEVICE_TABLES, tables._INV_FREQ, jobs), skip_types=skip)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8], ids=["bf16", "fp8"])
def test_encode_and_decode_never_read_device_tensors_on_the_host(rnd, dtype):
    """Cold (first call: workspaces, tables) and warm, encode + decode + copy make no host read of anything
    derived from the pool or the jobs, and no pageable host-to-device copy."""
    codec, bc, pool, pr, jobs, kvs = _setup(rnd, dtype, RUNS, seed=21)
    lay0 = bc.blob_layout(30, 2, 5)
    for _ in range(2):
        djobs = [DecodeJob(j.dst_rows, bc.blob_layout(j.src_slots.numel(), j.n_head, j.n_tail), j.start_pos,
                           (0, j.src_slots.numel()), pool.alloc_tokens(j.src_slots.numel())) for j in jobs]
        roots = _audit_roots(bc, pool, pr, jobs + djobs)
        with SyncAudit() as audit:
            audit.mark(*roots["roots"], skip_types=roots["skip_types"])
            bc.encode(pr, jobs)
            batch = bc.decode_begin(pr, djobs)
            bc.decode_layers(batch, range(0, 1))
            bc.decode_layers(batch, range(1, L))
            bc.copy_rows(pr, jobs[0].dst_rows[:2], jobs[0].dst_rows[:2])
            bc.payload_crc(pr, jobs[0].dst_rows, lay0)
        assert audit.violations == []
        assert sum(audit.calls.values()) > 100  # the audit saw the work


def test_sync_audit_catches_host_reads():
    pool = Pool(1, 1, 8, 4, torch.float16)
    cases = [
        lambda t: t.sum().item(),
        lambda t: bool(t[0, 0, 0] > 0),
        lambda t: t[t > 0],
        lambda t: t.nonzero(),
        lambda t: t.cpu(),
        lambda t: t.to("cpu"),
        lambda t: t.tolist(),
        lambda t: t[torch.tensor([1, 2])],
        lambda t: t + torch.ones(8),
        lambda t: torch.tensor([1, 2], device=t.device),
        lambda t: torch.ones(3).to(t.device),
        lambda t: torch.repeat_interleave(t.flatten().long().clamp(0, 2)),
        lambda t: int(t.flatten()[0]),
    ]
    for i, fn in enumerate(cases):
        with SyncAudit() as audit:
            audit.mark(pool.k)
            fn(pool.k[0] * 2)
        assert audit.violations, f"case {i} not flagged"
    with SyncAudit() as audit:
        audit.mark(pool.k)
        t = pool.k[0] * 2
        t[torch.arange(2, device=t.device)] = 0
        t + 1.0
        torch.where(t > 0, t, 0)
        from kvtc_sglang.codec.transfer import to_device_async

        t.flatten()[to_device_async(torch.tensor([1, 2]), t.device)]
    assert audit.violations == []


def test_work_per_batch_does_not_grow_with_the_number_of_jobs(rnd):
    """Kernel launches: 1 job == 6 jobs of the same total size. Torch calls (host work): 2 jobs == 6 jobs of the
    same sizes (the PyTorch CRC's tree depth follows the longest payload, so sizes must match)."""
    one = [(120, 2, 8, 0)]
    six = [(20, 2, 8, 0), (20, 2, 8, 30), (20, 2, 8, 60), (20, 2, 8, 90), (20, 2, 8, 5), (20, 2, 8, 1)]
    counts = []
    for runs in (one, six[:2], six):
        codec, bc, pool, pr, jobs, kvs = _setup(rnd, torch.bfloat16, runs, seed=1)
        bc.encode(pr, jobs)  # warm: workspaces, tables
        djobs = [DecodeJob(j.dst_rows, bc.blob_layout(j.src_slots.numel(), j.n_head, j.n_tail), j.start_pos,
                           (1, j.src_slots.numel()), pool.alloc_tokens(j.src_slots.numel() - 1)) for j in jobs]
        with SyncAudit() as audit:
            eb = bc.encode(pr, jobs)
            db = bc.decode_begin(pr, djobs)
            bc.decode_layers(db, range(0, L))
        counts.append((eb.launches, db.launches, sum(audit.calls.values())))
    assert counts[0][:2] == counts[1][:2] == counts[2][:2], counts
    assert counts[1][2] == counts[2][2], counts


# ----------------------------------------------------------------------------------------------- errors
def test_bad_jobs_raise_typed_errors_before_any_work(art):
    codec, bc, pool, pr, jobs, kvs = _setup(art, torch.bfloat16, RUNS[:2], seed=4)
    snap = pool.snapshot()
    j = jobs[0]
    bad = [
        EncodeJob(j.src_slots, 0, 2, 5, j.dst_rows[:-1]),  # too few rows
        EncodeJob(j.src_slots.int(), 0, 2, 5, j.dst_rows),  # int32 slots
        EncodeJob(j.src_slots, 0, 20, 20, j.dst_rows),  # exact counts exceed the run
        EncodeJob(j.src_slots, -1, 2, 5, j.dst_rows),
        EncodeJob(j.src_slots, 0, 2, 5, j.dst_rows, torch.zeros(2, dtype=torch.int64)),
    ]
    for job in bad:
        with pytest.raises(ShapeError):
            bc.encode(pr, [jobs[1], job])
    lay = bc.blob_layout(30, 2, 5)
    other = BatchedPoolCodec(KVTCCodec(small_artifact(L, H, D, seed=9, rank_k=20), 1, "cpu"), torch.bfloat16,
                             reference=True)
    with pytest.raises(ShapeError):  # layout of another plan
        bc.decode_begin(pr, [DecodeJob(j.dst_rows, other.blob_layout(30, 2, 5), 0, (0, 30), pool.alloc_tokens(30))])
    with pytest.raises(ShapeError):  # range outside the run
        bc.decode_begin(pr, [DecodeJob(j.dst_rows, lay, 0, (0, 31), pool.alloc_tokens(31))])
    with pytest.raises(ShapeError):  # slots do not match the range
        bc.decode_begin(pr, [DecodeJob(j.dst_rows, lay, 0, (0, 30), pool.alloc_tokens(29))])
    with pytest.raises(ShapeError):  # a pool this codec did not plan
        other.encode(pr, jobs)
    with pytest.raises(ShapeError):  # fp16 codec, bf16 pool
        BatchedPoolCodec(codec, torch.float16, reference=True).pool_rows(pool.k, pool.v)
    with pytest.raises(ShapeError):
        BatchedPoolCodec(codec, torch.uint8, reference=True)  # fp8 storage without its fp8 dtype
    batch = bc.decode_begin(pr, [DecodeJob(j.dst_rows, lay, 0, (0, 30), pool.alloc_tokens(30))])
    with pytest.raises(ShapeError):
        bc.decode_layers(batch, range(0, L + 1))
    empty = bc.decode_begin(pr, [DecodeJob(j.dst_rows, lay, 0, (5, 5), torch.zeros(0, dtype=torch.int64))])
    assert empty.complete and empty.empty
    bc.decode_layers(empty, range(0, 1))  # nothing to write: a no-op, not an error
    for buf, old in zip(pool.k + pool.v, snap):
        assert torch.equal(buf.view(torch.uint8), old.view(torch.uint8))


# ----------------------------------------------------------------------------------------------- host spill
def test_spilled_blob_round_trip_with_crc_and_token_binding(art):
    """Payload rows -> contiguous payload -> framed v2 host blob (header from the device CRC) -> checked on the host
    -> written into other rows -> decoded: same rows as decoding the original."""
    from kvtc_sglang.codec import blob as blobfmt
    from kvtc_sglang.codec.errors import BlobFormatError

    codec, bc, pool, pr, jobs, kvs = _setup(art, torch.bfloat16, RUNS[:3], seed=13)
    batch = bc.encode(pr, jobs)
    j, lay = jobs[2], batch.layouts[2]
    ids = list(range(1000, 1000 + lay.n_tokens))
    payload = bc.read_payload(pr, j.dst_rows, lay)
    blob = torch.frombuffer(bytearray(bc.blob_header(lay, j.start_pos, int(batch.crc[2]), ids)
                                      + payload.numpy().tobytes()), dtype=torch.uint8)
    assert blobfmt.blob_crc(blob) == blobfmt.read_header(blob).crc32
    lay2, start, data = bc.parse_blob(blob, expected_start=j.start_pos, expected_token_ids=ids)
    assert lay2 == lay and start == j.start_pos and torch.equal(data, payload)
    with pytest.raises(BlobFormatError, match="token ids"):
        bc.parse_blob(blob, expected_token_ids=ids[::-1])
    bad = blob.clone()
    bad[-5] ^= 4
    with pytest.raises(BlobFormatError, match="CRC"):
        bc.parse_blob(bad)
    rows = pr.rows_of_slots(pool.alloc_pages(lay.n_slots), lay.n_rows)
    bc.write_payload(pr, data.clone(), rows, lay)
    outs = []
    for src in (j.dst_rows, rows):
        dst = pool.alloc_tokens(lay.n_tokens)
        db = bc.decode_begin(pr, [DecodeJob(src, lay, start, (0, lay.n_tokens), dst)])
        bc.decode_layers(db, range(0, L))
        outs.append(pool.read(dst))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    nh = lay.n_head
    assert torch.equal(outs[1][0][:nh], kvs[2][0][:nh]) and torch.equal(outs[1][1][:nh], kvs[2][1][:nh])


def test_blob_layout_and_payload_layout_place_every_part_at_the_same_offsets(art):
    """The two views of the payload arithmetic (payload_layout.py) agree."""
    codec, bc = _codec(art, torch.bfloat16)
    for n, nh, nt in ((50, 4, 8), (9, 0, 9), (1, 0, 0), (33, 2, 0)):
        lay = bc.blob_layout(n, nh, nt)
        pl = codec.payload_layout(nh, nt, n - nh - nt, torch.bfloat16)
        assert (pl.exact_bytes, pl.raw_size) == (lay.exact_bytes, lay.nbytes)
        assert pl.section_offset(0) == lay.section("k", 0).offset
        assert pl.section_offset(1) == lay.section("v", 0).offset
        for a, b in ((0, n), (nh, n), (0, nh), (n // 2, n)):
            tr, rows = lay.clip_range(a, b), pl.token_rows(a, b)
            assert (rows.head.row0, rows.head.n_rows, rows.head.idx0) == (tr.head_row0, tr.head_n, 0)
            assert (rows.tail.row0, rows.tail.n_rows, rows.tail.idx0) == (tr.tail_row0, tr.tail_n, tr.tail_dst0)
            assert (rows.coded.row0, rows.coded.n_rows, rows.coded.idx0) == (tr.coded_tok0, tr.coded_n, tr.coded_dst0)


def test_the_codec_satisfies_the_tier_protocol(art):
    from kvtc_sglang.codec.interfaces import BatchedCodec

    assert isinstance(_codec(art, torch.bfloat16)[1], BatchedCodec)
