"""``mfh scheduler``, ``mfh dlq``, ``mfh audit``, ``mfh snapshot``: the operator's commands."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from mfh_api.commands import fail, settings_from

__all__ = ["register"]


def _scheduler(args: argparse.Namespace) -> int:
    from schedules import run_scheduler

    settings = settings_from(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(run_scheduler(settings))
    return 0


def _dlq(args: argparse.Namespace) -> int:
    from mfh_tasks import build_broker
    from mfh_tasks.dlq import DeadLetters

    settings = settings_from(args)
    broker = build_broker(settings)
    try:
        dlq = DeadLetters(broker, settings.write_behind.queue_name)
        ids = args.ids or None
        if args.action == "list":
            letters = dlq.list(limit=args.limit)
            for d in letters:
                print(d.describe())
            total = dlq.count()
            print(
                f"{total} dead-lettered batch(es) in {dlq.ids_key}"
                + (f", first {len(letters)} shown" if total > len(letters) else "")
            )
        elif args.action == "retry":
            print(f"re-enqueued {dlq.retry(ids)} batch(es)")
        else:
            if ids is None and not args.all:
                return fail("dlq purge drops batches for good: name the ids, or pass --all", 2)
            print(f"purged {dlq.purge(ids)} batch(es)")
    finally:
        broker.close()
    return 0


def _audit(args: argparse.Namespace) -> int:
    from mfh_tasks import build_sql_store
    from schedules import audit

    settings = settings_from(args)
    sql = build_sql_store(settings)
    try:
        result = audit(sql, report_dir=Path(settings.scheduler.snapshot_dir))
    finally:
        sql.close()
    print(result.to_json())
    return 0 if result.ok else 1


def _snapshot(args: argparse.Namespace) -> int:
    from mfh_tasks import build_sql_store
    from schedules import snapshot

    settings = settings_from(args)
    sql = build_sql_store(settings)
    try:
        print(snapshot(sql, Path(settings.scheduler.snapshot_dir)))
    finally:
        sql.close()
    return 0


def register(subparsers: Any) -> None:
    sch = subparsers.add_parser(
        "scheduler",
        help="run reconcile, snapshots and the nightly replay audit",
        description="APScheduler jobs of this host; one scheduler per host holds the lease and runs them.",
    )
    sch.set_defaults(func=_scheduler)

    dlq = subparsers.add_parser(
        "dlq",
        help="list, retry or purge dead-lettered write batches",
        description="Batches whose retries ran out (or that were malformed). Retrying is always safe.",
    )
    dlq.add_argument("action", choices=["list", "retry", "purge"])
    dlq.add_argument("ids", nargs="*", help="message ids (default: all for retry; purge needs ids or --all)")
    dlq.add_argument("--limit", type=int, default=100, help="list at most this many (oldest first)")
    dlq.add_argument("--all", action="store_true", help="with purge: drop every dead letter")
    dlq.set_defaults(func=_dlq)

    audit = subparsers.add_parser(
        "audit",
        help="replay the event log now and compare checksums (exit 1 on a mismatch)",
        description="Writes <snapshot_dir>/audit-latest.json and appends to audit-history.jsonl.",
    )
    audit.set_defaults(func=_audit)

    snap = subparsers.add_parser("snapshot", help="write a snapshot of every item now")
    snap.set_defaults(func=_snapshot)
