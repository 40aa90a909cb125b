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


@dataclass(frozen=True)
class CardModelIdentity:
    """The identities of the card's model that startup compares with the served model (see
    ``kvtc_sglang.models.identity``); None where the card does not record one.

    Attributes:
        fingerprint: architecture fingerprint (64 hex digits), or None (absent, or not a fingerprint: synthetic
            cards of tests carry labels such as ``"synthetic-l2h2d16"``).
        tokenizer_digest: 16 hex digits over the vocabulary, or None.
        weights_signature: the JSON object of layer 0's key/value projection sketch, or None.
        weights_digest: the exact byte digest of the calibrated weights (informative), or None.
    """

    fingerprint: str | None
    tokenizer_digest: str | None
    weights_signature: Mapping[str, Any] | None
    weights_digest: str | None


def card_model_identity(card: Mapping[str, Any], path: Path, *, model_path: str | None = None) -> CardModelIdentity:
    """The ``CardModelIdentity`` of card JSON (as ``read_card`` returns it); CalibrationCardError naming the field and
    the calibrate command if a present field has the wrong type."""
    hint = calibrate_hint(model_path)
    model = card.get("model")
    if not isinstance(model, Mapping):
        raise CalibrationCardError(f"calibration card {path} is not usable: missing the 'model' object. Make a new "
                                   f"one with `{hint}`")

    def text(name: str) -> str | None:
        value = model.get(name)
        if value is not None and not isinstance(value, str):
            raise CalibrationCardError(f"calibration card {path} is not usable: model.{name}={value!r} is not a "
                                       f"string. Make a new one with `{hint}`")
        return value

    fingerprint, tokenizer, digest = text("fingerprint"), text("tokenizer_digest"), text("weights_digest")
    signature = model.get("weights_signature")
    if signature is not None and not isinstance(signature, Mapping):
        raise CalibrationCardError(f"calibration card {path} is not usable: model.weights_signature is not a JSON "
                                   f"object. Make a new one with `{hint}`")
    if fingerprint is not None and not (len(fingerprint) == 64 and all(c in "0123456789abcdef" for c in fingerprint)):
        fingerprint = None
    return CardModelIdentity(fingerprint=fingerprint, tokenizer_digest=tokenizer, weights_signature=signature,
                             weights_digest=digest)


def _checked_int(value: Any, name: str, minimum: int, bad) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad(f"{name}={value!r} is not an integer >= {minimum}")
    return value


def _tensor_file(card: Mapping[str, Any], cp: Path, tensors_path, bad, hint: str) -> tuple[Path, str, int]:
    """The tensor file of a card and the sha256 / size the card records for it (typed errors otherwise)."""
    entry = card.get("tensors")
    if not isinstance(entry, Mapping):
        raise bad("missing the 'tensors' object (file, sha256, bytes)")
    name, want_sha, want_bytes = entry.get("file"), entry.get("sha256"), entry.get("bytes")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise bad(f"tensors.file={name!r} is not a file name inside the artifact directory")
    if not (isinstance(want_sha, str) and len(want_sha) == 64 and all(c in "0123456789abcdef" for c in want_sha)):
        raise bad(f"tensors.sha256={want_sha!r} is not the 64-hex-digit sha256 of the tensor file")
    _checked_int(want_bytes, "tensors.bytes", 1, bad)
    tp = Path(tensors_path) if tensors_path is not None else cp.parent / name
    if not tp.is_file():
        raise CalibrationMismatchError(
            f"calibration tensors {tp} are missing (they are generated, not shipped); regenerate them with `{hint}` "
            f"(--out {cp.parent})")
    return tp, want_sha, want_bytes


def verify_tensor_file(path: str | os.PathLike, *, model_path: str | None = None) -> Path:
    """Check an artifact's tensor file against its card without loading it: present, of the recorded size and
    sha256. Returns the tensor file's path; CalibrationCardError / CalibrationMismatchError naming the fix."""
    cp = card_path(path)
    card = read_card(cp, model_path=model_path)
    hint = calibrate_hint(model_path)

    def bad(what: str) -> CalibrationCardError:
        return CalibrationCardError(f"calibration card {cp} is not usable: {what}. Make a new one with `{hint}`")

    tp, want_sha, want_bytes = _tensor_file(card, cp, None, bad, hint)
    _check_file_digest(tp, want_sha, want_bytes, hint)
    return tp


