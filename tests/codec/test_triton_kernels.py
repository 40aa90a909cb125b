"""Triton codec kernels vs their PyTorch references, and TritonPoolCodec vs ReferencePoolCodec.

Without CUDA the kernels run in Triton's CPU interpreter at small shapes: TRITON_INTERPRET=1 is set
before Triton is imported, or, when an earlier test module already imported Triton, the CPU cases run
in an interpreter subprocess (test_interpreter_cases_in_a_subprocess), so plain `pytest` always runs
them. Cases marked `gpu` run the compiled kernels on a CUDA device,
at small odd shapes and at real model shapes (Llama-3.1-8B and SmolLM2-135M KV layouts); without a
GPU they are skipped, never passed.

Decoded pool rows are compared with the reference decode of the same blob within the tolerance table
`DECODE_TOL` (relative to the element, plus an absolute floor relative to the rows' RMS): the decode
GEMM takes fp16 coefficients and fp16 `basis / scale` (fp32 accumulation) where the reference uses
float32. Each of the r products then carries a relative rounding error near 2^-11, so an element's error is
about sqrt(r) * 2^-11 times its typical term: ~5e-4 of the rows' RMS, with tails past 3e-3 among thousands of
elements where terms cancel. The per-element floor therefore sits at 2^-8 of the RMS for fp16 and bf16 (one
element at 3.1e-3 of the RMS was seen in a random fp16 case), while the norm bound keeps the whole-tensor error
near the fp16 rounding level.
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

from kvtc_sglang.codec.triton import gemm, jitlib, pool_codec, quant, rows  # noqa: E402

# Without CUDA the kernels need Triton's interpreter, which only works when TRITON_INTERPRET was set
# before Triton was first imported. If another module imported it earlier in this process, the CPU
# cases run in a fresh interpreter subprocess instead (test_interpreter_cases_in_a_subprocess).
_IN_PROCESS = _CUDA or isinstance(triton.language.zeros, InterpretedFunction)
if not _CUDA and _IN_PROCESS and not isinstance(rows._gather_exact_kernel, InterpretedFunction):
    for _m in (jitlib, rows, quant, gemm, pool_codec):  # kernel modules imported before the switch
        importlib.reload(_m)
if not _IN_PROCESS:  # leave this process's Triton as it was
    if _ENV_BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _ENV_BEFORE

from kvtc_sglang.codec.bitpack import unpack_symbols  # noqa: E402
from kvtc_sglang.codec.calibrate import layer_partition  # noqa: E402
from kvtc_sglang.codec.codec import KVTCCodec  # noqa: E402
from kvtc_sglang.codec.errors import BlobFormatError, ShapeError  # noqa: E402
from kvtc_sglang.codec.pool_codec import ReferencePoolCodec  # noqa: E402
from kvtc_sglang.codec.rope import RopeConfig  # noqa: E402
from kvtc_sglang.codec.triton import reference as ref  # noqa: E402
from kvtc_sglang.codec.triton.common import pool_view  # noqa: E402
from kvtc_sglang.codec.triton.pool_codec import TritonPoolCodec  # noqa: E402
from kvtc_sglang.testing.synthetic import dp_like_plan, random_plan, synthetic_artifact, synthetic_kv  # noqa: E402
from kvtc_sglang.codec.triton.tables import rope_tables  # noqa: E402

FP8 = torch.float8_e4m3fn
# pool dtype -> (rtol, atol as a fraction of the rows' RMS, max ||delta|| / ||ref||)
DECODE_TOL = {
    torch.bfloat16: (2.0**-7, 2.0**-8, 2e-3),
    torch.float16: (2.0**-9, 2.0**-8, 1e-3),
    FP8: (2.0**-3, 2.0**-6, 3e-2),
}

# case: (L, H, D, n_blocks, n_tokens, rank_k, rank_v, plan kind)
SMALL = dict(L=2, H=2, D=32, n_blocks=2, n=70, rank_k=48, rank_v=40, plan="random")
CASES = [
    pytest.param(SMALL, id="small"),
    pytest.param(dict(SMALL, n=300, D=64, rank_k=100, rank_v=90), id="gpu-small", marks=pytest.mark.gpu),
    pytest.param(dict(L=30, H=3, D=64, n_blocks=2, n=1000, rank_k=600, rank_v=500, plan="random"),
                 id="gpu-smollm2", marks=pytest.mark.gpu),
    pytest.param(dict(L=32, H=8, D=128, n_blocks=1, n=2048, rank_k=2048, rank_v=2048, plan="dp"),
                 id="gpu-llama8b", marks=pytest.mark.gpu),
]
ROPES = {
    "neox": dict(style="neox"),
    "gptj-partial": dict(style="gptj", rotary_fraction=0.5),
    "neox-yarn-partial": dict(style="neox", rotary_fraction=0.5,
                              scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}),
}


def _skip_if_covered_at_small_shapes(case, rope_name="neox", dtype=torch.bfloat16):
    """Real-shape GPU cases run the main path (neox RoPE, bf16 pool); variants run at the small shapes
    (this keeps the number of distinct kernel compilations on the GPU box small)."""
    if case["L"] > 2 and (rope_name != "neox" or dtype != torch.bfloat16):
        pytest.skip("variant covered at the small shapes")


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
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


_ARTIFACTS: dict = {}


def _artifact(case: dict, rope_name: str = "neox", seed: int = 0, clip: bool = True):
    key = (tuple(sorted(case.items())), rope_name, seed, clip)
    if key not in _ARTIFACTS:
        L, H, D = case["L"], case["H"], case["D"]
        rs = ROPES[rope_name]
        rope = RopeConfig(head_dim=D, rotary_dim=int(D * rs.get("rotary_fraction", 1.0)), theta=10000.0,
                          style=rs["style"], scaling=rs.get("scaling"))
        rng = random.Random(seed)
        plans = []
        for lo, hi in layer_partition(L, case["n_blocks"]):
            pb = (hi - lo) * H * D
            if case["plan"] == "dp":
                plans.append((dp_like_plan(pb, case["rank_k"], 1), dp_like_plan(pb, case["rank_v"], 1)))
            else:
                plans.append((random_plan(pb, case["rank_k"], rng), random_plan(pb, case["rank_v"], rng)))
        dev = "cuda" if _CUDA else "cpu"
        _ARTIFACTS[key] = synthetic_artifact(L, H, D, {1: plans}, n_blocks=case["n_blocks"], rope=rope, seed=seed,
                                             device=dev, **({} if clip else {"clip": None}))
    return _ARTIFACTS[key]


def _pool(case, n_slots, dtype, device, poison):
    """Per-layer K/V buffers [n_slots, H, D] filled with `poison` (bytes 0xAB for uint8)."""
    L, H, D = case["L"], case["H"], case["D"]
    def one():
        if dtype == torch.uint8:
            return torch.full((n_slots, H, D), 0xAB, dtype=torch.uint8, device=device)
        return torch.full((n_slots, H, D), poison, dtype=dtype, device=device)
    return [one() for _ in range(L)], [one() for _ in range(L)]


def _fill(kb, vb, slots, k, v):
    for layer in range(len(kb)):
        kb[layer][slots] = k[:, layer]
        vb[layer][slots] = v[:, layer]


def _slots(n, n_slots, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(n_slots - 1, generator=g)[:n] + 1).to(device)


def _kv(art, n, start, dtype, device, seed):
    k, v = synthetic_kv(art, n, start, dtype=torch.float32, device=device, seed=seed)
    if dtype == torch.uint8:
        return k.to(FP8).view(torch.uint8), v.to(FP8).view(torch.uint8)
    return k.to(dtype), v.to(dtype)


def _logical(t, dtype):
    return t.view(FP8).float() if dtype == torch.uint8 else t.float()


def _assert_rows_close(tri, want, dtype):
    rtol, atol_rel, norm_rel = DECODE_TOL[FP8 if dtype == torch.uint8 else dtype]
    a, b = _logical(tri, dtype), _logical(want, dtype)
    assert torch.isfinite(a).all()
    rms = b.pow(2).mean().sqrt().item()
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol_rel * rms)
    assert (a - b).norm() <= norm_rel * b.norm()


def _codecs(art, device, kv_dtype=None, entropy="deflate"):
    codec = KVTCCodec(art, 1, device, entropy=entropy)
    return codec, ReferencePoolCodec(codec, kv_dtype), TritonPoolCodec(codec, kv_dtype, reference=False)


# ----------------------------------------------------------------------------------------------- row kernels
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.uint8], ids=["bf16", "fp16", "fp8"])
def test_gather_exact_copies_rows_bit_exact(case, dtype, device):
    _skip_if_covered_at_small_shapes(case, dtype=dtype)
    art = _artifact(case)
    n_slots, n = case["n"] + 50, 9
    kb, vb = _pool(case, n_slots, dtype, device, 3.0)
    k, v = _kv(art, case["n"] + 49, 0, dtype, device, seed=random.randrange(1 << 30))
    _fill(kb, vb, torch.arange(1, n_slots, device=device), k, v)
    pool = pool_view(kb, vb, kv_dtype=FP8 if dtype == torch.uint8 else None)
    slots = _slots(n, n_slots, device, seed=random.randrange(1 << 30))
    shape = (n + 2, 2, case["L"], case["H"], case["D"])
    got = torch.zeros(shape, dtype=dtype, device=device)
    want = torch.zeros(shape, dtype=dtype, device=device)
    rows.gather_exact(pool, slots, 3, 5, got, 1)
    ref.gather_exact(pool, slots, 3, 5, want, 1)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert not got[0].any() and not got[6:].any()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("src,dst", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16),
                                     (torch.uint8, torch.uint8), (torch.float16, torch.uint8)],
                         ids=["bf16", "bf16-to-fp16", "fp8", "fp16-to-fp8"])
def test_scatter_exact_writes_only_given_slots_and_layers(case, src, dst, device):
    _skip_if_covered_at_small_shapes(case, dtype=src if src == dst else None)
    L, H, D = case["L"], case["H"], case["D"]
    n_ex, n_slots = 7, 40
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    exact = (torch.randn(n_ex, 2, L, H, D, generator=g) * 3).to(device)
    exact = exact.to(FP8).view(torch.uint8) if src == torch.uint8 else exact.to(src)
    kv = FP8 if dst == torch.uint8 else None
    for layers in ((0, L), (L - 1, L)):
        kt, vt = _pool(case, n_slots, dst, device, 77.0)
        kr, vr = _pool(case, n_slots, dst, device, 77.0)
        slots = _slots(n_ex, n_slots, device, seed=random.randrange(1 << 30))
        rows.scatter_exact(exact, 2, 4, pool_view(kt, vt, kv_dtype=kv), slots, 1, layers)
        ref.scatter_exact(exact, 2, 4, pool_view(kr, vr, kv_dtype=kv), slots, 1, layers)
        for a, b in zip(kt + vt, kr + vr):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        untouched = torch.ones(n_slots, dtype=torch.bool, device=device)
        untouched[slots[1:5]] = False
        poison = _pool(case, 1, dst, device, 77.0)[0][0][0]
        for layer in range(L):
            written = layers[0] <= layer < layers[1]
            for buf in (kt[layer], vt[layer]):
                assert (buf[untouched].view(torch.uint8) == poison.view(torch.uint8)).all()
                assert written == bool((buf[slots[1:5]].view(torch.uint8) != poison.view(torch.uint8)).any())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rope_name", list(ROPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8], ids=["bf16", "fp8"])
def test_gather_features_matches_reference(case, rope_name, dtype, device):
    _skip_if_covered_at_small_shapes(case, rope_name, dtype)
    art = _artifact(case, rope_name)
    codec = KVTCCodec(art, 1, device, entropy="none")
    tri = TritonPoolCodec(codec, FP8 if dtype == torch.uint8 else None, reference=False)
    n, start, n_slots = case["n"], 1000 + random.randrange(3000), case["n"] + 20
    kb, vb = _pool(case, n_slots, dtype, device, 0.0)
    slots = _slots(n, n_slots, device, seed=random.randrange(1 << 30))
    _fill(kb, vb, slots, *_kv(art, n, start, dtype, device, seed=random.randrange(1 << 30)))
    pool = pool_view(kb, vb, kv_dtype=tri.kv_dtype)
    m, idx0 = n - 5, 3
    rope = rope_tables(codec.rope, torch.arange(start + idx0, start + idx0 + m, device=device), inverse=True)
    for kt in tri.kinds:
        rt = rope if kt.kind == 0 else None
        want = torch.full((m + 9, codec.p), 5.0, device=device)
        ref.gather_features(pool, kt.kind, slots, idx0, m, rt, kt.mean, want)
        got32 = torch.full_like(want, 5.0)
        rows.gather_features(pool, kt.kind, slots, idx0, m, rt, kt.mean, got32)
        torch.testing.assert_close(got32, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        for dt, rtol in ((torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8))[: 1 if case["L"] > 2 else 2]:
            got16 = torch.full((m + 9, codec.p), 5.0, dtype=dt, device=device)
            rows.gather_features(pool, kt.kind, slots, idx0, m, rt, kt.mean, got16)
            torch.testing.assert_close(got16.float(), want, rtol=rtol, atol=1e-5 * want.abs().max().item())
            assert not got16[m:].any()


# ----------------------------------------------------------------------------------------------- GEMMs
@pytest.mark.parametrize("case", CASES)
def test_project_matches_reference(case, device):
    art = _artifact(case)
    tri = TritonPoolCodec(KVTCCodec(art, 1, device, entropy="none"), reference=False)
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    n = case["n"]
    mpad = -(-n // 128) * 128
    for kt in tri.kinds:
        feats = torch.randn(mpad, tri.p, generator=g).to(device)
        fb = feats.to(torch.float16)
        for bt in kt.blocks:
            a = fb[:, bt.offset : bt.offset + bt.p]
            got = torch.full((mpad, bt.r_enc), 9.0, device=device)
            gemm.project(a, bt, got, n)
            exact = (a[:n].double() @ bt.enc.double()).float()  # same fp16 operands, exact sum
            torch.testing.assert_close(got[:n], exact, rtol=1e-4, atol=1e-4 * exact.abs().max().item())
            want = torch.zeros_like(got)
            ref.project(feats[:, bt.offset : bt.offset + bt.p], bt, want, n)  # float32 operands
            err = (got[:n] - want[:n]).norm() / want[:n].norm()
            assert err < 2e-3, err  # fp16 operands: ~2^-12 relative per product
            assert not got[:n, bt.rank :].any()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rope_name", ["neox", "gptj-partial", "neox-yarn-partial"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.uint8], ids=["bf16", "fp16", "fp8"])
def test_reconstruct_matches_reference_and_touches_only_its_rows(case, rope_name, dtype, device):
    _skip_if_covered_at_small_shapes(case, rope_name, dtype)
    art = _artifact(case, rope_name)
    kv = FP8 if dtype == torch.uint8 else None
    tri = TritonPoolCodec(KVTCCodec(art, 1, device, entropy="none"), kv, reference=False)
    n, n_slots, idx0 = case["n"], case["n"] + 30, 4
    m = n - 7
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    slots = _slots(n, n_slots, device, seed=random.randrange(1 << 30))
    start = random.randrange(100000)
    rope = rope_tables(tri.rope, torch.arange(start, start + m, device=device), inverse=False)
    for kt in tri.kinds:
        for bt in kt.blocks:
            coeffs = torch.zeros(-(-m // 128) * 128, bt.r_dec, device=device)
            sig = (torch.arange(1, bt.rank + 1, dtype=torch.float32) ** -0.6 * 4).to(device)
            coeffs[:m, : bt.rank] = torch.randn(m, bt.rank, generator=g).to(device) * sig
            coeffs = coeffs.half()
            rt = rope if kt.kind == 0 else None
            layer_sets = [(bt.layer_start, bt.layer_end), (bt.layer_end - 1, bt.layer_end)]
            for lo, hi in layer_sets:
                kt_, vt_ = _pool(case, n_slots, dtype, device, 55.0)
                kr_, vr_ = _pool(case, n_slots, dtype, device, 55.0)
                gemm.reconstruct(coeffs, bt, rt, pool_view(kt_, vt_, kv_dtype=kv), kt.kind, slots, idx0, m, (lo, hi))
                ref.reconstruct(coeffs.float(), bt, rt, pool_view(kr_, vr_, kv_dtype=kv), kt.kind, slots, idx0, m,
                                (lo, hi))
                written = slots[idx0 : idx0 + m]
                rest = torch.ones(n_slots, dtype=torch.bool, device=device)
                rest[written] = False
                poison = _pool(case, 1, dtype, device, 55.0)[0][0][0].view(torch.uint8)
                bufs_t, bufs_r = (kt_, kr_) if kt.kind == 0 else (vt_, vr_)
                others = vt_ if kt.kind == 0 else kt_
                for layer in range(case["L"]):
                    if lo <= layer < hi:
                        _assert_rows_close(bufs_t[layer][written], bufs_r[layer][written], dtype)
                        assert (bufs_t[layer][rest].view(torch.uint8) == poison).all()
                    else:
                        assert (bufs_t[layer].view(torch.uint8) == poison).all()
                    assert (others[layer].view(torch.uint8) == poison).all()


# ----------------------------------------------------------------------------------------------- quantization
def _coefficients(m, bt, device, g, ties=True):
    """Coefficients with decaying scale; some groups constant (scale 0), some rows with exact ties."""
    sig = (torch.arange(1, bt.r_enc + 1, dtype=torch.float32) ** -0.5 * 3).to(device)
    c = torch.randn(m, bt.r_enc, generator=g).to(device) * sig
    if ties and bt.coder.plan.groups:
        grp = bt.coder.plan.groups[len(bt.coder.plan.groups) // 2]
        c[0, grp.start : grp.start + grp.size] = 1.25  # span 0 -> scale 0
        c[1, grp.start : grp.start + grp.size] = torch.arange(grp.size, dtype=torch.float32, device=device) * 0.5
    return c


def _params_and_sections(case, device, clip):
    art = _artifact(case, seed=random.randrange(4), clip=clip)
    tri = TritonPoolCodec(KVTCCodec(art, 1, device, entropy="none"), reference=False)
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    m_total, row0 = case["n"] + 11, 7
    m = case["n"]
    for kt in tri.kinds:
        for bt in kt.blocks:
            coeffs = _coefficients(m, bt, device, g)
            sec_t = torch.full((m_total * bt.bytes_per_token,), 0x5A, dtype=torch.uint8, device=device)
            sec_r = sec_t.clone()
            par_t = torch.zeros(2, bt.n_groups, m, device=device)
            par_r = torch.zeros_like(par_t)
            quant.group_params(coeffs, bt, sec_t, m_total, row0, m, par_t)
            quant.pack(coeffs, bt, par_t, sec_t, m_total, row0, m)
            ref.group_params(coeffs, bt, sec_r, m_total, row0, m, par_r)
            ref.pack(coeffs, bt, par_r, sec_r, m_total, row0, m)
            planes = sec_t.view(bt.bytes_per_token, m_total)
            assert (planes[:, :row0] == 0x5A).all() and (planes[:, row0 + m :] == 0x5A).all()
            yield bt, par_t, par_r, sec_t, sec_r


@pytest.mark.parametrize("case", CASES)
def test_group_params_and_pack_match_reference_bytes(case, device):
    """Min/max ranges: params and packed bytes are identical to the reference's."""
    for _bt, par_t, par_r, sec_t, sec_r in _params_and_sections(case, device, clip=False):
        assert torch.equal(par_t, par_r)
        assert torch.equal(sec_t, sec_r)


