"""The sender's start: from the first camera frame to the first views out, and the frame rate in the
seconds after, with the product's pipeline and a camera paced at 30 fps (the embedded sample clip).

    python benchmarks/first_frame.py --device cuda --size 512 --views 4 --seconds 30 --modes held unheld
    python benchmarks/first_frame.py --device cpu --size 256 --views 1 --seconds 10

On a GPU the avatar's kernels compile while the plain graphs serve (`send --compile-avatar prefill`, the
default: a child process compiles first, then the sender from inductor's disk cache; `background`: on the
sender's own worker thread); on a machine whose inductor cache is cold that takes minutes. Modes (each in a fresh
process): "held", the product: the compiles wait until the first frame is out (models.avatar.compiling); "unheld"
(for `--compile-avatar background`: the code before the tenth session): the compile worker starts at the first
submitted compile, beside the first frame's captures. On the CPU nothing compiles and the one mode is "held". Run the held mode first on a fresh
machine: a later run finds part of the compile in inductor's disk cache.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere as `python benchmarks/first_frame.py`

MODES = ("held", "unheld")
CAMERA_FPS = 30.0


def _fps(done_s: list[float], lo: float, hi: float) -> float | None:
    """Frames finished per second in [lo, hi) seconds after the first frame was handed over."""
    return None if hi <= lo else round(sum(lo <= t < hi for t in done_s) / (hi - lo), 1)


def run_mode(args: argparse.Namespace) -> dict:
    """One mode in this process: the pipeline made, then the sample clip's frames at a camera's pace."""
    import cv2

    from telepresence.pipeline import Pipeline, PipelineConfig, ViewPose

    cap = cv2.VideoCapture(str(ROOT / "telepresence" / "assets" / "sample.mp4"))
    frames = []
    while len(frames) < 100:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    if not frames:
        raise SystemExit("error: cannot read telepresence/assets/sample.mp4")
    t_made = time.perf_counter()
    pipeline = Pipeline(PipelineConfig(device=args.device, size=args.size, refiner=args.refiner,
                                       compile_avatar=args.compile_avatar, precompiled_avatar=args.precompiled_avatar))
    made_s = time.perf_counter() - t_made
    if args.mode == "unheld" and pipeline.engine.compiler is not None:
        pipeline.engine.compiler.release()  # the worker starts at the first submitted compile, as before
    poses = [ViewPose(yaw_deg=y) for y in [-30 + 60 * i / max(1, args.views - 1) for i in range(args.views)]]
    t0 = time.perf_counter()
    calls = []
    i = 0
    while time.perf_counter() - t0 < args.seconds:
        t = time.perf_counter()
        result = pipeline.process(frames[i % len(frames)], poses)
        calls.append({"start_s": round(t - t0, 3), "done_s": round(time.perf_counter() - t0, 3),
                      "status": result.status, "kernels": result.kernels})
        i += 1
        time.sleep(max(0.0, 1 / CAMERA_FPS - (time.perf_counter() - t)))
    done = [c["done_s"] for c in calls]
    first = next((c["done_s"] for c in calls if c["status"] == "ok"), None)
    edges = [e for e in (0, 5, 10, 20, 40, 80, 160, 320, 640) if e < args.seconds] + [args.seconds]
    compiled = next((c["done_s"] for c in calls if c["kernels"] == "compiled"), None)
    return {"mode": args.mode, "pipeline_made_s": round(made_s, 2), "first_frame_s": first, "compiled_s": compiled,
            "fps": {f"{lo:g}-{hi:g} s": _fps(done, lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo},
            "frames": len(calls), "kernels_at_end": calls[-1]["kernels"] if calls else None, "calls": columns(calls)}


def columns(calls: list[dict]) -> dict:
    """The calls as series (each on one line of the JSON: a 7-minute run makes 12,000 of them): when each began and
    ended (seconds from the first camera frame), and from which call on each status and kernel state held."""
    def runs(key: str) -> list:
        return [[i, c[key]] for i, c in enumerate(calls) if i == 0 or c[key] != calls[i - 1][key]]

    return {"start_s": [c["start_s"] for c in calls], "done_s": [c["done_s"] for c in calls],
            "status_from": runs("status"), "kernels_from": runs("kernels")}


def main(argv: list[str] | None = None) -> int:
    from telepresence.pipeline import COMPILE_AVATAR, PipelineConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=None, help="default: 512 on cuda, 256 on cpu")
    parser.add_argument("--views", type=int, default=4, help="views a frame (viewers watching)")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long each mode runs after its pipeline is made")
    parser.add_argument("--refiner", default="none", help="PATH | default | none (the benchmarks' random small "
                        "refiner: see scripts/device_bench.sh)")
    parser.add_argument("--compile-avatar", default=PipelineConfig.compile_avatar, choices=COMPILE_AVATAR,
                        help="the sender's --compile-avatar (default: the sender's; prefill: a child process compiles "
                        "first, background: the sender's worker thread)")
    parser.add_argument("--precompiled-avatar", action=argparse.BooleanOptionalAction,
                        default=PipelineConfig.precompiled_avatar,
                        help="the sender's --precompiled-avatar (default: the sender's, on where the avatar compiles)")
    parser.add_argument("--modes", nargs="+", default=None, choices=MODES, help="default: both on cuda, held on cpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # one mode, in a child process
    args = parser.parse_args(argv)
    args.size = args.size or (512 if args.device.startswith("cuda") else 256)
    if args.views < 1 or args.seconds <= 0:
        parser.error(f"expected --views >= 1 and --seconds > 0, got {args.views} and {args.seconds}")
    args.refiner = None if args.refiner == "none" else args.refiner
    if args.mode:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        print("RESULT " + json.dumps(run_mode(args)), flush=True)
        os._exit(0)  # a background compile may still run: it is not waited for
    modes = args.modes or (list(MODES) if args.device.startswith("cuda") else ["held"])
    from benchmarks.common import child_result, document, write_json
    from models.runinfo import run_metadata

    results = []
    for mode in modes:
        argv_child = [sys.executable, str(Path(__file__).resolve()), "--mode", mode, "--device", args.device,
                      "--size", str(args.size), "--views", str(args.views), "--seconds", str(args.seconds),
                      "--refiner", args.refiner or "none", "--compile-avatar", args.compile_avatar,
                      *([] if args.precompiled_avatar is None else
                        ["--precompiled-avatar" if args.precompiled_avatar else "--no-precompiled-avatar"])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        result, child = child_result(argv_child, f"{mode} run", env=env, cwd=ROOT, timeout=args.seconds + 600)
        if result is None:
            return 1
        # What the log said went wrong (a compile that failed, a prefill child that ended badly): kept beside the figures.
        result["log_warnings"] = [ln for ln in child.stderr.splitlines()
                                  if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln][-20:]
        # The start as the log tells it (the captures of the first frame, each with its time): where its seconds go.
        result["log_head"] = [ln for ln in child.stderr.splitlines() if " INFO " in ln or " WARNING " in ln][:60]
        # --precompiled-avatar: each function loaded, compiled whole and saved, or not, in the child or the sender
        result["log_precompiled"] = [ln for ln in child.stderr.splitlines()
                                     if "precompiled" in ln or "raster capacity" in ln][:60]
        results.append(result)
        print(f"{mode:7} first frame {result['first_frame_s']} s after the first camera frame, compiled graphs in use "
              f"from {result['compiled_s']} s "
              f"(pipeline made in {result['pipeline_made_s']} s); fps {result['fps']}; kernels at the end: "
              f"{result['kernels_at_end']}", flush=True)
        for warning in result["log_warnings"]:
            print(f"        log: {warning[:300]}", flush=True)
    if args.out:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "mode"}
        write_json(args.out, document(run_metadata(args.device, benchmark="first_frame"), config, results))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
