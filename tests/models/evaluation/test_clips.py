"""Clip index on tiny clips the test writes itself, and pair selection on hand-made poses."""
from pathlib import Path

import numpy as np
import pytest

from models.evaluation import clips
from models.evaluation.clips import (
    DEFAULT_BINS,
    ClipIndex,
    ClipIndexConfig,
    Pair,
    VideoReadError,
    bin_label,
    clip_identity,
    index_clip,
    near_frontal_frames,
    pairs,
    reference_frame,
    split_by_identity,
)
from models.face.analysis import NoFaceError
from tests.tiny_clips import write_face_clip, write_faceless_clip


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory):
    return write_face_clip(tmp_path_factory.mktemp("clips") / "astronaut_turn.mp4", n=10)


@pytest.fixture(scope="module")
def faceless_clip(tmp_path_factory):
    return write_faceless_clip(tmp_path_factory.mktemp("clips") / "gradients.mp4")


def test_index_clip_records_landmarks_pose_and_masks(face_clip):
    index = index_clip(face_clip, progress=False)
    assert len(index) == 10 and index.found.all()
    assert index.image_size == (160, 160) and index.fps == pytest.approx(10.0)
    assert index.landmarks.shape == (10, 478, 3) and index.landmarks.dtype == np.float32
    assert index.masks.shape == (10, 160, 160) and index.masks.dtype == np.uint8
    assert np.abs(index.pose_deg[:, 0]).max() < 30.0
    mask = index.person_mask(3)
    assert mask.shape == (160, 160) and 0.1 < mask.mean() < 0.95
    head = index.head_mask(3)
    assert set(np.unique(head)) <= {0.0, 1.0} and 0 < head.sum() <= (mask > 0.5).sum()
    obs = index.observation(3)
    assert obs.landmarks_px.shape == (478, 3) and obs.mask.shape == (160, 160)
    assert obs.pose.yaw_deg == pytest.approx(index.yaw_deg(3), abs=1e-3)
    frames = index.read_frames([7, 2])
    assert sorted(frames) == [2, 7] and frames[7].shape == (160, 160, 3)


def test_index_clip_stride_and_max_frames(face_clip):
    index = index_clip(face_clip, ClipIndexConfig(stride=3, max_frames=3, mask_size=64), progress=False)
    assert index.frame_ids.tolist() == [0, 3, 6]
    assert index.masks.shape == (3, 64, 64)
    with pytest.raises(KeyError, match="expected an analysed frame id"):
        index.position(1)


