"""A wake-up signal for idle workers: a queue's consumer waits on a Redis channel, not on a growing sleep.

Dramatiq's Redis consumer sleeps after each empty fetch, doubling the sleep up to the worker
timeout (one second), so after a second or two of quiet a batch waited 0.5-1 s before a worker
fetched it (docs/architecture.md, "Quiet-time latency"). Here every sender publishes on the queue's
wake channel right after it enqueues (:meth:`mfh_tasks.broker.HubBroker.enqueue`), and an idle
consumer blocks on its subscription to that channel, so it fetches as soon as a message is there.

Nothing depends on the signal for correctness: a consumer that hears nothing (a lost subscription,
a message requeued by a maintenance pass) still fetches once per ``idle_timeout`` (the worker
timeout), as before. A wake published while the consumer is busy fetching stays in the
subscription's socket and ends its next wait at once, so no wake-up is lost between a fetch and a wait.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import redis
from dramatiq.brokers.redis import _RedisConsumer
from dramatiq.common import compute_backoff

__all__ = ["WakeableConsumer", "wake_channel"]

log = logging.getLogger("mfh.worker")


def wake_channel(namespace: str, db: int, queue_name: str) -> str:
    """The channel a queue's senders publish on after an enqueue (pub/sub is not per db: the db is in the name)."""
    return f"{namespace}:wake:{db}:{queue_name}"


class WakeableConsumer(_RedisConsumer):
    """A Redis consumer that, instead of backing off on an empty queue, waits for a wake-up or ``idle_timeout``.

    While its prefetch is full it waits for one of its messages to be acked instead (no fetch would be made).
    """

    def __init__(self, broker: Any, queue_name: str, prefetch: int, timeout: int, *, channel: str) -> None:
        # The parent's own back-off becomes a zero sleep (max_backoff 1 ms); this class does the waiting.
        super().__init__(broker, queue_name, prefetch, 1)  # type: ignore[no-untyped-call]
        self.idle_timeout_s = timeout / 1000
        self.channel = channel
        self._pubsub: Any = None
        self._slot_freed = threading.Event()
        self._lost = 0  # failed subscription attempts in a row
        self.wakeups = 0

    def ack(self, message: Any) -> None:
        try:
            super().ack(message)  # type: ignore[no-untyped-call]
        finally:
            self._slot_freed.set()

    def nack(self, message: Any) -> None:
        try:
            super().nack(message)  # type: ignore[no-untyped-call]
        finally:
            self._slot_freed.set()

    def __next__(self) -> Any:
        self._slot_freed.clear()
        fetches = not self.message_cache and self.outstanding_message_count < self.prefetch
        if fetches:
            self._subscribed()  # before the fetch: a wake from here on ends the wait below
            self._drain()  # wakes already heard are answered by this fetch
        message = super().__next__()  # type: ignore[no-untyped-call]
        if message is None:
            if fetches:
                self._wait_for_wake()
            else:
                self._slot_freed.wait(self.idle_timeout_s)
        return message

    def close(self) -> None:
        self._drop()
        super().close()

    def _subscribed(self) -> Any:
        if self._pubsub is None:
            try:
                pubsub = self.broker.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
            except redis.RedisError as e:
                self._lost += 1
                if self._lost == 1:
                    log.warning("worker: cannot subscribe to %s (%s); polling the queue instead", self.channel, e)
                return None
            if self._lost:
                log.info("worker: subscribed to %s again", self.channel)
            self._pubsub, self._lost = pubsub, 0
        return self._pubsub

    def _drain(self) -> None:
        pubsub = self._pubsub
        try:
            while pubsub is not None and pubsub.get_message(timeout=0.0) is not None:
                pass
        except redis.RedisError:
            self._drop()

    def _wait_for_wake(self) -> None:
        pubsub = self._pubsub
        if pubsub is None:  # no subscription: Dramatiq's own back-off, bounded by the worker timeout
            self._lost, backoff_ms = compute_backoff(self._lost, max_backoff=int(self.idle_timeout_s * 1000))
            threading.Event().wait(backoff_ms / 1000)
            return
        try:
            if pubsub.get_message(timeout=self.idle_timeout_s) is not None:
                self.wakeups += 1
        except redis.RedisError:
            self._drop()

    def _drop(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError):
                pubsub.close()
