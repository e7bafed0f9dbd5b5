"""End-to-end loopback benchmark: frames per second and glass-to-glass latency for N viewers, a curve.

A Sender (capture thread + pipeline worker + aiortc; the viewers' frames encoded in the encoder
process, telepresence.stream.encoding, unless --encoder aiortc) and a receiver (signaling) run in
this process; the N aiortc viewers (telepresence.stream.viewer.Viewer) run in child processes,
--viewers-per-process each, as browsers would, and join through the receiver's signaling socket:
real peer connections on this host, and the viewers' receiving and decoding do not compete with the
sender for its interpreter (--viewers-in same puts them in this process, as earlier versions did).
The sender paints each frame's capture time into the picture's corner (telepresence.stream.framecode);
each viewer reads it back from the decoded frame's luma plane, so

    latency = t_decoded_at_viewer - t_grabbed_at_capture

covers pipeline, encode, network stack, jitter buffer and decode (not the
camera's exposure-to-grab time). aiortc's receive jitter buffer releases a
frame only when the next frame's first packet arrives, so these in-process
viewers add about one frame interval that a browser does not.

Before it measures, a case waits (--settle-s) while the avatar's kernels compile for its view count (on a GPU a
new count's graph compiles while it is first served); its record says how long and in which state it measured.

Where the curve bends: each case also reports, over its measured seconds,
- the sender's frame-loop rate and the frames it handed aiortc per viewer per second ("sent");
- how late the sender's event loop runs (lateness of a 10 ms sleep, p50 / p90 / max);
- CPU, % of one core (benchmarks.probes): the sender's threads (event loop, pipeline, analysis,
  capture, "asyncio" = aiortc's encoder threads with --encoder aiortc, native = torch, OpenCV, ...),
  the encoder process, and each viewer process with its event loop and decoder threads;
- `wall`: "receivers" (the viewers got fewer frames than were sent), "pipeline" (the frame loop runs
  below the source's rate), "encode/send" (frames rendered but not sent) or "none" (the source's rate).
Every thread of the sender that wants the GIL back (after a syscall, a copy or an encode) waits up to
the switch interval while another runs Python; --switch-interval-ms measures that lever.

With --browser, one more case puts headless Chromium on the real page (served
by an in-process receiver) and reads the stamp from each presented frame in
a requestVideoFrameCallback, against the frame's expected display time: the
glass-to-glass figure a user sees, on this host.

Warm-up frames are discarded; latency statistics (benchmarks.common.timing_stats) over all
viewers' frames are reported, with the sender's per-stage milliseconds, in a JSON file of the
benchmarks.common layout (meta: commit, versions, device, host).

    python benchmarks/loopback.py --device cpu --size 256 --browser         # 2-core CPU
    python benchmarks/loopback.py --device cuda --size 512 --source-fps 30 --viewers 1 4 8 16 32   # the curve
    python benchmarks/loopback.py --pipeline tests.fake_pipeline:build_pipeline ...        # streaming cost alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere as `python benchmarks/loopback.py`

from benchmarks.common import document, timing_stats, write_json  # noqa: E402
from benchmarks.probes import CpuMeter, LoopLag, StackSampler  # noqa: E402
from telepresence.stream.framecode import WRAP, read_frame_code  # noqa: E402
from telepresence.stream.viewer import Viewer  # noqa: E402

if TYPE_CHECKING:
    from telepresence.stream.sender import Sender

# The sender side (torch, the pipeline) is imported where it runs: the viewer processes stay light.

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


def sample_stages(sender: "Sender") -> dict[str, float]:
    """The sender's mean ms per stage over the last second, encode averaged over its viewers."""
    _, stages = sender.render_loop.clock.summary()
    encodes = [p.track.encode_ms for p in sender.viewers.values() if p.track.encode_ms is not None]
    if encodes:
        stages["encode"] = float(np.mean(encodes))
    return stages


def median_stages(samples: list[dict[str, float]]) -> dict[str, float]:
    from telepresence.stream.renderloop import PIPELINE_STAGES

    names = [name for name in ("capture", *PIPELINE_STAGES, "encode") if any(name in s for s in samples)]
    return {name: round(float(np.median([s[name] for s in samples if name in s])), 2) for name in names}


