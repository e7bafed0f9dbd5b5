"""Rebuild tests/data from the development data (../shared/data or $TELEPRESENCE_SHARED_DATA)."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import cv2

HERE = Path(__file__).resolve().parent
MAX_SIDE = 768
STILLS = ["lp_s1", "lp_s2", "lp_s9", "lp_s10", "lp_s12", "lp_s33", "lp_s42"]


def main() -> int:
    shared = Path(os.environ.get("TELEPRESENCE_SHARED_DATA", HERE.parents[2] / "shared" / "data"))
    if not (shared / "images").is_dir():
        print(f"development data not found at {shared} (set TELEPRESENCE_SHARED_DATA)", file=sys.stderr)
        return 2
    for name in STILLS:
        src = shared / "images" / f"{name}.jpg"
        image = cv2.imread(str(src))
        h, w = image.shape[:2]
        if max(h, w) <= MAX_SIDE:
            shutil.copyfile(src, HERE / src.name)
            continue
        s = MAX_SIDE / max(h, w)
        image = cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(HERE / src.name), image, [cv2.IMWRITE_JPEG_QUALITY, 92])
    cap = cv2.VideoCapture(str(shared / "videos" / "lp_d12.mp4"))
    for i in range(120):
        ok, frame = cap.read()
        if not ok:
            break
        if i % 15 == 0:
            cv2.imwrite(str(HERE / f"lp_d12_f{i:03d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 92])
    return 0


if __name__ == "__main__":
    sys.exit(main())
