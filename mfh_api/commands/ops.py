"""``mfh scheduler``, ``mfh audit``, ``mfh snapshot``, ``mfh dlq``: the operator's commands.

The first three run ``python -m schedules`` (imports flow one way: mfh_api may not import
schedules), with this host's settings passed through MFH_HOST and MFH_CONFIG_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from mfh_api.commands import (
    add_json,
    count,
    emit,
    exit_code,
    fail,
    host_env,
    non_negative_float,
    positive_float,
    positive_int,
    settings_from,
    store_settings,
)

__all__ = ["register"]


def _schedules(job: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        # Fail here, readably, on a bad configuration; the jobs (not the scheduler) find the hub's data dir.
        settings_from(args) if job == "run" else store_settings(args)
        argv = [sys.executable, "-m", "schedules", job, *(["--json"] if getattr(args, "json", False) else [])]
        argv += ["--full"] if getattr(args, "full", False) else []
        if job == "run":
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, argv, host_env(args))  # signals go straight to the scheduler
        return subprocess.run(argv, env=host_env(args), check=False).returncode

    return run


def _show(d: Any, *, as_json: bool) -> None:
    """Print one dead letter: its batch's events without payloads (sizes only), retries, last error."""
    if as_json:
        print(json.dumps(d.as_dict(), indent=2, sort_keys=True))
        return
    dead = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.dead_since_ms / 1000))
    print(f"dead letter {d.message_id}  actor {d.actor}  queue {d.queue}")
    print(f"dead since {dead} UTC  retries {d.retries}  events {len(d.events)}")
    print(f"last error: {d.error or '(no traceback: rejected as invalid)'}")
    if d.malformed:
        print(f"malformed: {d.malformed}")
    for e in d.events:
        kind = e.kind or "-"
        print(f"  {e.op:<6} {e.namespace}/{e.key}  version={e.version}  origin={e.origin}  {kind}  {e.payload_bytes} B")


def _audit(args: argparse.Namespace) -> int:
    if args.peers is None:
        if args.repair:
            return fail("audit: --repair goes with --peers (the replay audit repairs nothing)", 2)
        return int(_schedules("audit")(args))
    if args.full:
        return fail("audit: --full is for the replay audit, not --peers", 2)
    return _peer_audit(args)


def _peer_audit(args: argparse.Namespace) -> int:
    """``mfh audit --peers``: compare the hosts' items over the event bus (docs/replication.md)."""
    import asyncio

    from mfh_models import MFHError, validate_origin
    from mfh_tasks.peer_audit import run_peer_audit

    settings = settings_from(args)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    try:
        for p in peers:
            validate_origin(p)
        if not settings.replication.enabled:
            return fail("audit --peers: replication is disabled on this host (replication.enabled)", 2)
        result = asyncio.run(
            run_peer_audit(
                settings,
                peers=peers or None,
                repair=args.repair,
                timeout_s=args.timeout,
                round_timeout_s=args.round_timeout,
                max_keys=args.max_keys,
                settle_s=args.settle,
            )
        )
    except MFHError as e:
        return fail(f"audit --peers: {e}", exit_code(e))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, sort_keys=True))
    else:
        print(_describe(result))
    return result.exit_code


def _describe(result: Any) -> str:
    """The peer audit for a terminal: the hosts, each key that differs with every host's row, the verdict."""
    found, final = result.found, result.final
    lines = [
        f"cross-host audit {result.id}: {len(found.hosts)} host(s) compared ({', '.join(found.hosts) or 'none'}), "
        f"{found.namespaces} namespace(s), {max(found.rows.values(), default=0)} keys, "
        f"{found.rounds} round(s), {result.seconds:.2f} s"
    ]
    for host, why in sorted(final.unreachable.items()):
        lines.append(f"UNREACHABLE {host}: {why}")
    for d in found.differences:
        lines.append(f"DIFFERS {d.namespace}/{d.key}")
        for host, row in sorted(d.rows.items()):
            if row is None:
                lines.append(f"  {host:<12} (no row)")
            else:
                log = {True: "matches its log", False: "DIFFERS FROM ITS LOG", None: "not in its log"}[row.logged]
                state = "deleted" if row.deleted else "put"
                lines.append(
                    f"  {host:<12} version {row.version} origin {row.origin} {state} digest {row.digest[:12]} {log}"
                )
    if found.truncated:
        lines.append(f"more keys differ than the {len(found.differences)} listed: run it again after a repair")
    if result.repaired is not None:
        lines.append(f"repair: {result.repaired} row(s) re-published")
        for d in result.unresolved or []:
            lines.append(f"  not repaired {d.namespace}/{d.key}: no row its host's log confirms; decide by hand")
    if final.equal:
        verdict = "equal" if not final.unreachable else "equal among the hosts that answered"
    else:
        verdict = f"{len(final.differences)} key(s) differ" + (" after the repair" if result.repaired else "")
    lines.append(f"verdict: {verdict}")
    return "\n".join(lines)


def _snapshot(args: argparse.Namespace) -> int:
    if args.action == "list":
        from mfh_api.commands.restore import list_snapshots

        return list_snapshots(args)
    return int(_schedules("snapshot" if args.action == "take" else "prune")(args))


