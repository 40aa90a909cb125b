"""Fixtures of the cache tests: a tiny synthetic calibration artifact, CPU KV pools and allocators of sglang 0.5.17,
deterministic KV data with its error bound, and a driver that serves requests the way sglang's scheduler does.

Model shape: L=2 layers, H=2 KV heads, D=16 (p=64). The artifact's basis is an exactly orthonormal float16 matrix (a
signed, permuted Hadamard matrix / 8), truncated to 32 columns; its plan keeps those 32 coordinates as two groups of
16 at 8 bits. KV data lies in the span of the 32 columns (keys before RoPE), so the reconstruction error of a token
is bounded by its quantization error (``KVData.bound``).
"""

from __future__ import annotations

import math
import types
from array import array

import pytest
import torch

L, H, D = 2, 2, 16
P = L * H * D
RANK = 32
RATIO = 16
GROUP = 16
DTYPE_EPS = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These tests move tiny tensors: intra-op threads only add synchronization (and on a shared CPU, stalls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the synthetic calibration artifact ------------------------------------------------------------------------------

def _signed_hadamard_basis(seed: int) -> torch.Tensor:
    """[P, RANK] float16 with exactly orthonormal columns (entries +-1/8)."""
    h = torch.ones(1, 1)
    while h.shape[0] < P:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    g = torch.Generator().manual_seed(seed)
    h = h[torch.randperm(P, generator=g)][:, torch.randperm(P, generator=g)] / math.sqrt(P)
    return h[:, :RANK].to(torch.float16)


def make_artifact(seed: int = 0):
    """A CalibrationArtifact for the L=2, H=2, D=16 model with one 16x plan (32 coordinates at 8 bits)."""
    from kvtc_sglang.codec.artifact import CalibrationArtifact, FeatureBlock, RatioPlans
    from kvtc_sglang.codec.plan import BitPlan, Group
    from kvtc_sglang.codec.rope import RopeConfig

    blocks = {kind: [FeatureBlock(0, L, 0, P, torch.zeros(P), _signed_hadamard_basis(seed + i), torch.ones(P))]
              for i, kind in enumerate(("k", "v"))}
    plan = BitPlan(tuple(Group(s, GROUP, 8) for s in range(0, RANK, GROUP)), P, float(RATIO))
    rope = RopeConfig(head_dim=D, rotary_dim=D, theta=10000.0, style="neox")
    model = {"name": "synthetic-l2h2d16", "fingerprint": "synthetic-l2h2d16", "num_layers": L, "num_kv_heads": H,
             "num_kv_heads_per_rank": H, "head_dim": D, "rope": rope.to_dict()}
    return CalibrationArtifact(model=model, blocks=blocks, plans={RATIO: RatioPlans(RATIO, (plan,), (plan,))})


@pytest.fixture(scope="session")
def artifact():
    return make_artifact()


# --- KV data ---------------------------------------------------------------------------------------------------------

class KVData:
    """KV rows of token ``t`` at position ``pos``: per-token-id coefficients in the artifact's span, keys RoPE'd.

    Every sequence sharing a prefix gets the same rows for it (as a real model's KV would). Rows are computed one
    (token, position) at a time and memoized, so they are bit-identical however the tokens are batched.
    """

    def __init__(self, artifact, vocab: int = 256, seed: int = 1):
        from kvtc_sglang.codec.rope import RopeConfig

        g = torch.Generator().manual_seed(seed)
        basis = {kind: artifact.blocks[kind][0].basis.float() for kind in ("k", "v")}
        self.coef = {kind: torch.randn(vocab, RANK, generator=g) for kind in ("k", "v")}
        self.k_pre = (self.coef["k"] @ basis["k"].T).view(vocab, L, H, D)
        self.v = (self.coef["v"] @ basis["v"].T).view(vocab, L, H, D)
        self.rope = RopeConfig.from_dict(artifact.model["rope"])
        self.vocab = vocab
        self._k: dict[tuple[int, int], torch.Tensor] = {}

    def _key(self, token: int, pos: int) -> torch.Tensor:
        from kvtc_sglang.codec.rope import apply_rope

        row = self._k.get((token, pos))
        if row is None:
            row = apply_rope(self.k_pre[token:token + 1], torch.tensor([pos]), self.rope)[0]
            self._k[(token, pos)] = row
        return row

    def kv(self, tokens, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v): shape [n, L, H, D], float32, for ``tokens`` at positions start .. start+n-1."""
        tokens = list(tokens)
        if not tokens:
            return torch.empty(0, L, H, D), torch.empty(0, L, H, D)
        if min(tokens) < 0 or max(tokens) >= self.vocab:
            raise ValueError(f"token ids must be in [0, {self.vocab}) (KVData(vocab=...)), got {min(tokens)}..{max(tokens)}")
        k = torch.stack([self._key(t, start + i) for i, t in enumerate(tokens)])
        return k, self.v[torch.as_tensor(tokens, dtype=torch.int64)]

    def bound(self, tokens, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token L2 error bound of a restored K and V row (shape [n] each, float32).

        Quantization: each coordinate of a 16-coordinate 8-bit group is off by at most half a step, range / 255 / 2
        (the fp16 scale is rounded up; its shift's fp16 rounding adds at most 2^-10 of the group's magnitude);
        the basis is orthonormal, so coefficient error is feature error. Plus the pool dtype's rounding of the row
        written and of the row restored (3 eps |x|), and float32 RoPE arithmetic (1e-5 |x|).
        """
        ids = torch.as_tensor(list(tokens), dtype=torch.int64)
        out = []
        for kind in ("k", "v"):
            c = self.coef[kind][ids].view(-1, RANK // GROUP, GROUP)
            hi, lo = c.amax(-1), c.amin(-1)
            step = (hi - lo) / 255 / 2 * (1 + 2.0 ** -9) + (hi.abs() + lo.abs()) * 2.0 ** -10
            q = (GROUP * (step ** 2).sum(-1)).sqrt()
            norm = self.coef[kind][ids].norm(dim=-1)
            out.append(1.02 * q + (3 * DTYPE_EPS[dtype] + 1e-5) * norm)
        return out[0], out[1]


# --- sglang pools, allocators and the cache --------------------------------------------------------------------------

ALLOCATORS = [("token", 1), ("paged", 1), ("paged", 4)]
ALLOCATOR_IDS = ["token-p1", "paged-p1", "paged-p4"]


@pytest.fixture(params=ALLOCATORS, ids=ALLOCATOR_IDS)
def allocator_setup(request):
    """(allocator kind, page size): sglang's TokenToKVPoolAllocator (page 1) and PagedTokenToKVPoolAllocator (1, 4)."""
    return request.param


def make_pool_and_allocator(kind: str, page_size: int, tokens: int, dtype: torch.dtype = torch.bfloat16,
                            need_sort: bool = False, shape: tuple[int, int, int] = (L, H, D)):
    """A CPU MHATokenToKVPool of ``shape`` (default: the synthetic model's) and an sglang allocator over it."""
    from kvtc_sglang import sglang_compat as compat

    layers, heads, head_dim = shape
    pool = compat.MHATokenToKVPool(size=tokens, page_size=page_size, dtype=dtype, head_num=heads, head_dim=head_dim,
                                   layer_num=layers, device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    if kind == "token":
        assert page_size == 1
        allocator = compat.TokenToKVPoolAllocator(size=tokens, dtype=dtype, device="cpu", kvcache=pool,
                                                  need_sort=need_sort)
    else:
        allocator = compat.PagedTokenToKVPoolAllocator(size=tokens, page_size=page_size, dtype=dtype, device="cpu",
                                                       kvcache=pool, need_sort=need_sort)
    return pool, allocator


class TierHarness:
    """A KVTCRadixCache over a CPU pool with the contract's test double as codec (tests/cache/fake_codec.py).

    Keywords: allocator ("token"/"paged"), page_size, pool_tokens, dtype, shape (L, H, D), eviction_policy,
    transfer_mode ("inline"/"deferred"), coded_bytes_per_token, in_place ("scratch"/"direct"/None), host_bytes,
    store_cap_bytes, need_sort, tp_group, plus KVTCOptions fields (defaults: 2 sinks, window 4, min compress 4,
    compress ahead from an empty pool).
    """

    def __init__(self, *, allocator: str = "paged", page_size: int = 1, pool_tokens: int = 256,
                 dtype: torch.dtype = torch.float32, shape: tuple[int, int, int] = (2, 2, 8),
                 eviction_policy: str = "lru", transfer_mode: str = "inline", coded_bytes_per_token: int | None = None,
                 in_place: str | None = "scratch", host_bytes: int = 0, store_cap_bytes: int | None = None,
                 need_sort: bool = False, tp_group=None, kv=None, **option_values):
        from kvtc_sglang import sglang_compat as compat
        from kvtc_sglang.cache.options import KVTCOptions
        from kvtc_sglang.cache.radix_cache import KVTCRadixCache
        from tests.cache.fake_codec import FakeKV, FakePoolCodec

        self.compat = compat
        self.page_size = page_size
        self.dtype = dtype
        self.shape = shape
        self.pool, self.allocator = make_pool_and_allocator(allocator, page_size, pool_tokens, dtype, need_sort,
                                                            shape)
        self.capacity = self.allocator.available_size()
        self.req_to_token_pool = compat.ReqToTokenPool(size=64, max_context_len=pool_tokens + 64, device="cpu",
                                                       enable_memory_saver=False)
        values = dict(kv_compress="kvtc", sink_tokens=2, window_tokens=4, min_compress_tokens=4,
                      compress_ahead_watermark=0.0, stats_interval_s=1e9)
        values.update(option_values)
        self.options = KVTCOptions.from_values(**values).validate()
        params = compat.CacheInitParams(disable=False, req_to_token_pool=self.req_to_token_pool,
                                        token_to_kv_pool_allocator=self.allocator, page_size=page_size,
                                        eviction_policy=eviction_policy, tp_cache_group=tp_group)
        self.kv = kv if kv is not None else FakeKV(*shape)
        self.codec = FakePoolCodec(self.kv, dtype, coded_bytes_per_token, in_place)
        self.cache = KVTCRadixCache(params, self.codec, self.options, transfer_mode=transfer_mode,
                                    host_budget_bytes=host_bytes, store_cap_bytes=store_cap_bytes)

    # --- KV rows --------------------------------------------------------------------------------------------------
    def write(self, slots: torch.Tensor, tokens, start: int = 0) -> None:
        k, v = self.kv.batch(list(tokens), start)
        layers = self.shape[0]
        for layer in range(layers):
            self.pool.k_buffer[layer][slots] = k[:, layer].to(self.dtype)
            self.pool.v_buffer[layer][slots] = v[:, layer].to(self.dtype)

    def rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) pool rows at ``slots``: [n, L, H, D] float32."""
        return (torch.stack([b[slots] for b in self.pool.k_buffer], 1).float(),
                torch.stack([b[slots] for b in self.pool.v_buffer], 1).float())

    def kv_state(self, slots: torch.Tensor, tokens, start: int = 0) -> list[str]:
        """Per token: "exact" (the rows as written), "coded" (as written, last element + 1: restored from a
        coded token) or "wrong"."""
        got_k, got_v = self.rows(slots)
        want_k, want_v = self.kv.batch(list(tokens), start)
        want_k, want_v = want_k.to(self.dtype).float(), want_v.to(self.dtype).float()
        out = []
        for i in range(len(tokens)):
            gk, gv, wk, wv = got_k[i], got_v[i], want_k[i], want_v[i]
            if torch.equal(gk, wk) and torch.equal(gv, wv):
                out.append("exact")
                continue
            mk, mv = wk.clone(), wv.clone()
            mk[..., -1] += 1.0
            mv[..., -1] += 1.0
            same_body = torch.equal(gk[..., :-1], wk[..., :-1]) and torch.equal(gv[..., :-1], wv[..., :-1])
            marked = torch.all((gk[..., -1] - wk[..., -1]) >= 1.0) and torch.all((gv[..., -1] - wv[..., -1]) >= 1.0)
            out.append("coded" if same_body and bool(marked) else "wrong")
        return out

    def assert_kv(self, slots: torch.Tensor, tokens, start: int = 0, exact=()) -> list[str]:
        """Rows at ``slots`` hold ``tokens``' KV (exact, or restored from a coded token); bit-exact at ``exact``."""
        assert len(slots) == len(tokens)
        states = self.kv_state(slots, tokens, start)
        assert "wrong" not in states, states
        for i in exact:
            assert states[i] == "exact", (i, states)
        return states

    # --- tree operations ------------------------------------------------------------------------------------------
    def key(self, tokens, limit: int | None = None):
        return self.compat.RadixKey(array("q", tokens), limit=limit)

    def alloc(self, n: int) -> torch.Tensor:
        pages = -(-n // self.page_size) * self.page_size
        if self.allocator.available_size() < pages:
            self.cache.evict(self.compat.EvictParams(num_tokens=pages - self.allocator.available_size()))
        slots = self.allocator.alloc(pages)
        assert slots is not None, "allocator exhausted"
        return slots[:n]

    def insert(self, tokens) -> int:
        """Write and insert a page-aligned sequence as a finished request would; returns the insert's prefix_len."""
        assert len(tokens) % self.page_size == 0
        slots = self.alloc(len(tokens))
        self.write(slots, tokens)
        result = self.cache.insert(self.compat.InsertParams(key=self.key(tokens), value=slots))
        if result.prefix_len:
            self.allocator.free(slots[:result.prefix_len])
        return result.prefix_len

    def match(self, tokens, req=None):
        return self.cache.match_prefix(self.compat.MatchPrefixParams(key=self.key(tokens), req=req))

    def load_back(self, match, run: bool = True):
        """init_load_back, then (as a formed batch) start_loading; ``run`` executes deferred loads."""
        out = self.cache.init_load_back(self.compat.InitLoadBackParams(best_match_node=match.best_match_node,
                                                                       host_hit_length=match.host_hit_length))
        self.cache.start_loading()
        if run:
            self.gpu("load")
        return out

    def gpu(self, stream: str | None = None, count: int | None = None) -> int:
        """Let the (deferred) side streams run."""
        return self.cache.transfer.run_pending(stream, count)

    def evict(self, n: int) -> int:
        return self.cache.evict(self.compat.EvictParams(num_tokens=n)).num_tokens_evicted

    def node_for(self, tokens):
        node = self.cache.root_node
        i = 0
        while i < len(tokens):
            child = node.children.get(self.key(tokens[i:]).child_key(self.page_size))
            assert child is not None, f"no node for {tokens[:i + 1]}"
            i += len(child.key)
            node = child
        assert i == len(tokens), "tokens end inside a node"
        return node

    def state(self, tokens) -> str:
        from kvtc_sglang.cache.tier_state import state_of

        return state_of(self.node_for(tokens)).value

    def check(self, private_tokens: int = 0) -> None:
        """The cache's own consistency check plus SGLang's pool invariant (its own checker's arithmetic)."""
        from sglang.srt.managers.scheduler_components.invariant_checker import SchedulerInvariantChecker

        cache = self.cache
        cache.check_consistency()
        leak, msg = SchedulerInvariantChecker._check_pool_invariant(
            "full", self.allocator.available_size(), cache.evictable_size(), cache.protected_size(), 0,
            self.capacity, private_tokens)
        assert not leak, msg


@pytest.fixture
def make_tier():
    """``make_tier(**kw) -> TierHarness`` (see TierHarness for the keywords)."""
    return lambda **kw: TierHarness(**kw)


# --- requests, as sglang's scheduler runs them -----------------------------------------------------------------------

class Request(types.SimpleNamespace):
    """The fields of sglang's Req that RadixCache.cache_finished_req / cache_unfinished_req read."""

    def get_fill_ids(self):
        return self.origin_input_ids + self.output_ids


def new_request(harness, tokens) -> Request:
    pool = harness.req_to_token_pool
    return Request(req_pool_idx=pool.free_slots.pop(0), origin_input_ids=array("q", tokens), output_ids=array("q"),
                   cache_protected_len=0, last_node=None, extra_key=None, prefix_indices=None, priority=0,
                   private_tokens=0, kv_indices=None)


def admit(harness, tokens, *, run_loads: bool = True):
    """Match, lock, load back, form the batch (start_loading), allocate and write the rest, like
    PrefillAdder.add_one_req + prepare_for_extend + the forward (which waits for the loads: deferred loads run).

    Returns (request, info): info has the match, the restored indices and the chain of COMPRESSED/HOST nodes the
    match reported; or (None, info) when no slots could be found (the request holds nothing then).
    """
    cache = harness.cache
    compat = harness.compat
    req = new_request(harness, tokens)
    match = cache.match_prefix(compat.MatchPrefixParams(key=harness.key(tokens, limit=len(tokens) - 1), req=req))
    req.prefix_indices, req.last_node = match.device_indices, match.last_device_node
    info = types.SimpleNamespace(match=match, restored=None, chain=[])
    node = match.best_match_node
    from kvtc_sglang.cache.tier_state import COLD_STATES, state_of

    while state_of(node) in COLD_STATES:
        info.chain.insert(0, node)
        node = node.parent
    lock_node = req.last_node
    cache.inc_lock_ref(lock_node)
    try:
        if match.host_hit_length > 0:
            new, req.last_node = cache.init_load_back(compat.InitLoadBackParams(
                best_match_node=match.best_match_node, host_hit_length=match.host_hit_length, req=req))
            info.restored = new
            req.prefix_indices = torch.cat([req.prefix_indices, new])
    finally:
        cache.dec_lock_ref(lock_node)
    cache.inc_lock_ref(req.last_node)
    req.cache_protected_len = len(req.prefix_indices)
    need = len(tokens) - len(req.prefix_indices)
    pages = -(-need // harness.page_size) * harness.page_size
    if harness.allocator.available_size() < pages:
        cache.evict(compat.EvictParams(num_tokens=pages - harness.allocator.available_size()))
    slots = harness.allocator.alloc(pages) if pages else req.prefix_indices[:0]
    cache.start_loading([req])
    if run_loads:
        harness.gpu("load")
    if slots is None:
        cache.dec_lock_ref(req.last_node)
        harness.req_to_token_pool.free_slots.append(req.req_pool_idx)
        return None, info
    req.private_tokens = pages
    start = len(req.prefix_indices)
    harness.write(slots[:need], tokens[start:], start)
    req.kv_indices = torch.cat([req.prefix_indices, slots[:need]])
    harness.req_to_token_pool.write((req.req_pool_idx, slice(0, len(tokens))), req.kv_indices.to(torch.int32))
    return req, info


def finish(harness, req: Request) -> None:
    """cache_finished_req, then release the request's row (what the scheduler does when a request ends)."""
    harness.cache.cache_finished_req(req, kv_len_to_handle=len(req.origin_input_ids))
    harness.req_to_token_pool.free_slots.append(req.req_pool_idx)
    req.private_tokens = 0


def checkpoint(harness, req: Request) -> None:
    """cache_unfinished_req (a chunked prefill boundary): the page-aligned part goes into the tree."""
    harness.cache.cache_unfinished_req(req)
    n = len(req.origin_input_ids)
    aligned = n // harness.page_size * harness.page_size
    req.private_tokens = -(-(n - aligned) // harness.page_size) * harness.page_size


@pytest.fixture
def requests():
    """Namespace of the request driver: new_request, admit, finish, checkpoint."""
    return types.SimpleNamespace(new_request=new_request, admit=admit, finish=finish, checkpoint=checkpoint)
