"""Newest-value-wins hand-off between threads.

Every hop of the sender (capture -> pipeline worker -> tracks) passes data
through a slot of capacity one: a writer never blocks and overwrites whatever
the reader has not taken yet, so a slow stage drops stale frames instead of
queueing them (aiortc issues #64, #104, #642 show what unbounded queues do).
"""

from __future__ import annotations

import threading
from typing import Generic, Optional, TypeVar

T = TypeVar("T")


class SlotClosedError(RuntimeError):
    """The slot was closed while a reader was waiting on it."""


class LatestSlot(Generic[T]):
    """Holds only the newest value put into it.

    `version` increases by one per `put`; readers remember the version they
    last saw and wait for a newer one. `dropped` counts values that were
    overwritten before any reader took them.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._value: Optional[T] = None
        self._version = 0
        self._taken = True
        self._closed = False
        self.dropped = 0

    @property
    def version(self) -> int:
        with self._cond:
            return self._version

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def put(self, value: T) -> int:
        """Store `value`, replacing any untaken one; returns its version."""
        with self._cond:
            if not self._taken:
                self.dropped += 1
            self._value = value
            self._version += 1
            self._taken = False
            self._cond.notify_all()
            return self._version

    def peek(self) -> tuple[int, Optional[T]]:
        """The newest (version, value) without marking it taken; (0, None) if empty."""
        with self._cond:
            return self._version, self._value

    def wait_newer(self, version: int, timeout: Optional[float] = None) -> Optional[tuple[int, T]]:
        """Block until a value newer than `version` exists and take it.

        Returns (version, value), or None on timeout. Raises SlotClosedError
        once the slot is closed.
        """
        with self._cond:
            ready = self._cond.wait_for(lambda: self._closed or self._version > version, timeout)
            if self._closed:
                raise SlotClosedError("slot closed")
            if not ready:
                return None
            self._taken = True
            self._cond.notify_all()  # for wait_taken
            return self._version, self._value  # type: ignore[return-value]

    def wait_taken(self, version: int, timeout: Optional[float] = None) -> bool:
        """Block until the value of `version` has been taken by a reader, or replaced by a newer one.

        Returns False on timeout. Raises SlotClosedError once the slot is closed.
        """
        with self._cond:
            done = self._cond.wait_for(lambda: self._closed or self._taken or self._version != version, timeout)
            if self._closed:
                raise SlotClosedError("slot closed")
            return done

    def close(self) -> None:
        """Wake every waiting reader with SlotClosedError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
