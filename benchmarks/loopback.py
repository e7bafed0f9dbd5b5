"""End-to-end loopback benchmark: frames per second and glass-to-glass latency, 1 and 4 viewers.

A Sender (capture thread + pipeline worker + aiortc) and a receiver
(signaling) run in this process; N aiortc viewers (telepresence.stream.viewer.Viewer)
run in a child process, as browsers would, and join through the receiver's
signaling socket: real peer connections on this host, and the viewers'
decoding does not compete with the sender for this process's interpreter
(--viewers-in same puts them in this process, as earlier versions did). The sender paints each frame's capture time into
the picture's corner (telepresence.stream.framecode); each viewer reads it back from
the decoded frame's luma plane, so

    latency = t_decoded_at_viewer - t_grabbed_at_capture

covers pipeline, encode, network stack, jitter buffer and decode (not the
camera's exposure-to-grab time). aiortc's receive jitter buffer releases a
frame only when the next frame's first packet arrives, so these in-process
viewers add about one frame interval that a browser does not.

With --browser, one more case puts headless Chromium on the real page (served
by an in-process receiver) and reads the stamp from each presented frame in
a requestVideoFrameCallback, against the frame's expected display time: the
glass-to-glass figure a user sees, on this host.

Warm-up frames are discarded; latency statistics (benchmarks.common.timing_stats) over all
viewers' frames are reported, with the sender's per-stage milliseconds, in a JSON file of the
benchmarks.common layout (meta: commit, versions, device, host).

    python benchmarks/loopback.py --device cpu --size 256 --browser         # 2-core CPU
    python benchmarks/loopback.py --device cuda --size 512                  # GPU machine
    python benchmarks/loopback.py --pipeline tests.fake_pipeline:build_pipeline ...        # streaming cost alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere as `python benchmarks/loopback.py`

from benchmarks.common import document, timing_stats, write_json  # noqa: E402
from models.runinfo import run_metadata  # noqa: E402
from telepresence.stream.capture import open_source  # noqa: E402
from telepresence.stream.framecode import WRAP, read_frame_code  # noqa: E402
from telepresence.stream.renderloop import PIPELINE_STAGES  # noqa: E402
from telepresence.pipeline import PipelineConfig, open_pipeline  # noqa: E402
from telepresence.stream.sender import Sender, SenderConfig  # noqa: E402
from telepresence.stream.viewer import Viewer  # noqa: E402

VIEWER_YAWS_DEG = (-24.0, 24.0, -8.0, 8.0, -32.0, 32.0, -16.0, 16.0)


class FrameRecorder:
    """Per viewer: arrival times and stamp latencies of decoded frames while recording."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.recording = False
        self.arrivals: list[float] = []
        self.latencies_ms: list[float] = []
        self.unreadable = 0

    def on_frame(self, frame: Any, t_received: float) -> None:
        if not self.recording:
            return
        self.arrivals.append(t_received)
        plane = frame.planes[0]  # yuv420p luma: no colour conversion on the hot path
        luma = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)[:64, :128]
        stamp = read_frame_code(luma, size=frame.height)
        if stamp is None:
            self.unreadable += 1
            return
        self.latencies_ms.append(float((int(t_received * 1e3) - stamp) % WRAP))

    def fps(self) -> float:
        if len(self.arrivals) < 2:
            return 0.0
        return (len(self.arrivals) - 1) / (self.arrivals[-1] - self.arrivals[0])


def sample_stages(sender: Sender) -> dict[str, float]:
    """The sender's mean ms per stage over the last second, encode averaged over its viewers."""
    _, stages = sender.render_loop.clock.summary()
    encodes = [p.track.encode_ms for p in sender.viewers.values() if p.track.encode_ms is not None]
    if encodes:
        stages["encode"] = float(np.mean(encodes))
    return stages


def median_stages(samples: list[dict[str, float]]) -> dict[str, float]:
    names = [name for name in ("capture", *PIPELINE_STAGES, "encode") if any(name in s for s in samples)]
    return {name: round(float(np.median([s[name] for s in samples if name in s])), 2) for name in names}


