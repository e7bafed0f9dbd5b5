"""benchmarks/switch_interval.py: a frame thread's rate beside a thread of pure Python, per switch interval."""
import json
import subprocess
import sys

from tests.conftest import REPO


def test_each_row_measures_the_frame_thread_and_the_busy_thread(tmp_path):
    out = tmp_path / "switch.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "switch_interval.py"), "--releases", "10",
                          "--intervals-ms", "0.5", "0.05", "--seconds", "0.5", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert list(doc) == ["meta", "config", "results"] and doc["meta"]["benchmark"] == "switch_interval"
    rows = doc["results"]["rows"]
    assert [(r["releases"], r["interval_ms"]) for r in rows] == [(10, 0.5), (10, 0.05)]
    # Rates, not timings: each row ran both threads (a frame thread paced at 30 fps makes at most ~31 a second).
    assert all(0 < r["frames_per_s"] <= 31 and r["busy_loops_per_s"] > 0 for r in rows)
    assert doc["results"]["busy_alone_loops_per_s"] > 0