def _check_file_digest(tp: Path, want_sha: str, want_bytes: int, hint: str) -> None:
    size = tp.stat().st_size
    if size != want_bytes:
        raise CalibrationMismatchError(f"calibration tensors {tp} hold {size} bytes, the card records {want_bytes} "
                                       f"(truncated, or from another calibration); recalibrate with `{hint}`")
    if _sha256_file(tp) != want_sha:
        raise CalibrationMismatchError(f"calibration tensors {tp} do not match the card's sha256 (stale or "
                                       f"corrupted); recalibrate with `{hint}`")


def _read_tensors(tp: Path, hint: str) -> dict[str, torch.Tensor]:
    try:
        t = torch.load(tp, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged file raises pickle, zip, EOF or runtime errors
        raise CalibrationMismatchError(f"calibration tensors {tp} cannot be read ({type(exc).__name__}: {exc}); "
                                       f"recalibrate with `{hint}`") from exc
    if not isinstance(t, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in t.items()):
        raise CalibrationMismatchError(f"calibration tensors {tp} are not a dict of named tensors; recalibrate with "
                                       f"`{hint}`")
    return t


def _block_tensors(t: Mapping[str, torch.Tensor], kind: str, i: int, bd: Mapping[str, Any], tp: Path, hint: str):
    """mean, basis, scale of one block, checked against the card: present, shapes, floating, finite, scale > 0."""
    def bad(what: str) -> CalibrationMismatchError:
        return CalibrationMismatchError(f"calibration tensors {tp}: {kind} block {i} {what}; recalibrate with "
                                        f"`{hint}`")

    names = {part: f"{kind}.{i}.{part}" for part in ("mean", "basis", "scale")}
    missing = [n for part, n in names.items() if part != "scale" and n not in t]
    if missing:
        raise bad(f"has no tensor {', '.join(missing)}")
    mean, basis, scale = t[names["mean"]], t[names["basis"]], t.get(names["scale"])
    p, rank = bd["p"], bd["rank"]
    if mean.shape != (p,) or basis.shape != (p, rank) or (scale is not None and scale.shape != (p,)):
        raise bad(f"tensor shapes disagree with the card (mean {tuple(mean.shape)}, basis {tuple(basis.shape)}"
                  f"{'' if scale is None else f', scale {tuple(scale.shape)}'}; the card says p={p}, rank={rank})")
    for part, x in (("mean", mean), ("basis", basis), ("scale", scale)):
        if x is None:
            continue
        if not x.is_floating_point():
            raise bad(f"{part} has dtype {x.dtype}, not a floating type")
        if not bool(torch.isfinite(x).all()):
            raise bad(f"{part} holds {int((~torch.isfinite(x)).sum())} NaN/Inf values")
    if scale is not None and not bool((scale > 0).all()):
        raise bad("has non-positive feature scales")
    return mean.float(), basis, scale


def _blocks_layout(card: Mapping[str, Any], summary: CardSummary, bad) -> dict[str, list[dict]]:
    """The per-kind block list of the card, checked: ints, layers tiling [0, L), offsets tiling [0, p)."""
    kinds = card.get("kinds")
    if not isinstance(kinds, Mapping):
        raise bad("missing the 'kinds' object (feature blocks of k and v)")
    per_layer = summary.num_kv_heads_per_rank * summary.head_dim
    out = {}
    for kind in KINDS:
        entry = kinds.get(kind)
        blocks = entry.get("blocks") if isinstance(entry, Mapping) else None
        if not isinstance(blocks, list) or not blocks:
            raise bad(f"kinds.{kind}.blocks is not a non-empty list")
        layer, offset, parsed = 0, 0, []
        for i, bd in enumerate(blocks):
            where = f"kinds.{kind}.blocks[{i}]"
            if not isinstance(bd, Mapping):
                raise bad(f"{where} is not an object")
            layers = bd.get("layers")
            if not (isinstance(layers, list) and len(layers) == 2):
                raise bad(f"{where}.layers={layers!r} is not [first, end)")
            first, last = (_checked_int(x, f"{where}.layers", 0, bad) for x in layers)
            p = _checked_int(bd.get("p"), f"{where}.p", 1, bad)
            rank = _checked_int(bd.get("rank"), f"{where}.rank", 1, bad)
            off = _checked_int(bd.get("offset"), f"{where}.offset", 0, bad)
            if first != layer or last <= first or off != offset or p != (last - first) * per_layer or rank > p:
                raise bad(f"{where} (layers {layers}, offset {off}, p {p}, rank {rank}) does not continue the "
                          f"blocks before it (next layer {layer}, offset {offset}, {per_layer} features per layer, "
                          f"rank <= p)")
            layer, offset = last, off + p
            parsed.append({"layers": [first, last], "offset": off, "p": p, "rank": rank})
        if layer != summary.num_layers:
            raise bad(f"kinds.{kind}.blocks cover layers [0, {layer}), the model has {summary.num_layers}")
        out[kind] = parsed
    p_card = card.get("p")
    if p_card is not None and p_card != offset:
        raise bad(f"p={p_card!r} but the blocks cover {offset} features per kind")
    return out


def _plan_of(d: Any, where: str, block_p: int, bad) -> BitPlan:
    """BitPlan.from_dict with every field checked first (no loop over an absurd group count)."""
    if not isinstance(d, Mapping):
        raise bad(f"{where} is not an object")
    runs = d.get("runs")
    if not isinstance(runs, list):
        raise bad(f"{where}.runs is not a list")
    p = _checked_int(d.get("p"), f"{where}.p", 1, bad)
    if p != block_p:
        raise bad(f"{where}.p={p} but its block has p={block_p}")
    for j, run in enumerate(runs):
        if not (isinstance(run, list) and len(run) == 4):
            raise bad(f"{where}.runs[{j}]={run!r} is not [start, size, bits, count]")
        start, size, bits, count = (_checked_int(x, f"{where}.runs[{j}]", 0, bad) for x in run)
        if size not in GROUP_SIZES or bits not in GROUP_BITS or bits == 0 or count < 1 or start + size * count > p:
            raise bad(f"{where}.runs[{j}]={run!r}: size must be one of {list(GROUP_SIZES)}, bits one of 2/4/8, "
                      f"count >= 1 and the groups within p={p}")
    ratio = d.get("target_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
        raise bad(f"{where}.target_ratio={ratio!r} is not a positive number")
    return BitPlan.from_dict(dict(d))


def load_artifact(path: str | os.PathLike, tensors_path: str | os.PathLike | None = None, *,
                  model_path: str | None = None) -> CalibrationArtifact:
    """Load a calibration artifact, checking all of it: the card's fields (types, block layout, plans), the tensor
    file's size and sha256 against the card, the tensors (present, shapes, finite, positive scales) and that every
    plan fits its basis.

    Raises CalibrationCardError (a malformed card) or CalibrationMismatchError (missing, stale, corrupted or
    non-finite tensors; plans that do not fit), each naming the calibrate command (with ``model_path`` when given);
    never a raw KeyError/ValueError/TypeError.
    """
    cp = card_path(path)
    card = read_card(cp, model_path=model_path)
    hint = calibrate_hint(model_path)

    def bad(what: str) -> CalibrationCardError:
        return CalibrationCardError(f"calibration card {cp} is not usable: {what}. Make a new one with `{hint}`")

    try:
        return _load_checked(card, cp, tensors_path, bad, hint, model_path)
    except CalibrationMismatchError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise bad(f"{type(exc).__name__}: {exc}") from exc


def _load_checked(card: Mapping[str, Any], cp: Path, tensors_path, bad, hint: str,
                  model_path: str | None) -> CalibrationArtifact:
    summary = CardSummary.from_card(card, cp, model_path=model_path)
    card_model_identity(card, cp, model_path=model_path)
    layout = _blocks_layout(card, summary, bad)
    sink = _checked_int(card.get("sink_tokens", DEFAULT_EXACT.sink_tokens), "sink_tokens", 0, bad)
    window = _checked_int(card.get("window_tokens", DEFAULT_EXACT.window_tokens), "window_tokens", 0, bad)
    plans: dict[int, RatioPlans] = {}
    for key, pd in card["plans"].items():
        try:
            ratio = int(str(key))
        except ValueError:
            raise bad(f"plan key {key!r} is not an integer compression ratio") from None
        if ratio < 1 or not isinstance(pd, Mapping):
            raise bad(f"plans[{key!r}] is not an object keyed by a ratio >= 1")
        per_kind = {}
        for kind in KINDS:
            entries = pd.get(kind)
            if not isinstance(entries, list) or len(entries) != len(layout[kind]):
                raise bad(f"plans[{key!r}].{kind} is not a list of one plan per {kind} block "
                          f"({len(layout[kind])})")
            per_kind[kind] = tuple(_plan_of(d, f"plans[{key!r}].{kind}[{b}]", layout[kind][b]["p"], bad)
                                   for b, d in enumerate(entries))
        plans[ratio] = RatioPlans(ratio, per_kind["k"], per_kind["v"])
    clip: dict[str, dict[tuple[int, int], float]] = {}
    quantizer = card.get("quantizer", {})
    tables = quantizer.get("clip", {}) if isinstance(quantizer, Mapping) else None
    if not isinstance(tables, Mapping):
        raise bad("quantizer.clip is not an object")
    for kind, tab in tables.items():
        if kind not in KINDS or not isinstance(tab, Mapping):
            raise bad(f"quantizer.clip.{kind} is not a table of a kind k/v")
        clip[kind] = {}
        for key, c in tab.items():
            parts = str(key).split("x")
            if len(parts) != 2 or not all(x.isdigit() for x in parts):
                raise bad(f"quantizer.clip.{kind} key {key!r} is not SIZExBITS")
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0 <= c < 1e6):
                raise CalibrationMismatchError(f"invalid clip factor {c!r} for {kind} {key} in {cp}; recalibrate "
                                               f"with `{hint}`")
            clip[kind][(int(parts[0]), int(parts[1]))] = float(c)
    calibration = card.get("calibration", {})
    if not isinstance(calibration, Mapping):
        raise bad("calibration is not an object")

    tp, want_sha, want_bytes = _tensor_file(card, cp, tensors_path, bad, hint)
    _check_file_digest(tp, want_sha, want_bytes, hint)
    t = _read_tensors(tp, hint)
    blocks: dict[str, list[FeatureBlock]] = {}
    for kind in KINDS:
        blocks[kind] = []
        for i, bd in enumerate(layout[kind]):
            mean, basis, scale = _block_tensors(t, kind, i, bd, tp, hint)
            blocks[kind].append(FeatureBlock(bd["layers"][0], bd["layers"][1], bd["offset"], bd["p"], mean, basis,
                                             scale))
    known = {"format_version", "model", "tp_size", "tp_rank", "sink_tokens", "window_tokens", "p",
             "quantizer", "kinds", "plans", "artifact_id", "calibration", "tensors"}
    art = CalibrationArtifact(
        model=dict(card["model"]), blocks=blocks, plans=plans, tp_size=summary.tp_size, tp_rank=summary.tp_rank,
        sink_tokens=sink, window_tokens=window, calibration=dict(calibration),
        extra={k: v for k, v in card.items() if k not in known}, clip=clip,
    )
    for rp in plans.values():
        for kind in KINDS:
            for b, pl in zip(blocks[kind], rp.for_kind(kind)):
                if pl.rank > b.basis.shape[1]:
                    raise CalibrationMismatchError(
                        f"ratio {rp.ratio}: a {kind} plan needs rank {pl.rank} of p={pl.p}, the basis is "
                        f"[{b.p}, {b.basis.shape[1]}] ({cp}); recalibrate with `{hint}`")
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
