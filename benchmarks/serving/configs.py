"""Server configurations compared at equal GPU bytes, and the capacity model printed beside every result.

Every configuration runs the same model with the same common arguments (page size, attention backend, memory
fraction, CUDA graphs on) and gets the same KV *bytes* on the GPU: a budget of N bf16 token slots
(``--max-total-tokens N`` for bf16 pools). A pool whose slots are smaller gets more of them for the same bytes.

========== ============================================================= ==========================================
name       flags on top of the common arguments                           distinct tokens the cache can hold
========== ============================================================= ==========================================
radix      (plain radix cache, bf16 KV)                                   N
fp8        ``--kv-cache-dtype fp8_e4m3``, 2N slots                        2N
fp4        ``--kv-cache-dtype fp4_mx_block16`` (Hopper's FP4 recipe;      N x bf16 bytes / fp4 bytes per slot
           needs the triton/torch_native/flex_attention backend)          (3.37N for Llama-3.1-8B)
hicache2   ``--enable-hierarchical-cache --hicache-ratio 2``, write-      2N (host pool 2N tokens in host memory;
hicache8   through, kernel IO, page-first layout (ratio 8)                write-through keeps it inclusive) / 8N
kvtc8      ``--kv-compress kvtc --kvtc-ratio 8`` (16, 32), blobs in the   N x rho, rho = the realized ratio (at
kvtc16     pool's own slots, ``--kvtc-stats-interval 1``                  most the plan's 8/16/32 minus exact rows)
kvtc32
unlimited  radix without ``--max-total-tokens`` (no pressure: ceiling)    whatever the memory fraction leaves
========== ============================================================= ==========================================

A name may carry an attention backend for the secondary table: ``radix@flashinfer``, ``kvtc16@flashinfer``.
Running requests hold pool slots too, so the cache itself holds less than the table while requests run; the
suite keeps in-flight KV at most ~40% of the bf16 pool for latency runs and reports the measured peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import ModelInfo

FP4_BACKENDS = ("triton", "torch_native", "flex_attention", "trtllm_mha")  # sglang 0.5.17 _handle_kv4_compatibility
HICACHE_FLAGS = ("--hicache-write-policy", "write_through", "--hicache-io-backend", "kernel",
                 "--hicache-mem-layout", "page_first")


@dataclass(frozen=True)
class ConfigSpec:
    """One server configuration.

    kind: "radix", "hicache" or "kvtc" (what tier serves a restored prefix).
    kv_cache_dtype: ``--kv-cache-dtype`` (None: the model's dtype).
    hicache_ratio: host pool size in multiples of the device pool (hicache only).
    kvtc_ratio: the calibration card's bit plan (kvtc only).
    unlimited: no ``--max-total-tokens`` (the memory fraction decides).
    backend: attention backend forced by the name's ``@backend`` suffix (None: the common one).
    """

    name: str
    kind: str
    kv_cache_dtype: str | None = None
    hicache_ratio: float | None = None
    kvtc_ratio: int | None = None
    unlimited: bool = False
    backend: str | None = None
    extra: tuple[str, ...] = field(default=())

    @property
    def base(self) -> str:
        return self.name.split("@", 1)[0]

    def flags(self) -> list[str]:
        """The flags this config adds to the common arguments (``--max-total-tokens`` excluded)."""
        out: list[str] = []
        if self.kv_cache_dtype:
            out += ["--kv-cache-dtype", self.kv_cache_dtype]
        if self.kind == "hicache":
            out += ["--enable-hierarchical-cache", "--hicache-ratio", f"{self.hicache_ratio:g}", *HICACHE_FLAGS]
        if self.kind == "kvtc":
            out += ["--kv-compress", "kvtc", "--kvtc-ratio", str(self.kvtc_ratio), "--kvtc-stats-interval", "1"]
        if self.backend:
            out += ["--attention-backend", self.backend]
        return out + list(self.extra)


BASE_CONFIGS: dict[str, ConfigSpec] = {c.name: c for c in (
    ConfigSpec("radix", "radix"),
    ConfigSpec("fp8", "radix", kv_cache_dtype="fp8_e4m3"),
    ConfigSpec("fp4", "radix", kv_cache_dtype="fp4_mx_block16"),
    ConfigSpec("hicache2", "hicache", hicache_ratio=2.0),
    ConfigSpec("hicache8", "hicache", hicache_ratio=8.0),
    ConfigSpec("kvtc8", "kvtc", kvtc_ratio=8),
    ConfigSpec("kvtc16", "kvtc", kvtc_ratio=16),
    ConfigSpec("kvtc32", "kvtc", kvtc_ratio=32),
    ConfigSpec("unlimited", "radix", unlimited=True),
)}
BACKENDS = ("triton", "flashinfer", "fa3", "torch_native", "flex_attention", "trtllm_mha")


def config_spec(name: str) -> ConfigSpec:
    """``"kvtc16"`` or ``"kvtc16@flashinfer"`` -> ConfigSpec; ValueError naming the allowed ones."""
    base, _, backend = name.partition("@")
    if base not in BASE_CONFIGS:
        raise ValueError(f"unknown config {name!r}; choose from {', '.join(BASE_CONFIGS)} (optionally "
                         f"@<attention backend>, e.g. radix@flashinfer)")
    if backend and backend not in BACKENDS:
        raise ValueError(f"config {name!r}: unknown attention backend {backend!r} ({', '.join(BACKENDS)})")
    spec = BASE_CONFIGS[base]
    return spec if not backend else ConfigSpec(**{**spec.__dict__, "name": name, "backend": backend})


def parse_configs(text: str) -> list[ConfigSpec]:
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"--configs: give distinct config names, got {text!r}")
    return [config_spec(n) for n in names]


# ---------------------------------------------------------------------------------------------------------------------
# Bytes per token slot (SGLang 0.5.17's pool sizing, model_executor/pool_configurator.py) and the capacity model
# ---------------------------------------------------------------------------------------------------------------------

def kv_bytes_per_token(model: ModelInfo, kv_cache_dtype: str | None, *, tp_size: int = 1,
                       model_dtype: str | None = None) -> int:
    """KV-pool bytes of one token slot on one TP rank, as SGLang sizes an MHA pool.

    ``auto`` follows the model dtype, where ``--dtype auto`` turns float32 configs into float16; fp8 pools take one
    byte per element; FP4 pools (``fp4_mx_block16``, ``nvfp4``) take half a byte per element plus one scale byte per
    16 elements, plus one shared dequantization workspace of K and V for one layer at one byte per element.
    """
    heads = max(1, model.num_kv_heads // tp_size)
    elems = 2 * model.num_layers * heads * model.head_dim
    dtype = (kv_cache_dtype or "auto").lower()
    if dtype == "auto":
        dtype = (model_dtype or "auto").lower()
        return elems * (4 if dtype in ("float32", "float") else 2)
    if dtype.startswith("fp8") or dtype == "mxfp8":
        return elems
    if dtype in ("bf16", "bfloat16", "float16", "fp16", "half"):
        return elems * 2
    if dtype in ("fp4_mx_block16", "nvfp4"):
        return elems // 2 + elems // 16 + 2 * heads * model.head_dim
    raise ValueError(f"--kv-cache-dtype {dtype}: the suite cannot size this KV pool format")


@dataclass(frozen=True)
class Capacity:
    """How many distinct tokens a config's cache can hold, for a bf16 budget of ``budget_tokens`` slots.

    pool_slots: ``--max-total-tokens`` of this config (None: unlimited, read from the server).
    kv_bytes_per_token: bytes of one pool slot; kv_gpu_bytes: the pool's bytes (equal for every pressured config).
    host_tokens: HiCache host pool tokens (host memory, not GPU).
    capacity_tokens: distinct tokens held at once (kvtc: None until the realized ratio is known; see ``formula``).
    """

    config: str
    budget_tokens: int | None
    pool_slots: int | None
    kv_bytes_per_token: int
    kv_gpu_bytes: int | None
    host_tokens: int | None
    capacity_tokens: int | None
    formula: str

    @property
    def knee_x(self) -> float | None:
        """Capacity in multiples of the bf16 budget: where this config's hit rate must start to fall."""
        if self.capacity_tokens is None or not self.budget_tokens:
            return None
        return round(self.capacity_tokens / self.budget_tokens, 3)

    def with_ratio(self, rho: float | None) -> "Capacity":
        """kvtc: the capacity at realized ratio ``rho`` (every cached token compressed: an upper bound)."""
        if rho is None or self.pool_slots is None or "rho" not in self.formula:
            return self
        return Capacity(**{**self.__dict__, "capacity_tokens": int(self.pool_slots * rho)})

    def describe(self) -> str:
        gib = f"{self.kv_gpu_bytes / 2**30:.2f} GiB" if self.kv_gpu_bytes else "memory fraction"
        pool = f"{self.pool_slots:,} slots x {self.kv_bytes_per_token:,} B" if self.pool_slots else "pool unlimited"
        knee = f" = {self.knee_x:g}x budget" if self.knee_x else ""
        return f"{self.config}: {pool} ({gib} of GPU KV); holds {self.formula}{knee}"

    def as_dict(self) -> dict:
        return {**self.__dict__, "knee_x": self.knee_x}


def equal_bytes_slots(spec: ConfigSpec, model: ModelInfo, budget_tokens: int, *, page_size: int = 1,
                      tp_size: int = 1) -> int:
    """``--max-total-tokens`` giving ``spec`` the bytes of ``budget_tokens`` bf16 slots (rounded down to pages)."""
    bf16 = kv_bytes_per_token(model, "bfloat16", tp_size=tp_size)
    own = kv_bytes_per_token(model, spec.kv_cache_dtype, tp_size=tp_size, model_dtype="bfloat16")
    slots = budget_tokens * bf16 // own
    return max(page_size, slots // page_size * page_size)


def capacity_of(spec: ConfigSpec, model: ModelInfo, budget_tokens: int | None, *, page_size: int = 1,
                tp_size: int = 1) -> Capacity:
    bpt = kv_bytes_per_token(model, spec.kv_cache_dtype, tp_size=tp_size, model_dtype="bfloat16")
    if spec.unlimited or budget_tokens is None:
        return Capacity(spec.name, budget_tokens, None, bpt, None, None, None, "every token the memory fraction fits")
    slots = equal_bytes_slots(spec, model, budget_tokens, page_size=page_size, tp_size=tp_size)
    gpu = slots * bpt
    if spec.kind == "hicache":
        host = int(slots * spec.hicache_ratio)
        return Capacity(spec.name, budget_tokens, slots, bpt, gpu, host, max(slots, host),
                        f"max(device {slots:,}, host {host:,}) tokens (write-through: host is inclusive)")
    if spec.kind == "kvtc":
        return Capacity(spec.name, budget_tokens, slots, bpt, gpu, None, None,
                        f"up to {slots:,} x rho tokens (rho = realized ratio, plan {spec.kvtc_ratio}x)")
    return Capacity(spec.name, budget_tokens, slots, bpt, gpu, None, slots, f"{slots:,} tokens")
