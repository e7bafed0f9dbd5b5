#!/usr/bin/env bash
# GPU call (issue 16's floor): benchmarks/call.py with 4 participants at 512 on one GPU, each
# watching the 3 others, on the product's pipeline (--device cuda; each camera paced at 30 fps
# like a webcam). Floor: at least 30 fps each, p50 glass to glass at most 150 ms. Under 240 s
# (install ~30 s, refiner ~15 s, the call at most 170 s).
#   carry: .whl_all (scripts/device_wheels.sh)        JSON: $OUT/call_cuda_512_4p.json, log: $OUT/call.log
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl_all/*.whl 2>&1 | grep -v "Running pip"
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
# The refiner's timing does not depend on its weights: a random model of the small architecture.
python3 -c "from models.refiner import Refiner; Refiner.small(seen_mask=True, edit_unseen_only=True).save_pretrained('/tmp/refiner-small-arch')"
filter() { grep -v -E "^[WI]0000|absl|INFO: Created|UserWarning|image_t =" ; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
echo "== call"
timeout 170 python3 benchmarks/call.py --device cuda --size 512 --participants 4 --seconds 10 --warmup 5 \
  --source-fps 30 --refiner /tmp/refiner-small-arch --out "$OUT/call_cuda_512_4p.json" 2>&1 | tee "$OUT/call.log" | filter | tail -15
echo "rc=${PIPESTATUS[0]}"
ls "$OUT"
