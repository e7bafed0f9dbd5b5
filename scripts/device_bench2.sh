#!/usr/bin/env bash
# Follow-up GPU call: the two refiner GPU tests that failed, with details, and the
# loopback + bench again with face analysis overlapped and the refiner in CUDA graphs.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_all/*.whl 2>&1 | grep -v "Running pip"
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
python3 -c "from models.refiner import Refiner; Refiner.small(seen_mask=True, edit_unseen_only=True).save_pretrained('/tmp/refiner-small-arch')"
echo "== loopback"
timeout 150 python3 benchmarks/loopback.py --device cuda --size 512 --viewers 1 4 --seconds 8 \
  --refiner /tmp/refiner-small-arch --out "$OUT/loopback_cuda_512.json" 2>&1 | grep -v -E "^[WI]0000|absl|INFO: Created|UserWarning|image_t =" | tail -8
timeout 100 python3 benchmarks/loopback.py --device cuda --size 512 --viewers 4 --seconds 8 \
  --refiner none --out "$OUT/loopback_cuda_512_raw.json" 2>&1 | grep -v -E "^[WI]0000|absl|INFO: Created|UserWarning|image_t =" | tail -4
echo "== bench"
timeout 100 python3 -m telepresence.cli bench --device cuda --size 512 --viewers 1 4 --refiner /tmp/refiner-small-arch \
  --out "$OUT/bench_cuda_512.json" -q 2>&1 | grep -v -E "^[WI]0000|absl|INFO: Created" | tail -6
echo "== failing GPU tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/models/test_refiner_gpu.py -k "follow_a_new_cached_reference or reduce_overhead_equals_eager" 2>&1 | grep -E "^E |Error|assert|passed|failed" | head -30
ls "$OUT"
