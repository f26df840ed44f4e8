"""The near cache's invalidation feed: Redis server-assisted client tracking, broadcast mode.

One dedicated connection runs ``CLIENT TRACKING ON BCAST PREFIX <prefix>:i: REDIRECT <its own id>``
and subscribes to ``__redis__:invalidate``: Redis then sends it the name of every hot-store key
that changes (a write staged by any api, a commit marked clean by a worker, a replicated event
applied by the replicator, an expiry, an eviction; ``FLUSHDB`` says "everything"), whoever made
the change. Why broadcast mode: the api's reads go through a pool of ordinary connections that
would each have to carry tracking state (and lose it on every reconnect); in broadcast mode the
server tracks prefixes, not reads, so no read connection needs anything, and the server batches
the keys changed in one event-loop turn into one message. The cost, one message per batch of
writes on the host, is small beside the writes themselves. The connection speaks RESP2, where
the invalidations arrive as ordinary pub/sub messages (redis-py's asyncio client has no public
handler for RESP3 invalidation pushes).

Freshness: a PING is sent every ``ping_interval_s`` on the same connection. Redis answers in
order, so when its PONG is read every invalidation sent before Redis saw the PING has been
applied: :meth:`NearCache.confirmed` records the ping's send time, and the cache serves hits
only while that time is at most ``max_stale_s`` old. A connection that fails, or whose pings go
unanswered for ``dead_after_s``, is closed: the cache is dropped and stays off until tracking is
re-established on a new connection (retried with backoff, one log line per outage).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any, Final

import redis.asyncio as aioredis

from mfh_core.nearcache import NearCache
from mfh_core.resilience import OutageLog

__all__ = ["INVALIDATION_CHANNEL", "TrackingFeed"]

log = logging.getLogger("mfh.nearcache")

INVALIDATION_CHANNEL: Final = "__redis__:invalidate"
_FIRST_RETRY_S: Final = 0.05


class TrackingFeed:
    """Keeps ``cache`` told about every change of a key under ``key_prefix`` (``<redis_prefix>:i:``)."""

    def __init__(
        self,
        *,
        redis_url: str,
        key_prefix: str,
        cache: NearCache,
        ping_interval_s: float,
        dead_after_s: float = 2.0,
        connect_timeout_s: float = 5.0,
        max_backoff_s: float = 1.0,
    ) -> None:
        pool = aioredis.ConnectionPool.from_url(redis_url, socket_connect_timeout=connect_timeout_s)
        # Invalidations must arrive as pub/sub messages on a connection that blocks until they come:
        # whatever the URL says, this one speaks RESP2 and has no read timeout (pings detect a dead peer).
        pool.connection_kwargs.update(protocol=2, socket_timeout=None, decode_responses=False)
        self._pool = pool
        self.key_prefix = key_prefix
        self.cache = cache
        self.ping_interval_s = ping_interval_s
        self.dead_after_s = max(dead_after_s, 4 * ping_interval_s)
        self.max_backoff_s = max_backoff_s
        self._pings: collections.deque[float] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self._tracking = asyncio.Event()
        self.sessions = 0  # tracking sessions established (tests: a reconnect made a new one)
        self._last_kick = float("-inf")
        self._kicks: set[asyncio.Task[None]] = set()
        cache.on_stale = self._kick
        self._outage = OutageLog("near cache invalidation feed", what="reconnect attempts", logger=log)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="mfh-near-cache-tracking")

    async def wait_tracking(self, timeout: float) -> bool:  # noqa: ASYNC109 - a wait budget
        """Wait until tracking is on (for start-up and tests); False after ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._tracking.wait(), timeout)
        return self._tracking.is_set()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.cache.tracking_lost()
        await self._pool.aclose()

    async def _run(self) -> None:
        backoff = _FIRST_RETRY_S
        while True:
            sessions = self.sessions
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure ends the session: the cache cannot know what it missed
                self._outage.failure(f"{type(e).__name__}: {e}")
            finally:
                self._tracking.clear()
                self.cache.tracking_lost()
                await self._disconnect()
            if self.sessions != sessions:
                backoff = _FIRST_RETRY_S  # it had been up: retry soon, then back off
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def _session(self) -> None:
        conn: Any = self._pool.make_connection()  # type: ignore[no-untyped-call]
        self._conn = conn
        self._pings.clear()
        await conn.connect()
        await conn.send_command("CLIENT", "ID")
        client_id = int(await conn.read_response())
        await conn.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", "PREFIX", self.key_prefix)
        reply = await conn.read_response()
        if reply not in (b"OK", "OK"):
            raise ConnectionError(f"CLIENT TRACKING refused: {reply!r}")
        await conn.send_command("SUBSCRIBE", INVALIDATION_CHANNEL)
        reply = await conn.read_response()
        if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
            raise ConnectionError(f"unexpected SUBSCRIBE reply: {reply!r}")
        self.cache.tracking_started()
        self.sessions += 1
        self._tracking.set()
        self._outage.success()
        pinger = asyncio.create_task(self._ping_loop(conn), name="mfh-near-cache-ping")
        try:
            while True:  # ends with the connection: the pinger closes it when pongs stop coming
                self._handle(await conn.read_response())
        finally:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pinger

    def _handle(self, msg: Any) -> None:
        if not isinstance(msg, list) or not msg:
            return
        kind = msg[0]
        if kind == b"message":
            keys = msg[2]
            if keys is None:  # FLUSHDB / FLUSHALL: every key may have changed
                self.cache.clear()
                return
            if isinstance(keys, bytes):
                keys = [keys]
            start = len(self.key_prefix)
            idents = []
            for raw in keys:
                ns, _, key = raw.decode("utf-8", "surrogateescape")[start:].partition(":")
                idents.append((ns, key))
            self.cache.invalidate(idents)
        elif kind == b"pong" and self._pings:
            self.cache.confirmed(self._pings.popleft())

    async def _ping_loop(self, conn: Any) -> None:
        clock = self.cache.clock
        while True:
            now = clock()
            if self._pings and now - self._pings[0] > self.dead_after_s:
                log.warning("near cache invalidation feed: no PONG for %.1f s; reconnecting", now - self._pings[0])
                await conn.disconnect()  # the reader's read fails, which ends the session
                return
            await self._ping(conn)
            await asyncio.sleep(self.ping_interval_s)

    async def _ping(self, conn: Any) -> None:
        if not conn.is_connected:  # never let the send reconnect: a new connection is not tracking
            return
        # The send time is queued and the PING written in one step (nothing awaited in between), so the
        # queue stays in the order Redis answers in, whichever task pings.
        self._pings.append(self.cache.clock())
        await conn.send_command("PING", check_health=False)

    def _kick(self) -> None:
        """A lookup found the confirmation too old (the process was descheduled, say): ping now, not at the next
        tick, so hits resume one round trip later. At most one extra ping per ``ping_interval_s / 4``."""
        conn, now = self._conn, self.cache.clock()
        if conn is None or now - self._last_kick < self.ping_interval_s / 4:
            return
        self._last_kick = now
        task = asyncio.get_running_loop().create_task(self._ping(conn))
        self._kicks.add(task)
        task.add_done_callback(self._kicks.discard)

    async def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def drop_connection(self) -> None:
        """Close the feed's connection as a network failure would (tests; the feed reconnects)."""
        if self._conn is not None:
            await self._conn.disconnect()
