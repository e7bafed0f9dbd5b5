"""Calibrated captures: a rig rendered from the astronaut's avatar, written in the folder
format, loaded back and turned into training pairs; format errors."""

import json
import math

import numpy as np
import pytest
import torch

from models.avatar import build_avatar, render_cameras
from models.training.captures import (
    CaptureCamera,
    CaptureFormatError,
    CaptureSampleConfig,
    build_capture_samples,
    load_capture,
    rig_focus,
    write_capture,
)
from models.training.data import TensorPairDataset
from models.training.losses import masked_psnr

SIDE = 160  # capture pictures, pixels
# camera id, yaw, pitch (degrees about the head), principal point x offset (pixels)
RIG = [("front", 0, 0, 9.0), ("left", -20, 0, 0.0), ("right", 25, 5, 0.0), ("up", 0, 12, -4.0), ("back", 180, 0, 0.0)]


def _look_at(centre: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World->camera [4, 4] of a camera at centre looking at target, picture y along world +y (OpenCV)."""
    z = (target - centre) / np.linalg.norm(target - centre)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    V = np.eye(4)
    V[:3, :3] = np.stack([x, np.cross(z, x), z])
    V[:3, 3] = -V[:3, :3] @ centre
    return V


@pytest.fixture(scope="module")
def astronaut_avatar(analyzer, astronaut):
    return build_avatar(astronaut, analyzer.analyze(astronaut), render_size=256)


def _make_capture(root, avatar, unit=1.0):
    """Cameras on a sphere about the avatar's head, all looking at it, in a world frame that is
    neither camera's (rotated, shifted) and in `unit`s per metre; pictures and masks are renders."""
    pivot = avatar.pivot.double().numpy()
    dist = float(np.linalg.norm(pivot))
    f = float(avatar.crop_K[1, 1]) * SIDE
    angle = 0.4
    world_to_source = np.eye(4)
    world_to_source[:3, :3] = [[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]]
    world_to_source[:3, 3] = [0.3, -0.1, 2.0]
    cameras, images, masks = [], {}, {}
    for name, yaw, pitch, dx in RIG:
        y, p = math.radians(yaw), math.radians(pitch)
        centre = pivot + dist * np.array([math.sin(y) * math.cos(p), -math.sin(p), -math.cos(y) * math.cos(p)])
        V = _look_at(centre, pivot)
        K = np.array([[f, 0, SIDE / 2 + dx], [0, f, SIDE / 2], [0, 0, 1.0]])
        out = render_cameras(avatar, torch.tensor(V, dtype=torch.float32)[None], torch.tensor(K, dtype=torch.float32)[None], SIDE)
        images[name] = (out.rgb[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        masks[name] = out.alpha[0, 0].numpy()
        world_to_camera = V @ world_to_source
        world_to_camera[:3, 3] *= unit
        cameras.append(CaptureCamera(name, K, world_to_camera, SIDE, SIDE))
    return write_capture(root, cameras, {"000": images}, {"000": masks}, reference_camera="front")


def test_capture_round_trip_gives_pairs_whose_renders_match_the_targets(tmp_path, analyzer, astronaut_avatar):
    metres = load_capture(_make_capture(tmp_path / "m", astronaut_avatar))
    assert sorted(metres.cameras) == sorted(name for name, *_ in RIG) and metres.frames == ["000"]
    assert metres.reference_camera == "front" and len(metres.masks) == len(RIG)
    focus = rig_focus(metres.cameras.values())  # the cameras look at the head centre, |pivot| away
    in_front = metres.cameras["front"].viewmat @ np.append(focus, 1.0)
    assert np.allclose(in_front[:3], [0, 0, np.linalg.norm(astronaut_avatar.pivot.numpy())], atol=1e-4)

    samples = build_capture_samples(metres, analyzer, CaptureSampleConfig(size=96))
    assert [s["meta"]["camera"] for s in samples] == ["left", "right", "up"]  # "back" is beyond max_angle_deg
    for s in samples:
        assert s["ref"].shape == (3, 96, 96) and s["views"].shape == (1, 3, 96, 96) and s["weight"].shape == (1, 1, 96, 96)
        assert 0 <= float(s["seen"].min()) and float(s["seen"].max()) <= 1
        refined = masked_psnr(s["views"], s["target"], s["weight"]).item()
        unmoved = masked_psnr(s["ref"][None], s["target"], s["weight"]).item()
        # the avatar rebuilt from the reference picture, rendered at the calibrated target camera,
        # lands on the target picture; the unmoved reference does not
        assert refined > 21.0 and refined > unmoved + 4.0, (s["meta"]["camera"], refined, unmoved)

    # a rig in millimetres gives the same pairs (the rig is rescaled to the avatar's metric scale)
    millimetres = load_capture(_make_capture(tmp_path / "mm", astronaut_avatar, unit=1000.0))
    again = build_capture_samples(millimetres, analyzer, CaptureSampleConfig(size=96))
    for a, b in zip(samples, again):
        assert (a["views"] - b["views"]).abs().mean() < 2e-3 and torch.allclose(a["target"], b["target"], atol=1e-3)


def test_prepare_only_writes_capture_pairs(tmp_path, astronaut_avatar):
    from telepresence.cli.train import main as train_main

    root = _make_capture(tmp_path / "cap", astronaut_avatar)
    out = tmp_path / "pairs.safetensors"
    assert train_main(["--captures", str(root), "--prepare-only", str(out), "--resolution", "64", "--no-progress"]) == 0
    pairs = TensorPairDataset.load(out)
    assert len(pairs) == 3 and pairs.size == 64 and pairs.meta[0]["stage"] == "real"


def _write_minimal(root, cameras=None, picture=(8, 8)):
    cam = {"fx": 10.0, "fy": 10.0, "cx": 4.0, "cy": 4.0, "width": 8, "height": 8, "R": np.eye(3).tolist(), "t": [0, 0, 0]}
    meta = {"cameras": cameras if cameras is not None else {"a": cam, "b": dict(cam)}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "cameras.json").write_text(json.dumps(meta))
    (root / "images" / "0").mkdir(parents=True, exist_ok=True)
    import cv2

    cv2.imwrite(str(root / "images" / "0" / "a.png"), np.zeros((*picture, 3), np.uint8))
    return root, cam


def test_capture_format_errors_are_clear(tmp_path):
    with pytest.raises(CaptureFormatError, match="expected a capture folder, got no folder"):
        load_capture(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptureFormatError, match=r"expected .*empty/cameras.json, got none"):
        load_capture(tmp_path / "empty")

    root, cam = _write_minimal(tmp_path / "ok")
    capture = load_capture(root)
    assert capture.cameras_in("0") == ["a"] and capture.image("0", "a").shape == (8, 8, 3)
    assert np.allclose(capture.cameras["a"].K, [[10, 0, 4], [0, 10, 4], [0, 0, 1]])

    bad = {k: v for k, v in cam.items() if k != "fx"}
    with pytest.raises(CaptureFormatError, match=r"camera 'a': expected fields fx fy cx cy width height, missing \['fx'\]"):
        load_capture(_write_minimal(tmp_path / "nofx", {"a": bad})[0])
    with pytest.raises(CaptureFormatError, match="expected a rotation"):
        load_capture(_write_minimal(tmp_path / "scaled", {"a": dict(cam, R=(2 * np.eye(3)).tolist())})[0])
    with pytest.raises(CaptureFormatError, match="expected exactly one of world_to_camera"):
        load_capture(_write_minimal(tmp_path / "two", {"a": dict(cam, world_to_camera=np.eye(4).tolist())})[0])
    with pytest.raises(CaptureFormatError, match=r"world_to_camera: expected a finite array of shape \(4, 4\)"):
        no_r = {k: v for k, v in cam.items() if k not in ("R", "t")}
        load_capture(_write_minimal(tmp_path / "shape", {"a": dict(no_r, world_to_camera=np.eye(3).tolist())})[0])
    with pytest.raises(CaptureFormatError, match=r"images/0/a.png: expected a camera id from cameras.json"):
        load_capture(_write_minimal(tmp_path / "unknown", {"b": cam})[0])

    root, _ = _write_minimal(tmp_path / "size", picture=(6, 8))
    with pytest.raises(CaptureFormatError, match=r"expected 8x8 \(cameras.json\), got 8x6"):
        load_capture(root).image("0", "a")
    root, _ = _write_minimal(tmp_path / "mask")
    (root / "masks" / "0").mkdir(parents=True)
    (root / "masks" / "0" / "b.png").write_bytes((root / "images" / "0" / "a.png").read_bytes())
    with pytest.raises(CaptureFormatError, match=r"masks/0/b: expected a mask for an existing picture"):
        load_capture(root)
    root, _ = _write_minimal(tmp_path / "conv")
    meta = json.loads((root / "cameras.json").read_text())
    (root / "cameras.json").write_text(json.dumps({**meta, "convention": "opengl"}))
    with pytest.raises(CaptureFormatError, match='expected convention "opencv"'):
        load_capture(root)
    (root / "cameras.json").write_text("{not json")
    with pytest.raises(CaptureFormatError, match="expected JSON"):
        load_capture(root)
