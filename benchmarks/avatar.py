"""Avatar build and render timing (landmarks excluded: they are computed once, outside the loop).

    python benchmarks/avatar.py --device cpu --sizes 256 512 --views 1 4 --out out/avatar_cpu.json
    python benchmarks/avatar.py --device cuda --sizes 256 512 --views 1 4 --out out/avatar_cuda.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import metadata, time_ms, write_json  # noqa: E402
from models.avatar import build_avatar, render_views  # noqa: E402
from telepresence.camera import OrbitPose  # noqa: E402
from telepresence.face import FaceAnalyzer  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--views", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    from skimage import data

    image = data.astronaut()
    with FaceAnalyzer() as fa:
        obs = fa.analyze(image)
    yaws = [-30.0, -10.0, 10.0, 30.0, 20.0, -20.0, 0.0, 5.0]
    rows = []
    print(f"{'size':>5} {'views':>5} {'build ms':>10} {'render ms':>10} {'per view':>9} {'build+render':>13}")
    for size in args.sizes:
        for V in args.views:
            poses = [OrbitPose(yaw_deg=y) for y in yaws[:V]]
            avatar = build_avatar(image, obs, device=device, render_size=size)
            build = time_ms(lambda: build_avatar(image, obs, device=device, render_size=size), device, repeats=args.repeats)
            render = time_ms(lambda: render_views(avatar, poses, size), device, repeats=args.repeats)
            both = time_ms(lambda: render_views(build_avatar(image, obs, device=device, render_size=size), poses, size),
                           device, repeats=args.repeats)
            rows.append({"size": size, "views": V, "build": build, "render": render, "build_render": both})
            print(f"{size:>5} {V:>5} {build['median_ms']:>10.2f} {render['median_ms']:>10.2f} "
                  f"{render['median_ms'] / V:>9.2f} {both['median_ms']:>13.2f}")
    write_json(args.out, {"benchmark": "avatar", "meta": metadata(device), "picture": "skimage astronaut 512x512",
                          "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
