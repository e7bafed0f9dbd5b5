"""Avatar build and render timing (landmarks excluded: stored once in
benchmarks/astronaut_face.npz, so the GPU machine needs no MediaPipe).

    python benchmarks/avatar.py --device cpu --sizes 256 512 --views 1 4 --out out/avatar_cpu.json
    python benchmarks/avatar.py --device cuda --sizes 256 512 --views 1 4 --check --out out/avatar_cuda.json

Two paths per row: "eager" (build_avatar + render_views, what training and eval
use) and, on CUDA, "graphs" (models.avatar.engine.AvatarEngine: what the sender runs,
the build and the render replayed as CUDA graphs; its build+render includes the
host's framing work and the upload of the frame). --check compares CUDA renders
(both paths) with CPU renders first; --profile prints the top torch-profiler
rows of one eager build + render; --breakdown splits the graphs path of the last
size and view count into its host and device parts. On CUDA the "compiled" rows (the last size only:
a compile takes minutes) are the graphs path with AvatarEngine(compile=True), what a CUDA sender runs
once its background compile is done (telepresence.pipeline, compile_avatar); while it compiles, the
rows' "during" entry times the plain graphs' frames at a 30 fps pace beside it; --no-compile skips them. --memory adds the appearance memory's rows
(models.avatar.memory, the sender's settings: MemoryConfig.for_sender): its update (a frame's
observation, the blend into its pose layer, the view for the frame's pose) and the render with the
memory attached; the sender pays update / update_every + the render's extra a frame.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import document, time_ms, timing_stats, write_json  # noqa: E402
from models.avatar import build_avatar, render_views  # noqa: E402
from models.avatar.engine import AvatarEngine  # noqa: E402
from models.geometry.camera import OrbitPose  # noqa: E402
from models.face.analysis import observation_from_landmarks  # noqa: E402
from models.runinfo import run_metadata  # noqa: E402
from telepresence.pipeline import cpu_threads  # noqa: E402

YAWS = [-30.0, -10.0, 10.0, 30.0, 20.0, -20.0, 0.0, 5.0]


def view_poses(n: int) -> list:
    """n viewers' poses: the yaws above, in turn (more than 8 viewers share them)."""
    return [OrbitPose(yaw_deg=YAWS[i % len(YAWS)]) for i in range(n)]


def load_case():
    from skimage import data

    image = data.astronaut()
    stored = np.load(Path(__file__).with_name("astronaut_face.npz"))
    obs = observation_from_landmarks(
        stored["landmarks"], image.shape[:2], float(stored["fov_deg"]), stored["mask"].astype(np.float32) / 255.0
    )
    return image, obs


def check_cuda(image, obs, size: int = 256) -> None:
    poses = view_poses(4)
    cpu = render_views(build_avatar(image, obs, render_size=size), poses, size)
    eager = render_views(build_avatar(image, obs, device="cuda", render_size=size), poses, size)
    engine = AvatarEngine(device="cuda", render_size=size)
    engine.build(image, obs)
    graphs = engine.render(poses)
    for name, gpu in (("eager", eager), ("graphs", graphs)):
        diff = (cpu.rgb - gpu.rgb.cpu()).abs()
        frac = float((diff > 0.05).float().mean())
        print(f"check: CUDA ({name}) vs CPU renders at {size}: mean |diff| {float(diff.mean()):.5f}, "
              f"pixels off by > 0.05: {100 * frac:.3f} %  -> {'OK' if frac < 0.002 else 'MISMATCH'}")


