"""Circuit breaker and bulkhead: fail fast when a store is down, refuse work before overload.

A :class:`CircuitBreaker` opens after ``failure_threshold`` consecutive :class:`Unavailable`
errors and lets one trial call through after ``reset_timeout`` seconds (half-open). Other
errors (NotFound, a bad request) say nothing about the store's health and are not counted.
A :class:`Bulkhead` bounds concurrent calls and the queue in front of them; past both it
raises :class:`ResourceExhausted` at once, so overload is shed instead of queued without bound
(PITFALLS.md: grpc.aio + Redis collapses past ~2k/s unless load is shed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from enum import StrEnum
from typing import TypeVar

from mfh_models import MFHError, ResourceExhausted, Unavailable

__all__ = ["Bulkhead", "CircuitBreaker", "CircuitState"]

T = TypeVar("T")


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Counts consecutive Unavailable failures of one dependency; open = fail fast with Unavailable."""

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at >= self.reset_timeout:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def allow(self) -> bool:
        """True when a call may go through now (closed, or the one half-open trial)."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._trial_in_flight = False

    def record_failure(self) -> None:
        self._failures += 1
        self._trial_in_flight = False
        if self._opened_at is not None or self._failures >= self.failure_threshold:
            self._opened_at = self._clock()  # a failed trial re-opens for a full reset_timeout

    def _release_trial(self) -> None:
        self._trial_in_flight = False

    def open_error(self) -> Unavailable:
        left = 0.0 if self._opened_at is None else self.reset_timeout - (self._clock() - self._opened_at)
        return Unavailable(f"{self.name} unavailable (circuit open; next try in {max(left, 0.0):.1f}s)")

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` through the breaker; Unavailable from it counts as a failure."""
        if not self.allow():
            raise self.open_error()
        try:
            result = await fn()
        except Unavailable:
            self.record_failure()
            raise
        except MFHError:  # NotFound, a conflict...: the dependency answered, so it is up
            self.record_success()
            raise
        except BaseException:
            self._release_trial()
            raise
        self.record_success()
        return result


class Bulkhead:
    """At most ``max_concurrent`` calls at once and ``max_queue_size`` waiting; beyond, ResourceExhausted."""

    def __init__(self, name: str, *, max_concurrent: int, max_queue_size: int) -> None:
        self.name = name
        self.max_concurrent = max_concurrent
        self.max_queue_size = max_queue_size
        self._sem = asyncio.Semaphore(max_concurrent)
        self._active = 0
        self._waiting = 0

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return self._waiting

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body; refuse at once when every slot and queue place is taken."""
        if self._active >= self.max_concurrent and self._waiting >= self.max_queue_size:
            raise ResourceExhausted(
                f"{self.name} is at capacity ({self.max_concurrent} running, {self._waiting} queued); retry later"
            )
        self._waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self._waiting -= 1
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            self._sem.release()
