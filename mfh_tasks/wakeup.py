"""A wake-up signal for idle workers: a queue's consumer waits on a Redis channel, not on a growing sleep.

Dramatiq's Redis consumer sleeps after each empty fetch, doubling the sleep up to the worker
timeout (one second), so after a second or two of quiet a batch waited 0.5-1 s before a worker
fetched it (docs/architecture.md, "Quiet-time latency"). Here every sender publishes on the queue's
wake channel right after it enqueues (:meth:`mfh_tasks.broker.HubBroker.enqueue`), and an idle
consumer blocks on its subscription to that channel, so it fetches as soon as a message is there.

Under a backlog the consumer also hands its worker threads fewer, larger messages: the ``merge_actor``
messages a fetch brought (``persist_batch``) are folded into the first of them, up to
``merge_max_parts`` messages or ``merge_max_events`` events, and the merged message is acked (in one
round trip) or requeued as all of its parts. Each message costs the worker a chain of Redis round
trips, thread hand-offs and a SQL transaction whatever its size, so one per message held a worker to a
few hundred messages a second, and the api sends about one per write when writes come one at a time;
merged, the worker's rate grows with its backlog (apply is idempotent and order-insensitive, so the
union of batches persists what they would one by one: docs/architecture.md invariant 2). A message
under retry, or delayed, is never merged: a merged message that fails is retried whole, as one
message; one that fails for good (an error that is not retried) is split instead of dead-lettered,
and its parts run one by one, so only the part that fails on its own is dead-lettered. Messages
fetched and not handed out yet go back to the queue when the consumer closes, instead of waiting in
the worker's ack set for its heartbeat to expire.

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
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import _RedisConsumer
from dramatiq.common import compute_backoff
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message

__all__ = ["WakeableConsumer", "wake_channel"]

log = logging.getLogger("mfh.worker")


def wake_channel(namespace: str, db: int, queue_name: str) -> str:
    """The channel a queue's senders publish on after an enqueue (pub/sub is not per db: the db is in the name)."""
    return f"{namespace}:wake:{db}:{queue_name}"


