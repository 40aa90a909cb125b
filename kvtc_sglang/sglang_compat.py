"""The one place that knows which SGLang release this project is built against.

Every other module reaches SGLang through this file: symbol accessors, dotted hook targets, the few
private details the plugin depends on (ServerArgs' read-only guard, the memory-pool configurator's
bytes-per-token, the hook registry's bookkeeping), and the list of private ``RadixCache`` / ``TreeNode`` /
``RadixKey`` members that ``cache/radix_cache.py`` (and its parts) overrides or calls (``missing_tree_internals`` checks the
installed sglang still has them; a test keeps the list complete). Porting to a new SGLang release means editing
this file (and regenerating ``patches/``), then reworking whatever ``missing_tree_internals`` reports.

SGLang symbols are imported lazily on first attribute access (PEP 562), so importing this module is
cheap and does not pull in SGLang::

    from kvtc_sglang.sglang_compat import RadixCache, TreeNode, MatchResult
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any

SUPPORTED_SGLANG_VERSION = "0.5.17"


class SGLangVersionError(RuntimeError):
    """The installed (or targeted) SGLang is not the release this project supports."""


# ---------------------------------------------------------------------------------------------------------------------
# Version
# ---------------------------------------------------------------------------------------------------------------------

# `__version__ = "0.5.17"`, `version = '0.5.17'` or `__version__ = version = '0.5.17'` (sglang/_version.py)
_VERSION_ASSIGN = re.compile(
    r"""^\s*(?:__version__|version)\s*(?:=\s*(?:__version__|version)\s*)?=\s*['"]([^'"]+)['"]""", re.MULTILINE)


def installed_sglang_version() -> str | None:
    """Version of the ``sglang`` distribution installed in this environment, or None if absent."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return None


def sglang_version_in(site_packages: str | Path) -> str | None:
    """Version of the sglang laid out under ``site_packages`` (a folder holding ``sglang/``), read from files only.

    Looks, in order, at ``sglang-*.dist-info/METADATA``, ``sglang/_version.py`` and ``sglang/version.py`` (a
    literal ``__version__ = "x.y.z"`` assignment). Returns None when none of them names a version.
    """
    root = Path(site_packages)
    for dist_info in sorted(root.glob("sglang-*.dist-info")):
        metadata = dist_info / "METADATA"
        if metadata.is_file():
            for line in metadata.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
                if not line.strip():
                    break
    for name in ("_version.py", "version.py"):
        path = root / "sglang" / name
        if path.is_file():
            match = _VERSION_ASSIGN.search(path.read_text(encoding="utf-8", errors="replace"))
            if match:
                return match.group(1)
    return None


def check_sglang_version(version: str | None = None, *, where: str = "installed") -> str:
    """Raise SGLangVersionError unless ``version`` (default: the installed one) is SUPPORTED_SGLANG_VERSION.

    Returns the checked version string.
    """
    if version is None:
        version = installed_sglang_version()
    if version is None:
        raise SGLangVersionError(
            f"sglang is not installed ({where}); kvtc-sglang needs sglang=={SUPPORTED_SGLANG_VERSION}: "
            f"pip install 'sglang=={SUPPORTED_SGLANG_VERSION}'")
    if version != SUPPORTED_SGLANG_VERSION:
        raise SGLangVersionError(
            f"kvtc-sglang supports sglang=={SUPPORTED_SGLANG_VERSION} only, but found sglang {version} ({where}). "
            f"Install the supported release (pip install 'sglang=={SUPPORTED_SGLANG_VERSION}') or a kvtc-sglang "
            f"release built for sglang {version}.")
    return version


