"""A one-request-at-a-time serving loop over a real SGLang KV pool and tree cache, for end-to-end checks on CPU.

``MiniEngine`` runs a transformers model the way SGLang's scheduler runs one request, with the KV of every cached
token living in an sglang ``MHATokenToKVPool`` managed by a tree cache (``RadixCache`` or ``KVTCRadixCache``):

    1. tokenize the chat with the tokenizer's chat template (generation prompt appended);
    2. ``match_prefix`` on ``RadixKey(ids, limit=len(ids) - 1)`` (at least one token is always computed, as
       ``Req.init_next_round_input`` does);
    3. with the last device node locked, ``init_load_back`` when the match reported ``host_hit_length > 0``, then lock
       the request's last node (``PrefillAdder.add_one_req``);
    4. gather the prefix's K/V rows from the pool slots into a transformers ``DynamicCache``, prefill the unmatched
       suffix, write its K/V into freshly allocated slots (evicting first when the allocator is short, as
       ``alloc_for_extend`` does);
    5. greedy decode: each fed token's K/V goes into a newly allocated slot; the last sampled token has no KV (it is
       never fed), as in SGLang;
    6. ``cache_finished_req`` with the request's ``req_to_token`` row: insert, free duplicate slots, unlock.

The model's cache always holds exactly what the pool holds: the K/V of freshly computed tokens is rounded to the
pool dtype in the ``DynamicCache`` too, so a token's KV reads the same whether it came from a hit or was just computed.

``run_lockstep`` drives a reference engine and an engine under test through the same interleaved multi-turn
conversations (the prompts are identical for both: earlier turns carry the recorded answer when the dataset has one,
else the reference engine's answer), the engine under test teacher-forced on the reference's answer, and records the
reference's answer and the tested engine's greedy choices; ``eval.agreement.agreement`` scores them.

Glossary: L layers, H KV heads, D head_dim; a slot is one row of the pool's per-layer [size + 1, H, D] buffers.
"""

from __future__ import annotations

import time
import types
from array import array
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

from kvtc_sglang import sglang_compat as compat
from kvtc_sglang.eval.agreement import first_divergence
from kvtc_sglang.eval.conversations import Conversation, interleaved
from kvtc_sglang.models.geometry import model_geometry
from kvtc_sglang.models.kv_capture import cache_from_kv, forward_with_cache

# ----------------------------------------------------------------------------------------------------------------------
# Pools and caches
# ----------------------------------------------------------------------------------------------------------------------


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(L, H, D) of a transformers config (``models.geometry``)."""
    return model_geometry(config).kv_shape


def make_kv_pool(config: Any, tokens: int, dtype: torch.dtype = torch.bfloat16):
    """A CPU ``MHATokenToKVPool`` of ``tokens`` slots shaped for the model, and a page-1 ``TokenToKVPoolAllocator``."""
    layers, heads, head_dim = kv_shape(config)
    pool = compat.MHATokenToKVPool(size=tokens, page_size=1, dtype=dtype, head_num=heads, head_dim=head_dim,
                                   layer_num=layers, device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    allocator = compat.TokenToKVPoolAllocator(size=tokens, dtype=dtype, device="cpu", kvcache=pool, need_sort=False)
    return pool, allocator


def cache_init_params(allocator: Any, max_context: int, requests: int = 4) -> Any:
    """sglang's ``CacheInitParams`` for a page-1, LRU tree over ``allocator``, with its own ``ReqToTokenPool``."""
    req_to_token_pool = compat.ReqToTokenPool(size=requests, max_context_len=max_context, device="cpu",
                                              enable_memory_saver=False)
    return compat.CacheInitParams(disable=False, req_to_token_pool=req_to_token_pool,
                                  token_to_kv_pool_allocator=allocator, page_size=1, eviction_policy="lru")


def make_radix_cache(allocator: Any, max_context: int) -> Any:
    """sglang's plain ``RadixCache`` over ``allocator``."""
    return compat.RadixCache(cache_init_params(allocator, max_context))


