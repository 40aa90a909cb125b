"""The three evaluation texts (prose, code, chat) as token streams with a scoring mask, and their windows.

None of this text is calibration text (the calibration mix is in ``kvtc_sglang/data/``):

    prose  WikiText-2 *test* (``benchmarks/data/wikitext2_test.txt``, CC BY-SA 3.0); every token scored.
    code   Python source of sglang 0.5.17, the files in ``CODE_FILES`` read from the installed package
           (Apache-2.0), concatenated in that order with a ``# file: PATH`` line before each; every token
           scored. Another sglang version is refused (the text would differ).
    chat   conversations rendered with the model's own chat template: the first 48 two-turn MT-Bench questions
           (Apache-2.0) with SmolLM2-135M-Instruct's greedy answers (``mt_bench_answers_smollm2.jsonl``,
           made by ``benchmarks/data/make_mt_bench_answers.py``), then the 5 real ShareGPT conversations of
           DialogStudio (Apache-2.0); only the tokens of assistant turns are scored.

A text is cut into ``n`` windows of ``length`` tokens, evenly spaced over the whole stream and never
overlapping (so a text's windows sample all of it, not only its first files or articles).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

TEXTS = ("prose", "code", "chat")
SGLANG_VERSION = "0.5.17"
CODE_FILES = (
    "srt/managers/scheduler.py",
    "srt/mem_cache/memory_pool.py",
    "srt/managers/schedule_policy.py",
    "srt/mem_cache/radix_cache.py",
    "srt/managers/cache_controller.py",
)
# (prefix, scored) tokens per window: cached chat nodes are a few hundred tokens (and the chat text ~35k tokens)
DEFAULT_WINDOW = {"prose": (512, 128), "code": (512, 128), "chat": (384, 128)}
CHAT_FILES = ("mt_bench_answers_smollm2.jsonl", "dialogstudio_sharegpt_original_example.json")


@dataclass
class EvalText:
    """A tokenized evaluation text.

    Attributes:
        name: "prose", "code" or "chat".
        ids: [N] int64 token ids.
        scored: [N] bool; True where the token counts as a scored target (assistant tokens in chat).
        source: provenance (files, versions, licenses), stored beside result rows.
    """

    name: str
    ids: torch.Tensor
    scored: torch.Tensor
    source: dict = field(default_factory=dict)


def default_data_dir() -> Path:
    """``benchmarks/data`` of this checkout."""
    here = Path(__file__).resolve()
    for base in (here.parents[2] / "benchmarks" / "data", Path.cwd() / "benchmarks" / "data"):
        if (base / "wikitext2_test.txt").is_file():
            return base
    raise FileNotFoundError("benchmarks/data not found: run from a checkout of kvtc-sglang or pass data_dir")


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0].to(torch.int64)


def prose_text(tokenizer, data_dir: Path | None = None) -> EvalText:
    path = (data_dir or default_data_dir()) / "wikitext2_test.txt"
    ids = _tokenize(tokenizer, path.read_text(encoding="utf-8"))
    return EvalText("prose", ids, torch.ones_like(ids, dtype=torch.bool),
                    {"file": path.name, "license": "CC BY-SA 3.0"})


def code_source() -> str:
    """The code text: CODE_FILES of the installed sglang, each after a ``# file: PATH`` line."""
    from kvtc_sglang.sglang_compat import installed_sglang_site_packages, installed_sglang_version

    version = installed_sglang_version()
    site_packages = installed_sglang_site_packages()
    if version is None or site_packages is None:
        raise RuntimeError(f"the code evaluation text is sglang {SGLANG_VERSION}'s source; sglang is not installed")
    if version != SGLANG_VERSION:
        raise RuntimeError(f"the code evaluation text is sglang {SGLANG_VERSION}'s source; sglang {version} is installed")
    base = site_packages / "sglang"
    return "".join(f"# file: sglang/{rel}\n" + (base / rel).read_text(encoding="utf-8") + "\n" for rel in CODE_FILES)


