"""Calibration: real KV caches of a model -> PCA bases + DP bit plans -> a CalibrationArtifact.

Steps:
  1. tokenize the corpus, cut it into windows of `seq_len` tokens, prefill each window and take its
     KV cache (keys post-RoPE, as a serving engine stores them);
  2. drop the sink tokens (positions < sink_tokens, always stored exact), undo RoPE on keys, and
     scale each feature by its loss sensitivity when one is given (see models/kv_sensitivity.py);
  3. accumulate the mean and covariance of each feature block (float64) and keep a uniform random
     sample of tokens for the DP;
  4. eigendecompose -> bases; project the DP sample, measure group errors by quantizing it, solve the
     DP once for the largest budget and backtrack a plan per target ratio. The budget is B = 16 p / CR
     bits per token per kind; it is split across blocks by an exact min-plus allocation over the
     blocks' error curves. With sensitivity weighting, K and V errors share one unit (estimated loss),
     so the 2B bits of a token are allocated jointly across K and V;
  5. truncate each basis to the largest rank a plan uses and store it in float16.

KV source: any callable `kv_source(input_ids [n] int64) -> (k, v)` with k, v [n, L, H, D] float
(post-RoPE keys), so a transformers model, an SGLang engine or recorded tensors can all feed it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from kvtc_sglang.codec.artifact import CalibrationArtifact, FeatureBlock, RatioPlans
from kvtc_sglang.codec.defaults import DEFAULT_EXACT
from kvtc_sglang.codec.dp import budget_bits_for_ratio, fit_clip_factors, measure_error_tables, solve
from kvtc_sglang.codec.errors import ShapeError
from kvtc_sglang.codec.kinds import KINDS
from kvtc_sglang.codec.pca import CovarianceAccumulator, fit_pca
from kvtc_sglang.codec.plan import BitPlan
from kvtc_sglang.codec.rope import RopeConfig, undo_rope

KVSource = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
DEFAULT_RATIOS = (8, 16, 20, 32, 64)


@dataclass
class CalibrationSettings:
    seq_len: int = 1024
    max_tokens: int = 65536  # calibration tokens fed to the forward pass (sinks included)
    dp_samples: int = 4096  # tokens whose quantization error drives the DP
    ratios: Sequence[int] = DEFAULT_RATIOS
    layer_blocks: int = 1  # feature blocks per kind (1 = one model-wide basis)
    sink_tokens: int = DEFAULT_EXACT.sink_tokens
    window_tokens: int = DEFAULT_EXACT.window_tokens
    seed: int = 0
    joint_kv: bool = True  # with sensitivity weighting: one budget of 2B shared by K and V
    scale_floor: float = 0.3  # feature scales are clamped below at this fraction of their RMS
    # Per-layer energy equalization before PCA: each layer's (scaled) features are multiplied by
    # (mean energy / layer energy) ** (alpha / 2), per kind, so that no few high-variance layers own the basis.
    # 0 = off; 1 = equal energy per layer.
    layer_equalization: float = 0.0
    clip: bool = True  # fit per-(size, bits) clip factors of the quantizer range (False: min/max)
    # Every dp_holdout-th window feeds only the DP sample, never the covariance, so the DP sees the
    # basis's error on tokens it was not fitted to (0: the DP samples from every window).
    dp_holdout: int = 0
    device: str = "cpu"  # where covariances, eigendecompositions and DP error tables are computed
    dp_max_rank: int = 8192  # the DP allocates bits among the first dp_max_rank PCA coordinates of a block
    progress: bool = True
    notes: dict = field(default_factory=dict)


def layer_partition(num_layers: int, n_blocks: int) -> list[tuple[int, int]]:
    """Split [0, num_layers) into n_blocks contiguous ranges of (nearly) equal size."""
    if not 1 <= n_blocks <= num_layers:
        raise ShapeError(f"layer_blocks must be in [1, {num_layers}], got {n_blocks}")
    edges = np.linspace(0, num_layers, n_blocks + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def windows_from_ids(ids: Sequence[torch.Tensor], seq_len: int, max_tokens: int, seed: int) -> list[torch.Tensor]:
    """Cut token streams into non-overlapping windows, taking windows round-robin across streams
    (so a mixed corpus stays mixed) up to max_tokens tokens in total."""
    per_stream = [[t[i : i + seq_len] for i in range(0, t.numel() - seq_len + 1, seq_len)] for t in ids]
    g = torch.Generator().manual_seed(seed)
    for lst in per_stream:
        order = torch.randperm(len(lst), generator=g).tolist()
        lst[:] = [lst[i] for i in order]
    out, total, i = [], 0, 0
    while total + seq_len <= max_tokens and any(per_stream):
        lst = per_stream[i % len(per_stream)]
        if lst:
            out.append(lst.pop())
            total += seq_len
        i += 1
    return out


def allocate_budget(curves: list[np.ndarray], total_units: int) -> list[int]:
    """Split a budget across independent parts minimizing the summed error.

    curves[i][u] = least error of part i with at most u budget units (non-increasing in u).
    Exact min-plus convolution, O(parts * U^2 / vectorized). Returns units per part.
    """
    if len(curves) == 1:
        return [min(total_units, len(curves[0]) - 1)]
    U = total_units
    acc = np.asarray(curves[0][: U + 1], dtype=np.float64)
    if acc.shape[0] < U + 1:
        acc = np.concatenate([acc, np.full(U + 1 - acc.shape[0], acc[-1])])
    splits = []
    for c in curves[1:]:
        c = np.asarray(c[: U + 1], dtype=np.float64)
        if c.shape[0] < U + 1:
            c = np.concatenate([c, np.full(U + 1 - c.shape[0], c[-1])])
        new = np.full(U + 1, np.inf)
        arg = np.zeros(U + 1, dtype=np.int64)
        for k in range(U + 1):  # k units to the new part
            cand = acc[: U + 1 - k] + c[k]
            better = cand < new[k:]
            new[k:][better] = cand[better]
            arg[k:][better] = k
        splits.append(arg)
        acc = new
    units, u = [], U
    for arg in reversed(splits):
        k = int(arg[u])
        units.append(k)
        u -= k
    units.append(u)
    return list(reversed(units))


class _Reservoir:
    """Uniform random sample of up to `cap` rows from a stream of [n, f] batches."""

    def __init__(self, cap: int, seed: int):
        self.cap, self.seen, self.rows = cap, 0, None
        self.g = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        x = x.float().cpu()
        if self.rows is None:
            self.rows = torch.empty(self.cap, x.shape[1])
            self.filled = 0
        for start in range(0, x.shape[0], 4096):
            batch = x[start : start + 4096]
            n = batch.shape[0]
            take = min(self.cap - self.filled, n)
            if take:
                self.rows[self.filled : self.filled + take] = batch[:take]
                self.filled += take
            rest = batch[take:]
            idx = torch.arange(self.seen + take, self.seen + n) + 1
            if rest.shape[0]:
                j = (torch.rand(rest.shape[0], generator=self.g) * idx.double()).long()
                keep = j < self.cap
                self.rows[j[keep]] = rest[keep]
            self.seen += n

    def scale_columns(self, c: torch.Tensor) -> None:
        """Multiply every kept row by c ([f] float32), as if the stream had been scaled."""
        if self.rows is not None:
            self.rows[: self.filled] *= c

    def sample(self) -> torch.Tensor:
        return self.rows[: self.filled]


def sensitivity_scales(fisher: dict[str, torch.Tensor], floor: float) -> dict[str, torch.Tensor]:
    """Feature scales from diagonal Fisher vectors {"k": [p], "v": [p]}: sqrt(F) over the RMS of
    both kinds together (so K and V keep their relative weight), clamped below at `floor`."""
    s = {kind: f.double().clamp_min(0).sqrt() for kind, f in fisher.items()}
    rms = torch.cat(list(s.values())).pow(2).mean().sqrt().clamp_min(1e-30)
    return {kind: (x / rms).clamp_min(floor).float() for kind, x in s.items()}


def equalization_factors(variances: torch.Tensor, num_layers: int, alpha: float) -> torch.Tensor:
    """Per-layer factors c_l = (mean_l E / E_l) ** (alpha / 2), E_l = summed variance of layer l's features.

    variances: [p] (features ordered [layer][head][dim]); returns [num_layers] float64. Scaling layer l's features
    by c_l makes the layers' energies E_l * c_l^2 equal when alpha = 1 (alpha = 0: all ones).
    """
    e = variances.double().view(num_layers, -1).sum(1).clamp_min(1e-30)
    return (e.mean() / e) ** (alpha / 2)


def calibrate(
    kv_source: KVSource,
    windows: Iterable[torch.Tensor],
    model_facts: dict,
    settings: CalibrationSettings = CalibrationSettings(),
    head_slice: slice | None = None,
    sensitivity: dict[str, torch.Tensor] | None = None,
) -> CalibrationArtifact:
    """Calibrate from the KV caches `kv_source` produces for each window of token ids.

    Args:
        model_facts: dict with name, fingerprint, num_layers, num_kv_heads (whole model),
            num_kv_heads_per_rank, head_dim, rope (RopeConfig dict); stored in the card.
        head_slice: KV heads of this TP rank (default: all heads).
        sensitivity: optional {"k": [p], "v": [p]} diagonal Fisher of this rank's features (keys in
            pre-RoPE coordinates); features are weighted by its square root.
    """
    t0 = time.time()
    L, D = int(model_facts["num_layers"]), int(model_facts["head_dim"])
    H = int(model_facts.get("num_kv_heads_per_rank", model_facts["num_kv_heads"]))
    rope = RopeConfig.from_dict(model_facts["rope"])
    parts = layer_partition(L, settings.layer_blocks)
    p = L * H * D
    blocks_geom = [(a, b, a * H * D, (b - a) * H * D) for a, b in parts]
    acc = {kind: [CovarianceAccumulator(pb, settings.device) for _, _, _, pb in blocks_geom] for kind in KINDS}
    if sensitivity is not None:
        scales = sensitivity_scales({kind: sensitivity[kind] for kind in KINDS}, settings.scale_floor)
        for kind in KINDS:
            if scales[kind].shape != (p,):
                raise ShapeError(f"sensitivity for {kind} has shape {tuple(scales[kind].shape)}, expected [{p}]")
    else:
        scales = {kind: torch.ones(p) for kind in KINDS}
    res = {kind: _Reservoir(settings.dp_samples, settings.seed + i) for i, kind in enumerate(KINDS)}
    windows = list(windows)
    n_tokens = 0
    for wi, ids in enumerate(tqdm(windows, desc="calibration prefill", disable=not settings.progress, unit="win")):
        held_out = settings.dp_holdout > 0 and wi % settings.dp_holdout == settings.dp_holdout - 1
        k, v = kv_source(ids)
        if head_slice is not None:
            k, v = k[:, :, head_slice], v[:, :, head_slice]
        if tuple(k.shape[1:]) != (L, H, D):
            raise ShapeError(f"KV source returned {tuple(k.shape)}, expected [n, {L}, {H}, {D}]")
        n = k.shape[0]
        pos = torch.arange(n, device=k.device)
        keep = pos >= settings.sink_tokens
        kx = undo_rope(k.float(), pos, rope)[keep].reshape(-1, p).cpu()
        vx = v.float()[keep].reshape(-1, p).cpu()
        for kind, x in (("k", kx * scales["k"]), ("v", vx * scales["v"])):
            if not held_out:
                for a_, (_, _, off, pb) in zip(acc[kind], blocks_geom):
                    a_.update(x[:, off : off + pb])
            if held_out or settings.dp_holdout == 0:
                res[kind].add(x)
        n_tokens += x.shape[0]
    t_prefill = time.time() - t0
    layer_factors = {}
    if settings.layer_equalization > 0:
        for kind in KINDS:
            c = equalization_factors(torch.cat([a_.variances() for a_ in acc[kind]]), L,
                                     settings.layer_equalization)
            layer_factors[kind] = [round(float(x), 4) for x in c]
            cf = c.repeat_interleave(H * D)
            for a_, (_, _, off, pb) in zip(acc[kind], blocks_geom):
                a_.rescale(cf[off : off + pb])
            res[kind].scale_columns(cf.float())
            scales[kind] = scales[kind] * cf.float()

    blocks: dict[str, list[FeatureBlock]] = {}
    solutions: dict[str, list] = {}
    clip_tables: dict[str, dict] = {}
    max_budget = budget_bits_for_ratio(p, min(settings.ratios))
    for kind in KINDS:
        blocks[kind], solutions[kind] = [], []
        sample = res[kind].sample()
        bases = []
        for a_ in tqdm(acc[kind], desc=f"PCA ({kind})", disable=not settings.progress, unit="block"):
            bases.append(fit_pca(a_))
            a_.release()  # the covariance (p^2 float64) is not needed once its basis exists
        dev_sample = sample.to(settings.device)
        all_coeffs = [b.project(dev_sample[:, off : off + pb], r=min(pb, settings.dp_max_rank))
                      for b, (_, _, off, pb) in zip(bases, blocks_geom)]
        clip_tables[kind] = fit_clip_factors(all_coeffs) if settings.clip else {}
        for (la, lb, off, pb), basis, coeffs in tqdm(list(zip(blocks_geom, bases, all_coeffs)), desc=f"DP ({kind})", disable=not settings.progress, unit="block"):
            tables = measure_error_tables(coeffs, clip=clip_tables[kind])
            joint = sensitivity is not None and settings.joint_kv
            sol = solve(tables, min(max_budget * (2 if joint else 1), 8 * pb + 32 * pb), p=pb)
            solutions[kind].append(sol)
            sc = scales[kind][off : off + pb]
            blocks[kind].append(FeatureBlock(la, lb, off, pb, basis.mean / sc, basis.basis, sc))

    plans: dict[int, RatioPlans] = {}
    per_kind_plans: dict[int, dict[str, list[BitPlan]]] = {}
    joint = sensitivity is not None and settings.joint_kv
    for ratio in settings.ratios:
        per_kind_plans[ratio] = {}
        groups = [list(KINDS)] if joint else [[kind] for kind in KINDS]
        for kinds in groups:
            sols = [s for kind in kinds for s in solutions[kind]]
            unit = sols[0].unit
            total_units = len(kinds) * budget_bits_for_ratio(p, ratio) // unit
            units = allocate_budget([s.error_curve() for s in sols], total_units)
            it = iter(zip(sols, units))
            for kind in kinds:
                per_kind_plans[ratio][kind] = [s.plan_for(u * unit, float(ratio)) for s, u in (next(it) for _ in solutions[kind])]
    for kind in KINDS:
        for bi, blk in enumerate(blocks[kind]):
            r_max = max(max(per_kind_plans[r][kind][bi].rank for r in settings.ratios), 1)
            blocks[kind][bi] = FeatureBlock(blk.layer_start, blk.layer_end, blk.offset, blk.p, blk.mean.float(),
                                            blk.basis[:, :r_max].to(torch.float16).contiguous(), blk.scale)
    for ratio in settings.ratios:
        plans[int(ratio)] = RatioPlans(int(ratio), tuple(per_kind_plans[ratio]["k"]), tuple(per_kind_plans[ratio]["v"]))

    return CalibrationArtifact(
        clip=clip_tables,
        model=dict(model_facts),
        blocks=blocks,
        plans=plans,
        sink_tokens=settings.sink_tokens,
        window_tokens=settings.window_tokens,
        calibration={
            "windows": len(windows),
            "seq_len": settings.seq_len,
            "tokens": n_tokens,
            "dp_samples": min(settings.dp_samples, n_tokens),
            "dp_holdout": settings.dp_holdout,
            "layer_blocks": settings.layer_blocks,
            "weighting": "fisher" if sensitivity is not None else "none",
            "joint_kv_budget": joint,
            "scale_floor": settings.scale_floor if sensitivity is not None else None,
            "layer_equalization": settings.layer_equalization,
            **({"layer_factors": layer_factors} if layer_factors else {}),
            "ratios": list(settings.ratios),
            "seed": settings.seed,
            "seconds_prefill": round(t_prefill, 1),
            "seconds_total": round(time.time() - t0, 1),
            **settings.notes,
        },
    )
