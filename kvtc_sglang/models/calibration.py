"""Calibrating a model: a loaded transformers model (or KV rows captured from a server) -> artifact folders.

The typed library entry points behind ``kvtc-sglang calibrate`` and ``kvtc-sglang report``:

    calibrate_model       prefill a text corpus through a transformers model (optionally weighting features by
                          their diagonal Fisher information) and write one artifact per TP rank;
    calibrate_from_dumps  the same from K/V rows a capture server wrote (``--kvtc-capture-dir``);
    ensure_artifact       load an artifact, or the cached default one, calibrating it first when it is missing.

The algorithm itself (PCA, DP, budget split) is ``kvtc_sglang.codec.calibrate``; this module only feeds it.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch

from kvtc_sglang.codec.artifact import CalibrationArtifact, load_artifact, rank_dir_name
from kvtc_sglang.codec.calibrate import CalibrationSettings, calibrate, windows_from_ids
from kvtc_sglang.codec.errors import CalibrationMismatchError
from kvtc_sglang.models.identity import (
    CAPTURE_IDENTITY_FILE,
    ModelIdentityError,
    hf_model_signature,
    signature_problem,
    tokenizer_digest,
)
from kvtc_sglang.models.kv_capture import ModelKVSpec, capture_kv, weights_digest

DEFAULT_CORPUS = ("gutenberg_pride_and_prejudice.txt", "tiny_shakespeare.txt", "gutenberg_botchan.txt",
                  "wikitext2_valid.txt", "code_transformers.txt", "chat_fastchat_dummy.json")
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WEIGHTINGS = ("fisher", "none")


class CalibrationInputError(ValueError):
    """The calibration input (corpus, captured KV, model config) cannot produce an artifact; the message says why."""


def check_output_dir(out_dir: str | Path) -> Path:
    """Make sure an artifact can be written at ``out_dir`` before any calibration work: it is a directory or does not
    exist yet, and the directory (or its nearest existing parent) accepts a new file. Returns the path (``~``
    expanded); CalibrationInputError saying what to change otherwise. Nothing is left behind."""
    import tempfile

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise CalibrationInputError(f"--out {out_dir} is an existing file; give a directory (new or existing) for "
                                    f"the artifact's card.json and tensors.pt")
    probe_dir = out
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise CalibrationInputError(f"--out {out_dir}: {probe_dir} is a file, so the directory cannot be created")
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".kvtc-write-test-"):
            pass
    except OSError as exc:
        raise CalibrationInputError(f"--out {out_dir}: cannot write in {probe_dir} ({exc.strerror or exc}); give a "
                                    f"directory you can write to") from None
    return out


def default_corpus_paths() -> list[Path]:
    """The shipped calibration mix (package data): two novels, Shakespeare, WikiText-2 validation text, Python source
    (transformers) and chat (ShareGPT-format conversations, rendered with the model's chat template)."""
    base = resources.files("kvtc_sglang") / "data"
    return [Path(str(base / name)) for name in DEFAULT_CORPUS]


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is usable, else ``"cpu"``; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


CHAT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def render_chat_corpus(tokenizer: Any, path: str | Path) -> str:
    """A ShareGPT-format JSON file (a list of ``{"conversations": [{"from": "human" | "gpt", "value": str}, ...]}``)
    as one text: every conversation rendered with the tokenizer's chat template, back to back.

    Raises CalibrationInputError when the tokenizer has no chat template or the file is not in that format.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationInputError(f"{Path(path).name} is a chat corpus, but the model's tokenizer has no chat template")
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
        convs = [[{"role": CHAT_ROLES[m["from"]], "content": m["value"]} for m in item["conversations"]] for item in items]
    except (ValueError, KeyError, TypeError) as exc:
        raise CalibrationInputError(f"{path} is not a ShareGPT-format conversation list ({exc!r})") from None
    return "".join(tokenizer.apply_chat_template(c, tokenize=False) for c in convs if c)


def tokenize_corpus(tokenizer: Any, paths: Sequence[str | Path]) -> list[torch.Tensor]:
    """Token ids of each corpus file, shape [n_i], dtype int64 (no special tokens added).

    Plain-text files are tokenized as they are; ``.json`` files are chat corpora (see ``render_chat_corpus``),
    rendered with the model's own chat template first, so its role markers are calibrated too.
    """
    out = []
    for p in paths:
        if Path(p).suffix == ".json":
            text = render_chat_corpus(tokenizer, p)
        else:
            text = Path(p).read_text(encoding="utf-8", errors="replace")
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        out.append(ids.to(torch.int64))
    return out


def calibrate_model(model: Any, tokenizer: Any, corpus: Sequence[Path], settings: CalibrationSettings,
                    out_dir: str | Path, *, model_name: str = DEFAULT_MODEL_NAME, tp_size: int = 1,
                    weighting: str = "fisher", fisher_windows: int = 8) -> list[Path]:
    """Calibrate a loaded transformers model on text files and write the artifact(s); returns the card paths.

    Args:
        model, tokenizer: a transformers causal LM (eager attention) and its tokenizer.
        corpus: plain-text calibration files, cut into windows of ``settings.seq_len`` tokens (round-robin across
            files, ``settings.max_tokens`` in all).
        settings: the algorithm's settings; ``settings.notes["corpus"]`` is set to the file names.
        out_dir: the artifact folder; with ``tp_size`` N > 1, one folder per rank, ``out_dir/tp{N}-rank{r}``.
        model_name: recorded in the card (``model.name``).
        tp_size: KV-head shards; rank r gets heads [r H/N, (r + 1) H/N).
        weighting: "fisher" scales features by the square root of their diagonal Fisher information, estimated by
            back-propagating the next-token loss of ``fisher_windows`` windows to the KV cache; "none" does not.

    Raises:
        CalibrationInputError: the corpus has no full window, or the KV heads do not split over ``tp_size``.
    """
    from kvtc_sglang.models.kv_sensitivity import FisherAccumulator, kv_gradients

    if weighting not in WEIGHTINGS:
        raise CalibrationInputError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    spec = ModelKVSpec.from_hf_config(model.config, name=str(model_name))
    windows = windows_from_ids(tokenize_corpus(tokenizer, corpus), settings.seq_len, settings.max_tokens,
                               settings.seed)
    if not windows:
        raise CalibrationInputError(f"the corpus has fewer than {settings.seq_len} tokens per file; give a larger "
                                    f"--corpus or a smaller --seq-len")
    if spec.num_kv_heads % tp_size:
        raise CalibrationInputError(f"{spec.num_kv_heads} KV heads do not split over tp_size={tp_size}")
    settings = dataclasses.replace(settings, notes={**settings.notes, "corpus": [Path(p).name for p in corpus]})
    heads = spec.num_kv_heads // tp_size
    kept: dict[int, tuple] = {}  # KV of the windows already prefilled by the Fisher pass
    fisher = None
    if weighting == "fisher":
        from tqdm.auto import tqdm

        acc = FisherAccumulator(spec.rope, skip_tokens=settings.sink_tokens)
        for ids in tqdm(windows[:fisher_windows], desc="loss sensitivity", disable=not settings.progress, unit="win"):
            g = kv_gradients(model, ids)
            acc.update(g)
            kept[id(ids)] = (g.k, g.v)
        fisher = acc.fisher()

    def kv_source(ids):
        if id(ids) in kept:
            return kept[id(ids)]
        cap = capture_kv(model, ids)
        return cap.k, cap.v

    out_dir = Path(out_dir)
    written = []
    identity = model_identity_facts(model, tokenizer, spec.head_dim)
    for rank in range(tp_size):
        facts = spec.to_dict()
        facts["num_kv_heads_per_rank"] = heads
        facts["weights_digest"] = weights_digest(model)
        facts.update(identity)
        hs = slice(rank * heads, (rank + 1) * heads)
        sens = None
        if fisher is not None:
            L, D = spec.num_layers, spec.head_dim
            sens = {kind: f.view(L, spec.num_kv_heads, D)[:, hs].reshape(-1) for kind, f in fisher.items()}
        art = calibrate(kv_source, windows, facts, settings, head_slice=hs if tp_size > 1 else None, sensitivity=sens)
        art.tp_size, art.tp_rank = tp_size, rank
        dest = out_dir if tp_size == 1 else out_dir / rank_dir_name(tp_size, rank)
        written.append(art.save(dest))
    return written


def model_identity_facts(model: Any, tokenizer: Any, head_dim: int) -> dict[str, Any]:
    """The card's ``model.weights_signature`` and ``model.tokenizer_digest`` of a transformers model and its tokenizer
    (``models.identity``); a field that cannot be computed is left out (the server then logs that it is not
    compared)."""
    facts: dict[str, Any] = {}
    try:
        facts["weights_signature"] = hf_model_signature(model, head_dim)
    except (ModelIdentityError, AttributeError, IndexError):
        pass
    if tokenizer is not None:
        try:
            facts["tokenizer_digest"] = tokenizer_digest(tokenizer)
        except ModelIdentityError:
            pass
    return facts


def _dump_identity(rank_dir: Path, model_dir: Path) -> dict[str, Any]:
    """Identity facts of a captured rank: the weights signature the capture server wrote (``CAPTURE_IDENTITY_FILE``)
    and the tokenizer digest of ``model_dir``'s tokenizer files, where present and readable."""
    facts: dict[str, Any] = {}
    path = rank_dir / CAPTURE_IDENTITY_FILE
    if path.is_file():
        try:
            sig = json.loads(path.read_text()).get("weights_signature")
        except (OSError, ValueError, AttributeError):
            sig = None
        if sig is not None and signature_problem(sig) is None:
            facts["weights_signature"] = sig
    try:
        from transformers import AutoTokenizer

        facts["tokenizer_digest"] = tokenizer_digest(AutoTokenizer.from_pretrained(str(model_dir)))
    except Exception:  # noqa: BLE001 - no (readable) tokenizer files next to config.json: the field is left out
        pass
    return facts


def calibrate_from_dumps(dumps_dir: str | Path, model_dir: str | Path, out_dir: str | Path,
                         settings: CalibrationSettings) -> list[Path]:
    """Calibrate every TP rank captured under ``dumps_dir`` and write one artifact each; returns the card paths.

    Args:
        dumps_dir: what a capture server wrote: folders ``tp{N}-rank{r}`` of ``seq*.pt`` files, each
            ``{"k", "v": [n, L, H, D] (pool dtype, keys post-RoPE), "start": 0}``.
        model_dir: a folder holding the model's ``config.json`` (the weights are not read).
        out_dir: the artifact folder (one rank at TP=1), or the parent of ``tp{N}-rank{r}`` folders.
        settings: the algorithm's settings; ``seq_len`` is taken from the captured sequences.

    Raises:
        CalibrationInputError: no config.json, no captured ranks, or a rank folder without sequences.
    """
    model_dir, root, out_dir = Path(model_dir), Path(dumps_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise CalibrationInputError("--kv-dumps needs --model <folder with the model's config.json>")
    try:
        spec = ModelKVSpec.from_hf_config(json.loads((model_dir / "config.json").read_text()), name=model_dir.name)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CalibrationInputError(f"{model_dir / 'config.json'} is not a usable decoder config ({exc})") from None
    ranks = sorted(root.glob("tp*-rank*"))
    if not ranks:
        raise CalibrationInputError(f"no captured KV under {root} (expected tp<N>-rank<r>/seq*.pt from a server run "
                                    f"with --kv-compress kvtc --kvtc-capture-dir {root})")
    written = []
    for rank_dir in ranks:
        tp_size, tp_rank = (int(x) for x in rank_dir.name[2:].split("-rank"))
        files = sorted(rank_dir.glob("seq*.pt"))
        if not files:
            raise CalibrationInputError(f"{rank_dir} holds no seq*.pt files")
        try:
            first = torch.load(files[0], map_location="cpu", weights_only=True)
            if first["k"].dim() != 4 or first["k"].shape != first["v"].shape:
                raise ValueError(f"k {tuple(first['k'].shape)} / v {tuple(first['v'].shape)} are not [n, L, H, D]")
        except Exception as exc:  # noqa: BLE001 - a damaged capture file raises pickle, zip, key or value errors
            raise CalibrationInputError(f"{files[0]} is not a KV capture file ({type(exc).__name__}: {exc})") from None
        facts = spec.to_dict()
        facts["num_kv_heads_per_rank"] = int(first["k"].shape[2])
        facts.update(_dump_identity(rank_dir, model_dir))
        windows = [torch.tensor([i]) for i in range(len(files))]

        def kv_source(ids, files=files):
            d = torch.load(files[int(ids[0])], map_location="cpu", weights_only=True)
            return d["k"], d["v"]

        rank_settings = dataclasses.replace(
            settings, seq_len=int(first["k"].shape[0]),
            notes={**settings.notes, "source": f"KV captured from a running server ({len(files)} sequences)"})
        art = calibrate(kv_source, windows, facts, rank_settings)
        art.tp_size, art.tp_rank = tp_size, tp_rank
        dest = out_dir if len(ranks) == 1 and tp_size == 1 else out_dir / rank_dir_name(tp_size, tp_rank)
        written.append(art.save(dest))
    return written


def default_artifact_dir(model_arg: str | None) -> Path:
    """Where the default artifact of a model is cached: ``$KVTC_CACHE_DIR/calibration/<model file stem>``."""
    from kvtc_sglang.models.smollm2 import cache_dir, smollm2_gguf_path

    name = Path(model_arg).stem if model_arg else smollm2_gguf_path().stem
    return cache_dir() / "calibration" / name


def ensure_artifact(artifact: str | Path | None, model: Any, tokenizer: Any, model_arg: str | None = None,
                    quiet: bool = False) -> CalibrationArtifact:
    """Load ``artifact``, or the cached default one, calibrating it first (default settings) when it is missing."""
    import time

    if artifact is not None:
        return load_artifact(artifact)
    out = default_artifact_dir(model_arg)
    corpus = default_corpus_paths()
    try:
        art = load_artifact(out)
        if art.calibration.get("corpus") == [p.name for p in corpus]:
            return art
        print(f"the cached calibration at {out} was made from another corpus ({art.calibration.get('corpus')}): "
              f"recalibrating on the default mix")
    except CalibrationMismatchError:
        print(f"no cached calibration at {out}: calibrating (one time, a few minutes on a CPU)")
    t0 = time.time()
    settings = CalibrationSettings(progress=not quiet, device=resolve_device("auto"))
    calibrate_model(model, tokenizer, corpus, settings, out,
                    model_name=str(model_arg or DEFAULT_MODEL_NAME))
    print(f"calibrated in {time.time() - t0:.0f} s -> {out}")
    return load_artifact(out)