def _dlq(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import redis

    from mfh_tasks import build_broker
    from mfh_tasks.dlq import DeadLetters

    settings = settings_from(args)
    ids = args.ids or None
    if args.action == "purge" and ids is None and not args.all:
        return fail("dlq purge drops batches for good: name the ids, or pass --all", 2)
    broker = build_broker(settings)
    try:
        dlq = DeadLetters(broker, settings.write_behind.queue_name)
        if args.action == "list":
            letters = dlq.list(limit=args.limit)
            total = dlq.count()
            if args.json:
                emit(args, {"key": dlq.ids_key, "total": total, "letters": [asdict(d) for d in letters]}, "")
                return 0
            for d in letters:
                print(d.describe())
            shown = f", first {len(letters)} shown" if total > len(letters) else ""
            print(f"{total} dead-lettered batch(es) in {dlq.ids_key}{shown}")
        elif args.action == "show":
            if len(args.ids) != 1:
                return fail("dlq show takes one message id (mfh dlq list shows them)", 2)
            _show(dlq.show(args.ids[0]), as_json=args.json)
        elif args.action == "retry":
            n = dlq.retry(ids)
            emit(args, {"retried": n}, f"re-enqueued {n} batch(es)")
        else:
            n = dlq.purge(ids)
            emit(args, {"purged": n}, f"purged {n} batch(es)")
    except redis.RedisError as e:  # a connection refused, a timeout, a wrong password: one line, exit 5
        return fail(f"dlq: Redis at {_where(settings.storage.redis_url)} is unavailable: {type(e).__name__}: {e}", 5)
    finally:
        broker.close()
    return 0


def _where(url: str) -> str:
    """host:port/db of a Redis URL, without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}{parts.path or ''}"


def register(subparsers: Any) -> None:
    sch = subparsers.add_parser(
        "scheduler",
        help="run reconcile, snapshots and the nightly replay audit",
        description="APScheduler jobs of this host; one scheduler per host holds the lease and runs them.",
    )
    sch.set_defaults(func=_schedules("run"))

    audit = subparsers.add_parser(
        "audit",
        help="replay the event log now and compare checksums (exit 1 on a mismatch); --peers: compare hosts",
        description="Without --peers: replay this host's event log and compare with its items; writes "
        "<snapshot_dir>/audit-latest-<host>.json. With --peers: compare every host's items over the event bus "
        "and name the keys that differ; exit 0 equal, 1 keys differ, 8 some host did not answer, 5 NATS is down.",
    )
    audit.add_argument(
        "--full", action="store_true", help="replay the whole log (default: from the last verified snapshot)"
    )
    audit.add_argument(
        "--peers",
        nargs="?",
        const="",
        metavar="HOST,...",
        help="compare the hosts' items instead (default: every host on the stream and every one that answers)",
    )
    audit.add_argument(
        "--repair", action="store_true", help="with --peers: re-publish the newest row of each key that differs"
    )
    audit.add_argument(
        "--timeout",
        type=positive_float,
        default=5.0,
        help="with --peers: seconds a host has to answer at all, or it is unreachable (default: 5)",
    )
    audit.add_argument(
        "--round-timeout",
        type=positive_float,
        default=120.0,
        help="with --peers: seconds a host that answered has for each round of digests (default: 120)",
    )
    audit.add_argument(
        "--max-keys", type=positive_int, default=1000, help="with --peers: list at most this many keys (default: 1000)"
    )
    audit.add_argument(
        "--settle",
        type=non_negative_float,
        default=0.5,
        help="with --peers: seconds to wait before reading the differing keys again (default: 0.5)",
    )
    add_json(audit, "the audit result (ok, both checksums, events, seconds) as one JSON document")
    audit.set_defaults(func=_audit)

    snap = subparsers.add_parser(
        "snapshot",
        help="write a snapshot of every item now; `mfh snapshot list` lists them",
        description="take (default): write one now; list: this host's snapshots with their watermark "
        "(see also `mfh restore`); prune: drop events older than the oldest kept snapshot (archived first).",
    )
    snap.add_argument("action", nargs="?", choices=["take", "list", "prune"], default="take")
    add_json(snap, "take: the snapshot's path, checksum and item count; list: one JSON object per snapshot")
    snap.set_defaults(func=_snapshot)

    dlq = subparsers.add_parser(
        "dlq",
        help="list, show, retry or purge dead-lettered write batches",
        description="Batches whose retries ran out (or that were malformed). Retrying is always safe.",
    )
    dlq.add_argument("action", choices=["list", "show", "retry", "purge"])
    dlq.add_argument("ids", nargs="*", help="message ids (show: one; retry: default all; purge: needs ids or --all)")
    dlq.add_argument("--limit", type=count, default=100, help="list at most this many (oldest first)")
    dlq.add_argument("--all", action="store_true", help="with purge: drop every dead letter")
    add_json(dlq, "list: {key, total, letters}; show: the dead letter; retry: {retried}; purge: {purged}")
    dlq.set_defaults(func=_dlq)
