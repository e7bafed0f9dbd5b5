"""Training pairs made by the avatar itself (the method's two data stages).

Stage 1, synthetic multi-view (ground truth exact by construction). From any
frame x with its face analysis:

    A   = avatar(x)                       built from the real frame
    x_P = render(A, camera P)             a random novel view (yaw/pitch orbit, head centred)
    B   = avatar(x_P, observation of x_P) rebuilt from that render; its observation is
                                          A's own geometry seen from P (exact, no detector)
    in  = render(B, camera of x)          back to where x was taken from
    target = x (in A's crop camera),  reference = x_P (B's source view)

so the input carries exactly the damage of looking at a face from another angle
(stretched and invented texture where P saw nothing), and the whole picture is
supervised because the target is a true camera move away from the reference.

Stage 2, real fine-tuning (pairs of one clip): reference = a near-frontal frame
s, target = a frame t at another head pose; input = the avatar in reenactment
mode (geometry from t's landmarks, texture from s) seen by the video camera.
In a head-turn clip only the head turns, so the loss weight is 1 on t's head
region and small on the rest of the person and the background (DESIGN notes).

Samples are dicts of CPU float tensors (see ``Sample``), ready for
``models.training`` datasets.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from models.avatar import AvatarConfig, build_avatar, crop_box, render_cameras, render_views
from models.geometry.camera import OrbitPose, orbit_viewmats, rotation_to_euler_deg
from models.face.analysis import FaceObservation, HeadPose, head_region_mask
from models.pictures import to_rgb_uint8, to_uint8

log = logging.getLogger(__name__)

__all__ = ["PairConfig", "stage1_sample", "stage2_sample", "synthetic_observation", "look_at"]


@dataclass(frozen=True)
class PairConfig:
    """How training pairs are made."""

    size: int = 256
    """Pictures are size x size."""
    yaw_range_deg: tuple[float, float] = (12.0, 40.0)
    """Stage 1: |yaw| of the random novel view P (sign random)."""
    pitch_range_deg: tuple[float, float] = (-12.0, 12.0)
    """Stage 1: pitch of P."""
    head_weight: float = 1.0
    """Stage 2 loss weight on the target's head region."""
    person_weight: float = 0.5
    """Stage 2 loss weight on the rest of the person (torso did not move like a camera orbit,
    but the refiner must not damage it either)."""
    background_weight: float = 0.25
    """Stage 2 loss weight on the background (the flat background colour: keep it clean)."""
    stage1_background_weight: float = 0.5
    """Stage 1 loss weight on the background (exact there too, but uninteresting)."""
    avatar: AvatarConfig = AvatarConfig()
    """Avatar settings (background removed: targets are composited the same way)."""


