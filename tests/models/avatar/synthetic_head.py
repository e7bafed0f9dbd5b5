"""A textured head that turns, drawn without a detector: an ellipsoid about the cranium centre whose
colour is a smooth, asymmetric function of the direction from its centre, and the canonical face
mesh posed with it as the landmarks. For the appearance memory's tests."""
from __future__ import annotations

import math

import numpy as np

from models.face.analysis import FaceObservation, face_model, observation_from_landmarks

SIZE = 256
FOV_DEG = 30.0
DISTANCE_M = 0.55
CENTRE = np.array([0.0, -0.02, 0.025])  # head frame (models.avatar.topology.CRANIUM_CENTRE)
RADII = np.array([0.095, 0.125, 0.125])
BACKGROUND = (0.2, 0.6, 0.25)


def rotation(yaw_deg: float) -> np.ndarray:
    """Head -> camera rotation of a head turned by yaw_deg about its vertical axis."""
    a = math.radians(yaw_deg)
    return np.array([[math.cos(a), 0.0, math.sin(a)], [0.0, 1.0, 0.0], [-math.sin(a), 0.0, math.cos(a)]])


def surface_colour(d: np.ndarray) -> np.ndarray:
    """RGB [..., 3] in [0, 1] of head-frame directions d [..., 3] from the centre: varies with
    the azimuth (left and right differ) and gently with the height."""
    az = np.arctan2(d[..., 0], -d[..., 2])
    return np.stack([0.5 + 0.35 * np.sin(az), 0.45 + 0.25 * np.cos(1.5 * az), 0.5 + 0.2 * d[..., 1]], -1).clip(0, 1)


def turning_head_frame(yaw_deg: float, tint: float = 1.0) -> tuple[np.ndarray, FaceObservation, np.ndarray]:
    """(picture RGB uint8 [S, S, 3], its observation, head -> camera rotation [3, 3]) of the head at yaw_deg.
    tint scales the colours (a lighting change)."""
    R, t = rotation(yaw_deg), np.array([0.0, 0.0, DISTANCE_M])
    f = (SIZE / 2.0) / math.tan(math.radians(FOV_DEG) / 2.0)
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    rays = np.stack([(xs - SIZE / 2) / f, (ys - SIZE / 2) / f, np.ones_like(xs)], -1)  # camera frame
    o = R.T @ (-t) - CENTRE  # camera centre in the head frame, about the ellipsoid centre
    d = rays @ R  # R^T d per pixel
    a, b = d / RADII, o / RADII
    A, B, C = (a * a).sum(-1), 2 * (a * b).sum(-1), (b * b).sum() - 1.0
    disc = B * B - 4 * A * C
    hit = disc > 0
    s = (-B - np.sqrt(np.maximum(disc, 0))) / (2 * A)
    p = o + s[..., None] * d
    colour = surface_colour(p / np.linalg.norm(p, axis=-1, keepdims=True)) * tint
    picture = np.where(hit[..., None], colour, np.array(BACKGROUND))
    image = (picture.clip(0, 1) * 255 + 0.5).astype(np.uint8)
    verts = face_model().vertices.astype(np.float64)
    cam = verts @ R.T + t
    lm = np.stack([f * cam[:, 0] / cam[:, 2] + SIZE / 2, f * cam[:, 1] / cam[:, 2] + SIZE / 2,
                   f * (cam[:, 2] / DISTANCE_M - 1.0)], -1)
    lm = np.concatenate([lm, np.repeat(lm[[468 - 1]], 10, 0)])  # 10 iris points (unused by the avatar)
    obs = observation_from_landmarks(lm.astype(np.float32), (SIZE, SIZE), FOV_DEG, hit.astype(np.float32))
    return image, obs, R


def head_frame_colour(points_cam: np.ndarray, R: np.ndarray) -> np.ndarray:
    """The true colour [..., 3] at camera-frame points [..., 3] of the head posed by R."""
    p = (points_cam - np.array([0.0, 0.0, DISTANCE_M])) @ R - CENTRE
    return surface_colour(p / np.linalg.norm(p, axis=-1, keepdims=True).clip(1e-9))
