"""torch.compile on more than one thread of a process: the avatar's background compiles beside the refiner's.

Dynamo refuses to run a compiled function while FX traces ("Detected that you are using FX to symbolically trace a
dynamo-optimized function"), to catch a symbolic trace *over* a compiled function. The flag it reads is the
process's, not the thread's, and inductor's own compile traces with FX (AOTAutograd's make_fx) for seconds at a time:
so a compiled function called on one thread while another thread compiles fails for nothing. On an H200 a sender
with ``--compile-refiner`` lost a frame so when a viewer's new view count had the refiner compile on the frame thread
while the avatar's worker compiled the 32-view render (2026-12-03); the same clash could take the avatar's worker
(its plain graphs would then stay for the call). This program never traces over a compiled function itself, so the
check is switched off (``torch._dynamo.config.force_compile_during_fx_trace``, torch 2.11 and later).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

__all__ = ["allow_compiles_beside_traces"]

_said = False


def allow_compiles_beside_traces() -> bool:
    """Let compiled functions run on one thread while another compiles (process-wide, idempotent). False, said once in
    the log, on a torch without the switch: there the clash stays possible (a frame that meets it is lost, the log
    says why, and the next frame tries again)."""
    global _said
    import torch._dynamo  # noqa: F401 - the config module lives there

    config = torch._dynamo.config
    if hasattr(config, "force_compile_during_fx_trace"):
        config.force_compile_during_fx_trace = True
        return True
    if not _said:
        _said = True
        log.warning("torch %s cannot run a compiled function while another thread compiles (no "
                    "force_compile_during_fx_trace); torch 2.11 or later avoids lost frames when two compiles meet",
                    torch.__version__)
    return False
