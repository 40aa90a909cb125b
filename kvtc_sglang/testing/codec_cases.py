"""Small KV pools, slot allocators and calibration artifacts for testing and benchmarking the pool codec.

    small_artifact(L, H, D, ...)      random orthonormal bases and random bit plans (`synthetic.py`)
    exact_artifact(L, H, D, ...)      bases that are signed permutations, power-of-two scales and grid-valued
                                      means, with KV rows on a grid and zero rotary dims: every step of the
                                      encode (RoPE undo, centering, projection, group min/max, packing) is
                                      exact in float32 and float16, so any two correct implementations produce
                                      the same payload bytes whatever their summation order
    Pool                              per-layer K/V buffers [n_slots, H, D] + a page allocator (slot 0 reserved)
"""

from __future__ import annotations

import random

import torch

from kvtc_sglang.codec.artifact import CalibrationArtifact, FeatureBlock, RatioPlans
from kvtc_sglang.codec.calibrate import layer_partition
from kvtc_sglang.codec.plan import BitPlan, Group
from kvtc_sglang.codec.rope import RopeConfig
from kvtc_sglang.testing.synthetic import random_plan, synthetic_artifact, synthetic_kv

FP8 = torch.float8_e4m3fn


def small_artifact(L: int = 2, H: int = 2, D: int = 32, *, n_blocks: int = 2, rank_k: int = 48, rank_v: int = 40,
                   seed: int = 0, rope: RopeConfig | None = None, clip: bool = True,
                   device: str | torch.device = "cpu") -> CalibrationArtifact:
    """A synthetic artifact with random bases and random plans (ratio key 1)."""
    rng = random.Random(seed)
    plans = []
    for lo, hi in layer_partition(L, n_blocks):
        pb = (hi - lo) * H * D
        plans.append((random_plan(pb, min(rank_k, pb), rng), random_plan(pb, min(rank_v, pb), rng)))
    kw = {} if clip else {"clip": None}
    return synthetic_artifact(L, H, D, {1: plans}, n_blocks=n_blocks, rope=rope, seed=seed, device=device, **kw)


def _grid_plan(p: int, rank: int, rng: random.Random) -> BitPlan:
    """Groups of sizes 1/16/64 (powers of two keep group means exact) at 2/4/8 bits, over [0, rank)."""
    groups, pos = [], 0
    while pos < rank:
        size = rng.choice([s for s in (1, 16, 64) if pos % s == 0 and pos + s <= rank] or [1])
        groups.append(Group(pos, size, rng.choice((2, 4, 8))))
        pos += size
    return BitPlan(tuple(groups), p, 1.0)


