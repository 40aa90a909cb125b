"""kvtc-sglang's benchmarks, run as modules from the checkout root: ``python -m benchmarks.<tool>``.

* ``benchmarks.serving``: the serving suite (configurations at equal GPU bytes, workload traces, pressure and rate
  sweeps, statistics, plots); ``benchmarks/gpu_e2e.sh`` runs its GPU profiles.
* ``benchmarks.serve_agreement``: kvtc vs plain radix answers on the same multi-turn chats.
* ``benchmarks.accuracy``, ``benchmarks.cpu_multiturn``, ``benchmarks.codec_speed``: accuracy, the CPU multi-turn
  check and codec kernel speed.
"""
