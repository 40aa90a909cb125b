#!/usr/bin/env bash
# End to end on a GPU box with SGLang 0.5.17: run from the checkout root after `source .devkit/stage.sh` (SGLang +
# FlashInfer kits on PYTHONPATH). The dummy Llama-3.1-8B (random weights, `--load-format dummy`) is calibrated from its
# own KV cache (capture server -> KV dumps -> GPU calibration), at TP=1 and TP=2, then served.
#
#   [E2E_STEPS="..."] [E2E_MULTIPLIERS=m,...] \
#   bash benchmarks/gpu_e2e.sh all [SECONDS] [GPUS]   the whole run below in the background (setsid), finishing within
#                                              SECONDS (default 1500; steps that no longer fit are skipped), on two
#                                              GPUs (default "0 1"; one GPU: "0" runs both lanes on it in turn, no TP=2)
#   bash benchmarks/gpu_e2e.sh wait SECONDS    wait up to SECONDS for `all`, then pack results and logs into
#                                              $OUT/e2e_results.tar.gz (call again to keep waiting)
#   bash benchmarks/gpu_e2e.sh smollm GGUF     SmolLM2 (GGUF) -> HF folder, GPU calibration, agreement vs plain radix
#
# `all`: setup (install the checkout, check the plugin's flags, write the dummy model's config.json); TP=1 and TP=2 KV
# captures side by side while FlashInfer compiles its kernels on the second GPU; calibration of both; then lane A
# (GPU 0): radix and kvtc under memory pressure (serve_multiturn.py, synthetic multi-turn, working set
# E2E_MULTIPLIERS x the KV budget, default 4); lane B (GPU 1): hicache the same way, the kvtc-vs-radix agreement with
# --attention-backend flashinfer, the no-pressure runs; then TP=2 (kvtc, radix) over both GPUs; then throughput.py.
# E2E_STEPS picks the optional steps (default "tp2 flashinfer nopressure throughput"; "gputests" adds the Triton
# kernel and store tests on the second GPU). Work files: $KVTC_E2E (default /tmp/kvtc_e2e); results
# under $KVTC_E2E/results, logs under $KVTC_E2E/logs, step-by-step progress in $KVTC_E2E/progress.log.
set -u -o pipefail
cd "$(dirname "$0")/.."
W=${KVTC_E2E:-/tmp/kvtc_e2e}
OUT=${OUT:-$W/out}
R=$W/results
LOGS=$W/logs
mkdir -p "$W" "$OUT" "$R" "$LOGS"
export PYTHONUNBUFFERED=1 KVTC_COMMIT=${KVTC_COMMIT:-unknown}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=python3
LLAMA=$W/llama-3.1-8b-dummy
SMOL=$W/smollm2-135m-instruct
SMOL_ART=$W/art_smollm2
LABEL=llama-3.1-8b-dummy
BUDGET_TOKENS=32768
DUMMY="--load-format dummy --skip-tokenizer-init --disable-cuda-graph"
step=${1:?usage: gpu_e2e.sh all [SECONDS] [GPUS] | wait SECONDS | smollm GGUF}

log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - $(cat "$W/t0" 2>/dev/null || date +%s) ))s] $*" | tee -a "$W/progress.log"; }
left() { echo $(( $(cat "$W/deadline") - $(date +%s) )); }
fits() {  # fits SECONDS NAME: is there time for a step of about SECONDS?
  if [ "$(left)" -lt "$1" ]; then log "SKIP $2: $(left) s left, it needs ~$1 s"; return 1; fi
}

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

setup() {
  $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -3
  $PY -m sglang.launch_server --help 2>/dev/null | grep -E -- "--kv-compress|--kvtc-" | head -12 > "$R/launch_server_help.txt"
  log "launch_server --help lists $(grep -c -- '--kv' "$R/launch_server_help.txt") kvtc flags"
  nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader >> "$W/progress.log"
  llama_config
}

start_server() {  # start_server LOG GPUS ARGS...: a server in its own process group; prints its pid
  local logf=$1 gpus=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpus setsid $PY -m sglang.launch_server "$@" > "$logf" 2>&1 < /dev/null &
  echo $!
}

stop_server() { kill -TERM -- "-$1" 2>/dev/null; sleep 5; kill -KILL -- "-$1" 2>/dev/null; wait "$1" 2>/dev/null; }

