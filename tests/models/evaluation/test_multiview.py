"""Multi-camera sets: reading set folders, the reference, the targets' angles (cameras or measured),
the mapping into the reference camera, and the harness on sets the tests render themselves."""
import json
import math
import types

import cv2
import numpy as np
import pytest

from models.evaluation import CallableRunner, EvalConfig, evaluate, write_results
from models.evaluation.metrics import PSNR_MAX_DB, masked_psnr
from models.evaluation.multiview import (
    MultiviewConfig,
    SetAnalysis,
    SetReadError,
    View,
    MultiviewSet,
    align_to_reference,
    find_sets,
    read_set,
    target_angles,
    view_angle_deg,
)
from models.face.analysis import head_region_mask
from tests.multiview_sets import AVATAR_VIEWS, write_avatar_set, write_photo_set
from tests.tiny_clips import astronaut_face, write_face_clip

FAST = EvalConfig(size=96, identity=False, flicker=False)


@pytest.fixture(scope="module")
def set_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    write_avatar_set(root / "astro")
    write_photo_set(root / "photos")
    (root / "notes").mkdir()  # neither pictures nor views.json: not a set
    (root / "notes" / "README.md").write_text("not a set")
    return root


def oracle(case):
    return case.framing.crop(case.tgt_frame)


# -- reading ---------------------------------------------------------------------------------------------


def test_find_sets_takes_set_folders_and_folders_of_sets(set_root, tmp_path):
    assert find_sets(set_root) == [set_root / "astro", set_root / "photos"]
    assert find_sets([set_root / "photos"]) == [set_root / "photos"]
    with pytest.raises(SetReadError, match="no such folder"):
        find_sets(tmp_path / "nowhere")


def test_read_set_from_views_json_or_from_the_pictures(set_root):
    astro = read_set(set_root / "astro")
    assert [v.file for v in astro.views] == [f"view_{k}.png" for k in range(len(AVATAR_VIEWS))] + ["back.png"]
    assert astro.views[1].azimuth_deg == pytest.approx(100.0 + 30.0) and astro.views[3].elevation_deg == 15.0
    photos = read_set(set_root / "photos")
    assert [v.file for v in photos.views] == ["photo_0.png", "photo_1.png", "photo_2.png"]
    assert all(v.azimuth_deg is None for v in photos.views) and photos.reference is None


def test_read_set_rejects_what_it_cannot_use(set_root, tmp_path):
    def write(doc):
        d = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for name in ("a.png", "b.png"):
            (d / name).write_bytes((set_root / "photos" / "photo_0.png").read_bytes())
        (d / "views.json").write_text(json.dumps(doc))
        return d

    assert [v.file for v in read_set(write({"tiles": ["a.png", "b.png"]})).views] == ["a.png", "b.png"]
    assert read_set(write({"views": [{"file": "a.png"}, {"file": "b.png"}], "reference": "b.png"})).reference == "b.png"
    for doc, message in [
        ({"views": [{"file": "a.png"}, {"file": "c.png"}]}, "no file"),
        ({"views": [{"file": "a.png"}]}, "at least 2 views"),
        ({"views": [{"file": "a.png"}, {"file": "b.png"}], "reference": "z.png"}, "reference"),
        ({"views": [{"file": "a.png", "azimuth_deg": "left"}, {"file": "b.png"}]}, "azimuth_deg"),
        ({"cameras": []}, "expected views.json"),
    ]:
        with pytest.raises(SetReadError, match=message):
            read_set(write(doc))


# -- angles ----------------------------------------------------------------------------------------------


def test_view_angle():
    assert view_angle_deg(30.0, 0.0) == pytest.approx(30.0)
    assert view_angle_deg(0.0, -20.0) == pytest.approx(20.0)
    assert view_angle_deg(30.0, 40.0) == pytest.approx(math.degrees(math.acos(math.cos(math.radians(30))
                                                                              * math.cos(math.radians(40)))))


def _analysis(views, measured):
    """A SetAnalysis whose observations carry only the measured (yaw, pitch) of each view."""
    obs = {f: types.SimpleNamespace(pose=types.SimpleNamespace(yaw_deg=y, pitch_deg=p)) for f, (y, p) in measured.items()}
    return SetAnalysis(MultiviewSet(None, tuple(views)), {}, obs, {})


