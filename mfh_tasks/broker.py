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
from typing import Any

import redis
from dramatiq.brokers.redis import RedisBroker
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
        """Enqueue, then wake the queue's idle consumers (a lost wake-up only costs the old polling delay)."""
        enqueued = super().enqueue(message, delay=delay)
        if delay is None:
            # Enqueued all the same when this fails: the consumers' fallback poll finds it.
            with contextlib.suppress(redis.RedisError):
                self.client.publish(self.wake_channel(message.queue_name), b"")
        return enqueued

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
