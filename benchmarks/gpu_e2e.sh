#!/usr/bin/env bash
# End to end on a GPU box with SGLang 0.5.17 (issue "End to end on the GPU"): run from the checkout root after
# `source .devkit/stage.sh` (SGLang + FlashInfer kits on PYTHONPATH). One step per call:
#
#   bash benchmarks/gpu_e2e.sh setup          install the checkout, check the plugin's flags, write the dummy
#                                              Llama-3.1-8B config, start the dummy model's calibration in the
#                                              background (capture server -> KV dumps -> GPU calibration)
#   bash benchmarks/gpu_e2e.sh smollm GGUF     convert SmolLM2 (GGUF) to an HF folder, calibrate it on the GPU, run the
#                                              kvtc-vs-radix agreement check (serve_agreement.py)
#   bash benchmarks/gpu_e2e.sh serve [CONFIGS] multi-turn serving benchmark on the dummy Llama-3.1-8B, under memory
#                                              pressure (default configs radix,kvtc,hicache)
#   bash benchmarks/gpu_e2e.sh status         what the background steps did so far
#
# Work files live in $KVTC_E2E (default /tmp/kvtc_e2e); results and logs go to $OUT (default $KVTC_E2E/out).
set -u -o pipefail
cd "$(dirname "$0")/.."
W=${KVTC_E2E:-/tmp/kvtc_e2e}
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1 KVTC_COMMIT=${KVTC_COMMIT:-unknown}
PY=python3
LLAMA=$W/llama-3.1-8b-dummy
LLAMA_ART=$W/art_llama
SMOL=$W/smollm2-135m-instruct
SMOL_ART=$W/art_smollm2
step=${1:?usage: gpu_e2e.sh setup|smollm GGUF|serve [CONFIGS]|status}

llama_config() {
  mkdir -p "$LLAMA"
  cat > "$LLAMA/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
 "rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
 "original_max_position_embeddings": 8192, "rope_type": "llama3"}, "max_position_embeddings": 131072,
 "rms_norm_eps": 1e-05, "hidden_act": "silu", "torch_dtype": "bfloat16", "tie_word_embeddings": false,
 "bos_token_id": 128000, "eos_token_id": 128001}
JSON
}

llama_calibrate() {  # capture server -> traffic -> KV dumps -> calibration (runs in the background)
  local port=31990 cap=$W/llama_dumps
  rm -rf "$cap"
  $PY -m sglang.launch_server --model-path "$LLAMA" --load-format dummy --skip-tokenizer-init \
    --attention-backend triton --disable-cuda-graph --mem-fraction-static 0.35 --port $port \
    --kv-compress kvtc --kvtc-capture-dir "$cap" --kvtc-capture-tokens 32768 > "$W/llama_capture_server.log" 2>&1 &
  local pid=$!
  $PY - "$port" <<'PYEOF'
import random, sys, time, requests
url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(900):
    try:
        if requests.get(url + "/health", timeout=5).status_code == 200:
            break
    except requests.RequestException:
        pass
    time.sleep(2)
else:
    sys.exit("capture server did not come up")
rng = random.Random(0)
t0 = time.time()
for i in range(33):  # 32 windows of 1024 tokens fill the 32768-token capture budget
    ids = [rng.randrange(1000, 128000) for _ in range(1024)]
    r = requests.post(url + "/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 1}}, timeout=900)
    r.raise_for_status()
print(f"capture traffic done in {time.time() - t0:.0f} s")
PYEOF
  sleep 3
  kill $pid; wait $pid 2>/dev/null
  ls "$cap"/*/ | head -3; cat "$cap"/*/DONE
  $PY -m kvtc_sglang calibrate --kv-dumps "$cap" --model "$LLAMA" --out "$LLAMA_ART" --ratios 16 32 \
    --tokens 32768 --dp-samples 4096 --device cuda --quiet && touch "$W/llama_calibrated"
}

case $step in
  setup)
    $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -3
    $PY -m sglang.launch_server --help 2>/dev/null | grep -E -- "--kv-compress|--kvtc-" | head -12 | tee "$OUT/launch_server_help.txt"
    $PY -c "from importlib.metadata import entry_points; print([e.value for e in entry_points(group='sglang.srt.plugins')])"
    llama_config
    setsid nohup bash "$0" llama-calibrate > "$W/llama_calibrate.log" 2>&1 < /dev/null &
    echo "dummy Llama calibration started in the background (log $W/llama_calibrate.log)"
    ;;
  llama-calibrate)
    t0=$(date +%s); llama_calibrate; echo "llama calibration step finished in $(( $(date +%s) - t0 )) s"
    ;;
  smollm)
    gguf=${2:?gguf path}
    t0=$(date +%s)
    if [ ! -f "$W/llama_calibrated" ] && ! pgrep -f "gpu_e2e.sh llama-calibrate" > /dev/null; then
      setsid nohup bash "$0" llama-calibrate > "$W/llama_calibrate.log" 2>&1 < /dev/null &
      echo "dummy Llama calibration (re)started in the background"
    fi
    [ -f "$SMOL/config.json" ] || $PY -m kvtc_sglang convert-gguf --gguf "$gguf" --out "$SMOL" --dtype bfloat16 2>&1 | tail -3
    echo "converted in $(( $(date +%s) - t0 )) s"
    [ -f "$SMOL_ART/card.json" ] || $PY -m kvtc_sglang calibrate --model "$SMOL" --out "$SMOL_ART" --ratios 16 --device cuda --quiet 2>&1 | tail -4
    echo "calibrated in $(( $(date +%s) - t0 )) s"
    timeout 420 $PY benchmarks/serve_agreement.py --model-path "$SMOL" \
      --server-args "--attention-backend triton --disable-cuda-graph --mem-fraction-static 0.12 --max-total-tokens 1500" \
      --kvtc-args "--kvtc-calibration $SMOL_ART --kvtc-window-tokens 32" --users 12 --turns 3 --output-len 64 \
      --out-dir "$OUT" 2>&1 | tail -30
    cp "$SMOL_ART/card.json" "$OUT/smollm2_gpu_card.json" 2>/dev/null
    echo "smollm step finished in $(( $(date +%s) - t0 )) s"
    ;;
  serve)
    configs=${2:-radix,kvtc,hicache}
    [ -f "$W/llama_calibrated" ] || { echo "dummy Llama calibration not finished: $(tail -3 $W/llama_calibrate.log)"; exit 1; }
    timeout 560 $PY benchmarks/serve_multiturn.py --configs "$configs" --model-path "$LLAMA" \
      --server-args "--load-format dummy --skip-tokenizer-init --attention-backend triton --disable-cuda-graph --mem-fraction-static 0.8 --max-total-tokens 32768" \
      --kvtc-args "--kvtc-calibration $LLAMA_ART" --workload synthetic --working-set-multipliers 4 --output-len 32 \
      --concurrency 16 --out-dir "$OUT" 2>&1 | tail -40
    ;;
  status)
    tail -5 "$W/llama_calibrate.log" 2>/dev/null; ls "$W" 2>/dev/null
    ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