def test_target_angles_from_the_cameras_with_the_sign_of_the_rig():
    # A rig whose azimuth grows against our yaw and wraps through 180: measured yaws read 15-20 % low.
    views = [View("ref", azimuth_deg=170.0), View("a", azimuth_deg=-150.0), View("b", azimuth_deg=130.0)]
    angles, note = target_angles(_analysis(views, {"ref": (2.0, 5.0), "a": (-30.0, 1.0), "b": (35.0, 20.0)}), "ref")
    assert angles["a"].yaw_diff_deg == pytest.approx(-40.0) and angles["b"].yaw_diff_deg == pytest.approx(40.0)
    assert angles["a"].yaw_source == "cameras" and angles["a"].pitch_source == "measured"
    assert angles["b"].pitch_diff_deg == pytest.approx(15.0) and angles["b"].yaw_diff_measured_deg == pytest.approx(33.0)
    assert angles["b"].angle_deg == pytest.approx(view_angle_deg(40.0, 15.0))
    assert "sign -1 fitted" in note


def test_target_angles_are_measured_when_the_cameras_disagree():
    # Labels that contradict the pictures (a camera 'behind' the reference that sees the face): all measured.
    views = [View("ref", azimuth_deg=0.0), View("a", azimuth_deg=180.0), View("b", azimuth_deg=20.0)]
    angles, note = target_angles(_analysis(views, {"ref": (0.0, 0.0), "a": (30.0, 0.0), "b": (18.0, 0.0)}), "ref")
    assert {a.yaw_source for a in angles.values()} == {"measured"}
    assert angles["a"].yaw_diff_deg == pytest.approx(30.0) and "disagrees" in note
    # A given sign is not second-guessed: the right labels with the wrong sign are dropped too.
    views = [View("ref", azimuth_deg=0.0), View("b", azimuth_deg=20.0)]
    mvset = MultiviewSet(None, tuple(views), azimuth_sign=-1)
    analysis = SetAnalysis(mvset, {}, _analysis(views, {"ref": (0.0, 0.0), "b": (18.0, 0.0)}).observations, {})
    angles, _ = target_angles(analysis, "ref")
    assert angles["b"].yaw_source == "measured"


# -- mapping into the reference camera ---------------------------------------------------------------------


def test_align_to_reference_puts_the_head_where_the_reference_has_it(analyzer):
    face = astronaut_face(200)
    ref = np.full((240, 220, 3), 90, np.uint8)
    ref[20:220, 10:210] = face
    tgt = np.full((400, 420, 3), 90, np.uint8)  # another camera: other size, head larger and elsewhere
    tgt[40:300, 60:320] = cv2.resize(face, (260, 260), interpolation=cv2.INTER_AREA)
    ref_obs, tgt_obs = analyzer.analyze(ref), analyzer.analyze(tgt)
    frame, obs = align_to_reference(tgt, tgt_obs, ref_obs)
    assert frame.shape == ref.shape and obs.image_size == ref_obs.image_size and obs.mask.shape == ref.shape[:2]
    err = np.linalg.norm(obs.landmarks_px[:468, :2] - ref_obs.landmarks_px[:468, :2], axis=1).mean()
    assert err < 0.04 * ref_obs.iod_px
    np.testing.assert_allclose(obs.pose.translation, ref_obs.pose.translation, atol=0.01)
    head = head_region_mask(ref_obs.landmarks_px, ref_obs.image_size)
    assert masked_psnr(frame / 255.0, ref / 255.0, head) > 24.0


# -- the harness on sets -----------------------------------------------------------------------------------


def test_a_method_that_draws_non_finite_values_stops_the_evaluation_with_its_name(set_root):
    """NaN in a render would leave the method's metrics empty and every bin at n=0 without a word (met while
    probing a geometry change): the harness says which method and which target instead."""
    from models.evaluation.harness import MethodOutputError

    def broken(case):
        picture = oracle(case).copy()
        picture[0, 0, 0] = np.nan
        return picture

    with pytest.raises(MethodOutputError, match="method 'raw' drew a picture with values that are not finite"):
        evaluate([], CallableRunner({"raw": broken}), FAST, sets=[set_root / "astro"], progress=False)


