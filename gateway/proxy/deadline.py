"""One exchange's timeout: the task awaiting the backend is cancelled when its deadline passes.

``asyncio.timeout`` re-arms its timer on every reschedule, and a stream reschedules on every chunk
(its idle timeout): one timer per chunk, a few microseconds each, which was most of what the
gateway spent on a streamed request. Here moving the deadline later only stores a number; the
timer, when it fires, finds the deadline moved and sleeps again, so a flowing stream costs one
timer per idle period. Moving the deadline earlier re-arms at once.
"""

from __future__ import annotations

import asyncio


class Deadline:
    """Cancel the current task at ``at`` (loop time) unless moved or closed first. After a
    ``CancelledError``, ``timed_out`` tells whether this deadline caused it."""

    __slots__ = ("_armed", "_at", "_cancelling", "_handle", "_loop", "_task", "expired")

    def __init__(self, at: float) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a Deadline cancels a task, and there is none running")
        self._loop = asyncio.get_running_loop()
        self._task = task
        self._cancelling = task.cancelling()
        self._at = at
        self._armed = at
        self._handle = self._loop.call_at(at, self._fire)
        self.expired = False

    def move(self, at: float) -> None:
        self._at = at
        if at < self._armed and not self.expired:
            self._rearm(at)

    def close(self) -> None:
        self._handle.cancel()

    def timed_out(self) -> bool:
        """True when this deadline cancelled the task and nothing else asked for a cancellation
        meanwhile; the deadline's own cancellation is then withdrawn. Call it once, in the
        ``except asyncio.CancelledError`` of the work it guards."""
        return self.expired and self._task.uncancel() <= self._cancelling

    def _rearm(self, at: float) -> None:
        self._handle.cancel()
        self._armed = at
        self._handle = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        if self._loop.time() < self._at:  # moved later since it was armed
            self._rearm(self._at)
            return
        self.expired = True
        self._task.cancel()
