"""The harness end to end on tiny clips the test writes itself (baseline plus
injected methods; the avatar is not needed)."""
import json
import math

import numpy as np
import pytest

from models.evaluation.clips import ClipIndexConfig
from models.evaluation import (
    METRICS,
    CallableRunner,
    EvalConfig,
    FaceBoxFraming,
    aggregate,
    evaluate,
    write_results,
)
from models.evaluation.metrics import PSNR_MAX_DB
from tests.fake_avatar import fake_avatar_module
from tests.tiny_clips import write_face_clip, write_faceless_clip

TINY = EvalConfig(size=96, min_gap_frames=1, max_pairs_per_bin=4, identity=False, flicker=True,
                  flicker_yaw_deg=2.0, flicker_step_deg=1.0, index=ClipIndexConfig(mask_size=64))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    write_face_clip(d / "astronaut_turn.mp4", n=10)
    write_faceless_clip(d / "gradients.mp4")
    return d


def oracle(case):
    return case.framing.crop(case.tgt_frame)


def off_by_005(case):
    """The target with every value moved by exactly 0.05: PSNR = 10 log10(1 / 0.0025) = 26.0206 dB."""
    t = case.framing.crop(case.tgt_frame)
    return np.where(t <= 0.95, t + 0.05, t - 0.05)


class OrbitRunner(CallableRunner):
    """A fake 'raw' orbit that pans 1 px per view, and a 'refined' one that adds flicker."""

    def __init__(self):
        super().__init__({"raw": oracle, "refined": off_by_005})

    def orbit(self, framing, poses):
        base = framing.source_view()
        raw = np.stack([np.roll(base, k, axis=1) for k in range(len(poses))])
        wobble = np.array([0.0 if k % 2 == 0 else 0.1 for k in range(len(poses))])[:, None, None, None]
        refined = np.clip(raw * 0.8 + wobble, 0, 1)
        alpha = np.zeros(raw.shape[:3], np.float32)
        alpha[:, 10:-10, 10:-10] = 1.0
        return {"raw": raw, "refined": refined, "alpha": alpha}


