"""The change feed: one Redis subscription to what the worker publishes after each SQL commit.

Workers' ``mark_clean`` publishes ``[[namespace, key, version], ...]`` on
``HotStore.persisted_channel`` after each SQL commit (local or replicated); the api's service
listens here to wake PERSISTED waiters and Watch streams (which read the changes from the event log).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mfh_models import MemoryEvent, MFHError, Unavailable

__all__ = ["ChangeFeed", "Watcher"]

log = logging.getLogger("mfh.changefeed")


class Watcher:
    """One Watch stream's wake-up: set when a change of its namespace and prefix is committed. The stream
    reads the changes themselves from the event log, so a burst of notices is one wake-up, never an overflow."""

    def __init__(self, namespace: str, prefix: str) -> None:
        self.namespace, self.prefix = namespace, prefix
        self._changed = asyncio.Event()
        self.error: MFHError | None = None

    def notify(self) -> None:
        self._changed.set()

    def fail(self, error: MFHError) -> None:
        if self.error is None:
            self.error = error
            self._changed.set()

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - a poll interval, not a call deadline
        """True once a matching change was committed since the last call (False after ``timeout`` seconds
        without one); raises the error that ended the subscription. Read the log after it returns: a
        change committed meanwhile wakes the next call at once."""
        if self.error is None and not self._changed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
        if self.error is not None:
            raise self.error
        fired = self._changed.is_set()
        self._changed.clear()
        return fired


class ChangeFeed:
    """One Redis subscription per service to ``HotStore.persisted_channel`` (mark_clean publishes
    ``[[namespace, key, version], ...]`` after each SQL commit): wakes PERSISTED waiters, feeds Watch."""

    def __init__(self, *, redis_url: str, channel: str) -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            redis_url, decode_responses=True, socket_connect_timeout=5.0, socket_keepalive=True
        )
        self.channel = channel
        self._waiters: dict[tuple[str, str, int], asyncio.Future[None]] = {}
        self._watchers: set[Watcher] = set()
        self._task: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Event | None = None
        self.connected = False

    async def start(self, wait: float = 5.0) -> None:
        self._subscribed = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="mfh-changefeed")
        try:
            await asyncio.wait_for(self._subscribed.wait(), wait)
        except TimeoutError:
            log.warning("not subscribed to %s yet; PERSISTED writes and Watch wait for redis", self.channel)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for w in list(self._watchers):
            w.fail(Unavailable("server is shutting down"))
        await self._redis.aclose()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.connected, backoff = True, 0.05
                assert self._subscribed is not None
                self._subscribed.set()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None:
                        self._dispatch(msg["data"])
            except (RedisError, OSError) as e:
                if self.connected:
                    log.warning("change feed lost its redis subscription: %s", e)
                self.connected = False
                # Watchers may have missed a wake-up: end their streams; clients resume after their last sequence.
                for w in list(self._watchers):
                    w.fail(Unavailable(f"watch interrupted: redis subscription lost ({e})"))
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _dispatch(self, data: Any) -> None:
        try:
            entries = [(str(ns), str(key), int(v)) for ns, key, v in json.loads(data)]
        except (ValueError, TypeError):
            log.warning("ignoring a malformed message on %s: %.200r", self.channel, data)
            return
        for ns, key, v in entries:
            fut = self._waiters.get((ns, key, v))
            if fut is not None and not fut.done():
                fut.set_result(None)
            for w in self._watchers:
                if w.namespace == ns and key.startswith(w.prefix):
                    w.notify()

    def expect(self, events: Sequence[MemoryEvent]) -> list[asyncio.Future[None]]:
        """Futures resolved when each event's batch is committed (register before enqueueing)."""
        loop = asyncio.get_running_loop()
        futs = []
        for e in events:
            fut = self._waiters.setdefault((e.namespace, e.key, e.version), loop.create_future())
            futs.append(fut)
        return futs

    def forget(self, events: Sequence[MemoryEvent]) -> None:
        for e in events:
            self._waiters.pop((e.namespace, e.key, e.version), None)

    @contextlib.asynccontextmanager
    async def subscribe(self, namespace: str, prefix: str) -> AsyncIterator[Watcher]:
        """A wake-up for the commits of ``namespace`` under ``prefix``, registered before the caller first
        reads the log (so nothing committed after that read goes unnoticed)."""
        if not self.connected:
            raise Unavailable("watch unavailable: not subscribed to redis")
        w = Watcher(namespace, prefix)
        self._watchers.add(w)
        try:
            yield w
        finally:
            self._watchers.discard(w)
