"""What a measurement ran on: one record of commit, date, package versions, device and host,
written as the "meta" of every benchmark JSON (benchmarks/) and of the evaluation's results.json."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["PACKAGES", "run_metadata", "git_state", "package_versions", "device_info", "host_info"]

PACKAGES = ("numpy", "torch", "cv2", "mediapipe", "dlib", "diffusers", "peft", "av", "aiortc", "websockets")
"""Packages whose versions a run reports (import names)."""


def git_state() -> dict[str, Any]:
    """{"commit": full hash of HEAD, "dirty": tracked files changed} of this checkout; None for both
    outside a git checkout (an installed package)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                                 cwd=Path(__file__).resolve().parent)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD") or None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _installed_version(name: str) -> str | None:
    """Version of the installed distribution named like the module (None: none is)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """{"python": ..., name: version}: module.__version__ for a package this process has imported,
    else the installed distribution of that name, else None (dlib-bin, for one, is seen only once imported).
    Imports nothing, so it stays instant."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        version = getattr(sys.modules.get(name), "__version__", None)
        if version is None:
            version = _installed_version(name)
        out[name] = None if version is None else str(version)
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: Any = "cpu") -> dict[str, Any]:
    """{"type": "cpu" | "cuda" | ..., "name": the GPU's model (CUDA, with "cuda": the toolkit
    version) or the CPU's}. device: a torch device or its name ("cuda:1")."""
    kind = str(device).split(":")[0]
    info: dict[str, Any] = {"type": kind, "name": _cpu_name()}
    if kind == "cuda":
        import torch

        try:
            info["name"] = torch.cuda.get_device_name(torch.device(str(device)))
        except Exception as error:  # noqa: BLE001 - report, never fail a measurement over metadata
            info["name"] = f"unknown ({error})"
        info["cuda"] = torch.version.cuda
    return info


def host_info() -> dict[str, Any]:
    """{"platform", "cpu", "cpu_count", "torch_threads" (None when torch is not imported), "loadavg" (1, 5, 15 min)}."""
    torch = sys.modules.get("torch")
    return {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def run_metadata(device: Any = "cpu", **extra: Any) -> dict[str, Any]:
    """{"date": UTC ISO 8601, "commit", "dirty", "versions", "device", "host", **extra}:
    see git_state, package_versions, device_info and host_info."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **git_state(),
        "versions": package_versions(),
        "device": device_info(device),
        "host": host_info(),
        **extra,
    }
