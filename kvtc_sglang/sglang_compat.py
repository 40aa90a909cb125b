"""The one place that knows which SGLang release this project is built against.

Every other module reaches SGLang through this file: symbol accessors, dotted hook targets, the few
private details the plugin depends on (ServerArgs' read-only guard, the memory-pool configurator's
bytes-per-token, the hook registry's bookkeeping), and the list of private ``RadixCache`` / ``TreeNode`` /
``RadixKey`` members that ``cache/radix_cache.py`` overrides or calls (``missing_tree_internals`` checks the
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
    # memory-pool sizing
    "KVCacheConfigurator": "sglang.srt.mem_cache.kv_cache_configurator",
    "create_memory_pool_configurator": "sglang.srt.model_executor.pool_configurator",
}

__all__ = [
    "SUPPORTED_SGLANG_VERSION", "SGLangVersionError", "installed_sglang_version", "sglang_version_in",
    "check_sglang_version", "installed_sglang_site_packages", "server_args_has_field", "set_server_args_fields",
    "hook_is_registered", "kv_bytes_per_token", "kv_pool_of", "rope_of_model", "parser_has_flag",
    "missing_tree_internals", "RADIX_CACHE_OVERRIDES", "RADIX_CACHE_PRIVATE_METHODS", "RADIX_CACHE_PRIVATE_ATTRIBUTES",
    "TREE_NODE_FIELDS", "RADIX_KEY_METHODS", "SERVER_ARGS_PATH",
    "SERVER_ARGS_RELPATH", "TARGET_ADD_CLI_ARGS", "TARGET_FROM_CLI_ARGS", "TARGET_POST_INIT",
    "TARGET_CONFIG_FROM_BUDGET", *_SYMBOLS,
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
# KVCacheConfigurator.config_from_budget(self, budget_bytes, *, cap_tokens=None) -> MemoryPoolConfig turns a KV byte
# budget into the pool's token count; both the profiling path (_resolve_memory_pool_config) and the post-CUDA-graph
# resize (compute_post_capture_kv_resize) go through it.
TARGET_CONFIG_FROM_BUDGET = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.config_from_budget"


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


def kv_bytes_per_token(configurator: Any) -> int:
    """KV-pool bytes per token slot (all layers, K and V, this rank's heads) as the pool sizing computes it.

    ``configurator`` is a ``KVCacheConfigurator``. Raises ValueError for pool families whose sizing is not a plain
    bytes-per-token product (hybrid SWA/SSM, DeepSeek V4), which the compressed tier does not support.
    """
    pool_configurator = __getattr__("create_memory_pool_configurator")(configurator)
    cell = getattr(pool_configurator, "_cell_size", None)
    if type(pool_configurator).__name__ != "DefaultPoolConfigurator" or not isinstance(cell, int) or cell <= 0:
        raise ValueError(
            f"the compressed KV tier needs a plain per-token KV pool, but sglang sizes this model's pool with "
            f"{type(pool_configurator).__name__} (cell size {cell!r})")
    return cell


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
}
# Private RadixCache methods KVTCRadixCache calls (leaf bookkeeping, KV events, hit counts).
RADIX_CACHE_PRIVATE_METHODS = ("_update_leaf_status", "_record_store_event", "_record_remove_event", "_delete_leaf",
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
