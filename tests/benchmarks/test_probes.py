"""benchmarks.probes.CpuMeter: where the cores went, per thread group and per process."""
import subprocess
import sys
import time

import pytest

from benchmarks.probes import CpuMeter

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux only)")

SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_a_process_that_exits_before_the_reading_is_counted_up_to_its_last_sample():
    quick = subprocess.Popen([sys.executable, "-c", SPIN.format(s=0.4)])
    stays = subprocess.Popen([sys.executable, "-c", SPIN.format(s=30)])
    try:
        time.sleep(0.2)  # both started (interpreters up)
        cpu = CpuMeter([quick.pid, stays.pid]).start()
        time.sleep(0.2)
        cpu.sample()  # the quick one still runs here
        quick.wait(timeout=30)
        time.sleep(0.3)
        usage = cpu.percent({quick.pid: "quick", stays.pid: "stays"})
    finally:
        stays.kill()
        stays.wait()
    assert set(usage) >= {"quick", "stays", "this process"}
    assert 0 < usage["quick"] <= 110 and 0 < usage["stays"] <= 110  # % of one core, each spinning one at most


def test_stack_sampler_charges_a_thread_s_time_to_the_repository_code_it_is_in():
    import threading

    from benchmarks.probes import StackSampler

    done = threading.Event()

    def waits_here():
        done.wait(30)

    worker = threading.Thread(target=waits_here, name="probe-worker")
    worker.start()
    try:
        sampler = StackSampler("probe-worker", interval_s=0.002).start()
        absent = StackSampler("no-such-thread", interval_s=0.002).start()
        time.sleep(0.3)
        sampled, nothing = sampler.stop(), absent.stop()
    finally:
        done.set()
        worker.join()
    assert sampled["samples"] > 10
    where, share = next(iter(sampled["mine"].items()))
    assert where.startswith("tests/benchmarks/test_probes.py:waits_here:") and share == 100.0
    assert next(iter(sampled["leaf"])) == "threading.py:wait"  # the innermost frame: where it waits
    assert nothing == {"thread": "no-such-thread", "samples": 0, "mine": {}, "leaf": {}}