def viewer_summary(fps: list[float], latencies_ms: list[float], unreadable: int, frames: int) -> dict[str, Any]:
    """What the viewers measured: fps per viewer, latencies, frames, unreadable stamps."""
    return {
        "fps_per_viewer": {"median": round(float(np.median(fps)), 1), "min": round(min(fps), 1)},
        "latency_ms": timing_stats(latencies_ms),
        "stamps_unreadable": unreadable,
        "frames": frames,
    }


def recorders_summary(recorders: list["FrameRecorder"]) -> dict[str, Any]:
    return viewer_summary([r.fps() for r in recorders], [ms for r in recorders for ms in r.latencies_ms],
                          sum(r.unreadable for r in recorders), sum(len(r.arrivals) for r in recorders))


async def start_viewers(n_viewers: int, size: int, connect: Any, first: int = 0) -> tuple[list["FrameRecorder"], list[Viewer]]:
    """N viewers, each connected (connect(viewer, i)), first frame received and orbiting its own yaw
    (viewer `first + i` of the case)."""
    recorders = [FrameRecorder(size) for _ in range(n_viewers)]
    viewers = [Viewer(on_frame=recorder.on_frame) for recorder in recorders]
    for i, viewer in enumerate(viewers):
        await connect(viewer, i)
    for i, viewer in enumerate(viewers):
        await viewer.next_frame(timeout_s=300)  # the first frame may wait for model load and compilation
        await viewer.wait_channel_open()
        viewer.set_pose(VIEWER_YAWS_DEG[(first + i) % len(VIEWER_YAWS_DEG)], 0.0, 1.0)
    return recorders, viewers


