"""Synthetic calibration artifacts, bit plans and KV rows for testing and benchmarking the codec kernels.

`synthetic_artifact` builds an artifact with an orthonormal basis per feature block and plans keyed by
their kept rank; `dp_like_plan` mimics the plans the DP produces (a few size-1 groups, then 8-bit,
4-bit and 2-bit groups of sizes 16..1024); `random_plan` draws general plans (size-1 groups anywhere,
including between aligned groups, dropped gaps, all bit widths). `synthetic_kv` draws tokens whose
pre-RoPE features are low-rank in the artifact's basis plus noise, post-RoPE keys as a pool holds them.
"""

from __future__ import annotations

import random

import torch

from kvtc_sglang.codec.artifact import CalibrationArtifact, FeatureBlock, RatioPlans
from kvtc_sglang.codec.calibrate import layer_partition
from kvtc_sglang.codec.plan import BitPlan, Group
from kvtc_sglang.codec.rope import RopeConfig, apply_rope


def dp_like_plan(p: int, rank: int, ratio_key: int, *, n_size1: int = 2) -> BitPlan:
    """A plan of kept rank `rank`: n_size1 single 8-bit coordinates, then 8-bit groups of 16/64 over
    the first quarter, 4-bit groups of 64/256 over the next 3/8 and 2-bit groups of 256/1024 after."""
    groups, pos = [], 0
    for _ in range(min(n_size1, rank)):
        groups.append(Group(pos, 1, 8))
        pos += 1
    pos = -(-pos // 16) * 16  # coordinates up to the next multiple of 16 are dropped

    def fill(end: int, bits: int, sizes: tuple[int, int]) -> None:
        nonlocal pos
        small, large = sizes
        while pos < end:
            size = large if pos % large == 0 and pos + large <= end else small
            size = min(size, end - pos)
            groups.append(Group(pos, size, bits))
            pos += size

    fill(max(pos, (rank // 4) // 16 * 16), 8, (16, 64))
    fill(max(pos, (rank * 5 // 8) // 16 * 16), 4, (64, 256))
    fill(rank, 2, (256, 1024))
    return BitPlan(tuple(groups), p, float(ratio_key))


def random_plan(p: int, rank: int, rng: random.Random, ratio_key: int = 1) -> BitPlan:
    """A general plan over coordinates [0, <= rank): size-1 groups anywhere (also breaking the
    alignment of the sub-byte areas), aligned groups of 16/64/256, dropped gaps, bits 2/4/8."""
    groups, pos = [], 0
    while pos < rank:
        u = rng.random()
        bits = rng.choice((2, 4, 8))
        if pos % 16:
            if u < 0.7:
                groups.append(Group(pos, 1, bits))
            pos += 1
            continue
        fits = [s for s in (16, 64, 256) if pos + s <= rank]
        if u < 0.25 or not fits:
            groups.append(Group(pos, 1, bits))
            pos += 1
        elif u < 0.35:
            pos += 16 if pos + 16 <= rank else 1
        else:
            size = rng.choice(fits)
            groups.append(Group(pos, size, bits))
            pos += size
    if not groups:
        groups.append(Group(0, 1, 8))
    return BitPlan(tuple(groups), p, float(ratio_key))


# Clip factors like the ones calibration fits (2-bit groups clipped hardest, 8-bit left min/max).
TYPICAL_CLIP = {(1 << i, b): c for i in range(1, 11) for b, c in ((2, 1.5), (4, 2.5))}


def synthetic_artifact(num_layers: int, num_kv_heads: int, head_dim: int, plans: dict[int, list[tuple]],
                       *, n_blocks: int = 1, rope: RopeConfig | None = None, feature_scale: bool = True,
                       seed: int = 0, device: str | torch.device = "cpu", clip: dict | None = TYPICAL_CLIP) -> CalibrationArtifact:
    """An artifact whose blocks have random orthonormal bases (computed on `device`, stored fp16 on CPU).

    Args:
        plans: {ratio_key: [(k_plan_b, v_plan_b) for each block b]} (BitPlans over each block's p_b).
        feature_scale: draw per-feature scales in [0.5, 2] (else no scale, i.e. ones).
        clip: encoder clip factors per (size, bits), used for both kinds (None: min/max).
    """
    rope = rope or RopeConfig(head_dim=head_dim, rotary_dim=head_dim, theta=500000.0, style="neox")
    g = torch.Generator(device="cpu").manual_seed(seed)
    gd = torch.Generator(device=device).manual_seed(seed)
    hd = num_kv_heads * head_dim
    ranges = layer_partition(num_layers, n_blocks)
    r_max = [max(max(pl[b][0].rank, pl[b][1].rank) for pl in plans.values()) for b in range(n_blocks)]
    blocks = {"k": [], "v": []}
    for kind in ("k", "v"):
        for b, (lo, hi) in enumerate(ranges):
            pb = (hi - lo) * hd
            z = torch.randn(pb, r_max[b], generator=gd, device=device)
            basis = torch.linalg.qr(z)[0].to(torch.float16).cpu()
            del z
            mean = torch.randn(pb, generator=g) * 0.5
            scale = (0.5 + 1.5 * torch.rand(pb, generator=g)) if feature_scale else None
            blocks[kind].append(FeatureBlock(lo, hi, lo * hd, pb, mean, basis, scale))
    ratio_plans = {key: RatioPlans(key, tuple(kv[0] for kv in pl), tuple(kv[1] for kv in pl)) for key, pl in plans.items()}
    model = {
        "name": f"synthetic-{num_layers}x{num_kv_heads}x{head_dim}", "fingerprint": f"synthetic-{seed}",
        "num_layers": num_layers, "num_kv_heads": num_kv_heads, "num_kv_heads_per_rank": num_kv_heads,
        "head_dim": head_dim, "rope": rope.to_dict(),
    }
    clip_tables = {kind: dict(clip) for kind in ("k", "v")} if clip else {}
    return CalibrationArtifact(model=model, blocks=blocks, plans=ratio_plans, clip=clip_tables)


def synthetic_kv(art: CalibrationArtifact, n: int, start_pos: int, *, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", seed: int = 0, noise: float = 0.05,
                 decay: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens at positions [start_pos, start_pos + n): k, v of shape [n, L, H, D] in `dtype` (keys post-RoPE).

    Pre-RoPE features = mean + (z * sigma) @ basis.T / scale + noise * N(0, 1), z standard normal, per
    block, with sigma_j proportional to j^-decay and scaled so the low-rank part has unit RMS per feature.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    L, H, D = art.num_layers, art.num_kv_heads, art.head_dim
    out = []
    for kind in ("k", "v"):
        parts = []
        for blk in art.blocks[kind]:
            r = blk.basis.shape[1]
            sigma = torch.arange(1, r + 1, dtype=torch.float32, device=device) ** -decay
            sigma = sigma * (blk.p / sigma.pow(2).sum()).sqrt()
            z = torch.randn(n, r, generator=g, device=device) * sigma
            x = z @ blk.basis.to(device, torch.float32).T
            del z
            x = x / blk.scale_or_ones().to(device) + blk.mean.to(device)
            x += noise * torch.randn(n, blk.p, generator=g, device=device)
            parts.append(x)
        x = torch.cat(parts, dim=1).view(n, L, H, D)
        if kind == "k":
            pos = torch.arange(start_pos, start_pos + n, device=device)
            x = apply_rope(x, pos, RopeConfig.from_dict(art.model["rope"]))
        out.append(x.to(dtype))
    return out[0], out[1]


def save_synthetic_card(directory, *, num_layers: int, num_kv_heads: int, head_dim: int,
                        ratios: tuple[int, ...] = (8, 16, 32, 64), tp_size: int = 1, tp_rank: int = 0,
                        rank: int = 16, model: dict | None = None):
    """Write a real, small artifact (card.json + tensors.pt, loadable by ``load_artifact``) for a model of the given
    KV geometry: a random orthonormal basis of ``rank`` columns per kind and one DP-like plan per ratio.

    Args:
        num_kv_heads: KV heads of the whole model; each of ``tp_size`` ranks holds ``max(1, num_kv_heads // tp_size)``.
        model: card ``model`` facts to set on top (e.g. ``{"fingerprint": ..., "rope": {...}}``): what the startup
            checks compare, written as given.
    Returns: the artifact directory.
    """
    from pathlib import Path

    per_rank = max(1, num_kv_heads // tp_size)
    p = num_layers * per_rank * head_dim
    plan = dp_like_plan(p, min(rank, p), 16)
    art = synthetic_artifact(num_layers, per_rank, head_dim, {r: [(plan, plan)] for r in ratios},
                             feature_scale=False, clip=None)
    art.model.update(num_kv_heads=num_kv_heads, num_kv_heads_per_rank=per_rank)
    art.model.update(model or {})
    art.tp_size, art.tp_rank = tp_size, tp_rank
    art.save(directory)
    return Path(directory)
