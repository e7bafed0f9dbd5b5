"""Soak: a receiver, a sender and N aiortc viewers, each in its own process, for a given time.

Every --sample-s (30 s) the RSS, open file descriptors and threads of every process are read
from /proc/PID, with the frame rate each viewer receives and the sender's own frame rate (from
the stats it sends its viewers). With --churn, one more process makes viewers join and leave
every few seconds and, every sixth time, bursts offers at the sender from one socket. At the end:
memory change after warm-up, descriptor drift, fps, tracebacks in each process's log, as JSON
beside a PNG of the four series (OpenCV, models.evaluation.figures).

    python benchmarks/soak.py --minutes 60 --size 256 --viewers 2 --churn --pipeline none   # real pipeline (CPU)
    python benchmarks/soak.py --minutes 60 --device cuda --size 512 --viewers 4 --churn --pipeline none  # GPU
    python benchmarks/soak.py --minutes 3 --pipeline tests.fake_pipeline --churn            # the streaming path alone

--pipeline tests.fake_pipeline (the default) measures the streaming path alone; --pipeline none
runs the product's pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere as `python benchmarks/soak.py`

ROOM = "soak"
READY = re.compile(r"Open (http://\S+)")
PIPELINE_PID = re.compile(r"the pipeline runs in process (\d+)")  # send --pipeline-process says so


# -- child processes: a viewer, and the churn --------------------------------------------------------


def report(**fields: Any) -> None:
    print(json.dumps({"t": round(time.time(), 3), **fields}), flush=True)


async def viewer_child(args: argparse.Namespace) -> None:
    """One long-lived viewer: orbits slowly, rejoins if its call dies, reports every sample period."""
    from telepresence.stream.viewer import Viewer, ViewerError

    frames = 0
    reconnects = 0

    def on_frame(frame: Any, t_received: float) -> None:
        nonlocal frames
        frames += 1

    while True:
        viewer = Viewer(on_frame=on_frame)
        try:
            await viewer.join(args.signaling, ROOM, timeout_s=60)
            last_frames, last_t, t_report, t_pose = frames, time.monotonic(), time.monotonic(), 0.0
            while True:
                await asyncio.sleep(0.5)
                now = time.monotonic()
                if now - t_pose > 1.0:
                    t_pose = now
                    viewer.set_pose(30 * math.sin(now / 7), 10 * math.sin(now / 11), 1.0)
                if frames != last_frames:
                    last_frames, last_t = frames, now
                elif now - last_t > 15:
                    raise ViewerError("no frame for 15 s")
                if now - t_report >= args.sample_s:
                    report(frames=frames, reconnects=reconnects, sender_fps=viewer.stats.fps if viewer.stats else None,
                           status=viewer.status)
                    t_report = now
        except Exception as error:  # whatever ended this call (declined, no frames, signaling gone): join again
            reconnects += 1
            print(f"viewer: {type(error).__name__}: {error}; rejoining", file=sys.stderr, flush=True)
            await asyncio.sleep(2.0)
        finally:
            await viewer.close()


async def churn_child(args: argparse.Namespace) -> None:
    """Viewers that join, watch a few seconds and leave, every --churn-every s; every sixth round,
    a burst of 10 offers from one socket."""
    import websockets

    from telepresence.stream.viewer import Viewer

    counts = {"joins": 0, "join_failures": 0, "bursts": 0, "burst_answers": 0, "burst_declines": 0}
    t_report = time.monotonic()
    for round_ in range(1_000_000):
        await asyncio.sleep(args.churn_every * random.uniform(0.6, 1.4))
        if round_ % 6 == 5:
            probe = Viewer()
            offer = await probe.create_offer()
            await probe.close()
            try:
                async with websockets.connect(args.signaling, compression=None, max_size=2**20) as ws:
                    await ws.send(json.dumps({"type": "join", "room": ROOM, "role": "viewer", "name": "burst"}))
                    joined = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    senders = [p["id"] for p in joined.get("peers", []) if p["role"] == "sender"]
                    for _ in range(10 if senders else 0):
                        await ws.send(json.dumps({"type": "offer", "to": senders[0], "sdp": offer}))
                    deadline = time.monotonic() + 8
                    while time.monotonic() < deadline:
                        try:
                            message = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
                        except asyncio.TimeoutError:
                            break
                        counts["burst_answers"] += message["type"] == "answer"
                        counts["burst_declines"] += message["type"] == "decline"
                counts["bursts"] += 1
            except (OSError, asyncio.TimeoutError, websockets.exceptions.WebSocketException) as error:
                print(f"churn burst: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        else:
            viewer = Viewer()
            try:
                await viewer.join(args.signaling, ROOM, timeout_s=30)
                await viewer.next_frame(timeout_s=30)
                await asyncio.sleep(random.uniform(1.0, 4.0))
                counts["joins"] += 1
            except Exception as error:  # counted and reported; the churn goes on
                counts["join_failures"] += 1
                print(f"churn viewer: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            finally:
                await viewer.close()
        if time.monotonic() - t_report >= args.sample_s:
            report(**counts)
            t_report = time.monotonic()


# -- the parent: start, sample, stop, summarise ------------------------------------------------------


def proc_stats(pid: int) -> dict[str, Optional[float]]:
    """RSS (MB), open descriptors and threads of process PID, from /proc (None each once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, AttributeError):
        return {"rss_mb": None, "fds": None, "threads": None}
    return {"rss_mb": round(rss_kb / 1024, 1), "fds": fds, "threads": threads}