def installed_sglang_site_packages() -> Path | None:
    """The folder that holds the installed ``sglang`` package (its site-packages), without importing sglang."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


# ---------------------------------------------------------------------------------------------------------------------
# Lazily imported symbols
# ---------------------------------------------------------------------------------------------------------------------

_SYMBOLS: dict[str, str] = {
    # configuration
    "ServerArgs": "sglang.srt.server_args",
    "add_cli_args_from_dataclass": "sglang.srt.arg_groups.arg_utils",
    # plugins
    "HookRegistry": "sglang.srt.plugins.hook_registry",
    "HookType": "sglang.srt.plugins.hook_registry",
    "load_plugins": "sglang.srt.plugins",
    # radix-cache backend registry
    "register_radix_cache_backend": "sglang.srt.mem_cache.registry",
    "get_radix_cache_factory": "sglang.srt.mem_cache.registry",
    "registered_radix_cache_backends": "sglang.srt.mem_cache.registry",
    "TreeCacheBuildContext": "sglang.srt.mem_cache.registry",
    "CacheInitParams": "sglang.srt.mem_cache.cache_init_params",
    # the radix tree
    "RadixCache": "sglang.srt.mem_cache.radix_cache",
    "TreeNode": "sglang.srt.mem_cache.radix_cache",
    "RadixKey": "sglang.srt.mem_cache.radix_cache",
    "BasePrefixCache": "sglang.srt.mem_cache.base_prefix_cache",
    "MatchResult": "sglang.srt.mem_cache.base_prefix_cache",
    "MatchPrefixParams": "sglang.srt.mem_cache.base_prefix_cache",
    "InsertParams": "sglang.srt.mem_cache.base_prefix_cache",
    "InsertResult": "sglang.srt.mem_cache.base_prefix_cache",
    "EvictParams": "sglang.srt.mem_cache.base_prefix_cache",
    "EvictResult": "sglang.srt.mem_cache.base_prefix_cache",
    "IncLockRefResult": "sglang.srt.mem_cache.base_prefix_cache",
    "DecLockRefParams": "sglang.srt.mem_cache.base_prefix_cache",
    "DecLockRefResult": "sglang.srt.mem_cache.base_prefix_cache",
    "InitLoadBackParams": "sglang.srt.mem_cache.base_prefix_cache",
    "split_node_hash_value": "sglang.srt.mem_cache.utils",
    # KV pools and allocators
    "KVCache": "sglang.srt.mem_cache.memory_pool",
    "MHATokenToKVPool": "sglang.srt.mem_cache.memory_pool",
    "MLATokenToKVPool": "sglang.srt.mem_cache.memory_pool",
    "ReqToTokenPool": "sglang.srt.mem_cache.memory_pool",
    "BaseTokenToKVPoolAllocator": "sglang.srt.mem_cache.allocator",
    "TokenToKVPoolAllocator": "sglang.srt.mem_cache.allocator",
    "PagedTokenToKVPoolAllocator": "sglang.srt.mem_cache.allocator",
    # layer-wise loading (HiCache's counter, reused for the compressed tier's decode)
    "LayerDoneCounter": "sglang.srt.managers.cache_controller",
    # request finishing
    "FINISH_ABORT": "sglang.srt.managers.schedule_batch",
}

__all__ = [
    "SUPPORTED_SGLANG_VERSION", "SGLangVersionError", "installed_sglang_version", "sglang_version_in",
    "check_sglang_version", "installed_sglang_site_packages", "server_args_has_field", "set_server_args_fields",
    "hook_is_registered", "kv_pool_of", "rope_of_model", "layer0_kv_weights", "served_tokenizer", "parser_has_flag",
    "missing_tree_internals", "RADIX_CACHE_OVERRIDES", "RADIX_CACHE_PRIVATE_METHODS", "RADIX_CACHE_PRIVATE_ATTRIBUTES",
    "TREE_NODE_FIELDS", "RADIX_KEY_METHODS", "SERVER_ARGS_PATH", "SERVER_ARGS_RELPATH", "TARGET_ADD_CLI_ARGS",
    "TARGET_FROM_CLI_ARGS", "TARGET_POST_INIT", "TARGET_RUN_BATCH", "TARGET_FORM_PREFILL_BATCH", "abort_request",
    "pool_is_post_capture", "register_layer_counter", "scheduler_forward_stream", "unsupported_pool_features",
    *_SYMBOLS,
]


def __getattr__(name: str) -> Any:
    module_name = _SYMBOLS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SYMBOLS))


# ---------------------------------------------------------------------------------------------------------------------
# Hook targets (dotted paths resolved by HookRegistry.apply_hooks)
# ---------------------------------------------------------------------------------------------------------------------

SERVER_ARGS_PATH = "sglang.srt.server_args.ServerArgs"
# The file the in-tree patch edits, relative to site-packages.
SERVER_ARGS_RELPATH = "sglang/srt/server_args.py"
# @staticmethod add_cli_args(parser): builds the whole `sglang serve` / launch_server parser.
TARGET_ADD_CLI_ARGS = SERVER_ARGS_PATH + ".add_cli_args"
# @classmethod from_cli_args(cls, args): keeps only namespace attributes that are dataclass fields.
TARGET_FROM_CLI_ARGS = SERVER_ARGS_PATH + ".from_cli_args"
# Runs the whole resolution pipeline, then makes the fields read-only (materialize_declarations).
TARGET_POST_INIT = SERVER_ARGS_PATH + ".__post_init__"
SCHEDULER_PATH = "sglang.srt.managers.scheduler.Scheduler"
# Scheduler.run_batch(self, batch, ...): launches one forward (on self.forward_stream in overlap mode). An AFTER hook
# records an event there, which orders the tier's side-stream KV reads and writes after that forward (CUDA graphs
# order SGLang's schedule stream only after a graph's read-done event, scheduler.py _apply_war_barrier).
TARGET_RUN_BATCH = SCHEDULER_PATH + ".run_batch"
# Scheduler._get_new_batch_prefill_raw(self, prefill_delayer_single_pass, running_batch) -> (batch | None,
# running_batch): forms the prefill batch (match_prefix, add_one_req -> init_load_back, prepare_for_extend). A BEFORE
# hook is the tier's once-per-step poll/launch point; an AFTER hook launches the layer-wise decode of the pending
# load-backs and sets batch.hicache_consumer_index (SGLang sets it only under --enable-hierarchical-cache,
# scheduler.py:3307).
TARGET_FORM_PREFILL_BATCH = SCHEDULER_PATH + "._get_new_batch_prefill_raw"


# ---------------------------------------------------------------------------------------------------------------------
# Private details, wrapped
# ---------------------------------------------------------------------------------------------------------------------

def server_args_has_field(name: str) -> bool:
    """Whether ServerArgs declares dataclass field ``name`` (True for kv_compress once the in-tree patch is applied)."""
    import dataclasses

    server_args_cls = __getattr__("ServerArgs")
    return any(f.name == name for f in dataclasses.fields(server_args_cls))


def set_server_args_fields(server_args: Any, source: str, **values: Any) -> None:
    """Set attributes on a ServerArgs, also after its fields became read-only at the end of ``__post_init__``.

    sglang 0.5.17 rejects plain assignment once ``_declarations_materialized`` is set; ``ServerArgs.override`` is the
    audited mutation point (it records ``source``). Objects without ``override`` (argparse namespaces, plain objects)
    get a plain setattr.
    """
    override = getattr(server_args, "override", None)
    if callable(override) and getattr(server_args, "_declarations_materialized", False):
        override(source, **values)
        return
    for name, value in values.items():
        setattr(server_args, name, value)


def hook_is_registered(target: str, hook: Any) -> bool:
    """Whether ``hook`` is already registered on ``target`` in sglang's HookRegistry (keeps registration idempotent)."""
    registry = __getattr__("HookRegistry")
    return any(registered is hook for _type, registered, _source in registry._hooks.get(target, ()))


