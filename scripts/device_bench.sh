#!/usr/bin/env bash
# One GPU-machine call for the GPU tests and the performance tables. Results (JSON, logs) in $OUT.
#   carry: .whl_all (scripts/device_wheels.sh)
#   env:   STAGES (default "tests avatar loopback bench call refiner"; also: refiner-sdturbo, refiner-views,
#          loopback-sdturbo, loopback-memory, encode, curve (CURVE_VIEWERS, CURVE_TIMEOUT, COMPILE_REFINER: send --compile-refiner, CURVE_REFINER: a path or none, default the small stand-in; CURVE_STACKS: threads to sample, e.g. "pipeline analysis"; CURVE_SWITCH_MS: the interpreter's switch interval in ms), call-turns, call-2gpu (on nvidia-h200-x2), soak, soak-process, loopback-process, cache-start (CACHE_MODES), precompiled (PRECOMPILED_STEPS), first-frame, first-frame-prefill, first-frame-precompiled (FIRST_FRAME_SECONDS, default 420), precompiled-starts), SOAK_MINUTES (default 7.3), SOURCE_FPS (the loopback's pacing, default 30: a webcam's rate),
#          ENCODER (curve: process, the default, or aiortc)
# Every stage has its own time limit, so a slow one cannot take the others' results with it.
# The loopback stages keep their whole log beside their JSON (a warning above the table's tail is the reason).
# The sender's benchmarks compile the avatar's graphs before they time it (--compile-avatar wait): about 2-3
# minutes cold on a fresh machine (inductor's disk cache does not outlive a loan), so their limits allow for it
# and a call of the device tool (600 s at most) holds one such stage, two at most. The GPU tests take about
# 190 s plus 4-5 minutes of cold compiles (the compiled avatar and pipeline tests): TESTS_TIMEOUT (560) is near
# a call's limit; PYTEST_K="not compiled and not compile_avatar_wait" and then the rest split them in two calls.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=/tmp/site
STAGES=${STAGES:-"tests avatar loopback bench call refiner"}
SOURCE_FPS=${SOURCE_FPS:-30}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl_all/*.whl 2>&1 | grep -v "Running pip"
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# The refiner's timing does not depend on its weights: a random model of the small architecture
# stands in (no trained weights ship; see the README's Results).
python3 -c "from models.refiner import Refiner; Refiner.small(seen_mask=True, edit_unseen_only=True).save_pretrained('/tmp/refiner-small-arch')"
filter() { grep -v -E "^[WI]0000|absl|INFO: Created|UserWarning|image_t =" ; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if has tests; then
  echo "== GPU tests (every test marked gpu)"
  timeout ${TESTS_TIMEOUT:-560} python3 -m pytest -q -p no:cacheprovider -m gpu ${PYTEST_K:+-k "$PYTEST_K"} --durations=8 tests/models tests/telepresence 2>&1 | tail -16
fi
if has avatar; then
  echo "== avatar"
  timeout 480 python3 benchmarks/avatar.py --device cuda --sizes 256 512 --views 1 4 --check --breakdown \
    --out "$OUT/avatar_cuda.json" 2>&1 | grep -v Warning
fi
if has loopback; then
  echo "== loopback"
  timeout 420 python3 benchmarks/loopback.py --device cuda --size 512 --viewers 1 4 --seconds 8 --source-fps "$SOURCE_FPS" \
    --refiner /tmp/refiner-small-arch --out "$OUT/loopback_cuda_512.json" 2>&1 | tee "$OUT/loopback_cuda_512.log" | filter | tail -8
fi
if has loopback-process; then
  # The same sender with its pipeline in a process of its own (send --pipeline-process), against "loopback".
  echo "== loopback, the pipeline in its own process"
  timeout 420 python3 benchmarks/loopback.py --device cuda --size 512 --viewers 1 4 --seconds 8 --source-fps "$SOURCE_FPS" \
    --refiner /tmp/refiner-small-arch --pipeline-process --out "$OUT/loopback_cuda_512_process.json" 2>&1 | tee "$OUT/loopback_cuda_512_process.log" | filter | tail -8
fi
if has loopback-memory; then
  # The sender with the appearance memory (on by default since the tenth session, which this run measured first).
  echo "== loopback with the appearance memory"
  timeout 420 python3 benchmarks/loopback.py --device cuda --size 512 --viewers 1 4 --seconds 8 --source-fps "$SOURCE_FPS" \
    --refiner /tmp/refiner-small-arch --memory --out "$OUT/loopback_cuda_512_memory.json" 2>&1 | tee "$OUT/loopback_cuda_512_memory.log" | filter | tail -8
fi
if has soak; then
  # The product's sender (the memory on, the avatar compiled in the background as `send` does) under 4 viewers and
  # churn; on a fresh machine the cold compile falls inside it. Logs beside the JSON.
  echo "== soak: ${SOAK_MINUTES:=7.3} min, 4 viewers + churn at 512, the real pipeline"
  timeout $(python3 -c "print(int(${SOAK_MINUTES} * 60 + 75))") python3 benchmarks/soak.py --minutes "$SOAK_MINUTES" --sample-s 15 \
    --device cuda --size 512 --viewers 4 --churn --pipeline none --refiner /tmp/refiner-small-arch \
    --out "$OUT/soak_cuda_512_real.json" 2>&1 | grep -v "^\[" | tail -12
fi
if has soak-process; then
  # The same with the sender's pipeline in a process of its own (send --pipeline-process), as serve runs each
  # participant's: the compile from the disk cache then holds that process's lock, not the event loop's.
  echo "== soak, the pipeline in its own process: ${SOAK_MINUTES:=7.3} min, 4 viewers + churn at 512"
  timeout $(python3 -c "print(int(${SOAK_MINUTES} * 60 + 75))") python3 benchmarks/soak.py --minutes "$SOAK_MINUTES" --sample-s 15 \
    --device cuda --size 512 --viewers 4 --churn --pipeline none --refiner /tmp/refiner-small-arch --pipeline-process \
    --out "$OUT/soak_cuda_512_process.json" 2>&1 | grep -v "^\[" | tail -12
fi
if has cache-start; then
  # The start of a sender whose inductor cache is warm (every start after the first on a machine): the avatar
  # compiles from the disk cache on the sender's worker (--compile-avatar background) while 4 viewers watch; the
  # first case holds that compile, the second is the steady state after it. CACHE_MODES picks the runs:
  # Modes other than the precompiled ones trace the compile from inductor's cache (--no-precompiled-avatar: the
  # product's path before the fifteenth session made --precompiled-avatar the default):
  #   warm      fill the cache (a cold compile, --compile-avatar wait; its case is the in-process steady state)
  #   old       in process, the compile's switch interval 0.5 ms (the code before the thirteenth session)
  #   new       in process, 0.05 ms (models.avatar.compiling.SWITCH_INTERVAL_S)
  #   process   the pipeline in a process of its own (send --pipeline-process)
  #   precompiled-warm  fill the store of whole compiled functions (--precompiled-avatar, a cold compile, wait);
  #                     the memory's update, compiled in the background, is saved by the first precompiled run
  #   precompiled       in process, --precompiled-avatar: the compiled functions loaded, not traced again
  # The cache lives in .cache/ in the working tree, so a second call on the same warm machine finds it.
  export TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor" TRITON_CACHE_DIR="$PWD/.cache/triton"
  lb() { timeout "$1" python3 benchmarks/loopback.py --device cuda --size 512 --source-fps "$SOURCE_FPS" \
           --refiner /tmp/refiner-small-arch "${@:2}" 2>&1 | filter | tail -5; }
  for mode in ${CACHE_MODES:-warm old new process}; do
    echo "== cache start: $mode ($(du -sh .cache 2>/dev/null | cut -f1) cached)"
    case $mode in
      warm) lb 420 --viewers 4 --seconds 8 --compile-avatar wait --no-precompiled-avatar --out "$OUT/loopback_cuda_512_warm.json" ;;
      old) timeout 200 python3 -c "
import runpy, sys
import models.avatar.compiling as compiling
compiling.SWITCH_INTERVAL_S = 0.0005  # the interval before the thirteenth session
sys.argv = ['benchmarks/loopback.py', '--device', 'cuda', '--size', '512', '--source-fps', '$SOURCE_FPS',
            '--refiner', '/tmp/refiner-small-arch', '--viewers', '4', '4', '--warmup', '2', '--seconds', '25',
            '--compile-avatar', 'background', '--no-precompiled-avatar', '--out', '$OUT/loopback_cuda_512_cachestart_old.json']
runpy.run_path('benchmarks/loopback.py', run_name='__main__')" 2>&1 | filter | tail -5 ;;
      new) lb 200 --viewers 4 4 --warmup 2 --seconds 25 --compile-avatar background --no-precompiled-avatar \
             --out "$OUT/loopback_cuda_512_cachestart_inprocess.json" ;;
      precompiled-warm) lb 480 --viewers 4 --seconds 8 --compile-avatar wait --precompiled-avatar \
                          --out "$OUT/loopback_cuda_512_precompiled_warm.json" ;;
      precompiled) lb 200 --viewers 4 4 4 --warmup 2 --seconds 15 --compile-avatar background --precompiled-avatar \
                     --out "$OUT/loopback_cuda_512_cachestart_precompiled.json" ;;
      process) lb 200 --viewers 4 4 --warmup 2 --seconds 25 --compile-avatar background --no-precompiled-avatar --pipeline-process \
                 --out "$OUT/loopback_cuda_512_cachestart_process.json" ;;
    esac
  done
fi
if has precompiled; then
  # The avatar's compile at a start with warm caches: traced again from inductor's cache, or loaded whole from the
  # store of --precompiled-avatar. PRECOMPILED_STEPS splits it over two calls on one warm machine. The caches are in
  # .cache/, shared with cache-start: its precompiled-warm then finds inductor warm and mostly fills the store.
  echo "== precompiled: the avatar's compile at a warm start, 4 views at 512 (${PRECOMPILED_STEPS:=fill-inductor fill-store inductor store})"
  timeout 590 python3 benchmarks/precompiled.py --device cuda --size 512 --views 4 --steps $PRECOMPILED_STEPS \
    --cache-dir "$PWD/.cache" --out "$OUT/precompiled_cuda_512.json" 2>&1 | tail -6
fi
if has first-frame; then
  # The sender's start on a cold inductor cache: run it on a fresh machine, first among the stages that compile.
  echo "== first frame: 4 views at 512, the background compile held until the first frame is out vs not (before)"
  timeout 400 python3 benchmarks/first_frame.py --device cuda --size 512 --views 4 --seconds 30 --modes held unheld \
    --compile-avatar background --refiner /tmp/refiner-small-arch --out "$OUT/first_frame_cuda_512.json" 2>&1 | tail -4
fi
if has first-frame-prefill; then
  # --compile-avatar prefill (the default since the eleventh session) on a cold cache, for 7 minutes: the whole curve
  # up to the compiled graphs in use.
  echo "== first frame with the compile prefilled in a child process: 4 views at 512, 420 s"
  timeout 590 python3 benchmarks/first_frame.py --device cuda --size 512 --views 4 --seconds 420 --modes held \
    --compile-avatar prefill --refiner /tmp/refiner-small-arch --out "$OUT/first_frame_cuda_512_prefill.json" 2>&1 | tail -4
fi
if has first-frame-precompiled; then
  # The same with --precompiled-avatar, on a fresh machine: the child compiles whole and saves, the sender loads.
  # Its caches in .cache/ as cache-start's: a next call on the warm machine, STAGES=cache-start
  # CACHE_MODES=precompiled, measures the start after it.
  echo "== first frame with the compile prefilled, --precompiled-avatar: 4 views at 512, ${FIRST_FRAME_SECONDS:=420} s"
  TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor" TRITON_CACHE_DIR="$PWD/.cache/triton" timeout 590 python3 benchmarks/first_frame.py --device cuda --size 512 --views 4 --seconds "$FIRST_FRAME_SECONDS" --modes held \
    --compile-avatar prefill --precompiled-avatar --refiner /tmp/refiner-small-arch \
    --out "$OUT/first_frame_cuda_512_prefill_precompiled.json" 2>&1 | tail -6
fi
if has precompiled-starts; then
  # A fresh machine's first two starts in one call (a later call may find the machine given back, its caches gone):
  # the first, as first-frame-precompiled (the product's prefill: the child compiles whole and saves, the sender
  # loads), FIRST_FRAME_SECONDS (default 300) long; then another program's start on those caches, the loopback with
  # 4 viewers in three 15 s cases, also with the product's prefill (its child loads what the first start saved, then
  # the sender), whose viewers' poses differ from the first start's (so its raster capacities are sized differently:
  # the store now hands it those compiled before where they hold its frames). Each JSON keeps what the store did
  # (log_precompiled; per case, "precompiled": the sender's own loads). About 8 minutes.
  export TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor" TRITON_CACHE_DIR="$PWD/.cache/triton"
  echo "== precompiled starts: the first, ${FIRST_FRAME_SECONDS:=300} s"
  timeout $((FIRST_FRAME_SECONDS + 150)) python3 benchmarks/first_frame.py --device cuda --size 512 --views 4 \
    --seconds "$FIRST_FRAME_SECONDS" --modes held --compile-avatar prefill --precompiled-avatar \
    --refiner /tmp/refiner-small-arch --out "$OUT/first_frame_cuda_512_precompiled_first_start.json" 2>&1 | tail -3
  python3 -c "import json, sys; [print('  ', l[:200]) for l in json.load(open(sys.argv[1]))['results'][0]['log_precompiled']]" \
    "$OUT/first_frame_cuda_512_precompiled_first_start.json"
  echo "== precompiled starts: the next ($(du -sh .cache 2>/dev/null | cut -f1) cached)"
  timeout 150 python3 benchmarks/loopback.py --device cuda --size 512 --source-fps "$SOURCE_FPS" \
    --refiner /tmp/refiner-small-arch --viewers 4 4 4 --warmup 2 --seconds 15 --compile-avatar prefill \
    --precompiled-avatar --out "$OUT/loopback_cuda_512_precompiled_next_start.json" 2>&1 | filter \
    | grep -E "aiortc|precompiled:|wrote|raster capacity"
fi
if has encode; then
  echo "== encode: VP8 512, 1-16 streams, aiortc's threads vs the encoder process, beside a busy thread or process"
  timeout 300 python3 benchmarks/encode.py --size 512 --out "$OUT/encode_512.json" 2>&1 | tail -34
fi
if has curve; then
  # Each case waits (--settle-s, 300 s at most) while its view count's graph compiles (8, 16 and 32 views: a compile
  # each, models.avatar.engine.graph_views): the whole curve does not fit one call cold; CURVE_VIEWERS splits it.
  # The JSON is written after each case and the log kept beside it: a call's time limit (600 s, the setup above
  # included, hence CURVE_TIMEOUT 540) keeps the cases done. The twenty-third session's first curve call lost all.
  echo "== viewers curve: ${CURVE_VIEWERS:=1 4 8 16 32} viewers at 512, encoder ${ENCODER:-process}"
  timeout ${CURVE_TIMEOUT:-540} python3 benchmarks/loopback.py --device cuda --size 512 --viewers $CURVE_VIEWERS --source-fps "$SOURCE_FPS" \
    --encoder "${ENCODER:-process}" --refiner "${CURVE_REFINER:-/tmp/refiner-small-arch}" ${COMPILE_REFINER:+--compile-refiner} ${CURVE_STACKS:+--stacks $CURVE_STACKS} ${CURVE_SWITCH_MS:+--switch-interval-ms $CURVE_SWITCH_MS} \
    --out "$OUT/loopback_cuda_512_curve_${ENCODER:-process}${CURVE_TAG:-}.json" 2>&1 | tee "$OUT/loopback_cuda_512_curve${CURVE_TAG:-}.log" | filter | tail -20
fi
if has loopback-sdturbo; then
  # VIEWS (view_attention, default ref_pairs) and COMPILE (default 1: send --compile-refiner) pick the variant.
  echo "== loopback with the SD-Turbo-size refiner (random weights, tiny AE, 1-token prompt, ${VIEWS:=ref_pairs}, compiled ${COMPILE:=1})"
  python3 -c "
import torch
from models.refiner import Refiner
with torch.device('cuda'):
    m = Refiner.sd_turbo_random(codec='tiny', view_attention='$VIEWS', prompt_tokens=1)
m.half().save_pretrained('/tmp/refiner-sdturbo-arch')"
  timeout 560 python3 benchmarks/loopback.py --device cuda --size 512 --viewers 1 4 --seconds 8 --source-fps "$SOURCE_FPS" \
    --refiner /tmp/refiner-sdturbo-arch $([ "$COMPILE" = 1 ] && echo --compile-refiner) \
    --out "$OUT/loopback_cuda_512_sdturbo_${VIEWS}$([ "$COMPILE" = 1 ] && echo _compiled).json" 2>&1 | filter | tail -8
fi
if has bench; then
  echo "== per-stage bench"
  timeout 420 python3 -m benchmarks.pipeline --device cuda --size 512 --viewers 1 4 --refiner /tmp/refiner-small-arch \
    --out "$OUT/bench_cuda_512.json" -q 2>&1 | filter | tail -12
fi
if has call; then
  echo "== call: pipelines in processes of their own on CUDA (forked workers, graphs captured at once)"
  timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/telepresence/stream/test_worker.py 2>&1 | tail -4
  echo "== call: 4 participants at 512, each watching the 3 others, cameras paced at 30 fps (a pipeline process each, MPS as serve)"
  timeout 480 python3 benchmarks/call.py --device cuda --size 512 --participants 4 --seconds 10 --warmup 5 \
    --source-fps 30 --refiner /tmp/refiner-small-arch --out "$OUT/call_cuda_512_4p.json" 2>&1 | tee "$OUT/call.log" | filter | tail -15
fi
if has call-turns; then
  # The same call with --no-mps: the participants' processes take turns on the GPU (no MPS daemon).
  echo "== call by turns (--no-mps): 4 participants at 512, each watching the 3 others, cameras paced at 30 fps"
  timeout 480 python3 benchmarks/call.py --device cuda --size 512 --participants 4 --seconds 10 --warmup 5 --no-mps \
    --source-fps 30 --refiner /tmp/refiner-small-arch --out "$OUT/call_cuda_512_4p_turns.json" 2>&1 | tee "$OUT/call_turns.log" | filter | tail -15
fi
if has call-2gpu; then
  # On nvidia-h200-x2: 8 participants, their pipelines spread over the two GPUs (serve's default on such a host).
  echo "== call on two GPUs: 8 participants at 512, each watching the 7 others, cameras paced at 30 fps"
  nvidia-smi -L
  timeout 540 python3 benchmarks/call.py --device cuda --size 512 --participants 8 --seconds 10 --warmup 5 --gpus 2 \
    --source-fps 30 --refiner /tmp/refiner-small-arch --out "$OUT/call_cuda_512_8p_2gpus.json" 2>&1 | tee "$OUT/call_2gpu.log" | filter | tail -20
fi
if has refiner; then
  echo "== refiner (small)"
  timeout 120 python3 -m benchmarks.refiner --device cuda --configs small --modes eager,compiled-graphs --size 256 512 --views 2 5 \
    --out "$OUT/refiner_small_cuda.json" 2>&1 | tail -12
fi
if has refiner-sdturbo; then
  echo "== refiner (SD-Turbo size)"
  timeout 420 python3 -m benchmarks.refiner --device cuda --configs sdturbo --codecs tiny --variants live,fast --modes compiled-graphs --views 2 5 \
    --out "$OUT/refiner_sdturbo_tiny_cuda.json" 2>&1 | tail -8
fi
if has refiner-views; then
  echo "== refiner (SD-Turbo size, live): novel views attending to every view (live) or to the reference and themselves (live-pairs)"
  timeout 120 python3 -m benchmarks.refiner --device cuda --configs sdturbo --codecs tiny --variants live,live-pairs --modes graphs \
    --views 2 5 --out "$OUT/refiner_sdturbo_views_graphs.json" 2>&1 | grep -E "^sdturbo|rror"
  timeout 60 python3 -m benchmarks.refiner --device cuda --configs sdturbo --codecs tiny --variants live-pairs --modes graphs \
    --views 5 --sdpa cudnn --out "$OUT/refiner_sdturbo_views_graphs_cudnn.json" 2>&1 | grep -E "^sdturbo|rror"
  timeout 240 python3 -m benchmarks.refiner --device cuda --configs sdturbo --codecs tiny --variants live-pairs --modes compiled-graphs \
    --views 5 2 --out "$OUT/refiner_sdturbo_live_pairs_compiled.json" 2>&1 | grep -E "^sdturbo|rror"
fi
ls "$OUT"