def compiled_engine(image, obs, size: int, poses) -> tuple[AvatarEngine, dict]:
    """An engine with compile=True, its compiles done and captured; and the plain graphs' frame times
    (build + render, ms) at a 30 fps pace while they compiled (what a sender's frames cost then)."""
    engine = AvatarEngine(device="cuda", render_size=size, compile=True)
    during, t0 = [], time.perf_counter()
    engine.build(image, obs)
    engine.render(poses)
    while not engine.wait_compiled(0.0) and time.perf_counter() - t0 < 900:
        t = time.perf_counter()
        engine.build(image, obs)
        engine.render(poses)
        torch.cuda.synchronize()
        during.append((time.perf_counter() - t) * 1e3)
        time.sleep(max(0.0, 1 / 30 - (time.perf_counter() - t)))
    seconds = time.perf_counter() - t0
    for _ in range(2):  # the swap's captures, then a replay
        engine.build(image, obs)
        engine.render(poses)
    print(f"compiled {size} {len(poses)} view(s): {engine.compile_state} after {seconds:.0f} s "
          f"({engine.compiler.seconds:.0f} s compiling); meanwhile {len(during) / seconds:.1f} frames/s of 30, "
          f"build + render median {np.median(during) if during else float('nan'):.2f} ms")
    return engine, {"state": engine.compile_state, "seconds": seconds, "compiling_s": engine.compiler.seconds,
                    "during": timing_stats(during) if during else None,
                    "frames_per_s_during": len(during) / seconds}


def breakdown(image, obs, size: int, V: int, repeats: int, compiled: bool = False) -> dict:
    """timing_stats (ms) of each part of a graphs-path build + render (host work, and the
    device time of each replay from CUDA events)."""
    from models.avatar.plan import prepare_build

    poses = view_poses(V)
    if compiled:
        engine = compiled_engine(image, obs, size, poses)[0]
    else:
        engine = AvatarEngine(device="cuda", render_size=size)
        engine.build(image, obs)
        engine.render(poses)
    parts: dict[str, list[float]] = {}

    def add(name, ms):
        parts.setdefault(name, []).append(ms)

    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        inputs = prepare_build(image, obs, engine.config, None, None, size)
        t1 = time.perf_counter()
        graph = engine._builds[inputs.plan]
        for k, v in inputs.tensors(torch.device("cpu")).items():
            if v is not None:
                graph.inputs[k].copy_(v, non_blocking=True)
        t2 = time.perf_counter()
        e0, e1, e2, e3 = (torch.cuda.Event(enable_timing=True) for _ in range(4))
        e0.record()
        graph.graph.replay()
        e1.record()
        t3 = time.perf_counter()
        viewmats, Ks = engine.avatar.cameras(poses, size)
        t4 = time.perf_counter()
        rgraph = engine._renders[(inputs.plan, V)]
        rgraph.inputs["viewmats"].copy_(viewmats)
        rgraph.inputs["Ks"].copy_(Ks)
        e2.record()
        rgraph.graph.replay()
        e3.record()
        t5 = time.perf_counter()
        torch.cuda.synchronize()
        t6 = time.perf_counter()
        add("host: framing, constants, small maps", (t1 - t0) * 1e3)
        add("host: frame upload (image, mask)", (t2 - t1) * 1e3)
        add("host: build replay launch", (t3 - t2) * 1e3)
        add("host: cameras + upload", (t4 - t3) * 1e3)
        add("host: render replay launch", (t5 - t4) * 1e3)
        add("wait for the device", (t6 - t5) * 1e3)
        add("device: build graph", e0.elapsed_time(e1))
        add("device: render graph", e2.elapsed_time(e3))
        add("total", (t6 - t0) * 1e3)
    stats = {k: timing_stats(v) for k, v in parts.items()}
    print(f"breakdown, graphs path{' compiled' if compiled else ''}, {V} views at {size} (median ms):")
    for k, v in stats.items():
        print(f"  {k:<40} {v['median']:7.3f}")
    return stats


