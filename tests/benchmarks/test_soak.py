"""benchmarks/soak.py's summary and plot: the GPU's memory in use beside each process's figures, and its
children keep the caller's import path."""
import json
import subprocess
import sys
from pathlib import Path

import cv2

from benchmarks import soak


def _sample(t_s, rss, gpu=None):
    sample = {"t_s": t_s, "processes": {"sender": {"rss_mb": rss, "fds": 10, "threads": 5, "fps": 25.0}}}
    if gpu is not None:
        sample["gpu_used_mb"] = gpu
    return sample


def test_the_gpus_memory_is_summarised_after_the_warm_up_and_plotted_as_a_panel_of_its_own(tmp_path):
    samples = [_sample(0, 100, 1000), _sample(30, 110, 4000), _sample(60, 110, 5000), _sample(90, 111, 3000)]
    summary = soak.summarise(samples, warmup_s=30, logs={})
    assert summary["gpu"]["used_mb"] == {"after_warmup": 4000, "end": 3000, "max": 5000, "change_pct": -25.0}
    assert summary["sender"]["rss_mb"]["after_warmup"] == 110
    with_gpu, without = tmp_path / "gpu.png", tmp_path / "cpu.png"
    soak.plot(samples, "soak", with_gpu)
    soak.plot([{k: v for k, v in s.items() if k != "gpu_used_mb"} for s in samples], "soak", without)
    assert "gpu" not in soak.summarise([_sample(0, 100)], warmup_s=0, logs={})
    assert cv2.imread(str(with_gpu)).shape[0] > cv2.imread(str(without)).shape[0]  # one panel more


def test_a_child_keeps_the_callers_import_path_after_the_repository(tmp_path):
    """Where the dependencies come through PYTHONPATH (the GPU machine's), a child that loses it cannot import them."""
    extra = tmp_path / "site"
    extra.mkdir()
    (extra / "only_on_the_callers_path.py").write_text("X = 1\n")
    code = ("import json, os, sys\nfrom pathlib import Path\nsys.path.insert(0, os.getcwd())\n"
            "os.environ['PYTHONPATH'] = sys.argv[1]\nfrom benchmarks.soak import Child\n"
            "child = Child('probe', ['-c', 'import only_on_the_callers_path, sys; print(*sys.path[1:3])'], Path(sys.argv[2]))\n"
            "child.popen.wait(timeout=60)\nchild.stop()\nprint(json.dumps(list(child.lines)))")
    root = Path(soak.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code, str(extra), str(tmp_path)], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = json.loads(out.stdout.strip().splitlines()[-1])
    assert lines and lines[-1].split() == [str(root), str(extra)], lines  # imported; the repository first, then the caller's