def viewer_summary(recorders: list["FrameRecorder"]) -> dict[str, Any]:
    """What the viewers measured: fps per viewer, latencies, frames, unreadable stamps."""
    fps_per_viewer = [r.fps() for r in recorders]
    return {
        "fps_per_viewer": {"median": round(float(np.median(fps_per_viewer)), 1), "min": round(min(fps_per_viewer), 1)},
        "latency_ms": timing_stats([ms for r in recorders for ms in r.latencies_ms]),
        "stamps_unreadable": sum(r.unreadable for r in recorders),
        "frames": sum(len(r.arrivals) for r in recorders),
    }


async def start_viewers(n_viewers: int, size: int, connect: Any) -> tuple[list["FrameRecorder"], list[Viewer]]:
    """N viewers, each connected (connect(viewer, i)), first frame received and orbiting its own yaw."""
    recorders = [FrameRecorder(size) for _ in range(n_viewers)]
    viewers = [Viewer(on_frame=recorder.on_frame) for recorder in recorders]
    for i, viewer in enumerate(viewers):
        await connect(viewer, i)
    for i, viewer in enumerate(viewers):
        await viewer.next_frame(timeout_s=300)  # the first frame may wait for model load and compilation
        await viewer.wait_channel_open()
        viewer.set_pose(VIEWER_YAWS_DEG[i % len(VIEWER_YAWS_DEG)], 0.0, 1.0)
    return recorders, viewers


async def viewer_child(args: argparse.Namespace) -> int:
    """--viewer-child: N viewers join ROOM at --signaling; prints 'recording', then one JSON line."""
    recorders, viewers = await start_viewers(args.viewers[0], args.size,
                                             lambda viewer, i: viewer.join(args.signaling, args.room))
    try:
        await asyncio.sleep(args.warmup)
        print("recording", flush=True)
        for recorder in recorders:
            recorder.recording = True
        await asyncio.sleep(args.seconds)
        for recorder in recorders:
            recorder.recording = False
    finally:
        for viewer in viewers:
            await viewer.close()
    print(json.dumps(viewer_summary(recorders)), flush=True)
    return 0


async def run_case_process(args: argparse.Namespace, n_viewers: int, pipeline: Any) -> dict[str, Any]:
    """Sender + receiver here, the N viewers in a child process joining through signaling."""
    from telepresence.stream.receiver import Receiver, ReceiverConfig

    room = "bench"
    receiver = Receiver(ReceiverConfig(port=0, room=room, web_dir=Path(__file__).resolve().parents[1] / "web"))
    await receiver.start()
    config = SenderConfig(
        signaling_url=receiver.signaling_url, room=room, source=args.source,
        codec=args.codec, stamp_frames=True, max_viewers=max(8, n_viewers),
    )
    sender = Sender(config, pipeline, source=open_source(args.source, args.source_fps))
    await sender.start()
    signaling = asyncio.ensure_future(sender.run_signaling())
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "--viewer-child", "--signaling", receiver.signaling_url,
        "--room", room, "--viewers", str(n_viewers), "--size", str(args.size), "--warmup", str(args.warmup),
        "--seconds", str(args.seconds), stdout=asyncio.subprocess.PIPE,
    )
    stage_samples: list[dict[str, float]] = []
    sender_fps: list[float] = []
    measured = None
    sampler: Optional[asyncio.Future] = None
    try:
        assert child.stdout is not None
        while True:
            line = (await child.stdout.readline()).decode().strip()
            if not line:
                break
            if line == "recording":
                sampler = asyncio.ensure_future(sample_loop(sender, args.seconds, stage_samples, sender_fps))
            elif line.startswith("{"):
                measured = json.loads(line)
        await child.wait()
        if sampler is not None:
            await sampler
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        signaling.cancel()
        await asyncio.gather(signaling, return_exceptions=True)
        await sender.stop()
        await receiver.stop()
    if measured is None:
        raise RuntimeError(f"the viewer process ended (status {child.returncode}) without results")
    return {
        "viewers": n_viewers,
        "receiver": "aiortc (own process)",
        **measured,
        "sender_fps_median": round(float(np.median(sender_fps)), 1) if sender_fps else None,
        "stages_ms_median": median_stages(stage_samples),
    }


