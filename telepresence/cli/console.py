"""Process plumbing shared by the command-line entry points (receiver, sender, demo).

Logging setup, and running one coroutine until it ends, Ctrl-C or SIGTERM,
with the expected failures turned into one log line and an exit status.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, Coroutine

logger = logging.getLogger("telepresence")


def configure_logging(verbose: bool = False) -> None:
    """One line per event; aiortc/aioice/websockets only from WARNING unless verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not verbose:
        for noisy in ("aiortc", "aioice", "websockets"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


async def _cancel_on_sigterm(coro: Coroutine[Any, Any, Any]) -> Any:
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    except (NotImplementedError, RuntimeError):  # not the main thread, or no signals (Windows)
        pass
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and not asyncio.current_task().cancelling():  # type: ignore[union-attr]
            return None  # stopped by SIGTERM
        raise


def run_until_stopped(coro: Coroutine[Any, Any, Any], expected: tuple[type[BaseException], ...] = ()) -> int:
    """Run `coro` to the end; Ctrl-C and SIGTERM stop it cleanly (exit 0), `expected` errors log one line (exit 1)."""
    try:
        asyncio.run(_cancel_on_sigterm(coro))
    except KeyboardInterrupt:
        logger.info("stopped")
        return 0
    except expected as error:
        logger.error("%s", error)
        return 1
    return 0
