"""models.avatar.compiling's exit: a program that ends while the compile worker is inside a compile ends at once
with its own status (a finalizing interpreter crashed on the compile's thread: rc 134 on the CPU, 139 on a GPU)."""
import subprocess
import sys
import time

from models.avatar.compiling import compiling_now, leave
from tests.conftest import REPO

PROGRAM = """
import logging, sys, threading, time
import torch
from models.avatar.compiling import BackgroundCompiler, compiling_now, leave
logging.basicConfig(level=logging.INFO)
compiler = BackgroundCompiler(torch.device("cpu"))
started = threading.Event()
def job():  # stands in for a compile that would take minutes
    started.set()
    time.sleep(60)
compiler.submit("k", job, "stand-in compile")
started.wait(30)
print("compiling", compiling_now(), flush=True)
sys.exit(leave(3))
"""


def test_a_program_that_ends_during_a_compile_exits_at_once_with_its_status():
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 3, run.stderr[-2000:]
    assert time.monotonic() - t0 < 50  # the 60 s job was not waited for
    assert "compiling True" in run.stdout
    assert "exiting while the avatar's compile runs: not waited for" in run.stderr  # the log, flushed before the exit


def test_with_no_compile_running_the_status_is_returned():
    assert not compiling_now()
    assert leave(5) == 5 and leave(0) == 0
