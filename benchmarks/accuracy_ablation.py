"""Ablation of rate-distortion levers: calibration variants and position-class plans, on prose, code and chat.

    python benchmarks/accuracy_ablation.py --model smollm2-135m \
        --variant shipped=DIR_A --variant mixed=DIR_B ... [--full shipped] [--split mixed:64:8] --windows 32

Every variant is scored on the same windows in one pass per text (one prefill and one uncompressed baseline per
window), at `--ratios` (default 16 and 32); the `--full` variant at every plan of its artifact, beside FP8,
int4-g32 and KIVI-2. `--split LABEL:N:R` adds position-class plans on variant LABEL: the first N compressed
tokens after the sinks at the R× plan, the rest at each ratio of `--ratios`. Rows -> benchmarks/results/
accuracy_ablation.{json,md} (a row of the same model, text, method, variant and ratio is replaced; others are kept,
so passes with other variants add to a table). Δppl carries a paired bootstrap
95% interval over windows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _markdown(rows: list[dict]) -> str:
    out = ["# Rate-distortion ablation\n\n",
           "Each lever is a calibration variant (or a plan variant), scored on the same windows of each text: prefix "
           "compressed (4 sinks + 128 most recent exact), next tokens scored (assistant tokens on chat). Δppl with a "
           "paired bootstrap 95% interval over windows.\n"]
    tables: dict[tuple, dict] = {}
    for r in rows:
        if r["method"] != "kvtc":
            continue
        t = tables.setdefault((r["model"], r["target_ratio"]), {})
        t.setdefault(r["variant"], {})[r["eval_text"]] = r
    texts = ("prose", "code", "chat")
    for (model, ratio), t in sorted(tables.items()):
        r0 = next(iter(next(iter(t.values())).values()))
        out.append(f"\n## {model}, {ratio:.0f}x plan\n\n{r0['windows']} windows per text. Machine: {r0['machine']}. "
                   f"Commit: {r0['commit']}.\n\n| variant | " + " | ".join(f"{x}: realized, Δppl [95% CI]" for x in texts)
                   + " |\n|---|" + "---|" * len(texts) + "\n")
        for variant, by_text in t.items():
            cells = []
            for x in texts:
                r = by_text.get(x)
                if r is None:
                    cells.append("—")
                else:
                    lo, hi = r["delta_ppl_ci95"]
                    cells.append(f"{r['realized_ratio']:.1f}x, {r['delta_ppl_pct']:+.2f}% [{lo:+.2f}, {hi:+.2f}]")
            out.append(f"| {variant} | " + " | ".join(cells) + " |\n")
    return "".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--variant", action="append", required=True, metavar="LABEL=DIR", help="calibration artifact of a variant")
    ap.add_argument("--full", default=None, metavar="LABEL", help="variant scored at every plan, with the baselines")
    ap.add_argument("--split", action="append", default=[], metavar="LABEL:N:R", help="position-class plan variant")
    ap.add_argument("--text", nargs="+", choices=("prose", "code", "chat"), default=["prose", "code", "chat"])
    ap.add_argument("--ratios", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--prefix", type=int, default=None, help="compressed prefix tokens per window (default: 512; 384 on chat)")
    ap.add_argument("--score", type=int, default=None, help="scored tokens per window (default: 128)")
    ap.add_argument("--out-dir", default=str(HERE / "results"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    from kvtc_sglang.codec.artifact import load_artifact
    from kvtc_sglang.eval.baselines import BASELINES
    from kvtc_sglang.eval.provenance import git_commit, machine_description
    from kvtc_sglang.eval.rate_distortion import (baseline_method, evaluate_text, format_rows, kvtc_method,
                                                  split_plan_method)
    from kvtc_sglang.models.registry import model_label, model_path
    from kvtc_sglang.models.smollm2 import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    label = model_label(args.model)
    model, tok = load_model(model_path(args.model))
    arts = {}
    for spec in args.variant:
        name, _, d = spec.partition("=")
        arts[name] = load_artifact(d)
    methods = []
    for name, art in arts.items():
        ratios = sorted(art.plans) if name == args.full else args.ratios
        methods += [kvtc_method(art, r, variant=name) for r in ratios]
        if name == args.full:
            methods += [baseline_method(b) for b in BASELINES]
    for spec in args.split:
        name, n, r = spec.split(":")
        methods += [split_plan_method(arts[name], int(r), int(n), ratio, variant=f"{name} + first {n} at {r}x")
                    for ratio in args.ratios if ratio != int(r)]
    machine, commit = machine_description(), git_commit()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "accuracy_ablation.json"
    for text_name in args.text:
        rows = evaluate_text(model, tok, text_name, methods, windows=args.windows, prefix=args.prefix,
                             score=args.score, desc=f"{label} {text_name}")
        for r in rows:
            r.update(model=label, machine=machine, commit=commit)
        print(f"\n{label} — {text_name}\n" + format_rows(rows, with_variant=True), flush=True)
        old = json.loads(path.read_text()) if path.is_file() else []
        # rows accumulate across passes (every pass scores the same windows, so rows stay paired); a row of the
        # same method, variant and ratio on the same model and text is replaced
        key = lambda r: (r["model"], r["eval_text"], r["method"], r.get("variant", ""), r["target_ratio"])  # noqa: E731
        new_keys = {key(r) for r in rows}
        keep = [r for r in old if key(r) not in new_keys]
        path.write_text(json.dumps(keep + rows, indent=1) + "\n")
        (out / "accuracy_ablation.md").write_text(_markdown(keep + rows))
    print(f"machine: {machine}\nwrote {path}, accuracy_ablation.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