class WakeableConsumer(_RedisConsumer):
    """A Redis consumer that, instead of backing off on an empty queue, waits for a wake-up or ``idle_timeout``.

    While its prefetch is full it waits for one of its messages to be acked instead (no fetch would be made).
    """

    def __init__(
        self,
        broker: Any,
        queue_name: str,
        prefetch: int,
        timeout: int,
        *,
        channel: str,
        merge_actor: str | None = None,
        merge_max_events: int = 1024,
        merge_max_parts: int = 16,
        merge_prefetch: int = 64,
        parts: dict[str, list[MessageProxy]] | None = None,
        solo: set[str] | None = None,
    ) -> None:
        if merge_actor is not None:
            prefetch = max(prefetch, merge_prefetch)
        # The parent's own back-off becomes a zero sleep (max_backoff 1 ms); this class does the waiting.
        super().__init__(broker, queue_name, prefetch, 1)  # type: ignore[no-untyped-call]
        self.merge_actor = merge_actor
        self.merge_max_events = merge_max_events
        self.merge_max_parts = merge_max_parts
        # merged message id -> the messages folded into it; the broker's, so that a consumer Dramatiq
        # restarts (after a Redis error) still settles the merged messages its predecessor handed out
        self._parts: dict[str, list[MessageProxy]] = {} if parts is None else parts
        self._solo: set[str] = set() if solo is None else solo  # ids of the parts of a merged message that failed
        self.merged = 0  # messages folded into another one
        self.idle_timeout_s = timeout / 1000
        self.channel = channel
        self._pubsub: Any = None
        self._slot_freed = threading.Event()
        self._lost = 0  # failed subscription attempts in a row
        self.wakeups = 0

    def ack(self, message: Any) -> None:
        """Ack a message; a merged one with its parts, in one round trip."""
        try:
            parts = self._parts.get(message.message_id)
            if parts:
                # Kept until the round trip succeeded: Dramatiq retries a failed ack, and acking twice is a no-op.
                self._dispatch_many("ack", [message, *parts])
                del self._parts[message.message_id]
                for m in parts:
                    self.queued_message_ids.discard(m.message_id)
                self.queued_message_ids.discard(message.message_id)
            else:
                super().ack(message)  # type: ignore[no-untyped-call]
        finally:
            self._slot_freed.set()

    def nack(self, message: Any) -> None:
        """Dead-letter a message that failed for good; a merged one is split instead: its parts go back to
        the queue to be run one by one (never merged again here), so only the one that fails on its own is
        dead-lettered, not the batches that happened to travel with it."""
        try:
            parts = self._parts.get(message.message_id)
            if parts:
                every = [message, *parts]
                self._solo.update(m.message_id for m in every)
                super().requeue(every)  # type: ignore[no-untyped-call]
                del self._parts[message.message_id]
                for m in every:
                    self.queued_message_ids.discard(m.message_id)
            else:
                super().nack(message)  # type: ignore[no-untyped-call]
        finally:
            self._slot_freed.set()

    def requeue(self, messages: Any) -> None:
        every = [m for message in messages for m in (message, *self._parts.pop(message.message_id, []))]
        super().requeue(every)  # type: ignore[no-untyped-call]

    def _dispatch_many(self, command: str, messages: list[Any]) -> None:
        """``command`` for each message in one round trip (the broker's :meth:`HubBroker.dispatch_many`)."""
        try:
            self.broker.dispatch_many(command, self.queue_name, [[m.options["redis_message_id"]] for m in messages])
        except redis.ConnectionError as e:
            raise ConnectionClosed(e) from None  # type: ignore[no-untyped-call]

    def _mergeable(self, message: Message[Any]) -> bool:
        return (
            message.message_id not in self._solo
            and message.actor_name == self.merge_actor
            and len(message.args) == 1
            and isinstance(message.args[0], list)
            and not message.kwargs
            and not message.options.get("retries")
            and message.options.get("eta") is None
        )

    def _merge(self, first: Any) -> Any:
        """``first`` with the mergeable messages right behind it in the fetched cache folded in."""
        if first.message_id in self._solo:  # a part of a merged message that failed: it runs alone, once
            self._solo.discard(first.message_id)
            return first
        if self.merge_actor is None or not self.message_cache or not self._mergeable(first._message):
            return first
        events = list(first._message.args[0])
        parts: list[MessageProxy] = []
        while self.message_cache and len(parts) + 1 < self.merge_max_parts:
            data = self.message_cache[0]
            if data is None:
                break
            try:
                nxt = Message.decode(data)
            except Exception:  # the parent's own decoding reports it when it gets there
                break
            if not self._mergeable(nxt) or len(events) + len(nxt.args[0]) > self.merge_max_events:
                break
            self.message_cache.pop(0)
            self.queued_message_ids.add(nxt.message_id)
            parts.append(MessageProxy(nxt))
            events.extend(nxt.args[0])
        if not parts:
            return first
        # The first message's ids (acked as it, then the parts); options are copied, so its redis id too.
        merged = MessageProxy(first._message.copy(args=(events,)))
        self._parts[merged.message_id] = parts
        self.merged += len(parts)
        return merged

    def __next__(self) -> Any:
        self._slot_freed.clear()
        fetches = not self.message_cache and self.outstanding_message_count < self.prefetch
        if fetches:
            self._subscribed()  # before the fetch: a wake from here on ends the wait below
            self._drain()  # wakes already heard are answered by this fetch
        message = super().__next__()  # type: ignore[no-untyped-call]
        if message is not None:
            return self._merge(message)
        if message is None:
            if fetches:
                self._wait_for_wake()
            else:
                self._slot_freed.wait(self.idle_timeout_s)
        return message

    def close(self) -> None:
        self._drop()
        self._requeue_cache()
        super().close()

    def _requeue_cache(self) -> None:
        """Fetched messages nobody took yet go back to the queue now (Dramatiq leaves them in the ack set,
        where only the maintenance pass finds them, once this worker's heartbeat is old)."""
        cache, self.message_cache = self.message_cache, []
        ids = []
        for data in cache:
            with contextlib.suppress(Exception):
                if data is not None:
                    ids.append(Message.decode(data).options["redis_message_id"])
        if ids:
            with contextlib.suppress(redis.RedisError):
                self.broker.do_requeue(self.queue_name, *ids)

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
