"""Answer the first 48 two-turn MT-Bench questions with SmolLM2-135M-Instruct, for the chat evaluation text.

    python benchmarks/data/make_mt_bench_answers.py            # writes mt_bench_answers_smollm2.jsonl beside it

Greedy decoding (no sampling, repetition penalty 1.1, at most 320 new tokens per answer), each turn
rendered with the model's chat template after the previous turns, so the file is deterministic for a
given model file and transformers version (48 questions: the chat text then holds > 64 windows of 512 tokens;
about an hour on a busy 2-core CPU). Each line: {"question_id", "category", "turns": [q1, q2],
"answers": [a1, a2]}. The questions are MT-Bench's (Apache-2.0); the answers are model output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "mt_bench_answers_smollm2.jsonl"))
    ap.add_argument("--max-new-tokens", type=int, default=320)
    ap.add_argument("--limit", type=int, default=48, help="first N questions (default 48; 0: all 80)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: decoding one token at a time "
                    "gains nothing from more, and loses much on a busy machine)")
    args = ap.parse_args(argv)

    import torch

    from kvtc_sglang.models.smollm2 import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(None)
    questions = [json.loads(line) for line in (HERE / "mt_bench_question.jsonl").read_text().splitlines() if line.strip()]
    questions = questions[: args.limit] if args.limit else questions
    done = {}
    out = Path(args.out)
    if out.is_file():  # resume
        for line in out.read_text().splitlines():
            d = json.loads(line)
            done[d["question_id"]] = d
    t0 = time.time()
    with open(out, "a") as f:
        for q in questions:
            if q["question_id"] in done:
                continue
            messages, answers = [], []
            for turn in q["turns"]:
                messages.append({"role": "user", "content": turn})
                ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
                with torch.inference_mode():
                    gen = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, repetition_penalty=1.1,
                                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id)
                answer = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
                answers.append(answer)
                messages.append({"role": "assistant", "content": answer})
            f.write(json.dumps({"question_id": q["question_id"], "category": q["category"], "turns": q["turns"],
                                "answers": answers}) + "\n")
            f.flush()
            print(f"{q['question_id']}: {sum(len(a) for a in answers)} chars, {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
