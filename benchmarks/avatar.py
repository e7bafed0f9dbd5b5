"""Avatar build and render timing (landmarks excluded: stored once in
benchmarks/astronaut_face.npz, so the GPU machine needs no MediaPipe).

    python benchmarks/avatar.py --device cpu --sizes 256 512 --views 1 4 --out out/avatar_cpu.json
    python benchmarks/avatar.py --device cuda --sizes 256 512 --views 1 4 --check --out out/avatar_cuda.json

--check compares CUDA renders with CPU renders first; --profile prints the top
torch-profiler rows of one build + render.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import metadata, time_ms, write_json  # noqa: E402
from models.avatar import build_avatar, render_views  # noqa: E402
from telepresence.camera import OrbitPose  # noqa: E402
from telepresence.face import observation_from_landmarks  # noqa: E402

YAWS = [-30.0, -10.0, 10.0, 30.0, 20.0, -20.0, 0.0, 5.0]


def load_case():
    from skimage import data

    image = data.astronaut()
    stored = np.load(Path(__file__).with_name("astronaut_face.npz"))
    obs = observation_from_landmarks(
        stored["landmarks"], image.shape[:2], float(stored["fov_deg"]), stored["mask"].astype(np.float32) / 255.0
    )
    return image, obs


def check_cuda(image, obs, size: int = 256) -> None:
    poses = [OrbitPose(yaw_deg=y) for y in YAWS[:4]]
    cpu = render_views(build_avatar(image, obs, render_size=size), poses, size)
    gpu = render_views(build_avatar(image, obs, device="cuda", render_size=size), poses, size)
    diff = (cpu.rgb - gpu.rgb.cpu()).abs()
    frac = float((diff > 0.05).float().mean())
    print(f"check: CUDA vs CPU renders at {size}: mean |diff| {float(diff.mean()):.5f}, "
          f"pixels off by > 0.05: {100 * frac:.3f} %  -> {'OK' if frac < 0.002 else 'MISMATCH'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--views", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--check", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    image, obs = load_case()
    if args.check and device.type == "cuda":
        check_cuda(image, obs)
    rows = []
    print(f"{'size':>5} {'views':>5} {'build ms':>10} {'render ms':>10} {'per view':>9} {'build+render':>13} {'p90':>7}")
    for size in args.sizes:
        for V in args.views:
            poses = [OrbitPose(yaw_deg=y) for y in YAWS[:V]]
            avatar = build_avatar(image, obs, device=device, render_size=size)
            build = time_ms(lambda: build_avatar(image, obs, device=device, render_size=size), device, repeats=args.repeats)
            render = time_ms(lambda: render_views(avatar, poses, size), device, repeats=args.repeats)
            both = time_ms(lambda: render_views(build_avatar(image, obs, device=device, render_size=size), poses, size),
                           device, repeats=args.repeats)
            rows.append({"size": size, "views": V, "build": build, "render": render, "build_render": both})
            print(f"{size:>5} {V:>5} {build['median_ms']:>10.2f} {render['median_ms']:>10.2f} "
                  f"{render['median_ms'] / V:>9.2f} {both['median_ms']:>13.2f} {both['p90_ms']:>7.2f}")
    if args.profile:
        size, V = args.sizes[-1], args.views[-1]
        poses = [OrbitPose(yaw_deg=y) for y in YAWS[:V]]
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(3):
                render_views(build_avatar(image, obs, device=device, render_size=size), poses, size)
            if device.type == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
    write_json(args.out, {"benchmark": "avatar", "meta": metadata(device), "picture": "skimage astronaut 512x512",
                          "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
