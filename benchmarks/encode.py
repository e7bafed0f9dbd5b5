"""How VP8 encoding of many viewers scales: aiortc's way (threads in the sender's interpreter) and the
encoder process (telepresence.stream.encoding), each alone, beside a busy Python thread or a busy process.

aiortc runs each RTCRtpSender's `encoder.encode(frame)` in the event loop's default thread pool
(ThreadPoolExecutor, min(32, cores + 4) workers). PyAV releases the GIL inside sws_scale and
avcodec_send_frame / avcodec_receive_packet, so N threads of N streams can use N cores, but each
encode takes the GIL back 3-4 times. --busy adds, per row, nothing ("none"), one Python thread that
never sleeps ("thread": an event loop with a lot to do, holding the GIL while the encoders wait for
it), or one process that never sleeps ("process": the same CPU taken, the GIL left alone).

    N threads ("threads"):   each encodes its own stream with aiortc's Vp8Encoder (RGB frame in, as
                             ViewTrack hands aiortc, to RTP payloads), frames back to back
    N streams ("process"):   EncoderPool streams, each submitting its next frame when the last is back

Frames: the sample clip, centre square at --size. Per row: frames per second over all streams, the
speed-up over the mode's first row (one stream, nothing busy), median / p90 ms a frame ("process":
submit to bitstream back). JSON in the benchmarks.common layout.

    python benchmarks/encode.py                          # 512, 1 2 4 8 16 streams
    python benchmarks/encode.py --size 256 --streams 1 2 4 --frames 40
    python benchmarks/encode.py --modes threads --busy none thread --streams 1 --switch-interval-ms 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere as `python benchmarks/encode.py`

import av  # noqa: E402
from aiortc.codecs import vpx  # noqa: E402

from benchmarks.common import document, timing_stats, write_json  # noqa: E402
from models.runinfo import run_metadata  # noqa: E402
from telepresence.stream.capture import open_source  # noqa: E402
from telepresence.stream.encoding import EncoderPool  # noqa: E402
from telepresence.stream.rtc import BitrateConfig, apply_bitrate  # noqa: E402

TIME_BASE = fractions.Fraction(1, 90_000)


def clip_frames(size: int, count: int = 60) -> list[np.ndarray]:
    """`count` frames of the sample clip, centre square resized to size x size, [S, S, 3] uint8 RGB."""
    source = open_source("sample", 240.0)
    frames = []
    try:
        for _ in range(count):
            source.grab()
            image = source.retrieve()
            h, w = image.shape[:2]
            m = min(h, w)
            square = image[(h - m) // 2:(h - m) // 2 + m, (w - m) // 2:(w - m) // 2 + m]
            frames.append(np.ascontiguousarray(cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA)))
    finally:
        source.close()
    return frames


class BusyProcess:
    """A Python process that never sleeps (takes a core, not this interpreter's GIL)."""

    def __enter__(self) -> "BusyProcess":
        self._process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.kill()
        self._process.wait()


def busy(kind: str) -> Any:
    """The context that keeps a thread or a process busy meanwhile ("none": nothing)."""
    return {"none": contextlib.nullcontext(), "thread": BusyThread(), "process": BusyProcess()}[kind]


class BusyThread:
    """A Python thread that never sleeps (holds the GIL whenever the interpreter lets it)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="busy", daemon=True)

    def _spin(self) -> None:
        while not self._stop.is_set():
            total = 0
            for i in range(200):
                total += i

    def __enter__(self) -> "BusyThread":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_threads(frames: list[np.ndarray], streams: int, count: int) -> tuple[float, list[float]]:
    """`streams` threads, each encoding `count` frames with aiortc's Vp8Encoder: (wall s, ms per frame)."""
    samples: list[list[float]] = [[] for _ in range(streams)]

    def encode(index: int) -> None:
        encoder = vpx.Vp8Encoder()
        for i in range(count):
            frame = av.VideoFrame.from_ndarray(frames[(i + 7 * index) % len(frames)], format="rgb24")
            frame.pts, frame.time_base = i * 3000, TIME_BASE
            start = time.perf_counter()
            encoder.encode(frame)
            samples[index].append((time.perf_counter() - start) * 1e3)

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, [ms for s in samples for ms in s]


async def run_process(pool: EncoderPool, frames: list[np.ndarray], streams: int, count: int) -> tuple[float, list[float]]:
    """`streams` streams of the encoder process, each submitting its next frame when the last is back."""
    size = frames[0].nbytes
    opened = [pool.open_stream("vp8", size) for _ in range(streams)]
    samples: list[float] = []
    done = asyncio.get_running_loop().create_future()
    sent = [0] * streams
    finished = [0]

    def submit(index: int) -> None:
        sent[index] += 1
        opened[index].submit(frames[(sent[index] + 7 * index) % len(frames)])

    def on_frame(index: int, frame: Any) -> None:
        samples.append(frame.encode_ms)
        if sent[index] < count:
            submit(index)
        else:
            finished[0] += 1
            if finished[0] == streams and not done.done():
                done.set_result(None)

    for index, stream in enumerate(opened):
        stream.on_frame = lambda frame, index=index: on_frame(index, frame)
    start = time.perf_counter()
    for index in range(streams):
        submit(index)
    await asyncio.wait_for(done, timeout=600)
    wall = time.perf_counter() - start
    for stream in opened:
        stream.close()
    return wall, samples


def summary(mode: str, kind: str, streams: int, wall: float, samples: list[float], one: float | None) -> dict[str, Any]:
    fps = len(samples) / wall
    stats = timing_stats(samples)
    return {
        "mode": mode, "busy": kind, "streams": streams, "wall_s": round(wall, 3),
        "frames_per_s": round(fps, 1), "speedup": round(fps / one, 2) if one else 1.0,
        "ms_per_frame": {"median": round(stats["median"], 2), "p90": round(stats["p90"], 2)},
    }


async def run_process_modes(args: argparse.Namespace, frames: list[np.ndarray]) -> list[dict[str, Any]]:
    pool = EncoderPool()
    pool.start()
    results = []
    try:
        await run_process(pool, frames, 1, 5)  # the process is up and warm
        one = None
        for kind in args.busy:
            for streams in args.streams:
                with busy(kind):
                    wall, samples = await run_process(pool, frames, streams, args.frames)
                results.append(summary("process", kind, streams, wall, samples, one))
                one = one or results[-1]["frames_per_s"]
                print_row(results[-1])
    finally:
        pool.close()
    return results


def print_row(row: dict[str, Any]) -> None:
    print(f"{row['mode']:>8} {row['busy']:>8} {row['streams']:>7} {row['frames_per_s']:>9.1f}"
          f" {row['speedup']:>7.2f}x {row['ms_per_frame']['median']:>8.2f} {row['ms_per_frame']['p90']:>8.2f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--frames", type=int, default=60, help="frames per stream")
    parser.add_argument("--modes", nargs="+", choices=("threads", "process"), default=["threads", "process"])
    parser.add_argument("--busy", nargs="+", choices=("none", "thread", "process"), default=["none", "thread", "process"],
                        help="what runs beside the encoders (the first is the speed-up's reference)")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="this interpreter's GIL switch interval (Python's default: 5 ms)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/encode_<size>.json)")
    args = parser.parse_args()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    apply_bitrate(BitrateConfig())  # the sender's bitrates
    frames = clip_frames(args.size)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"VP8 {args.size}x{args.size}, {args.frames} frames a stream, {cores} cores")
    print(f"{'mode':>8} {'busy':>8} {'streams':>7} {'frames/s':>9} {'speedup':>8} {'ms p50':>8} {'ms p90':>8}")
    results = []
    if "threads" in args.modes:
        run_threads(frames, 1, 5)  # warm
        one = None
        for kind in args.busy:
            for streams in args.streams:
                with busy(kind):
                    wall, samples = run_threads(frames, streams, args.frames)
                results.append(summary("threads", kind, streams, wall, samples, one))
                one = one or results[-1]["frames_per_s"]
                print_row(results[-1])
    if "process" in args.modes:
        results += asyncio.run(run_process_modes(args, frames))
    out = args.out or Path(__file__).resolve().parent / "results" / f"encode_{args.size}.json"
    config = {k: v for k, v in vars(args).items() if k != "out"} | {"cores": cores}
    write_json(out, document(run_metadata("cpu", benchmark="encode"), config, results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
