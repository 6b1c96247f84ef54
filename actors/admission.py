"""Admission and deadlines: whether the engine takes an operation now, and how long the
caller waits for it.

- An operation is admitted while the engine is open (started, not stopping) and fewer
  than `operations_in_flight_max` are in flight; otherwise it is refused at once
  (`not_ready`, `overloaded`): bounded admission answers instead of queueing without
  limit.
- Every operation waits at most `operation_timeout_s`. All operations have the same
  timeout, so deadlines come in order: one deque and one timer for all of them (like
  `asyncio.timeout`, minus a timer handle per operation); `_expire` cancels the tasks
  whose deadline passed, and the cancellation becomes `operation_timeout` (503, safe to
  retry with the same idempotency key). A keyed operation goes on after its caller's
  wait ends: its key stays in flight until it resolves (`actors/idempotency.py`).

Runs on the engine's event loop only."""
from __future__ import annotations

import asyncio
import collections
from typing import Awaitable, TypeVar

from engine.errors import Overloaded, Unavailable

T = TypeVar("T")


class Admission:
    def __init__(self, *, in_flight_max: int, timeout_s: float):
        self.open = False
        self.in_flight = 0
        self.in_flight_max = in_flight_max
        self.timeout_s = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        # [when, task (None once finished), the task's cancel count, expired], oldest first.
        self._deadlines: collections.deque[list] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.open = True

    def admit(self) -> None:
        """Refuses an operation the engine cannot take now."""
        if not self.open:
            raise Unavailable("the engine is not running", code="not_ready")
        if self.in_flight >= self.in_flight_max:
            raise Overloaded("too many operations in flight; retry shortly",
                             {"operations_in_flight_max": self.in_flight_max})

    async def bounded(self, awaitable: Awaitable[T]) -> T:
        """Waits for `awaitable` at most `timeout_s` (an operation that is not counted in
        flight: the audit records of the security API)."""
        deadline = self.deadline()
        try:
            return await awaitable
        except asyncio.CancelledError:
            self.missed(deadline)
            raise
        finally:
            self.done(deadline)

    def deadline(self) -> list:
        """Starts the deadline of the task running now. The engine's operations call
        this, `missed` and `done` inline (`bounded` without its coroutine)."""
        task = asyncio.current_task(self._loop)   # without a loop it costs a getpid() system call
        deadline = [self._loop.time() + self.timeout_s, task, task.cancelling(), False]
        self._deadlines.append(deadline)
        if self._timer is None:
            self._timer = self._loop.call_at(deadline[0], self._expire)
        return deadline

    @staticmethod
    def missed(deadline: list) -> None:
        """In the task's `except CancelledError`: a cancellation that is the deadline's
        own becomes `operation_timeout`; any other goes on."""
        if deadline[3] and deadline[1].uncancel() <= deadline[2]:
            raise Unavailable("the operation did not finish in time; retry with the same idempotency key",
                              code="operation_timeout") from None

    def done(self, deadline: list) -> None:
        deadline[1] = None
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] is None:
            deadlines.popleft()

    def _expire(self) -> None:
        self._timer = None
        deadlines, now = self._deadlines, self._loop.time()
        while deadlines and (deadlines[0][1] is None or deadlines[0][0] <= now):
            deadline = deadlines.popleft()
            if deadline[1] is not None:
                deadline[3] = True
                deadline[1].cancel()
        if deadlines:
            self._timer = self._loop.call_at(deadlines[0][0], self._expire)
