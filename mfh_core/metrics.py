"""Prometheus metrics of every MFH process, in one place so names stay consistent.

Each process serves them on ``server.metrics_port`` (api) or its own port; names are
``mfh_<subsystem>_<what>_<unit>``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "API_LATENCY",
    "API_REQUESTS",
    "CACHE_LOOKUPS",
    "DIRTY_ENTRIES",
    "LEGACY_V0_CALLS",
    "PERSIST_BATCHES",
    "PERSIST_EVENTS",
    "PERSIST_SECONDS",
    "RECONCILE_REENQUEUED",
    "REDIS_PERSISTENCE",
    "REPLICATION_APPLIED",
    "REPLICATION_LAG",
    "REPLICATION_SKIPPED",
    "REQUEUED_DIRTY",
    "UNPUBLISHED_EVENTS",
    "WRITE_BATCHES",
]

_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

API_REQUESTS = Counter(
    "mfh_api_requests_total", "Requests answered, by transport, method and result code", ["transport", "method", "code"]
)
API_LATENCY = Histogram(
    "mfh_api_request_seconds", "Server-side request latency", ["transport", "method"], buckets=_FAST
)
LEGACY_V0_CALLS = Counter(
    "mfh_api_legacy_v0_calls_total",
    "ZeroMQ calls in the legacy v0 schema (zero means the last v0 agent is gone)",
    ["action"],
)
CACHE_LOOKUPS = Counter("mfh_cache_lookups_total", "Hot store lookups by result (hit, miss)", ["result"])
WRITE_BATCHES = Counter("mfh_write_batches_total", "persist_batch messages enqueued by the api")
DIRTY_ENTRIES = Gauge("mfh_dirty_entries", "Entries staged in Redis and not yet persisted to SQL")
PERSIST_BATCHES = Counter("mfh_persist_batches_total", "Batches applied to SQL by workers, by result", ["result"])
PERSIST_EVENTS = Counter("mfh_persist_events_total", "Events applied to SQL by workers")
PERSIST_SECONDS = Histogram(
    "mfh_persist_batch_seconds", "Time to persist one batch (SQL + publish + clean)", buckets=_FAST
)
UNPUBLISHED_EVENTS = Gauge("mfh_unpublished_events", "Events committed to SQL and not yet on JetStream (outbox)")
REPLICATION_LAG = Histogram(
    "mfh_replication_lag_seconds",
    "Event created on its origin host → applied on this host",
    ["origin"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
REPLICATION_APPLIED = Counter("mfh_replication_applied_total", "Remote events applied on this host", ["origin"])
REPLICATION_SKIPPED = Counter(
    "mfh_replication_skipped_total", "Remote events skipped (own origin, or not newer)", ["reason"]
)
RECONCILE_REENQUEUED = Counter("mfh_reconcile_reenqueued_total", "Stale dirty entries re-enqueued by reconcile")
REQUEUED_DIRTY = Counter(
    "mfh_requeued_dirty_total",
    "Dirty entries re-enqueued by a worker: stale (their batch may never have been sent) or after a Redis restart",
    ["reason"],
)
REDIS_PERSISTENCE = Gauge(
    "mfh_redis_persistence",
    "What the Redis this process uses keeps on disk: 1 for the current mode (aof, rdb, none, unknown), 0 for others;"
    " with none, a Redis crash loses every write not yet in SQL",
    ["mode"],
)