def memory_rows(image, obs, device: torch.device, size: int, V: int, repeats: int) -> dict:
    """The sender's appearance memory at ``size``: update and render-with-memory timings (eager)."""
    from models.avatar.memory import AppearanceMemory, MemoryConfig

    config = MemoryConfig.for_sender(size, device)
    memory = AppearanceMemory(config, device)
    avatar = build_avatar(image, obs, device=device, render_size=size)
    yaws = iter(YAWS * (4 * repeats + 100))  # the head turns between frames: every pose layer is used
    for _ in range(len(YAWS)):
        memory.update(avatar, next(yaws))
    poses = view_poses(V)
    update = time_ms(lambda: memory.update(avatar, next(yaws)), device, repeats=repeats)
    attached = memory.attach(avatar)
    # The render's extra: renders without and with the memory in alternation, the median of the pairs'
    # differences (a load that drifts during the run moves both halves of a pair alike).
    pairs = [(time_ms(lambda: render_views(avatar, poses, size), device, warmup=1, repeats=1)["median"],
              time_ms(lambda: render_views(attached, poses, size), device, warmup=1, repeats=1)["median"])
             for _ in range(repeats)]
    plain, remembered = timing_stats([a for a, _ in pairs]), timing_stats([b for _, b in pairs])
    extra = timing_stats([b - a for a, b in pairs])
    per_frame = update["median"] / config.update_every + extra["median"]
    print(f"memory {size:>5} {V:>5}: update {update['median']:.2f} ms (p90 {update['p90']:.2f}, every "
          f"{config.update_every} frame(s), {config.texels} texels, {config.pose_layers} layers), render "
          f"{plain['median']:.2f} -> {remembered['median']:.2f} ms (extra {extra['median']:.2f}, p90 {extra['p90']:.2f}, "
          f"in pairs); a frame pays {per_frame:.2f} ms")
    return {"memory": {"size": size, "views": V, "texels": config.texels, "pose_layers": config.pose_layers,
                       "update_every": config.update_every, "update": update, "render": plain,
                       "render_with_memory": remembered, "render_extra": extra, "per_frame_ms": per_frame}}


