"""Stand-in for the Hugging Face ``datasets`` package, put on PYTHONPATH only for ``sglang.bench_serving`` and only
where ``datasets`` is not installed (the offline GPU box). sglang 0.5.17's benchmark imports it at module load for
its MMMU / LongBench loaders; the generated-shared-prefix dataset the suite runs never calls it."""


def load_dataset(*args, **kwargs):
    raise RuntimeError("the Hugging Face 'datasets' package is not installed; only sglang.bench_serving datasets "
                       "that need no download (generated-shared-prefix, random) work here")
