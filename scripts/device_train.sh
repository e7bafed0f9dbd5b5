#!/usr/bin/env bash
# One call on the GPU machine: make training pairs from many identities, train two
# variants of the small refiner side by side on the one GPU, keep each run's best
# validation checkpoint, and bring both back (fp16) in $OUT.
#
#   carry: .whl         diffusers wheel set (../shared/tools/gpu-wheels.sh models .whl)
#          .carry/train index/<clip>.npz (models.evaluation.clips) and videos/<clip>.mp4 of the
#                       training clips and of the selection clips (VAL_CLIPS below);
#                       the four evaluation clips (models.training.pairs.VALIDATION_CLIPS)
#                       are NOT carried: they stay untouched for `telepresence eval`.
#   env:   BUDGET_S (seconds for the whole script, default 560), STAGE1, STAGE2, VAL (pair
#          counts), S1, S2 (steps), NAME_A / NAME_B and RUN_A / RUN_B (names and extra train
#          flags of the two runs), LR, SCHEDULE, S2_LR_SCALE, VAL_EVERY
set -euo pipefail
start=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
OUT=${OUT:-/tmp/out}
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 TELEPRESENCE_CACHE_DIR=/tmp/cache
WORK=${WORK:-/tmp/train_work}
DATA=${DATA:-.carry/train}
mkdir -p "$WORK" "$OUT"
nproc; nvidia-smi --query-gpu=name --format=csv,noheader || true

# Model selection clips: whole identities kept out of training (MEAD speaker W011,
# Fei-Fei Li's three clips, two single-clip people).
VAL_CLIPS=${VAL_CLIPS:-"$(cd "$DATA/index" && ls dreamtalk_W011_*.npz styletalk_feifeili_*.npz \
  pcavs-pose_620900105.npz retalking_3.npz | sed 's/\.npz$//' | tr '\n' ' ')"}
echo "selection clips: $VAL_CLIPS"
if [ ! -f "$WORK/pairs/val/val.safetensors" ]; then
  # shellcheck disable=SC2086
  python3 -m telepresence.cli pairs --index "$DATA/index" --videos "$DATA/videos" --val-clips $VAL_CLIPS \
    --stage1 "${STAGE1:-3000}" --stage2 "${STAGE2:-3000}" --val "${VAL:-128}" --workers "${PAIR_WORKERS:-15}" \
    --out "$WORK/pairs" 2>&1 | grep -v "pair/s"
fi
echo "pairs ready after $(( $(date +%s) - start )) s"

common=(--family small --data "$WORK/pairs/stage1" --stage2-data "$WORK/pairs/stage2" --val "$WORK/pairs/val"
        --resolution 256 --batch "${BATCH:-16}" --lr "${LR:-1e-4}" --warmup 200 --schedule "${SCHEDULE:-cosine}" --noise 0 0.1
        --stage2-lr-scale "${S2_LR_SCALE:-0.3}"
        --ssim 0.3 --seen-mask --device cuda --workers 3 --no-progress --no-identity --seed 0 --keep-best)
left=$(( BUDGET_S - ($(date +%s) - start) - 50 ))
s1=${S1:-800}; s2=${S2:-1600}; steps=$(( s1 + s2 ))
echo "training: stage 1 ${s1} + stage 2 ${s2} steps, at most ${left} s"
run() {  # name, extra args
  local name=$1; shift
  python3 -m telepresence.cli train "${common[@]}" --out "$WORK/$name" --steps "$s1" --stage2-steps "$s2" \
    --val-every "${VAL_EVERY:-$(( steps / 12 ))}" --val-samples "${VAL:-128}" --ckpt-every 100000 --image-every 0 \
    --log-every 20 --time-budget "$left" "$@" > "$WORK/$name.log" 2>&1 || echo "run $name failed"
}
# shellcheck disable=SC2086
A=${NAME_A:-small}; B=${NAME_B:-compact}
run "$A" ${RUN_A:---preset small --gan 0} &
# shellcheck disable=SC2086
run "$B" ${RUN_B:---preset compact --gan 0} &
wait
echo "training done after $(( $(date +%s) - start )) s"
for f in "$WORK/$A.log" "$WORK/$B.log"; do tail -n 3 "$f"; done

# Bring back: each run's best-validation refiner in fp16 and its logs, in one tar split
# below the 16 MiB per-file limit.
python3 - "$WORK" "$A" "$B" <<'PY'
import json, sys, tarfile
from pathlib import Path
import torch
from models.refiner import Refiner
work = Path(sys.argv[1])
with tarfile.open(work / "runs.tar", "w") as tar:
    for name in sys.argv[2:]:
        run = work / name
        if not (run / "best").exists():
            continue
        Refiner.from_pretrained(run / "best", dtype=torch.float16).save_pretrained(work / f"{name}_fp16")
        (work / f"{name}_fp16" / "training.json").write_text((run / "best" / "training.json").read_text())
        tar.add(work / f"{name}_fp16", arcname=f"{name}/refiner")
        tar.add(run / "log.jsonl", arcname=f"{name}/log.jsonl")
        tar.add(work / f"{name}.log", arcname=f"{name}/train.log")
        best = json.loads((run / "best" / "training.json").read_text())["selected"]
        print(name, "best", {k: round(v, 3) if isinstance(v, float) else v for k, v in best.items()})
PY
split -b 15M -d "$WORK/runs.tar" "$OUT/runs.tar.part"
ls -la "$OUT"
echo "all done after $(( $(date +%s) - start )) s"
