"""mfh_core.eventbus against a real nats-server (the private servers of tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest
from nats.aio.msg import Msg
from services import NatsServer, async_wait_until, free_port

from mfh_core.eventbus import MSG_ID_HEADER, DurableSubscription, EventBus
from mfh_models import InvalidArgument, Kind, MemoryEvent, Op, Unavailable
from mfh_models.settings import ReplicationSettings

CREATED_AT = 1_700_000_000_000


def make_events(n: int, *, first_version: int = 1) -> list[MemoryEvent]:
    return [
        MemoryEvent(
            event_id=f"main_pc-{v}",
            op=Op.PUT,
            namespace="ns",
            key=f"k{i}",
            kind=Kind.MEMORY_ITEM,
            payload='{"content":"x"}',
            version=v,
            origin="main_pc",
            created_at=CREATED_AT + i,
        )
        for i, v in enumerate(range(first_version, first_version + n))
    ]


def new_bus(url: str, *, duplicate_window_s: float = 120.0, publish_timeout_s: float = 2.0, tag: str = "") -> EventBus:
    tag = tag or secrets.token_hex(4)
    return EventBus(
        nats_url=url,
        stream=f"ev_{tag}",
        subject_prefix=f"mfh.t{tag}",
        duplicate_window_s=duplicate_window_s,
        max_age_s=3600.0,
        publish_timeout_s=publish_timeout_s,
        name=f"test-{tag}",
    )


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[EventBus]:
    """A connected bus on a stream of its own (the server is shared by the module)."""
    b = new_bus(nats_server.url)
    await b.connect()
    yield b
    await b.close()


@contextlib.asynccontextmanager
async def raw_js(url: str) -> AsyncIterator[nats.js.JetStreamContext]:
    nc = await nats.connect(url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


def recorder(
    acked: Callable[[MemoryEvent], bool] = lambda e: True,
) -> tuple[list[str], Callable[[MemoryEvent, Msg], Awaitable[None]]]:
    """A handler that records every delivery and acks the events ``acked`` picks."""
    seen: list[str] = []

    async def handler(event: MemoryEvent, msg: Msg) -> None:
        seen.append(event.event_id)
        if acked(event):
            await msg.ack()

    return seen, handler


# -- configuration and the stream --------------------------------------------------------------


def test_from_settings_maps_the_replication_section() -> None:
    r = ReplicationSettings(
        nats_url="nats://10.0.0.1:4222",
        event_topic="memory_events",
        subject_prefix="mfh.events",
        duplicate_window_seconds=60,
        max_age_days=2,
        num_replicas=3,
        publish_timeout_seconds=1.5,
    )
    b = EventBus.from_settings(r, name="worker")
    assert (b.nats_url, b.stream, b.subject_prefix, b.name) == (
        "nats://10.0.0.1:4222",
        "memory_events",
        "mfh.events",
        "worker",
    )
    assert (b.duplicate_window_s, b.max_age_s, b.num_replicas, b.publish_timeout_s) == (60.0, 172_800.0, 3, 1.5)
    assert not b.connected


def test_bad_settings_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="subject_prefix"):
        EventBus(nats_url="nats://x", stream="s", subject_prefix="a.>", duplicate_window_s=1, max_age_s=10)
    with pytest.raises(InvalidArgument, match="duplicate_window_s"):
        EventBus(nats_url="nats://x", stream="s", subject_prefix="a", duplicate_window_s=100, max_age_s=10)


async def test_connect_to_no_server_raises_unavailable_quickly() -> None:
    # Given a port nobody listens on
    b = new_bus(f"nats://127.0.0.1:{free_port()}")
    # When connecting, then it gives up with Unavailable after the bounded wait
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="cannot connect"):
        await b.connect(wait_s=1.0)
    assert time.monotonic() - t0 < 3.0
    assert not b.connected
    # And publishing on the unconnected bus does not raise
    assert await b.publish_many(make_events(3)) == []


async def test_ensure_stream_is_idempotent_and_follows_the_duplicate_window(nats_server: NatsServer) -> None:
    # Given a stream made by connect(), holding three events
    tag = secrets.token_hex(4)
    first = new_bus(nats_server.url, tag=tag, duplicate_window_s=120)
    await first.connect()
    try:
        assert len(await first.publish_many(make_events(3))) == 3
        before = await first.stream_info()
        # When ensure_stream runs again, twice
        await first.ensure_stream()
        await first.ensure_stream()
        # Then nothing changed
        assert await first.stream_info() == before
        assert before["subjects"] == [f"mfh.t{tag}.>"]
        assert (before["storage"], before["duplicate_window_s"], before["max_age_s"]) == ("file", 120.0, 3600.0)

        # When a bus with a shorter duplicate window connects to the same stream
        second = new_bus(nats_server.url, tag=tag, duplicate_window_s=30)
        await second.connect()
        try:
            after = await second.stream_info()
        finally:
            await second.close()
        # Then the stream was updated in place and kept its messages
        assert after["duplicate_window_s"] == 30.0
        assert (after["messages"], after["last_seq"]) == (3, 3)
    finally:
        await first.close()


async def test_concurrent_ensure_stream_from_two_processes_both_succeed(nats_server: NatsServer) -> None:
    # Given two buses for a stream that does not exist yet
    tag = secrets.token_hex(4)
    a, b = new_bus(nats_server.url, tag=tag), new_bus(nats_server.url, tag=tag)
    try:
        # When both connect at the same time, then neither fails
        await asyncio.gather(a.connect(), b.connect())
        assert (await a.stream_info())["messages"] == 0
    finally:
        await a.close()
        await b.close()


# -- encoding, subjects, headers ---------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    put = make_events(1)[0]
    delete = MemoryEvent.model_validate({**put.model_dump(), "op": "delete", "payload": "null", "version": 2})
    for event in [put, delete]:
        assert EventBus.decode(EventBus.encode(event)) == event


@pytest.mark.parametrize(
    "data",
    [
        b"garbage",
        b"\xff\xfe",
        b"{}",
        b"[1,2]",
        b'{"event_id":"x","op":"put","namespace":"bad space","key":"k","kind":"memory_item",'
        b'"payload":"{}","version":1,"origin":"main_pc","created_at":0}',
        b'{"event_id":"x","op":"put","namespace":"ns","key":"k","kind":"memory_item",'
        b'"payload":"{}","version":1,"origin":"Main PC","created_at":0}',
    ],
)
def test_decode_of_garbage_raises_invalid_argument(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="not a MemoryEvent"):
        EventBus.decode(data)


async def test_subject_and_header_of_a_published_event(bus: EventBus, nats_server: NatsServer) -> None:
    # Given one event
    event = make_events(1, first_version=42)[0]
    assert bus.subject_for(event) == f"{bus.subject_prefix}.main_pc.ns"
    # When it is published
    assert await bus.publish(event) is True
    # Then the stored message has the subject, the Nats-Msg-Id header and the JSON body
    async with raw_js(nats_server.url) as js:
        stored = await js.get_msg(bus.stream, 1)
    assert stored.subject == f"{bus.subject_prefix}.main_pc.ns"
    assert stored.headers is not None
    assert stored.headers[MSG_ID_HEADER] == "main_pc-42"
    assert stored.data is not None
    assert EventBus.decode(stored.data) == event


def test_namespace_dots_become_subject_levels_without_empty_tokens() -> None:
    b = new_bus("nats://x", tag="x")
    event = make_events(1)[0]
    assert b.subject_for(event.model_copy(update={"namespace": "team.a"})) == "mfh.tx.main_pc.team.a"
    assert b.subject_for(event.model_copy(update={"namespace": "a..b."})) == "mfh.tx.main_pc.a._.b._"


# -- publishing --------------------------------------------------------------------------------


async def test_publish_many_1000_events_then_the_same_again_adds_none(bus: EventBus) -> None:
    # Given 1,000 events
    events = make_events(1000)
    ids = [e.event_id for e in events]
    # When they are published
    t0 = time.perf_counter()
    published = await bus.publish_many(events)
    elapsed = time.perf_counter() - t0
    print(f"\npublish_many: 1000 events in {elapsed * 1000:.1f} ms = {1000 / elapsed:,.0f} events/s")
    # Then every id came back, in order, and the stream holds 1,000 messages
    assert published == ids
    info = await bus.stream_info()
    assert (info["messages"], info["first_seq"], info["last_seq"]) == (1000, 1, 1000)

    # When the same 1,000 are published again (an outbox relay after lost PubAcks)
    again = await bus.publish_many(events, max_in_flight=64)
    # Then they count as published (duplicate PubAcks) but the stream gained nothing
    assert again == ids
    info = await bus.stream_info()
    assert (info["messages"], info["last_seq"]) == (1000, 1000)


async def test_publish_many_of_nothing(bus: EventBus) -> None:
    assert await bus.publish_many([]) == []


async def test_publish_many_survives_a_server_restart(fresh_nats: NatsServer) -> None:
    # Given a connected bus, and a durable subscriber that has seen the first event
    b = new_bus(fresh_nats.url, publish_timeout_s=1.0)
    await b.connect()
    seen, handler = recorder()
    try:
        await b.subscribe_durable("relay", handler, ack_wait_s=2.0)
        first = make_events(1, first_version=1)
        during = make_events(50, first_version=100)
        after = make_events(5, first_version=1000)
        assert await b.publish_many(first) == ["main_pc-1"]
        await async_wait_until(lambda: seen == ["main_pc-1"], 5, message="first delivery")

        # When the server stops, and events are published while it is down
        fresh_nats.stop()
        await async_wait_until(lambda: not b.connected, 5, message="client notices the stop")
        t0 = time.monotonic()
        assert await b.publish_many(during) == []
        # Then publish_many returned nothing, at once, without raising
        assert time.monotonic() - t0 < 2.0

        # When the server starts again (same port and store)
        fresh_nats.start()
        # Then the client reconnects by itself and publishing works again
        await async_wait_until(lambda: b.connected, 10, message="reconnect")
        await async_wait_until(lambda: b.publish(after[0]), 10, message="publish after restart")
        assert await b.publish_many(after) == [e.event_id for e in after]
        # And the durable subscriber, created before the restart, receives the new events
        await async_wait_until(lambda: set(seen) >= {e.event_id for e in after}, 15, message="deliveries after restart")
        assert "main_pc-100" not in seen
        assert (await b.stream_info())["messages"] == 1 + len(after)
    finally:
        await b.close()


async def test_publish_many_right_after_a_kill_returns_within_the_publish_timeout(fresh_nats: NatsServer) -> None:
    # Given a connected bus
    b = new_bus(fresh_nats.url, publish_timeout_s=1.0)
    await b.connect()
    try:
        # When the server is killed and events are published before the client may have noticed
        fresh_nats.kill()
        t0 = time.monotonic()
        published = await b.publish_many(make_events(500))
        # Then nothing is reported published, within about one publish timeout
        assert published == []
        assert time.monotonic() - t0 < 2.5
    finally:
        await b.close()


async def test_publish_to_a_frozen_server_times_out_and_the_relay_is_deduplicated(fresh_nats: NatsServer) -> None:
    # Given a connected bus and a server that stops answering without closing the connection
    b = new_bus(fresh_nats.url, publish_timeout_s=1.0)
    await b.connect()
    events = make_events(300)
    proc = fresh_nats.proc
    assert proc is not None
    try:
        proc.send_signal(signal.SIGSTOP)
        # When events are published
        t0 = time.monotonic()
        published = await b.publish_many(events, max_in_flight=100)
        elapsed = time.monotonic() - t0
        # Then none is reported published, after about one publish timeout, not one per window
        assert published == []
        assert 0.9 <= elapsed < 2.5
        assert b.connected  # the connection itself still looks alive
    finally:
        proc.send_signal(signal.SIGCONT)
    try:
        # When the server wakes up and the outbox relays the same events
        await async_wait_until(lambda: b.publish_many(events), 10, message="relay")
        relayed = await b.publish_many(events)
        # Then all are acked, and each is stored once even if the timed-out publish was stored after all
        assert relayed == [e.event_id for e in events]
        info = await b.stream_info()
        assert info["messages"] == len(events)
        assert [e.event_id async for e in b.iter_stream()] == [e.event_id for e in events]
    finally:
        await b.close()


# -- consuming ---------------------------------------------------------------------------------


async def test_durable_subscriber_redelivers_unacked_events_only(bus: EventBus) -> None:
    # Given ten events and a durable subscriber that acks the even versions only
    events = make_events(10)
    even = {e.event_id for e in events if e.version % 2 == 0}
    odd = {e.event_id for e in events} - even
    seen1, handler1 = recorder(lambda e: e.version % 2 == 0)
    sub1 = await bus.subscribe_durable("replica", handler1, ack_wait_s=1.0)
    assert sub1.running and sub1.durable == "replica"
    assert len(await bus.publish_many(events)) == 10
    # When it has received them all and its acks have reached the server
    await async_wait_until(lambda: set(seen1) == even | odd, 5, message="first deliveries")

    async def five_acked() -> bool:
        info = await sub1.info()
        return info["num_pending"] == 0 and info["num_ack_pending"] == 5

    await async_wait_until(five_acked, 5, message="even events acked")
    # And the subscriber is closed, then created again under the same durable name
    await sub1.close()
    assert not sub1.running
    seen2, handler2 = recorder()
    sub2 = await bus.subscribe_durable("replica", handler2, ack_wait_s=1.0)

    async def all_acked() -> bool:
        info = await sub2.info()
        return info["num_pending"] == 0 and info["num_ack_pending"] == 0

    # Then the unacked (odd) events come again, and the acked ones do not
    await async_wait_until(lambda: set(seen2) >= odd, 10, message="redelivery of unacked events")
    await async_wait_until(all_acked, 5, message="everything acked")
    assert set(seen2) == odd
    await sub2.close()


async def test_durable_subscriber_terminates_malformed_messages(bus: EventBus, nats_server: NatsServer) -> None:
    # Given a subscriber, a malformed message and then a valid event on the stream's subjects
    seen, handler = recorder()
    sub: DurableSubscription = await bus.subscribe_durable("strict", handler, ack_wait_s=1.0)
    async with raw_js(nats_server.url) as js:
        await js.publish(f"{bus.subject_prefix}.main_pc.ns", b"not an event")
    event = make_events(1, first_version=7)[0]
    assert await bus.publish(event)
    # When they are delivered
    await async_wait_until(lambda: seen == [event.event_id], 5, message="valid event delivered")

    async def settled() -> bool:
        info = await sub.info()
        return info["num_ack_pending"] == 0 and info["num_pending"] == 0

    # Then the handler saw only the event, and the malformed message was terminated (never redelivered)
    await async_wait_until(settled, 5, message="malformed message terminated")
    assert sub.terminated == 1 and sub.handled == 1
    assert seen == [event.event_id]
    await sub.close()


async def test_durable_subscriber_with_a_filter_sees_only_its_subjects(bus: EventBus) -> None:
    # Given events from two origins and a subscriber filtered on one of them
    mine = make_events(3)
    other = [e.model_copy(update={"origin": "pc2", "event_id": f"pc2-{e.version}"}) for e in make_events(3)]
    seen, handler = recorder()
    sub = await bus.subscribe_durable("only-pc2", handler, filter_subject=f"{bus.subject_prefix}.pc2.>")
    # When both are published
    assert len(await bus.publish_many([*mine, *other])) == 6
    # Then only the filtered origin is delivered
    await async_wait_until(lambda: len(seen) == 3, 5, message="pc2 events")
    assert seen == [e.event_id for e in other]
    await sub.close()


async def test_handler_failure_is_redelivered(bus: EventBus) -> None:
    # Given a handler that fails on the first delivery of an event
    attempts: list[int] = []

    async def flaky(event: MemoryEvent, msg: Msg) -> None:
        attempts.append(msg.metadata.num_delivered)
        if len(attempts) == 1:
            raise RuntimeError("store down")
        await msg.ack()

    sub = await bus.subscribe_durable("flaky", flaky, ack_wait_s=5.0)
    # When an event is published, then it is delivered again after the failure (nak with a delay)
    assert await bus.publish(make_events(1)[0])
    await async_wait_until(lambda: attempts == [1, 2], 5, message="redelivery after a handler error")
    await sub.close()


async def test_iter_stream_returns_all_events_in_order(bus: EventBus) -> None:
    # Given 1,200 events on the stream (with duplicates published twice)
    events = make_events(1200)
    assert len(await bus.publish_many(events)) == 1200
    await bus.publish_many(events[:100])
    # When the stream is read whole, and from sequence 1001
    whole = [e async for e in bus.iter_stream(batch=500)]
    tail = [e async for e in bus.iter_stream(start_seq=1001, batch=64)]
    # Then all events come back in publish order
    assert whole == events
    assert tail == events[1000:]
    # And reading past the end, or an empty stream, yields nothing; no reader consumers are left behind
    assert [e async for e in bus.iter_stream(start_seq=5000)] == []
    assert (await bus.stream_info())["consumer_count"] == 0


async def test_iter_stream_of_an_empty_stream(bus: EventBus) -> None:
    assert [e async for e in bus.iter_stream()] == []


async def test_iter_stream_stops_at_the_last_sequence_of_the_call(bus: EventBus) -> None:
    # Given 100 events on the stream
    first = make_events(100)
    await bus.publish_many(first)
    # When more are published while the stream is being read
    got: list[MemoryEvent] = []
    async for e in bus.iter_stream(batch=10):
        got.append(e)
        if len(got) == 50:
            assert len(await bus.publish_many(make_events(20, first_version=5000))) == 20
    # Then the reader ends at the last sequence it saw at the start
    assert got == first
