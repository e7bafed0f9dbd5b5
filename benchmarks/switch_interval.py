"""Python's thread switch interval beside a compile: how many frames a second a thread that lets go of the GIL
often (a sender's frame: torch and CUDA calls, the face analysis, the encoder and the sockets each release it and
take it back) keeps while another thread runs pure Python (dynamo's tracing, which a sender's compile from the
disk cache is for about 30 s: models.avatar.compiling.SWITCH_INTERVAL_S).

Each time the frame thread wants the GIL back it waits until the busy thread is asked to drop it, up to one
switch interval (the "convoy"), so a frame of R releases costs up to R intervals. Per row: the frame thread's
frames a second (paced at --fps), and the busy thread's pure-Python loops a second against its rate alone (what
the compile pays). A CPU measurement of the mechanism; the GPU sender's own figure is `benchmarks/soak.py`'s.

    python benchmarks/switch_interval.py
    python benchmarks/switch_interval.py --releases 100 300 --intervals-ms 5 0.5 0.1 0.05 --seconds 4
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from benchmarks.common import document, write_json  # noqa: E402
from models.runinfo import run_metadata  # noqa: E402


def _busy(stop: threading.Event, loops: list[int]) -> None:
    """Pure Python until stopped (dict and string work, as tracing does); the loops it made."""
    n = 0
    while not stop.is_set():
        d = {}
        for i in range(200):
            d[i] = str(i) * 3
        n += 1
    loops.append(n)


def _frames(seconds: float, releases: int, fps: float) -> float:
    """Frames a second of a thread whose frame lets go of the GIL `releases` times, paced at `fps`."""
    t0 = time.perf_counter()
    n, due = 0, t0
    while time.perf_counter() - t0 < seconds:
        for _ in range(releases):
            time.sleep(0)  # lets go of the GIL and takes it back, as a C call that releases it does
        n += 1
        due += 1.0 / fps
        time.sleep(max(0.0, due - time.perf_counter()))
    return n / (time.perf_counter() - t0)


def run(releases: int, interval_s: float, seconds: float, fps: float) -> dict:
    stop, loops = threading.Event(), []
    busy = threading.Thread(target=_busy, args=(stop, loops), daemon=True)
    old = sys.getswitchinterval()
    busy.start()
    sys.setswitchinterval(interval_s)
    t0 = time.perf_counter()
    try:
        frames = _frames(seconds, releases, fps)
    finally:
        sys.setswitchinterval(old)
        stop.set()
        busy.join()
    return {"releases": releases, "interval_ms": interval_s * 1e3, "frames_per_s": round(frames, 1),
            "busy_loops_per_s": round(loops[0] / (time.perf_counter() - t0))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--releases", type=int, nargs="+", default=[100, 300], help="GIL releases a frame")
    parser.add_argument("--intervals-ms", type=float, nargs="+", default=[5.0, 0.5, 0.1, 0.05])
    parser.add_argument("--seconds", type=float, default=4.0, help="per row")
    parser.add_argument("--fps", type=float, default=30.0, help="the frame thread's pace")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    args = parser.parse_args(argv)
    stop, loops = threading.Event(), []
    alone = threading.Thread(target=_busy, args=(stop, loops), daemon=True)
    alone.start()
    time.sleep(args.seconds)
    stop.set()
    alone.join()
    busy_alone = round(loops[0] / args.seconds)
    print(f"busy thread alone: {busy_alone} loops/s")
    rows = []
    for releases in args.releases:
        for interval_ms in args.intervals_ms:
            row = run(releases, interval_ms / 1e3, args.seconds, args.fps)
            rows.append(row)
            print(f"{releases:4d} releases a frame, interval {interval_ms:5.2f} ms: {row['frames_per_s']:5.1f} frames/s, "
                  f"busy thread at {row['busy_loops_per_s'] / busy_alone:.0%} of its rate alone", flush=True)
    if args.out is not None:
        doc = document(run_metadata("cpu", benchmark="switch_interval"), vars(args) | {"out": str(args.out)},
                       {"busy_alone_loops_per_s": busy_alone, "rows": rows})
        print(f"wrote {write_json(args.out, doc)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
