"""Camera maths: intrinsics, orbit cameras, projection. Torch on any device (the orbit cameras on the host, in numpy).

Convention (used everywhere in the project, written down once here):

* World frame = the SOURCE camera's frame (OpenCV): +x to the right of the
  picture, +y down, +z forward into the scene. Units are metres.
* ``viewmats`` are world->camera rigid transforms [..., 4, 4]; a camera point
  is ``X_c = R @ X_w + t``. ``Ks`` are pinhole intrinsics [..., 3, 3] in pixel
  units, pixel (i, j) having its centre at (x, y) = (j + 0.5, i + 0.5).
* An orbit camera is the source camera turned rigidly about a pivot (the head
  centre); for a pivot on the optical axis at distance d it sits at

      C = pivot + d * (sin(yaw) cos(pitch), -sin(pitch), -cos(yaw) cos(pitch))

  and yaw = pitch = roll = 0 with dist_scale = 1 IS the source camera.
  **yaw = +30** moves the camera 30 degrees to the viewer's right (towards the
  subject's left ear): on screen the head turns towards the viewer's left and
  shows more of the subject's left cheek. **pitch = +10** raises the camera,
  looking down onto the head. roll turns the picture clockwise on screen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)

__all__ = [
    "OrbitPose",
    "intrinsics_from_fov",
    "orbit_viewmats",
    "orbit_viewmats_np",
    "project",
    "unproject",
    "rotation_to_euler_deg",
]


@dataclass(frozen=True)
class OrbitPose:
    """One virtual camera around the head (angles in degrees)."""

    yaw_deg: float = 0.0
    """Orbit to the viewer's right (+) or left (-) around the pivot."""
    pitch_deg: float = 0.0
    """Orbit up (+, looking down at the head) or down (-)."""
    roll_deg: float = 0.0
    """Rotation of the picture about the viewing axis, clockwise on screen (+)."""
    dist_scale: float = 1.0
    """Camera distance as a multiple of the source camera's distance to the pivot."""
    fov_deg: float | None = None
    """Vertical field of view; None keeps the source camera's."""

    def __post_init__(self) -> None:
        for name in ("yaw_deg", "pitch_deg", "roll_deg", "dist_scale"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"expected a finite {name}, got {value!r}")
        if not -89.0 <= self.pitch_deg <= 89.0:
            raise ValueError(f"expected pitch_deg in [-89, 89], got {self.pitch_deg}")
        if self.dist_scale <= 0.05:
            raise ValueError(f"expected dist_scale > 0.05, got {self.dist_scale}")
        if self.fov_deg is not None and not 1.0 <= self.fov_deg <= 150.0:
            raise ValueError(f"expected fov_deg in [1, 150], got {self.fov_deg}")