def kv_pool_of(allocator: Any) -> Any:
    """The KV pool (``KVCache``) behind a token-to-KV allocator."""
    get = getattr(allocator, "get_kvcache", None)
    if get is None:
        raise TypeError(f"{type(allocator).__name__} is not a token-to-KV allocator (no get_kvcache())")
    return get()


def rope_of_model(model: Any) -> dict[str, Any] | None:
    """``{"theta": float, "style": "neox"|"gptj"}`` read from the first rotary-embedding module of a loaded model.

    SGLang's ``RotaryEmbedding`` keeps ``base`` and ``is_neox_style``; returns None if the model has none.
    """
    modules = getattr(model, "modules", None)
    if modules is None:
        return None
    for module in modules():
        if hasattr(module, "is_neox_style") and hasattr(module, "base"):
            return {"theta": float(module.base), "style": "neox" if module.is_neox_style else "gptj"}
    return None


def layer0_kv_weights(model: Any) -> dict[str, Any] | str:
    """Layer 0's key and value projection weights of a loaded model, as this rank holds them, or why not.

    SGLang's attention layers (Llama, Qwen2/3, Mistral, ...) hold one fused ``qkv_proj`` (``QKVParallelLinear``): the
    rank's weight is ``[(num_heads + 2 * num_kv_heads) * head_size, hidden]``, query rows first, then the key rows
    and the value rows of the rank's KV heads (global heads ``tp_rank * num_kv_heads ...``, or
    ``tp_rank // num_kv_head_replicas`` when heads are replicated). A transformers model has separate
    ``k_proj``/``v_proj`` (all heads).

    Returns:
        ``{"k": [H_rank * D, hidden], "v": same, "head_dim": D, "first_head": int}`` (views of the weights), or a
        string saying why the weights cannot be read: no model, no recognizable projection, quantized weights.
    """
    if model is None or not hasattr(model, "modules"):
        return "the loaded model is not available to the cache builder"
    import torch

    floats = (torch.float32, torch.float16, torch.bfloat16)
    for module in model.modules():
        qkv = getattr(module, "qkv_proj", None)
        if qkv is not None and all(hasattr(qkv, a) for a in ("num_heads", "num_kv_heads", "head_size")):
            method = type(getattr(qkv, "quant_method", None)).__name__
            weight = getattr(qkv, "weight", None)
            if method not in ("UnquantizedLinearMethod", "NoneType") or not isinstance(weight, torch.Tensor) \
                    or weight.dtype not in floats:
                return (f"layer 0's qkv_proj is quantized ({method}, weight dtype "
                        f"{getattr(weight, 'dtype', None)}); its weights are not those the card was measured on")
            q, kv, d = int(qkv.num_heads) * int(qkv.head_size), int(qkv.num_kv_heads) * int(qkv.head_size), \
                int(qkv.head_size)
            if weight.dim() != 2 or weight.shape[0] != q + 2 * kv:
                return (f"layer 0's qkv_proj weight has shape {tuple(weight.shape)}, not [(q + 2 kv) rows, hidden] "
                        f"with q = {q}, kv = {kv}")
            replicas = int(getattr(qkv, "num_kv_head_replicas", 1) or 1)
            rank = int(getattr(qkv, "tp_rank", 0) or 0)
            first = rank // replicas if replicas > 1 else rank * int(qkv.num_kv_heads)
            return {"k": weight[q:q + kv], "v": weight[q + kv:q + 2 * kv], "head_dim": d, "first_head": first}
        k, v = getattr(module, "k_proj", None), getattr(module, "v_proj", None)
        if k is not None and v is not None and isinstance(getattr(k, "weight", None), torch.Tensor):
            head_dim = getattr(module, "head_dim", None)
            if not isinstance(head_dim, int) or k.weight.dtype not in floats or v.weight.dtype not in floats:
                return "layer 0's k_proj/v_proj weights are quantized or their head size is unknown"
            return {"k": k.weight, "v": v.weight, "head_dim": head_dim, "first_head": 0}
    return f"{type(model).__name__} has no attention layer with a qkv_proj or k_proj/v_proj the check recognizes"


