"""Real text for the workloads: MT-Bench questions, documents cut from WikiText-2 test, and a model's chat template
turned into the token segments ``workloads.ChatSegments`` needs.

Data (``benchmarks/data/README.md`` has sources and licenses): ``mt_bench_question.jsonl`` (Apache-2.0),
``wikitext2_test.txt`` (CC BY-SA 3.0). Neither is calibration text: ``kvtc-sglang calibrate`` reads
``kvtc_sglang/data`` (Pride and Prejudice, tiny Shakespeare, Botchan, WikiText-2 *validation*).
"""

from __future__ import annotations

from pathlib import Path

from kvtc_sglang.eval.conversations import read_mt_bench

from .model import pseudo_tokens
from .workloads import ChatSegments

DATA = Path(__file__).resolve().parents[1] / "data"


def mt_bench_questions() -> list[str]:
    """The 80 MT-Bench entries' turns in file order (entry 1 turn 1, entry 1 turn 2, entry 2 turn 1, ...)."""
    return [t for c in read_mt_bench(DATA / "mt_bench_question.jsonl") for t in c.user_turns]


def wikitext_test() -> str:
    return (DATA / "wikitext2_test.txt").read_text()


def cut_documents(ids: list[int], n_docs: int, doc_tokens: int) -> list[list[int]]:
    """``n_docs`` windows of ``doc_tokens`` ids with distinct start offsets spread over ``ids`` (windows overlap when
    the text is shorter than ``n_docs * doc_tokens``; distinct starts still give every user its own prefix)."""
    if len(ids) < doc_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one document of {doc_tokens}")
    span = len(ids) - doc_tokens
    starts = sorted({round(i * span / max(1, n_docs - 1)) if n_docs > 1 else 0 for i in range(n_docs)})
    if len(starts) < n_docs:
        raise ValueError(f"cannot cut {n_docs} distinct documents of {doc_tokens} tokens from {len(ids)} tokens")
    return [ids[s:s + doc_tokens] for s in starts]


class ChatTokenizer:
    """A model's tokenizer and chat template as ``ChatSegments``; a plain "User:/Assistant:" layout without a
    template."""

    _DOC, _Q, _MARK = "<<kvtc-doc>>", "<<kvtc-question>>", "<<kvtc-answer>>"

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.templated = bool(getattr(self.tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def _render(self, messages: list[dict]) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _first_parts(self, system: str) -> tuple[str, str, str]:
        if not self.templated:
            return ((system + "\n\n" if system else "") + "User: ", "\n\n", "\n\nAssistant:")
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": f"{self._DOC}\n\n{self._Q}"}]
        text = self._render(msgs)
        pre, rest = text.split(self._DOC, 1)
        mid, post = rest.split(self._Q, 1)
        return pre, mid, post

    def segments(self) -> ChatSegments:
        _, mid, post = self._first_parts("")

        def follow_up(user: str) -> list[int]:
            if not self.templated:
                return self.encode(f"\n\nUser: {user}\n\nAssistant:")
            text = self._render([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": self._MARK},
                                 {"role": "user", "content": user}])
            return self.encode(text[text.index(self._MARK) + len(self._MARK):])

        return ChatSegments(opening=lambda system: self.encode(self._first_parts(system)[0]),
                            question=lambda q: self.encode(mid + q + post), follow_up=follow_up)


def chat_text_sources(tokenizer: ChatTokenizer | None, *, vocab_size: int, n_docs: int, doc_tokens: int,
                      seed: int = 0) -> tuple[ChatSegments, list[list[int]]]:
    """(segments, documents) for ``workloads.chat_over_documents`` / ``long_doc_qa``: with a tokenizer, WikiText-2
    test tokenized and cut into ``n_docs`` documents; without one, pseudo ids of the same sizes."""
    if tokenizer is None:
        from .workloads import pseudo_chat_segments

        docs = [pseudo_tokens(doc_tokens, f"{seed}:doc:{i}", vocab_size) for i in range(n_docs)]
        return pseudo_chat_segments(vocab_size, seed), docs
    ids = tokenizer.encode(wikitext_test())
    return tokenizer.segments(), cut_documents(ids, n_docs, doc_tokens)