async def viewer_child(args: argparse.Namespace) -> int:
    """--viewer-child: N viewers join ROOM at --signaling and print 'connected'; they record from a line
    'record' on stdin to a line 'stop', then print one JSON line (what they measured, this process's CPU)."""
    recorders, viewers = await start_viewers(args.viewers[0], args.size,
                                             lambda viewer, i: viewer.join(args.signaling, args.room),
                                             first=args.first_viewer)
    loop = asyncio.get_running_loop()
    try:
        print("connected", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # record
        cpu = CpuMeter().start()
        for recorder in recorders:
            recorder.recording = True
        await loop.run_in_executor(None, sys.stdin.readline)  # stop
        for recorder in recorders:
            recorder.recording = False
        usage = cpu.percent()
        print(json.dumps({
            "fps": [r.fps() for r in recorders], "latencies_ms": [ms for r in recorders for ms in r.latencies_ms],
            "unreadable": sum(r.unreadable for r in recorders), "frames": sum(len(r.arrivals) for r in recorders),
            "cpu_percent": usage,
        }), flush=True)
    finally:
        for viewer in viewers:
            await viewer.close()
    return 0


async def tell(children: list[asyncio.subprocess.Process], line: str) -> None:
    for child in children:
        assert child.stdin is not None
        child.stdin.write(line.encode() + b"\n")
        await child.stdin.drain()


async def read_line(child: asyncio.subprocess.Process, what: str, timeout_s: float) -> str:
    assert child.stdout is not None
    line = (await asyncio.wait_for(child.stdout.readline(), timeout_s)).decode().strip()
    if not line:
        raise RuntimeError(f"a viewer process ended (status {await child.wait()}) before {what}")
    return line


async def run_case_process(args: argparse.Namespace, n_viewers: int, pipeline: Any) -> dict[str, Any]:
    """Sender + receiver here, the N viewers in child processes of --viewers-per-process, joining through signaling."""
    from telepresence.stream.capture import open_source
    from telepresence.stream.encoding import shared_pool
    from telepresence.stream.receiver import Receiver, ReceiverConfig
    from telepresence.stream.sender import Sender, SenderConfig
    from telepresence.stream.signaling import RoomLimits

    room = "bench"
    limits = RoomLimits(max_viewers_per_room=max(8, n_viewers), max_viewers_per_ip=max(4, n_viewers),
                        max_connections_per_ip=max(16, n_viewers + 4))  # every viewer comes from this host
    receiver = Receiver(ReceiverConfig(port=0, room=room, web_dir=Path(__file__).resolve().parents[1] / "web",
                                       limits=limits))
    await receiver.start()
    config = SenderConfig(
        signaling_url=receiver.signaling_url, room=room, source=args.source, codec=args.codec,
        encoder=args.encoder, stamp_frames=True, max_viewers=max(8, n_viewers),
    )
    sender = Sender(config, pipeline, source=open_source(args.source, args.source_fps))
    await sender.start()
    signaling = asyncio.ensure_future(sender.run_signaling())
    shares = [min(args.viewers_per_process, n_viewers - first) for first in range(0, n_viewers, args.viewers_per_process)]
    children: list[asyncio.subprocess.Process] = []
    try:
        for first, share in zip(range(0, n_viewers, args.viewers_per_process), shares):
            children.append(await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--viewer-child", "--signaling", receiver.signaling_url,
                "--room", room, "--viewers", str(share), "--first-viewer", str(first), "--size", str(args.size),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            ))
        for child in children:  # one after another: a child's first frame may wait for the pipeline's start
            await read_line(child, "its viewers connected", timeout_s=600)
        await asyncio.sleep(args.warmup)
        settled = await settle(sender, args.settle_s)
        processes = {child.pid: f"viewers {i + 1}" for i, child in enumerate(children)}
        if args.encoder == "process" and shared_pool().pid is not None:
            processes[shared_pool().pid] = "encoder process"
        await tell(children, "record")
        window = await measure_window(sender, args.seconds, processes, tuple(args.stacks))
        await tell(children, "stop")
        measured = [json.loads(await read_line(child, "its results", timeout_s=60)) for child in children]
        for child in children:
            await child.wait()
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
        signaling.cancel()
        await asyncio.gather(signaling, return_exceptions=True)
        await sender.stop()
        await receiver.stop()
    result = {
        "viewers": n_viewers,
        "receiver": "aiortc (own process)" if len(children) == 1 else f"aiortc ({len(children)} own processes)",
        **viewer_summary([fps for m in measured for fps in m["fps"]], [ms for m in measured for ms in m["latencies_ms"]],
                         sum(m["unreadable"] for m in measured), sum(m["frames"] for m in measured)),
        **window,
        **settled,
    }
    result["cpu_percent"]["viewer processes"] = [m["cpu_percent"] for m in measured]
    result["wall"] = wall_of(result, args.source_fps or sender_source_fps(args))
    return result


def sender_source_fps(args: argparse.Namespace) -> float:
    from telepresence.stream.capture import open_source

    with open_source(args.source, args.source_fps) as source:
        return source.fps


async def measure_window(sender: "Sender", seconds: float, processes: dict[int, str],
                         stacks: tuple[str, ...] = ()) -> dict[str, Any]:
    """Over `seconds`: the sender's stages and frame-loop rate, the frames it handed aiortc per viewer per
    second, its event loop's lateness and the CPU of its threads and of `processes` ({pid: name}); with `stacks`
    (thread names), where each of those threads spent the window (benchmarks.probes.StackSampler)."""
    stage_samples: list[dict[str, float]] = []
    sender_fps: list[float] = []
    sent_before = {viewer_id: peer.track.frames_sent for viewer_id, peer in sender.viewers.items()}
    cpu = CpuMeter(processes).start()
    lag = LoopLag().start()
    samplers = [StackSampler(name).start() for name in stacks]
    await sample_loop(sender, seconds, stage_samples, sender_fps)
    loop_lag = await lag.stop()
    usage = cpu.percent(processes)
    sampled = [sampler.stop() for sampler in samplers]
    sent = [(peer.track.frames_sent - sent_before[viewer_id]) / seconds
            for viewer_id, peer in sender.viewers.items() if viewer_id in sent_before]
    return {
        "sender_fps_median": round(float(np.median(sender_fps)), 1) if sender_fps else None,
        "sent_fps_per_viewer": {"median": round(float(np.median(sent)), 1), "min": round(min(sent), 1)} if sent else None,
        "stages_ms_median": median_stages(stage_samples),
        "sender_loop_lag_ms": loop_lag,
        "cpu_percent": usage,
        **({"stacks": sampled} if sampled else {}),
    }


