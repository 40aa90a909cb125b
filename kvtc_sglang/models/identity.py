"""Which model a calibration card belongs to: architecture fingerprint, tokenizer digest and weights signature.

A card's PCA bases fit one model's KV cache. Two checkpoints of one architecture (a base model and its chat
fine-tune, two sizes with equal KV geometry) give the same shapes, and a card of the one accepted for the other would
silently degrade every restored prefix. So a card records three identities of its model, and the server compares
each with the model it serves:

``architecture fingerprint`` (``model.fingerprint``)
    sha256 of the config facts (``ModelKVSpec.from_hf_config``): model_type, layers, heads, KV heads, head_dim,
    hidden_size, vocab_size, RoPE. Read from the config, so the launcher checks it before the model loads.
``tokenizer digest`` (``model.tokenizer_digest``)
    16 hex digits of sha256 over the vocabulary (``get_vocab()``: every token string and its id, added tokens
    included). The launcher checks it before the model loads (it loads the tokenizer SGLang will use).
``weights signature`` (``model.weights_signature``)
    A numeric sketch of layer 0's key and value projection weights, per KV head: ``PROBES`` numbers
    ``R @ (W_h @ u) / sqrt(hidden * D)`` where W_h is head h's [D, hidden] rows of k_proj (v_proj), u a fixed
    +-1 vector over the hidden size and R a fixed [PROBES, D] +-1 matrix (both from ``torch.Generator`` seed
    ``SIGNATURE_SEED``), computed in float32. Each scheduler rank computes it from SGLang's loaded weights (its own
    KV heads of the fused ``qkv_proj``) and compares it with the card's entries for those heads.

Why a numeric sketch compared within a tolerance and not a hash of the weight bytes: the weights a card is made from
and the weights a server loads are rarely the same bytes. A GGUF model is dequantized to float32 when calibrated and
served from a bfloat16 folder; ``--dtype float16`` rounds again. A byte hash (``model.weights_digest``, kept in the
card for reference) differs under every such conversion; the sketch moves by the storage rounding only (relative
change about 1e-3 for bfloat16, see ``WEIGHTS_TOLERANCE``), while another checkpoint moves it by the size of its
weight differences (an unrelated model: about sqrt(2), a fine-tune: its relative weight change). A difference below
the tolerance means the card's bases were measured on these weights up to storage precision, which is all the
codec needs.

What cannot be checked is said, not guessed: a card without a field (made before it existed, or from captured KV
without the model's files), a tokenizer that cannot be loaded, dummy weights (``--load-format dummy``), quantized
projection weights, or an architecture without a recognizable key/value projection. ``IdentityCheck`` carries
either a comparison or the exact reason it was skipped; the startup checks log one line per skipped field.

torch only (no transformers, no sglang): the startup checks import this module.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

SIGNATURE_VERSION = 1
SIGNATURE_SEED = 20240917
PROBES = 8
# Largest relative L2 difference between the card's and the served model's weights signatures that is taken as the
# same weights. Measured on SmolLM2-135M's float32 weights: rounded to bfloat16 0.0019, to float16 0.00026, to
# float8_e4m3 0.036; Gaussian noise of relative size e moves it by about 1.35 e; another layer's weights by 1.25.
WEIGHTS_TOLERANCE = 0.02
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# A capture server (--kvtc-capture-dir) writes {"weights_signature": ...} of its rank's KV heads to this file in each
# rank folder; `kvtc-sglang calibrate --kv-dumps` copies it into the card.
CAPTURE_IDENTITY_FILE = "model_identity.json"


class ModelIdentityError(ValueError):
    """A weights signature or tokenizer cannot be computed from what was given (bad shapes, no vocabulary)."""


# ---------------------------------------------------------------------------------------------------------------------
# Architecture fingerprint and tokenizer digest
# ---------------------------------------------------------------------------------------------------------------------

def architecture_fingerprint(config: Any) -> str:
    """``ModelKVSpec.from_hf_config(config).fingerprint``: 64 hex digits. ``config``: a config.json dict or a
    transformers ``PretrainedConfig`` (SGLang's ``model_config.hf_config``). Raises ValueError/KeyError/TypeError
    when the config lacks a fact the fingerprint needs."""
    from kvtc_sglang.models.kv_capture import ModelKVSpec

    return ModelKVSpec.from_hf_config(config).fingerprint


def is_fingerprint(value: Any) -> bool:
    """Whether ``value`` is an architecture fingerprint (64 lowercase hex digits)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def tokenizer_digest(tokenizer: Any) -> str:
    """16 hex digits of sha256 over the tokenizer's vocabulary: ``sorted(get_vocab().items())`` as canonical JSON.

    Equal for a GGUF-loaded tokenizer and the folder it was converted to; differs when any token string or id
    differs. Raises ModelIdentityError when ``tokenizer`` has no vocabulary."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        raise ModelIdentityError(f"{type(tokenizer).__name__} has no get_vocab(); cannot digest its vocabulary")
    vocab = get_vocab()
    if not isinstance(vocab, Mapping) or not vocab:
        raise ModelIdentityError(f"{type(tokenizer).__name__}.get_vocab() returned no vocabulary")
    items = sorted((str(token), int(index)) for token, index in vocab.items())
    return hashlib.sha256(json.dumps(items, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------------
# Weights signature
# ---------------------------------------------------------------------------------------------------------------------

def _probes(hidden: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """u: [hidden] and R: [PROBES, head_dim], float32 entries +-1, the same on every machine (CPU generator)."""
    g = torch.Generator(device="cpu").manual_seed(SIGNATURE_SEED)
    u = torch.randint(0, 2, (hidden,), generator=g, dtype=torch.int64).float().mul_(2).sub_(1)
    r = torch.randint(0, 2, (PROBES, head_dim), generator=g, dtype=torch.int64).float().mul_(2).sub_(1)
    return u.to(device), r.to(device)


def head_signatures(weight: torch.Tensor, head_dim: int) -> list[list[float]]:
    """The signature rows of a projection weight: one list of ``PROBES`` floats per head.

    Args:
        weight: [n_heads * head_dim, hidden] float tensor (any device): rows of consecutive heads, as k_proj /
            v_proj (or the k / v part of a fused qkv_proj) store them.
        head_dim: D.
    Raises:
        ModelIdentityError: not a 2-D float tensor whose rows split into heads of ``head_dim``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
        raise ModelIdentityError(f"a projection weight must be a 2-D float tensor, got "
                                 f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}")
    rows, hidden = weight.shape
    if head_dim <= 0 or rows % head_dim or rows == 0 or hidden == 0:
        raise ModelIdentityError(f"a [{rows}, {hidden}] projection weight does not split into heads of {head_dim}")
    u, r = _probes(hidden, head_dim, weight.device)
    with torch.no_grad():
        per_row = weight.detach().float() @ u                                   # [n_heads * D]
        sig = per_row.view(rows // head_dim, head_dim) @ r.T / math.sqrt(hidden * head_dim)  # [n_heads, PROBES]
    return [[float(x) for x in row] for row in sig.cpu().tolist()]


def weights_signature(k_weight: torch.Tensor, v_weight: torch.Tensor, head_dim: int, *,
                      first_head: int = 0) -> dict[str, Any]:
    """The card's ``model.weights_signature`` of layer 0's key and value projections.

    Args:
        k_weight, v_weight: [n_heads * head_dim, hidden] float tensors, KV heads ``first_head ..
            first_head + n_heads - 1`` of layer 0 (all heads when calibrating; one TP rank's heads when serving).
        head_dim: D.
        first_head: global index of the first head in the weights.
    Returns:
        ``{"version", "layer": 0, "probes", "first_head", "k": [[PROBES floats] per head], "v": [...]}``.
    """
    k, v = head_signatures(k_weight, head_dim), head_signatures(v_weight, head_dim)
    if len(k) != len(v):
        raise ModelIdentityError(f"k_proj has {len(k)} heads of {head_dim}, v_proj {len(v)}")
    return {"version": SIGNATURE_VERSION, "layer": 0, "probes": PROBES, "first_head": int(first_head), "k": k, "v": v}


def hf_kv_weights(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's ``k_proj.weight`` and ``v_proj.weight`` of a transformers decoder model ([H * D, hidden] each)."""
    attn = model.get_decoder().layers[0].self_attn
    return attn.k_proj.weight, attn.v_proj.weight


def hf_model_signature(model: Any, head_dim: int) -> dict[str, Any]:
    """``weights_signature`` of a transformers decoder model (every KV head)."""
    k, v = hf_kv_weights(model)
    return weights_signature(k, v, head_dim)


def signature_problem(sig: Any) -> str | None:
    """Why ``sig`` is not a usable weights signature (wrong version, shapes, non-finite numbers), or None."""
    if not isinstance(sig, Mapping):
        return "it is not a JSON object"
    if sig.get("version") != SIGNATURE_VERSION:
        return f"version {sig.get('version')!r}, this build reads {SIGNATURE_VERSION}"
    probes, first = sig.get("probes"), sig.get("first_head", 0)
    if probes != PROBES or isinstance(first, bool) or not isinstance(first, int) or first < 0:
        return f"probes={probes!r}, first_head={first!r} (expected probes={PROBES}, first_head >= 0)"
    heads = None
    for kind in ("k", "v"):
        rows = sig.get(kind)
        if not isinstance(rows, list) or not rows:
            return f"'{kind}' is not a list of per-head rows"
        if heads is not None and len(rows) != heads:
            return "'k' and 'v' have different head counts"
        heads = len(rows)
        for row in rows:
            if (not isinstance(row, list) or len(row) != PROBES
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                               for x in row)):
                return f"a '{kind}' row is not {PROBES} finite numbers"
    return None


def signature_difference(card_sig: Mapping[str, Any], live_sig: Mapping[str, Any]) -> float:
    """Relative L2 difference of the live signature's heads from the card's entries for the same heads:
    ``||live - card|| / ||card||`` over K and V together. Both must pass ``signature_problem``; ValueError if the
    live heads are not all in the card."""
    first, n = int(live_sig.get("first_head", 0)), len(live_sig["k"])
    card_first = int(card_sig.get("first_head", 0))
    lo = first - card_first
    if lo < 0 or lo + n > len(card_sig["k"]):
        raise ValueError(f"KV heads {first}..{first + n - 1} are not in the card's signature (heads "
                         f"{card_first}..{card_first + len(card_sig['k']) - 1})")
    want = torch.tensor([card_sig[kind][lo:lo + n] for kind in ("k", "v")], dtype=torch.float64)
    got = torch.tensor([live_sig[kind] for kind in ("k", "v")], dtype=torch.float64)
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------------------------
# Outcome of one comparison
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IdentityCheck:
    """One identity field compared (``matches`` True/False, ``detail`` the two values) or skipped (``matches`` None,
    ``detail`` the exact reason)."""

    field: str
    matches: bool | None
    detail: str

    @classmethod
    def skipped(cls, field: str, reason: str) -> "IdentityCheck":
        return cls(field, None, reason)


def compare_weights(card_sig: Any, live: Mapping[str, Any] | str) -> IdentityCheck:
    """Compare a card's ``weights_signature`` with one computed from the served weights (or the reason none could
    be computed)."""
    name = "weights"
    if card_sig is None:
        return IdentityCheck.skipped(name, "the card has no weights_signature (made from captured KV without the "
                                           "model's weights, or by an older kvtc-sglang)")
    problem = signature_problem(card_sig)
    if problem is not None:
        return IdentityCheck.skipped(name, f"the card's weights_signature is not usable: {problem}")
    if isinstance(live, str):
        return IdentityCheck.skipped(name, live)
    try:
        diff = signature_difference(card_sig, live)
    except ValueError as exc:
        return IdentityCheck.skipped(name, str(exc))
    detail = (f"layer 0 key/value projections differ from the card's by {diff:.3g} (relative; the same weights stay "
              f"below {WEIGHTS_TOLERANCE:g})")
    return IdentityCheck(name, diff <= WEIGHTS_TOLERANCE, detail)