send_traffic() {  # send_traffic PORT N_WINDOWS: wait for /health, then N windows of 1024 random token ids
  $PY - "$1" "$2" <<'PYEOF'
import random, sys, time, requests
url = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(450):
    try:
        if requests.get(url + "/health", timeout=5).status_code == 200:
            break
    except requests.RequestException:
        pass
    time.sleep(2)
else:
    sys.exit("server did not come up")
rng = random.Random(0)
t0 = time.time()
for i in range(int(sys.argv[2])):
    ids = [rng.randrange(1000, 128000) for _ in range(1024)]
    r = requests.post(url + "/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 8}}, timeout=900)
    r.raise_for_status()
print(f"traffic done in {time.time() - t0:.0f} s")
PYEOF
}

capture() {  # capture TP GPUS PORT: a capture server records the dummy model's KV rows per rank
  local tp=$1 gpus=$2 port=$3 cap=$W/llama_dumps_tp$1 pid
  rm -rf "$cap"
  pid=$(start_server "$LOGS/capture_tp$tp.log" "$gpus" --model-path "$LLAMA" $DUMMY --attention-backend triton \
    --mem-fraction-static 0.3 --max-total-tokens 40960 --tp-size "$tp" --port "$port" \
    --kv-compress kvtc --kvtc-capture-dir "$cap" --kvtc-capture-tokens 32768)
  send_traffic "$port" 33 2>&1 | tail -2   # 33 windows of 1024 tokens fill the 32768-token capture budget
  sleep 3
  stop_server "$pid"
  log "capture TP=$tp: $(ls "$cap"/*/DONE 2>/dev/null | wc -l) rank(s) done, $(ls "$cap"/*/seq*.pt 2>/dev/null | wc -l) files"
}

calibrate() {  # calibrate TP GPU
  CUDA_VISIBLE_DEVICES=$2 $PY -m kvtc_sglang calibrate --kv-dumps "$W/llama_dumps_tp$1" --model "$LLAMA" \
    --out "$W/art_llama_tp$1" --ratios 16 32 --tokens 32768 --dp-samples 4096 --device cuda --quiet \
    > "$LOGS/calibrate_tp$1.log" 2>&1
  log "calibrate TP=$1: rc $? ($(tail -1 "$LOGS/calibrate_tp$1.log"))"
  mkdir -p "$R/cards_tp$1"; (cd "$W/art_llama_tp$1" && find . -name card.json -exec cp --parents {} "$R/cards_tp$1/" \;)
}

flashinfer_warm() {  # FlashInfer JIT-compiles its kernels on first use (minutes on a fresh box); do it once, early
  local pid
  pid=$(start_server "$LOGS/flashinfer_warm.log" "$1" --model-path "$LLAMA" $DUMMY --attention-backend flashinfer \
    --mem-fraction-static 0.3 --max-total-tokens 16384 --port "$2")
  send_traffic "$2" 2 2>&1 | tail -1
  stop_server "$pid"
  log "flashinfer warm-up done"
}

serve() {  # serve CONFIGS GPUS PORT TP OUTDIR MODEL_LABEL MULTIPLIERS
  local tp=$4
  CUDA_VISIBLE_DEVICES=$2 timeout "$(left)" $PY benchmarks/serve_multiturn.py --configs "$1" --model-path "$LLAMA" \
    --model-label "$6" --port "$3" \
    --server-args "$DUMMY --attention-backend triton --mem-fraction-static 0.8 --max-total-tokens $BUDGET_TOKENS --tp-size $tp" \
    --kvtc-args "--kvtc-calibration $W/art_llama_tp$tp" --workload synthetic --working-set-multipliers "$7" --output-len 32 \
    --concurrency 16 --out-dir "$5" > "$LOGS/serve_$(basename "$5").log" 2>&1
  log "serve $1 (TP=$tp) rc $?: $(grep -c '' "$5/serving.json" 2>/dev/null) lines in serving.json"
}

agreement() {  # agreement BACKEND GPUS PORT: kvtc vs plain radix, same prompts (random ids), small pool
  CUDA_VISIBLE_DEVICES=$2 timeout "$(left)" $PY benchmarks/serve_agreement.py --model-path "$LLAMA" --tokenizer none \
    --question-tokens 256 --users 12 --turns 3 --output-len 32 --port "$3" --tag "$LABEL-$1" --out-dir "$R/agreement" \
    --server-args "$DUMMY --attention-backend $1 --mem-fraction-static 0.35 --max-total-tokens 6144" \
    --kvtc-args "--kvtc-calibration $W/art_llama_tp1 --kvtc-window-tokens 32" > "$LOGS/agreement_$1.log" 2>&1
  log "agreement $1 rc $?: $(grep -A8 '^| requests' "$R/agreement/serving_agreement_$LABEL-$1.md" 2>/dev/null | tail -4 | tr '\n' ' ')"
}

throughput() {  # throughput CONFIGS GPUS PORT OUTDIR
  CUDA_VISIBLE_DEVICES=$2 timeout "$(left)" $PY benchmarks/throughput.py --configs "$1" --model-path "$LLAMA" \
    --model-label "$LABEL" --port "$3" \
    --server-args "$DUMMY --attention-backend triton --mem-fraction-static 0.8 --max-total-tokens $BUDGET_TOKENS" \
    --kvtc-args "--kvtc-calibration $W/art_llama_tp1" --working-set-multipliers 4 --out-dir "$4" \
    > "$LOGS/throughput_$(basename "$4").log" 2>&1
  log "throughput $1 rc $?"
}

pipeline() {
  read -r -a gpus <<< "$GPU_LIST"
  local a=${gpus[0]} b=${gpus[1]:-${gpus[0]}} both steps=" $E2E_STEPS " mult=$E2E_MULTIPLIERS
  both=$(IFS=,; echo "${gpus[*]}")
  has() { [[ "$steps" == *" $1 "* ]]; }
  setup
  log "setup done; GPUs: lane A $a, lane B $b; steps:$steps; working set ${mult}x the KV budget"
  local jobs=() warm=()
  if has gputests; then
    CUDA_VISIBLE_DEVICES=$b timeout 300 $PY -m pytest -q -p no:cacheprovider tests/codec/test_triton_kernels.py \
      tests/cache/test_store.py > "$R/gpu_tests.txt" 2>&1 && log "GPU tests: $(tail -1 "$R/gpu_tests.txt")" &
  fi
  if has flashinfer && [ "$a" != "$b" ]; then flashinfer_warm "$b" 30990 & warm=($!); fi
  capture 1 "$a" 31000 & jobs+=($!)
  if has tp2 && [ "$a" != "$b" ]; then capture 2 "$both" 31100 & jobs+=($!); fi
  wait "${jobs[@]}"
  jobs=()
  calibrate 1 "$a" & jobs+=($!)
  if [ -d "$W/llama_dumps_tp2" ]; then calibrate 2 "$b" & jobs+=($!); fi
  wait "${jobs[@]}"
  [ -f "$W/art_llama_tp1/card.json" ] || { log "no TP=1 calibration; stopping"; touch "$W/ALL_DONE"; return; }
  # lane A: plain radix and kvtc; lane B: hicache, then the FlashInfer agreement and the no-pressure runs
  { fits 200 "lane A serving" && serve radix,kvtc "$a" 30000 1 "$R/laneA" "$LABEL" "$mult"; } & jobs=($!)
  if [ "$a" = "$b" ]; then wait "${jobs[@]}"; fi
  fits 100 "hicache serving" && serve hicache "$b" 30100 1 "$R/laneB_hicache" "$LABEL" "$mult"
  if has flashinfer; then
    [ ${#warm[@]} -gt 0 ] && wait "${warm[@]}"
    fits 200 "flashinfer agreement" && agreement flashinfer "$b" 30200
  fi
  has nopressure && fits 300 "no-pressure runs" && \
    serve radix-nopressure,kvtc-nopressure "$b" 30400 1 "$R/laneB" "$LABEL" "$mult"
  wait "${jobs[@]}"
  if has tp2 && [ -f "$W/art_llama_tp2/tp2-rank1/card.json" ]; then
    fits 300 "TP=2 serving" && serve kvtc,radix "$both" 30600 2 "$R/tp2" "$LABEL-tp2" "$mult"
  fi
  if has throughput; then
    { fits 240 "throughput radix,kvtc" && throughput radix,kvtc "$a" 30800 "$R/throughput_a"; } &
    if [ "$a" != "$b" ]; then fits 150 "throughput hicache" && throughput hicache "$b" 31200 "$R/throughput_b"; fi
    wait
  fi
  log "ALL DONE"
  touch "$W/ALL_DONE"
}

pack() {
  tar -czf "$OUT/e2e_results.tar.gz" -C "$W" results logs progress.log 2>/dev/null
  tail -25 "$W/progress.log"
}

case $step in
  all)
    rm -rf "$R" "$LOGS" "$W/ALL_DONE" "$W/progress.log"; mkdir -p "$R" "$LOGS"
    date +%s > "$W/t0"; echo $(( $(date +%s) + ${2:-1500} )) > "$W/deadline"
    GPU_LIST=${3:-0 1} E2E_STEPS=${E2E_STEPS:-tp2 flashinfer nopressure throughput} \
      E2E_MULTIPLIERS=${E2E_MULTIPLIERS:-4} setsid nohup bash "$0" pipeline > "$LOGS/pipeline.log" 2>&1 < /dev/null &
    echo "started; progress in $W/progress.log"
    ;;
  pipeline) pipeline ;;
  wait)
    for _ in $(seq "${2:-540}"); do [ -f "$W/ALL_DONE" ] && break; sleep 1; done
    pack
    ;;
  smollm)
    gguf=${2:?gguf path}
    t0=$(date +%s)
    [ -f "$SMOL/config.json" ] || $PY -m kvtc_sglang convert-gguf --gguf "$gguf" --out "$SMOL" --dtype bfloat16 2>&1 | tail -3
    [ -f "$SMOL_ART/card.json" ] || $PY -m kvtc_sglang calibrate --model "$SMOL" --out "$SMOL_ART" --ratios 16 --device cuda --quiet 2>&1 | tail -4
    echo "converted and calibrated in $(( $(date +%s) - t0 )) s"
    timeout 420 $PY benchmarks/serve_agreement.py --model-path "$SMOL" \
      --server-args "--attention-backend triton --disable-cuda-graph --mem-fraction-static 0.12 --max-total-tokens 1500" \
      --kvtc-args "--kvtc-calibration $SMOL_ART --kvtc-window-tokens 32" --users 12 --turns 3 --output-len 64 \
      --out-dir "$OUT" 2>&1 | tail -30
    ;;
  *) echo "unknown step $step"; exit 2 ;;
esac