async def settle(sender: "Sender", limit_s: float, poll_s: float = 1.0) -> dict[str, Any]:
    """Wait, at most ``limit_s``, while the sender's frames say the avatar's kernels are compiling (FrameResult.kernels:
    a view count this case's viewers asked for, compiled after it was first served); its seconds and the state it
    ended in, for the case's record. A case that measured during such a compile measured the compile."""
    start = time.perf_counter()
    while sender.render_loop.kernels == "compiling" and time.perf_counter() - start < limit_s:
        await asyncio.sleep(poll_s)
    return {"settle_s": round(time.perf_counter() - start, 1), "kernels_at_measure": sender.render_loop.kernels}


def wall_of(result: dict[str, Any], source_fps: float) -> str:
    """Which side holds the viewers' frame rate down (see the module doc)."""
    received = result["fps_per_viewer"]["median"]
    sent = (result.get("sent_fps_per_viewer") or {}).get("median")
    rendered = result.get("sender_fps_median")
    if received >= 0.95 * source_fps:
        return "none"
    if sent is not None and received < 0.9 * sent:
        return "receivers"
    if rendered is not None and rendered < 0.95 * source_fps:
        return "pipeline"
    return "encode/send"


async def sample_loop(sender: "Sender", seconds: float, stage_samples: list, sender_fps: list) -> None:
    """Once a second for ``seconds``: the sender's per-stage ms and its fps."""
    for _ in range(int(seconds)):
        await asyncio.sleep(1.0)
        stage_samples.append(sample_stages(sender))
        sender_fps.append(sender.render_loop.clock.summary()[0])


