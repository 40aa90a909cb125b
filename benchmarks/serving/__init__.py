"""The serving suite: SGLang servers compared at equal GPU bytes under workload traces, with statistics and plots.

Run it as ``python -m benchmarks.serving`` (``suite.py``; ``benchmarks/gpu_e2e.sh`` runs its GPU profiles). One job
per module:

=============  ==========================================================================================
argv           read / remove / set ``--flag value`` in argument lists
model          a model folder's geometry (config.json), pseudo-random token ids
configs        the configurations (radix, fp8, fp4, hicache2/8, kvtc8/16/32, unlimited), bytes per KV slot,
               equal-bytes pool sizes and the capacity model
launch         each config's ``sglang.launch_server`` command (``--dry-run`` prints them)
process        a server in its own process group: start, ``/health`` wait, stop the whole group
client         aiohttp client: streaming ``/generate`` (TTFT, TPOT, cached tokens by tier), ``/metrics``, flush
metrics        Prometheus parsing; kvtc counters and SGLang load-back/eviction histograms over a window
stats          percentiles, two-level bootstrap CIs, goodput, per-window summaries
workloads      pure trace generators (a) multiturn, (b) shared-prefix, (c) chat over documents,
               (d) long-document QA, (e) cyclic; the ``Trace`` API a CPU cache replay shares
text           MT-Bench questions, WikiText-2 test documents, chat-template token segments
driver         sends a trace to a server (planned arrivals, history dependencies, client queue, window)
harness        one server's warm-up, measured points, saturation and break-even probes
gsp            workload (b) through ``python -m sglang.bench_serving`` (upstream, unmodified)
profiles       which configs / workloads / x / rates / repeats a command runs, and the run order
report         serving.json rows (one commit per file), per-request records, aggregation, serving.md
plots          hit rate vs x, TTFT vs x, goodput vs rate, TTFT CDF, break-even prefix length
suite          the command: plan, launch, measure, report
=============  ==========================================================================================

The client side imports neither torch nor sglang.
"""