class Child:
    """A process of the soak, its log file, and its last JSON report line."""

    def __init__(self, name: str, argv: list[str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "w")
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # the repo, then the caller's
        self.popen = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env={**os.environ, "PYTHONPATH": path})
        self.lines: collections.deque[str] = collections.deque(maxlen=2000)
        self.reports: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line)
            self.log.write(line)
            self.log.flush()
            if line.startswith('{"t"'):
                try:
                    self.reports.append(json.loads(line))
                except json.JSONDecodeError:
                    pass

    def wait_for(self, pattern: re.Pattern, timeout_s: float) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := pattern.search(line):
                    return match
            if self.popen.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: {pattern.pattern!r} not seen; see {self.log_path}")

    def proc(self) -> dict[str, Optional[float]]:
        """RSS (MB), open descriptors and threads, from /proc/PID."""
        return proc_stats(self.popen.pid)

    def stop(self) -> Optional[int]:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._thread.join(timeout=5)
        self.log.close()
        return self.popen.returncode


def gpu_used_mb() -> Optional[float]:
    """The GPU's memory in use (MB, every process on it: nvidia-smi; a container hides the processes' own
    figures), None without nvidia-smi."""
    try:
        text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10).stdout
        return float(sum(float(line) for line in text.split()))
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def window_fps(reports: list[dict[str, Any]]) -> Optional[float]:
    """Frames per second between a viewer's last two reports."""
    if len(reports) < 2:
        return None
    a, b = reports[-2], reports[-1]
    return round((b["frames"] - a["frames"]) / max(1e-6, b["t"] - a["t"]), 1)


def summarise(samples: list[dict[str, Any]], warmup_s: float, logs: dict[str, Path]) -> dict[str, Any]:
    """Per process: RSS after warm-up -> end (change in %), descriptors and threads (first, last, max),
    fps (median, min); tracebacks and error lines in each log."""
    import numpy as np

    out: dict[str, Any] = {}
    names = sorted({name for s in samples for name in s["processes"]})
    for name in names:
        series = [(s["t_s"], s["processes"][name]) for s in samples if name in s["processes"]]
        after = [p for t, p in series if t >= warmup_s and p["rss_mb"] is not None] or [p for _, p in series if p["rss_mb"]]
        entry: dict[str, Any] = {}
        if after:
            rss = [p["rss_mb"] for p in after]
            entry["rss_mb"] = {"after_warmup": rss[0], "end": rss[-1], "max": max(rss),
                               "change_pct": round(100 * (rss[-1] - rss[0]) / rss[0], 1)}
            for key in ("fds", "threads"):
                values = [p[key] for p in after]
                entry[key] = {"after_warmup": values[0], "end": values[-1], "max": max(values)}
        fps = [p["fps"] for _, p in series if p.get("fps") is not None]
        if fps:
            entry["fps"] = {"median": round(float(np.median(fps)), 1), "min": min(fps), "max": max(fps)}
        out[name] = entry
    gpu = [(s["t_s"], s["gpu_used_mb"]) for s in samples if s.get("gpu_used_mb") is not None]
    if gpu:
        after = [v for t, v in gpu if t >= warmup_s] or [v for _, v in gpu]
        out["gpu"] = {"used_mb": {"after_warmup": after[0], "end": after[-1], "max": max(after),
                                  "change_pct": round(100 * (after[-1] - after[0]) / after[0], 1)}}
    for name, path in logs.items():
        text = path.read_text(errors="replace") if path.exists() else ""
        out.setdefault(name, {})["log"] = {"tracebacks": text.count("Traceback"),
                                           "error_lines": sum(" ERROR " in line for line in text.splitlines())}
    return out