async def sample_loop(sender: Sender, seconds: float, stage_samples: list, sender_fps: list) -> None:
    """Once a second for ``seconds``: the sender's per-stage ms and its fps."""
    for _ in range(int(seconds)):
        await asyncio.sleep(1.0)
        stage_samples.append(sample_stages(sender))
        sender_fps.append(sender.render_loop.clock.summary()[0])


async def run_case(args: argparse.Namespace, n_viewers: int, pipeline: Any) -> dict[str, Any]:
    config = SenderConfig(
        source=args.source, codec=args.codec, stamp_frames=True, max_viewers=max(8, n_viewers),
    )
    sender = Sender(config, pipeline, source=open_source(args.source, args.source_fps))
    await sender.start()
    viewers: list[Viewer] = []
    stage_samples: list[dict[str, float]] = []
    sender_fps: list[float] = []
    try:
        recorders, viewers = await start_viewers(n_viewers, args.size,
                                                 lambda viewer, i: viewer.connect(sender, f"bench{i}"))
        await asyncio.sleep(args.warmup)
        for recorder in recorders:
            recorder.recording = True
        await sample_loop(sender, args.seconds, stage_samples, sender_fps)
        for recorder in recorders:
            recorder.recording = False
    finally:
        for viewer in viewers:
            await viewer.close()
        await sender.stop()
    return {
        "viewers": n_viewers,
        "receiver": "aiortc (same process)",
        **viewer_summary(recorders),
        "sender_fps_median": round(float(np.median(sender_fps)), 1) if sender_fps else None,
        "stages_ms_median": median_stages(stage_samples),
    }


CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--autoplay-policy=no-user-gesture-required",
]

# Reads telepresence.stream.framecode's corner stamp from each presented frame with the page's own
# reader (web/latency.js); sender and page share this host's clock, so no offset.
BROWSER_PROBE_JS = """async (seconds) => {
  const { readFrameCode, glassToGlassMs, pageClockMs } = await import('/latency.js');
  const video = document.querySelector('.tile video');
  const canvas = document.createElement('canvas');
  const latencies = [], presented = [];
  let unreadable = 0;
  const end = performance.now() + seconds * 1000;
  return await new Promise((resolve) => {
    const step = (now, meta) => {
      const stamp = readFrameCode(video, canvas);
      const shown = pageClockMs(meta.expectedDisplayTime ?? now);
      presented.push(shown);
      if (stamp !== null) latencies.push(glassToGlassMs(stamp, shown, 0));
      else unreadable++;
      if (performance.now() < end) video.requestVideoFrameCallback(step);
      else resolve({ latencies, presented, unreadable });
    };
    video.requestVideoFrameCallback(step);
  });
}"""


