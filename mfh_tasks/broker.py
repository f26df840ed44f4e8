"""The Dramatiq broker, built from settings (Redis broker on the host's Redis).

Shipped settings bound recovery: a killed worker's batches are redelivered once its heartbeat
is ``heartbeat_timeout_ms`` old and a maintenance pass runs. Dramatiq runs that pass on a random
``maintenance_chance`` of broker calls, which an idle worker makes one or two of a second (a
requeue 23-69 s after a kill); a worker therefore also runs it on a timer
(:meth:`HubBroker.run_maintenance`, every ``recovery.maintenance_interval_seconds``).
"""

from __future__ import annotations

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

__all__ = ["HubBroker", "build_broker"]

_MAINTENANCE = "maintenance"  # a dispatch command the Lua script has no branch for: maintenance only


class HubBroker(RedisBroker):
    """A RedisBroker whose maintenance pass (requeue of dead workers' messages) can be run on demand."""

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
    return HubBroker(  # type: ignore[no-untyped-call]
        url=settings.storage.redis_url,
        middleware=middleware,
        heartbeat_timeout=wb.heartbeat_timeout_ms,
        maintenance_chance=wb.maintenance_chance,
        dead_message_ttl=wb.dead_message_ttl_ms,
    )