def plot(samples: list[dict[str, Any]], title: str, path: Path) -> None:
    """Four panels over time (minutes): RSS, open descriptors, threads, fps, one colour per process; a fifth with
    the GPU's memory in use when it was sampled."""
    import numpy as np

    from models.evaluation.figures import Series, save_png, scatter_plot

    names = sorted({name for s in samples for name in s["processes"]})
    panels = []
    for key, label in (("rss_mb", "RSS (MB)"), ("fds", "open file descriptors"), ("threads", "threads"), ("fps", "fps")):
        series = []
        for name in names:  # every process in every panel, so each keeps its colour
            points = [(s["t_s"] / 60, s["processes"][name].get(key)) for s in samples if name in s["processes"]]
            x = np.array([t for t, v in points], np.float64)
            y = np.array([np.nan if v is None else v for t, v in points], np.float64)
            series.append(Series(name, x, y))
        if any(np.isfinite(s.y).any() for s in series):
            panels.append(scatter_plot(series, f"{title}: {label}", "minutes", label, size=(900, 320)))
    gpu = [(s["t_s"] / 60, s["gpu_used_mb"]) for s in samples if s.get("gpu_used_mb") is not None]
    if gpu:
        x, y = (np.array(v, np.float64) for v in zip(*gpu))
        panels.append(scatter_plot([Series("GPU", x, y)], f"{title}: GPU memory in use (MB)", "minutes", "MB",
                                   size=(900, 320)))
    save_png(path, np.concatenate(panels, axis=0), palette=True)


