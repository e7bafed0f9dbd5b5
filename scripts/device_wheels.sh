#!/usr/bin/env bash
# Wheels for a GPU-machine call that runs the whole pipeline (streaming + refiner):
# ../shared/tools/gpu-wheels.sh's "stream" and "models" sets, with the two MediaPipe
# models this project never loads (face_landmark without attention, iris_landmark:
# refine_landmarks uses face_landmark_with_attention) and diffusers' pipelines dropped so
# that both sets and the repository fit in one 64 MiB carry.
#   bash scripts/device_wheels.sh [DIR]   (default .whl_all, git-ignored)
set -euo pipefail
dir=${1:-.whl_all}
tools=${TOOLS:-../shared/tools}
rm -rf "$dir"; mkdir -p "$dir"
bash "$tools/gpu-wheels.sh" stream "$dir" >/dev/null
bash "$tools/gpu-wheels.sh" models "$dir" >/dev/null
python3 - "$dir" <<'PY'
import os, sys, zipfile


def trim(prefix: str, drop) -> None:
    """Rewrite the wheel whose name starts with prefix without the members drop(name) selects."""
    name = next(f for f in os.listdir(d) if f.startswith(prefix))
    src = os.path.join(d, name)
    tmp = src + ".tmp"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if drop(info.filename):
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"\n".join(l for l in data.split(b"\n") if not drop(l.decode().split(",")[0]))
            zout.writestr(info, data)
    os.replace(tmp, src)


d = sys.argv[1]
unused_models = ("mediapipe/modules/face_landmark/face_landmark.tflite", "mediapipe/modules/iris_landmark/iris_landmark.tflite")
trim("mediapipe", lambda f: f in unused_models)
# diffusers' pipelines (4 of its 6 MB) are never imported here: only models, schedulers and
# attention processors are. Their package __init__ files stay, for diffusers' lazy imports.
pipelines = ("diffusers/pipelines/", "diffusers/modular_pipelines/")
trim("diffusers", lambda f: f.startswith(pipelines) and not f.endswith("/__init__.py"))
# The large wheels again with LZMA instead of deflate (pip reads any method Python's zipfile reads): about a
# quarter smaller (av 34 -> 25 MB), so that the set and a grown repository still fit in one carry.
for name in sorted(os.listdir(d)):
    path = os.path.join(d, name)
    if os.path.getsize(path) < 1 << 20:
        continue
    tmp = path + ".tmp"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_LZMA) as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_LZMA)
    os.replace(tmp, path)
PY
du -sh "$dir"
# A device call carries the working tree and these wheels, 64 MiB at most (the helper of an earlier session met
# "the working tree is larger than 64 MiB" when results grew): say how close it is.
tree_kib=$(git ls-files -z | xargs -0 du -ck | tail -1 | cut -f1)
wheels_kib=$(du -sk "$dir" | cut -f1)
total_kib=$((tree_kib + wheels_kib))
echo "a device call carries the tree (${tree_kib} KiB) and these wheels (${wheels_kib} KiB): ${total_kib} KiB of 65536"
if [ "$total_kib" -gt 65536 ]; then
  echo "warning: over the device tool's 64 MiB: make the tree smaller (results as series, plots in 256 colours)" >&2
fi
