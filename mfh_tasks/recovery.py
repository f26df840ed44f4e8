"""Recovery in seconds: dirty entries whose batch is lost get a new one, and dead workers' messages return.

Three ways a staged write's batch goes missing, and what brings it back:

- an api killed between staging and enqueueing: the entry turns stale; the sweep re-enqueues each
  entry once, ``sweep_stale_seconds`` after it was staged (:meth:`DirtySweeper.tick`);
- Redis restarting (from its append-only file) while a worker held batches: the entries survive,
  the batches in the worker's hands do not; on a new ``run_id`` (or Redis coming back after an
  outage) every dirty entry is re-enqueued at once;
- a worker killed: Dramatiq requeues its messages once its heartbeat is old and a maintenance pass
  runs; a worker runs that pass on a timer (:meth:`HubBroker.run_maintenance`).

Re-enqueueing a batch that was only slow is harmless: persisting twice is idempotent (docs/architecture.md
invariant 2). The scheduler's reconcile, on the same code path (:func:`requeue_dirty`), stays the safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import dramatiq
from redis.exceptions import RedisError

from mfh_core import HotStore
from mfh_core.heartbeat import Heartbeat
from mfh_core.metrics import REQUEUED_DIRTY
from mfh_core.metrics_http import serve_metrics
from mfh_core.redis_health import check_persistence, run_id_of
from mfh_models import MFHError, Settings
from mfh_tasks.broker import HubBroker
from mfh_tasks.enqueue import Send

__all__ = ["DirtySweeper", "Recovery", "requeue_dirty"]

log = logging.getLogger("mfh.recovery")


async def requeue_dirty(
    hot: HotStore, send: Send, *, after_ms: int | None = None, upto_ms: int | None = None, batch: int = 256
) -> int:
    """Enqueue batches for the dirty entries staged in ``(after_ms, upto_ms]``; how many were enqueued."""
    n = 0
    async for events in hot.dirty_events(after_ms=after_ms, upto_ms=upto_ms):
        for i in range(0, len(events), batch):
            await asyncio.to_thread(send, events[i : i + batch])
        n += len(events)
    return n


class DirtySweeper:
    """One tick every ``sweep_interval_seconds`` in each worker: cheap when idle (a few Redis calls)."""

    def __init__(self, hot: HotStore, send: Send, *, stale_s: float, process: str = "worker") -> None:
        self.hot = hot
        self.send = send
        self.stale_ms = int(stale_s * 1000)
        self.process = process
        self._redis_down = False

    async def tick(self) -> int:
        """Sweep what turned stale since the last tick, or everything after a Redis restart; never raises."""
        try:
            restarted = await self.hot.claim_restart(await run_id_of(self.hot.redis) or "")
            came_back = self._redis_down and await self.hot.claim_reconnect()
            self._redis_down = False
            if restarted or came_back:
                # The batches queued or held by a worker may be gone: every dirty entry gets a new one.
                _, upto = await self.hot.sweep_window(stale_ms=0)
                n = await requeue_dirty(self.hot, self.send, upto_ms=upto)
                reason = "redis_restart" if restarted else "redis_back"
                if n:
                    log.warning("%s: re-enqueued all %d dirty entries (%s)", self.process, n, reason)
            else:
                after, upto = await self.hot.sweep_window(stale_ms=self.stale_ms)
                if after == upto:
                    return 0
                n = await requeue_dirty(self.hot, self.send, after_ms=after, upto_ms=upto)
                reason = "stale"
                if n:
                    log.info("%s: re-enqueued %d entries dirty for over %d ms", self.process, n, self.stale_ms)
        except (RedisError, MFHError, OSError) as e:
            if not self._redis_down:
                log.warning("%s: dirty sweep paused, Redis unavailable: %s", self.process, e)
            self._redis_down = True
            return 0
        REQUEUED_DIRTY.labels(reason=reason).inc(n)
        return n


class Recovery(dramatiq.Middleware):
    """Worker middleware: a thread with its own event loop runs the maintenance timer and the dirty sweep.

    It also keeps this worker process's heartbeat (``mfh status``), serves its metrics unless the
    supervising ``mfh worker`` serves every worker process's (``serve_metrics=False``, multiprocess
    mode), and checks, once, what the worker's Redis keeps on disk.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        broker: HubBroker,
        send: Send,
        hot_factory: Callable[[], HotStore],
        serve_metrics: bool = True,
    ) -> None:
        self.settings = settings
        self.serve_metrics = serve_metrics
        self.broker = broker
        self.send = send
        self.hot_factory = hot_factory
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()

    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        if self.serve_metrics:
            serve_metrics(self.settings.metrics.worker_port, addr=self.settings.server.bind, what="worker")
        self._thread = threading.Thread(target=self._run, name="mfh-recovery", daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def before_worker_shutdown(self, broker: Any, worker: Any) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        rec = self.settings.recovery
        hot = self.hot_factory()
        s = self.settings
        heartbeat = Heartbeat.of(s, "worker", metrics_port=s.metrics.worker_port)
        try:
            loops = [self._check_persistence(hot), heartbeat.run(self._stop)]
            if rec.maintenance_interval_seconds > 0:
                loops.append(self._every(rec.maintenance_interval_seconds, self._maintain))
            if rec.sweep_interval_seconds > 0:
                sweeper = DirtySweeper(hot, self.send, stale_s=rec.sweep_stale_seconds)
                loops.append(self._every(rec.sweep_interval_seconds, sweeper.tick))
            await asyncio.gather(*loops)
        finally:
            await hot.close()

    async def _check_persistence(self, hot: HotStore) -> None:
        url = self.settings.storage.redis_url
        while await check_persistence(hot.redis, url=url, process="worker") is None:
            if await self._wait(2.0):
                return

    async def _maintain(self) -> None:
        with contextlib.suppress(RedisError):  # the sweep logs Redis outages; the next pass catches up
            await asyncio.to_thread(self.broker.run_maintenance)

    async def _every(self, interval_s: float, step: Callable[[], Any]) -> None:
        while True:
            await step()
            if await self._wait(interval_s):
                return

    async def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; True when the worker is shutting down."""
        assert self._stop is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()