def run_soak(args: argparse.Namespace) -> int:
    from benchmarks.common import document, write_json
    from models.runinfo import run_metadata

    tag = f"soak_{args.device.split(':')[0]}_{args.size}"
    out = args.out or ROOT / "benchmarks" / "results" / f"{tag}.json"
    log_dir = out.with_suffix("").parent / f"{out.stem}_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    signaling = f"ws://127.0.0.1:{port}/ws"
    pipeline = [] if args.pipeline == "none" else ["--pipeline", args.pipeline]
    if args.pipeline_process:
        pipeline.append("--pipeline-process")
    if args.memory is not None:  # else the sender's default
        pipeline.append("--memory" if args.memory else "--no-memory")
    children: dict[str, Child] = {}
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        children["receiver"] = Child("receiver", [
            "run_receiver.py", "--port", str(port), "--room", ROOM,
            "--max-viewers-per-ip", "16", "--max-viewers", "16"], log_dir)
        children["receiver"].wait_for(READY, 60)
        children["sender"] = Child("sender", [
            "run_sender.py", "--signaling", signaling, "--room", ROOM, "--name", "soak", "--source", args.source,
            "--device", args.device, "--size", str(args.size), "--refiner", args.refiner, *pipeline], log_dir)
        children["sender"].wait_for(re.compile(r"joined room"), 600)
        pipeline_pid = None  # send --pipeline-process: that process is sampled too, as "pipeline"
        if args.pipeline_process:
            pipeline_pid = int(children["sender"].wait_for(PIPELINE_PID, 10).group(1))
        for i in range(args.viewers):
            children[f"viewer{i}"] = Child(f"viewer{i}", [
                str(Path(__file__).resolve()), "--viewer-child", "--signaling", signaling,
                "--sample-s", str(args.sample_s)], log_dir)
        if args.churn:
            children["churn"] = Child("churn", [
                str(Path(__file__).resolve()), "--churn-child", "--signaling", signaling,
                "--sample-s", str(args.sample_s), "--churn-every", str(args.churn_every)], log_dir)
        print(f"soak: {args.viewers} viewers{' + churn' if args.churn else ''} for {args.minutes:g} min, "
              f"logs in {log_dir}", flush=True)
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        next_sample = t0 + args.sample_s
        while time.monotonic() < end:
            time.sleep(max(0.0, min(next_sample, end) - time.monotonic()))
            if time.monotonic() < next_sample - 0.01:
                continue
            next_sample += args.sample_s
            sample = {"t_s": round(time.monotonic() - t0, 1), "processes": {}}
            if args.device.startswith("cuda"):
                sample["gpu_used_mb"] = gpu_used_mb()
            for name, child in children.items():
                entry = child.proc()
                if name.startswith("viewer"):
                    entry["fps"] = window_fps(child.reports)
                    entry["reconnects"] = child.reports[-1]["reconnects"] if child.reports else None
                sample["processes"][name] = entry
            if pipeline_pid is not None:
                sample["processes"]["pipeline"] = proc_stats(pipeline_pid)
            sender_fps = [c.reports[-1].get("sender_fps") for n, c in children.items() if n.startswith("viewer") and c.reports]
            sender_fps = [f for f in sender_fps if f is not None]
            sample["processes"]["sender"]["fps"] = max(sender_fps) if sender_fps else None
            if "churn" in children and children["churn"].reports:
                sample["churn"] = {k: v for k, v in children["churn"].reports[-1].items() if k != "t"}
            samples.append(sample)
            line = "  ".join(f"{n} {p['rss_mb']}MB/{p['fds']}fd/{p['threads']}th"
                             + (f"/{p['fps']}fps" if p.get("fps") is not None else "") for n, p in sample["processes"].items())
            print(f"[{sample['t_s'] / 60:5.1f} min] {line}", flush=True)
            dead = [n for n, c in children.items() if c.popen.poll() is not None]
            if dead:
                print(f"soak: {', '.join(dead)} exited early; stopping", flush=True)
                break
    finally:
        exit_codes = {name: child.stop() for name, child in reversed(list(children.items()))}
    warmup_s = args.warmup_minutes * 60 if args.warmup_minutes is not None else min(300.0, args.minutes * 60 / 3)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {
        "ran_s": round(time.monotonic() - t0, 1),
        "warmup_s": warmup_s,
        "exit_codes": exit_codes,
        "summary": summarise(samples, warmup_s, {name: child.log_path for name, child in children.items()}),
        "churn": samples[-1].get("churn") if samples else None,
        "samples": samples,
    }
    write_json(out, document(run_metadata(args.device, benchmark="soak"), config, result))
    if samples:
        plot(samples, f"soak {args.device} {args.size}px, {args.viewers} viewers{' + churn' if args.churn else ''}",
             out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--viewers", type=int, default=2)
    parser.add_argument("--churn", action="store_true", help="viewers join and leave every few seconds, plus offer bursts")
    parser.add_argument("--churn-every", type=float, default=5.0, help="seconds between churn rounds (on average)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=None, help="default: 512 on cuda, 256 on cpu")
    parser.add_argument("--source", default="sample")
    parser.add_argument("--refiner", default="default", help="PATH | default | none")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                        help="the sender's appearance memory on or off (default: the sender's default)")
    parser.add_argument("--pipeline-process", action="store_true",
                        help="the sender's pipeline in a process of its own (send --pipeline-process)")
    parser.add_argument("--pipeline", default="tests.fake_pipeline",
                        help="'module[:function]' making a stand-in pipeline, or 'none' for the product's")
    parser.add_argument("--sample-s", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--warmup-minutes", type=float, default=None, help="default: a third of the run, at most 5")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/soak_<device>_<size>.json)")
    parser.add_argument("--viewer-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--churn-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--signaling", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.size = args.size or (512 if args.device.startswith("cuda") else 256)
    if args.viewer_child or args.churn_child:
        import logging

        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        coro = viewer_child(args) if args.viewer_child else churn_child(args)
        try:
            asyncio.run(_until_sigterm(coro))
        except KeyboardInterrupt:
            pass
        return 0
    return run_soak(args)


async def _until_sigterm(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass


if __name__ == "__main__":
    sys.exit(main())