# ----------------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ChatStats:
    """What one ``MiniEngine.chat`` call did.

    Attributes:
        prompt_tokens: tokens of the templated chat.
        hot_hit_tokens: prefix tokens found in pool slots by ``match_prefix``.
        host_hit_tokens: tokens after them that ``match_prefix`` reported as ``host_hit_length`` (compressed/host).
        loaded_back_tokens: tokens ``init_load_back`` restored into slots (< host_hit_tokens when it fell short).
        computed_tokens: prompt tokens prefilled by the model.
        new_tokens: generated tokens (the stop token included).
        evict_requested_tokens: tokens this request asked ``evict`` for when the allocator was short.
        load_back_s, prefill_s, decode_s: seconds in ``init_load_back``, the prefill forward and the decode loop.
    """

    prompt_tokens: int = 0
    hot_hit_tokens: int = 0
    host_hit_tokens: int = 0
    loaded_back_tokens: int = 0
    computed_tokens: int = 0
    new_tokens: int = 0
    evict_requested_tokens: int = 0
    load_back_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0


class MiniEngine:
    """Greedy chat over a tree cache and its KV pool, one request at a time (see the module docstring).

    Args:
        model: a transformers causal LM (eager attention; its parameter dtype is the compute dtype).
        tokenizer: its tokenizer, with a chat template.
        tree_cache: an sglang tree cache built over ``allocator`` with a ``req_to_token_pool``.
        kv_round_dtype: round every KV row through this dtype before it is stored (``torch.float8_e4m3fn``: what
            ``--kv-cache-dtype fp8_e4m3`` keeps, with SGLang's default scale of 1.0); None stores the pool dtype.
        pool: the ``MHATokenToKVPool`` behind ``allocator`` (shape must match the model: [L] x [size + 1, H, D]).
        allocator: the pool's token allocator.
        stop_token_ids: tokens that end an answer; default the tokenizer's ``<|im_end|>`` and eos ids.
    """

    def __init__(self, model: Any, tokenizer: Any, tree_cache: Any, pool: Any, allocator: Any,
                 stop_token_ids: Sequence[int] | None = None, kv_round_dtype: torch.dtype | None = None):
        self.kv_round_dtype = kv_round_dtype  # e.g. torch.float8_e4m3fn: KV stored as an fp8 cache would hold it
        self.model, self.tokenizer = model, tokenizer
        self.tree_cache, self.pool, self.allocator = tree_cache, pool, allocator
        self.req_to_token_pool = tree_cache.req_to_token_pool
        shape = kv_shape(model.config)
        if (len(pool.k_buffer), *pool.k_buffer[0].shape[1:]) != shape:
            raise ValueError(f"the pool holds [L, H, D] = {[len(pool.k_buffer), *pool.k_buffer[0].shape[1:]]} per "
                             f"token, the model {list(shape)}")
        if stop_token_ids is None:
            ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
            stop_token_ids = [i for i in ids if isinstance(i, int) and i >= 0]
        self.stop_token_ids = set(int(i) for i in stop_token_ids)
        self.dtype = next(model.parameters()).dtype

    def tokenize(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat with the assistant's generation prompt appended."""
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(i) for i in ids]

    # --- slots ----------------------------------------------------------------------------------------------------
    def _scheduler_step(self) -> None:
        """What SGLang's scheduler runs once per iteration before forming a batch (a compressed tier acknowledges
        finished work and compresses ahead there); every forward here stands for one iteration."""
        step = getattr(self.tree_cache, "step", None)
        if step is not None:
            step()

    def _alloc(self, n: int, stats: ChatStats) -> torch.Tensor:
        """``n`` slots, evicting the shortfall first (``alloc_for_extend``/``alloc_for_decode`` on page size 1)."""
        self._scheduler_step()
        available = self.allocator.available_size()
        if available < n:
            stats.evict_requested_tokens += n - available
            self.tree_cache.evict(compat.EvictParams(num_tokens=n - available))
        slots = self.allocator.alloc(n)
        if slots is None:
            raise RuntimeError(f"KV pool exhausted: {n} slots needed, {self.allocator.available_size()} free after "
                               f"evicting (evictable {self.tree_cache.evictable_size()}); use a larger pool")
        return slots

    def _gather_cache(self, slots: torch.Tensor):
        """A DynamicCache holding the pool rows at ``slots`` (positions 0 .. n-1), in the model's dtype."""
        from transformers import DynamicCache

        if len(slots) == 0:
            return DynamicCache(config=self.model.config)
        k = torch.stack([b[slots] for b in self.pool.k_buffer], dim=1)
        v = torch.stack([b[slots] for b in self.pool.v_buffer], dim=1)
        return cache_from_kv(k, v, self.model.config, dtype=self.dtype)

    def _store_new(self, cache: Any, slots: torch.Tensor) -> None:
        """Write the cache's last ``len(slots)`` tokens into the pool at ``slots``, then put the pool-dtype values
        back into the cache (so it holds exactly what the pool holds)."""
        m = len(slots)
        with torch.inference_mode():  # the forward made the cache's tensors inference tensors
            for layer_id, layer in enumerate(cache.layers):
                for src, buf in ((layer.keys, self.pool.k_buffer[layer_id]),
                                 (layer.values, self.pool.v_buffer[layer_id])):
                    new = src[0, :, -m:, :]  # [H, m, D]
                    rows = new.transpose(0, 1)
                    if self.kv_round_dtype is not None:  # per-tensor scale 1.0, as SGLang's default fp8 KV cache
                        rows = rows.to(self.kv_round_dtype)
                    buf[slots] = rows.to(buf.dtype)
                    new.copy_(buf[slots].transpose(0, 1).to(src.dtype))

    # --- one request ----------------------------------------------------------------------------------------------
    def chat(self, messages: list[dict[str, str]], max_new_tokens: int,
             forced_ids: Sequence[int] | None = None) -> tuple[list[int], ChatStats]:
        """Answer the chat greedily (at most ``max_new_tokens``, stopping after a stop token).

        With ``forced_ids`` (teacher forcing) the answer fed back is ``forced_ids`` instead of the model's own choice,
        and the return value is the model's greedy choice at each of its positions: up to the first position where
        it differs from ``forced_ids`` this is exactly the free-running greedy answer, and from there on it scores
        next-token agreement on the forced answer. The tree then caches the prompt and ``forced_ids`` (but the last).

        Returns (answer token ids, the stop token included when one was generated; ChatStats).
        """
        if forced_ids is not None:
            forced_ids = [int(i) for i in forced_ids]
            max_new_tokens = len(forced_ids)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (and forced_ids non-empty), got {max_new_tokens}")
        ids = self.tokenize(messages)
        stats = ChatStats(prompt_tokens=len(ids))
        if len(ids) + max_new_tokens > self.req_to_token_pool.max_context_len:
            raise ValueError(f"{len(ids)} prompt + {max_new_tokens} new tokens exceed the request row "
                             f"({self.req_to_token_pool.max_context_len} tokens)")
        cache_tree = self.tree_cache
        req = types.SimpleNamespace(req_pool_idx=None, origin_input_ids=array("q", ids), output_ids=array("q"),
                                    extra_key=None, priority=0, last_node=None, cache_protected_len=0)
        if self.req_to_token_pool.alloc([req]) is None:
            raise RuntimeError("no free request row")

        # the scheduler step (a compressed tier acknowledges work and compresses ahead here), then match, load back,
        # lock (Req.init_next_round_input + PrefillAdder.add_one_req)
        self._scheduler_step()
        key = compat.RadixKey(array("q", ids), limit=len(ids) - 1)
        match = cache_tree.match_prefix(compat.MatchPrefixParams(key=key, req=req))
        prefix, req.last_node = match.device_indices, match.last_device_node
        stats.hot_hit_tokens, stats.host_hit_tokens = len(prefix), int(match.host_hit_length)
        if match.host_hit_length > 0:
            t0 = time.perf_counter()
            lock_node = req.last_node
            cache_tree.inc_lock_ref(lock_node)
            try:
                new, req.last_node = cache_tree.init_load_back(compat.InitLoadBackParams(
                    best_match_node=match.best_match_node, host_hit_length=match.host_hit_length, req=req))
            finally:
                cache_tree.dec_lock_ref(lock_node)
            start_loading = getattr(cache_tree, "start_loading", None)
            if start_loading is not None:  # the batch formed: the layer-wise decode runs (inline on the CPU)
                start_loading([req])
            prefix = torch.cat([prefix, new])
            stats.loaded_back_tokens = len(new)
            stats.load_back_s = time.perf_counter() - t0
        cache_tree.inc_lock_ref(req.last_node)
        req.cache_protected_len = len(prefix)

        try:
            answer, kv_slots = self._generate(ids, prefix, max_new_tokens, forced_ids, stats)
        except BaseException:
            cache_tree.dec_lock_ref(req.last_node)
            self.req_to_token_pool.free(req)
            raise

        # cache_finished_req: the KV covers the prompt and every answer token but the last
        req.output_ids = array("q", answer if forced_ids is None else forced_ids)
        kv_len = len(kv_slots)
        self.req_to_token_pool.write((req.req_pool_idx, slice(0, kv_len)), kv_slots.to(torch.int32))
        cache_tree.cache_finished_req(req, kv_len_to_handle=kv_len)
        self.req_to_token_pool.free(req)
        return answer, stats

    def _generate(self, ids: list[int], prefix: torch.Tensor, max_new_tokens: int, forced_ids: list[int] | None,
                  stats: ChatStats) -> tuple[list[int], torch.Tensor]:
        """Prefill the suffix after ``prefix`` and decode; returns (greedy choices, slots of every token with KV)."""
        fresh: list[torch.Tensor] = []
        try:
            t0 = time.perf_counter()
            cache = self._gather_cache(prefix)
            suffix = torch.tensor(ids[len(prefix):], dtype=torch.int64)
            slots = self._alloc(len(suffix), stats)
            fresh.append(slots)
            logits = forward_with_cache(self.model, cache, suffix)
            self._store_new(cache, slots)
            stats.computed_tokens = len(suffix)
            stats.prefill_s = time.perf_counter() - t0

            t0 = time.perf_counter()
            answer = [int(logits[-1].argmax())]
            fed = answer if forced_ids is None else forced_ids
            while fed[len(answer) - 1] not in self.stop_token_ids and len(answer) < max_new_tokens:
                slot = self._alloc(1, stats)
                fresh.append(slot)
                token = torch.tensor([fed[len(answer) - 1]], dtype=torch.int64)
                logits = forward_with_cache(self.model, cache, token)
                self._store_new(cache, slot)
                answer.append(int(logits[-1].argmax()))
            stats.decode_s = time.perf_counter() - t0
            stats.new_tokens = len(answer)
        except BaseException:
            if fresh:
                self.allocator.free(torch.cat(fresh))
            raise
        return answer, torch.cat([prefix, *fresh])


