"""``mfh replicator``, ``mfh replay`` and ``mfh checksum``: replication and the event log, from the shell.

``replicator`` is the Procfile's long-running process (replicator + outbox relay until SIGTERM).
``replay`` rebuilds an items table from the log into an empty database and prints its checksum,
which must equal ``checksum`` (the live one): the check that the event log is the truth.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, TextIO

from mfh_api.commands import add_json, emit, exit_code, fail, positive_int, settings_from, store_settings
from mfh_models import MFHError, StoreNotCurrent

__all__ = ["ProgressBar", "register"]


class ProgressBar:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, *, stream: TextIO | None = None, width: int = 30, unit: str = "events") -> None:
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.width = width
        self._t0 = time.perf_counter()
        self._last = 0.0
        self._drawn = False

    def __call__(self, done: int, total: int | None) -> None:
        now = time.perf_counter()
        if now - self._last < 0.1 and (total is None or done < total):
            return
        self._last = now
        rate = done / max(now - self._t0, 1e-9)
        if total:
            frac = min(done / total, 1.0)
            bar = "#" * int(frac * self.width)
            line = f"{self.label} [{bar:<{self.width}}] {frac:6.1%} {done}/{total} {self.unit} {rate:,.0f}/s"
        else:
            line = f"{self.label} {done} {self.unit} {rate:,.0f}/s"
        self.stream.write("\r" + line)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _replicator(args: argparse.Namespace) -> int:
    from mfh_tasks.replicator import main

    try:
        main(settings_from(args))
    except StoreNotCurrent as e:
        return fail(f"replicator: {e}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from mfh_core import SqlStore
    from mfh_core.eventbus import EventBus
    from mfh_tasks.replay import ReplayResult, open_target, replay_from_sql, replay_from_stream

    settings = store_settings(args)
    source_url = args.source or settings.storage.database_url
    bar = None if args.quiet else ProgressBar("replay")
    try:
        target = open_target(args.into)
        try:
            result: ReplayResult
            if args.from_stream:

                async def from_stream() -> ReplayResult:
                    bus = EventBus.from_settings(settings.replication, name=f"mfh-replay-{settings.host_id}")
                    await bus.connect()
                    try:
                        return await replay_from_stream(bus, target, batch=args.batch, progress=bar)
                    finally:
                        await bus.close()

                result = asyncio.run(from_stream())
            else:
                source = SqlStore(source_url)
                try:
                    result = replay_from_sql(source, target, batch=args.batch, progress=bar)
                finally:
                    source.close()
        finally:
            target.close()
            if bar is not None:
                bar.close()
    except MFHError as e:
        return fail(f"replay: {e}", exit_code(e))
    origin = f"stream {settings.replication.event_topic}" if args.from_stream else "events table"
    if args.json:
        doc = {
            "checksum": result.checksum,
            "events": result.events,
            "seconds": round(result.seconds, 3),
            "events_per_s": round(result.events_per_s, 1),
            "source": "stream" if args.from_stream else "sql",
        }
        emit(args, doc, "")
        return 0
    print(
        f"replayed {result.events} events from the {origin} in {result.seconds:.2f} s ({result.events_per_s:,.0f}/s)",
        file=sys.stderr,
    )
    print(result.checksum)
    return 0


def _checksum(args: argparse.Namespace) -> int:
    from mfh_core import SqlStore

    settings = store_settings(args)
    try:
        store = SqlStore(settings.storage.database_url)
        try:
            store.require_existing()  # a missing SQLite file is reported (exit 7), not created empty
            store.create_schema()  # a fresh store is created at head; one that is behind is refused
            checksum = store.checksum()
        finally:
            store.close()
    except MFHError as e:
        return fail(f"checksum: {e}", exit_code(e))
    emit(args, {"host_id": settings.host_id, "checksum": checksum}, checksum)
    return 0


def register(subparsers: Any) -> None:
    replicator = subparsers.add_parser(
        "replicator",
        help="apply other hosts' events here and relay unpublished ones (runs until SIGTERM)",
        description="Run this host's JetStream replicator (durable consumer replicator-<host>) and outbox relay.",
    )
    replicator.set_defaults(func=_replicator)

    replay = subparsers.add_parser(
        "replay",
        help="rebuild an items table from the event log into an empty database; print its checksum",
        description="Replay the event log (this host's SQL events table, or the JetStream stream) into "
        "an empty database and print the checksum of the items it rebuilt.",
    )
    replay.add_argument("--into", required=True, metavar="DATABASE_URL", help="sqlite:///file.db or postgresql://...")
    replay.add_argument("--from-stream", action="store_true", help="read the JetStream stream, not the events table")
    replay.add_argument("--source", metavar="DATABASE_URL", help="events table to read (default: this host's)")
    replay.add_argument("--batch", type=positive_int, default=5000, help="events per transaction (default: 5000)")
    replay.add_argument("--quiet", action="store_true", help="no progress bar")
    add_json(replay, "checksum, events, seconds and rate as one JSON document")
    replay.set_defaults(func=_replay)

    checksum = subparsers.add_parser(
        "checksum",
        help="print the checksum of this host's items table",
        description="The one checksum (sha256 over sorted namespace, key, version, origin, deleted, payload hash).",
    )
    add_json(checksum, "the host id and checksum as one JSON document")
    checksum.set_defaults(func=_checksum)
