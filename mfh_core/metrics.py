"""Prometheus metrics of every MFH process, in one place so names stay consistent.

Each process serves them on ``server.metrics_port`` (api) or its own port, on ``server.bind``;
names are ``mfh_<subsystem>_<what>_<unit>``. Worker processes run in prometheus_client's
multiprocess mode (``mfh worker`` serves the sum of all of them), so each gauge says how values of
several processes combine (``multiprocess_mode``; ignored elsewhere).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = [
    "API_LATENCY",
    "API_REQUESTS",
    "AUTH_FAILURES",
    "BREAKER_STATE",
    "CACHE_LOOKUPS",
    "CROSS_AUDIT_DIFFERENCES",
    "CROSS_AUDIT_LAST",
    "CROSS_AUDIT_LAST_SUCCESS",
    "CROSS_AUDIT_UNREACHABLE",
    "DEAD_LETTERS",
    "DIRTY_ENTRIES",
    "DIRTY_OLDEST_AGE",
    "FRONT_FAILOVERS",
    "FRONT_HELD",
    "FRONT_REPLICAS_LIVE",
    "FRONT_REPLICA_UP",
    "FRONT_REQUESTS",
    "FRONT_SENT",
    "LAST_AUDIT",
    "LAST_AUDIT_OK",
    "LAST_SNAPSHOT",
    "PERSIST_BATCHES",
    "PERSIST_EVENTS",
    "PERSIST_SECONDS",
    "PROCESSES",
    "PROCESS_STARTED",
    "QUEUE_DEPTH",
    "RECONCILE_REENQUEUED",
    "REDIS_PERSISTENCE",
    "REPLICATION_APPLIED",
    "REPLICATION_LAG",
    "REPLICATION_LAST_APPLIED",
    "REPLICATION_LAST_LAG",
    "REPLICATION_PENDING",
    "REPLICATION_SKIPPED",
    "REQUEUED_DIRTY",
    "UNPUBLISHED_EVENTS",
    "WRITE_BATCHES",
    "ZMQ_REPLIES_DELAYED",
    "ZMQ_REPLIES_DROPPED",
    "register_near_cache",
]

_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

API_REQUESTS = Counter(
    "mfh_api_requests_total", "Requests answered, by transport, method and result code", ["transport", "method", "code"]
)
API_LATENCY = Histogram(
    "mfh_api_request_seconds", "Server-side request latency", ["transport", "method"], buckets=_FAST
)
AUTH_FAILURES = Counter(
    "mfh_api_auth_failures_total",
    "Requests refused for their API key, by door (grpc, zmq, v0) and reason (missing, wrong, scope, read_only)",
    ["door", "reason"],
)
LEGACY_V0_CALLS = Counter(
    "mfh_api_legacy_v0_calls_total",
    "ZeroMQ calls in the legacy v0 schema (zero means the last v0 agent is gone)",
    ["action"],
)
FRONT_REQUESTS = Counter(
    "mfh_front_requests_total",
    "Requests through mfh front by outcome: forwarded, resent (their replica died), shed, unavailable (no live "
    "replica), lost (their replica died and they could not be sent again), expired (no answer by their deadline), "
    "late (a reply after a re-send or expiry)",
    ["outcome"],
)
FRONT_SENT = Counter("mfh_front_sent_total", "Requests mfh front sent to each api replica (re-sends too)", ["replica"])
FRONT_HELD = Gauge("mfh_front_requests_held", "Requests mfh front holds (sent to a replica, not answered yet)")
FRONT_REPLICAS_LIVE = Gauge("mfh_front_replicas_live", "api replicas in mfh front's rotation")
FRONT_REPLICA_UP = Gauge("mfh_front_replica_up", "1 while an api replica is in mfh front's rotation", ["replica"])
FRONT_FAILOVERS = Counter(
    "mfh_front_failovers_total", "Times mfh front dropped a replica from its rotation (dead, draining)", ["replica"]
)
ZMQ_REPLIES_DELAYED = Counter(
    "mfh_zmq_replies_delayed_total",
    "ZeroMQ replies that waited for their peer's pipe (refused at once: the peer read slowly, or the box was busy)",
    ["door"],
)
ZMQ_REPLIES_DROPPED = Counter(
    "mfh_zmq_replies_dropped_total",
    "ZeroMQ replies never sent, by reason: gone (the peer disconnected), full (too many waiting for it), "
    "patience (it read nothing for 10 s), closing",
    ["door", "reason"],
)
CACHE_LOOKUPS = Counter("mfh_cache_lookups_total", "Hot store lookups by result (hit, miss)", ["result"])
WRITE_BATCHES = Counter("mfh_write_batches_total", "persist_batch messages enqueued by the api")
DIRTY_ENTRIES = Gauge(
    "mfh_dirty_entries", "Entries staged in Redis and not yet persisted to SQL", multiprocess_mode="livemostrecent"
)
DIRTY_OLDEST_AGE = Gauge(
    "mfh_dirty_oldest_age_seconds",
    "Age of the oldest entry staged in Redis and not yet persisted (0 when none)",
    multiprocess_mode="livemostrecent",
)
QUEUE_DEPTH = Gauge(
    "mfh_queue_depth",
    "Write batches in the Dramatiq queue: waiting or held by a worker (ready), or in a retry backoff (delayed)",
    ["state"],
    multiprocess_mode="livemostrecent",
)
DEAD_LETTERS = Gauge(
    "mfh_dead_letters", "Write batches in the dead-letter queue (mfh dlq list)", multiprocess_mode="livemostrecent"
)
PERSIST_BATCHES = Counter("mfh_persist_batches_total", "Batches applied to SQL by workers, by result", ["result"])
PERSIST_EVENTS = Counter("mfh_persist_events_total", "Events applied to SQL by workers")
PERSIST_SECONDS = Histogram(
    "mfh_persist_batch_seconds", "Time to persist one batch (SQL + publish + clean)", buckets=_FAST
)
# No multiprocess_mode: the outbox relay decrements it (mostrecent modes refuse dec), and only the
# replicator and the scheduler, never a multiprocess worker, set it.
UNPUBLISHED_EVENTS = Gauge("mfh_unpublished_events", "Events committed to SQL and not yet on JetStream (outbox)")
REPLICATION_LAG = Histogram(
    "mfh_replication_lag_seconds",
    "Event created on its origin host → applied on this host",
    ["origin"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
)
REPLICATION_LAST_LAG = Gauge(
    "mfh_replication_last_lag_seconds",
    "Lag of the last event applied from each origin host (created there → applied here)",
    ["origin"],
    multiprocess_mode="livemostrecent",
)
REPLICATION_LAST_APPLIED = Gauge(
    "mfh_replication_last_applied_timestamp_seconds",
    "When the last event from each origin host was applied here (unix time)",
    ["origin"],
    multiprocess_mode="livemostrecent",
)
REPLICATION_PENDING = Gauge(
    "mfh_replication_pending_events",
    "Events in the stream not yet delivered to this host's replicator, or delivered and not yet acked",
    ["state"],
    multiprocess_mode="livemostrecent",
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
    multiprocess_mode="livemostrecent",
)
BREAKER_STATE = Gauge(
    "mfh_breaker_state",
    "Circuit breaker of a dependency (redis, sql): 0 closed, 1 probing, 2 open (calls refused)",
    ["name"],
    multiprocess_mode="livemax",
)
LAST_SNAPSHOT = Gauge(
    "mfh_last_snapshot_timestamp_seconds",
    "When the newest snapshot file was written (unix time; 0: none yet)",
    multiprocess_mode="livemostrecent",
)
LAST_AUDIT = Gauge(
    "mfh_last_audit_timestamp_seconds",
    "When the last replay audit ran (unix time; 0: none yet)",
    multiprocess_mode="livemostrecent",
)
LAST_AUDIT_OK = Gauge(
    "mfh_last_audit_ok",
    "Verdict of the last replay audit: 1 the replayed checksum matched the live one, 0 a mismatch or none yet",
    multiprocess_mode="livemostrecent",
)
CROSS_AUDIT_DIFFERENCES = Gauge(
    "mfh_cross_audit_differences",
    "Keys whose rows differed between hosts at the last cross-host audit (mfh audit --peers), after its repair",
    multiprocess_mode="livemostrecent",
)
CROSS_AUDIT_UNREACHABLE = Gauge(
    "mfh_cross_audit_unreachable_hosts",
    "Hosts that did not answer the last cross-host audit",
    multiprocess_mode="livemostrecent",
)
CROSS_AUDIT_LAST = Gauge(
    "mfh_cross_audit_last_timestamp_seconds",
    "When the last cross-host audit this host took part in ended (unix time; 0: none yet)",
    multiprocess_mode="livemostrecent",
)
CROSS_AUDIT_LAST_SUCCESS = Gauge(
    "mfh_cross_audit_last_success_timestamp_seconds",
    "When a cross-host audit last found every host answering and equal (unix time; 0: never)",
    multiprocess_mode="livemostrecent",
)
PROCESSES = Gauge(
    "mfh_processes",
    "MFH processes running, by role (api, worker, replicator, scheduler) and version: 1 per process",
    ["role", "version"],
    multiprocess_mode="livesum",
)
PROCESS_STARTED = Gauge(
    "mfh_process_start_timestamp_seconds",
    "When the process (for workers: the oldest live worker process) started (unix time)",
    ["role"],
    multiprocess_mode="livemin",
)


class _NearCacheCollector:
    """The near caches' counters, read when Prometheus scrapes: a hit only bumps a plain integer."""

    def __init__(self) -> None:
        self.caches: weakref.WeakSet[Any] = weakref.WeakSet()

    def describe(self) -> list[Metric]:
        return []  # names are fixed; nothing to collect at registration

    def collect(self) -> Iterator[Metric]:
        caches = list(self.caches)
        lookups = CounterMetricFamily(
            "mfh_near_cache_lookups",
            "Near cache lookups by result: hit, miss, bypass (the cache was off or not confirmed fresh)",
            labels=["result"],
        )
        for result, field in (("hit", "hits"), ("miss", "misses"), ("bypass", "bypasses")):
            lookups.add_metric([result], _sum(caches, field))
        yield lookups
        yield CounterMetricFamily(
            "mfh_near_cache_evictions", "Near cache entries evicted by its bounds", value=_sum(caches, "evictions")
        )
        yield CounterMetricFamily(
            "mfh_near_cache_invalidations",
            "Near cache entries dropped because their key changed (any process or host)",
            value=_sum(caches, "invalidations"),
        )
        yield CounterMetricFamily(
            "mfh_near_cache_flushes",
            "Whole near cache drops: tracking connection lost, FLUSHDB",
            value=_sum(caches, "flushes"),
        )
        entries = GaugeMetricFamily("mfh_near_cache_entries", "Near cache entries by kind", labels=["kind"])
        entries.add_metric(["record"], sum(c.entries for c in caches))
        entries.add_metric(["absent"], sum(c.absences for c in caches))
        yield entries
        yield GaugeMetricFamily(
            "mfh_near_cache_bytes", "Approximate bytes held by the near cache", value=sum(c.bytes for c in caches)
        )
        yield GaugeMetricFamily(
            "mfh_near_cache_tracking",
            "1 while the near cache's invalidation feed is connected (else the cache is off)",
            value=sum(1 for c in caches if c.tracking),
        )


def _sum(caches: list[Any], field: str) -> int:
    return sum(int(getattr(c.stats, field)) for c in caches)


_NEAR_CACHES = _NearCacheCollector()
REGISTRY.register(_NEAR_CACHES)


def register_near_cache(cache: Any) -> None:
    """Export ``cache``'s counters (held weakly: a closed cache drops out of the sums)."""
    _NEAR_CACHES.caches.add(cache)
