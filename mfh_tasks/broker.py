"""The Dramatiq broker, built from settings (Redis broker on the host's Redis).

Shipped settings bound recovery: a killed worker's batches are redelivered once its heartbeat
is ``heartbeat_timeout_ms`` old and a maintenance pass runs, which ``maintenance_chance`` makes
likely within seconds (Dramatiq's defaults are 60 s and a 0.1% chance per call).
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

__all__ = ["build_broker"]


def build_broker(settings: Settings) -> RedisBroker:
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
    return RedisBroker(  # type: ignore[no-untyped-call]
        url=settings.storage.redis_url,
        middleware=middleware,
        heartbeat_timeout=wb.heartbeat_timeout_ms,
        maintenance_chance=wb.maintenance_chance,
        dead_message_ttl=wb.dead_message_ttl_ms,
    )
