"""Make docs/avatar_views.jpg: source | yaw -30 | -15 | 0 | +15 | +30 for three people.

    python docs/make_avatar_figure.py [--refiner default|none|PATH] [--size 256] [--out docs/avatar_views.jpg]

Pictures: skimage's astronaut (public domain), Vermeer's "Girl with a Pearl
Earring" (public domain, from the development data) and a frame of the
LivePortrait example clip d12 (MIT).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.avatar import build_avatar, render_views  # noqa: E402
from models.refiner import refine_views  # noqa: E402
from models.refiner.shipped import load_refiner  # noqa: E402
from models.geometry.camera import OrbitPose  # noqa: E402
from models.face.analysis import FaceAnalyzer, read_image  # noqa: E402
from models.evaluation.figures import contact_sheet  # noqa: E402
from models.pictures import to_rgb_uint8, write_rgb  # noqa: E402


def pictures(data: Path) -> list[tuple[str, np.ndarray]]:
    from skimage import data as skdata

    out = [("astronaut", skdata.astronaut())]
    vermeer = data / "images" / "lp_s10.jpg"
    if vermeer.exists():
        out.append(("vermeer", read_image(vermeer)))
    clip = data / "videos" / "lp_d12.mp4"
    if clip.exists():
        cap = cv2.VideoCapture(str(clip))
        cap.set(cv2.CAP_PROP_POS_FRAMES, 110)
        ok, frame = cap.read()
        if ok:
            out.append(("lp_d12", frame[:, :, ::-1].copy()))
    return out



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--refiner", default="none")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("avatar_views.jpg"))
    args = p.parse_args(argv)
    refiner = load_refiner(args.refiner, "cpu")
    yaws = (-30, -15, 0, 15, 30)
    poses = [OrbitPose(yaw_deg=y) for y in yaws]
    rows, labels = [], []
    with FaceAnalyzer() as fa:
        for name, image in pictures(args.data):
            obs = fa.analyze(image)
            avatar = build_avatar(image, obs, render_size=args.size)
            out = render_views(avatar, poses, args.size)
            ref = avatar.source_view(args.size)
            views = out.rgb
            if refiner is not None:
                views = refine_views(refiner, ref, out.rgb[None], out.seen[None])[0]
            rows.append([to_rgb_uint8(ref)] + [to_rgb_uint8(v) for v in views])
            labels.append([f"{name}: source"] + [f"yaw {y:+d}" for y in yaws])
    sheet = contact_sheet(rows, labels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_rgb(args.out, sheet, jpeg_quality=92)
    except OSError as error:
        print(f"make_avatar_figure: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
