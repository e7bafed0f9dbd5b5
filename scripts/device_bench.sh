#!/usr/bin/env bash
# One GPU-machine call for the performance tables: GPU tests, avatar, loopback (real
# pipeline, 512, 1 and 4 viewers), per-stage bench, refiner. Results in $OUT.
#   carry: .whl_all (scripts/device_wheels.sh)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl_all/*.whl 2>&1 | grep -v "Running pip"
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
# The refiner's timing does not depend on its weights: a random model of the shipped
# architecture stands in (the trained weights and both wheel sets do not fit one carry).
python3 - <<'PY'
from models.refiner import Refiner
Refiner.small(seen_mask=True, edit_unseen_only=True).save_pretrained("/tmp/refiner-small-arch")
PY
echo "== GPU tests"
python3 -m pytest -q -p no:cacheprovider tests/models/test_raster.py tests/models/test_refiner_gpu.py 2>&1 | tail -3
echo "== avatar"
python3 benchmarks/avatar.py --device cuda --sizes 256 512 --views 1 4 --check --out "$OUT/avatar_cuda.json" 2>&1 | grep -v Warning
echo "== loopback"
timeout 200 python3 benchmarks/loopback.py --device cuda --size 512 --viewers 1 4 --seconds 8 \
  --refiner /tmp/refiner-small-arch --out "$OUT/loopback_cuda_512.json" 2>&1 | grep -v -E "^W0000|absl|INFO: Created" | tail -25
echo "== bench"
timeout 150 python3 -m benchmarks.pipeline --device cuda --size 512 --viewers 1 4 --refiner /tmp/refiner-small-arch \
  --out "$OUT/bench_cuda_512.json" -q 2>&1 | grep -v -E "^W0000|absl|INFO: Created" | tail -20
echo "== refiner"
timeout 120 python3 -m benchmarks.refiner --device cuda --configs small --modes eager,compiled-graphs --size 256 512 --views 2 5 \
  --out "$OUT/refiner_small.json" 2>&1 | tail -12
timeout 60 python3 -m benchmarks.refiner --device cuda --configs sdturbo --codecs vae,tiny --variants stock --modes eager --views 2 5 \
  --out "$OUT/refiner_sdturbo_eager.json" 2>&1 | tail -8
timeout 240 python3 -m benchmarks.refiner --device cuda --configs sdturbo --codecs tiny --variants fast --modes compiled-graphs --views 2 5 \
  --out "$OUT/refiner_sdturbo_tiny_fast.json" 2>&1 | tail -8
ls -la "$OUT"