def test_index_clip_cache_is_reused_and_keyed_by_settings(face_clip, tmp_path, monkeypatch):
    first = index_clip(face_clip, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    def no_analysis(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(clips, "FaceAnalyzer", no_analysis)
    again = index_clip(face_clip, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(again.landmarks, first.landmarks)
    np.testing.assert_array_equal(again.masks, first.masks)
    assert again.config == first.config and again.image_size == first.image_size
    with pytest.raises(AssertionError, match="cache"):
        index_clip(face_clip, ClipIndexConfig(stride=2), cache_dir=tmp_path, progress=False)
    # The same file named from another folder (a relative path): the cached index reads it through that name.
    monkeypatch.chdir(Path(face_clip).parent)
    relative = index_clip(Path(face_clip).name, cache_dir=tmp_path, progress=False)
    assert relative.path == Path(face_clip).name
    monkeypatch.chdir(tmp_path)
    moved = index_clip(face_clip, cache_dir=tmp_path, progress=False)
    assert moved.path == str(face_clip)
    frame = int(moved.frame_ids[0])
    np.testing.assert_array_equal(moved.read_frames([frame])[frame], first.read_frames([frame])[frame])


def test_faceless_clip_records_missing_frames(faceless_clip):
    index = index_clip(faceless_clip, progress=False)
    assert len(index) == 6 and not index.found.any()
    assert np.isnan(index.pose_deg).all()
    with pytest.raises(NoFaceError, match="no face in any analysed frame"):
        reference_frame(index)
    with pytest.raises(NoFaceError):
        index.observation(0)


def test_unreadable_video_is_a_clear_error(tmp_path):
    with pytest.raises(VideoReadError, match="no such file"):
        index_clip(tmp_path / "missing.mp4", progress=False)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(VideoReadError, match="bad.mp4"):
        index_clip(bad, progress=False)
    with pytest.raises(VideoReadError, match="it is a directory"):
        index_clip(tmp_path, progress=False)


def synthetic_index(yaw, pitch=None, found=None):
    """A ClipIndex with hand-set poses (no video behind it)."""
    n = len(yaw)
    pitch = np.zeros(n) if pitch is None else np.asarray(pitch, float)
    found = np.ones(n, bool) if found is None else np.asarray(found, bool)
    pose = np.stack([yaw, pitch, np.zeros(n)], 1).astype(np.float32)
    pose[~found] = np.nan
    return ClipIndex(
        path="synthetic.mp4", config=ClipIndexConfig(), image_size=(64, 64), fps=30.0,
        frame_ids=np.arange(n), found=found, landmarks=np.zeros((n, 478, 3), np.float32),
        pose_deg=pose, masks=np.zeros((n, 8, 8), np.uint8),
    )


def test_reference_is_the_most_frontal_frame_with_pitch_from_the_clip_median():
    # Frame 1 has yaw 1 but pitch far from the clip's median (10): score 1 + 0.5 * 10 = 6.
    # Frame 3 has yaw 2 at the median pitch: score 2. It wins.
    index = synthetic_index(yaw=[20, 1, 15, 2, -30], pitch=[10, 20, 10, 10, 10])
    assert reference_frame(index) == 3
    assert reference_frame(index, pitch_weight=0.0) == 1
    assert near_frontal_frames(index, max_score_deg=6.0) == [1, 3]


def test_pairs_bins_exclusions_and_order():
    # yaw of frame k: the reference (frame 0) at 0, then targets.
    yaw = [0.0, 0.3, 5.0, 0.2, 4.0, 12.0, -25.0, 33.0, 50.0, -9.9, 0.4, 10.0]
    found = [True] * 11 + [False]
    index = synthetic_index(yaw, found=found)
    got = pairs(index, ref=0, min_gap_frames=3, min_yaw_diff_deg=0.5, max_per_bin=None)
    assert all(isinstance(p, Pair) for p in got)
    assert [(p.tgt, p.bin) for p in got] == [
        (4, (0.0, 10.0)),   # frames 1, 2 are too close in time; 3 and 10 too close in yaw
        (9, (0.0, 10.0)),   # |-9.9| < 10
        (5, (10.0, 20.0)),  # frame 11 (yaw 10) has no face
        (6, (20.0, 30.0)),
        (7, (30.0, 45.0)),  # 50 is past the last bin
    ]
    ref, tgt, yaw_diff, b = got[2]
    assert (ref, tgt, yaw_diff, bin_label(b)) == (0, 5, 12.0, "10-20")
    assert got[1].yaw_diff_deg == pytest.approx(-9.9, abs=1e-5)


def test_pairs_sampling_is_deterministic_by_default_and_seeded_otherwise():
    yaw = np.concatenate([[0.0], np.linspace(1, 9, 40)])
    index = synthetic_index(yaw)
    even = pairs(index, bins=DEFAULT_BINS[:1], max_per_bin=5, min_gap_frames=1)
    assert [p.tgt for p in even] == [1, 11, 21, 30, 40]  # positions round(linspace(0, 39, 5))
    assert pairs(index, bins=DEFAULT_BINS[:1], max_per_bin=5, min_gap_frames=1) == even
    a = pairs(index, bins=DEFAULT_BINS[:1], max_per_bin=5, min_gap_frames=1, rng=7)
    b = pairs(index, bins=DEFAULT_BINS[:1], max_per_bin=5, min_gap_frames=1, rng=np.random.default_rng(7))
    assert a == b and len(a) == 5 and a != even
    assert [p.tgt for p in a] == sorted(p.tgt for p in a)


def test_pairs_from_several_references():
    index = synthetic_index([0.0, 1.0, 20.0, 21.0, 0.2, 25.0])
    got = pairs(index, ref=[0, 4], min_gap_frames=1, max_per_bin=None)
    assert {(p.ref, p.tgt) for p in got} == {(0, 1), (0, 2), (0, 3), (0, 5), (4, 1), (4, 2), (4, 3), (4, 5)}


def test_clip_identity_and_split_by_identity():
    assert clip_identity("styletalk_Obama_clip2") == clip_identity("styletalk_Obama_clip3.mp4")
    assert clip_identity("styletalk_andrew_clip_1") == clip_identity("styletalk_andrew_clip_2")
    assert clip_identity("styletalk_feifeili_clip2_short") == clip_identity("styletalk_feifeili_clip1")
    assert clip_identity("dreamtalk_M030_front_angry_level3_001") == "m030"
    names = ["styletalk_Obama_clip1", "lp_d0", "styletalk_Obama_clip2", "dreamtalk_W009_front_sad_level3_001",
             "dreamtalk_W009_front_fear_level3_001", "lp_d3"]
    train, val = split_by_identity(names, ["styletalk_Obama_clip2", "dreamtalk_W009_front_sad_level3_001"])
    assert train == ["lp_d0", "lp_d3"]
    assert val == ["styletalk_Obama_clip1", "styletalk_Obama_clip2", "dreamtalk_W009_front_sad_level3_001",
                   "dreamtalk_W009_front_fear_level3_001"]
    with pytest.raises(ValueError, match="unknown"):
        split_by_identity(names, ["nobody"])