def test_oracle_targets_binned_by_the_cameras_angles_and_the_back_view_skipped(set_root):
    res = evaluate([], CallableRunner({"raw": oracle}), FAST, sets=[set_root / "astro"], progress=False)
    assert res.sets == ["astro"] and not res.records and res.set_info["astro"]["reference"] == "view_0.png"
    assert [(s["view"], "no face" in s["reason"]) for s in res.skipped_views] == [("back.png", True)]
    by_view = {r["tgt"]: r for r in res.set_records}
    assert set(by_view) == {"view_1.png", "view_2.png", "view_3.png"}
    for k, (yaw, pitch) in enumerate(AVATAR_VIEWS[1:], start=1):
        r = by_view[f"view_{k}.png"]
        assert (r["yaw_source"], r["pitch_source"]) == ("cameras", "cameras")
        assert r["yaw_diff_deg"] == pytest.approx(yaw, abs=1e-6) and r["pitch_diff_deg"] == pytest.approx(pitch, abs=1e-6)
        assert r["angle_deg"] == pytest.approx(view_angle_deg(yaw, pitch))
        assert abs(r["yaw_diff_measured_deg"] - yaw) < 0.3 * abs(yaw) + 3.0  # MediaPipe reads large yaws low
        assert r["methods"]["raw"]["psnr_head"] == PSNR_MAX_DB  # the target, scored in the reference's crop camera
        assert r["methods"]["baseline"]["psnr_head"] < 25.0
    assert by_view["view_3.png"]["bin"] == "10-20" and by_view["view_1.png"]["bin"] == "30-45"


def test_avatar_beats_the_reference_photo_on_its_own_renders(set_root):
    from models.evaluation import AvatarRunner

    res = evaluate([], AvatarRunner(), FAST, sets=[set_root / "astro"], progress=False)
    assert len(res.set_records) == 3
    for r in res.set_records:
        raw, base = r["methods"]["raw"], r["methods"]["baseline"]
        assert raw["psnr_head"] > 20.0 and raw["psnr_head"] > base["psnr_head"] + 3.0, r["tgt"]
        assert raw["lmk_err_pct"] < 5.0 < base["lmk_err_pct"]


def test_clips_and_sets_are_reported_apart(set_root, tmp_path):
    write_face_clip(tmp_path / "turn.mp4", n=8)
    out = tmp_path / "out"
    config = EvalConfig(size=96, identity=False, min_gap_frames=1, flicker=False)
    res = evaluate([tmp_path / "turn.mp4"], CallableRunner({"raw": oracle}), config, out_dir=out, progress=False,
                   sets=[set_root / "photos", set_root / "notes"])
    assert res.clips == ["turn"] and res.records and all("clip" in r for r in res.records)
    assert res.sets == ["photos"] and {r["set"] for r in res.set_records} == {"photos"}
    assert [s["set"] for s in res.set_skipped] == ["notes"]
    paths = write_results(res, out)
    doc = json.loads(paths["json"].read_text())
    assert len(doc["pairs"]) == len(res.records) and len(doc["multiview"]["targets"]) == len(res.set_records)
    assert list(doc["multiview"]["per_bin"]) == ["0-10", "10-20", "20-30", "30-45", "45-60", "60+"]
    assert list(doc["per_bin"]) == ["0-10", "10-20", "20-30", "30-45"]
    assert doc["multiview"]["per_bin"]["0-10"]["raw"]["psnr_head"]["n"] == 2
    assert doc["multiview"]["info"]["photos"]["angles"] == "yaw measured; pitch measured"
    md = paths["md"].read_text()
    clip_part, set_part = md.split("## Multi-camera (same moment)")
    assert "## Reenactment (other frame of a clip)" in clip_part and "| turn |" in clip_part
    assert "photo_0.png" not in clip_part and "| photos | photo_1.png | 2 |" in set_part
    assert "45-60 deg | 60+ deg" in set_part and "notes:" in set_part
    assert (out / "sheets" / "multiview" / "photos.png").exists() and (out / "plots" / "multiview_psnr_head.png").exists()


def test_the_shared_multi_camera_sets(shared_data):
    """The real captures of ../shared/data/multiview (evaluation only; nothing of them is kept)."""
    root = shared_data / "multiview"
    if not root.is_dir():
        pytest.skip(f"no multi-camera sets at {root}")
    config = EvalConfig(size=64, identity=False, landmarks=False, flicker=False)
    res = evaluate([], CallableRunner(), config, sets=find_sets(root), progress=False)
    assert len(res.sets) == 6 and not res.set_skipped
    info = res.set_info
    assert info["renderme360_s_cosplay_21cam"]["reference"].startswith("cam24_")
    assert info["renderme360_s_cosplay_21cam"]["angles"].startswith("yaw from the cameras")
    assert info["renderme360_s3_4cam"]["angles"].startswith("yaw measured")  # its azimuth labels contradict the faces
    back = [s for s in res.skipped_views if s["set"] == "renderme360_s_cosplay_21cam"]
    assert len(back) == 11 and all("no face" in s["reason"] for s in back)
    bins = {r["bin"] for r in res.set_records}
    assert {"30-45", "45-60", "60+"} <= bins