def look_at(viewmat: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Turn a camera (world->camera [4, 4]) about its own centre so that ``point`` [3]
    lies on its optical axis (the smallest rotation). Returns the new [4, 4]."""
    p = viewmat[:3, :3] @ point + viewmat[:3, 3]
    d = p / p.norm()
    z = torch.tensor([0.0, 0.0, 1.0], dtype=d.dtype, device=d.device)
    axis = torch.linalg.cross(d, z)
    s, c = axis.norm(), torch.dot(d, z)
    if s < 1e-9:
        return viewmat.clone()
    k = axis / s
    Kx = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=d.dtype, device=d.device)
    R = torch.eye(3, dtype=d.dtype, device=d.device) + s * Kx + (1 - c) * (Kx @ Kx)  # Rodrigues
    out = viewmat.clone()
    out[:3, :3] = R @ viewmat[:3, :3]
    out[:3, 3] = R @ viewmat[:3, 3]
    return out


def synthetic_observation(
    obs: FaceObservation, viewmat: np.ndarray, focal_px: float, size: int, mask: np.ndarray
) -> FaceObservation:
    """The observation of a picture rendered by camera ``viewmat`` (world = obs's camera
    frame) with a centred principal point, exactly: obs's metric landmarks moved into
    that camera and projected. mask: [S, S] float32 in [0, 1] (the render's alpha)."""
    R, t = viewmat[:3, :3].astype(np.float64), viewmat[:3, 3].astype(np.float64)
    pts = obs.points_cam.astype(np.float64) @ R.T + t  # [478, 3]
    z = pts[:, 2]
    u = focal_px * pts[:, 0] / z + size / 2.0
    v = focal_px * pts[:, 1] / z + size / 2.0
    z0 = float(np.median(z))
    rel = (z / z0 - 1.0) * focal_px  # MediaPipe-style relative depth in pixels
    rot = R @ obs.pose.rotation.astype(np.float64)
    trans = R @ obs.pose.translation.astype(np.float64) + t
    yaw, pitch, roll = rotation_to_euler_deg(rot).tolist()
    pose = HeadPose(rot.astype(np.float32), trans.astype(np.float32), yaw, pitch, roll, obs.pose.fit_rmse_m)
    fov = math.degrees(2.0 * math.atan((size / 2.0) / focal_px))
    return FaceObservation(
        image_size=(size, size),
        landmarks_px=np.stack([u, v, rel], 1).astype(np.float32),
        points_cam=pts.astype(np.float32),
        pose=pose,
        fov_deg=fov,
        mask=mask.astype(np.float32),
    )


def _composite(picture: torch.Tensor, alpha: torch.Tensor, bg: Sequence[float]) -> torch.Tensor:
    bgt = torch.tensor(bg, device=picture.device, dtype=picture.dtype)[:, None, None]
    return picture * alpha + bgt * (1 - alpha)


def stage1_sample(
    image: np.ndarray,
    obs: FaceObservation,
    rng: np.random.Generator,
    config: PairConfig = PairConfig(),
    device: str | torch.device = "cpu",
) -> dict:
    """One synthetic multi-view sample from one picture (see the module doc)."""
    S = config.size
    A = build_avatar(image, obs, config.avatar, device=device, render_size=S)
    yaw = float(rng.uniform(*config.yaw_range_deg)) * float(rng.choice([-1.0, 1.0]))
    pitch = float(rng.uniform(*config.pitch_range_deg))
    t = lambda v: torch.tensor([v], device=A.device)  # noqa: E731
    vm = orbit_viewmats(A.pivot, t(yaw), t(pitch))[0]
    vm = look_at(vm, A.pivot)  # head in the middle of the novel picture
    K_A = A.intrinsics(S)
    f = float(K_A[0, 0])
    K_c = torch.tensor([[f, 0, S / 2.0], [0, f, S / 2.0], [0, 0, 1.0]], device=A.device)
    shot = render_cameras(A, vm[None], K_c[None], S)
    x_p = to_rgb_uint8(shot.rgb[0])
    obs_p = synthetic_observation(obs, vm.cpu().numpy(), f, S, shot.alpha[0, 0].cpu().numpy())
    B = build_avatar(x_p, obs_p, config.avatar, device=device, render_size=S)
    back = torch.linalg.inv(vm)  # B's world is P's camera frame; x's camera there
    out = render_cameras(B, back[None], K_A[None], S)
    target = A.source_view(S)
    in_picture = A.crop(np.ones(image.shape[:2], np.float32), S)
    person = A.crop(A.source_alpha, S)
    weight = in_picture * (config.stage1_background_weight + (1 - config.stage1_background_weight) * person)
    return {
        "ref": B.source_view(S).cpu(),
        "views": out.rgb.cpu(),
        "seen": out.seen.cpu(),
        "target": target[None].cpu(),
        "weight": weight[None].clamp(0, 1).cpu(),
        "meta": {"stage": 1, "yaw": yaw, "pitch": pitch},
    }


def stage2_sample(
    frame_s: np.ndarray,
    obs_s: FaceObservation,
    frame_t: np.ndarray,
    obs_t: FaceObservation,
    config: PairConfig = PairConfig(),
    device: str | torch.device = "cpu",
) -> dict:
    """One real pair: reference frame s, target frame t of the same clip (same camera)."""
    S = config.size
    crop = crop_box(obs_s, config.avatar)
    avatar = build_avatar(frame_s, obs_s, config.avatar, device=device, geometry=obs_t, crop=crop, render_size=S)
    out = render_views(avatar, [OrbitPose()], S)
    alpha_t = avatar.crop(obs_t.mask, S) if obs_t.mask is not None else torch.ones(1, S, S, device=avatar.device)
    target = _composite(avatar.crop(frame_t, S), alpha_t, config.avatar.bg_color)
    head = avatar.crop(head_region_mask(obs_t.landmarks_px, obs_t.image_size, obs_t.mask), S)
    in_picture = avatar.crop(np.ones(frame_t.shape[:2], np.float32), S)
    weight = config.background_weight + (config.person_weight - config.background_weight) * alpha_t
    weight = torch.maximum(weight, head * config.head_weight) * in_picture
    return {
        "ref": avatar.source_view(S).cpu(),
        "views": out.rgb.cpu(),
        "seen": out.seen.cpu(),
        "target": target[None].cpu(),
        "weight": weight[None].clamp(0, 1).cpu(),
        "meta": {"stage": 2},
    }


# ----------------------------------------------------------------------------- datasets

SAMPLE_KEYS = ("ref", "views", "seen", "target", "weight")


@dataclass(frozen=True)
class PairTask:
    """A chunk of samples from one clip, made by one worker process."""

    index_path: str  # a saved models.evaluation.clips.ClipIndex (.npz)
    video_path: str  # the clip it describes
    stage: int  # 1 or 2
    count: int  # samples to make
    seed: int
    config: PairConfig


def _pack(samples: list[dict]) -> dict[str, np.ndarray]:
    """Stack samples into uint8 arrays [N, V, C, S, S] (ref: [N, C, S, S])."""
    out = {}
    for key in SAMPLE_KEYS:
        out[key] = to_uint8(torch.stack([s[key] for s in samples])).numpy()
    return out


def run_task(task: PairTask) -> dict[str, np.ndarray]:
    """Make ``task.count`` samples (CPU, one thread): used by :func:`generate_pairs` workers."""


    from models.evaluation.clips import ClipIndex, near_frontal_frames

    torch.set_num_threads(1)
    rng = np.random.default_rng(task.seed)
    index = replace(ClipIndex.load(task.index_path), path=task.video_path)
    valid = index.valid_frame_ids
    samples: list[dict] = []
    if len(valid) == 0:
        return {}
    if task.stage == 1:
        ids = rng.choice(valid, size=task.count, replace=len(valid) < task.count)
        frames = index.read_frames(ids)
        for fid in ids:
            samples.append(_safe(stage1_sample, frames[int(fid)], index.observation(int(fid)), rng, task.config))
    else:
        refs = near_frontal_frames(index)
        yaw = dict(zip(index.valid_frame_ids.tolist(), index.pose_deg[index.found, 0].tolist()))
        chosen = []
        for _ in range(task.count):
            r = int(rng.choice(refs))
            # Prefer targets that turned away from the reference (at least 3 degrees), else any.
            far = [f for f in valid if abs(yaw[int(f)] - yaw[r]) >= 3.0 and abs(int(f) - r) >= 3]
            pool = far or [f for f in valid if int(f) != r] or [r]
            chosen.append((r, int(rng.choice(pool))))
        frames = index.read_frames([f for pair in chosen for f in pair])
        for r, t in chosen:
            samples.append(_safe(stage2_sample, frames[r], index.observation(r), frames[t], index.observation(t), task.config))
    samples = [s for s in samples if s is not None]
    return _pack(samples) if samples else {}


def _safe(fn, *args):
    """A pair that cannot be made (degenerate geometry) is skipped, not fatal."""
    try:
        return fn(*args)
    except (ValueError, RuntimeError) as exc:
        log.warning("skipped a training pair: %s", exc)
        return None


def generate_pairs(tasks: Sequence[PairTask], workers: int = 1, progress: bool = True) -> dict[str, np.ndarray]:
    """Run pair tasks on ``workers`` processes; returns concatenated uint8 arrays
    (see :func:`_pack`) with a tqdm bar over samples."""
    from tqdm.auto import tqdm

    parts: list[dict[str, np.ndarray]] = []
    total = sum(t.count for t in tasks)
    with tqdm(total=total, desc="training pairs", unit="pair", disable=not progress) as bar:
        if workers <= 1:
            for task in tasks:
                parts.append(run_task(task))
                bar.update(task.count)
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                for task, part in zip(tasks, pool.imap(run_task, tasks)):
                    parts.append(part)
                    bar.update(task.count)
    parts = [p for p in parts if p]
    if not parts:
        raise RuntimeError("no training pair could be made from the given clips")
    return {k: np.concatenate([p[k] for p in parts]) for k in SAMPLE_KEYS}


def plan_tasks(
    clips: Sequence[tuple[str, str]],
    stage: int,
    total: int,
    config: PairConfig = PairConfig(),
    chunk: int = 64,
    seed: int = 0,
) -> list[PairTask]:
    """Spread ``total`` samples of one stage evenly over clips [(index .npz, video)] in chunks."""
    if not clips:
        raise ValueError("expected at least one clip")
    per_clip = [total // len(clips) + (1 if i < total % len(clips) else 0) for i in range(len(clips))]
    tasks = []
    for (index_path, video_path), n in zip(clips, per_clip):
        while n > 0:
            k = min(chunk, n)
            tasks.append(PairTask(index_path, video_path, stage, k, seed + len(tasks) * 7919 + stage, config))
            n -= k
    return tasks


VALIDATION_CLIPS = ("lp_d3", "lp_d9", "lp_s29", "lp_s32")
"""Clips of ../shared/data/videos held out of training entirely (lp_s29 and lp_s32 may
show the same person, so both are out)."""
