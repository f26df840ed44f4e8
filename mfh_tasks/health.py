"""A host's health at one moment, for ``mfh status``: what runs, what answers, what waits, and a verdict.

:func:`gather` reads the heartbeats of the host's processes (mfh_core.heartbeat), probes Redis,
SQL and NATS (mfh_core.probes), samples the write path's backlog (backlog.py), reads the
replicator's lag per peer (peer_lag.py) and the last snapshot and audit (last_runs.py).
:func:`judge` turns that into green, yellow or red, with one reason per finding, naming the
component and what it means for agents' data.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mfh_core import SqlStore
from mfh_core.heartbeat import ProcessRecord, read_processes
from mfh_core.nats_security import NatsSecurity
from mfh_core.probes import Probe, probe_nats, probe_redis, probe_sql
from mfh_core.redis_health import describe_url
from mfh_models import Settings
from mfh_tasks.backlog import Backlog, sample_backlog
from mfh_tasks.last_runs import AuditRun, SnapshotRun, last_audit, last_snapshot
from mfh_tasks.peer_audit import read_verdict
from mfh_tasks.peer_lag import ConsumerBacklog, PeerLag, read_consumer_backlog, read_peer_lag

__all__ = ["HostHealth", "Level", "Reason", "gather", "judge"]

Level = Literal["green", "yellow", "red"]
_RANK = {"green": 0, "yellow": 1, "red": 2}

#: A peer whose last event took longer than this to arrive here makes the host yellow.
LAG_YELLOW_S = 5.0
#: Undelivered events on the stream for this host's replicator before it counts as behind.
PENDING_YELLOW = 10_000
#: Unpublished events (the outbox) before the host is yellow although NATS answers.
UNPUBLISHED_YELLOW = 1_000


@dataclass(frozen=True, slots=True)
class Reason:
    level: Level
    component: str
    message: str


@dataclass
class HostHealth:
    host_id: str
    checked_at: float
    processes: list[ProcessRecord] = field(default_factory=list)
    processes_gone: list[ProcessRecord] = field(default_factory=list)  # heartbeat left, pid gone
    redis: Probe | None = None
    redis_where: str = ""
    sql: Probe | None = None
    nats: Probe | None = None  # None: replication is off
    backlog: Backlog | None = None
    peers: list[PeerLag] = field(default_factory=list)
    consumer: ConsumerBacklog | None = None
    snapshot: SnapshotRun | None = None
    audit: AuditRun | None = None
    cross_audit: dict[str, Any] | None = None  # the last cross-host verdict (mfh audit --peers)
    reasons: list[Reason] = field(default_factory=list)

    @property
    def level(self) -> Level:
        worst: Level = "green"
        for r in self.reasons:
            if _RANK[r.level] > _RANK[worst]:
                worst = r.level
        return worst

    def count(self, role: str) -> int:
        return sum(1 for p in self.processes if p.role == role)

    def as_dict(self) -> dict[str, Any]:
        def opt(x: Any) -> Any:
            return None if x is None else x.as_dict() if hasattr(x, "as_dict") else asdict(x)

        return {
            "host_id": self.host_id,
            "status": self.level,
            "checked_at": self.checked_at,
            "reasons": [asdict(r) for r in self.reasons],
            "processes": [{**asdict(p), "uptime_s": round(self.checked_at - p.started_at, 1)} for p in self.processes],
            "processes_gone": [asdict(p) for p in self.processes_gone],
            "redis": {**(opt(self.redis) or {}), "where": self.redis_where},
            "sql": opt(self.sql),
            "nats": opt(self.nats),
            "write_path": opt(self.backlog),
            "replication": {"peers": [p.as_dict() for p in self.peers], "consumer": opt(self.consumer)},
            "snapshot": opt(self.snapshot),
            "audit": opt(self.audit),
            "cross_audit": self.cross_audit,
        }


async def gather(settings: Settings, *, timeout_s: float = 2.0) -> HostHealth:
    """Everything :func:`judge` needs, read once; never raises for an unavailable store."""
    s = settings
    h = HostHealth(host_id=s.host_id, checked_at=time.time(), redis_where=describe_url(s.storage.redis_url))
    client: aioredis.Redis = aioredis.Redis.from_url(
        s.storage.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
    )
    sql_probe = asyncio.create_task(asyncio.to_thread(probe_sql, s.storage.database_url, timeout_s=timeout_s / 2))
    nats_probe = None
    if s.replication.enabled:
        nats_probe = asyncio.create_task(
            probe_nats(
                s.replication.nats_url,
                stream=s.replication.event_topic,
                timeout_s=timeout_s,
                security=NatsSecurity.from_settings(s.replication),
            )
        )
    try:
        h.redis = await probe_redis(client, timeout_s=timeout_s)
        h.sql = await sql_probe
        h.nats = await nats_probe if nats_probe is not None else None
        if h.redis.ok:
            try:
                procs = await read_processes(client, s.storage.redis_prefix)
                h.processes = [p for p in procs if not p.pid_gone()]
                h.processes_gone = [p for p in procs if p.pid_gone()]
                sql = None
                if h.sql.ok:
                    sql = SqlStore(s.storage.database_url)
                try:
                    h.backlog = await sample_backlog(
                        client, redis_prefix=s.storage.redis_prefix, queue_name=s.write_behind.queue_name, sql=sql
                    )
                finally:
                    if sql is not None:
                        sql.close()
                h.peers = await read_peer_lag(client, s.storage.redis_prefix)
                h.consumer = await read_consumer_backlog(client, s.storage.redis_prefix)
                h.cross_audit = await read_verdict(client, s.storage.redis_prefix)
            except (RedisError, OSError) as e:
                h.redis = Probe(False, None, f"failed while reading: {type(e).__name__}: {e}", "unreachable")
    finally:
        await client.aclose()
    h.snapshot = last_snapshot(s)
    h.audit = last_audit(s)
    h.reasons = judge(h, s)
    return h


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def judge(h: HostHealth, s: Settings) -> list[Reason]:
    """The findings, worst first: red means agents' writes are refused or not persisted, or data disagrees."""
    out: list[Reason] = []

    def red(component: str, message: str) -> None:
        out.append(Reason("red", component, message))

    def yellow(component: str, message: str) -> None:
        out.append(Reason("yellow", component, message))

    if h.redis is not None and not h.redis.ok:
        red("redis", f"unreachable at {h.redis_where} ({h.redis.detail}): writes are refused (read-only mode)")
    if h.sql is not None and not h.sql.ok:
        red("sql", f"{h.sql.detail}: batches are not persisted; they wait in the queue and retry")
    if h.nats is not None and not h.nats.ok:
        yellow("nats", f"unreachable ({h.nats.detail}): events wait in the outbox; other hosts miss this host's writes")
    if h.redis is not None and h.redis.ok:
        mode = h.redis.extra.get("persistence")
        if mode in ("none", "rdb"):
            yellow("redis", f"keeps {'nothing' if mode == 'none' else 'only RDB snapshots'} on disk: a crash loses"
                   " acknowledged writes not yet in SQL (turn on appendonly)")  # fmt: skip
        _judge_processes(h, s, red, yellow)
    b = h.backlog
    if b is not None:
        wb = s.write_behind
        if b.dirty >= 0.9 * wb.max_backlog:
            red("write path", f"{b.dirty} dirty entries, near max_backlog {wb.max_backlog}: writes will be refused")
        elif b.dirty >= 0.5 * wb.max_backlog:
            yellow("write path", f"{b.dirty} dirty entries, half of max_backlog {wb.max_backlog}")
        if b.oldest_dirty_age_s is not None and b.oldest_dirty_age_s > wb.stale_dirty_seconds:
            yellow(
                "write path", f"the oldest dirty entry waits for {_ago(b.oldest_dirty_age_s)} (SQL or workers behind)"
            )
        if b.dead_letters:
            yellow("dead letters", f"{b.dead_letters} batch(es) in the dead-letter queue: mfh dlq list, then retry")
        if b.delayed:
            yellow("write path", f"{b.delayed} batch(es) waiting to retry after a failure")
        if b.unpublished is not None and b.unpublished > UNPUBLISHED_YELLOW:
            yellow("outbox", f"{b.unpublished} events not yet on JetStream")
    for p in h.peers:
        if p.lag_s > LAG_YELLOW_S:
            yellow("replication", f"events from {p.origin} arrived {p.lag_s:.1f}s after they were made")
    if h.consumer is not None and h.consumer.pending > PENDING_YELLOW:
        yellow("replication", f"{h.consumer.pending} events on the stream not yet applied here")
    if h.audit is not None and not h.audit.ok:
        red("audit", f"the last replay audit ({_ago(h.checked_at - h.audit.checked_at)} ago) found a checksum mismatch")
    _judge_cross_audit(h, red, yellow)
    if h.snapshot is not None:
        overdue = 2 * s.scheduler.snapshot_interval_seconds + 60
        age = h.checked_at - h.snapshot.taken_at
        if age > overdue:
            yellow("snapshot", f"the newest snapshot is {_ago(age)} old (one is due every"
                   f" {_ago(s.scheduler.snapshot_interval_seconds)})")  # fmt: skip
    out.sort(key=lambda r: -_RANK[r.level])
    return out