def served_tokenizer(server_args: Any) -> Any:
    """The tokenizer SGLang's TokenizerManager loads for ``server_args`` (same function, same arguments), or None
    under ``--skip-tokenizer-init``. Multimodal processors are not loaded: their tokenizer is read the same way.
    Raises whatever ``get_tokenizer`` raises when the files cannot be loaded."""
    if getattr(server_args, "skip_tokenizer_init", False):
        return None
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    return get_tokenizer(
        getattr(server_args, "tokenizer_path", None) or server_args.model_path,
        tokenizer_mode=getattr(server_args, "tokenizer_mode", "auto"),
        trust_remote_code=getattr(server_args, "trust_remote_code", False),
        revision=getattr(server_args, "revision", None),
        tokenizer_backend=getattr(server_args, "tokenizer_backend", "huggingface"),
    )


def parser_has_flag(parser: Any, flag: str) -> bool:
    """Whether an argparse parser already defines ``flag`` (a ServerArgs patched in-tree declares the kvtc flags).

    argparse has no public query for this; it keeps every option string in ``_option_string_actions``.
    """
    return flag in parser._option_string_actions


# ---------------------------------------------------------------------------------------------------------------------
# Private members of sglang's radix tree that KVTCRadixCache relies on
# ---------------------------------------------------------------------------------------------------------------------

# Methods KVTCRadixCache overrides, with the parameter names of sglang 0.5.17's signatures (the base class calls them).
RADIX_CACHE_OVERRIDES: dict[str, tuple[str, ...]] = {
    "_insert_helper": ("self", "node", "key", "value", "priority", "chunked"),
    "_split_node": ("self", "key", "child", "split_len"),
    "_update_leaf_status": ("self", "node"),
}
# Private RadixCache methods KVTCRadixCache calls (leaf bookkeeping, KV events, hit counts).
RADIX_CACHE_PRIVATE_METHODS = ("_update_leaf_status", "_record_store_event", "_record_remove_event",
                               "_inc_hit_count")
# Private RadixCache instance attributes KVTCRadixCache reads (set by the base class's __init__/reset).
RADIX_CACHE_PRIVATE_ATTRIBUTES = ("_empty_match_result",)
# TreeNode attributes KVTCRadixCache reads or writes (new nodes of a split or an insert copy them).
TREE_NODE_FIELDS = ("key", "value", "children", "parent", "lock_ref", "last_access_time", "hit_count", "hash_value",
                    "priority", "id")
