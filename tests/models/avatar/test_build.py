"""The one-shot avatar: reproduction at the source camera, 3D consistency of
novel views (MediaPipe on the renders), reenactment, determinism, errors."""
import numpy as np
import pytest
import torch

from models.avatar import AvatarConfig, build_avatar, crop_box, render_views
from models.avatar.render import shell_detail_fade
from models.geometry.camera import OrbitPose
from models.face.analysis import face_oval_mask, read_image

PHOTOS = ["lp_s1", "lp_s2", "lp_s9", "lp_s10", "lp_s12", "lp_s42"]


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.expand_as(a) > 0.5
    mse = ((a - b)[m] ** 2).mean().item()
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def load(name, test_data, astronaut):
    return astronaut if name == "astronaut" else read_image(test_data / f"{name}.jpg")


@pytest.mark.parametrize("name", ["astronaut"] + PHOTOS)
def test_source_camera_reproduces_the_source(name, analyzer, test_data, astronaut):
    image = load(name, test_data, astronaut)
    obs = analyzer.analyze(image)
    avatar = build_avatar(image, obs, render_size=512)
    out = render_views(avatar, [OrbitPose()], 512)
    target = avatar.crop(image, 512)
    face = avatar.crop(face_oval_mask(obs.landmarks_px, obs.image_size), 512)
    assert face.sum() > 5000
    value = psnr(out.rgb[0], target, face)
    assert value >= 28.0, f"{name}: {value:.1f} dB inside the face"
    # The source saw every face pixel it shows.
    assert out.seen[0][face > 0.5].mean() > 0.9


