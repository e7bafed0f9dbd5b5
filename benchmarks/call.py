"""The call benchmark: N participants, each watching the N - 1 others; frames per second received and
glass-to-glass latency, per participant.

The call server (`telepresence serve`'s Receiver + CallHost) runs in this process, and each
participant's pipeline (face analysis, avatar, render, refine) in a process of its own, as in the
product (telepresence.stream.worker); each participant runs in a child process of its own, as a browser would
(telepresence.stream.participant.CallParticipant: it joins through signaling, publishes a clip as
its camera and watches every other avatar). Each camera frame carries its capture time in its
corner (telepresence.stream.framecode); the server reads it back as the frame's capture time and
paints it into every avatar view made from that frame (`--stamp-frames`), and each participant
reads it from the decoded frame of the others, so

    latency = t_decoded_at_the_watcher - t_captured_at_the_watched_camera

covers the uplink (encode, network, decode), face analysis, avatar, render, refine, the downlink
(encode, network, jitter buffer, decode) on one host's clock. aiortc's receive jitter buffer releases
a frame only when the next one's first packet arrives, so these Python watchers add about one frame
interval that a browser does not.

Warm-up: every participant must have received frames from all the others, then --warmup seconds
pass; then --seconds are recorded by all at once. JSON in the benchmarks.common layout.

    python benchmarks/call.py --device cpu --size 256 --participants 2                 # 2-core CPU floor: 8 fps each
    python benchmarks/call.py --device cuda --size 512 --participants 4                # GPU floor: 30 fps, p50 <= 150 ms
    python benchmarks/call.py --pipeline tests.fake_pipeline:build_pipeline ...        # the streaming path alone
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere as `python benchmarks/call.py`

from benchmarks.common import document, timing_stats, write_json  # noqa: E402
from benchmarks.probes import CpuMeter  # noqa: E402
from models.runinfo import run_metadata  # noqa: E402
from telepresence.pipeline import PipelineConfig  # noqa: E402
from telepresence.stream.capture import open_source  # noqa: E402
from telepresence.stream.encoding import shared_pool  # noqa: E402
from telepresence.stream.framecode import WRAP, read_frame_code  # noqa: E402
from telepresence.stream.renderloop import PIPELINE_STAGES  # noqa: E402
from telepresence.stream.worker import WorkerError, open_pipeline_process  # noqa: E402

ROOM = "bench"
FLOORS = {"cpu": {"size": 256, "participants": 2, "fps": 8.0, "p50_ms": None},
          "cuda": {"size": 512, "participants": 4, "fps": 30.0, "p50_ms": 150.0}}
"""The issue's floors (#16): what each participant must receive, by device."""


# -- one participant (child process) ----------------------------------------------------------------


LEAVE_TIMEOUT_S = 15.0


class Recorder:
    """One participant's decoded frames of each other participant, while recording."""

    def __init__(self) -> None:
        self.recording = False
        self.arrivals: dict[str, list[float]] = collections.defaultdict(list)
        self.latencies_ms: dict[str, list[float]] = collections.defaultdict(list)
        self.unreadable = 0
        self.seen: collections.Counter = collections.Counter()

    def on_frame(self, sender_id: str, frame: Any, t_received: float) -> None:
        self.seen[sender_id] += 1
        if not self.recording:
            return
        self.arrivals[sender_id].append(t_received)
        plane = frame.planes[0]  # yuv420p luma: no colour conversion on the hot path
        luma = np.frombuffer(plane, np.uint8).reshape(frame.height, plane.line_size)
        stamp = read_frame_code(luma, size=min(frame.width, frame.height))
        if stamp is None:
            self.unreadable += 1
            return
        self.latencies_ms[sender_id].append(float((int(t_received * 1e3) - stamp) % WRAP))

    def summary(self, names: dict[str, str]) -> dict[str, Any]:
        per_sender = {}
        for sender_id, arrivals in self.arrivals.items():
            fps = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
            per_sender[names.get(sender_id, sender_id)] = {
                "fps": round(fps, 1), "latency_ms": timing_stats(self.latencies_ms[sender_id]), "frames": len(arrivals)}
        fps = [s["fps"] for s in per_sender.values()] or [0.0]
        return {
            "fps_received": {"median": round(float(np.median(fps)), 1), "min": round(min(fps), 1)},
            "latency_ms": timing_stats([ms for values in self.latencies_ms.values() for ms in values]),
            "stamps_unreadable": self.unreadable,
            "per_watched": per_sender,
        }


