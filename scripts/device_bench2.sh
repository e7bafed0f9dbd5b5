#!/usr/bin/env bash
# GPU call: GPU tests, the avatar table (eager and CUDA graphs, with the graphs path's breakdown and
# the top kernels of its maths), and the loopback with its viewers in their own process (1 and 4),
# the source paced at 30 fps like a webcam (the embedded sample clip is 25 fps).
#   carry: .whl_all (scripts/device_wheels.sh)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SITE=/tmp/site
SOURCE_FPS=${SOURCE_FPS:-30}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl_all/*.whl 2>&1 | grep -v "Running pip"
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1
# The refiner's timing does not depend on its weights: a random model of the small architecture.
python3 -c "from models.refiner import Refiner; Refiner.small(seen_mask=True, edit_unseen_only=True).save_pretrained('/tmp/refiner-small-arch')"
filter() { grep -v -E "^[WI]0000|absl|INFO: Created|UserWarning|image_t =" ; }
echo "== GPU tests"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/models/test_raster.py tests/models/test_engine.py \
  tests/models/test_refiner_gpu.py tests/models/test_avatar.py tests/telepresence/test_pipeline.py 2>&1 | tail -4
echo "== avatar"
timeout 120 python3 benchmarks/avatar.py --device cuda --sizes 256 512 --views 1 4 --check --breakdown \
  --out "$OUT/avatar_cuda.json" 2>&1 | grep -v Warning
timeout 60 python3 benchmarks/avatar.py --device cuda --sizes 512 --views 4 --repeats 3 --profile > "$OUT/avatar_profile.txt" 2>&1
echo "== loopback"
timeout 150 python3 benchmarks/loopback.py --device cuda --size 512 --viewers 1 4 --seconds 8 --source-fps "$SOURCE_FPS" \
  --refiner /tmp/refiner-small-arch --out "$OUT/loopback_cuda_512.json" 2>&1 | filter | tail -5
ls "$OUT"