@pytest.mark.parametrize("name", ["astronaut", "lp_s42", "lp_s1"])
def test_novel_views_are_3d_consistent(name, analyzer, test_data, astronaut):
    """MediaPipe on the render finds the face where the avatar's own vertices project."""
    image = load(name, test_data, astronaut)
    avatar = build_avatar(image, analyzer.analyze(image), render_size=512)
    poses = [OrbitPose(yaw_deg=20), OrbitPose(yaw_deg=-20), OrbitPose(pitch_deg=10), OrbitPose(pitch_deg=-10)]
    out = render_views(avatar, poses, 512)
    projected = avatar.project_landmarks(poses, 512)  # [V, 468, 2]
    for v, pose in enumerate(poses):
        picture = (out.rgb[v].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        detected = analyzer.landmarks(picture)[:468, :2]
        proj = projected[v].numpy()
        iod = np.linalg.norm(proj[263] - proj[33])
        err = np.linalg.norm(detected - proj, axis=1).mean() / iod
        assert err < 0.05, f"{name} {pose}: mean landmark error {100 * err:.1f} % of IOD"


def test_views_move_the_right_way(analyzer, astronaut):
    """yaw +20 (camera to the viewer's right): the head turns to the viewer's left, so
    the nose tip, in front of the pivot, moves left of the face centre."""
    obs = analyzer.analyze(astronaut)
    avatar = build_avatar(astronaut, obs, render_size=256)
    poses = [OrbitPose(yaw_deg=-20), OrbitPose(), OrbitPose(yaw_deg=20), OrbitPose(pitch_deg=15)]
    lm = avatar.project_landmarks(poses, 256)
    nose_offset = lm[:, 1, 0] - lm[:, :, 0].mean(1)  # landmark 1 = nose tip
    assert nose_offset[0] > nose_offset[1] > nose_offset[2]
    # Camera above: the nose tip, nearer than the eyes, drops further below them.
    eyes_to_nose = lm[:, 1, 1] - lm[:, [33, 263], 1].mean(1)
    assert eyes_to_nose[3] > eyes_to_nose[1]


def test_outputs_shapes_ranges_and_determinism(analyzer, astronaut):
    obs = analyzer.analyze(astronaut)
    a = build_avatar(astronaut, obs, render_size=128)
    poses = [OrbitPose(yaw_deg=y) for y in (-30, 0, 30)]
    out = render_views(a, poses, 128)
    for t, c in ((out.rgb, 3), (out.alpha, 1), (out.depth, 1), (out.seen, 1)):
        assert t.shape == (3, c, 128, 128) and t.dtype == torch.float32
    assert 0 <= out.rgb.min() and out.rgb.max() <= 1 and 0 <= out.seen.min() and out.seen.max() <= 1
    assert (out.depth[out.alpha > 0.5] > 0).all()
    # Turning reveals surface the source never saw.
    assert out.seen[0].mean() < out.seen[1].mean() and out.seen[2].mean() < out.seen[1].mean()
    b = build_avatar(astronaut, obs, render_size=128)
    again = render_views(b, poses, 128)
    assert torch.equal(out.rgb, again.rgb) and torch.equal(out.seen, again.seen)


def test_far_background_keeps_the_picture_opaque(analyzer, astronaut):
    obs = analyzer.analyze(astronaut)
    avatar = build_avatar(astronaut, obs, AvatarConfig(background="far"), render_size=128)
    out = render_views(avatar, [OrbitPose(), OrbitPose(yaw_deg=25)], 128)
    in_picture = avatar.crop(np.ones(astronaut.shape[:2], np.float32), 128)[0] > 0.99  # crop may overhang
    assert out.alpha[0, 0][in_picture].mean() > 0.99
    removed = render_views(build_avatar(astronaut, obs, render_size=128), [OrbitPose()], 128)
    assert removed.alpha[0, 0][in_picture].mean() < 0.9


def test_reenactment_geometry_from_one_frame_texture_from_another(analyzer, test_data):
    """Frame t's pose with frame s's texture lands much closer to frame t than frame s does."""
    frames = [read_image(p) for p in sorted(test_data.glob("lp_d12_f*.jpg"))]  # every 15th frame of the clip
    assert len(frames) == 8
    obs = [analyzer.analyze(f) for f in frames]
    yaws = np.array([o.pose.yaw_deg for o in obs])
    s = int(np.argmin(np.abs(yaws)))
    t = int(np.argmax(np.abs(yaws - yaws[s])))
    assert abs(yaws[t] - yaws[s]) > 8, "the clip should turn its head"
    fs, ft = frames[s], frames[t]
    crop = crop_box(obs[s])
    reen = build_avatar(fs, obs[s], geometry=obs[t], crop=crop, render_size=256)
    raw = render_views(reen, [OrbitPose()], 256).rgb[0]
    target = reen.crop(ft, 256)
    face_t = reen.crop(face_oval_mask(obs[t].landmarks_px, obs[t].image_size), 256)
    baseline = reen.crop(fs, 256)
    assert psnr(raw, target, face_t) > psnr(baseline, target, face_t) + 2.0
    # Vertex i is the same point of the face: the render's landmarks follow frame t.
    lm = reen.project_landmarks([OrbitPose()], 256)[0]
    K = reen.intrinsics(256)
    s_px = reen.source_focal_px / float(K[0, 0])
    H, W = obs[t].image_size
    target_lm = (torch.from_numpy(obs[t].landmarks_px[:468, :2]) - torch.tensor([W / 2, H / 2])) / s_px + K[:2, 2]
    assert (lm - target_lm).norm(dim=-1).mean() < 1.0  # pixels


def test_shell_detail_fades_with_the_angle_to_the_source(analyzer, test_data):
    """None at the source camera, all from 24 degrees of orbit; a reenacted head turned by the
    same angle against its texture frame fades as far as that orbit does."""
    frames = [read_image(p) for p in sorted(test_data.glob("lp_d12_f*.jpg"))]
    obs = [analyzer.analyze(f) for f in frames]
    yaws = np.array([o.pose.yaw_deg for o in obs])
    s = int(np.argmin(np.abs(yaws)))
    t = int(np.argmax(np.abs(yaws - yaws[s])))
    own = build_avatar(frames[s], obs[s], render_size=256)

    def fade(avatar, poses):
        viewmats, _ = avatar.cameras(poses, 256)
        return shell_detail_fade(avatar.source_dir, avatar.pivot, viewmats)

    orbit = fade(own, [OrbitPose(yaw_deg=y) for y in (0.0, 4.0, 12.0, 16.0, 20.0, 30.0, -30.0)])
    assert orbit[0] == 0.0 and orbit[1] == 0.0 and orbit[5] == 1.0 and orbit[6] == 1.0
    assert 0.0 < orbit[2] < orbit[3] < orbit[4] < 1.0
    reen = build_avatar(frames[s], obs[s], geometry=obs[t], render_size=256)
    turned = float(fade(reen, [OrbitPose()])[0])
    # As far as an orbit by the head's turn between the frames, within 5 degrees (the head also
    # moves across the picture, which turns the line of sight a little).
    R = obs[t].pose.rotation @ obs[s].pose.rotation.T
    turn = float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))))
    assert 10.0 < turn < 22.0, "the clip should turn its head within the fade's ramp"
    lo, hi = fade(own, [OrbitPose(yaw_deg=turn - 5.0), OrbitPose(yaw_deg=turn + 5.0)]).tolist()
    assert lo < turned < hi


def test_bad_inputs(analyzer, astronaut):
    obs = analyzer.analyze(astronaut)
    with pytest.raises(ValueError, match="expected an RGB uint8 image"):
        build_avatar(astronaut.astype(np.float32), obs)
    with pytest.raises(ValueError, match="expected the image of the observation"):
        build_avatar(astronaut[:256], obs)
    with pytest.raises(ValueError, match="background"):
        AvatarConfig(background="blur")
    avatar = build_avatar(astronaut, obs, render_size=64)
    with pytest.raises(ValueError, match="at least one pose"):
        render_views(avatar, [], 64)


@pytest.mark.gpu
def test_cuda_matches_cpu(analyzer, astronaut):
    obs = analyzer.analyze(astronaut)
    poses = [OrbitPose(yaw_deg=y) for y in (-25, 0, 25)]
    cpu = render_views(build_avatar(astronaut, obs, render_size=256), poses, 256)
    gpu = render_views(build_avatar(astronaut, obs, device="cuda", render_size=256), poses, 256)
    diff = (cpu.rgb - gpu.rgb.cpu()).abs()
    assert (diff > 0.05).float().mean() < 0.002