async def participant_child(args: argparse.Namespace) -> int:
    """--participant-child: join, wait for the others, print 'ready'; on 'go' (stdin) warm up, record,
    print one JSON line."""
    from telepresence.stream.participant import CallParticipant

    recorder = Recorder()
    participant = CallParticipant(open_source(args.source, args.source_fps), args.name, stamp=True,
                                  on_frame=recorder.on_frame)
    loop = asyncio.get_running_loop()
    try:
        await participant.join(args.signaling, ROOM, timeout_s=300)
        others = args.participants - 1
        while sum(1 for sender_id in participant.viewers if recorder.seen[sender_id] > 0) < others:
            await asyncio.sleep(0.2)  # the first frames may wait for the others' pipelines to load
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # "go"
        await asyncio.sleep(args.warmup)
        recorder.recording = True
        await asyncio.sleep(args.seconds)
        recorder.recording = False
        # The result first: leaving closes peer connections, which aiortc can take long over.
        print(json.dumps({"name": args.name, **recorder.summary(participant.names)}), flush=True)
    finally:
        try:
            await asyncio.wait_for(participant.leave(), LEAVE_TIMEOUT_S)
        except asyncio.TimeoutError:
            print(f"{args.name}: leaving took over {LEAVE_TIMEOUT_S:g} s; exiting", file=sys.stderr, flush=True)
    return 0


# -- the server and the run (this process) --------------------------------------------------------


def sample_stages(host: Any, received: dict[str, tuple[float, int]]) -> dict[str, dict[str, float]]:
    """Each participant's mean ms per stage over the last second (encode: averaged over its watchers), fps,
    and `uplink`: camera frames a second that reached the server since the last sample (`received` keeps
    each one's count and time). The stages are timed in the participant's process; the rest in this one."""
    out = {}
    for participant in host.participants.values():
        sender = participant.sender
        if sender is None or sender.render_loop is None:
            continue
        fps, stages = sender.render_loop.clock.summary()
        now, count = time.monotonic(), participant.source.frames_received
        if participant.name in received:
            then, before = received[participant.name]
            stages["uplink"] = (count - before) / max(1e-3, now - then)
        received[participant.name] = (now, count)
        encodes = [p.track.encode_ms for p in sender.viewers.values() if p.track.encode_ms is not None]
        if encodes:
            stages["encode"] = float(np.mean(encodes))
        out[participant.name] = {"fps": fps, **stages}
    return out


def pipeline_path(pipeline: Any) -> dict[str, Any]:
    """What a participant's pipeline ran on (asked of its process: blocking, up to one frame): its class,
    device, refiner, whether the avatar replays CUDA graphs (or fell back to eager after a failed
    capture); `process`: the pipeline ran in a process of its own (telepresence.stream.worker)."""
    return {"process": True, **pipeline.describe()}


def median_stages(samples: list[dict[str, float]]) -> dict[str, float]:
    names = [name for name in ("uplink", "fps", "capture", *PIPELINE_STAGES, "encode") if any(name in s for s in samples)]
    return {name: round(float(np.median([s[name] for s in samples if name in s])), 2) for name in names}


