"""The small synthetic artifact the codec tests share, and what its plans predict (independently of payload.py).

Synthetic model: L=2 layers, H=2 KV heads, D=16 (p=64 per kind), two feature blocks (one layer each) per kind with
random orthonormal float16 bases, non-trivial means and feature scales, and two plans: 4x (mixed widths, size-1 and
size-16 groups, a dropped gap) and 16x (one block of each kind with an empty plan: every coordinate dropped).
The ``art`` fixture (tests/codec/conftest.py) is ``make_artifact()``.
"""

from __future__ import annotations

import torch

from kvtc_sglang.codec.artifact import CalibrationArtifact, FeatureBlock, RatioPlans
from kvtc_sglang.codec.plan import BitPlan, Group
from kvtc_sglang.codec.quantize import dequantize_groups, group_params, quantize_groups
from kvtc_sglang.codec.rope import RopeConfig, apply_rope, undo_rope


L, H, D = 2, 2, 16
P = L * H * D
PB = H * D  # features of one block (one layer)
CODERS = ("none", "deflate")
# relative tolerance of a decoded (coded) row against the float32 reconstruction, by output dtype
TOL = {torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float8_e4m3fn: 2.0 ** -3}


PLANS = {
    4: {
        "k": [
            [Group(0, 1, 8), Group(1, 1, 4), Group(2, 1, 2), Group(3, 1, 8), Group(16, 16, 4)],
            [Group(0, 16, 8), Group(16, 1, 2), Group(17, 1, 4), Group(18, 1, 8)],
        ],
        "v": [[Group(0, 16, 8), Group(16, 16, 2)], [Group(0, 1, 4), Group(16, 16, 8)]],
    },
    16: {"k": [[Group(0, 16, 2)], []], "v": [[Group(0, 1, 8)], [Group(0, 16, 2)]]},
}


def make_artifact(seed: int = 0, fingerprint: str = "ab" * 32) -> CalibrationArtifact:
    g = torch.Generator().manual_seed(seed)
    blocks = {}
    for kind in ("k", "v"):
        blocks[kind] = []
        for b in range(L):
            q, _ = torch.linalg.qr(torch.randn(PB, PB, generator=g, dtype=torch.float64))
            mean = torch.randn(PB, generator=g) * 0.5
            scale = 0.5 + 1.5 * torch.rand(PB, generator=g)
            blocks[kind].append(FeatureBlock(b, b + 1, b * PB, PB, mean, q.to(torch.float16), scale))
    plans = {
        ratio: RatioPlans(ratio, *(tuple(BitPlan(tuple(gs), PB, float(ratio)) for gs in per[kind]) for kind in ("k", "v")))
        for ratio, per in PLANS.items()
    }
    rope = RopeConfig(head_dim=D, rotary_dim=D, theta=10000.0, style="neox")
    model = {"name": "synthetic-l2h2d16", "fingerprint": fingerprint, "num_layers": L, "num_kv_heads": H,
             "num_kv_heads_per_rank": H, "head_dim": D, "rope": rope.to_dict()}
    return CalibrationArtifact(model=model, blocks=blocks, plans=plans)


def kv(n: int, seed: int = 1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, L, H, D, generator=g) * 2 + 0.5
    v = torch.randn(n, L, H, D, generator=g)
    return k.to(dtype), v.to(dtype)


def predicted(art: CalibrationArtifact, ratio: int, kind: str, x: torch.Tensor):
    """What the plan's own quantizer predicts for features x [m, p] (keys RoPE-undone), computed independently of
    payload.py. Returns (x_hat, x_kept, bound): the reconstruction, the reconstruction from the unquantized kept
    coefficients, and the elementwise bound on |x_hat - x_kept| (per-group scale/2 + shift rounding through the basis)."""
    x_hat, x_kept, bound = (torch.empty_like(x) for _ in range(3))
    for blk, plan in zip(art.blocks[kind], art.plan(ratio).for_kind(kind)):
        xb = x[:, blk.offset : blk.offset + blk.p].float()
        r = plan.rank
        basis = blk.basis[:, :r].float()
        s = blk.scale.float()[:, None]
        d = (xb - blk.mean.float()) @ (s * basis)
        dh, kept, qb = torch.zeros_like(d), torch.zeros_like(d), torch.zeros_like(d)
        for gr in plan.groups:
            sl = slice(gr.start, gr.start + gr.size)
            sh, sc = group_params(d[:, sl], gr.bits)
            dh[:, sl] = dequantize_groups(quantize_groups(d[:, sl], sh, sc, gr.bits), sh, sc)
            kept[:, sl] = d[:, sl]
            shift_err = (sh.float() - d[:, sl].amin(-1)).clamp_min(0)
            qb[:, sl] = (sc.float() / 2 + shift_err)[:, None] + 1e-5 * d[:, sl].abs().amax(-1, keepdim=True)
        dec = (basis / s).T
        sl = slice(blk.offset, blk.offset + blk.p)
        x_hat[:, sl] = dh @ dec + blk.mean
        x_kept[:, sl] = kept @ dec + blk.mean
        bound[:, sl] = qb @ dec.abs()
    return x_hat, x_kept, bound


def predicted_kv(art, ratio, k, v, start_pos):
    """Decoded K/V [m, L, H, D] float32 that the coded rows k, v (pool layout, keys post-RoPE) should give."""
    m = k.shape[0]
    rope = RopeConfig.from_dict(art.model["rope"])
    pos = torch.arange(start_pos, start_pos + m)
    kx = undo_rope(k.float(), pos, rope).reshape(m, P)
    kh, _, _ = predicted(art, ratio, "k", kx)
    vh, _, _ = predicted(art, ratio, "v", v.float().reshape(m, P))
    return apply_rope(kh.view(m, L, H, D), pos, rope), vh.view(m, L, H, D)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, dtype):
    scale = want.float().abs().amax().clamp_min(1.0)
    err = (got.float() - want.float()).abs().amax()
    assert float(err) <= TOL[dtype] * float(scale), (float(err), TOL[dtype] * float(scale))