def exact_artifact(L: int = 2, H: int = 2, D: int = 32, *, n_blocks: int = 2, rank: int = 48, seed: int = 0,
                   rotary_dim: int = 8) -> CalibrationArtifact:
    """An artifact on which encoding is exact arithmetic (see the module docstring); no clipping."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    hd = H * D
    blocks = {"k": [], "v": []}
    plans = []
    for lo, hi in layer_partition(L, n_blocks):
        pb = (hi - lo) * hd
        pair = []
        for kind in ("k", "v"):
            r = min(rank, pb)
            rows = torch.randperm(pb, generator=g)[:r]
            basis = torch.zeros(pb, r)
            signs = torch.randint(0, 2, (r,), generator=g).float() * 2 - 1
            basis[rows, torch.arange(r)] = signs
            mean = (torch.randint(-16, 16, (pb,), generator=g).float() + 0.5) / 8  # odd multiples of 1/16
            scale = 2.0 ** torch.randint(-1, 2, (pb,), generator=g).float()
            blocks[kind].append(FeatureBlock(lo, hi, lo * hd, pb, mean, basis.to(torch.float16), scale))
            pair.append(_grid_plan(pb, r, rng))
        plans.append(tuple(pair))
    rope = RopeConfig(head_dim=D, rotary_dim=rotary_dim, theta=10000.0, style="neox")
    model = {"name": f"exact-{L}x{H}x{D}", "fingerprint": f"exact-{seed}", "num_layers": L, "num_kv_heads": H,
             "num_kv_heads_per_rank": H, "head_dim": D, "rope": rope.to_dict()}
    rp = {1: RatioPlans(1, tuple(p[0] for p in plans), tuple(p[1] for p in plans))}
    return CalibrationArtifact(model=model, blocks=blocks, plans=rp, clip={})


def exact_kv(art: CalibrationArtifact, n: int, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
             device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [n, L, H, D] on a grid of multiples of 1/8 in [-4, 4) (1/4 in [-2, 2) for fp8 e4m3 bytes, so every
    value is exact in the pool dtype), with the rotated dims of keys zero (undoing RoPE is then exact at any
    position)."""
    g = torch.Generator().manual_seed(seed)
    L, H, D = art.num_layers, art.num_kv_heads, art.head_dim
    rope = RopeConfig.from_dict(art.model["rope"])
    lim, den = (8, 4) if dtype == torch.uint8 else (32, 8)
    k = torch.randint(-lim, lim, (n, L, H, D), generator=g).float() / den
    v = torch.randint(-lim, lim, (n, L, H, D), generator=g).float() / den
    k[..., : rope.rotary_dim] = 0
    if dtype == torch.uint8:
        return k.to(FP8).view(torch.uint8).to(device), v.to(FP8).view(torch.uint8).to(device)
    return k.to(dtype).to(device), v.to(dtype).to(device)


def random_kv(art: CalibrationArtifact, n: int, start: int, *, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank-plus-noise keys/values (post-RoPE keys) in the pool dtype (uint8 = fp8 e4m3 bytes)."""
    k, v = synthetic_kv(art, n, start, dtype=torch.float32, device=device, seed=seed)
    if dtype == torch.uint8:
        return k.to(FP8).view(torch.uint8), v.to(FP8).view(torch.uint8)
    return k.to(dtype), v.to(dtype)


class Pool:
    """Per-layer K/V buffers [n_pages * page_size + page_size, H, D] and a page allocator like SGLang's
    (slot 0 / page 0 reserved; pages handed out in a shuffled order, so slots are not contiguous)."""

    def __init__(self, L: int, H: int, D: int, n_pages: int, dtype: torch.dtype, *, page_size: int = 1,
                 device: str | torch.device = "cpu", seed: int = 0, poison: float = 7.0):
        self.page_size = page_size
        n_slots = (n_pages + 1) * page_size
        fill = 0xAB if dtype == torch.uint8 else poison
        self.k = [torch.full((n_slots, H, D), fill, dtype=dtype, device=device) for _ in range(L)]
        self.v = [torch.full((n_slots, H, D), fill, dtype=dtype, device=device) for _ in range(L)]
        self.free = list(range(1, n_pages + 1))
        random.Random(seed).shuffle(self.free)
        self.device = torch.device(device)

    def alloc_pages(self, n_pages: int) -> torch.Tensor:
        """Slots of n_pages pages: [n_pages * page_size] int64 on the device."""
        pages = [self.free.pop() for _ in range(n_pages)]
        slots = [p * self.page_size + i for p in pages for i in range(self.page_size)]
        return torch.tensor(slots, dtype=torch.int64).to(self.device)

    def alloc_tokens(self, n: int) -> torch.Tensor:
        """Slots for n tokens (whole pages, the first n slots of them)."""
        return self.alloc_pages(-(-n // self.page_size))[:n]

    def write(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        for layer in range(len(self.k)):
            self.k[layer][slots] = k[:, layer]
            self.v[layer][slots] = v[:, layer]

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.stack([b[slots] for b in self.k], 1), torch.stack([b[slots] for b in self.v], 1))

    def snapshot(self) -> list[torch.Tensor]:
        return [b.clone() for b in self.k + self.v]
