"""benchmarks/first_frame.py on the CPU: the product's pipeline from the first camera frame, its JSON."""
import json
import subprocess
import sys

from tests.conftest import REPO


def test_the_first_frame_and_the_rate_after_it_are_measured_in_a_child_process(tmp_path):
    out = tmp_path / "first.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "first_frame.py"), "--device", "cpu", "--size", "64",
                          "--views", "2", "--seconds", "3", "--out", str(out)], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert list(doc) == ["meta", "config", "results"] and doc["meta"]["benchmark"] == "first_frame"
    (result,) = doc["results"]  # the CPU compiles nothing: one mode
    assert result["mode"] == "held" and result["kernels_at_end"] is None
    assert 0 < result["first_frame_s"] < 3 and list(result["fps"]) == ["0-3 s"] and result["fps"]["0-3 s"] > 0
    calls = result["calls"]
    assert result["frames"] == len(calls["start_s"]) == len(calls["done_s"]) and calls["status_from"] == [[0, "ok"]]
    assert calls["kernels_from"] == [[0, None]] and all(a < b for a, b in zip(calls["start_s"], calls["done_s"]))
    assert result["log_warnings"] == []  # what the run's log warned of is kept beside the figures: nothing here
    assert any("appearance memory: on" in line for line in result["log_head"])  # and the start as the log told it
