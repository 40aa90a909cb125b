"""What the tier reads from the pool codec beyond its call contract (codec/interfaces.py ``PoolCodec``).

* the job classes (``EncodeJob``, ``DecodeJob``): the codec object's own attributes when it carries them (test
  doubles, alternative codecs), else those of ``kvtc_sglang.codec.interfaces`` or ``kvtc_sglang.codec.jobs``;
* the JIT compile count (``jit_compiles``/``compile_count``: an int attribute or a method; 0 when absent);
* ``encode_reads_before_writes``: True when one ``encode`` call finishes every read of its source slots before its
  first write of a destination row, so a node can be compressed into its own first slots (in place);
* ``layer_group``: how many layers one ``decode_layers`` call should cover (default 1).
"""

from __future__ import annotations

from typing import Any


def codec_class(codec: Any, name: str) -> Any:
    cls = getattr(codec, name, None)
    if cls is not None:
        return cls
    import importlib

    for module in ("kvtc_sglang.codec.interfaces", "kvtc_sglang.codec.jobs"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if cls is not None:
            return cls
    raise ImportError(f"no {name} class: the codec carries none and kvtc_sglang.codec has none")


def codec_compile_count(codec: Any) -> int:
    """JIT compiles the codec reports: its ``jit_compiles``/``compile_count`` (an int or a method), else a
    ``jit_compiles()`` function of the module defining its class; 0 when there is none."""
    import sys

    owners = (codec, sys.modules.get(type(codec).__module__))
    for owner in owners:
        for name in ("jit_compiles", "compile_count"):
            value = getattr(owner, name, None)
            if callable(value):
                value = value()
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return 0


def scratch_rows_of(pool_rows: Any) -> int:
    """Rows of the codec's scratch area in a planned pool (0 when it has none)."""
    return int(getattr(pool_rows, "scratch_rows", 0) or 0)


def in_place_mode(codec: Any, pool_rows: Any) -> str | None:
    """How a node is compressed into its own first slots: "scratch" (encode into the pool's scratch rows, then
    ``codec.copy_rows`` into the node's rows), "direct" (the codec reads before it writes), or None (not
    possible: compress into free slots instead)."""
    if scratch_rows_of(pool_rows) > 0 and callable(getattr(codec, "copy_rows", None)) and \
            callable(getattr(pool_rows, "scratch_addresses", None)):
        return "scratch"
    if encodes_in_place(codec):
        return "direct"
    return None


def encodes_in_place(codec: Any) -> bool:
    return bool(getattr(codec, "encode_reads_before_writes", False))


def layer_group(codec: Any) -> int:
    return max(1, int(getattr(codec, "layer_group", 1) or 1))
