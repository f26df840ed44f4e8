"""The wake-up signal: an idle worker fetches a message as soon as it is enqueued, and still finds one
enqueued without the signal (a maintenance requeue, an older sender) by its fallback poll."""

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
from services import wait_until

from mfh_tasks import build_broker
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
