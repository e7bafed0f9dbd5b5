"""CUDA MPS for the call: the participants' pipeline processes share the GPU at once instead of by turns.

Each participant's pipeline runs in a process of its own (telepresence.stream.worker), so each has its own
CUDA context, and a GPU time-slices contexts: one participant's kernels wait while another's time slice
runs. NVIDIA's Multi-Process Service (MPS) runs the kernels of every client process in one shared context,
side by side. Measured on one H200, 4 participants at 512 (benchmarks/call.py, docs/call.md): 27.7 fps each,
p50 170 ms by turns; 30.0 fps each, p50 118 ms under MPS.

The daemon is the call server's own: `nvidia-cuda-mps-control -d` with its pipe and log folders in a fresh
temporary folder, so it neither needs root nor touches another user's daemon; the pipeline processes get
CUDA_MPS_PIPE_DIRECTORY before they start CUDA; `quit` stops it when the server stops. A daemon already
configured for this process (CUDA_MPS_PIPE_DIRECTORY set, or the system one's default pipe folder) is used
as it is. MPS changes no setting of the GPU.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
SYSTEM_PIPE_DIRECTORY = Path("/tmp/nvidia-mps")
"""Where a daemon started without CUDA_MPS_PIPE_DIRECTORY (the system's) listens."""
PIPE, LOG = "CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"


class MpsUnavailableError(RuntimeError):
    """No MPS daemon could be had; the message says why in one line."""


class MpsDaemon:
    """An MPS control daemon for the pipeline processes: start() once, `env` for each process, stop() at the end."""

    def __init__(self, control: str = CONTROL, timeout_s: float = 10.0) -> None:
        self.control = control
        self.timeout_s = timeout_s
        self.env: dict[str, str] = {}
        """What a pipeline process sets before it starts CUDA ({} before start, or for the system's daemon)."""
        self.owned = False
        """Whether the daemon is ours (started here, stopped by stop())."""
        self._folder: Optional[tempfile.TemporaryDirectory] = None

    def start(self) -> str:
        """Start (or find) the daemon; what is used, in words. MpsUnavailableError with the reason."""
        if os.environ.get(PIPE):
            self.env = {PIPE: os.environ[PIPE]}
            return f"the MPS daemon at {os.environ[PIPE]} ({PIPE})"
        if (SYSTEM_PIPE_DIRECTORY / "control").exists():
            return f"the system's MPS daemon ({SYSTEM_PIPE_DIRECTORY})"
        control = shutil.which(self.control)
        if control is None:
            raise MpsUnavailableError(f"{self.control} is not on PATH (it comes with NVIDIA's driver utilities)")
        self._folder = tempfile.TemporaryDirectory(prefix="telepresence-mps-")
        root = Path(self._folder.name)
        env = {PIPE: str(root / "pipe"), LOG: str(root / "log")}
        for folder in env.values():
            Path(folder).mkdir()
        try:
            done = subprocess.run([control, "-d"], env={**os.environ, **env}, capture_output=True, text=True,
                                  timeout=self.timeout_s)
        except (OSError, subprocess.TimeoutExpired) as error:
            self._cleanup()
            raise MpsUnavailableError(f"{self.control} -d did not start: {error}") from None
        if done.returncode != 0:
            reason = " ".join((done.stderr or done.stdout or "").split())[:200] or f"exit status {done.returncode}"
            self._cleanup()
            raise MpsUnavailableError(f"{self.control} -d failed: {reason}")
        self.env, self.owned = env, True
        return f"an MPS daemon of ours ({root})"

    def stop(self) -> None:
        """Stop our daemon (its server ends with its last client) and remove its folders; nothing if not ours."""
        if not self.owned:
            return
        try:
            subprocess.run([shutil.which(self.control) or self.control], input="quit\n", env={**os.environ, **self.env},
                           capture_output=True, text=True, timeout=self.timeout_s)
        except (OSError, subprocess.TimeoutExpired) as error:
            logger.warning("could not stop the MPS daemon in %s: %s", self.env.get(PIPE), error)
        self.owned = False
        self._cleanup()

    def _cleanup(self) -> None:
        if self._folder is not None:
            self._folder.cleanup()
            self._folder = None


def share_gpu(daemon: MpsDaemon) -> tuple[dict[str, str], str]:
    """Start `daemon` for a call's pipelines on a GPU, saying what happened: its env for the processes and
    how the GPU is shared, in words; ({}, "by turns: why") with a warning that says what that costs."""
    try:
        what = daemon.start()
    except MpsUnavailableError as error:
        logger.warning("CUDA MPS unavailable (%s): the participants' pipelines take turns on the GPU (on an H200, "
                       "4 participants at 512: 27.7 fps each, p50 170 ms, against 30 fps, 118 ms under MPS; "
                       "docs/call.md). --no-mps silences this.", error)
        return {}, f"by turns (MPS unavailable: {error})"
    logger.info("CUDA MPS: the participants' pipelines share the GPU at once, through %s", what)
    return dict(daemon.env), f"MPS: {what}"
