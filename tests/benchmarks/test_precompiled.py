"""benchmarks/precompiled.py's plumbing, with dynamo turned off so that nothing compiles (a real run takes minutes):
each step in its own process, its JSON, and a store that cannot compile whole saying so beside the figures."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_each_step_reports_its_compile_and_a_fallback_shows(tmp_path):
    out = tmp_path / "precompiled.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "precompiled.py"), "--device", "cpu", "--size", "64",
                          "--steps", "inductor", "store", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["meta"]["benchmark"] == "precompiled" and doc["config"]["size"] == 64
    inductor, store = doc["results"]
    assert [inductor["step"], store["step"]] == ["inductor", "store"]
    for result in doc["results"]:
        assert result["compile_state"] == "compiled" and result["compile_s"] >= 0
        assert result["max_abs_diff_from_eager"] < 1e-4  # nothing compiled: the same eager maths
    assert inductor["store"] is None
    assert store["store"]["loaded"] == store["store"]["saved"] == 0 and store["store"]["fell_back"]
    assert any("compiled the usual way instead" in line for line in store["log_warnings"])