async def run(args: argparse.Namespace, loads: list[float], cpu_percent: dict[str, float]) -> list[dict[str, Any]]:
    """The call; each result gets the server's view of that participant ("server": fps and stages,
    "path": its pipeline). `loads` receives the 1-minute load average once a second while recording,
    `cpu_percent` where the host's cores went meanwhile (benchmarks.probes.CpuMeter: the server's
    threads, each pipeline process, the encoder process, each participant's client)."""
    from telepresence.stream.call import CallConfig, CallHost
    from telepresence.stream.receiver import Receiver, ReceiverConfig
    from telepresence.stream.sender import SenderConfig
    from telepresence.stream.signaling import RoomLimits

    n = args.participants
    limits = RoomLimits(max_senders_per_room=max(4, n), max_viewers_per_room=max(8, n), max_viewers_per_ip=max(4, n),
                        max_connections_per_ip=max(16, 3 * n))
    if args.memory is None:
        args.memory = PipelineConfig.memory  # the product's default, recorded as such
    pipeline = PipelineConfig(device=args.device, size=args.size, refiner=None if args.refiner == "none" else args.refiner,
                              compile_avatar=args.compile_avatar, memory=args.memory)
    host = CallHost(CallConfig(sender=SenderConfig(source="uplink", codec=args.codec, stamp_frames=True, max_viewers=max(8, n)),
                               pipeline=pipeline, pipeline_factory=args.pipeline, max_participants=n, mps=args.mps,
                               camera_rate=args.camera_rate, gpus=args.gpus))
    receiver = Receiver(ReceiverConfig(port=0, room=ROOM, web_dir=Path(__file__).resolve().parents[1] / "web", limits=limits),
                        cameras=host)
    host.attach(receiver.signaling)
    await receiver.start()
    children = []
    samples: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    measured = []
    paths: dict[str, dict[str, Any]] = {}  # sampled while recording: the participants leave right after
    received: dict[str, tuple[float, int]] = {}
    try:
        for i in range(n):
            children.append(await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--participant-child", "--signaling", receiver.signaling_url,
                "--name", f"p{i + 1}", "--participants", str(n), "--source", args.source,
                *(["--source-fps", str(args.source_fps)] if args.source_fps else []),
                "--warmup", str(args.warmup), "--seconds", str(args.seconds),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE))
            await asyncio.sleep(0.5)  # one at a time, as people join
        for child in children:
            line = (await asyncio.wait_for(child.stdout.readline(), 600)).decode().strip()
            if line != "ready":
                raise RuntimeError(f"a participant did not get ready: {line!r}")
        print(f"{n} participants in the call; {args.warmup:.0f} s warm-up + {args.seconds:.0f} s ...", flush=True)
        for child in children:
            child.stdin.write(b"go\n")
            await child.stdin.drain()
        await asyncio.sleep(args.warmup)
        names = {child.pid: f"client {i + 1}" for i, child in enumerate(children)}
        names.update({p.pipeline.pid: f"pipeline {p.name}" for p in host.participants.values()
                      if getattr(p.pipeline, "pid", None) is not None})
        if shared_pool().pid is not None:
            names[shared_pool().pid] = "encoder process"
        cpu = CpuMeter(names).start()
        end = time.monotonic() + args.seconds  # the clients' window: the samples below must not stretch it
        while (left := end - time.monotonic()) > 0.05:
            await asyncio.sleep(min(1.0, left))
            loads.append(os.getloadavg()[0])
            cpu.sample()
            for name, stages in sample_stages(host, received).items():
                samples[name].append(stages)
            for p in list(host.participants.values()):
                with contextlib.suppress(WorkerError):  # it left meanwhile
                    paths[p.name] = await asyncio.get_running_loop().run_in_executor(None, pipeline_path, p.pipeline)
        cpu_percent.update(cpu.percent(names))
        for child in children:
            line = (await asyncio.wait_for(child.stdout.readline(), 120)).decode().strip()
            measured.append(json.loads(line))
            await child.wait()
    finally:
        for child in children:
            if child.returncode is None:
                child.kill()
                await child.wait()
        await host.close()
        await receiver.stop()
    for result in measured:
        result["server"] = median_stages(samples.get(result["name"], []))
        result["path"] = paths.get(result["name"])
        if result["path"] is not None and host.gpu_sharing is not None:
            result["path"]["gpu_sharing"] = host.gpu_sharing
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, choices=(256, 512), default=None, help="default: 512 on cuda, 256 on cpu")
    parser.add_argument("--participants", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds discarded once everyone sees everyone")
    parser.add_argument("--source", default="sample", help="each participant's camera (capture.open_source spelling)")
    parser.add_argument("--source-fps", type=float, default=None, help="pace the camera (the sample clip is 25 fps)")
    parser.add_argument("--codec", choices=("vp8", "h264"), default="vp8")
    parser.add_argument("--mps", action=argparse.BooleanOptionalAction, default=True,
                        help="on a GPU, the pipelines side by side through CUDA MPS, as `telepresence serve` (the default)")
    parser.add_argument("--gpus", type=int, default=None, metavar="N",
                        help="spread the participants' pipelines over N GPUs, as `telepresence serve --gpus` (default: every GPU)")
    parser.add_argument("--camera-rate", action=argparse.BooleanOptionalAction, default=True,
                        help="the server asks each camera for the frames its pipeline uses, as `telepresence serve` (the default)")
    parser.add_argument("--pipeline", default=None, help="'module:function' making a stand-in pipeline (default: the product's)")
    parser.add_argument("--refiner", default="default", help="PATH | default | none")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="the appearance memory on or off (send --memory; default: PipelineConfig.memory's, the product's)")
    parser.add_argument("--compile-avatar", default="wait", choices=("wait", "prefill", "background", "off"),
                        help="the avatar's torch.compile on CUDA (PipelineConfig.compile_avatar): wait (default: compiled at the first face, "
                        "so the timed frames run the compiled graphs a sender reaches after its compile), prefill (the product's: a "
                        "child process compiles while the plain graphs serve; each participant's \"path\" says where its compile stands), "
                        "background or off")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/call_<device>_<size>_<N>p[_fake].json)")
    parser.add_argument("--participant-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--signaling", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (512 if args.device.startswith("cuda") else 256)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.participant_child:
        return asyncio.run(participant_child(args))
    try:  # fail here, with one line, rather than in every participant's publish (and start the fork server)
        open_pipeline_process(PipelineConfig(device=args.device, size=args.size, refiner=None if args.refiner == "none" else args.refiner),
                              factory=args.pipeline, name="check").close()
    except Exception as error:
        print(f"error: {error}\n(to measure the streaming path alone: --pipeline tests.fake_pipeline:build_pipeline)", file=sys.stderr)
        return 1

    t0 = time.monotonic()
    load_start, loads, cpu_percent = [round(x, 2) for x in os.getloadavg()], [], {}
    results = asyncio.run(run(args, loads, cpu_percent))
    kind = args.device.split(":")[0]
    floor = FLOORS.get(kind, {})
    applies = floor.get("size") == args.size and floor.get("participants") == args.participants
    for r in results:
        p50 = r["latency_ms"]["median"]
        r["meets_floor"] = None if not applies else bool(
            r["fps_received"]["min"] >= floor["fps"] and (floor["p50_ms"] is None or (p50 is not None and p50 <= floor["p50_ms"])))
    config = {k: v for k, v in vars(args).items() if k not in ("out", "participant_child", "signaling", "name")}
    config["floor"] = floor if applies else None
    suffix = "" if args.pipeline is None else "_fake"
    out = args.out or Path(__file__).resolve().parent / "results" / f"call_{kind}_{args.size}_{args.participants}p{suffix}.json"
    load = {"start": load_start, "recording_1min_median": round(float(np.median(loads)), 2) if loads else None,
            "cpu_count": os.cpu_count(), "cpu_percent": cpu_percent}
    write_json(out, document(run_metadata(args.device, benchmark="call", wall_s=round(time.monotonic() - t0, 1), load=load),
                             config, results))

    print(f"\ncall, {args.pipeline or 'telepresence.pipeline'}, {args.device}, {args.size}x{args.size}, "
          f"{args.participants} participants, {args.codec}")
    print(f"{'who':>5} {'fps recv (min)':>15} {'latency p50':>12} {'p90':>8}  server: camera frames in (uplink, fps), its pipeline's fps and stages ms (median)")
    for r in results:
        lat = r["latency_ms"]
        server = " ".join(f"{k}={v:g}" for k, v in r["server"].items())
        print(f"{r['name']:>5} {r['fps_received']['median']:>8.1f} ({r['fps_received']['min']:.1f})"
              f" {lat['median'] or float('nan'):>10.1f}ms {lat['p90'] or float('nan'):>6.1f}ms  {server}")
    paths = {json.dumps(r["path"], sort_keys=True) for r in results}
    print("path: " + "; ".join(sorted(paths)))
    print(f"load average (1 min) while recording: {load['recording_1min_median']} on {os.cpu_count()} CPUs")
    print("cpu, % of one core while recording: " + ", ".join(f"{k} {v:g}" for k, v in cpu_percent.items()))
    if applies:
        print(f"floor ({floor['fps']:g} fps each" + (f", p50 <= {floor['p50_ms']:g} ms" if floor["p50_ms"] else "") + "): "
              + ("met" if all(r["meets_floor"] for r in results) else "NOT met"))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
