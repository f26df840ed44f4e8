"""The one way staged writes become queued ``persist_batch`` messages.

A :class:`BatchQueue` is the write batcher, the batch encoding and the actor's ``send`` in one
object. The api submits through it: many staged writes become one message, and each caller is
answered when the message carrying its events is enqueued (the write is then acknowledged:
docs/architecture.md invariant 4). A write that finds no send in flight goes out at once (with
whatever the same loop iteration submitted): a quiet hub adds no batching delay. While a send is in
flight, writes collect and go out when it returns, when the batch reaches ``max_size``, or
``max_delay_s`` after its first write, whichever comes first: batches grow with load, not with waiting.
The worker's dirty sweep and the scheduler's reconcile send through it at once (:meth:`BatchQueue.send_now`).
The send itself is a blocking Redis call, run in a thread; at most ``max_in_flight`` sends run at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mfh_models import MemoryEvent, Settings, Unavailable
from mfh_models.settings import WriteBehindSettings
from mfh_tasks.actors import declare_persist_actor, encode_batch
from mfh_tasks.broker import BrokerNeverSent, build_broker

__all__ = ["BatchQueue", "Send", "persist_sender"]

#: Enqueues one batch of events; blocking (a Redis call), so async callers run it in a thread.
Send = Callable[[list[MemoryEvent]], None]


def persist_sender(actor: dramatiq.Actor[Any, Any]) -> Send:
    """``send`` for ``persist_batch``: one message per batch of events."""

    def send(events: list[MemoryEvent]) -> None:
        actor.send(encode_batch(events))

    return send


class BatchQueue:
    """Staged writes to queued batches: :meth:`submit_many` collects concurrent callers' events into
    micro-batches (async), :meth:`send_now` enqueues one batch at once (blocking)."""

    def __init__(
        self,
        send: Send,
        *,
        max_size: int = 256,
        max_delay_s: float = 0.002,
        max_in_flight: int = 4,
        broker: RedisBroker | None = None,
    ) -> None:
        self._send = send
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self._pending: list[MemoryEvent] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._starts: list[int] = []  # where each waiter's events begin in _pending
        self._timer: asyncio.TimerHandle | None = None
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0  # sends started and not finished
        self._flush_soon: asyncio.Handle | None = None
        self.batches_sent = 0
        #: The broker closed with the queue (None when someone else owns it).
        self.broker = broker
        self._closed = False

    @classmethod
    def for_actor(
        cls, actor: dramatiq.Actor[Any, Any], wb: WriteBehindSettings, *, broker: RedisBroker | None = None
    ) -> BatchQueue:
        """A queue onto an already declared ``persist_batch`` (a worker's own actor, say)."""
        return cls(
            persist_sender(actor), max_size=wb.batch_max_size, max_delay_s=wb.batch_max_delay_ms / 1000, broker=broker
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchQueue:
        """A sender's queue: its own broker with ``persist_batch`` declared (no pipeline), closed with the queue."""
        broker = build_broker(settings)
        return cls.for_actor(declare_persist_actor(broker, settings), settings.write_behind, broker=broker)

    def send_now(self, events: list[MemoryEvent]) -> None:
        """Enqueue ``events`` as one message now, bypassing the micro-batches (blocking: run it in a thread)."""
        self._send(events)

    async def submit(self, event: MemoryEvent) -> None:
        """Add one event; return once its batch is enqueued (raises Unavailable if it could not be)."""
        await self.submit_many([event])

    async def submit_many(self, events: Sequence[MemoryEvent]) -> None:
        """Add events that travel together; return once every one of them is enqueued."""
        if not events:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._starts.append(len(self._pending))
        self._pending.extend(events)
        self._waiters.append(fut)
        if len(self._pending) >= self.max_size:
            self._flush()
        elif self._in_flight == 0:
            if self._flush_soon is None:  # after the callers already runnable in this iteration
                self._flush_soon = loop.call_soon(self._flush)
        elif self._timer is None:
            self._timer = loop.call_later(self.max_delay_s, self._flush)
        await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        if not self._pending:
            return
        events, waiters, starts = self._pending, self._waiters, self._starts
        self._pending, self._waiters, self._starts = [], [], []
        self._in_flight += 1
        task = asyncio.ensure_future(self._send_batch(events, waiters, starts))
        self._tasks.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        if self._in_flight == 0 and self._pending:  # what collected while it was in flight
            self._flush()

    async def _send_batch(
        self, events: list[MemoryEvent], waiters: list[asyncio.Future[None]], starts: list[int]
    ) -> None:
        async with self._slots:
            sent = 0
            try:
                # Split oversize batches so one message stays small enough to retry cheaply.
                for i in range(0, len(events), self.max_size):
                    await asyncio.to_thread(self._send, events[i : i + self.max_size])
                    sent = min(i + self.max_size, len(events))
                    self.batches_sent += 1
            except Exception as e:
                # Only callers none of whose events can have gone out are told it failed (they then take
                # their writes back). A caller with some of its events enqueued, or after a timeout or a
                # connection lost with the command on it (the message may be in the queue: Redis runs
                # what it read before it closes), is acknowledged: its events are staged and dirty, and
                # reconcile enqueues whatever did not go out (a duplicate is harmless: apply is idempotent).
                err = Unavailable(f"could not enqueue the write batch: {e}")
                lost = isinstance(e, RedisConnectionError) and not isinstance(e, BrokerNeverSent)
                maybe_sent = lost or isinstance(e, TimeoutError | RedisTimeoutError)
                for w, start in zip(waiters, starts, strict=True):
                    if w.done():
                        continue
                    if start >= sent and not maybe_sent:
                        w.set_exception(err)
                    else:
                        w.set_result(None)
                return
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def close(self) -> None:
        """Flush what is pending, wait for every send in flight, then close the broker if the queue owns one."""
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.broker is not None and not self._closed:
            self.broker.close()
        self._closed = True
