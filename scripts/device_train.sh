#!/usr/bin/env bash
# One call on the GPU machine: make training pairs, measure the step rate, train the
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
    --stage1 "${STAGE1:-2400}" --stage2 "${STAGE2:-2400}" --val "${VAL:-96}" --workers "${PAIR_WORKERS:-15}" --out "$WORK/pairs" 2>&1 | grep -v "pair/s"
fi
echo "pairs ready after $(( $(date +%s) - start )) s"

common=(--family small --data "$WORK/pairs/stage1" --stage2-data "$WORK/pairs/stage2" --val "$WORK/pairs/val"
        --resolution 256 --batch "${BATCH:-16}" --lr 2e-4 --warmup 300 --schedule cosine --noise 0 0.3
        --gan 0.05 --ssim 0.5 --device "${DEVICE:-cuda}" --workers 3 --no-progress --no-identity --seed 0)

# Probe: 40 steps to learn the step rate of this machine (two runs share the GPU, so
# measure with two at once).
for v in a b; do
  python3 -m telepresence.cli train "${common[@]}" --out "$WORK/probe_$v" --steps "${PROBE_STEPS:-40}" --stage2-steps 0 \
    --log-every 1 --val-every 1000 --ckpt-every 1000 --image-every 1000 > "$WORK/probe_$v.log" 2>&1 &
done
wait
step_s=$(python3 - "$WORK/probe_a/log.jsonl" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
steps = [r["step_s"] for r in rows if "step_s" in r]
print(f"{statistics.median(steps[len(steps) // 4:]):.4f}")
PY
)
left=$(( BUDGET_S - ($(date +%s) - start) - 45 ))
steps=$(python3 -c "print(max(${MIN_STEPS:-200}, int($left / ($step_s * 1.12))))")
s1=$(( steps * 6 / 10 )); s2=$(( steps - s1 ))
echo "step ${step_s} s with two runs sharing the GPU; ${left} s left -> stage 1 ${s1} + stage 2 ${s2} steps"

run() {  # name, extra args
  local name=$1; shift
  python3 -m telepresence.cli train "${common[@]}" --out "$WORK/$name" --steps "$s1" --stage2-steps "$s2" \
    --gan-start $(( s1 / 2 )) --val-every $(( steps / 4 )) --ckpt-every 100000 --image-every $(( steps / 2 )) \
    --log-every 20 "$@" > "$WORK/$name.log" 2>&1
}
run seen --seen-mask &
run noseen &
wait
echo "training done after $(( $(date +%s) - start )) s"

# Bring back: the shipped candidate in fp16 (split below the 16 MiB per-file limit), logs.
python3 - "$WORK" "$OUT" <<'PY'
import json, sys, tarfile
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
summary = {}
for name in ("seen", "noseen"):
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
