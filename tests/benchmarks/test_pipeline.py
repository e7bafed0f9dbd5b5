"""benchmarks.pipeline (`python -m benchmarks.pipeline`): stage timing on a fake pipeline, the JSON layout,
and the README table regenerated from JSON, the committed results included."""
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np

from benchmarks.pipeline import README_BEGIN, README_END, bench_markdown, main
from tests.conftest import REPO


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
    code = main(["--frames", "4", "--warmup", "1", "--viewers", "1", "2", "--out", str(out),
                 "--readme", str(readme), "-q"], pipeline_factory=FakePipeline)
    assert code == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"meta", "config", "results"}
    assert doc["meta"]["device"]["type"] == "cpu" and "versions" in doc["meta"] and doc["meta"]["benchmark"] == "pipeline"
    assert doc["config"]["frames"] == 4
    assert [r["viewers"] for r in doc["results"]] == [1, 2]
    stages = doc["results"][1]["stages_ms"]
    assert stages["refine"]["median"] == 50.0 and stages["refine"]["n"] == 4
    assert stages["encode"]["n"] == 4 and stages["encode"]["median"] > 0
    assert stages["total"]["median"] >= stages["encode"]["median"]
    text = readme.read_text()
    assert "old table" not in text and "| 2 | 4.0 / 4.0 |" in text and text.endswith("more text\n")
    # Regenerating from the JSON alone gives the same table.
    readme.write_text(f"{README_BEGIN}\n{README_END}\n")
    assert main(["--from-json", str(out), "--readme", str(readme)]) == 0
    assert bench_markdown(doc) in readme.read_text()


def test_readme_without_markers_and_bad_arguments_are_errors(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    out = tmp_path / "bench.json"
    assert main(["--frames", "1", "--warmup", "0", "--viewers", "1", "--out", str(out), "-q"],
                pipeline_factory=FakePipeline) == 0
    assert main(["--from-json", str(out), "--readme", str(readme)]) == 1
    assert README_BEGIN in capsys.readouterr().err and readme.read_text() == "no markers here\n"
    assert main(["--frames", "0", "--out", str(out)], pipeline_factory=FakePipeline) == 2
    assert main(["--input", str(tmp_path / "missing.mp4"), "--out", str(out)], pipeline_factory=FakePipeline) == 2


def test_the_readme_table_is_the_committed_results(tmp_path):
    """README.md's bench table is exactly what benchmarks/results/bench_*.json give, by the command it prints."""
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    results = sorted(str(p) for p in (REPO / "benchmarks" / "results").glob("bench_*.json"))
    assert results
    proc = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", "--from-json", *results, "--readme", str(readme)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert readme.read_text() == (REPO / "README.md").read_text()