def intrinsics_from_fov(
    fov_deg: torch.Tensor | float, height: int, width: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    """Pinhole intrinsics from a vertical field of view.

    fy = fx = (H / 2) / tan(fov / 2), principal point at the picture centre.
    fov_deg: float or [...]; returns Ks [..., 3, 3].
    """
    fov = torch.as_tensor(fov_deg, dtype=dtype, device=device)
    f = (height / 2.0) / torch.tan(torch.deg2rad(fov) / 2.0)
    K = torch.zeros(fov.shape + (3, 3), dtype=dtype, device=device)
    K[..., 0, 0] = f
    K[..., 1, 1] = f
    K[..., 0, 2] = width / 2.0
    K[..., 1, 2] = height / 2.0
    K[..., 2, 2] = 1.0
    return K


def orbit_viewmats(
    pivot: torch.Tensor,  # [3] world point the camera orbits (head centre)
    yaw_deg: torch.Tensor,  # [V]
    pitch_deg: torch.Tensor,  # [V]
    roll_deg: torch.Tensor | None = None,  # [V]
    dist_scale: torch.Tensor | None = None,  # [V]
) -> torch.Tensor:
    """World->camera matrices [V, 4, 4] of the source camera orbited about ``pivot`` (float32, on pivot's device).

    The source camera (centre 0, R = I) is rotated rigidly about the pivot by
    R_orbit = Ry(-yaw) Rx(-pitch), then moved along the pivot ray by
    ``dist_scale``:

        C = pivot + dist_scale * R_orbit @ (0 - pivot),   R_w2c = Rz(roll) R_orbit^T

    so yaw = pitch = roll = 0, dist_scale = 1 is exactly the source camera, and
    the pivot keeps its pixel in every view (the head stays where it was framed).
    For a pivot on the optical axis, C = pivot + d (sin y cos p, -sin p, -cos y cos p).
    Worked out on the host (``orbit_viewmats_np``): a handful of numbers.
    """
    host = lambda x: None if x is None else np.asarray(x.detach().cpu() if torch.is_tensor(x) else x)  # noqa: E731
    vm = orbit_viewmats_np(host(pivot), host(yaw_deg), host(pitch_deg), host(roll_deg), host(dist_scale))
    device = pivot.device if torch.is_tensor(pivot) else None
    return torch.from_numpy(vm.astype(np.float32)).to(device)


def orbit_viewmats_np(
    pivot: np.ndarray,
    yaw_deg: np.ndarray,
    pitch_deg: np.ndarray,
    roll_deg: np.ndarray | None = None,
    dist_scale: np.ndarray | None = None,
) -> np.ndarray:
    """``orbit_viewmats`` in numpy (float64 [V, 4, 4]): the sender's cameras every frame, where torch's cost per
    operation on a few numbers (about 30 of them) was the avatar's largest host cost."""
    pivot = np.asarray(pivot, dtype=np.float64).reshape(3)
    yaw, pitch = np.deg2rad(np.asarray(yaw_deg, np.float64).reshape(-1)), np.deg2rad(np.asarray(pitch_deg, np.float64).reshape(-1))
    V = yaw.shape[0]
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    # R_w2c = Rx(pitch) Ry(yaw): rows are the camera axes in world coordinates.
    R = np.zeros((V, 3, 3))
    R[:, 0, 0], R[:, 0, 2] = cy, sy
    R[:, 1, 0], R[:, 1, 1], R[:, 1, 2] = sp * sy, cp, -sp * cy
    R[:, 2, 0], R[:, 2, 1], R[:, 2, 2] = -cp * sy, sp, cp * cy
    centre = pivot - np.einsum("vji,j->vi", R, pivot)  # pivot + R^T (-pivot)
    if dist_scale is not None:
        centre = pivot + np.asarray(dist_scale, np.float64).reshape(-1, 1) * (centre - pivot)
    if roll_deg is not None:
        roll = np.deg2rad(np.asarray(roll_deg, np.float64).reshape(-1))
        cr, sr = np.cos(roll), np.sin(roll)
        Rz = np.zeros((V, 3, 3))
        Rz[:, 0, 0], Rz[:, 0, 1], Rz[:, 1, 0], Rz[:, 1, 1], Rz[:, 2, 2] = cr, -sr, sr, cr, 1.0
        R = Rz @ R
    viewmats = np.zeros((V, 4, 4))
    viewmats[:, :3, :3] = R
    viewmats[:, :3, 3] = -np.einsum("vij,vj->vi", R, centre)
    viewmats[:, 3, 3] = 1.0
    return viewmats


def project(
    points: torch.Tensor,  # [..., N, 3] world points
    viewmats: torch.Tensor,  # [..., 4, 4]
    Ks: torch.Tensor,  # [..., 3, 3]
) -> torch.Tensor:
    """Project world points to pixels: returns [..., N, 3] = (x_px, y_px, z_cam).

    x_px = fx * X_c / Z_c + cx, y_px = fy * Y_c / Z_c + cy; z_cam is the camera
    depth in metres (points behind the camera keep their negative depth).
    """
    if points.shape[-1] != 3:
        raise ValueError(f"expected points [..., N, 3], got {tuple(points.shape)}")
    R = viewmats[..., None, :3, :3]
    t = viewmats[..., None, :3, 3]
    cam = (R @ points[..., None])[..., 0] + t  # [..., N, 3]
    z = cam[..., 2]
    z_safe = torch.where(z.abs() < 1e-8, torch.full_like(z, 1e-8), z)
    fx, fy = Ks[..., None, 0, 0], Ks[..., None, 1, 1]
    cx, cy = Ks[..., None, 0, 2], Ks[..., None, 1, 2]
    x = fx * cam[..., 0] / z_safe + cx
    y = fy * cam[..., 1] / z_safe + cy
    return torch.stack([x, y, z], dim=-1)


def unproject(
    pix: torch.Tensor,  # [..., N, 3] (x_px, y_px, z_cam)
    viewmats: torch.Tensor,  # [..., 4, 4]
    Ks: torch.Tensor,  # [..., 3, 3]
) -> torch.Tensor:
    """Inverse of :func:`project`: pixels with camera depth -> world points [..., N, 3]."""
    fx, fy = Ks[..., None, 0, 0], Ks[..., None, 1, 1]
    cx, cy = Ks[..., None, 0, 2], Ks[..., None, 1, 2]
    z = pix[..., 2]
    cam = torch.stack([(pix[..., 0] - cx) / fx * z, (pix[..., 1] - cy) / fy * z, z], dim=-1)
    R = viewmats[..., None, :3, :3]
    t = viewmats[..., None, :3, 3]
    return (R.transpose(-1, -2) @ (cam - t)[..., None])[..., 0]


def rotation_to_euler_deg(R: ArrayT) -> ArrayT:
    """Head rotation [..., 3, 3] (head frame -> camera frame, both x right, y down,
    z away from the camera) to (yaw, pitch, roll) degrees [..., 3], a torch tensor or a numpy array as given.

    The yaw/pitch signs match :class:`OrbitPose`: a head with yaw +20 looks
    like a frontal head seen by an orbit camera at yaw +20 (it shows its left
    cheek). The orbit camera's rotation is exactly R = Rz(roll) Rx(pitch) Ry(yaw),
    so that is the decomposition used. The one Euler-angle code of the project.
    A host thread with one head's rotation passes numpy: each of torch's small ops lets go of Python's lock and
    waits to take it back, so beside a busy Python thread the torch form took 26 ms a call here and numpy's 0.06
    (at 32 viewers on an H200 host, 12 % of the face analysis thread's time went to it).
    """
    xp = np if isinstance(R, np.ndarray) else torch
    # Rz(c) Rx(b) Ry(a): last row = (-cos b sin a, sin b, cos b cos a),
    # R[0,1] = -sin c cos b, R[1,1] = cos c cos b.
    pitch = xp.arcsin(xp.clip(R[..., 2, 1], -1.0, 1.0))
    yaw = xp.arctan2(-R[..., 2, 0], R[..., 2, 2])
    roll = xp.arctan2(-R[..., 0, 1], R[..., 1, 1])
    return xp.rad2deg(xp.stack([yaw, pitch, roll], -1))