def memory_graph_rows(image, obs, size: int, V: int, repeats: int, update_graph: bool = True,
                      compile_update: bool = False) -> dict:
    """The sender's path on CUDA: a frame (graph build, the memory's update every update_every frames, graph
    render of V views, as telepresence.pipeline runs them) with and without the memory, in alternating pairs;
    the memory's render lookup is inside the render graph, its update a graph of its own beside them."""
    from models.avatar.memory import AppearanceMemory, MemoryConfig

    device = torch.device("cuda")
    config = MemoryConfig.for_sender(size, device)
    memory = AppearanceMemory(config, device)
    memory.cuda_graphs = update_graph  # as the sender sets it beside the engine's graphs (False: the update eager)
    memory.compile_update = update_graph and compile_update  # compiled before its capture (not yet the sender's)
    plain, remembered = AvatarEngine(device=device, render_size=size), AvatarEngine(device=device, render_size=size)
    poses = view_poses(V)
    yaws = iter(YAWS * (8 * repeats + 100))
    frames = [0]

    def frame(engine, with_memory):
        avatar = engine.build(image, obs)
        if with_memory:
            if frames[0] % config.update_every == 0:
                memory.update(avatar, next(yaws))
            frames[0] += 1
            engine.avatar = memory.attach(avatar)
        return engine.render(poses)

    for _ in range(len(YAWS)):
        frame(plain, False), frame(remembered, True)
    pairs = [(time_ms(lambda: frame(plain, False), device, warmup=1, repeats=1)["median"],
              time_ms(lambda: frame(remembered, True), device, warmup=1, repeats=1)["median"])
             for _ in range(2 * repeats)]
    without, with_ = timing_stats([a for a, _ in pairs]), timing_stats([b for _, b in pairs])
    extra = timing_stats([b - a for a, b in pairs])
    how = ("update graph" + (", compiled" if memory.compile_update else "") if memory.cuda_graphs
           else "update eager" + (": its capture failed" if update_graph else ""))
    print(f"memory, graphs path, {how}, {size:>5} {V:>5}: a frame (build + render) {without['median']:.2f} -> "
          f"{with_['median']:.2f} ms; the memory's extra {extra['median']:.2f} ms (p90 {extra['p90']:.2f}; update every "
          f"{config.update_every} frame(s), {config.texels} texels, {config.pose_layers} layers)")
    return {"memory_graphs": {"size": size, "views": V, "texels": config.texels, "pose_layers": config.pose_layers,
                              "update_graph": memory.cuda_graphs, "update_compiled": memory.compile_update,
                              "update_every": config.update_every, "frame": without, "frame_with_memory": with_,
                              "extra": extra}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--views", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the sender's, the cores less one on the CPU, 2 with a GPU)")
    p.add_argument("--check", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--memory", action="store_true", help="time the appearance memory's update and its render")
    p.add_argument("--compile-memory", action="store_true",
                   help="with --memory on CUDA: also the update compiled before its capture (AppearanceMemory.compile_update)")
    p.add_argument("--no-compile", action="store_true", help="on CUDA: skip the compiled rows (minutes of compiling)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    # The sender's setting (telepresence.pipeline.cpu_threads: on the CPU the cores less one, on a GPU 2): with torch's
    # default of one thread a core, a core shared with face analysis, the encoder or a compile makes its threads wait
    # on each other.
    torch.set_num_threads(args.threads or cpu_threads(None, device.type))
    print(f"torch threads: {torch.get_num_threads()}")
    image, obs = load_case()
    if args.check and device.type == "cuda":
        check_cuda(image, obs)
    rows = []
    paths = ["eager", "graphs"] + ([] if args.no_compile else ["compiled"]) if device.type == "cuda" else ["eager"]
    print(f"{'path':>8} {'size':>5} {'views':>5} {'build ms':>10} {'render ms':>10} {'per view':>9} "
          f"{'build+render':>13} {'p90':>7}")
    for path in paths:
        for size in args.sizes[-1:] if path == "compiled" else args.sizes:
            for V in args.views:
                poses = view_poses(V)
                extra = {}
                if path == "eager":
                    avatar = build_avatar(image, obs, device=device, render_size=size)
                    build_fn = lambda: build_avatar(image, obs, device=device, render_size=size)  # noqa: E731
                    render_fn = lambda: render_views(avatar, poses, size)  # noqa: E731
                else:
                    if path == "compiled":
                        engine, extra["compile"] = compiled_engine(image, obs, size, poses)
                    else:
                        engine = AvatarEngine(device=device, render_size=size)
                    build_fn = lambda: engine.build(image, obs)  # noqa: E731
                    render_fn = lambda: engine.render(poses)  # noqa: E731
                    build_fn()
                build = time_ms(build_fn, device, repeats=args.repeats)
                render = time_ms(render_fn, device, repeats=args.repeats)
                both = time_ms(lambda: (build_fn(), render_fn()), device, repeats=args.repeats)
                rows.append({"path": path, "size": size, "views": V, "build": build, "render": render,
                             "build_render": both, **extra})
                print(f"{path:>8} {size:>5} {V:>5} {build['median']:>10.2f} {render['median']:>10.2f} "
                      f"{render['median'] / V:>9.2f} {both['median']:>13.2f} {both['p90']:>7.2f}")
    if args.memory:
        rows += [memory_rows(image, obs, device, size, args.views[-1], args.repeats) for size in args.sizes]
        if device.type == "cuda":
            rows += [memory_graph_rows(image, obs, size, args.views[-1], args.repeats, graph)
                     for size in args.sizes for graph in (False, True)]
            if args.compile_memory:
                rows += [memory_graph_rows(image, obs, size, args.views[-1], args.repeats, True, compile_update=True)
                         for size in args.sizes]
    if args.profile:
        # The graphs path's maths (fixed shapes) run eagerly, so the profiler sees every kernel.
        size, V = args.sizes[-1], args.views[-1]
        poses = view_poses(V)
        engine = AvatarEngine(device=device, render_size=size, cuda_graphs=False, fixed_shapes=True)
        engine.build(image, obs)
        engine.render(poses)
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(3):
                engine.build(image, obs)
                engine.render(poses)
            if device.type == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25))
    if args.breakdown and device.type == "cuda":
        rows.append({"breakdown": breakdown(image, obs, args.sizes[-1], args.views[-1], args.repeats)})
        if not args.no_compile:
            rows.append({"breakdown_compiled": breakdown(image, obs, args.sizes[-1], args.views[-1], args.repeats,
                                                         compiled=True)})
    if args.out:
        config = {**vars(args), "picture": "skimage astronaut 512x512"}
        write_json(args.out, document(run_metadata(device, benchmark="avatar"), config, rows))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