def _judge_cross_audit(h: HostHealth, red: Any, yellow: Any) -> None:
    v = h.cross_audit
    if v is None:
        return
    ago = _ago(h.checked_at - float(v.get("checked_at", 0.0)))
    n = int(v.get("differences", 0))
    if n or v.get("truncated"):
        keys = ", ".join(v.get("keys", [])[:3])
        red("hosts", f"the last cross-host audit ({ago} ago) found {n}{'+' if v.get('truncated') else ''} key(s) that"
            f" differ between hosts ({keys}): mfh audit --peers --repair")  # fmt: skip
    unreachable = v.get("unreachable") or {}
    if unreachable:
        yellow("hosts", f"the last cross-host audit ({ago} ago) could not compare {', '.join(sorted(unreachable))}:"
               " no answer from its replicator")  # fmt: skip


def _judge_processes(h: HostHealth, s: Settings, red: Any, yellow: Any) -> None:
    gone = {p.role for p in h.processes_gone}

    def why(role: str) -> str:
        return " (its last process died without stopping)" if role in gone else ""

    if h.count("api") == 0:
        red("api", f"no api process is running{why('api')}: agents cannot connect")
    if h.count("worker") == 0:
        red("worker", f"no worker process is running{why('worker')}: accepted writes are not persisted to SQL")
    if s.replication.enabled and h.count("replicator") == 0:
        yellow(
            "replicator",
            f"no replicator is running{why('replicator')}: other hosts' writes do not arrive; the outbox waits",
        )
    if h.count("scheduler") == 0:
        yellow("scheduler", f"no scheduler is running{why('scheduler')}: no snapshots, audits or reconcile")
    for front in (p for p in h.processes if p.role == "front"):
        replicas = front.extra.get("replicas") or []
        dead = [r for r in replicas if not r.get("live")]
        port = front.extra.get("zmq_port", "?")
        if replicas and len(dead) == len(replicas):
            red("front", f"mfh front (ZeroMQ :{port}) has no live api replica: agents there get UNAVAILABLE")
        elif dead:
            names = ", ".join(f"{r.get('endpoint')} ({r.get('why') or 'no answer'})" for r in dead)
            yellow("front", f"api replica(s) out of mfh front's rotation (ZeroMQ :{port}): {names}")
    versions = {p.version for p in h.processes}
    if len(versions) > 1:
        yellow("processes", f"processes run different versions: {', '.join(sorted(versions))}")
