"""Operator commands and the scheduler process, run as real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from factories import payload
from hosts import TestHost, make_host
from services import async_wait_until, wait_until

from mfh_core import SqlStore
from mfh_models import Kind, Op
from mfh_tasks import build_hot_store


def mfh(host: TestHost, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", *args], env=host.env, capture_output=True, text=True, timeout=60
    )


def test_dlq_and_audit_commands(tmp_path: Path, redis_url: str) -> None:
    host = make_host(tmp_path, redis_url=redis_url)
    # Given an empty dead-letter queue
    out = mfh(host, "dlq", "list")
    assert out.returncode == 0 and "0 dead-lettered batch(es)" in out.stdout, out.stderr
    # purge needs ids or --all, so a slip of the finger drops nothing
    assert mfh(host, "dlq", "purge").returncode == 2
    assert mfh(host, "dlq", "purge", "--all").returncode == 0
    # The audit of an empty store (made by `mfh db upgrade`) passes and leaves its report where operators read it
    assert mfh(host, "db", "upgrade").returncode == 0
    out = mfh(host, "audit", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["ok"] is True, out.stderr
    report = Path(host.settings.scheduler.snapshot_dir) / f"audit-latest-{host.name}.json"
    assert json.loads(report.read_text())["ok"] is True


async def test_scheduler_reconciles_a_write_whose_batch_was_lost(tmp_path: Path, redis_url: str) -> None:
    host = make_host(
        tmp_path,
        redis_url=redis_url,
        overrides={"write_behind": {"stale_dirty_seconds": 0.5}, "scheduler": {"reconcile_interval_seconds": 0.2}},
    )
    hot = build_hot_store(host.settings)
    sql = SqlStore(host.settings.storage.database_url)
    sql.create_schema()
    try:
        # Given an acknowledged write whose persist_batch message was lost (staged, never enqueued)
        e = await hot.stage(op=Op.PUT, namespace="ns", key="orphan", kind=Kind.MEMORY_ITEM, payload=payload("x"))
        # When a worker and the scheduler run
        host.start_worker(threads=1)
        host.spawn("mfh_api.cli", "scheduler", log_name="scheduler")
        # Then reconcile re-enqueues it and it reaches SQL at its staged version
        await async_wait_until(
            lambda: sql.get("ns", "orphan") is not None,
            30,
            interval=0.05,
            message=f"reconciled row\n{host.log('scheduler')}\n{host.log()}",
        )
        row = sql.get("ns", "orphan")
        assert row is not None and row.version == e.version
        await async_wait_until(_no_dirty(hot), 10, message="entry to turn clean")
    finally:
        host.stop_all()
        await hot.close()
        sql.close()


def _no_dirty(hot):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return await hot.dirty_count() == 0

    return check


def test_mfh_worker_stops_cleanly_when_its_process_group_gets_sigterm(tmp_path: Path, redis_url: str) -> None:
    host = make_host(tmp_path, redis_url=redis_url)
    # Given `mfh worker` started the way honcho starts it (a session of its own)
    p = host.spawn("mfh_api.cli", "worker", "--processes", "1", "--threads", "2", log_name="mfh-worker")
    wait_until(lambda: "ready for action" in host.log("mfh-worker"), 30, message="worker ready")
    # When the whole group gets SIGTERM, as honcho does
    t0 = time.monotonic()
    os.killpg(p.pid, signal.SIGTERM)
    # Then it shuts down gracefully, promptly
    assert p.wait(timeout=30) == 0, host.log("mfh-worker")
    assert time.monotonic() - t0 < 15
    assert "Worker has been shut down" in host.log("mfh-worker")


MARKER = "DLQ-PAYLOAD-MARKER-3f9c"


async def test_dlq_show_gives_events_retries_and_error_but_no_payload(tmp_path: Path, redis_url: str) -> None:
    import redis.asyncio as aioredis
    from dramatiq import Message
    from factories import event
    from prometheus_client import REGISTRY

    from mfh_tasks import PERSIST_ACTOR, build_broker, encode_batch
    from mfh_tasks.backlog import export_backlog, sample_backlog
    from mfh_tasks.dlq import DeadLetters

    host = make_host(tmp_path, redis_url=redis_url)
    queue = host.settings.write_behind.queue_name
    broker = build_broker(host.settings)
    # Given a batch of two events that ran out of retries, as Dramatiq leaves it in the dead-letter queue
    events = [event("k1", 1, content=MARKER), event("k2", 2, content=MARKER * 3)]
    traceback = (
        f"Traceback ...\nUnavailable: sqlite unavailable: disk I/O error [SQL: INSERT ...] [parameters: ('{MARKER}',)]"
    )
    msg = Message(
        queue_name=queue, actor_name=PERSIST_ACTOR, args=(encode_batch(events),), kwargs={},
        options={"retries": 25, "traceback": traceback},
    )  # fmt: skip
    dlq = DeadLetters(broker, queue)
    broker.client.hset(dlq.msgs_key, msg.message_id, msg.encode())
    broker.client.zadd(dlq.ids_key, {msg.message_id: int(time.time() * 1000)})
    try:
        # When the operator shows it, as text and as JSON
        text = mfh(host, "dlq", "show", msg.message_id)
        as_json = mfh(host, "dlq", "show", msg.message_id, "--json")
        missing = mfh(host, "dlq", "show", "no-such-id")
        listed = mfh(host, "dlq", "list")
        # Then each event is listed with namespace, key, version and kind, the payload by its size only
        assert text.returncode == 0, text.stderr
        assert "retries 25" in text.stdout and "events 2" in text.stdout
        for e in events:
            assert f"ns/{e.key}  version={e.version}" in text.stdout and "memory_item" in text.stdout
            assert f"{len(e.payload.encode())} B" in text.stdout
        assert "Unavailable: sqlite unavailable: disk I/O error" in text.stdout
        doc = json.loads(as_json.stdout)
        assert doc["retries"] == 25 and [e["key"] for e in doc["events"]] == ["k1", "k2"]
        assert doc["events"][1]["payload_bytes"] == len(events[1].payload.encode())
        # and no payload reaches the output, not even through the error text
        assert MARKER not in text.stdout + as_json.stdout + text.stderr + listed.stdout
        assert "disk I/O error" in listed.stdout and "[SQL and parameters hidden]" in listed.stdout
        # and an unknown id is NOT_FOUND (exit 3)
        assert missing.returncode == 3 and "no dead letter" in missing.stderr
        # and the dead-letter gauge counts it
        client = aioredis.Redis.from_url(redis_url)
        try:
            b = await sample_backlog(client, redis_prefix=host.settings.storage.redis_prefix, queue_name=queue)
        finally:
            await client.aclose()
        export_backlog(b)
        assert b.dead_letters == 1 and REGISTRY.get_sample_value("mfh_dead_letters") == 1
    finally:
        dlq.purge()
        broker.close()
