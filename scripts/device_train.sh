#!/usr/bin/env bash
# One call on the GPU machine: make training pairs, train the
# shipped small refiner (seen mask on) and, side by side on the same GPU, the same
# recipe without the seen mask (the ablation), then bring the results back in $OUT.
#
#   carry: .whl (diffusers wheel set: ../shared/tools/gpu-wheels.sh models .whl)
#          .carry (index/*.npz from models.clips, videos/*.mp4)
#   env:   BUDGET_S (seconds for the whole script, default 560), STAGE1, STAGE2 (pair counts)
set -euo pipefail
start=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
OUT=${OUT:-/tmp/out}
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH="$SITE:$PWD" PYTHONUNBUFFERED=1 TELEPRESENCE_CACHE_DIR=/tmp/cache
WORK=${WORK:-/tmp/train_work}
mkdir -p "$WORK" "$OUT"
nproc; nvidia-smi --query-gpu=name --format=csv,noheader || true

if [ ! -f "$WORK/pairs/val/val.safetensors" ]; then
  python3 -m telepresence.cli pairs --index .carry/index --videos .carry/videos \
    --stage1 "${STAGE1:-1000}" --stage2 "${STAGE2:-2400}" --val "${VAL:-96}" --workers "${PAIR_WORKERS:-15}" --out "$WORK/pairs" 2>&1 | grep -v "pair/s"
fi
echo "pairs ready after $(( $(date +%s) - start )) s"

common=(--family small --data "$WORK/pairs/stage1" --stage2-data "$WORK/pairs/stage2" --val "$WORK/pairs/val"
        --resolution 256 --batch "${BATCH:-16}" --lr "${LR:-1e-4}" --warmup 200 --schedule cosine --noise 0 0.1
        --gan "${GAN:-0.005}" --ssim 0.5 --device "${DEVICE:-cuda}" --workers 3 --no-progress --no-identity --seed 0)

# Two runs share the GPU: the shipped recipe (seen mask on, refiner repaints only unseen
# texture) and its ablation (seen mask on, free to repaint everything).
# Step counts come from earlier runs on an H100 (~0.16 s a step for each of two runs,
# GAN on); --time-budget stops either run early, and it still validates and exports.
left=$(( BUDGET_S - ($(date +%s) - start) - 60 ))
s1=${S1:-400}; s2=${S2:-2000}; steps=$(( s1 + s2 ))
echo "training: stage 1 ${s1} + stage 2 ${s2} steps, at most ${left} s"
run() {  # name, extra args
  local name=$1; shift
  python3 -m telepresence.cli train "${common[@]}" --out "$WORK/$name" --steps "$s1" --stage2-steps "$s2" \
    --gan-start $(( steps * 6 / 10 )) --val-every $(( steps / 4 )) --ckpt-every 100000 --image-every $(( steps / 2 )) \
    --log-every 20 --time-budget "$left" "$@" > "$WORK/$name.log" 2>&1
}
run gated --seen-mask --edit-unseen-only &
run seen --seen-mask &
wait
echo "training done after $(( $(date +%s) - start )) s"

# Bring back: the shipped candidate in fp16 (split below the 16 MiB per-file limit), logs.
python3 - "$WORK" "$OUT" <<'PY'
import json, sys, tarfile
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
summary = {}
for name in ("gated", "seen"):
    log = [json.loads(l) for l in open(work / name / "log.jsonl")]
    vals = [r for r in log if any(k.startswith("val/") for k in r)]
    summary[name] = {"last": log[-1], "val": vals}
    (out / f"{name}_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
(out / "summary.json").write_text(json.dumps(summary, indent=1))
# Ship the variant with the better final validation PSNR (both summaries come back).
best = max(summary, key=lambda n: summary[n]["val"][-1]["val/psnr"] if summary[n]["val"] else -1)
(out / "chosen.txt").write_text(best + "\n")
import torch
from models.refiner import Refiner
ref = Refiner.from_pretrained(work / best / "refiner", dtype=torch.float16)
ref.save_pretrained(work / "chosen_fp16")
src = work / best / "refiner" / "training.json"
if src.exists():
    (work / "chosen_fp16" / "training.json").write_text(src.read_text())
with tarfile.open(work / "refiners.tar", "w") as tar:
    tar.add(work / "chosen_fp16", arcname="refiner-small")
PY
split -b 15M -d "$WORK/refiners.tar" "$OUT/refiners.tar.part"
ls -la "$OUT"
echo "all done after $(( $(date +%s) - start )) s"
