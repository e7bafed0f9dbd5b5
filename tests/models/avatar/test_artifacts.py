"""Artifacts of novel views, one test per class that a rendered picture shows (issue 14):
green-screen spill at the person's edge, background colour on the turned head (blocks, rims),
hard (stair-stepped) edges of the torso and the silhouettes, seams along the face outline where seen and unseen surface meet, streaks of
stretched texture in the completed cheek, the face seen through where it folds, hair painted flat behind a cranium that ends
below it, and a light line along the head's outline over the hair. Each test failed on the code before the fix (the numbers in the comments)."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.avatar import build_avatar, render_views
from models.avatar.topology import mesh_topology
from models.face.analysis import face_model, read_image
from models.geometry.camera import OrbitPose, project
from models.geometry.raster import rasterize

SAMPLE = Path(__file__).resolve().parents[3] / "telepresence" / "assets" / "sample.mp4"
S = 256


def first_frame(path: Path) -> np.ndarray:
    capture = cv2.VideoCapture(str(path))
    ok, frame = capture.read()
    capture.release()
    assert ok, f"cannot read {path}"
    return np.ascontiguousarray(frame[:, :, ::-1])


def outline_px(avatar, poses) -> np.ndarray:
    """[V, J, 2] the face outline in each view (pixels)."""
    return avatar.project_landmarks(poses, S).numpy()[:, face_model().face_oval]


def polygon(points: np.ndarray, filled: bool, thickness: int = 1) -> np.ndarray:
    m = np.zeros((S, S), np.uint8)
    pts = [np.round(points * 4).astype(np.int32)]
    if filled:
        cv2.fillPoly(m, pts, 1, shift=2)
    else:
        cv2.polylines(m, pts, True, 1, thickness=thickness, shift=2)
    return m > 0


def test_no_green_screen_spill_at_the_person_edge(analyzer):
    """The demo clip is shot on a green screen: no green rim round the hair, no green on the
    turned cheek. G - max(R, B) of the composited views: over the alpha edge's band it is
    negative (skin and hair), and almost no opaque pixel is green. Before: band mean +0.0004,
    0.012-0.039 of the opaque pixels green."""
    frame = first_frame(SAMPLE)
    out = render_views(build_avatar(frame, analyzer.analyze(frame), render_size=S),
                       [OrbitPose(yaw_deg=y) for y in (-30, 0, 30)], S)
    excess = out.rgb[:, 1] - torch.maximum(out.rgb[:, 0], out.rgb[:, 2])  # [V, S, S]
    alpha = out.alpha[:, 0]
    edge = ((alpha > 0.02) & (alpha < 0.98)).float()[:, None]
    band = (torch.nn.functional.max_pool2d(edge, 5, 1, 2)[:, 0] > 0) & (alpha > 0.02)
    assert float(excess[band].mean()) < -0.01
    for v in range(alpha.shape[0]):
        green = (excess[v][alpha[v] > 0.98] > 0.04).float().mean()
        assert float(green) < 0.003, f"view {v}: {100 * float(green):.1f} % of the opaque pixels are green"


@pytest.mark.parametrize("name", ["lp_s2", "lp_s12"])
def test_no_background_colour_on_the_turned_head(analyzer, test_data, name):
    """Blocks and rims: the person cut out of the photo onto a saturated blue screen (no blue in
    these people or their clothes), then turned to +-20 and +-40 degrees at pitch -20, 0, +20:
    no opaque pixel is blue (B - max(R, G) > 0.15). The fill texture kept the background's
    colour beside the person (a block by the ear on the turned side) and the mask's loose edge
    carried it (a rim): before, 0.23-0.65 % (lp_s12) and 0.53-1.03 % (lp_s2) of the opaque
    pixels per view; now none."""
    image = read_image(test_data / f"{name}.jpg")
    mask = analyzer.analyze(image).mask[..., None]
    screen = np.array([25.0, 50.0, 230.0], np.float32)
    picture = (image * mask + screen * (1 - mask)).round().clip(0, 255).astype(np.uint8)
    poses = [OrbitPose(yaw_deg=y, pitch_deg=p) for y in (-40, -20, 20, 40) for p in (-20, 0, 20)]
    out = render_views(build_avatar(picture, analyzer.analyze(picture), render_size=S), poses, S)
    excess = out.rgb[:, 2] - torch.maximum(out.rgb[:, 0], out.rgb[:, 1])  # [V, S, S]
    opaque = out.alpha[:, 0] > 0.98
    blue = [float((excess[v][opaque[v]] > 0.15).float().mean()) for v in range(len(poses))]
    assert max(blue) < 0.001, f"{name}: % of the opaque pixels blue per view {[round(100 * b, 2) for b in blue]}"


@pytest.mark.parametrize("name", ["lp_s42", "lp_s2"])
def test_no_opaque_pixel_next_to_an_empty_one(analyzer, test_data, name):
    """The torso fades out at the picture's edge instead of ending in a straight cut, and mesh
    silhouettes are anti-aliased: no pixel of alpha 1 beside one of alpha 0 (before: 1.0)."""
    image = read_image(test_data / f"{name}.jpg")
    poses = [OrbitPose(yaw_deg=y, pitch_deg=p) for y, p in ((-30, 0), (0, 0), (30, 0), (20, -15), (-40, 15))]
    alpha = render_views(build_avatar(image, analyzer.analyze(image), render_size=S), poses, S).alpha[:, 0]
    step = torch.maximum((alpha[:, :, 1:] - alpha[:, :, :-1]).abs().amax((1, 2)),
                         (alpha[:, 1:] - alpha[:, :-1]).abs().amax((1, 2)))
    assert float(step.max()) < 0.75, f"alpha steps per view {step.tolist()}"


# Bounds half-way between the seamless render (lp_s10 1.15-1.38, lp_s1 1.19-1.20, lp_s42 1.09-1.13,
# lp_d12 1.14) and the seams before (below): the outline is a real edge (jaw against neck, hair,
# background), so its line energy legitimately exceeds the skin's a little.
@pytest.mark.parametrize("name, views, factor", [
    ("lp_s10", ((-30, 0), (-40, 0), (-30, -15)), 1.5),  # turned source: the unseen side is completed
    ("lp_s1", ((-30, 0), (30, 0)), 1.27),
    ("lp_s42", ((-30, 0), (30, 0)), 1.22),
    ("lp_d12_f000", ((-30, 0), (30, 0)), 1.22),
])
def test_no_seam_along_the_face_outline(analyzer, test_data, name, views, factor):
    """Where the face mesh meets the head shell, and seen surface meets unseen, the texture
    changes source: a switch draws a seam line (dark or pale) along the face outline. Line
    energy |gray - median7(gray)| in a band along the outline stays within ``factor`` of the
    face's own skin (before: lp_s10 1.64-2.27, lp_s1 1.34-1.38, lp_s42 1.31, lp_d12 1.31)."""
    image = read_image(test_data / f"{name}.jpg")
    avatar = build_avatar(image, analyzer.analyze(image), render_size=S)
    poses = [OrbitPose(yaw_deg=y, pitch_deg=p) for y, p in views]
    out = render_views(avatar, poses, S)
    outline = outline_px(avatar, poses)
    for v, pose in enumerate(poses):
        gray = out.rgb[v].mean(0).numpy()
        line = np.abs(cv2.medianBlur((gray * 255).round().astype(np.uint8), 7) / 255.0 - gray)
        band = polygon(outline[v], filled=False, thickness=5)
        skin = cv2.erode(polygon(outline[v], filled=True).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        ratio = line[band].mean() / line[skin].mean()
        assert ratio < factor, f"{name} {pose}: outline line energy {ratio:.2f} x the skin's"


def test_no_streaks_in_the_completed_cheek(analyzer, test_data):
    """A source turned 33 degrees saw one cheek edge-on; turned the other way, that cheek was
    a streak of texture stretched across the face. With an isotropic noise picture in place of
    the photo (the photo's own face geometry and mask), the unseen part of the face has no
    more streaks than noise: few pixels whose 9x9 structure tensor is coherent (> 0.7), where
    before half of them were (0.37-0.51)."""
    image = read_image(test_data / "lp_s10.jpg")
    obs = analyzer.analyze(image)
    assert obs.pose.yaw_deg > 20
    rng = np.random.default_rng(0)
    noise = cv2.GaussianBlur(rng.random(image.shape[:2]).astype(np.float32), (0, 0), 2.0)
    noise = (noise - noise.mean()) / noise.std()
    picture = (np.clip(0.5 + 0.12 * noise[..., None] * np.array([1.0, 0.9, 0.8]), 0, 1) * 255).round().astype(np.uint8)
    avatar = build_avatar(picture, obs, render_size=S)
    poses = [OrbitPose(yaw_deg=-40), OrbitPose(yaw_deg=-30)]
    out = render_views(avatar, poses, S)
    outline = outline_px(avatar, poses)
    for v, pose in enumerate(poses):
        face = cv2.erode(polygon(outline[v], filled=True).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        unseen = face & (out.seen[v, 0].numpy() < 0.5)
        assert unseen.sum() > 200, "the view should show surface the source did not see"
        gy, gx = np.gradient(out.rgb[v].mean(0).numpy())
        jxx, jyy, jxy = (cv2.blur(a, (9, 9)) for a in (gx * gx, gy * gy, gx * gy))
        coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-9)
        streaks = float((coherence[unseen] > 0.7).mean())
        assert streaks < 0.1, f"{pose}: {100 * streaks:.0f} % of the completed cheek is streaks"


@pytest.mark.parametrize("name", ["lp_s42", "lp_s12", "lp_d12_f000"])
def test_no_view_sees_through_the_face(analyzer, test_data, name):
    """The face mesh folds where MediaPipe's landmarks cross in a turned view (an open mouth's inner lips, the nostrils):
    culled as the back of a closed surface, the fold let the view see the shell's inside and the card behind the head,
    a jagged black line along the lips at yaw +-25..40. Inside the face outline (less 3 pixels) every pixel the view
    draws is the face mesh (before: 1-12 pixels a view at 256 px showed the shell or the card)."""
    image = read_image(test_data / f"{name}.jpg")
    avatar = build_avatar(image, analyzer.analyze(image), render_size=S)
    poses = [OrbitPose(yaw_deg=y, pitch_deg=p) for y, p in ((40, 0), (-40, 0), (25, -15), (-25, 15), (30, 0), (-30, 0))]
    viewmats, Ks = avatar.cameras(poses, S)
    frags = rasterize(project(avatar.verts[None].expand(len(poses), -1, -1), viewmats, Ks), avatar.faces, S, S,
                      cull=avatar.cull, skip=avatar.skip)
    part = avatar.part[frags.face_id.clamp(min=0)].numpy()  # the render's own raster: 0 is the face mesh
    outline = outline_px(avatar, poses)
    for v, pose in enumerate(poses):
        face = cv2.erode(polygon(outline[v], filled=True).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        through = int((face & (part[v] != 0)).sum())
        assert through == 0, f"{name} {pose}: {through} pixels inside the face show what lies behind it"


@pytest.mark.parametrize("name", ["lp_s2", "lp_s1", "lp_s12", "astronaut"])
def test_the_head_reaches_the_top_of_the_hair(analyzer, test_data, astronaut, name):
    """Hair above the cranium ellipsoid was painted on the card behind the head: flat from
    above, cut when the head turns. The head (face mesh and shell) now reaches the top of the
    person's silhouette in the source view, within 0.07 face heights (before: 0.14-0.30 below)."""
    image = astronaut if name == "astronaut" else read_image(test_data / f"{name}.jpg")
    avatar = build_avatar(image, analyzer.analyze(image), render_size=S)
    out = render_views(avatar, [OrbitPose()], S)
    viewmats, Ks = avatar.cameras([OrbitPose()], S)
    topo = mesh_topology(avatar.config.shell_rings, avatar.config.card_grid, False)
    n_head = topo.n_face + topo.n_shell  # face mesh and shell come first
    head = project(avatar.verts[None, :n_head], viewmats, Ks)[0, :, :2].numpy()
    face_h = head[152, 1] - head[10, 1]  # chin below forehead
    x0, x1 = head[234, 0], head[454, 0]  # cheek to cheek
    columns = np.arange(int(x0 + 0.25 * (x1 - x0)), int(x1 - 0.25 * (x1 - x0)))
    alpha = out.alpha[0, 0].numpy()
    top_person = np.mean([np.nonzero(alpha[:, c] > 0.5)[0][0] for c in columns])
    gap = (top_person - head[:, 1].min()) / face_h
    assert gap > -0.07, f"{name}: the head ends {-gap:.2f} face heights below the hair's top"


def test_a_head_cut_by_the_frame_is_not_closed_in_a_dome(analyzer, astronaut):
    """Sitting close to a webcam puts the top of the hair out of frame. The shell closed the head over the cut in
    one flat colour, a faceted helmet in every view, the camera's own too. Now it fades out within 3 % of the crop
    past the cut: in the source view, above the cut (beyond that ramp) nothing opaque is drawn over the head.
    Before: mean alpha 0.27 there (the dome), now under 0.05."""
    image = np.ascontiguousarray(astronaut[60:400, 60:380])  # the hair's top cut by the picture's edge
    analysis = analyzer.analyze(image)
    avatar = build_avatar(image, analysis, render_size=S)
    out = render_views(avatar, [OrbitPose()], S)
    src = analysis.landmarks_px[:, :2]
    view = avatar.project_landmarks([OrbitPose()], S)[0].numpy()
    scale = (view[152, 1] - view[10, 1]) / (src[152, 1] - src[10, 1])  # the crop: source pixels to view pixels
    cut = view[10, 1] - src[10, 1] * scale  # the picture's top edge in the view
    x0, x1 = view[234, 0], view[454, 0]
    columns = slice(int(x0 + 0.25 * (x1 - x0)), int(x1 - 0.25 * (x1 - x0)))
    above = out.alpha[0, 0].numpy()[: int(cut - 0.03 * S - 2), columns]
    assert above.size > 0 and float(above.mean()) < 0.05, f"mean alpha above the cut {float(above.mean()):.2f}"
    # Seen from above and aside, the shell's vertices past the cut took their fill colour from outside the picture:
    # black (before: 68 opaque near-black pixels over the hair of this view; her hair is light brown)
    turned = render_views(avatar, [OrbitPose(yaw_deg=30, pitch_deg=20)], S)
    top = int(avatar.project_landmarks([OrbitPose(yaw_deg=30, pitch_deg=20)], S)[0, 10, 1])  # the forehead's top
    rgb, alpha = turned.rgb[0, :, :top].numpy(), turned.alpha[0, 0, :top].numpy()
    black = int(((rgb.max(0) < 0.08) & (alpha > 0.9)).sum())
    assert black == 0, f"{black} opaque black pixels over the hair"


def _hull(points: np.ndarray, grow: int = 0) -> np.ndarray:
    m = np.zeros((S, S), np.uint8)
    cv2.fillConvexPoly(m, cv2.convexHull(np.round(points).astype(np.int32)), 1)
    return (cv2.dilate(m, np.ones((grow, grow), np.uint8)) if grow else m) > 0


@pytest.mark.parametrize("name", ["lp_s42", "lp_s1", "lp_s12"])
def test_the_face_detail_fades_at_large_angles(analyzer, test_data, monkeypatch, name):
    """Two views' landmarks of one face agree to 6-7 % of the eyes' distance beyond 30 degrees, so
    the face's finest detail lands beside the turned face's own and counts twice in the error (the
    multi-camera sets: +0.07 and +0.17 dB at 30-45 and 45-60 degrees without it). Against the same
    render without the fade: the source's own view is the same picture; at +-45 degrees the fine
    detail (|gray - 3x3 mean|) on the face is below 0.95 of it (0.55-0.78 now) while the eyes keep
    more than half of theirs (0.60-0.78)."""
    from models.avatar import render as render_mod
    from models.avatar.topology import EXPRESSION_LANDMARKS

    image = read_image(test_data / f"{name}.jpg")
    avatar = build_avatar(image, analyzer.analyze(image), render_size=S)
    poses = [OrbitPose(yaw_deg=y) for y in (0, -45, 45)]
    faded = render_views(avatar, poses, S).rgb
    monkeypatch.setattr(render_mod, "_FACE_DETAIL_DEG", (1e3, 2e3))
    sharp = render_views(avatar, poses, S).rgb
    assert torch.equal(faded[0], sharp[0])
    landmarks = avatar.project_landmarks(poses, S).numpy()[..., :2]

    def detail(rgb: torch.Tensor) -> np.ndarray:
        gray = rgb.mean(0).numpy()
        return np.abs(gray - cv2.blur(gray, (3, 3)))

    for v in (1, 2):
        oval = cv2.erode(_hull(landmarks[v, face_model().face_oval]).astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
        eyes = oval & (_hull(landmarks[v, list(EXPRESSION_LANDMARKS[40:56])])
                       | _hull(landmarks[v, list(EXPRESSION_LANDMARKS[56:72])]))
        a, b = detail(faded[v]), detail(sharp[v])
        face_ratio, eye_ratio = a[oval].mean() / b[oval].mean(), a[eyes].mean() / b[eyes].mean()
        assert face_ratio < 0.95 and eye_ratio > 0.5, f"{poses[v]}: face detail x{face_ratio:.2f}, eyes x{eye_ratio:.2f}"


def test_stretched_surface_near_the_source_view_keeps_its_low_pass_colour(analyzer, test_data, monkeypatch):
    """Turned 15 degrees, the near side of the head (the temple's hair, the side of the cheek) is surface the source
    saw at a grazing angle, its texture stretched past the limit for detail: it takes the source's own low-pass colour
    instead of the fill's (the validation clips' identity distance 0.391 -> 0.387, landmark error 1.68 -> 1.59 % IOD).
    Against the same render without it: at 15 degrees it changes at least 1 % of the picture, where the colour is at
    least twice as close to the source's own texture unlimited (before: 8-10 levels of 255 off it, now 2.5-3.7); at
    45 degrees, where detail that lands off the turned face's own costs more than it gives, nothing changes."""
    from models.avatar import render as render_mod

    image = read_image(test_data / "lp_s2.jpg")
    avatar = build_avatar(image, analyzer.analyze(image), render_size=S)
    poses = [OrbitPose(yaw_deg=y) for y in (-15, 15, -45, 45)]
    now = render_views(avatar, poses, S).rgb
    monkeypatch.setattr(render_mod, "_STRETCHED_DEG", (-2.0, -1.0))
    before = render_views(avatar, poses, S).rgb
    monkeypatch.setattr(render_mod, "_STRETCH", (100.0, 200.0))
    unlimited = render_views(avatar, poses, S).rgb
    for v in (0, 1):
        changed = (now[v] - before[v]).abs().amax(0) > 2 / 255
        assert float(changed.float().mean()) > 0.01, f"{poses[v]}: {100 * float(changed.float().mean()):.2f} % changed"
        off_now = float((now[v] - unlimited[v]).abs().mean(0)[changed].mean())
        off_before = float((before[v] - unlimited[v]).abs().mean(0)[changed].mean())
        assert off_now < 0.5 * off_before, f"{poses[v]}: {255 * off_now:.1f} levels off the source's own, before {255 * off_before:.1f}"
    for v in (2, 3):
        assert torch.equal(now[v], before[v]), f"{poses[v]}"


def _line_along_the_outline(out, pictures) -> list[float]:
    """Per view, the mean colour distance (levels of 255) between the revealed card beside the shell (card the source
    did not see, within 2 pixels of the shell) and the shell's own hair next to it (its 5x5 mean)."""
    shell, card, seen, alpha = (pictures[:, 5] > 0.5), (pictures[:, 6] > 0.5), pictures[:, 4], pictures[:, 3]
    gaps = []
    for v in range(out.rgb.shape[0]):
        s = shell[v].numpy().astype(np.uint8)
        near = cv2.dilate(s, np.ones((5, 5), np.uint8)) > 0
        strip = near & card[v].numpy() & (seen[v] < 0.5).numpy() & (alpha[v] > 0.5).numpy()
        rgb = out.rgb[v].permute(1, 2, 0).numpy()
        shell_sum = cv2.boxFilter(rgb * s[..., None], -1, (5, 5), normalize=False)
        shell_n = cv2.boxFilter(s.astype(np.float32), -1, (5, 5), normalize=False)[..., None]
        hair = shell_sum / np.maximum(shell_n, 1e-6)
        gaps.append(float(np.abs(rgb - hair)[strip].mean() * 255) if strip.sum() >= 20 else 0.0)
    return gaps


def test_no_light_line_along_the_outline_over_the_hair(analyzer, test_data, monkeypatch):
    """Turned 20-40 degrees, card the head hid in the source shows beside the shell: drawn from the low-pass fill of
    the nearest card the source saw (the hair's lighter fringe), it made a light line along the head's outline over
    the hair. It now continues the shell's hair. Measured against the same render without that step (the code before
    it: 18.9 and 25.8 levels of 255 at yaw -21 and +40; with it 3.0 and 4.2)."""
    import models.avatar.render as render

    image = read_image(test_data / "lp_d12_f060.jpg")
    avatar = build_avatar(image, analyzer.analyze(image), render_size=S)
    poses = [OrbitPose(yaw_deg=y, pitch_deg=3.0) for y in (-21.0, 40.0)]
    seen_pictures = []
    continue_hair = render._continue_hair

    def recorded(pictures, size):
        seen_pictures.append(pictures.clone())
        return continue_hair(pictures, size)

    monkeypatch.setattr(render, "_continue_hair", recorded)
    with_it = _line_along_the_outline(render_views(avatar, poses, S), seen_pictures[-1])
    monkeypatch.setattr(render, "_continue_hair", lambda pictures, size: recorded(pictures, size) * 0 + pictures[:, :3])
    without = _line_along_the_outline(render_views(avatar, poses, S), seen_pictures[-1])
    assert min(without) > 12.0, f"the line without the step: {without} (the test no longer sees it)"
    assert max(with_it) < 8.0, f"light line along the outline over the hair: {with_it} levels (without: {without})"


def test_the_revealed_card_takes_the_shell_s_hair_and_nothing_else_moves():
    """_continue_hair on a synthetic picture: shell (dark hair) on the left, unseen card beside it (light), unseen card
    far from it, card the source saw beside it, face pixels beside it."""
    from models.avatar.render import _continue_hair

    p = torch.zeros(1, 7, 64, 64)
    hair, light = torch.tensor([0.3, 0.2, 0.1]), torch.tensor([0.6, 0.5, 0.4])
    p[0, :3, :, :32], p[0, 3, :, :32], p[0, 4, :, :32], p[0, 5, :, :32] = hair[:, None, None], 1.0, 1.0, 1.0
    p[0, :3, :, 32:], p[0, 3, :, 32:], p[0, 6, :, 32:] = light[:, None, None], 1.0, 1.0  # card, unseen (seen 0)
    p[0, 4, :16, 32:] = 1.0  # rows 0-15: card the source saw
    p[0, 6, 48:, 32:34] = 0.0  # rows 48-63, columns 32-33: face, not card
    p[0, :4, 40:44, 32] *= 0.5  # half-covered card pixels: premultiplied
    out = _continue_hair(p, 64)  # a 64-px view: a box of 3 cells of 2 x 2 pixels
    torch.testing.assert_close(out[0, :, 20:40, 32:34], hair[:, None, None].expand(3, 20, 2))  # beside the shell: its hair
    torch.testing.assert_close(out[0, :, 40:44, 32], (hair * 0.5)[:, None].expand(3, 4))
    torch.testing.assert_close(out[0, :, 20:40, 36], p[0, :3, 20:40, 36])  # its box holds no shell: as it was
    torch.testing.assert_close(out[0, :, 20:40, 40:], p[0, :3, 20:40, 40:])  # far from the shell: as it was
    torch.testing.assert_close(out[0, :, :16, 32:], p[0, :3, :16, 32:])  # seen: as it was
    torch.testing.assert_close(out[0, :, 48:, 32:34], p[0, :3, 48:, 32:34])  # the face: as it was
    torch.testing.assert_close(out[0, :, :, :32], p[0, :3, :, :32])  # the shell: as it was


def test_the_hair_s_continuation_is_the_same_at_the_changed_pixels_as_everywhere():
    """The CPU gathers the pixels that may change; CUDA's fixed shapes take whole pictures: the same numbers."""
    from models.avatar.render import _continue_hair_everywhere, _continue_hair_pixels
    from models.avatar.texture import box_mean

    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 7, 64, 64, generator=g)
    p[:, 5] = (torch.rand(2, 64, 64, generator=g) > 0.7) * torch.rand(2, 64, 64, generator=g)  # shell coverage
    p[:, 6] = (p[:, 5] == 0) * (torch.rand(2, 64, 64, generator=g) > 0.3).float()  # card coverage
    p[:, 4] = (torch.rand(2, 64, 64, generator=g) > 0.5) * torch.rand(2, 64, 64, generator=g)  # seen
    near = box_mean(torch.rand(2, 4, 32, 32, generator=g), 3)
    torch.testing.assert_close(_continue_hair_pixels(p, near), _continue_hair_everywhere(p, near))
    odd = p[:, :, :63, :61].contiguous()  # an odd side: the last row or column has a cell of its own
    torch.testing.assert_close(_continue_hair_pixels(odd, near), _continue_hair_everywhere(odd, near))


@pytest.mark.parametrize("name", ["lp_s42", "lp_s1", "lp_s12", "lp_d12_f000"])
def test_no_swollen_band_under_the_jaw_s_sides(analyzer, test_data, name):
    """Turned and seen from below, the jaw's sides wore a dark band like a beard or a swollen jaw: the shell's floor under
    them, the cranium ellipsoid's, hung up to 1.2 cm below the jaw line out to the ears, in the hair's colour diffused onto
    surface the source never saw. Of the shell the views draw on the sweeps from the jaw's sides (between the mouth's
    corners' height and 2.5 cm below them), no pixel lies more than the floor's margin (0.5 cm) and 1 mm below the
    outline point its sweep starts from (before: 41-456 pixels over these four 256-px views of each still, down to 1.2
    cm below)."""
    from models.avatar.topology import JAW_FLOOR, MOUTH_CORNERS

    image = read_image(test_data / f"{name}.jpg")
    analysis = analyzer.analyze(image)
    avatar = build_avatar(image, analysis, render_size=S)
    topo = mesh_topology(avatar.config.shell_rings, avatar.config.card_grid, False)
    model = face_model()
    below = model.vertices[model.face_oval, 1] - model.vertices[list(MOUTH_CORNERS), 1].max()
    sides = np.nonzero((below > 0.0) & (below < 0.025))[0]  # sweeps, by the canonical face
    y = ((avatar.verts.numpy() - analysis.pose.translation) @ analysis.pose.rotation)[:, 1]  # head frame, y down
    drop = np.zeros(len(y))
    rings = topo.ring_ids[1:, sides]  # [K, sweeps]
    drop[rings] = y[rings] - y[topo.ring_ids[0, sides]][None]
    poses = [OrbitPose(yaw_deg=yaw, pitch_deg=pitch) for yaw in (-30, 30) for pitch in (-25, -10)]
    viewmats, Ks = avatar.cameras(poses, S)
    frags = rasterize(project(avatar.verts[None].expand(len(poses), -1, -1), viewmats, Ks), avatar.faces, S, S,
                      cull=avatar.cull, skip=avatar.skip)
    face_px = frags.face_px.numpy()
    shell = avatar.part.numpy()[face_px] == 1
    if frags.pixels is not None:  # sparse: the covered pixels only
        shell &= frags.face_id.reshape(-1).numpy()[frags.pixels.numpy()] >= 0
    else:
        shell &= frags.face_id.reshape(-1).numpy() >= 0
    pixel_drop = (drop[avatar.faces.numpy()[face_px]] * frags.bary_px.numpy()).sum(-1)
    hanging = int((shell & (pixel_drop > JAW_FLOOR[0] + 0.001)).sum())
    assert hanging == 0, f"{name}: {hanging} pixels of shell hang more than {JAW_FLOOR[0] + 0.001} m below the jaw's sides"
