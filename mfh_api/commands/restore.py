"""``mfh restore`` and ``mfh snapshot list``: rebuild a store from a snapshot plus the events after it.

``mfh restore SNAPSHOT --into URL`` loads the snapshot's rows into an empty database (checked
against the snapshot's checksum), then applies the events after its watermark: from the events
table of the store it was taken from (``--events-from URL``; the result must equal that store's
live checksum), or from the JetStream stream (``--from-stream``; give ``--expect`` the checksum of a
healthy host). Without either it is the store as the snapshot saw it. Exit 0 when the checksums
agree, 1 when they differ, 7 when the events store's file is damaged (docs/operations.md runbooks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from mfh_api.commands import exit_code, fail, positive_int, store_settings
from mfh_models import InvalidArgument, MFHError

__all__ = ["list_snapshots", "register"]


def _snapshot_path(text: str, directory: Path, host: str) -> Path:
    """A snapshot file, or ``latest``: this host's newest restorable one in ``scheduler.snapshot_dir``."""
    from mfh_tasks.snapshots import read_header, snapshots_of

    if text != "latest":
        return Path(text)
    for path in reversed(snapshots_of(directory, host)):
        try:
            if read_header(path).restorable:
                return path
        except InvalidArgument:
            continue
    raise InvalidArgument(f"no restorable snapshot of {host} in {directory}")


def _restore(args: argparse.Namespace) -> int:
    from mfh_api.commands.replication import ProgressBar
    from mfh_core import SqlStore
    from mfh_core.eventbus import EventBus
    from mfh_core.sqlstore import display_url
    from mfh_tasks.replay import open_target
    from mfh_tasks.restore import RestoreResult, restore_from_sql, restore_from_stream, restore_snapshot_only
    from mfh_tasks.snapshots import mark_verified, write_snapshot

    settings = store_settings(args)
    snapdir = Path(settings.scheduler.snapshot_dir)
    bar = None if args.quiet else ProgressBar("restore")
    try:
        path = _snapshot_path(args.snapshot, snapdir, settings.host_id)
        target = open_target(args.into)
        try:
            result: RestoreResult
            if args.from_stream:

                async def from_stream() -> RestoreResult:
                    bus = EventBus.from_settings(settings.replication, name=f"mfh-restore-{settings.host_id}")
                    await bus.connect()
                    try:
                        return await restore_from_stream(
                            path, target, bus, expect=args.expect, batch=args.batch, progress=bar
                        )
                    finally:
                        await bus.close()

                result = asyncio.run(from_stream())
            elif args.events_from:
                source = SqlStore(args.events_from)
                try:
                    source.require_existing()
                    result = restore_from_sql(path, target, source, batch=args.batch, progress=bar)
                finally:
                    source.close()
            else:
                result = restore_snapshot_only(path, target)
            if args.expect and not args.from_stream:
                result = RestoreResult(
                    result.snapshot, result.items, result.events, result.checksum, args.expect, result.seconds
                )
            base = None
            if result.ok and args.into == settings.storage.database_url:
                # This host's store now starts a new log at the snapshot: record it as the verified base,
                # so the next (incremental) audit starts from it rather than from a log it no longer holds.
                base = write_snapshot(target, snapdir, host=settings.host_id)
                mark_verified(base, host=settings.host_id)
        finally:
            target.close()
            if bar is not None:
                bar.close()
    except MFHError as e:
        return fail(f"restore: {e}", exit_code(e))
    if args.json:
        print(
            json.dumps({**result.as_dict(), "into": display_url(args.into), "base_snapshot": base and base.path.name})
        )
    else:
        print(
            f"restored {result.items} rows from {result.snapshot} and {result.events} events after it into "
            f"{display_url(args.into)} in {result.seconds:.2f} s",
            file=sys.stderr,
        )
        if base is not None:
            print(f"wrote {base.path.name}, the base of this host's next audit", file=sys.stderr)
        print(result.checksum)
    if not result.ok:
        return fail(f"restore: checksum {result.checksum} differs from the expected {result.expected}", 1)
    return 0


def list_snapshots(args: argparse.Namespace) -> int:
    """``mfh snapshot list``: this host's snapshots, oldest first, and which one the last audit verified."""
    from mfh_tasks.snapshots import read_header, snapshots_of, verified_snapshot

    settings = store_settings(args)
    directory = Path(settings.scheduler.snapshot_dir)
    verified = verified_snapshot(directory, settings.host_id)
    rows = []
    for path in snapshots_of(directory, settings.host_id):
        try:
            head = read_header(path).as_dict()
        except InvalidArgument as e:
            head = {"file": path.name, "error": e.message}
        head["verified"] = verified is not None and verified.path == path
        rows.append(head)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"{'snapshot':<48} {'items':>9} {'watermark':>10}  verified")
    for row in rows:
        mark = "yes" if row["verified"] else ("old format" if row.get("format") == 1 else "")
        print(f"{row['file']:<48} {row.get('items', '?'):>9} {row.get('watermark') or '-':>10}  {mark}")
    print(f"{len(rows)} snapshot(s) of {settings.host_id} in {directory}")
    return 0


def register(subparsers: Any) -> None:
    restore = subparsers.add_parser(
        "restore",
        help="rebuild a store from a snapshot plus the events after it, and verify the checksum",
        description=__doc__.split("\n\n", 1)[1].split("\n\n", 1)[0] if __doc__ else None,
    )
    restore.add_argument("snapshot", metavar="SNAPSHOT", help="a snapshot-<host>-<stamp>.jsonl.gz file, or 'latest'")
    restore.add_argument("--into", required=True, metavar="DATABASE_URL", help="an empty database to rebuild")
    source = restore.add_mutually_exclusive_group()
    source.add_argument("--events-from", metavar="DATABASE_URL", help="events table of the store the snapshot is of")
    source.add_argument("--from-stream", action="store_true", help="apply the JetStream stream after the snapshot")
    restore.add_argument("--expect", metavar="CHECKSUM", help="the checksum the result must equal")
    restore.add_argument("--batch", type=positive_int, default=5000, help="events per transaction (default: 5000)")
    restore.add_argument("--quiet", action="store_true", help="no progress bar")
    restore.add_argument("--json", action="store_true", help="print the result as one JSON object")
    restore.set_defaults(func=_restore)