# ----------------------------------------------------------------------------------------------------------------------
# Lockstep runs
# ----------------------------------------------------------------------------------------------------------------------


def run_lockstep(reference: MiniEngine, tested: MiniEngine, conversations: Sequence[Conversation],
                 max_new_tokens: int, after_each: Callable[[dict], None] | None = None) -> list[dict]:
    """Serve every conversation's turns in ``interleaved`` order through both engines, with identical prompts.

    A turn's messages are the conversation so far: earlier user turns, each followed by its recorded answer or (none
    recorded) the reference engine's answer. The reference answers greedily; the tested engine is teacher-forced on
    the reference's answer (``MiniEngine.chat(forced_ids=...)``): its greedy choices equal its free-running answer
    up to the first divergence and score next-token agreement after it, and both trees cache the same sequences.

    Returns one record per request: user, turn (0-based), the reference answer and the tested engine's greedy choices
    (token ids), their first divergence (``eval.agreement.first_divergence``) and both engines' ChatStats (as dicts);
    ``after_each(record)`` runs after each request.
    """
    history: list[list[dict[str, str]]] = [[] for _ in conversations]
    records = []
    for u, t in interleaved(conversations):
        conv = conversations[u]
        messages = history[u] + [{"role": "user", "content": conv.user_turns[t]}]
        ref_ids, ref_stats = reference.chat(messages, max_new_tokens)
        got_ids, got_stats = tested.chat(messages, max_new_tokens, forced_ids=ref_ids)
        answer = conv.recorded_answers[t]
        if answer is None:
            answer = reference.tokenizer.decode([i for i in ref_ids if i not in reference.stop_token_ids],
                                                skip_special_tokens=True)
        history[u] = messages + [{"role": "assistant", "content": answer}]
        record = {"user": conv.name, "turn": t, "reference_ids": ref_ids, "tested_ids": got_ids,
                  "first_divergence": first_divergence(ref_ids, got_ids),
                  "reference": asdict(ref_stats), "tested": asdict(got_stats)}
        records.append(record)
        if after_each is not None:
            after_each(record)
    return records
