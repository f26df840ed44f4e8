"""Full garbage collections on a schedule, off the request path (docs/operations.md, "Garbage collection").

CPython runs a full (generation 2) collection whenever the objects promoted since the last one
exceed a quarter of those that survived it. A full collection walks every live container object
and holds the event loop while it does: 1,000 idle Watch streams are about 85,000 such objects,
and one pass over them took 40-130 ms of CPU (issue 7's fairness bench: every flooded window held
one, and both doors' p99 was that pause). Opening streams, or a flood keeping requests alive
across a few young collections, is exactly what promotes objects, so the collector's own rule put
its longest pause where the load was.

:class:`CollectorPolicy` keeps the young generations as CPython runs them (short pauses) and
takes the full collection out of the allocator's hands: it runs every ``full_interval_s``, or
sooner once the process's RSS grew ``rss_growth_mb`` since the last one (garbage in reference
cycles is what only a full collection frees; the RSS bound keeps it bounded), from a task of the
event loop. Objects that live for the whole process (start-up) are frozen out of every pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from typing import Final

__all__ = ["CollectorPolicy", "rss_mb"]

log = logging.getLogger("mfh.gc")

#: gen-2 threshold that CPython never reaches in practice: the policy triggers full collections itself.
_NEVER: Final = 1 << 30
_PAGE_MB: Final = os.sysconf("SC_PAGE_SIZE") / (1024 * 1024) if hasattr(os, "sysconf") else 4096 / (1024 * 1024)


def rss_mb() -> float:
    """This process's resident set size in MiB (0.0 where /proc is not available)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_MB
    except (OSError, ValueError, IndexError):
        return 0.0


class CollectorPolicy:
    """When full collections run; :meth:`install` once at start-up, then :meth:`run` as a task."""

    def __init__(self, *, full_interval_s: float = 300.0, rss_growth_mb: float = 64.0, check_s: float = 1.0) -> None:
        self.full_interval_s = full_interval_s
        self.rss_growth_mb = rss_growth_mb
        self.check_s = check_s
        self.full_collections = 0
        self.last_pause_s = 0.0
        self._last = time.monotonic()
        self._rss_after = 0.0
        self._saved: tuple[int, int, int] | None = None

    def install(self) -> None:
        """Collect, freeze what is alive now (start-up objects never die), and turn automatic full
        collections off; the young generations keep CPython's thresholds."""
        gc.collect()
        gc.freeze()
        self._saved = gc.get_threshold()
        young, middle, _ = self._saved
        gc.set_threshold(young, middle, _NEVER)
        self._last = time.monotonic()
        self._rss_after = rss_mb()

    def uninstall(self) -> None:
        """CPython's own thresholds again (tests, or an embedding process that stops serving)."""
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None

    def due(self) -> str | None:
        """Why a full collection is due now, or None."""
        if time.monotonic() - self._last >= self.full_interval_s:
            return "interval"
        if self.rss_growth_mb > 0 and rss_mb() - self._rss_after >= self.rss_growth_mb:
            return "rss"
        return None

    def collect(self, reason: str = "asked") -> int:
        """One full collection now; returns the number of unreachable objects found."""
        started = time.perf_counter()
        found = gc.collect()
        self.last_pause_s = time.perf_counter() - started
        self.full_collections += 1
        self._last = time.monotonic()
        self._rss_after = rss_mb()
        log.debug(
            "full collection (%s): %d unreachable, %.1f ms, rss %.0f MiB",
            reason,
            found,
            self.last_pause_s * 1000,
            self._rss_after,
        )
        return found

    async def run(self, stop: asyncio.Event) -> None:
        """Check every ``check_s`` until ``stop`` is set; the check itself reads one /proc file."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.check_s)
            reason = self.due()
            if reason is not None and not stop.is_set():
                self.collect(reason)
