"""JetStream event bus: one message per MemoryEvent with ``Nats-Msg-Id`` = event id, so an outbox relay is deduplicated.

Publishing never raises when NATS is down (the caller's outbox relays what was not acked). The bus
owns the stream; the connection it shares with its consumers is :class:`NatsConnection`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)

from mfh_core.jetstream import (
    EXPECTED_STREAM_HEADER,
    FIRST,
    MSG_ID_HEADER,
    NATS_ERRORS,
    PULL_HEARTBEAT_S,
    REPAIR_HEADER,
    all_done,
    decode_event,
    encode_event,
    msg_metadata,
    translate_error,
)
from mfh_core.nats_connection import NatsConnection
from mfh_core.nats_security import NatsSecurity
from mfh_core.pull_feed import ConsumerGone, PullFeed
from mfh_core.subscription import DurableSubscription, EventHandler
from mfh_models import InvalidArgument, MemoryEvent, Unavailable
from mfh_models.settings import ReplicationSettings

log = logging.getLogger("mfh.eventbus")

__all__ = [
    "EXPECTED_STREAM_HEADER",
    "MSG_ID_HEADER",
    "REPAIR_HEADER",
    "DurableSubscription",
    "EventBus",
    "EventHandler",
    "is_repair",
]


def is_repair(msg: Any) -> bool:
    """Whether a stream message is an event the cross-host audit re-published (``REPAIR_HEADER``)."""
    headers = getattr(msg, "headers", None)
    return bool(headers and headers.get(REPAIR_HEADER))


class EventBus:
    """JetStream stream of MemoryEvents: one message per event, Nats-Msg-Id = event_id."""

    def __init__(
        self,
        *,
        nats_url: str,
        stream: str,
        subject_prefix: str,
        duplicate_window_s: float,
        max_age_s: float,
        num_replicas: int = 1,
        publish_timeout_s: float = 2.0,
        name: str = "mfh",
        security: NatsSecurity | None = None,
    ) -> None:
        prefix = subject_prefix.strip(".")
        if not prefix or any(c in prefix for c in " \t\r\n*>") or "" in prefix.split("."):
            raise InvalidArgument(f"subject_prefix {subject_prefix!r} must be dot-separated tokens without wildcards")
        if not 0 < duplicate_window_s <= max_age_s:
            raise InvalidArgument("duplicate_window_s must be positive and at most max_age_s")
        if publish_timeout_s <= 0:
            raise InvalidArgument("publish_timeout_s must be positive")
        self.nats_url = nats_url  # as given, so possibly with a password: logs show self.conn.url
        self.stream = stream
        self.subject_prefix = prefix
        self.duplicate_window_s = float(duplicate_window_s)
        self.max_age_s = float(max_age_s)
        self.num_replicas = num_replicas
        self.publish_timeout_s = float(publish_timeout_s)
        self.name = name
        #: The connection this bus, its pull feeds and its durable consumers share.
        self.conn = NatsConnection(url=nats_url, name=name, security=security)
        self.last_publish_error: str | None = None  # why the last publish_many fell short
        self._subs: set[DurableSubscription] = set()

    @classmethod
    def from_settings(cls, r: ReplicationSettings, *, name: str = "mfh") -> EventBus:
        return cls(
            nats_url=r.nats_url,
            stream=r.event_topic,
            subject_prefix=r.subject_prefix,
            duplicate_window_s=r.duplicate_window_seconds,
            max_age_s=r.max_age_days * 86_400,
            num_replicas=r.num_replicas,
            publish_timeout_s=r.publish_timeout_seconds,
            name=name,
            security=NatsSecurity.from_settings(r),
        )

    # -- connection -------------------------------------------------------------------------

    async def connect(self, *, wait_s: float = 5.0) -> None:
        """Connect (reconnecting forever afterwards) and ensure the stream; Unavailable if NATS is not there."""
        if self.conn.is_open:
            return
        await self.conn.open(wait_s=wait_s)
        try:
            await self.ensure_stream()
        except BaseException as e:
            await self.close()
            if isinstance(e, NATS_ERRORS):
                raise Unavailable(f"NATS at {self.conn.url}: {type(e).__name__}: {e}") from e
            raise
        tls = " over TLS" if self.conn.security.tls else ""
        log.info("connected to NATS at %s%s (stream %s)", self.conn.url, tls, self.stream)

    async def close(self) -> None:
        self.conn.mark_closing()
        for sub in list(self._subs):
            await sub.close()
        await self.conn.close()

    @property
    def connected(self) -> bool:
        return self.conn.connected

    # -- stream -----------------------------------------------------------------------------

    def _stream_config(self) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[f"{self.subject_prefix}.>"],
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            storage=StorageType.FILE,
            duplicate_window=self.duplicate_window_s,
            max_age=self.max_age_s,
            num_replicas=self.num_replicas,
        )

    def _differences(self, cfg: StreamConfig) -> dict[str, Any]:
        want = self._stream_config()
        diff: dict[str, Any] = {}
        if sorted(cfg.subjects or []) != sorted(want.subjects or []):
            diff["subjects"] = want.subjects
        if abs((cfg.duplicate_window or 0) - want.duplicate_window) > 1e-6:
            diff["duplicate_window"] = want.duplicate_window
        if abs((cfg.max_age or 0) - (want.max_age or 0)) > 1e-6:
            diff["max_age"] = want.max_age
        if (cfg.num_replicas or 1) != want.num_replicas:
            diff["num_replicas"] = want.num_replicas
        return diff

    async def ensure_stream(self) -> None:
        """Create the stream, or bring an existing one to our settings; safe to call any number of times."""
        js = self.conn.jetstream()
        try:
            try:
                info = await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                try:
                    await js.add_stream(self._stream_config())
                    log.info("created stream %s on %s.>", self.stream, self.subject_prefix)
                    return
                except nats.js.errors.BadRequestError as e:
                    if e.err_code != 10058:  # 10058: created meanwhile by another process
                        raise
                    info = await js.stream_info(self.stream)
            cfg = info.config
            if cfg.storage is not None and cfg.storage != StorageType.FILE:
                log.warning(
                    "stream %s uses %s storage, not file; it cannot be changed in place", self.stream, cfg.storage
                )
            diff = self._differences(cfg)
            if diff:
                await js.update_stream(cfg.evolve(**diff))
                log.info("updated stream %s: %s", self.stream, diff)
        except (*NATS_ERRORS, ValueError) as e:
            raise translate_error(e, f"stream {self.stream}") from e

    async def stream_info(self) -> dict[str, Any]:
        """Message count, first/last sequence and the settings that matter, as plain data."""
        info = await self._stream_info()
        cfg, state = info.config, info.state
        return {
            "stream": self.stream,
            "subjects": list(cfg.subjects or []),
            "messages": state.messages,
            "bytes": state.bytes,
            "first_seq": state.first_seq,
            "last_seq": state.last_seq,
            "consumer_count": state.consumer_count,
            "duplicate_window_s": cfg.duplicate_window,
            "max_age_s": cfg.max_age,
            "num_replicas": cfg.num_replicas,
            "storage": str(getattr(cfg.storage, "value", cfg.storage)),
        }

    async def messages_from(self, origin: str) -> int:
        """How many messages on the stream ``origin`` published (its subjects ``<prefix>.<origin>.>``)."""
        try:
            info = await self.conn.jetstream().stream_info(
                self.stream, subjects_filter=f"{self.subject_prefix}.{origin}.>"
            )
        except (*NATS_ERRORS, ValueError) as e:
            raise translate_error(e, f"stream {self.stream}") from e
        return sum((info.state.subjects or {}).values())

    async def origins(self) -> set[str]:
        """The hosts with at least one message on the stream (the origin level of its subjects)."""
        try:
            info = await self.conn.jetstream().stream_info(self.stream, subjects_filter=f"{self.subject_prefix}.>")
        except (*NATS_ERRORS, ValueError) as e:
            raise translate_error(e, f"stream {self.stream}") from e
        level = len(self.subject_prefix.split("."))
        return {s.split(".")[level] for s in (info.state.subjects or {}) if len(s.split(".")) > level}

    async def _stream_info(self) -> StreamInfo:
        try:
            return await self.conn.jetstream().stream_info(self.stream)
        except (*NATS_ERRORS, ValueError) as e:
            raise translate_error(e, f"stream {self.stream}") from e

    # -- events -----------------------------------------------------------------------------

    def origin_of(self, subject: str) -> str | None:
        """The origin level of a subject of this stream (see :meth:`subject_for`), or None for another subject."""
        head = self.subject_prefix + "."
        if not subject.startswith(head):
            return None
        return subject[len(head) :].split(".", 1)[0]

    def subject_for(self, event: MemoryEvent) -> str:
        """``<prefix>.<origin>.<namespace>``; a namespace's dots become subject levels."""
        namespace = event.namespace
        if ".." in namespace or namespace.endswith("."):  # empty tokens are not valid subjects
            namespace = ".".join(t or "_" for t in namespace.split("."))
        return f"{self.subject_prefix}.{event.origin}.{namespace}"

    encode = staticmethod(encode_event)
    decode = staticmethod(decode_event)

    async def publish_many(
        self, events: Sequence[MemoryEvent], *, max_in_flight: int = 256, repair_id: str | None = None
    ) -> list[str]:
        """The ids whose PubAck came back, in order; never raises. A disconnect ends it at once, and the first
        ack missing after ``publish_timeout_s`` stops the rest, so a silent server costs about one timeout.

        ``repair_id``: the events are the cross-host audit's re-publications (``REPAIR_HEADER``), with a
        message id of their own so the stream does not drop them as duplicates of the original."""
        if not events:
            return []
        acks, down = self.conn.acks, self.conn.down
        if acks is None or down is None or down.done() or not self.conn.connected:
            self.last_publish_error = "NATS is not connected"
            log.debug("NATS is not connected: %d events left for the outbox", len(events))
            return []
        loop = asyncio.get_running_loop()
        window = max(1, max_in_flight)
        timeout = self.publish_timeout_s
        inflight: deque[tuple[str, str, asyncio.Future[str | None], float]] = deque()
        published: list[str] = []
        reason: str | None = None

        def settle(event_id: str, token: str, fut: asyncio.Future[str | None]) -> None:
            nonlocal reason
            if fut.done() and not fut.cancelled():
                error = fut.result()
                if error is None:
                    published.append(event_id)
                    return
                reason = reason or error
            else:
                acks.forget(token)
                reason = reason or ("disconnected before the PubAck" if down.done() else f"no PubAck within {timeout}s")

        try:
            for event in events:
                stalled = False
                while len(inflight) >= window:
                    event_id, token, fut, sent = inflight[0]
                    if not fut.done():
                        await asyncio.wait((fut, down), timeout=max(sent + timeout - loop.time(), 0), return_when=FIRST)
                    if not fut.done():
                        stalled = True
                        break
                    inflight.popleft()
                    settle(event_id, token, fut)
                if stalled or down.done():
                    break
                headers = {MSG_ID_HEADER: event.event_id, EXPECTED_STREAM_HEADER: self.stream}
                if repair_id is not None:
                    headers[MSG_ID_HEADER] = f"repair-{repair_id}-{event.event_id}"
                    headers[REPAIR_HEADER] = repair_id
                try:
                    token, fut = await acks.send(self.subject_for(event), self.encode(event), headers)
                except (nats.errors.BadSubjectError, nats.errors.MaxPayloadError, nats.errors.BadHeaderError) as e:
                    reason = reason or f"{type(e).__name__} for {event.event_id}"
                    continue
                except NATS_ERRORS as e:
                    reason = reason or f"{type(e).__name__}: {e}"
                    break
                inflight.append((event.event_id, token, fut, loop.time()))
            if inflight:
                pending = [f for _, _, f, _ in inflight if not f.done()]
                if pending and not down.done():
                    all_acked = all_done(pending)
                    wait_s = max(inflight[-1][3] + timeout - loop.time(), 0)
                    await asyncio.wait((all_acked, down), timeout=wait_s, return_when=FIRST)
        finally:
            for event_id, token, fut, _ in inflight:
                settle(event_id, token, fut)
        if len(published) < len(events):
            # Callers report shortfalls once per outage (mfh_core.resilience.OutageLog), not per batch.
            self.last_publish_error = reason or "not sent"
            log.debug("published %d of %d events (%s)", len(published), len(events), self.last_publish_error)
        return published

    async def publish(self, event: MemoryEvent) -> bool:
        """True once JetStream acked (or had already stored) the event."""
        return len(await self.publish_many([event])) == 1

    # -- consumers --------------------------------------------------------------------------

    async def subscribe_durable(
        self,
        durable: str,
        handler: EventHandler,
        *,
        filter_subject: str | None = None,
        ack_wait_s: float = 10.0,
        max_ack_pending: int = 1024,
        batch: int = 128,
        skip: Callable[[Msg], bool] | None = None,
    ) -> DurableSubscription:
        """Create (or update) the durable consumer and start feeding ``handler``, which acks each message
        (``skip``: messages acked unread, see :class:`DurableSubscription`)."""
        config = ConsumerConfig(
            name=durable,
            durable_name=durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait_s,
            max_ack_pending=max_ack_pending,
            filter_subject=filter_subject,
        )
        sub = DurableSubscription(
            self.conn,
            self.stream,
            config,
            handler,
            batch=min(batch, max_ack_pending),
            ensure_stream=self.ensure_stream,
            on_closed=self._subs.discard,
            skip=skip,
        )
        await sub.start()
        self._subs.add(sub)
        return sub

    async def iter_stream(
        self, *, start_seq: int = 1, upto_seq: int | None = None, batch: int = 500
    ) -> AsyncIterator[MemoryEvent]:
        """Events from ``start_seq`` to the last sequence at call time (or ``upto_seq``, if lower), in order, via an
        ephemeral no-ack consumer (recreated from the next sequence if a delivery goes missing); malformed
        messages are logged and skipped."""
        state = (await self._stream_info()).state
        last, next_seq = state.last_seq, max(start_seq, state.first_seq, 1)
        if upto_seq is not None:
            last = min(last, upto_seq)
        if state.messages == 0 or next_seq > last:
            return
        feed: PullFeed | None = None
        consumer = ""
        expected = 1  # next consumer sequence
        stalled_since: float | None = None
        loop = asyncio.get_running_loop()
        try:
            consumer = await self._ephemeral(next_seq)
            feed = PullFeed(self.conn, self.stream, consumer, batch=batch)
            await feed.start()
            while next_seq <= last:
                try:
                    msg = await feed.next(2 * PULL_HEARTBEAT_S)
                except ConsumerGone:
                    msg, expected = None, 0
                except NATS_ERRORS as e:
                    raise Unavailable(f"reading stream {self.stream}: {type(e).__name__}: {e}") from e
                md = msg_metadata(msg)
                if md is not None and md.consumer == consumer and md.sequence.consumer != expected:
                    expected = 0  # a delivery was lost: start over from next_seq
                if msg is None or md is None or expected == 0:
                    now = loop.time()
                    stalled_since = stalled_since or now
                    state = (await self._stream_info()).state
                    if state.messages == 0 or state.first_seq > last:
                        return  # the rest aged out meanwhile
                    next_seq = max(next_seq, state.first_seq)
                    if now - stalled_since > 30.0:
                        raise Unavailable(f"reading stream {self.stream} stalled at sequence {next_seq}")
                    if expected == 0:
                        await self.conn.delete_consumer(self.stream, consumer)
                        consumer = await self._ephemeral(next_seq)
                        feed.restart(consumer)
                        expected = 1
                    continue
                if md.consumer != consumer or md.sequence.stream < next_seq:
                    continue  # left over from a consumer we replaced
                stalled_since = None
                expected += 1
                next_seq = md.sequence.stream + 1
                try:
                    event = self.decode(msg.data)
                except InvalidArgument as e:
                    log.error("stream %s seq %d skipped: %s", self.stream, md.sequence.stream, e)
                else:
                    yield event
                if md.num_pending == 0:
                    return  # nothing after it: later sequences up to `last` were deleted
        finally:
            if feed is not None:
                await feed.stop()
            if consumer:
                await self.conn.delete_consumer(self.stream, consumer)

    async def durable_position(self, durable: str) -> tuple[int, int] | None:
        """A durable consumer's (ack floor stream sequence, pull requests waiting), or None when it does not exist.

        Every message at or below the floor was acked (or lay before the consumer's start). With nothing
        awaiting an ack the floor is the last delivered sequence: a consumer a join started past its catch-up
        has acked nothing yet, and its floor is still where it starts. Requests waiting mean a process is
        pulling from it."""
        try:
            ci = await self.conn.jetstream().consumer_info(self.stream, durable)
        except nats.js.errors.NotFoundError:
            return None
        except (*NATS_ERRORS, ValueError) as e:
            raise translate_error(e, f"consumer info {durable}") from e
        floor = (ci.ack_floor.stream_seq if ci.ack_floor else 0) or 0
        if not ci.num_ack_pending and ci.delivered is not None:
            floor = max(floor, ci.delivered.stream_seq or 0)
        return floor, ci.num_waiting or 0

    async def reset_durable(self, durable: str, *, start_seq: int) -> None:
        """(Re)create a durable consumer so that it delivers from stream sequence ``start_seq`` on (a joined
        host's replicator carries on after its catch-up); :meth:`subscribe_durable` later keeps that start."""
        await self.conn.delete_consumer(self.stream, durable)
        await self.conn.add_consumer(
            self.stream,
            ConsumerConfig(
                name=durable,
                durable_name=durable,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=max(start_seq, 1),
                ack_policy=AckPolicy.EXPLICIT,
            ),
        )

    async def _ephemeral(self, start_seq: int) -> str:
        name = f"mfh-read-{secrets.token_hex(6)}"
        await self.conn.add_consumer(
            self.stream,
            ConsumerConfig(
                name=name,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start_seq,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=60.0,
                mem_storage=True,
                num_replicas=1,
            ),
        )
        return name