@pytest.mark.parametrize("case", CASES)
def test_clipped_group_params_match_reference_within_rounding(case, device):
    """Clipped ranges: the kernel's one-pass mean/std may move a range by an ulp, so params agree to
    one fp16 step and nearly all of them (and the symbols built on them) are identical."""
    for _bt, par_t, par_r, sec_t, sec_r in _params_and_sections(case, device, clip=True):
        diff = (par_t - par_r).abs()
        ulp = (par_r.abs().clamp_min(2 ** -14) * 2 ** -10)
        assert bool((diff <= 2 * ulp + 1e-7).all()), float((diff / ulp).max())
        assert float((par_t == par_r).float().mean()) >= 0.98
        assert float((sec_t == sec_r).float().mean()) >= 0.98


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_unpack_dequantize_matches_reference(case, out_dtype, device):
    art = _artifact(case, seed=random.randrange(4))
    tri = TritonPoolCodec(KVTCCodec(art, 1, device, entropy="none"), reference=False)
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    m_total = case["n"]
    row0, m = 5, m_total - 9
    for kt in tri.kinds:
        for bt in kt.blocks:
            coeffs = _coefficients(m_total, bt, device, g)
            sec = torch.zeros(m_total * bt.bytes_per_token, dtype=torch.uint8, device=device)
            par = torch.zeros(2, bt.n_groups, m_total, device=device)
            ref.group_params(coeffs, bt, sec, m_total, 0, m_total, par)
            ref.pack(coeffs, bt, par, sec, m_total, 0, m_total)
            mpad = -(-m // 128) * 128
            got = torch.full((mpad, bt.r_dec), 3.0, dtype=out_dtype, device=device)
            quant.unpack_dequantize(sec, bt, m_total, row0, m, got)
            want = torch.full((mpad, bt.r_dec), 3.0, device=device)
            ref.unpack_dequantize(sec, bt, m_total, row0, m, want)
            if out_dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
            else:
                torch.testing.assert_close(got.float(), want.half().float(), rtol=2.0**-10, atol=2.0**-24)
            assert not got[m:].any() and not got[:, bt.rank :].any()


# ----------------------------------------------------------------------------------------------- pool codec
def _encode_setup(case, dtype, device, rope_name="neox", seed=0):
    art = _artifact(case, rope_name, seed)
    n, n_slots = case["n"], 2 * case["n"] + 20
    start = random.randrange(5000)
    kb, vb = _pool(case, n_slots, dtype, device, 0.0)
    slots = _slots(n, n_slots, device, seed=random.randrange(1 << 30))
    k, v = _kv(art, n, start, dtype, device, seed=random.randrange(1 << 30))
    _fill(kb, vb, slots, k, v)
    return art, kb, vb, slots, start, k, v


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.uint8], ids=["bf16", "fp16", "fp8"])
def test_blobs_cross_decode_between_triton_and_reference(case, dtype, device):
    _skip_if_covered_at_small_shapes(case, dtype=dtype)
    kv = FP8 if dtype == torch.uint8 else None
    art, kb, vb, slots, start, k, v = _encode_setup(case, dtype, device)
    codec, ref_pc, tri_pc = _codecs(art, device, kv)
    n_head, n_tail = 3, min(17, case["n"] // 4)
    blob_r = ref_pc.encode_slots(kb, vb, slots, start, n_head, n_tail)
    blob_t = tri_pc.encode_slots(kb, vb, slots, start, n_head, n_tail)
    assert blob_t.numel() > 0 and codec.read_header(blob_t).raw_size == codec.read_header(blob_r).raw_size
    n, n_slots = case["n"], 2 * case["n"] + 20
    out_slots = _slots(n, n_slots, device, seed=random.randrange(1 << 30))
    untouched = torch.ones(n_slots, dtype=torch.bool, device=device)
    untouched[out_slots] = False
    for blob in (blob_r, blob_t):
        kr, vr = _pool(case, n_slots, dtype, device, 99.0)
        kt_, vt_ = _pool(case, n_slots, dtype, device, 99.0)
        ref_pc.decode_into(blob, kr, vr, out_slots, expected_tokens=n, expected_start=start)
        tri_pc.decode_into(blob, kt_, vt_, out_slots, expected_tokens=n, expected_start=start)
        exact_idx = torch.cat([out_slots[:n_head], out_slots[n - n_tail :]])
        coded_idx = out_slots[n_head : n - n_tail]
        poison = _pool(case, 1, dtype, device, 99.0)[0][0][0].view(torch.uint8)
        for layer in range(case["L"]):
            for t, r, orig in ((kt_[layer], kr[layer], k[:, layer]), (vt_[layer], vr[layer], v[:, layer])):
                assert torch.equal(t[exact_idx].view(torch.uint8), r[exact_idx].view(torch.uint8))
                assert torch.equal(t[out_slots[:n_head]].view(torch.uint8), orig[:n_head].view(torch.uint8))
                _assert_rows_close(t[coded_idx], r[coded_idx], dtype)
                assert (t[untouched].view(torch.uint8) == poison).all()


@pytest.mark.parametrize("case", CASES)
def test_triton_encode_agrees_with_reference_symbols_and_error(case, device):
    art, kb, vb, slots, start, k, v = _encode_setup(case, torch.bfloat16, device)
    codec, ref_pc, tri_pc = _codecs(art, device, entropy="none")
    payloads = []
    for pc in (ref_pc, tri_pc):
        blob = pc.encode_slots(kb, vb, slots, start, 0, 0)
        payloads.append(codec.payload(blob, codec.read_header(blob)))
    pay_r, pay_t = payloads
    n, same, total, off = case["n"], 0, 0, 0
    for kind in ("k", "v"):
        for bc in codec.kinds[kind].blocks:
            size = n * bc.bytes_per_token
            recs = [p[off : off + size].view(bc.bytes_per_token, n).T.contiguous() for p in (pay_r, pay_t)]
            off += size
            # size-1 groups store the fp16 rounding residue of one value: any perturbation flips them
            multi = torch.zeros(bc.layout.rank, dtype=torch.bool)
            for grp in bc.plan.groups:
                multi[grp.start : grp.start + grp.size] = grp.size > 1
            q_r, q_t = (unpack_symbols(r[:, bc.layout.param_bytes :], bc.layout)[:, multi.to(device)] for r in recs)
            same += (q_r == q_t).sum().item()
            total += q_r.numel()
    assert same / total > 0.97, same / total  # fp16 GEMM operands move a few values across a rounding boundary
    n_slots = 2 * n + 20
    errs = []
    for pc in (ref_pc, tri_pc):
        blob = pc.encode_slots(kb, vb, slots, start, 0, 0)
        ko, vo = _pool(case, n_slots, torch.bfloat16, device, 0.0)
        ref_pc.decode_into(blob, ko, vo, slots)
        got = torch.stack([ko[layer][slots] for layer in range(case["L"])], 1).float()
        errs.append((got - k.float()).norm().item())
    assert errs[1] <= 1.02 * errs[0] + 1e-6, errs


@pytest.mark.parametrize("case", CASES)
def test_decode_layer_by_layer_equals_decode_into(case, device):
    art, kb, vb, slots, start, k, v = _encode_setup(case, torch.bfloat16, device)
    codec, ref_pc, tri_pc = _codecs(art, device)
    blob = tri_pc.encode_slots(kb, vb, slots, start, 2, 5)
    n, n_slots = case["n"], 2 * case["n"] + 20
    a, b = 1, n - 2  # a token range crossing the exact head, the coded middle and the exact tail
    out_slots = _slots(b - a, n_slots, device, seed=random.randrange(1 << 30))
    k1, v1 = _pool(case, n_slots, torch.bfloat16, device, 99.0)
    k2, v2 = _pool(case, n_slots, torch.bfloat16, device, 99.0)
    k3, v3 = _pool(case, n_slots, torch.bfloat16, device, 99.0)
    tri_pc.decode_into(blob, k1, v1, out_slots, token_range=(a, b))
    job = tri_pc.begin_decode(blob, out_slots, token_range=(a, b))
    for layer in reversed(range(case["L"])):
        tri_pc.decode_layer_into(job, layer, k2[layer], v2[layer])
    ref_pc.decode_into(blob, k3, v3, out_slots, token_range=(a, b))
    for layer in range(case["L"]):
        assert torch.equal(k1[layer], k2[layer]) and torch.equal(v1[layer], v2[layer])
        _assert_rows_close(k1[layer][out_slots], k3[layer][out_slots], torch.bfloat16)
        _assert_rows_close(v1[layer][out_slots], v3[layer][out_slots], torch.bfloat16)


def test_reference_route_blob_is_the_reference_codec_blob(device):
    case = SMALL
    art, kb, vb, slots, start, k, v = _encode_setup(case, torch.bfloat16, device, seed=1)
    codec = KVTCCodec(art, 1, device, entropy="deflate")
    blob = TritonPoolCodec(codec, reference=True).encode_slots(kb, vb, slots, start, 4, 9)
    assert torch.equal(blob, ReferencePoolCodec(codec).encode_slots(kb, vb, slots, start, 4, 9))


def test_env_switch_routes_kernels_to_references(device, monkeypatch):
    case = SMALL
    art, kb, vb, slots, start, k, v = _encode_setup(case, torch.bfloat16, device)
    calls = []
    for name in ("gather_exact", "gather_features", "project", "group_params", "pack"):
        orig = getattr(ref, name)
        monkeypatch.setattr(ref, name, lambda *a, _o=orig, _n=name: (calls.append(_n), _o(*a))[1])
    monkeypatch.setenv("KVTC_REFERENCE", "1")
    pc = TritonPoolCodec(KVTCCodec(art, 1, device, entropy="none"))
    assert pc.reference
    pc.encode_payload(kb, vb, slots, start, 2, 2)
    assert set(calls) == {"gather_exact", "gather_features", "project", "group_params", "pack"}


@pytest.mark.gpu
def test_compressing_into_the_store_never_waits_for_the_device(device):
    """A node is compressed while the scheduler's forward pass is still running on the GPU: encoding and framing
    (header, checksum) must queue work on the stream without a host sync."""
    from kvtc_sglang.codec import blob as blobfmt

    art, kb, vb, slots, start, k, v = _encode_setup(SMALL, torch.bfloat16, device, seed=3)
    pc = TritonPoolCodec(KVTCCodec(art, 1, device, entropy="none"))
    want = pc.encode_slots(kb, vb, slots, start, 4, 9)  # first call: kernel compilation, caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        busy = torch.randn(4096, 4096, device=device)
        for _ in range(20):  # keep the GPU busy, as a forward pass would
            busy = busy @ busy / 64
        blob = pc.encode_slots(kb, vb, slots, start, 4, 9)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(blob, want)
    h = blobfmt.read_header(want)
    blobfmt.verify_crc(want, h)


def test_bad_inputs_raise_before_writing(device):
    case = SMALL
    art, kb, vb, slots, start, k, v = _encode_setup(case, torch.bfloat16, device)
    codec, ref_pc, tri_pc = _codecs(art, device)
    blob = tri_pc.encode_slots(kb, vb, slots, start, 1, 1)
    ko, vo = _pool(case, 200, torch.bfloat16, device, 99.0)
    with pytest.raises(ShapeError):
        tri_pc.decode_into(blob, ko, vo, slots[:-1])
    bad = blob.clone()
    bad[-1] ^= 0xFF
    with pytest.raises(BlobFormatError):
        tri_pc.decode_into(bad, ko, vo, slots)
    with pytest.raises(BlobFormatError):
        tri_pc.decode_into(blob, ko, vo, slots, expected_start=start + 1)
    assert all((b == 99.0).all() for b in ko + vo)
    with pytest.raises(ShapeError):
        tri_pc.encode_slots(kb[:-1], vb[:-1], slots, start, 0, 0)
    with pytest.raises(ShapeError):
        tri_pc.encode_slots(kb, vb, slots.int(), start, 0, 0)
    fp8_pool = [torch.zeros_like(b, dtype=torch.uint8) for b in kb]
    with pytest.raises(ShapeError):  # uint8 rows without kv_dtype
        TritonPoolCodec(codec).encode_slots(fp8_pool, fp8_pool, slots, start, 0, 0)


def test_golden_blob_decodes_with_the_kernels(device):
    """The frozen golden blob (tests/data/golden/, see tests/codec/test_golden_blob.py) through the kernels: decoded
    into pool rows it gives the golden rows (exact rows bit-identical), and the reference route re-encodes the golden
    input into the golden bytes."""
    import json
    from pathlib import Path

    from kvtc_sglang.codec.artifact import load_artifact

    golden = Path(__file__).resolve().parents[1] / "data" / "golden"
    m = json.loads((golden / "golden.json").read_text())
    art = load_artifact(golden)
    kv = torch.load(golden / "kv.pt", weights_only=True)
    expected = torch.load(golden / "expected.pt", weights_only=True)
    blob = torch.frombuffer(bytearray((golden / "blob.bin").read_bytes()), dtype=torch.uint8).to(device)
    codec = KVTCCodec(art, m["ratio"], device, entropy=m["entropy"], chunk_bytes=m["chunk_bytes"])
    n, L = m["n_tokens"], art.num_layers
    n_slots = 2 * n + 8
    slots = _slots(n, n_slots, device, seed=5)
    kb = [torch.zeros(n_slots, art.num_kv_heads, art.head_dim, dtype=torch.bfloat16, device=device) for _ in range(L)]
    vb = [torch.zeros_like(b) for b in kb]
    TritonPoolCodec(codec, reference=False).decode_into(blob, kb, vb, slots, expected_tokens=n,
                                                         expected_start=m["start_pos"])
    exact = torch.cat([torch.arange(m["n_head"]), torch.arange(n - m["n_tail"], n)])
    for layer in range(L):
        for buf, want in ((kb[layer], expected["k"][:, layer]), (vb[layer], expected["v"][:, layer])):
            got = buf[slots].cpu()
            assert torch.equal(got[exact], want[exact])
            _assert_rows_close(got, want, torch.bfloat16)
    for layer in range(L):
        kb[layer][slots] = kv["k"][:, layer].to(device)
        vb[layer][slots] = kv["v"][:, layer].to(device)
    again = TritonPoolCodec(codec, reference=True).encode_slots(kb, vb, slots, m["start_pos"], m["n_head"], m["n_tail"])
    assert torch.equal(again.cpu(), blob.cpu())