@pytest.fixture(scope="module")
def result(clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    res = evaluate(sorted(clip_dir.iterdir()), OrbitRunner(), TINY, out_dir=out, progress=False)
    return res, out


def test_faceless_clip_is_skipped_with_a_message(result):
    res, _ = result
    assert res.clips == ["astronaut_turn"]
    assert [s["clip"] for s in res.skipped] == ["gradients"]
    assert "no face" in res.skipped[0]["reason"]


def test_pairs_are_scored_with_hand_checkable_values(result):
    res, _ = result
    assert res.methods == ("baseline", "raw", "refined")
    assert 1 <= len(res.records) <= 4 and all(r["bin"] == "0-10" for r in res.records)
    for r in res.records:
        assert r["ref"] != r["tgt"] and r["abs_yaw_diff_deg"] >= TINY.min_yaw_diff_deg
        assert 0 < r["head_px"] <= r["person_px"]
        assert r["methods"]["raw"]["psnr_head"] == PSNR_MAX_DB
        assert r["methods"]["raw"]["ssim_head"] == pytest.approx(1.0)
        assert r["methods"]["refined"]["psnr_head"] == pytest.approx(10 * math.log10(400.0), abs=1e-4)
        assert r["methods"]["refined"]["psnr_person"] == pytest.approx(10 * math.log10(400.0), abs=1e-4)
        base = r["methods"]["baseline"]
        assert 8.0 < base["psnr_head"] < 40.0 and -1.0 < base["ssim_head"] < 1.0
        # the gains that fit best include 1 (no change): the diagnostic is never below the score
        assert base["psnr_head_gain"] >= base["psnr_head"] - 1e-9
        assert r["methods"]["raw"]["lmk_err_pct"] == pytest.approx(0.0, abs=1e-6)


def test_flicker_separates_the_refiner_wobble(result):
    res, _ = result
    f = res.flicker["astronaut_turn"]
    assert f["raw"] < 0.01  # a pure pan, compensated
    assert f["refined"] > 0.05  # alternating +0.1 brightness
    assert f["refined_minus_raw"] == pytest.approx(f["refined"] - f["raw"])


def test_written_results(result):
    res, out = result
    paths = write_results(res, out)
    doc = json.loads(paths["json"].read_text())  # strict JSON: no NaN / Infinity
    assert set(doc) >= {"meta", "overall", "per_bin", "per_clip", "pairs", "skipped", "flicker"}
    assert doc["meta"]["config"]["size"] == 96
    assert set(doc["per_bin"]) == {"0-10", "10-20", "20-30", "30-45"}
    assert doc["per_bin"]["10-20"]["baseline"]["psnr_head"]["n"] == 0
    assert doc["overall"]["raw"]["psnr_head"]["mean"] == PSNR_MAX_DB
    md = paths["md"].read_text()
    assert "HEAD mask" in md and "PERSON mask" in md and "gradients: no face" in md
    assert "gain fitted to the target" in md
    assert (out / "sheets" / "astronaut_turn.png").exists()
    assert (out / "plots" / "psnr_head.png").exists()


def test_aggregate_means_medians_and_failures():
    def rec(clip, b, psnr, failed):
        m = {k: None for k in METRICS}
        m.update(psnr_head=psnr, lmk_failed=failed)
        return {"clip": clip, "bin": b, "methods": {"baseline": m}}

    records = [rec("a", "0-10", 20.0, False), rec("a", "10-20", 14.0, True), rec("b", "0-10", 18.0, False)]
    s = aggregate(records, ["baseline"])
    assert s["per_bin"]["0-10"]["baseline"]["psnr_head"] == {"mean": 19.0, "median": 19.0, "std": 1.0, "n": 2}
    assert s["overall"]["baseline"]["psnr_head"]["mean"] == pytest.approx(52.0 / 3)
    assert s["overall"]["baseline"]["lmk_fail_rate"] == pytest.approx(1 / 3)
    assert s["per_clip"]["a"]["all"]["baseline"]["psnr_head"]["n"] == 2
    assert "20-30" not in s["per_clip"]["a"]


def test_face_box_framing_maps_pixel_centres():
    class Obs:
        landmarks_px = np.zeros((478, 3), np.float32)

    # Mesh box 40..60 x 40..60 (h = 20), scale 2, drop 0: a 40 px square centred at (50, 50).
    Obs.landmarks_px[:, :2] = np.random.default_rng(0).uniform(40, 60, (478, 2))
    Obs.landmarks_px[0, :2], Obs.landmarks_px[1, :2] = (40, 40), (60, 60)
    image = np.zeros((100, 100, 3), np.uint8)
    image[30:70, 30:70] = 255  # exactly the crop window
    f = FaceBoxFraming(image, Obs, size=20, scale=2.0, drop=0.0)
    np.testing.assert_allclose(f.crop(image), 1.0, atol=1e-6)
    mask = np.zeros((100, 100), np.float32)
    mask[30:50] = 1.0  # the upper half of the window
    m = f.crop(mask)
    assert m.shape == (20, 20)
    np.testing.assert_allclose(m[:10], 1.0, atol=1e-6)
    np.testing.assert_allclose(m[10:], 0.0, atol=1e-6)


class _FakeRefiner:
    dtype = None
    config = type("Cfg", (), {"seen_mask": False})()

    def __init__(self):
        import torch

        self.dtype = torch.float32
        self.shapes = []

    def refine(self, ref, views, seen=None, generator=None):
        assert seen is None and generator is not None  # seen_mask off; seeded noise
        self.shapes.append((tuple(ref.shape), tuple(views.shape)))
        return 0.5 * views + 0.5 * ref[:, None]


def test_avatar_runner_plumbing_with_a_fake_avatar(clip_dir, monkeypatch, tmp_path):
    import sys

    from models.evaluation import AvatarRunner

    fake = fake_avatar_module()
    monkeypatch.setitem(sys.modules, "models.avatar", fake)
    refiner = _FakeRefiner()
    runner = AvatarRunner(refiner=refiner, refine_batch=2)
    assert runner.methods == ("raw", "refined")
    config = EvalConfig(size=64, min_gap_frames=1, max_pairs_per_bin=2, identity=False, landmarks=False,
                        flicker_yaw_deg=1.0, flicker_step_deg=0.5, index=ClipIndexConfig(mask_size=64))
    res = evaluate([clip_dir / "astronaut_turn.mp4"], runner, config, progress=False)
    assert res.methods == ("baseline", "raw", "refined") and res.records
    # One avatar of the reference, then one reenacted avatar per pair, all sized for the crop.
    assert fake.calls[0] == ("config", "cpu", False, 64)
    assert all(c[2] and c[3] == 64 for c in fake.calls[1:]) and len(fake.calls) == 1 + len(res.records)
    # Per pair one view per call; the orbit (5 views) in chunks of 2.
    assert refiner.shapes[0] == ((1, 3, 64, 64), (1, 1, 3, 64, 64))
    assert [s[1][0] for s in refiner.shapes[len(res.records):]] == [2, 2, 1]
    rec = res.records[0]["methods"]
    assert all(rec[m]["psnr_head"] is not None for m in res.methods)
    assert set(res.flicker["astronaut_turn"]) == {"raw", "refined", "refined_minus_raw"}


@pytest.mark.slow
def test_real_avatar_on_the_tiny_clip(clip_dir):
    from models.evaluation import AvatarRunner

    config = EvalConfig(size=64, min_gap_frames=1, max_pairs_per_bin=2, identity=False, landmarks=False,
                        flicker_yaw_deg=1.0, flicker_step_deg=1.0, index=ClipIndexConfig(mask_size=64))
    res = evaluate([clip_dir / "astronaut_turn.mp4"], AvatarRunner(), config, progress=False)
    assert res.methods == ("baseline", "raw") and res.records
    for r in res.records:
        assert r["methods"]["raw"]["psnr_head"] > 10.0
    assert res.flicker["astronaut_turn"]["raw"] is not None


def test_clip_without_a_near_frontal_reference_is_skipped(clip_dir):
    config = EvalConfig(size=64, min_gap_frames=1, identity=False, landmarks=False, max_reference_yaw_deg=0.01,
                        index=ClipIndexConfig(mask_size=64))
    res = evaluate([clip_dir / "astronaut_turn.mp4"], CallableRunner(), config, progress=False)
    assert not res.records and "no near-frontal reference" in res.skipped[0]["reason"]