async def run_browser_case(args: argparse.Namespace, pipeline: Any) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    from telepresence.stream.receiver import Receiver, ReceiverConfig

    receiver = Receiver(ReceiverConfig(port=0, web_dir=Path(__file__).resolve().parents[1] / "web"))
    await receiver.start()
    config = SenderConfig(
        signaling_url=receiver.signaling_url, source=args.source,
        codec=args.codec, stamp_frames=True,
    )
    sender = Sender(config, pipeline, source=open_source(args.source, args.source_fps))
    await sender.start()
    signaling = asyncio.ensure_future(sender.run_signaling())
    stage_samples: list[dict[str, float]] = []
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS, headless=True)
            page = await browser.new_page(viewport={"width": 900, "height": 900})
            await page.goto(receiver.url)
            await page.wait_for_function(
                "() => { const v = document.querySelector('.tile video'); return v && v.currentTime > 0.2; }",
                timeout=120_000,
            )
            await asyncio.sleep(args.warmup)
            probe = asyncio.ensure_future(page.evaluate(BROWSER_PROBE_JS, args.seconds))
            while not probe.done():
                await asyncio.sleep(1.0)
                stage_samples.append(sample_stages(sender))
            measured = probe.result()
            await browser.close()
    finally:
        signaling.cancel()
        await asyncio.gather(signaling, return_exceptions=True)
        await sender.stop()
        await receiver.stop()
    presented = measured["presented"]
    fps = (len(presented) - 1) / ((presented[-1] - presented[0]) / 1e3) if len(presented) > 1 else 0.0
    return {
        "viewers": 1,
        "receiver": "chromium",
        "fps_per_viewer": {"median": round(fps, 1), "min": round(fps, 1)},
        "latency_ms": timing_stats(measured["latencies"]),
        "sender_fps_median": None,
        "stages_ms_median": median_stages(stage_samples),
        "stamps_unreadable": measured["unreadable"],
        "frames": len(presented),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, choices=(256, 512), default=None, help="default: 512 on cuda, 256 on cpu")
    parser.add_argument("--viewers", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per case")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds discarded after the first frames")
    parser.add_argument("--source", default="sample")
    parser.add_argument("--source-fps", type=float, default=None,
                        help="pace the source at this rate (the sample clip is 25 fps; a webcam is usually 30)")
    parser.add_argument("--codec", choices=("vp8", "h264"), default="vp8")
    parser.add_argument("--pipeline", default=None,
                        help="'module:function' making a stand-in pipeline (default: the product's)")
    parser.add_argument("--refiner", default="default", help="PATH | default | none")
    parser.add_argument("--browser", action="store_true", help="add a case with headless Chromium on the real page")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary for --browser")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/loopback_<device>_<size>.json)")
    parser.add_argument("--viewers-in", choices=("process", "same"), default="process",
                        help="aiortc viewers in a child process (like remote browsers; default) or in this process")
    parser.add_argument("--viewer-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--signaling", help=argparse.SUPPRESS)
    parser.add_argument("--room", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (512 if args.device.startswith("cuda") else 256)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.viewer_child:
        return asyncio.run(viewer_child(args))

    try:
        pipeline = open_pipeline(
            PipelineConfig(device=args.device, size=args.size, refiner=None if args.refiner == "none" else args.refiner),
            factory=args.pipeline,
        )
    except Exception as error:
        print(f"error: {error}\n(to measure the streaming path alone: --pipeline tests.fake_pipeline:build_pipeline)", file=sys.stderr)
        return 1

    results = []
    for n in args.viewers:
        print(f"running {n} viewer(s): {args.warmup:.0f} s warm-up + {args.seconds:.0f} s ...", flush=True)
        case = run_case_process if args.viewers_in == "process" else run_case
        results.append(asyncio.run(case(args, n, pipeline)))
    if args.browser:
        print(f"running 1 Chromium viewer: {args.warmup:.0f} s warm-up + {args.seconds:.0f} s ...", flush=True)
        results.append(asyncio.run(run_browser_case(args, pipeline)))

    config = {k: v for k, v in vars(args).items() if k != "out"}
    out = args.out or Path(__file__).resolve().parent / "results" / f"loopback_{args.device.split(':')[0]}_{args.size}.json"
    write_json(out, document(run_metadata(args.device, benchmark="loopback"), config, results))

    print(f"\nloopback, {args.pipeline}, {args.device}, {args.size}x{args.size}, {args.codec}")
    print(f"{'receiver':>20} {'viewers':>7} {'fps/viewer':>11} {'latency med':>12} {'p90':>8}  stages ms (median)")
    for r in results:
        stages = " ".join(f"{k}={v:g}" for k, v in r["stages_ms_median"].items())
        lat = r["latency_ms"]
        print(f"{r['receiver']:>20} {r['viewers']:>7} {r['fps_per_viewer']['median']:>11.1f}"
              f" {lat['median'] or float('nan'):>10.1f}ms {lat['p90'] or float('nan'):>6.1f}ms  {stages}")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
