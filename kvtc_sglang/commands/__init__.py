"""The ``kvtc-sglang`` subcommands, one module each, over the library's typed entry points.

Each module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and does only argument handling and output;
the work is in ``kvtc_sglang.models.calibration`` (calibrate, report), ``kvtc_sglang.eval`` (report),
``kvtc_sglang.cache.patch_tool`` (patch) and ``kvtc_sglang.models.smollm2`` (convert-gguf). This package sits on top:
nothing in the library imports it.
"""
