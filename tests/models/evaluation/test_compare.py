"""Paired comparison of two eval runs: which pictures pair up, the per-bin change, its bootstrap interval."""
import numpy as np
import pytest

from models.evaluation.compare import compare, comparison_markdown, pictures


def _results(psnr_by_key, method="raw", kind="multiview", bins=None, lmk=None):
    """A results.json-shaped dict: one record per key (set or clip, ref, tgt) with that method's metrics."""
    records = []
    for i, (key, psnr) in enumerate(psnr_by_key.items()):
        metrics = {"psnr_head": psnr, "ssim_head": None, "id_dist_target": 0.4,
                   "lmk_err_pct": None if lmk is None else lmk[i]}
        name, ref, tgt = key
        rec = {"ref": ref, "tgt": tgt, "bin": (bins or {}).get(key, "30-45"), "methods": {method: metrics}}
        rec["set" if kind == "multiview" else "clip"] = name
        records.append(rec)
    if kind == "multiview":
        return {"pairs": [], "multiview": {"targets": records}}
    return {"pairs": records}


def test_pictures_key_clip_pairs_and_camera_targets_apart_and_skip_methods_not_run():
    doc = _results({("lp_d3", 64, 2): 25.0})
    doc.update(_results({("mead", "tile3.png", "tile0.png"): 20.0}, kind="multiview"))
    doc["pairs"] = _results({("lp_d3", 64, 2): 25.0}, kind="clips")["pairs"]
    found = pictures(doc, "raw")
    assert set(found) == {("clips", "lp_d3", 64, 2), ("multiview", "mead", "tile3.png", "tile0.png")}
    assert found[("clips", "lp_d3", 64, 2)][0] == "30-45"
    assert pictures(doc, "refined") == {}


def test_a_uniform_shift_is_the_change_with_a_tight_interval_and_every_picture_better():
    keys = [("s", "ref", f"t{i}") for i in range(6)]
    before = pictures(_results({k: 15.0 + i for i, k in enumerate(keys)}), "raw")
    after = pictures(_results({k: 15.5 + i for i, k in enumerate(keys)}), "raw")
    row = next(r for r in compare(before, after, ["psnr_head"]).rows if r.bin == "30-45")
    assert row.n == 6 and row.diff == pytest.approx(0.5)
    assert row.low == pytest.approx(0.5) and row.high == pytest.approx(0.5)
    assert (row.better, row.worse) == (6, 0)


def test_the_interval_holds_0_for_changes_that_cancel_and_not_for_a_consistent_gain():
    keys = [("s", "ref", f"t{i}") for i in range(10)]
    base = {k: 18.0 + 2.0 * (i % 3) for i, k in enumerate(keys)}  # targets spread over 4 dB
    cancel = {k: v + (0.6 if i % 2 else -0.6) for i, (k, v) in enumerate(base.items())}
    rng = np.random.default_rng(1)
    gain = {k: v + 0.3 + 0.05 * rng.standard_normal() for k, v in base.items()}
    b = pictures(_results(base), "raw")
    row0 = compare(b, pictures(_results(cancel), "raw"), ["psnr_head"]).rows[0]
    row1 = compare(b, pictures(_results(gain), "raw"), ["psnr_head"]).rows[0]
    assert row0.low < 0.0 < row0.high and (row0.better, row0.worse) == (5, 5)
    assert 0.0 < row1.low < 0.3 < row1.high
    # Unpaired, the gain would be lost in the targets' spread: a bin mean's standard error is larger than the gain.
    assert np.std(list(base.values())) / np.sqrt(len(base)) > 0.3


def test_lower_is_better_for_the_landmark_error_and_few_pictures_get_no_interval():
    keys = [("s", "ref", "a"), ("s", "ref", "b")]
    before = pictures(_results({k: 20.0 for k in keys}, lmk=[3.0, 3.0]), "raw")
    after = pictures(_results({k: 20.0 for k in keys}, lmk=[2.0, 4.5]), "raw")
    row = next(r for r in compare(before, after, ["lmk_err_pct"]).rows if r.bin == "30-45")
    assert (row.better, row.worse) == (1, 1) and row.diff == pytest.approx(0.25)
    assert row.low is None and row.high is None
    psnr = next(r for r in compare(before, after, ["psnr_head"]).rows if r.bin == "30-45")
    assert (psnr.better, psnr.worse) == (0, 0)


def test_pictures_on_one_side_only_are_counted_and_left_out_and_bins_per_run_and_overall():
    before = pictures(_results({("s", "r", "a"): 10.0, ("s", "r", "b"): 12.0, ("s", "r", "c"): 14.0},
                               bins={("s", "r", "c"): "45-60"}), "raw")
    after = pictures(_results({("s", "r", "a"): 11.0, ("s", "r", "c"): 13.0, ("s", "r", "d"): 9.0}), "raw")
    comp = compare(before, after, ["psnr_head"])
    assert comp.only_before == {"multiview": 1} and comp.only_after == {"multiview": 1}
    assert comp.bins_differ == 1  # c: 45-60 before, 30-45 after; binned as before
    by_bin = {r.bin: r for r in comp.rows}
    assert list(by_bin) == ["30-45", "45-60", "all"]
    assert by_bin["30-45"].diff == pytest.approx(1.0) and by_bin["45-60"].diff == pytest.approx(-1.0)
    assert by_bin["all"].n == 2 and by_bin["all"].diff == pytest.approx(0.0)
    text = comparison_markdown(comp, "main:raw", "probe:raw")
    assert "1 only in main:raw" in text and "1 only in probe:raw" in text
    assert "| psnr_head | 30-45 | 1 | 10.00 | 11.00 | +1.00 | – | 1 / 0 |" in text


def test_the_same_inputs_give_the_same_interval_and_bad_arguments_are_named():
    keys = [("s", "ref", f"t{i}") for i in range(5)]
    b = pictures(_results({k: float(i) for i, k in enumerate(keys)}), "raw")
    a = pictures(_results({k: float(i) + (i % 2) for i, k in enumerate(keys)}), "raw")
    assert compare(b, a, ["psnr_head"]).rows == compare(b, a, ["psnr_head"]).rows
    with pytest.raises(ValueError, match="expected metrics among"):
        compare(b, a, ["id_dist_ref"])
    with pytest.raises(ValueError, match="expected a level in"):
        compare(b, a, ["psnr_head"], level=1.5)
