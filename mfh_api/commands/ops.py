"""``mfh scheduler``, ``mfh audit``, ``mfh snapshot``, ``mfh dlq``: the operator's commands.

The first three run ``python -m schedules`` (imports flow one way: mfh_api may not import
schedules), with this host's settings passed through MFH_HOST and MFH_CONFIG_DIR.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from mfh_api.commands import count, fail, host_env, settings_from

__all__ = ["register"]


def _schedules(job: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        settings_from(args)  # fail here, readably, on a bad configuration
        argv = [sys.executable, "-m", "schedules", job] + (["--full"] if getattr(args, "full", False) else [])
        if job == "run":
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, argv, host_env(args))  # signals go straight to the scheduler
        return subprocess.run(argv, env=host_env(args), check=False).returncode

    return run


def _snapshot(args: argparse.Namespace) -> int:
    if args.action == "list":
        from mfh_api.commands.restore import list_snapshots

        return list_snapshots(args)
    return int(_schedules("snapshot" if args.action == "take" else "prune")(args))


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
            shown = f", first {len(letters)} shown" if total > len(letters) else ""
            print(f"{total} dead-lettered batch(es) in {dlq.ids_key}{shown}")
        elif args.action == "retry":
            print(f"re-enqueued {dlq.retry(ids)} batch(es)")
        else:
            if ids is None and not args.all:
                return fail("dlq purge drops batches for good: name the ids, or pass --all", 2)
            print(f"purged {dlq.purge(ids)} batch(es)")
    finally:
        broker.close()
    return 0


def register(subparsers: Any) -> None:
    sch = subparsers.add_parser(
        "scheduler",
        help="run reconcile, snapshots and the nightly replay audit",
        description="APScheduler jobs of this host; one scheduler per host holds the lease and runs them.",
    )
    sch.set_defaults(func=_schedules("run"))

    audit = subparsers.add_parser(
        "audit",
        help="replay the event log now and compare checksums (exit 1 on a mismatch)",
        description="Writes <snapshot_dir>/audit-latest.json and appends to audit-history.jsonl.",
    )
    audit.add_argument(
        "--full", action="store_true", help="replay the whole log (default: from the last verified snapshot)"
    )
    audit.set_defaults(func=_schedules("audit"))

    snap = subparsers.add_parser(
        "snapshot",
        help="write a snapshot of every item now; `mfh snapshot list` lists them",
        description="take (default): write one now; list: this host's snapshots with their watermark "
        "(see also `mfh restore`); prune: drop events older than the oldest kept snapshot (archived first).",
    )
    snap.add_argument("action", nargs="?", choices=["take", "list", "prune"], default="take")
    snap.add_argument("--json", action="store_true", help="list: one JSON object per snapshot")
    snap.set_defaults(func=_snapshot)

    dlq = subparsers.add_parser(
        "dlq",
        help="list, retry or purge dead-lettered write batches",
        description="Batches whose retries ran out (or that were malformed). Retrying is always safe.",
    )
    dlq.add_argument("action", choices=["list", "retry", "purge"])
    dlq.add_argument("ids", nargs="*", help="message ids (default: all for retry; purge needs ids or --all)")
    dlq.add_argument("--limit", type=count, default=100, help="list at most this many (oldest first)")
    dlq.add_argument("--all", action="store_true", help="with purge: drop every dead letter")
    dlq.set_defaults(func=_dlq)
