"""Make a contact sheet of raw avatar views (issue 14): six people, yaw -40, -20, 0, +20, +40
by pitch -20, 0, +20 (captions "y<yaw> p<pitch>"), with the code of the checkout the script lies in
(it imports its own repository's models):

    python docs/make_artifact_sheets.py [--size 128] [--out docs/avatar_views_after.jpg]

docs/avatar_views_before.jpg is this script copied into a checkout of the code before issue 14
(main at 48b4e03) and run there with --out pointing here.

Pictures from the repository only: skimage's astronaut (public domain), tests/data stills
(LivePortrait examples, MIT; lp_s10 is Vermeer's "Girl with a Pearl Earring") and the first
frame of the demo clip telepresence/assets/sample.mp4 (green screen, MIT).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.avatar import build_avatar, render_views  # noqa: E402
from models.face.analysis import FaceAnalyzer, read_image  # noqa: E402
from models.geometry.camera import OrbitPose  # noqa: E402
from models.evaluation.figures import contact_sheet  # noqa: E402
from models.pictures import to_rgb_uint8, write_rgb  # noqa: E402

YAWS = (-40, -20, 0, 20, 40)
PITCHES = (-20, 0, 20)


def pictures() -> list[tuple[str, np.ndarray]]:
    from skimage import data as skdata

    out = [("astronaut", skdata.astronaut())]
    for name in ("lp_s42", "lp_s2", "lp_s1", "lp_s10"):
        out.append((name, read_image(REPO / "tests" / "data" / f"{name}.jpg")))
    capture = cv2.VideoCapture(str(REPO / "telepresence" / "assets" / "sample.mp4"))
    ok, frame = capture.read()
    capture.release()
    if ok:
        out.append(("sample clip", np.ascontiguousarray(frame[:, :, ::-1])))
    return out



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("avatar_views_after.jpg"))
    p.add_argument("--quality", type=int, default=82, help="JPEG quality")
    args = p.parse_args(argv)
    poses = [OrbitPose(yaw_deg=y, pitch_deg=pitch) for pitch in PITCHES for y in YAWS]
    rows, labels = [], []
    with FaceAnalyzer() as fa:
        for name, image in pictures():
            avatar = build_avatar(image, fa.analyze(image), render_size=2 * args.size)
            views = render_views(avatar, poses, 2 * args.size).rgb  # rendered at twice the size, then shrunk
            views = [cv2.resize(to_rgb_uint8(v), (args.size, args.size), interpolation=cv2.INTER_AREA) for v in views]
            source = cv2.resize(to_rgb_uint8(avatar.source_view(2 * args.size)), (args.size, args.size),
                                interpolation=cv2.INTER_AREA)
            blank = np.full_like(source, 255)
            for i, pitch in enumerate(PITCHES):
                rows.append([source if i == 1 else blank] + views[i * len(YAWS) : (i + 1) * len(YAWS)])
                labels.append([name if i == 1 else ""] + [f"y{y:+d} p{pitch:+d}" for y in YAWS])
    sheet = contact_sheet(rows, labels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_rgb(args.out, sheet, jpeg_quality=args.quality)
    except OSError as error:
        print(f"make_artifact_sheets: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