# RadixKey methods of the prefix walk.
RADIX_KEY_METHODS = ("maybe_to_bigram_view", "page_aligned", "child_key", "match")


def missing_tree_internals() -> list[str]:
    """The listed private members the installed sglang lacks, or whose overridden signature changed; [] when the
    tree cache can run on it. Imports sglang."""
    import inspect

    radix_cache, tree_node, radix_key = (__getattr__(n) for n in ("RadixCache", "TreeNode", "RadixKey"))
    missing = []
    for name, params in RADIX_CACHE_OVERRIDES.items():
        method = getattr(radix_cache, name, None)
        if method is None:
            missing.append(f"RadixCache.{name}")
        elif tuple(inspect.signature(method).parameters) != params:
            missing.append(f"RadixCache.{name}{tuple(inspect.signature(method).parameters)} (expected {params})")
    missing += [f"RadixCache.{n}" for n in RADIX_CACHE_PRIVATE_METHODS if not callable(getattr(radix_cache, n, None))]
    source = inspect.getsource(radix_cache)
    missing += [f"RadixCache.{n}" for n in RADIX_CACHE_PRIVATE_ATTRIBUTES if f"self.{n} =" not in source]
    node = tree_node()
    missing += [f"TreeNode.{n}" for n in TREE_NODE_FIELDS if not hasattr(node, n)]
    missing += [f"RadixKey.{n}" for n in RADIX_KEY_METHODS if not callable(getattr(radix_key, n, None))]
    return missing


def scheduler_forward_stream(scheduler: Any) -> Any:
    """The stream a Scheduler launches forwards on (``forward_stream``; None when it has none, e.g. on CPU)."""
    return getattr(scheduler, "forward_stream", None)


def register_layer_counter(pool: Any, tp_worker: Any, counter: Any) -> None:
    """Make attention of layer i wait for ``counter``'s layer i (``KVCache.register_layer_transfer_counter``, read
    by ``get_key_buffer``/``get_value_buffer``) and let the TP worker set the consumer per batch
    (``TpModelWorker.register_hicache_layer_transfer_counter``, read from ``batch.hicache_consumer_index``)."""
    pool.register_layer_transfer_counter(counter)
    if tp_worker is not None and hasattr(tp_worker, "register_hicache_layer_transfer_counter"):
        tp_worker.register_hicache_layer_transfer_counter(counter)


def abort_request(req: Any, message: str) -> None:
    """Finish a scheduled request with an abort (its output is an error, not text) and keep its KV out of the radix
    tree (``skip_radix_cache_insert``: release_kv_cache / maybe_cache_unfinished_req skip the insert)."""
    req.skip_radix_cache_insert = True
    if hasattr(req, "to_finish"):
        req.to_finish = __getattr__("FINISH_ABORT")(message)


def unsupported_pool_features(server_args: Any) -> list[tuple[str, str]]:
    """(flag, reason) for each SGLang 0.5.17 feature that moves or discards KV-pool memory behind the tier's back:
    blob payloads live in pool slots, so the tier refuses them."""
    out = []
    if getattr(server_args, "enable_unified_memory", False):
        out.append(("--enable-unified-memory", "the unified-memory pool compacts and remaps slots "
                                                 "(flush_opportunistic), which would move blob payloads"))
    if _post_capture_kv_sizing_env():
        out.append(("SGLANG_ENABLE_POST_CAPTURE_KV_SIZING=1", "the VMM-backed pool is resized after the radix cache "
                                                              "is built (post-capture sizing), which changes the "
                                                              "slot count the tier accounts against"))
    if getattr(server_args, "enable_memory_saver", False):
        out.append(("--enable-memory-saver", "release_memory_occupation discards the KV pool, blob payloads "
                                               "included"))
    mode = getattr(server_args, "disaggregation_mode", "null")
    if mode not in (None, "null", "", "none"):
        out.append((f"--disaggregation-mode {mode}", "PD disaggregation writes KV into preallocated slots over "
                                                       "RDMA, outside the stream order the tier relies on"))
    return out


def _post_capture_kv_sizing_env() -> bool:
    import os

    return os.environ.get("SGLANG_ENABLE_POST_CAPTURE_KV_SIZING", "").strip().lower() in ("1", "true", "yes", "on")


def pool_is_post_capture(pool: Any) -> bool:
    """The KV pool is VMM-backed and sized after CUDA-graph capture (``MHATokenToKVPool.post_capture_active``)."""
    return bool(getattr(pool, "post_capture_active", False))
