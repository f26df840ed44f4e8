"""The Dramatiq broker, built from settings (Redis broker on the host's Redis).

Shipped settings bound recovery: a killed worker's batches are redelivered once its heartbeat
is ``heartbeat_timeout_ms`` old and a maintenance pass runs. Dramatiq runs that pass on a random
``maintenance_chance`` of broker calls, which an idle worker makes one or two of a second (a
requeue 23-69 s after a kill); a worker therefore also runs it on a timer
(:meth:`HubBroker.run_maintenance`, every ``recovery.maintenance_interval_seconds``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any
from uuid import uuid4

import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import current_millis
from dramatiq.middleware import (
    AgeLimit,
    AsyncIO,
    Callbacks,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from mfh_models import Settings
from mfh_tasks.actors import PERSIST_ACTOR
from mfh_tasks.wakeup import WakeableConsumer, wake_channel

__all__ = ["BrokerNeverSent", "HubBroker", "build_broker"]


class BrokerNeverSent(redis.ConnectionError):
    """The broker's Redis could not be reached (connect or handshake failed): no command went out, so
    a message that failed so is certainly not in the queue (any other lost connection: it may be)."""


class _NeverSentOnConnect(redis.connection.AbstractConnection):
    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        try:
            super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)
        except BrokerNeverSent:
            raise
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise BrokerNeverSent(str(e)) from e


class _Connection(_NeverSentOnConnect, redis.connection.Connection):
    pass


class _SSLConnection(_NeverSentOnConnect, redis.connection.SSLConnection):
    pass


class _UnixConnection(_NeverSentOnConnect, redis.connection.UnixDomainSocketConnection):
    pass


def _client(url: str) -> redis.Redis:
    """The broker's client; its connection class by the URL's scheme (one given to from_url replaces it)."""
    scheme = url.split("://", 1)[0].lower()
    cls = {"rediss": _SSLConnection, "unix": _UnixConnection}.get(scheme, _Connection)
    return redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, connection_class=cls))


_MAINTENANCE = "maintenance"  # a dispatch command the Lua script has no branch for: maintenance only


class HubBroker(RedisBroker):
    """A RedisBroker whose maintenance pass (requeue of dead workers' messages) can be run on demand, and
    whose consumers are woken by each enqueue instead of polling with a growing back-off when idle and
    merge a backlog of ``merge_actor`` messages into larger ones when busy (:mod:`mfh_tasks.wakeup`)."""

    merge_actor: str | None = None
    merge_max_events: int = 1024

    @property
    def consumer_class(self) -> Any:
        return self._consumer

    def _consumer(self, broker: Any, queue_name: str, prefetch: int, timeout: int) -> Any:
        if queue_name in self.delay_queues:  # delayed messages (retries) wait for their eta anyway
            return super().consumer_class(broker, queue_name, prefetch, timeout)
        return WakeableConsumer(
            broker,
            queue_name,
            prefetch,
            timeout,
            channel=self.wake_channel(queue_name),
            merge_actor=self.merge_actor,
            merge_max_events=self.merge_max_events,
            parts=self._merged_parts(queue_name),
            solo=self._solo_parts(queue_name),
        )

    # What a consumer knows about the merged messages it handed out outlives it: Dramatiq makes a new
    # consumer after a Redis error, and the worker threads settle their messages on that one.
    @functools.cache  # noqa: B019 - one broker per process, a handful of queues
    def _merged_parts(self, queue_name: str) -> dict[str, Any]:
        return {}

    @functools.cache  # noqa: B019 - one broker per process, a handful of queues
    def _solo_parts(self, queue_name: str) -> set[str]:
        return set()

    @functools.cache  # noqa: B019 - one broker per process, a handful of queues
    def wake_channel(self, queue_name: str) -> str:
        db = int(self.client.connection_pool.connection_kwargs.get("db", 0))
        return wake_channel(self.namespace, db, queue_name)

    def enqueue(self, message: Any, *, delay: int | None = None) -> Any:
        """Enqueue and wake the queue's idle consumers, in one round trip (a lost wake-up only costs the old
        polling delay). What ``RedisBroker.enqueue`` does, with the wake-up pipelined behind the enqueue: as
        two calls, the wake-up was half of what an api's enqueue cost it."""
        if delay is not None:  # a retry: it waits for its eta anyway, nobody to wake
            return super().enqueue(message, delay=delay)
        queue_name = message.queue_name
        # A unique id per enqueue, as RedisBroker.enqueue gives it (a message may be enqueued again).
        message = message.copy(options={"redis_message_id": str(uuid4())})
        self.emit_before("enqueue", message, delay)
        script = self.scripts["dispatch"]
        args = self._dispatch_args(
            "enqueue",
            queue_name,
            message.options["redis_message_id"],
            message.encode(),
            maintenance=self._should_do_maintenance("enqueue"),
        )
        with self.client.pipeline(transaction=False) as pipe:
            pipe.evalsha(script.sha, 1, self.namespace, *args)
            pipe.publish(self.wake_channel(queue_name), b"")
            enqueued, _ = pipe.execute(raise_on_error=False)  # the wake-up's own error does not matter
        if isinstance(enqueued, redis.exceptions.NoScriptError):  # Redis lost its script cache: load it, again
            script(keys=[self.namespace], args=args)
            with contextlib.suppress(redis.RedisError):
                self.client.publish(self.wake_channel(queue_name), b"")
        elif isinstance(enqueued, Exception):
            raise enqueued
        self.emit_after("enqueue", message, delay)
        return message

    def _dispatch_args(self, command: str, queue_name: str, *args: Any, maintenance: int = 0) -> list[Any]:
        """The arguments ``RedisBroker._dispatch`` passes Dramatiq's dispatch script (the layout its
        dispatch.lua documents), for the calls made here in a pipeline."""
        return [
            command,
            current_millis(),
            queue_name,
            self.broker_id,
            self.heartbeat_timeout,
            self.dead_message_ttl,
            maintenance,
            self._max_unpack_size(),  # type: ignore[no-untyped-call]
            *args,
        ]

    def dispatch_many(self, command: str, queue_name: str, calls: Sequence[Sequence[Any]]) -> None:
        """Dramatiq's dispatch ``command`` once per argument list, in one round trip (a merged message's acks).

        Only for commands that may run twice (an ack): one that fails for the script cache is run again."""
        script = self.scripts["dispatch"]
        with self.client.pipeline(transaction=False) as pipe:
            for args in calls:
                pipe.evalsha(script.sha, 1, self.namespace, *self._dispatch_args(command, queue_name, *args))
            results = pipe.execute(raise_on_error=False)
        for args, result in zip(calls, results, strict=True):
            if isinstance(result, redis.exceptions.NoScriptError):
                script(keys=[self.namespace], args=self._dispatch_args(command, queue_name, *args))
            elif isinstance(result, Exception):
                raise result

    def _should_do_maintenance(self, command: str) -> int:
        if command == _MAINTENANCE:
            return 1
        return int(super()._should_do_maintenance(command))

    def run_maintenance(self) -> None:
        """One maintenance pass on every declared queue and delay queue; also this process's heartbeat."""
        for queue in sorted(self.get_declared_queues() | self.delay_queues):
            self.do_maintenance(queue)


def build_broker(settings: Settings) -> HubBroker:
    """A RedisBroker with our retry policy and the AsyncIO middleware for async actors."""
    wb = settings.write_behind
    middleware = [
        AgeLimit(),
        TimeLimit(time_limit=120_000),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(max_retries=wb.max_retries, min_backoff=wb.min_backoff_ms, max_backoff=wb.max_backoff_ms),
        AsyncIO(),
    ]
    broker = HubBroker(  # type: ignore[no-untyped-call]
        client=_client(settings.storage.redis_url),
        middleware=middleware,
        heartbeat_timeout=wb.heartbeat_timeout_ms,
        maintenance_chance=wb.maintenance_chance,
        dead_message_ttl=wb.dead_message_ttl_ms,
    )
    broker.merge_actor = PERSIST_ACTOR
    broker.merge_max_events = 4 * wb.batch_max_size
    return broker
