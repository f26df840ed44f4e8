"""The wake-up signal: an idle worker fetches a message as soon as it is enqueued, and still finds one
enqueued without the signal (a maintenance requeue, an older sender) by its fallback poll. The same
consumer merges a backlog of persist_batch messages into fewer, larger ones, each part acked with it."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker
from hosts import make_host
from redis_server import VOLATILE, RedisServer
from services import wait_until

from mfh_tasks import build_broker
from mfh_tasks.actors import PERSIST_ACTOR
from mfh_tasks.wakeup import WakeableConsumer


@pytest.fixture
def worker(tmp_path: Any, redis_url: str) -> Iterator[tuple[dramatiq.Worker, dramatiq.Actor[Any, Any], list[float]]]:
    # A broker with one no-op actor that records when it ran, and a worker whose timeout (the fallback poll) is 0.5 s
    host = make_host(
        tmp_path, redis_url=redis_url, overrides={"write_behind": {"queue_name": f"w_{uuid.uuid4().hex[:8]}"}}
    )
    broker = build_broker(host.settings)
    ran: list[float] = []
    lock = threading.Lock()

    def note() -> None:
        with lock:
            ran.append(time.monotonic())

    actor = dramatiq.actor(note, broker=broker, queue_name=host.settings.write_behind.queue_name, max_retries=0)
    w = dramatiq.Worker(broker, worker_threads=1, worker_timeout=500)
    w.start()
    try:
        yield w, actor, ran
    finally:
        w.stop(timeout=5000)
        broker.close()


def test_an_idle_worker_runs_a_message_as_soon_as_it_is_enqueued(worker: Any) -> None:
    w, actor, ran = worker
    actor.send()
    wait_until(lambda: len(ran) == 1, 10, message="the first message")
    # Given a worker that has been idle for 1.5 s (Dramatiq's own consumer would be sleeping 250-500 ms by now)
    time.sleep(1.5)
    # When a message is sent
    t0 = time.monotonic()
    actor.send()
    # Then it runs at once: well before the fallback poll could have found it
    wait_until(lambda: len(ran) == 2, 10, message="the second message")
    assert ran[1] - t0 < 0.1, f"took {ran[1] - t0:.3f} s"
    consumer = w.consumers[actor.queue_name].consumer
    assert isinstance(consumer, WakeableConsumer) and consumer.wakeups >= 1


def test_a_message_enqueued_without_the_signal_is_found_by_the_fallback_poll(worker: Any) -> None:
    w, actor, ran = worker
    time.sleep(0.2)
    # When a message is enqueued the plain Dramatiq way, with no wake-up published
    t0 = time.monotonic()
    RedisBroker.enqueue(w.broker, actor.message())
    # Then the worker still runs it, within its worker timeout (0.5 s) and some slack
    wait_until(lambda: len(ran) == 1, 10, message="the message enqueued without a wake-up")
    assert ran[0] - t0 < 2.0


@pytest.fixture
def batches(tmp_path: Any, redis_url: str) -> Iterator[tuple[Any, Any, list[list[int]], list[int]]]:
    # A broker with a recording persist_batch actor that fails its first call (when told to), and no worker yet
    host = make_host(
        tmp_path, redis_url=redis_url, overrides={"write_behind": {"queue_name": f"m_{uuid.uuid4().hex[:8]}"}}
    )
    broker = build_broker(host.settings)
    calls: list[list[int]] = []
    fail_first: list[int] = []
    lock = threading.Lock()

    def persist_batch(events: list[int]) -> None:
        with lock:
            if fail_first:
                fail_first.clear()
                raise RuntimeError("the store failed this batch")
            if any(e < 0 for e in events):
                raise ValueError("a malformed event")  # not retried (throws): dead-lettered
            calls.append(list(events))

    actor = dramatiq.actor(
        persist_batch,
        actor_name=PERSIST_ACTOR,
        broker=broker,
        queue_name=host.settings.write_behind.queue_name,
        max_retries=3,
        min_backoff=10,
        max_backoff=50,
        throws=(ValueError,),
    )
    try:
        yield broker, actor, calls, fail_first
    finally:
        broker.close()


def _queue_is_settled(broker: Any, queue: str) -> bool:
    """Nothing left in the queue, its message bodies or any worker's unacked set."""
    r = broker.client
    acks = [k for k in r.scan_iter(f"{broker.namespace}:__acks__.*") if k.decode().endswith(f".{queue}")]
    return (
        r.llen(f"{broker.namespace}:{queue}") == 0
        and r.hlen(f"{broker.namespace}:{queue}.msgs") == 0
        and all(r.scard(k) == 0 for k in acks)
    )


