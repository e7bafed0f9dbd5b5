"""benchmarks.ddp on the CPU (gloo processes): the whole job - pairs, a 1-process run with accumulation
and a 2-process run at the same effective batch, the resume check, the JSON - with a tiny model. It
checks the script; it measures nothing."""
import json
import os
import sys
import time

import pytest

from benchmarks.ddp import MULTICAST_OFF, main, run


@pytest.mark.slow
def test_cpu_smoke_writes_every_figure(tmp_path):
    out = tmp_path / "ddp.json"
    argv = ["--device", "cpu", "--gpus", "2", "--preset", "tiny", "--resolution", "32", "--micro-batch", "2", "--steps", "6",
            "--skip", "1", "--pairs", "16", "--workers", "0", "--extra", "--d-channels 8 --d-layers 2 --noise 0 0",
            "--time-limit", "1800", "--work", str(tmp_path / "work"), "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["meta"]["benchmark"] == "ddp" and doc["meta"]["env"] == MULTICAST_OFF
    assert doc["config"]["effective_batch"] == 4
    r = doc["results"]
    assert r["complete"], r
    for gpus in ("1", "2"):
        one = r["runs"][gpus]
        assert one["returncode"] == 0 and not one["stopped_at_limit"] and one["steps_logged"] == 6
        assert one["samples_per_s"]["n"] == one["step_ms"]["n"] == one["data_wait_share"]["n"] == 5
        assert 0 <= one["data_wait_share"]["median"] < 1 and one["samples_per_s_overall"] > 0
    assert r["scaling"] > 0 and r["scaling_overall"] > 0
    # the same samples per step from the same start, noise off: the curves differ by float summation order only
    curves = r["loss_curves"]
    assert curves["steps_compared"] == 6 and curves["mean_abs_diff"] < 1e-4 < curves["step_to_step_noise"], curves
    assert r["resume"]["checkpoint_step"] == 3 and r["resume"]["abs_diff"] < 1e-4, r["resume"]


def test_a_run_past_its_limit_is_stopped_with_its_children(tmp_path):
    """What torchrun and its ranks get: the whole process group ends, not only the process started."""
    pid_file = tmp_path / "pid"
    child = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             "open(sys.argv[1], 'w').write(str(p.pid)); p.wait()")
    status = run([sys.executable, "-c", child, str(pid_file)], 3.0)
    assert status["stopped_at_limit"] and status["returncode"] != 0 and status["wall_s"] < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild} outlived the limit")