async def run_case(args: argparse.Namespace, n_viewers: int, pipeline: Any) -> dict[str, Any]:
    from telepresence.stream.capture import open_source
    from telepresence.stream.encoding import shared_pool
    from telepresence.stream.sender import Sender, SenderConfig

    config = SenderConfig(
        source=args.source, codec=args.codec, encoder=args.encoder, stamp_frames=True, max_viewers=max(8, n_viewers),
    )
    sender = Sender(config, pipeline, source=open_source(args.source, args.source_fps))
    await sender.start()
    viewers: list[Viewer] = []
    try:
        recorders, viewers = await start_viewers(n_viewers, args.size,
                                                 lambda viewer, i: viewer.connect(sender, f"bench{i}"))
        await asyncio.sleep(args.warmup)
        settled = await settle(sender, args.settle_s)
        for recorder in recorders:
            recorder.recording = True
        pid = shared_pool().pid if args.encoder == "process" else None
        window = await measure_window(sender, args.seconds, {} if pid is None else {pid: "encoder process"},
                                      tuple(args.stacks))
        for recorder in recorders:
            recorder.recording = False
    finally:
        for viewer in viewers:
            await viewer.close()
        await sender.stop()
    result = {"viewers": n_viewers, "receiver": "aiortc (same process)", **recorders_summary(recorders), **window, **settled}
    result["wall"] = wall_of(result, args.source_fps or sender_source_fps(args))
    return result


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

    from telepresence.stream.capture import open_source
    from telepresence.stream.receiver import Receiver, ReceiverConfig
    from telepresence.stream.sender import Sender, SenderConfig

    receiver = Receiver(ReceiverConfig(port=0, web_dir=Path(__file__).resolve().parents[1] / "web"))
    await receiver.start()
    config = SenderConfig(
        signaling_url=receiver.signaling_url, source=args.source,
        codec=args.codec, encoder=args.encoder, stamp_frames=True,
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
    parser.add_argument("--encoder", choices=("process", "aiortc"), default="process",
                        help="the viewers' frames encoded in the encoder process (the sender's default) or by aiortc here")
    parser.add_argument("--pipeline", default=None,
                        help="'module:function' making a stand-in pipeline (default: the product's)")
    parser.add_argument("--pipeline-process", action="store_true",
                        help="the pipeline in a process of its own, as `send --pipeline-process` and serve run it")
    parser.add_argument("--refiner", default="default", help="PATH | default | none")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="the appearance memory on or off (send --memory; default: PipelineConfig.memory's, the product's)")
    parser.add_argument("--compile-avatar", default="wait", choices=("wait", "prefill", "background", "off"),
                        help="the avatar's torch.compile on CUDA (PipelineConfig.compile_avatar): wait (default: compiled at the first face, "
                        "so the timed frames run the compiled graphs a sender reaches after its compile), prefill (the "
                        "product's: a child process first), background or off")
    parser.add_argument("--compile-refiner", action="store_true", help="torch.compile the refiner (as send --compile-refiner)")
    parser.add_argument("--stacks", nargs="*", default=[], metavar="THREAD",
                        help="sample these sender threads' Python stacks while measuring (e.g. pipeline analysis): "
                             "where their wall time goes, in the JSON and printed")
    parser.add_argument("--precompiled-avatar", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the avatar's compiled functions whole and load them (send --precompiled-avatar; "
                        "default: PipelineConfig.precompiled_avatar's, the product's)")
    parser.add_argument("--settle-s", type=float, default=300.0,
                        help="after the warm-up, wait up to this long while the avatar's kernels compile (a view count this "
                             "case's viewers asked for: models.avatar.engine.graph_views) before measuring; 0 measures "
                             "during such a compile, what viewers see right after they join")
    parser.add_argument("--browser", action="store_true", help="add a case with headless Chromium on the real page")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium binary for --browser")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/loopback_<device>_<size>.json)")
    parser.add_argument("--viewers-in", choices=("process", "same"), default="process",
                        help="aiortc viewers in child processes (like remote browsers; default) or in this process")
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="the sender process's GIL switch interval (Python's default: 5 ms), a lever to measure")
    parser.add_argument("--viewers-per-process", type=int, default=4,
                        help="viewers in each child process (one process's event loop takes a few dozen streams at most)")
    parser.add_argument("--viewer-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--first-viewer", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--signaling", help=argparse.SUPPRESS)
    parser.add_argument("--room", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (512 if args.device.startswith("cuda") else 256)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.viewer_child:
        return asyncio.run(viewer_child(args))
    if args.viewers_per_process < 1:
        parser.error(f"--viewers-per-process: expected >= 1, got {args.viewers_per_process}")
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)

    from models.runinfo import run_metadata
    from telepresence.pipeline import PipelineConfig, open_pipeline

    if args.memory is None:
        args.memory = PipelineConfig.memory  # the product's default, recorded as such
    if args.precompiled_avatar is None:  # the product's default (None: on where the avatar compiles), recorded as such
        args.precompiled_avatar = PipelineConfig.precompiled_avatar
    try:
        pipeline_config = PipelineConfig(device=args.device, size=args.size,
                                         refiner=None if args.refiner == "none" else args.refiner,
                                         compile_refiner=args.compile_refiner, compile_avatar=args.compile_avatar,
                                         precompiled_avatar=args.precompiled_avatar,
                                         memory=args.memory)
        if args.pipeline_process:
            from telepresence.stream.worker import open_pipeline_process

            # --compile-avatar wait compiles at its first frame there, saying "busy" meanwhile (worker.py)
            pipeline = open_pipeline_process(pipeline_config, args.pipeline, name="loopback", start_timeout_s=900)
        else:
            pipeline = open_pipeline(pipeline_config, factory=args.pipeline)
    except Exception as error:
        print(f"error: {error}\n(to measure the streaming path alone: --pipeline tests.fake_pipeline:build_pipeline)", file=sys.stderr)
        return 1

    config = {k: v for k, v in vars(args).items() if k not in ("out", "viewer_child", "signaling", "room", "first_viewer")}
    out = args.out or Path(__file__).resolve().parent / "results" / f"loopback_{args.device.split(':')[0]}_{args.size}.json"
    meta = run_metadata(args.device, benchmark="loopback")
    results = []
    for n in args.viewers:
        print(f"running {n} viewer(s): {args.warmup:.0f} s warm-up + {args.seconds:.0f} s ...", flush=True)
        case = run_case_process if args.viewers_in == "process" else run_case
        results.append(asyncio.run(case(args, n, pipeline)))
        # --precompiled-avatar: what the store loaded, saved or compiled the usual way during this case (in process)
        events = pipeline.precompiled_events() if hasattr(pipeline, "precompiled_events") else None
        if events is not None:
            results[-1]["precompiled"] = events[sum(len(r.get("precompiled", [])) for r in results[:-1]):]
        engine = getattr(pipeline, "engine", None)  # in process: the raster capacities compiled in (build, by views)
        if engine is not None:
            build, render = engine.capacities()
            results[-1]["raster_capacities"] = {"build": build, "render": {str(n): c for n, c in sorted(render.items())}}
        r = results[-1]  # written after every case: a run stopped by a time limit keeps the cases it finished
        write_json(out, document(meta, config, results))
        print(f"  {n} viewer(s): {r['fps_per_viewer']['median']:.1f} fps each, p50 {r['latency_ms']['median']} ms"
              + (f" (settled {r['settle_s']} s, {r['kernels_at_measure']})" if "settle_s" in r else ""), flush=True)
        for sampled in r.get("stacks", []):
            print(f"    {sampled['thread']} thread, {sampled['samples']} samples: "
                  + "; ".join(f"{where} {share}%" for where, share in sampled["mine"].items()), flush=True)
    if args.browser:
        print(f"running 1 Chromium viewer: {args.warmup:.0f} s warm-up + {args.seconds:.0f} s ...", flush=True)
        results.append(asyncio.run(run_browser_case(args, pipeline)))
    if args.pipeline_process:
        pipeline.close()  # its process ends with it

    write_json(out, document(meta, config, results))

    print(f"\nloopback, {args.pipeline}, {args.device}, {args.size}x{args.size}, {args.codec}, encoder: {args.encoder}")
    print(f"{'receiver':>22} {'viewers':>7} {'fps/viewer':>10} {'sent':>5} {'loop':>5} {'latency p50':>11} {'p90':>7}"
          f"  {'wall':>11}  stages ms (median)")
    for r in results:
        stages = " ".join(f"{k}={v:g}" for k, v in r["stages_ms_median"].items())
        lat, sent = r["latency_ms"], (r.get("sent_fps_per_viewer") or {}).get("median")
        print(f"{r['receiver']:>22} {r['viewers']:>7} {r['fps_per_viewer']['median']:>10.1f} {sent or float('nan'):>5.1f}"
              f" {r.get('sender_fps_median') or float('nan'):>5.1f} {lat['median'] or float('nan'):>9.1f}ms"
              f" {lat['p90'] or float('nan'):>5.1f}ms  {r.get('wall', ''):>11}  {stages}")
        if r.get("cpu_percent"):
            cpu = {k: v for k, v in r["cpu_percent"].items() if k != "viewer processes"}
            viewers = r["cpu_percent"].get("viewer processes") or []
            loops = [v.get("event loop", 0.0) for v in viewers]
            print(f"{'':>22} cpu % of a core: " + ", ".join(f"{k} {v:g}" for k, v in cpu.items())
                  + (f"; viewer processes' event loops max {max(loops):g}" if loops else "")
                  + f"; sender loop lag p90 {r['sender_loop_lag_ms']['p90']} ms")
        if r.get("precompiled"):  # --precompiled-avatar: what this case loaded or compiled
            print(f"{'':>22} precompiled: " + ", ".join(
                f"{e['function']} {e['what']}" + (f" ({e['s']:g} s)" if e["s"] is not None else "")
                for e in r["precompiled"]))
        caps = r.get("raster_capacities")
        if caps and caps["build"] is not None:  # fixed shapes (CUDA): the capacities compiled in
            print(f"{'':>22} raster capacity: build {caps['build']}, render " +
                  ", ".join(f"{n} views {c}" for n, c in caps["render"].items()))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    from models.avatar.compiling import leave

    sys.exit(leave(main()))  # a case may end during the avatar's background compile
