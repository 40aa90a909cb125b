"""Calibration artifacts: a JSON card plus a tensor file, one per model (and TP layout).

Directory layout (see calibration_artifacts/README.md for the full card schema):
    card.json     model facts (fingerprint, layers, KV heads, head_dim, RoPE), TP layout, exact-token
                  policy, quantizer description, per-kind feature blocks, bit plans per target ratio,
                  calibration settings, and the sha256 of the tensor file
    tensors.pt    per kind ("k", "v") and block b: "{kind}.{b}.mean" [p_b] float32,
                  "{kind}.{b}.scale" [p_b] float32 and "{kind}.{b}.basis" [p_b, r_b] float16
                  (orthonormal columns, truncated to the largest rank any plan uses)

Features are scaled before the transform: coefficients d = ((x - mean) * scale) @ basis and
x_hat = (d_hat @ basis.T) / scale + mean. The scale is each feature's loss sensitivity (square root
of its diagonal Fisher information, see kvtc_sglang.models.kv_sensitivity) or all ones.

A kind's p features (ordered [layer][head][dim]) are split into blocks of whole layers; each block
has its own PCA basis and its own plan. One block spanning all layers is the model-wide basis.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from kvtc_sglang.codec.defaults import DEFAULT_EXACT, ExactPolicy
from kvtc_sglang.codec.dp import ALIGN
from kvtc_sglang.codec.errors import CalibrationCardError, CalibrationMismatchError
from kvtc_sglang.codec.kinds import KINDS
from kvtc_sglang.codec.plan import GROUP_BITS, GROUP_OVERHEAD_BITS, GROUP_SIZES, BitPlan
from kvtc_sglang.codec.rope import STYLES

CARD_FORMAT_VERSION = 1
CARD_NAME = "card.json"
TENSORS_NAME = "tensors.pt"


@dataclass(frozen=True)
class FeatureBlock:
    """Layers [layer_start, layer_end) of one kind; features [offset, offset + p) of the token vector."""

    layer_start: int
    layer_end: int
    offset: int
    p: int
    mean: torch.Tensor  # [p] float32
    basis: torch.Tensor  # [p, r] float16
    scale: torch.Tensor | None = None  # [p] float32; None = ones

    def scale_or_ones(self) -> torch.Tensor:
        return self.scale.float() if self.scale is not None else torch.ones(self.p)


@dataclass(frozen=True)
class RatioPlans:
    """The plans of one target ratio: one BitPlan per block, for K and for V."""

    ratio: int
    k: tuple[BitPlan, ...]
    v: tuple[BitPlan, ...]

    def for_kind(self, kind: str) -> tuple[BitPlan, ...]:
        return self.k if kind == "k" else self.v

    @property
    def bits_per_token(self) -> int:
        return sum(pl.bits_per_token for pl in self.k + self.v)


@dataclass
class CalibrationArtifact:
    """Everything the codec needs for one model: bases, means and bit plans.

    Attributes:
        model: dict with at least name, fingerprint, num_layers, num_kv_heads (the whole model's),
               num_kv_heads_per_rank, head_dim, rope (RopeConfig.to_dict()).
        blocks: {"k": [FeatureBlock...], "v": [...]}.
        plans: {ratio: RatioPlans}.
    """

    model: dict
    blocks: dict[str, list[FeatureBlock]]
    plans: dict[int, RatioPlans]
    tp_size: int = 1
    tp_rank: int = 0
    sink_tokens: int = DEFAULT_EXACT.sink_tokens
    window_tokens: int = DEFAULT_EXACT.window_tokens
    calibration: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    # encoder clip factor per kind and (group size, bits); absent = min/max (see quantize.py)
    clip: dict[str, dict[tuple[int, int], float]] = field(default_factory=dict)

    # ----- derived facts -----
    @property
    def num_layers(self) -> int:
        return int(self.model["num_layers"])

    @property
    def num_kv_heads(self) -> int:
        """KV heads of this rank (the card's model.num_kv_heads is the whole model's)."""
        if "num_kv_heads_per_rank" in self.model:
            return int(self.model["num_kv_heads_per_rank"])
        return int(self.model["num_kv_heads"]) // int(self.tp_size)

    @property
    def exact_policy(self) -> ExactPolicy:
        """The sink/window tokens the calibration kept exact (and skipped), as an ExactPolicy."""
        return ExactPolicy(self.sink_tokens, self.window_tokens)

    @property
    def head_dim(self) -> int:
        return int(self.model["head_dim"])

    @property
    def p(self) -> int:
        return self.num_layers * self.num_kv_heads * self.head_dim

    def plan(self, ratio: int) -> RatioPlans:
        if int(ratio) not in self.plans:
            raise CalibrationMismatchError(
                f"calibration has no plan for ratio {ratio}; available: {sorted(self.plans)}"
            )
        return self.plans[int(ratio)]

    @property
    def fingerprint16(self) -> bytes:
        """16 bytes identifying this artifact inside every blob it encodes."""
        return bytes.fromhex(self.artifact_id())[:16]

    def artifact_id(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self._card_core(), sort_keys=True).encode())
        for kind in KINDS:
            for b in self.blocks[kind]:
                h.update(b.basis.contiguous().view(torch.uint8).numpy().tobytes()[:: max(1, b.basis.numel() // 4096)])
        return h.hexdigest()

    # ----- card -----
    def _card_core(self) -> dict:
        return {
            "format_version": CARD_FORMAT_VERSION,
            "model": self.model,
            "tp_size": self.tp_size,
            "tp_rank": self.tp_rank,
            "sink_tokens": self.sink_tokens,
            "window_tokens": self.window_tokens,
            "p": self.p,
            "quantizer": {
                "group_sizes": list(GROUP_SIZES),
                "bits": list(GROUP_BITS),
                "overhead_bits_per_group": GROUP_OVERHEAD_BITS,
                "group_alignment": ALIGN,
                "params": "float16 shift (range low end) and scale ((high-low)/(2^b-1), rounded up)",
                "range": "group min/max, clipped to mean +- c*std where c = clip[kind]['SIZExBITS'] > 0",
                "int8": "uniform, 256 levels, same rule",
                "clip": {kind: {f"{s}x{b}": c for (s, b), c in sorted(self.clip.get(kind, {}).items())} for kind in KINDS},
            },
            "kinds": {
                kind: {
                    "rope_undone": kind == "k",
                    "blocks": [
                        {"layers": [b.layer_start, b.layer_end], "offset": b.offset, "p": b.p, "rank": int(b.basis.shape[1])}
                        for b in self.blocks[kind]
                    ],
                }
                for kind in KINDS
            },
            "plans": {
                str(r): {
                    "bits_per_token": rp.bits_per_token,
                    "nominal_ratio": round(32.0 * self.p / rp.bits_per_token, 4),
                    "k": [pl.to_dict() for pl in rp.k],
                    "v": [pl.to_dict() for pl in rp.v],
                }
                for r, rp in sorted(self.plans.items())
            },
        }

    def card(self, tensors_sha256: str | None = None, tensors_bytes: int | None = None) -> dict:
        c = self._card_core()
        c["artifact_id"] = self.artifact_id()
        c["calibration"] = self.calibration
        c.update(self.extra)
        c["tensors"] = {"file": TENSORS_NAME, "sha256": tensors_sha256, "bytes": tensors_bytes}
        return c

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for kind in KINDS:
            for i, b in enumerate(self.blocks[kind]):
                out[f"{kind}.{i}.mean"] = b.mean.float().contiguous()
                out[f"{kind}.{i}.scale"] = b.scale_or_ones().contiguous()
                out[f"{kind}.{i}.basis"] = b.basis.to(torch.float16).contiguous()
        return out

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write card.json and tensors.pt atomically into out_dir; returns the card path."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, suffix=".tmp", delete=False) as f:
            torch.save(self.tensors(), f)
            tmp_t = f.name
        digest, size = _sha256_file(tmp_t), os.path.getsize(tmp_t)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_t, 0o666 & ~umask)  # NamedTemporaryFile creates 0600; give it a plain file's mode like card.json
        os.replace(tmp_t, out / TENSORS_NAME)
        card_tmp = out / (CARD_NAME + ".tmp")
        card_tmp.write_text(json.dumps(self.card(digest, size), indent=1) + "\n")
        os.replace(card_tmp, out / CARD_NAME)
        return out / CARD_NAME


def _sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path(path: str | os.PathLike) -> Path:
    """``path/card.json`` for an artifact directory, else ``path`` itself (the card file); ``~`` expanded."""
    p = Path(path).expanduser()
    return p / CARD_NAME if p.is_dir() else p


def calibrate_hint(model_path: str | None = None) -> str:
    """The command that makes a calibration artifact (named in every calibration error)."""
    return f"kvtc-sglang calibrate --model {model_path or '<model-path>'} --out <dir>"


def rank_dir_name(tp_size: int, tp_rank: int) -> str:
    """Folder of one tensor-parallel rank inside an artifact (or KV capture) directory: ``tp{N}-rank{r}``."""
    return f"tp{int(tp_size)}-rank{int(tp_rank)}"


def rank_artifact_path(path: str | os.PathLike, tp_size: int, tp_rank: int) -> Path:
    """The artifact TP rank ``tp_rank`` of ``tp_size`` loads from ``--kvtc-calibration path``.

    ``path/tp{N}-rank{r}`` when that folder exists (what `kvtc-sglang calibrate --tp-size N` and `--kv-dumps` of a
    TP=N capture write), else ``path`` itself (a single-rank artifact, or one rank's folder given directly; its card's
    tp_size/tp_rank are checked against the server).
    """
    p = Path(path).expanduser()
    if int(tp_size) > 1:
        sub = p / rank_dir_name(tp_size, tp_rank)
        if sub.is_dir():
            return sub
    return p


def read_card(path: str | os.PathLike, *, model_path: str | None = None) -> dict:
    """The card JSON of an artifact directory (or card file): a JSON object of this build's format version.

    Raises CalibrationCardError (naming the calibrate command, with ``model_path`` when given) if the card is missing,
    unreadable, not a JSON object or of another format version.
    """
    cp = card_path(path)
    hint = calibrate_hint(model_path)
    if not cp.is_file():
        raise CalibrationCardError(f"no calibration card at {cp}; make one with `{hint}`")
    try:
        card = json.loads(cp.read_text(encoding="utf-8"))
    except OSError as e:
        raise CalibrationCardError(f"cannot read calibration card {cp}: {e}. Make a new one with `{hint}`") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CalibrationCardError(f"calibration card {cp} is not valid JSON ({e}). Make a new one with `{hint}`") from e
    if not isinstance(card, dict):
        raise CalibrationCardError(f"calibration card {cp} is not usable: the top level is not a JSON object. "
                                   f"Make a new one with `{hint}`")
    if card.get("format_version") != CARD_FORMAT_VERSION:
        raise CalibrationCardError(f"calibration card {cp} has format version {card.get('format_version')}, this "
                                   f"build reads {CARD_FORMAT_VERSION}. Make a new one with `{hint}`")
    return card


@dataclass(frozen=True)
class CardSummary:
    """The facts of a card that startup checks compare with the model and the server (no tensors read).

    Attributes:
        path: the card file.
        fingerprint: the model's architecture fingerprint, or None.
        num_layers, num_kv_heads, head_dim: the model's KV geometry (num_kv_heads: all ranks').
        num_kv_heads_per_rank: heads of the card's rank (``model.num_kv_heads_per_rank``, else
            ``max(1, num_kv_heads // tp_size)``, SGLang's ``ModelConfig.get_num_kv_heads``).
        rope_theta, rope_style: the RoPE the card was made for (None when it does not say).
        tp_size, tp_rank: the TP layout of the card.
        plan_keys: compression ratio -> key of its plan in ``plans``.
    """

    path: Path
    format_version: int
    fingerprint: str | None
    num_layers: int
    num_kv_heads: int
    num_kv_heads_per_rank: int
    head_dim: int
    rope_theta: float | None
    rope_style: str | None
    tp_size: int
    tp_rank: int
    plan_keys: dict[float, str]

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(sorted(self.plan_keys))

    def plan_key(self, ratio: float) -> str | None:
        """The key in ``plans`` of the plan for ``ratio``, or None if the card has none."""
        for value, key in self.plan_keys.items():
            if math.isclose(value, ratio, rel_tol=1e-9, abs_tol=1e-9):
                return key
        return None

    @classmethod
    def from_card(cls, card: Mapping[str, Any], path: Path, *, model_path: str | None = None) -> "CardSummary":
        """Parse the summary out of card JSON (as ``read_card`` returns it), checking every field it reads.
        Raises CalibrationCardError naming the field and the calibrate command."""
        hint = calibrate_hint(model_path)

        def bad(what: str) -> CalibrationCardError:
            return CalibrationCardError(f"calibration card {path} is not usable: {what}. Make a new one with `{hint}`")

        def integer(value: Any, name: str, minimum: int) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise bad(f"{name}={value!r} is not an integer >= {minimum}")
            return value

        model = card.get("model")
        if not isinstance(model, Mapping):
            raise bad("missing the 'model' object")
        rope = model.get("rope")
        rope = rope if isinstance(rope, Mapping) else {}
        plans = card.get("plans")
        if not isinstance(plans, Mapping) or not plans:
            raise bad("missing the 'plans' object (no bit plans)")
        plan_keys: dict[float, str] = {}
        for key in plans:
            try:
                value = float(str(key).strip().rstrip("xX"))
            except ValueError:
                raise bad(f"plan key {key!r} is not a compression ratio") from None
            if not (math.isfinite(value) and value > 0):
                raise bad(f"plan key {key!r} is not a positive compression ratio")
            plan_keys[value] = str(key)
        num_layers = integer(model.get("num_layers"), "model.num_layers", 1)
        num_kv_heads = integer(model.get("num_kv_heads"), "model.num_kv_heads", 1)
        head_dim = integer(model.get("head_dim"), "model.head_dim", 1)
        tp_size = integer(card.get("tp_size", 1), "tp_size", 1)
        tp_rank = integer(card.get("tp_rank", 0), "tp_rank", 0)
        if tp_rank >= tp_size:
            raise bad(f"tp_rank={tp_rank} is not below tp_size={tp_size}")
        per_rank = model.get("num_kv_heads_per_rank")
        per_rank = (max(1, num_kv_heads // tp_size) if per_rank is None
                    else integer(per_rank, "model.num_kv_heads_per_rank", 1))
        theta = rope.get("theta", rope.get("rope_theta"))
        if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0):
            raise bad(f"model.rope.theta={theta!r} is not a positive number")
        style = rope.get("style")
        if style is not None and style not in STYLES:
            raise bad(f"model.rope.style={style!r} is neither 'neox' nor 'gptj'")
        fingerprint = model.get("fingerprint")
        return cls(path=path, format_version=int(card["format_version"]),
                   fingerprint=str(fingerprint) if fingerprint is not None else None,
                   num_layers=num_layers, num_kv_heads=num_kv_heads, num_kv_heads_per_rank=per_rank, head_dim=head_dim,
                   rope_theta=float(theta) if theta is not None else None, rope_style=style, tp_size=tp_size,
                   tp_rank=tp_rank, plan_keys=plan_keys)


def read_card_summary(path: str | os.PathLike, *, model_path: str | None = None) -> CardSummary:
    """``read_card`` + ``CardSummary.from_card``. Raises CalibrationCardError naming the calibrate command."""
    return CardSummary.from_card(read_card(path, model_path=model_path), card_path(path), model_path=model_path)


def load_artifact(path: str | os.PathLike, tensors_path: str | os.PathLike | None = None) -> CalibrationArtifact:
    """Load a calibration artifact; the tensor file is checked against the card's sha256."""
    cp = card_path(path)
    card = read_card(cp)
    tp = Path(tensors_path) if tensors_path is not None else cp.parent / card["tensors"]["file"]
    if not tp.is_file():
        raise CalibrationMismatchError(
            f"calibration tensors {tp} are missing (they are generated, not shipped); "
            f"regenerate them with `kvtc-sglang calibrate --model <model> --out {cp.parent}`"
        )
    want = card["tensors"].get("sha256")
    if want and _sha256_file(tp) != want:
        raise CalibrationMismatchError(f"calibration tensors {tp} do not match the card's sha256 (stale or corrupted); recalibrate")
    t = torch.load(tp, map_location="cpu", weights_only=True)
    blocks: dict[str, list[FeatureBlock]] = {}
    for kind in KINDS:
        blocks[kind] = []
        for i, bd in enumerate(card["kinds"][kind]["blocks"]):
            mean, basis = t[f"{kind}.{i}.mean"], t[f"{kind}.{i}.basis"]
            scale = t.get(f"{kind}.{i}.scale")
            if mean.shape != (bd["p"],) or basis.shape != (bd["p"], bd["rank"]) or (scale is not None and scale.shape != (bd["p"],)):
                raise CalibrationMismatchError(f"tensor shapes of {kind} block {i} disagree with the card")
            if scale is not None and not bool((scale > 0).all() and torch.isfinite(scale).all()):
                raise CalibrationMismatchError(f"{kind} block {i} has non-positive feature scales")
            blocks[kind].append(FeatureBlock(bd["layers"][0], bd["layers"][1], bd["offset"], bd["p"], mean.float(), basis, scale))
    plans = {}
    for r, pd in card["plans"].items():
        plans[int(r)] = RatioPlans(
            int(r),
            tuple(BitPlan.from_dict(d) for d in pd["k"]),
            tuple(BitPlan.from_dict(d) for d in pd["v"]),
        )
    clip = {}
    for kind, tab in card.get("quantizer", {}).get("clip", {}).items():
        clip[kind] = {}
        for key, c in tab.items():
            size, bits = (int(x) for x in key.split("x"))
            if not (c >= 0 and c < 1e6):
                raise CalibrationMismatchError(f"invalid clip factor {c!r} for {kind} {key}")
            clip[kind][(size, bits)] = float(c)
    known = {"format_version", "model", "tp_size", "tp_rank", "sink_tokens", "window_tokens", "p",
             "quantizer", "kinds", "plans", "artifact_id", "calibration", "tensors"}
    art = CalibrationArtifact(
        model=card["model"], blocks=blocks, plans=plans, tp_size=card.get("tp_size", 1),
        tp_rank=card.get("tp_rank", 0), sink_tokens=card.get("sink_tokens", DEFAULT_EXACT.sink_tokens),
        window_tokens=card.get("window_tokens", DEFAULT_EXACT.window_tokens), calibration=card.get("calibration", {}),
        extra={k: v for k, v in card.items() if k not in known},
        clip=clip,
    )
    for rp in plans.values():
        for kind in KINDS:
            if len(rp.for_kind(kind)) != len(blocks[kind]):
                raise CalibrationMismatchError(f"ratio {rp.ratio}: {kind} has {len(blocks[kind])} blocks but {len(rp.for_kind(kind))} plans")
            for b, pl in zip(blocks[kind], rp.for_kind(kind)):
                if pl.rank > b.basis.shape[1] or pl.p != b.p:
                    raise CalibrationMismatchError(
                        f"ratio {rp.ratio}: a {kind} plan needs rank {pl.rank} of p={pl.p}, the basis is [{b.p}, {b.basis.shape[1]}]"
                    )
    return art


def check_artifact_matches(art: CalibrationArtifact, *, num_layers: int, num_kv_heads: int, head_dim: int,
                           fingerprint: str | None = None, tp_size: int = 1, tp_rank: int = 0) -> None:
    """Raise CalibrationMismatchError naming each fact that differs and how to fix it."""
    problems = []
    for name, want, got in (
        ("num_layers", num_layers, art.num_layers),
        ("num_kv_heads (per rank)", num_kv_heads, art.num_kv_heads),
        ("head_dim", head_dim, art.head_dim),
        ("tp_size", tp_size, art.tp_size),
        ("tp_rank", tp_rank, art.tp_rank),
    ):
        if want != got:
            problems.append(f"{name}: model {want}, calibration {got}")
    if fingerprint is not None and art.model.get("fingerprint") not in (None, fingerprint):
        problems.append(f"fingerprint: model {fingerprint[:12]}, calibration {str(art.model.get('fingerprint'))[:12]}")
    if problems:
        raise CalibrationMismatchError(
            "calibration artifact does not fit this model (" + "; ".join(problems)
            + "); calibrate it with `kvtc-sglang calibrate --model <model-path> --out <dir>`"
        )