def code_text(tokenizer) -> EvalText:
    ids = _tokenize(tokenizer, code_source())
    return EvalText("code", ids, torch.ones_like(ids, dtype=torch.bool),
                    {"package": f"sglang=={SGLANG_VERSION}", "files": list(CODE_FILES), "license": "Apache-2.0"})


def chat_conversations(data_dir: Path | None = None) -> list[list[dict[str, str]]]:
    """The chat evaluation conversations as lists of {"role", "content"} messages (user/assistant turns)."""
    d = data_dir or default_data_dir()
    convs = []
    for line in (d / CHAT_FILES[0]).read_text(encoding="utf-8").splitlines():
        if line.strip():
            q = json.loads(line)
            msgs = []
            for turn, answer in zip(q["turns"], q["answers"]):
                msgs += [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
            convs.append(msgs)
    roles = {"human": "user", "gpt": "assistant"}
    for c in json.loads((d / CHAT_FILES[1]).read_text(encoding="utf-8")):
        msgs = [{"role": roles[t["from"]], "content": t["value"]} for t in c["conversations"] if t["from"] in roles]
        if msgs:
            convs.append(msgs)
    return convs


def render_conversation(tokenizer, messages: Sequence[dict[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of a conversation rendered with the tokenizer's chat template, and which are assistant tokens.

    Each message's span is the growth of the rendered string when the message is appended; an assistant
    message's scored tokens are those whose characters lie in its span after the template's generation
    prompt: its content and end-of-turn marker, not the line break the template puts after it. Returns ([n] int64 ids, [n] bool mask).
    """
    text = tokenizer.apply_chat_template(list(messages), tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False)
        if not (text.startswith(before) and text.startswith(upto)):
            raise ValueError("the chat template does not render conversations incrementally")
        spans.append((len(before), len(upto.rstrip("\n"))))  # the template's line break after the turn is not scored
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.int64)
    mask = torch.zeros(ids.numel(), dtype=torch.bool)
    for j, (a, b) in enumerate(enc["offset_mapping"]):
        mask[j] = any(s <= a and b <= e and b > a for s, e in spans)
    return ids, mask


def chat_text(tokenizer, data_dir: Path | None = None) -> EvalText:
    ids, masks = [], []
    for conv in chat_conversations(data_dir):
        i, m = render_conversation(tokenizer, conv)
        ids.append(i)
        masks.append(m)
    return EvalText("chat", torch.cat(ids), torch.cat(masks),
                    {"files": list(CHAT_FILES), "license": "Apache-2.0 (questions, conversations); answers: model output",
                     "scored": "assistant turns"})


def load_text(name: str, tokenizer, data_dir: Path | None = None) -> EvalText:
    """One of TEXTS, tokenized for `tokenizer`."""
    if name == "prose":
        return prose_text(tokenizer, data_dir)
    if name == "code":
        return code_text(tokenizer)
    if name == "chat":
        return chat_text(tokenizer, data_dir)
    raise ValueError(f"unknown evaluation text {name!r}; choose from {TEXTS}")


def text_windows(text: EvalText, n: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` non-overlapping windows of `length` tokens evenly spaced over the text: [(ids [length], scored [length])].

    Raises ValueError when the text holds fewer than `n` windows.
    """
    total = text.ids.numel()
    if n * length > total:
        raise ValueError(f"{text.name} text has {total} tokens: fewer than {n} windows of {length}")
    stride = total // n
    starts = [i * stride for i in range(n)]
    return [(text.ids[s : s + length], text.scored[s : s + length]) for s in starts]


def describe(text: EvalText) -> dict[str, Any]:
    return {"eval_text": text.name, "text_tokens": int(text.ids.numel()), "scored_fraction": float(text.scored.float().mean()),
            **{f"source_{k}": v for k, v in text.source.items()}}
