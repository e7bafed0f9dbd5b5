"""`telepresence eval` / `telepresence bench` argument handling, on tiny clips and a fake pipeline."""
import json
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest

from benchmarks.pipeline_bench import README_BEGIN, README_END, bench_markdown, timing_stats
from telepresence.cli.eval import bench_main, eval_main
from tests.tiny_clips import write_face_clip, write_faceless_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    write_face_clip(d / "face.mp4", n=8)
    write_faceless_clip(d / "noise.mp4", n=4)
    return d


def test_eval_baseline_only_writes_results_and_reports_the_faceless_clip(clip_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = eval_main(["--clips", str(clip_dir), "--out", str(out), "--methods", "baseline", "--size", "96",
                      "--no-identity", "--no-cache", "-q", "--max-pairs", "3"])
    captured = capsys.readouterr()
    assert code == 0
    assert "skipped noise: no face" in captured.err
    assert "baseline  PSNR head [dB]  0-10:" in captured.out
    doc = json.loads((out / "results.json").read_text())
    assert doc["clips"] == ["face"] and doc["skipped"][0]["clip"] == "noise"
    assert "raw, refined: not run (--methods baseline)" in (out / "results.md").read_text()


def test_eval_with_only_faceless_clips_fails_cleanly(tmp_path, capsys):
    write_faceless_clip(tmp_path / "noise.mp4", n=3)
    code = eval_main(["--clips", str(tmp_path / "noise.mp4"), "--out", str(tmp_path / "o"), "--methods", "baseline",
                      "--no-identity", "--no-cache", "-q"])
    assert code == 1
    assert "no clip could be evaluated" in capsys.readouterr().err


def test_eval_names_the_missing_avatar(clip_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "models.avatar", None)  # as if the avatar were not installed
    code = eval_main(["--clips", str(clip_dir), "--out", str(tmp_path), "--refiner", "none", "--no-cache", "-q"])
    assert code == 2
    assert "models.avatar" in capsys.readouterr().err


def test_eval_rejects_bad_arguments(tmp_path, capsys):
    assert eval_main(["--clips", str(tmp_path), "--out", str(tmp_path / "o"), "--methods", "magic"]) == 2
    assert eval_main(["--clips", str(tmp_path), "--out", str(tmp_path / "o"), "--methods", "baseline"]) == 2
    assert "no video files" in capsys.readouterr().err


@dataclass
class FakeResult:
    views: np.ndarray
    face_found: bool = True
    status: str = "ok"
    timings_ms: dict = field(default_factory=dict)


class FakePipeline:
    def __init__(self, config):
        self.size = config.size
        self.calls = 0

    def process(self, frame, poses):
        self.calls += 1
        views = np.full((len(poses), self.size, self.size, 3), 0.5, np.float32)
        return FakeResult(views, timings_ms={"landmarks": 4.0, "avatar": 10.0 + self.calls % 3, "render": 2.0,
                                             "refine": 50.0})


def test_bench_times_stages_and_regenerates_the_readme(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\n## Performance\n\n{README_BEGIN}\nold table\n{README_END}\n\nmore text\n")
    out = tmp_path / "bench.json"
    code = bench_main(["--frames", "4", "--warmup", "1", "--viewers", "1", "2", "--out", str(out),
                       "--readme", str(readme), "-q"], pipeline_factory=FakePipeline)
    assert code == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["device"] == "cpu" and "versions" in doc["meta"]
    assert [r["viewers"] for r in doc["runs"]] == [1, 2]
    stages = doc["runs"][1]["stages_ms"]
    assert stages["refine"]["median"] == 50.0 and stages["refine"]["n"] == 4
    assert stages["encode"]["n"] == 4 and stages["encode"]["median"] > 0
    assert stages["total"]["median"] >= stages["encode"]["median"]
    text = readme.read_text()
    assert "old table" not in text and "| 2 | 4.0 / 4.0 |" in text and text.endswith("more text\n")
    # Regenerating from the JSON alone gives the same table.
    readme.write_text(f"{README_BEGIN}\n{README_END}\n")
    assert bench_main(["--from-json", str(out), "--readme", str(readme)]) == 0
    assert bench_markdown(doc) in readme.read_text()


def test_timing_stats():
    s = timing_stats([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["n"] == 5 and s["p90"] == pytest.approx(61.6) and s["p95"] == pytest.approx(80.8)
    assert timing_stats([])["median"] is None


def test_missing_refiner_weights_are_an_error_not_a_silent_fallback(clip_dir, tmp_path, capsys):
    code = eval_main(["--clips", str(clip_dir), "--out", str(tmp_path), "--refiner", str(tmp_path / "nowhere"),
                      "--no-cache", "-q"])
    assert code == 2
    assert "refiner weights not found" in capsys.readouterr().err
