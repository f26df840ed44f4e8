"""The ``scheduler`` process of a host: APScheduler running reconcile, snapshot and audit.

Only the holder of the host's lease runs jobs (see lease.py); the others stand by.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from redis.exceptions import RedisError

from mfh_core.heartbeat import Heartbeat
from mfh_core.metrics_http import serve_metrics
from mfh_core.redaction import install_loop_exception_handler
from mfh_core.redis_health import check_persistence
from mfh_models import Settings
from mfh_tasks import BatchQueue, build_hot_store
from mfh_tasks.backlog import export_backlog, sample_backlog
from mfh_tasks.join import SnapshotSharer
from mfh_tasks.last_runs import export_last_runs
from mfh_tasks.runtime import wait_for_sound_sql_store
from schedules.jobs import audit, audit_peers, expire, prune_events, reconcile, snapshot_and_share
from schedules.lease import Lease, SlotLease, scheduled_slot

__all__ = ["run_scheduler"]

log = logging.getLogger("mfh.scheduler")

#: How often the write path's backlog gauges (queue depth, dead letters, dirty entries) are sampled.
BACKLOG_EVERY_S = 5.0


def quiet_routine_job_logs() -> None:
    """APScheduler logs "Running job ..." and "executed successfully" at INFO for every run: the lease
    renewal alone made 80 of 109 lines in five idle minutes. Its executor's routine lines go to DEBUG;
    errors and missed runs (WARNING and above) still show."""
    logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)
    logging.getLogger("apscheduler.scheduler").setLevel(logging.WARNING)


def _ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 1)


async def run_scheduler(settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    install_loop_exception_handler(loop)
    quiet_routine_job_logs()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serve_metrics(settings.metrics.scheduler_port, addr=settings.server.bind, what="scheduler")
    heartbeat = Heartbeat.of(settings, "scheduler", metrics_port=settings.metrics.scheduler_port)
    beating = asyncio.create_task(heartbeat.run(stop), name="mfh-heartbeat")
    export_last_runs(settings)
    hot = build_hot_store(settings)
    await check_persistence(hot.redis, url=settings.storage.redis_url, process="scheduler")
    found = await wait_for_sound_sql_store(settings, process="scheduler", stop=stop)
    if found is None:
        await hot.close()
        stop.set()
        await beating
        return
    sql = found
    queue = BatchQueue.from_settings(settings)
    lease = Lease(hot.redis, f"{settings.storage.redis_prefix}:scheduler:leader")
    sch = settings.scheduler
    report_dir = Path(sch.snapshot_dir)

    def leader_only(name: str, job: Callable[[], Awaitable[object]]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            if not lease.held:
                return
            t0 = time.perf_counter()
            try:
                await job()
            except Exception:
                log.exception("job %s failed", name, extra={"action": name, "outcome": "error"})
                return
            log.debug("job %s done", name, extra={"action": name, "outcome": "ok", "latency_ms": _ms_since(t0)})

        run.__name__ = run.__qualname__ = name  # APScheduler names the job after it in its own log lines
        return run

    async def reconcile_dirty_entries() -> None:
        await reconcile(hot, queue.send_now, stale_after_s=settings.write_behind.stale_dirty_seconds)

    async def expire_records() -> None:
        await expire(hot, sql, queue.send_now, now_ms=time.time_ns() // 1_000_000, batch=settings.expiry.sweep_batch)

    r = settings.replication
    sharer = SnapshotSharer(settings, keep=r.shared_snapshots_keep) if r.enabled and r.share_snapshots else None

    async def take_snapshot() -> None:
        try:
            await snapshot_and_share(sql, report_dir, host=settings.host_id, keep=sch.snapshot_keep, sharer=sharer)
            if sch.prune_events:
                await asyncio.to_thread(
                    prune_events, sql, report_dir, host=settings.host_id, archive=sch.archive_pruned_events
                )
        finally:
            export_last_runs(settings)

    async def audit_event_log() -> None:
        try:
            await asyncio.to_thread(audit, sql, host=settings.host_id, report_dir=report_dir)
        finally:
            export_last_runs(settings)

    async def sample_write_path() -> None:
        # Every replica samples (not only the leader): the gauges stay fresh while one is standing by.
        try:
            b = await sample_backlog(
                hot.redis,
                redis_prefix=settings.storage.redis_prefix,
                queue_name=settings.write_behind.queue_name,
                sql=sql,
            )
        except (RedisError, OSError) as e:
            log.debug("write path backlog not sampled: %s", e)
            return
        export_backlog(b)

    async def renew_scheduler_lease() -> None:
        was = lease.held
        try:
            await lease.refresh()
        except Exception as e:
            lease.held = False
            log.warning("scheduler lease: redis unavailable: %s", e)
        if lease.held != was:
            log.info("scheduler lease %s", "taken: running jobs" if lease.held else "lost: standing by")

    scheduler = AsyncIOScheduler()
    scheduler.add_job(
        renew_scheduler_lease, "interval", seconds=lease.ttl_ms / 3000, id="renew_scheduler_lease", max_instances=1
    )
    jobs: list[tuple[str, Callable[[], Awaitable[None]], BaseTrigger]] = [
        ("reconcile_dirty_entries", reconcile_dirty_entries, IntervalTrigger(seconds=sch.reconcile_interval_seconds)),
        ("take_snapshot", take_snapshot, IntervalTrigger(seconds=sch.snapshot_interval_seconds)),
        ("audit_event_log", audit_event_log, CronTrigger.from_crontab(sch.audit_cron, timezone="UTC")),
    ]
    if settings.expiry.sweep_interval_seconds > 0:
        jobs.append(("expire_records", expire_records, IntervalTrigger(seconds=settings.expiry.sweep_interval_seconds)))
    if sch.peer_audit_cron and settings.replication.enabled:
        slots = SlotLease(settings.replication, host_id=settings.host_id)
        peer_cron = sch.peer_audit_cron

        async def audit_across_hosts() -> None:
            # Any host may schedule it: the one that takes this slot's lease runs it (schedules.lease).
            slot = scheduled_slot(peer_cron, datetime.now(UTC))
            await audit_peers(settings, slot=slot, lease=slots)

        jobs.append(("audit_peers", audit_across_hosts, CronTrigger.from_crontab(sch.peer_audit_cron, timezone="UTC")))
    for name, job, trigger in jobs:
        scheduler.add_job(leader_only(name, job), trigger, id=name, name=name, max_instances=1, coalesce=True)

    async def sample_every() -> None:
        # A loop of its own, not an APScheduler job: no "Running job" log line every few seconds.
        while not stop.is_set():
            await sample_write_path()
            export_last_runs(settings)  # also picks up an `mfh audit` or `mfh snapshot` run by hand
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), BACKLOG_EVERY_S)

    await renew_scheduler_lease()
    sampling = asyncio.create_task(sample_every(), name="mfh-backlog")
    scheduler.start()
    peers = "not scheduled"
    if sch.peer_audit_cron:
        scheduled = f"at '{sch.peer_audit_cron}' UTC{' with repair' if sch.peer_audit_repair else ''}"
        peers = scheduled if settings.replication.enabled else "not scheduled (replication is disabled)"
    log.info(
        "scheduler for %s: reconcile every %ss, snapshot every %ss, audit at '%s' UTC, cross-host audit %s",
        settings.host_id,
        sch.reconcile_interval_seconds,
        sch.snapshot_interval_seconds,
        sch.audit_cron,
        peers,
    )
    try:
        await stop.wait()
    finally:
        scheduler.shutdown(wait=False)
        stop.set()
        await beating
        await sampling
        await lease.release()
        if sharer is not None:
            await sharer.close()
        await hot.close()
        sql.close()
        await queue.close()
