"""Durable JetStream consumers: a pull loop feeding one handler, which acks."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable

from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig

from mfh_core.jetstream import NATS_ERRORS, PULL_EXPIRES_S, decode_event, quietly, redelivery_delay
from mfh_core.nats_connection import NatsConnection
from mfh_core.pull_feed import ConsumerGone, PullFeed
from mfh_models import InvalidArgument, MemoryEvent, Unavailable

__all__ = ["DurableSubscription", "EventHandler"]

log = logging.getLogger("mfh.eventbus")

EventHandler = Callable[[MemoryEvent, Msg], Awaitable[None]]


class DurableSubscription:
    """A durable consumer fed to the handler (which acks) by one task. Pull, not push: a request a restarted
    server forgot is just sent again, and flow is bounded by our batch, not by client-side pending limits.

    ``ensure_stream`` makes the stream exist again before the consumer is (a fresh server lost both);
    ``on_closed`` tells the owner the subscription is closed; a message for which ``skip`` is true is
    acked without being decoded or handed to the handler (a replicator's own events: half the stream on
    two hosts, and decoding each one cost about as much as applying a remote one)."""

    def __init__(
        self,
        conn: NatsConnection,
        stream: str,
        config: ConsumerConfig,
        handler: EventHandler,
        *,
        batch: int,
        ensure_stream: Callable[[], Awaitable[None]],
        on_closed: Callable[[DurableSubscription], None] | None = None,
        skip: Callable[[Msg], bool] | None = None,
    ) -> None:
        assert config.durable_name
        self.durable = config.durable_name
        self.stream = stream
        self._conn = conn
        self._config = config
        self._handler = handler
        self._ensure_stream = ensure_stream
        self._on_closed = on_closed
        self._skip = skip
        self._feed = PullFeed(conn, stream, self.durable, batch=batch)
        self._task: asyncio.Task[None] | None = None
        self._in_handler = False
        self._closing = False
        self.handled = 0
        self.terminated = 0

    async def start(self) -> None:
        """Create (or update) the durable consumer and start feeding the handler.

        An existing consumer keeps where it starts (its deliver policy and start sequence cannot be updated:
        ``EventBus.reset_durable`` set them for a joined host); the rest of the config is ours."""
        config = self._config
        with contextlib.suppress(Unavailable):
            existing = (await self._conn.consumer_info(self.stream, self.durable)).config
            config = dataclasses.replace(
                config,
                deliver_policy=existing.deliver_policy,
                opt_start_seq=existing.opt_start_seq,
                opt_start_time=existing.opt_start_time,
            )
        await self._conn.add_consumer(self.stream, config)
        await self._feed.start()
        self._task = asyncio.create_task(self._run(), name=f"mfh-eventbus-{self.durable}")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        backoff = 0.5
        while not self._closing:
            try:
                msg = await self._feed.next(PULL_EXPIRES_S)
            except ConsumerGone as e:
                log.warning("%s; creating it again", e)
                await self._recreate()
                continue
            except (*NATS_ERRORS, Unavailable) as e:
                if not self._conn.is_open:
                    log.info("consumer %s stops: the connection is closed", self.durable)
                    return
                log.warning("consumer %s: %s: %s; retrying in %.1fs", self.durable, type(e).__name__, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.5
            if msg is not None:
                await self._dispatch(msg)

    async def _recreate(self) -> None:
        delay = 0.5
        while not self._closing:
            try:
                await self._ensure_stream()  # a fresh server has lost the stream too
                await self._conn.add_consumer(self.stream, self._config)
                self._feed.restart(self.durable)
                log.info("consumer %s created again", self.durable)
                return
            except (Unavailable, InvalidArgument) as e:
                log.warning("consumer %s cannot be created yet (%s); retrying in %.1fs", self.durable, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _dispatch(self, msg: Msg) -> None:
        if self._skip is not None and self._skip(msg):
            self.handled += 1
            await quietly(msg.ack(), "ack")
            return
        try:
            event = decode_event(msg.data)
        except InvalidArgument as e:
            log.error("consumer %s: terminating a malformed message on %s: %s", self.durable, msg.subject, e)
            self.terminated += 1
            await quietly(msg.term(), "term")
            return
        self._in_handler = True
        try:
            await self._handler(event, msg)
            self.handled += 1
        except Exception:
            delay = redelivery_delay(msg)
            log.exception("consumer %s: handler failed on %s; redelivery in %.1fs", self.durable, event.event_id, delay)
            await quietly(msg.nak(delay=delay), "nak")
        finally:
            self._in_handler = False

    async def info(self) -> dict[str, int]:
        """The consumer's counters on the server (pending, ack pending, redelivered, delivered seq)."""
        ci = await self._conn.consumer_info(self.stream, self.durable)
        return {
            "num_pending": ci.num_pending or 0,
            "num_ack_pending": ci.num_ack_pending or 0,
            "num_redelivered": ci.num_redelivered or 0,
            "delivered_stream_seq": ci.delivered.stream_seq if ci.delivered else 0,
            "ack_floor_stream_seq": ci.ack_floor.stream_seq if ci.ack_floor else 0,
        }

    async def close(self, *, wait_s: float = 10.0) -> None:
        """Stop fetching; a running handler may finish; messages fetched but not handled are nak'ed."""
        self._closing = True
        task = self._task
        if task is not None and not task.done():
            if not self._in_handler:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), wait_s)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._feed.stop()
        if self._conn.is_open:
            for msg in self._feed.buffered():
                await quietly(msg.nak(), "nak")
        if self._on_closed is not None:
            self._on_closed(self)