def test_a_backlog_of_write_batches_runs_in_fewer_larger_batches_and_every_part_is_acked(batches: Any) -> None:
    broker, actor, calls, _ = batches
    # Given 60 batches of 3 events queued while no worker runs
    for i in range(60):
        actor.send([3 * i, 3 * i + 1, 3 * i + 2])
    # When a worker starts
    w = dramatiq.Worker(broker, worker_threads=1, worker_timeout=500)
    w.start()
    try:
        wait_until(lambda: sum(map(len, calls)) >= 180, 20, message="every event persisted")
        # Then every event ran exactly once, in far fewer calls than messages, and every message was acked
        assert sorted(e for c in calls for e in c) == list(range(180))
        assert len(calls) <= 15, f"{len(calls)} calls for 60 queued batches"
        consumer = w.consumers[actor.queue_name].consumer
        assert isinstance(consumer, WakeableConsumer) and consumer.merged >= 45
        wait_until(lambda: _queue_is_settled(broker, actor.queue_name), 10, message="every message acked")
    finally:
        w.stop(timeout=5000)


def test_a_merged_batch_that_fails_is_retried_whole_and_nothing_is_lost(batches: Any) -> None:
    broker, actor, calls, fail_first = batches
    # Given 20 queued batches, and a store that fails the first call
    for i in range(20):
        actor.send([2 * i, 2 * i + 1])
    fail_first.append(1)
    w = dramatiq.Worker(broker, worker_threads=1, worker_timeout=500)
    w.start()
    try:
        # Then the failed (merged) batch is retried and every event is persisted at least once
        wait_until(lambda: set(range(40)) <= {e for c in calls for e in c}, 20, message="every event persisted")
        assert not fail_first
        wait_until(lambda: _queue_is_settled(broker, actor.queue_name), 10, message="every message acked")
    finally:
        w.stop(timeout=5000)


def test_a_merged_batch_that_fails_for_good_is_split_and_only_the_bad_part_is_dead_lettered(batches: Any) -> None:
    broker, actor, calls, _ = batches
    # Given 12 queued batches, one of which holds an event the actor refuses for good
    for i in range(12):
        actor.send([-1] if i == 5 else [2 * i, 2 * i + 1])
    w = dramatiq.Worker(broker, worker_threads=1, worker_timeout=500)
    w.start()
    try:
        # Then every good event is persisted, and only the bad batch is in the dead-letter queue
        good = {e for i in range(12) if i != 5 for e in (2 * i, 2 * i + 1)}
        wait_until(lambda: good <= {e for c in calls for e in c}, 20, message="every good event persisted")
        xq = f"{broker.namespace}:{actor.queue_name}.XQ.msgs"
        wait_until(lambda: broker.client.hlen(xq) == 1, 10, message="one dead letter")
        [body] = broker.client.hvals(xq)
        assert dramatiq.Message.decode(body).args == ([-1],)
        wait_until(lambda: _queue_is_settled(broker, actor.queue_name), 10, message="every message settled")
    finally:
        w.stop(timeout=5000)


def test_a_closed_consumer_puts_what_it_fetched_and_did_not_hand_out_back_in_the_queue(batches: Any) -> None:
    broker, actor, _, _ = batches
    queue = actor.queue_name
    for i in range(40):
        actor.send([i])
    # Given a consumer that fetched the backlog and handed out one (merged) message of it
    consumer = broker.consume(queue, prefetch=8, timeout=500)
    first = next(consumer)
    assert first is not None and consumer.message_cache
    # When it closes (a worker stopping), the rest goes back to the queue at once, not after the heartbeat timeout
    consumer.requeue([first])
    consumer.close()
    assert broker.client.llen(f"{broker.namespace}:{queue}") == 40


def test_the_pipelined_enqueue_and_acks_load_the_script_again_when_redis_lost_it(tmp_path: Any) -> None:
    # Given a broker on a private Redis, and an actor that holds its first batch until told to finish
    with RedisServer(tmp_path, args=VOLATILE) as server:
        host = make_host(tmp_path, redis_url=server.url, overrides={"write_behind": {"queue_name": "flushed"}})
        broker = build_broker(host.settings)
        ran: list[list[int]] = []
        entered, finish = threading.Event(), threading.Event()

        def persist_batch(events: list[int]) -> None:
            entered.set()
            finish.wait(10)
            ran.append(events)

        actor = dramatiq.actor(persist_batch, actor_name=PERSIST_ACTOR, broker=broker, queue_name="flushed")
        w = dramatiq.Worker(broker, worker_threads=1, worker_timeout=500)
        try:
            actor.send([0])  # loads the dispatch script
            # When Redis loses its scripts (a restart, SCRIPT FLUSH) before batches are enqueued (enqueue and
            # wake-up in one round trip)...
            server.client().script_flush()
            for i in range(1, 10):
                actor.send([i])
            # ...and again while a worker runs their merged batch, before it acks its parts in one round trip
            w.start()
            assert entered.wait(10)
            server.client().script_flush()
            finish.set()
            # Then every batch was enqueued, run once and acked
            wait_until(lambda: sum(map(len, ran)) == 10, 10, message="every batch run")
            wait_until(lambda: _queue_is_settled(broker, "flushed"), 10, message="every message acked")
            assert sorted(e for r in ran for e in r) == list(range(10))
            assert len(ran) < 10  # merged
        finally:
            finish.set()
            w.stop(timeout=5000)
            broker.close()
