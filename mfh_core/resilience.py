"""Circuit breaker, outage log and bulkhead: fail fast when a store is down, come back as soon as it answers.

A :class:`CircuitBreaker` opens after ``failure_threshold`` consecutive :class:`Unavailable`
errors. While open it refuses calls at once, except one probe call at a time: the first probe is
due ``first_probe`` seconds after opening, and each failed probe doubles the wait up to
``reset_timeout`` (with jitter, so replicas do not probe in step). A store that answers again is
back within about ``reset_timeout`` seconds, and meanwhile it sees one call per probe interval,
not a storm. Other errors (NotFound, a bad request) say nothing about the store's health and are
not counted.

An :class:`OutageLog` makes an outage cost one line when it starts, a summary at most every
``summary_every_s`` seconds while it lasts, and one line when it ends (the breaker uses one).

A :class:`Bulkhead` bounds concurrent calls and the queue in front of them; past both it
raises :class:`ResourceExhausted` at once, so overload is shed instead of queued without bound
(PITFALLS.md: grpc.aio + Redis collapses past ~2k/s unless load is shed).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from enum import StrEnum
from typing import TypeVar

from mfh_core.metrics import BREAKER_STATE
from mfh_models import DeadlineExceeded, MFHError, ResourceExhausted, Unavailable
from mfh_models.settings import CircuitBreakerSettings

__all__ = ["Bulkhead", "CircuitBreaker", "CircuitState", "OutageLog", "breaker_from_settings"]

T = TypeVar("T")

_log = logging.getLogger("mfh.resilience")


class OutageLog:
    """One warning when ``name`` starts failing, a rate-limited summary while it lasts, one line when back.

    ``what`` names the things counted meanwhile (``"calls refused"``, ``"batches deferred"``).
    """

    def __init__(
        self,
        name: str,
        *,
        what: str = "failures",
        logger: logging.Logger | None = None,
        summary_every_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.what = what
        self.log = logger or _log
        self.summary_every_s = summary_every_s
        self._clock = clock
        self._since: float | None = None
        self._count = 0
        self._next_summary = 0.0

    @property
    def down(self) -> bool:
        return self._since is not None

    @property
    def count(self) -> int:
        """How many things were counted since the outage began (0 when there is none)."""
        return self._count

    def failure(self, reason: str, *, count: int = 1) -> None:
        """Record ``count`` failed things; logs only at the start and when a summary is due."""
        now = self._clock()
        reason = " ".join(reason.split())  # driver messages span lines: keep one line per entry
        if self._since is None:
            self._since, self._count, self._next_summary = now, count, now + self.summary_every_s
            self.log.warning("%s unavailable: %s", self.name, reason)
            return
        self._count += count
        if now >= self._next_summary:
            self._next_summary = now + self.summary_every_s
            self.log.warning(
                "%s unavailable for %.0f s, %d %s so far (last error: %s)",
                self.name,
                now - self._since,
                self._count,
                self.what,
                reason,
            )

    def success(self) -> None:
        """The dependency answered: log the end of an outage, if there was one."""
        if self._since is None:
            return
        self.log.info(
            "%s is back after %.1f s (%d %s meanwhile)", self.name, self._clock() - self._since, self._count, self.what
        )
        self._since, self._count = None, 0


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"  # a probe is due or in flight


class CircuitBreaker:
    """Counts consecutive Unavailable failures of one dependency; open = fail fast, probing with backoff."""

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout: float = 1.0,
        first_probe: float = 0.1,
        jitter: float = 0.2,
        logger: logging.Logger | None = None,
        summary_every_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout  # the longest wait between probes
        self.first_probe = min(first_probe, reset_timeout)
        self.jitter = jitter
        self._clock = clock
        self._rng = rng
        self.outage = OutageLog(
            f"{name} (circuit open)", what="calls refused", logger=logger, summary_every_s=summary_every_s, clock=clock
        )
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_wait = self.first_probe
        self._next_probe = 0.0
        self._trial_in_flight = False
        self.probes = 0  # probe calls let through while open (for tests and metrics)
        BREAKER_STATE.labels(name=name).set(0)  # exported from start-up: closed

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._trial_in_flight or self._clock() >= self._next_probe:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def _schedule_probe(self, now: float) -> None:
        spread = 1.0 + self.jitter * (2.0 * self._rng() - 1.0)
        self._next_probe = now + self._probe_wait * spread

    def allow(self) -> bool:
        """True when a call may go through now (closed, or the one probe that is due)."""
        if self._opened_at is None:
            return True
        if not self._trial_in_flight and self._clock() >= self._next_probe:
            self._trial_in_flight = True
            self.probes += 1
            BREAKER_STATE.labels(name=self.name).set(1)
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._trial_in_flight = False
        if self._opened_at is not None:
            self._opened_at = None
            self._probe_wait = self.first_probe
            self.outage.success()
            BREAKER_STATE.labels(name=self.name).set(0)

    def record_failure(self, reason: str = "") -> None:
        self._failures += 1
        self._trial_in_flight = False
        now = self._clock()
        if self._opened_at is not None:  # a failed probe: wait longer, up to reset_timeout
            self._probe_wait = min(self._probe_wait * 2.0, self.reset_timeout)
            self._schedule_probe(now)
            BREAKER_STATE.labels(name=self.name).set(2)
        elif self._failures >= self.failure_threshold:
            self._opened_at = now
            self._probe_wait = self.first_probe
            self._schedule_probe(now)
            BREAKER_STATE.labels(name=self.name).set(2)
            self.outage.failure(f"{self._failures} consecutive failures ({reason or 'unavailable'})", count=0)

    def _release_trial(self) -> None:
        self._trial_in_flight = False

    def open_error(self) -> Unavailable:
        now = self._clock()
        since = 0.0 if self._opened_at is None else now - self._opened_at
        left = max(self._next_probe - now, 0.0)
        self.outage.failure(f"circuit open for {since:.1f}s")
        return Unavailable(f"{self.name} unavailable (circuit open for {since:.1f}s; next probe in {left:.1f}s)")

    async def wait_allowed(self, timeout: float) -> bool:  # noqa: ASYNC109 - a wait budget, not a call timeout
        """Wait (up to ``timeout`` s) until a call may go through; True if it may. Callers that can wait
        (a worker's batch) use this instead of failing at once, so they go ahead as soon as a probe succeeds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.allow():
            left = deadline - loop.time()
            if left <= 0:
                return False
            due = self._next_probe - self._clock()
            await asyncio.sleep(min(max(due, 0.02), left, 0.25))
        return True

    async def call(self, fn: Callable[[], Awaitable[T]], *, wait: float = 0.0) -> T:
        """Run ``fn`` through the breaker (waiting up to ``wait`` s while open); Unavailable counts as a failure."""
        allowed = await self.wait_allowed(wait) if wait > 0 else self.allow()
        if not allowed:
            raise self.open_error()
        try:
            result = await fn()
        except Unavailable as e:
            self.record_failure(e.message)
            raise
        except DeadlineExceeded:  # sent and not answered (a timeout, a lost connection): no verdict either way
            self._release_trial()
            raise
        except MFHError:  # NotFound, a conflict...: the dependency answered, so it is up
            self.record_success()
            raise
        except BaseException:
            self._release_trial()
            raise
        self.record_success()
        return result


def breaker_from_settings(
    name: str, cb: CircuitBreakerSettings, *, logger: logging.Logger | None = None
) -> CircuitBreaker:
    """A breaker with the ``resilience.circuit_breaker`` settings."""
    return CircuitBreaker(
        name,
        failure_threshold=cb.failure_threshold,
        reset_timeout=cb.reset_timeout,
        first_probe=cb.first_probe_seconds,
        summary_every_s=cb.summary_every_seconds,
        logger=logger,
    )


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
