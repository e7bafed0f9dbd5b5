"""Tiny multi-camera sets written on the fly (models.evaluation.multiview's folder layout): the
avatar's own renders of skimage's astronaut at known orbit angles, or plain rescaled copies of her
portrait. No data files in the repository."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from tests.tiny_clips import astronaut_face

AVATAR_VIEWS = ((0.0, 0.0), (-30.0, 0.0), (25.0, 0.0), (0.0, 15.0))
"""(yaw, pitch) of the orbit cameras of :func:`write_avatar_set`, degrees; the first is frontal."""


def _save(path: Path, rgb: np.ndarray) -> None:
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))


def faceless_picture(size: int = 160) -> np.ndarray:
    """Smooth noise: what a camera behind the head gives the face mesh (no face)."""
    rng = np.random.default_rng(1)
    small = rng.uniform(0, 255, (8, 8, 3)).astype(np.float32)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 255).astype(np.uint8)


def write_avatar_set(folder: Path, views=AVATAR_VIEWS, size: int = 160, azimuth_offset: float = 100.0,
                     azimuth_sign: float = -1.0, back_view: bool = True) -> Path:
    """Render the astronaut's avatar at each orbit (yaw, pitch) of ``views`` and save them as a set:
    view_<k>.png, plus back.png (no face) when ``back_view``; views.json gives each camera's
    azimuth = offset + sign * yaw (a rig whose zero and direction differ from ours) and elevation = pitch."""
    from skimage import data

    from models.avatar import AvatarConfig, build_avatar, render_views
    from models.face.analysis import FaceAnalyzer, FaceConfig
    from models.geometry.camera import OrbitPose

    folder.mkdir(parents=True, exist_ok=True)
    image = data.astronaut()
    with FaceAnalyzer(FaceConfig(static_image=True)) as analyzer:
        obs = analyzer.analyze(image)
    avatar = build_avatar(image, obs, AvatarConfig(), render_size=size)
    out = render_views(avatar, [OrbitPose(yaw_deg=y, pitch_deg=p) for y, p in views], size)
    entries = []
    for k, (yaw, pitch) in enumerate(views):
        rgb = (out.rgb[k].permute(1, 2, 0).clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
        _save(folder / f"view_{k}.png", rgb)
        entries.append({"file": f"view_{k}.png", "camera": str(k), "azimuth_deg": azimuth_offset + azimuth_sign * yaw,
                        "elevation_deg": pitch})
    if back_view:
        _save(folder / "back.png", faceless_picture(size))
        entries.append({"file": "back.png", "camera": "back", "azimuth_deg": azimuth_offset + 180.0,
                        "elevation_deg": 0.0})
    (folder / "views.json").write_text(json.dumps({"note": "test set", "views": entries}, indent=1))
    return folder


def write_photo_set(folder: Path, scales=(1.0, 0.7, 0.85), size: int = 160) -> Path:
    """The astronaut's portrait at several scales and places on canvases of several sizes (all frontal),
    no views.json: every picture is a view and every angle is measured."""
    folder.mkdir(parents=True, exist_ok=True)
    face = astronaut_face(size)
    for k, s in enumerate(scales):
        side = int(round(size * s))
        canvas = np.full((size + 16 * k, size + 8 * k, 3), 200, np.uint8)
        small = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA)
        y, x = 4 * k, 6 * k
        canvas[y : y + side, x : x + side] = small
        _save(folder / f"photo_{k}.png", canvas)
    return folder
