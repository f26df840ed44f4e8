"""One pull consumer's messages, over the shared :class:`NatsConnection` (the event bus's reads and its
durable consumers both use it)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mfh_core.jetstream import NATS_ERRORS, PULL_EXPIRES_S, PULL_HEARTBEAT_S, msg_description, msg_status
from mfh_core.nats_connection import NatsConnection

__all__ = ["ConsumerGone", "PullFeed"]

log = logging.getLogger("mfh.eventbus")


class ConsumerGone(Exception):
    """The consumer (or its stream) no longer answers pull requests: it must be created again."""


class PullFeed:
    """One pull consumer's messages; the open pull request is re-sent when used up, expired, silent (missed
    heartbeats) or after a reconnect, so a NATS restart, which forgets pull requests, is survived.

    The next request goes out before the current one runs dry: once half its batch is delivered, or
    three quarters into its lifetime, if nothing delivered is waiting to be taken (so a backlog is
    buffered no deeper than before). Over a slow link (200 ms each way) a request sent only after the
    last one ended left a gap of a round trip or more, every batch and every expiry, in which nothing
    was delivered. Two requests may overlap; the older one just ends (used up or expired)."""

    def __init__(self, conn: NatsConnection, stream: str, consumer: str, *, batch: int) -> None:
        self._conn = conn
        self.stream = stream
        self.consumer = consumer
        self._batch = max(1, batch)
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Subscription | None = None
        self._inbox = ""
        self._requests = itertools.count(1)
        self._reply = ""  # reply subject of the current pull request
        self._outstanding = 0  # messages the current request may still deliver
        self._expires_at = 0.0
        self._renew_at = 0.0  # the next request goes out by then, while this one still runs
        self._watch_until = 0.0  # no heartbeat or message by then: the request is lost
        self._reconnects = -1

    async def start(self) -> None:
        nc = self._conn.client()
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox + ".*", cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        # Liveness is judged on arrival, not on consumption, so a slow handler does not cause extra pulls.
        if not msg_status(msg) or msg.subject == self._reply:
            self._watch_until = asyncio.get_running_loop().time() + 3 * PULL_HEARTBEAT_S
        self._queue.put_nowait(msg)

    def restart(self, consumer: str) -> None:
        """Point the feed at another consumer; its first ``next`` sends a fresh pull request."""
        self.consumer = consumer
        self._outstanding = 0

    def buffered(self) -> list[Msg]:
        """Delivered messages nobody has taken yet (to nak on close)."""
        out: list[Msg] = []
        while not self._queue.empty():
            msg = self._queue.get_nowait()
            if not msg_status(msg):
                out.append(msg)
        return out

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(*NATS_ERRORS):
                await self._sub.unsubscribe()
            self._sub = None

    def _needs_pull(self, now: float) -> bool:
        return (
            self._outstanding <= 0
            or (self._queue.empty() and (self._outstanding <= self._batch // 2 or now >= self._renew_at))
            or now >= self._expires_at
            or now >= self._watch_until
            or self._reconnects != self._conn.reconnects
        )

    async def _pull(self, nc: NATS, now: float) -> None:
        self._reply = f"{self._inbox}.{next(self._requests)}"
        request = {
            "batch": self._batch,
            "expires": int(PULL_EXPIRES_S * 1e9),
            "idle_heartbeat": int(PULL_HEARTBEAT_S * 1e9),
        }
        subject = f"{self._conn.js_prefix}.CONSUMER.MSG.NEXT.{self.stream}.{self.consumer}"
        await nc.publish(subject, json.dumps(request).encode(), reply=self._reply)
        # What the older request may still deliver is not counted: at worst one more request is sent early.
        self._outstanding = self._batch
        self._expires_at = now + PULL_EXPIRES_S + 1.0
        self._renew_at = now + 0.75 * PULL_EXPIRES_S
        self._watch_until = now + 3 * PULL_HEARTBEAT_S
        self._reconnects = self._conn.reconnects

    async def next(self, within_s: float) -> Msg | None:
        """The next delivered message, or None after ``within_s`` seconds; raises ConsumerGone."""
        loop = asyncio.get_running_loop()
        end = loop.time() + within_s
        while True:
            now = loop.time()
            nc = self._conn.client()
            if nc.is_connected and self._needs_pull(now):
                await self._pull(nc, now)
            if self._queue.empty():
                wait = min(end, self._watch_until, self._expires_at) - now
                if not nc.is_connected:
                    wait = min(end - now, 0.1)
                if now >= end:
                    return None
                try:
                    msg = await asyncio.wait_for(self._queue.get(), timeout=max(wait, 0.001))
                except TimeoutError:
                    continue
            else:
                msg = self._queue.get_nowait()
            status = msg_status(msg)
            if status is None:
                self._outstanding -= 1
                return msg
            if msg.subject != self._reply:
                continue  # about an older pull request
            if status == "100":
                continue  # idle heartbeat: the request is alive
            if status == "503":
                raise ConsumerGone(f"consumer {self.consumer} does not answer (503)")
            description = msg_description(msg)
            if status == "409" and ("Deleted" in description or "push" in description):
                raise ConsumerGone(f"consumer {self.consumer}: {description}")
            if status not in ("404", "408", "409"):
                log.warning("pull request for %s ended with status %s %s", self.consumer, status, description)
            self._outstanding = 0  # request over (expired, no messages, ...): pull again
