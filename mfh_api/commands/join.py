"""``mfh join``: a host rebuilt empty restores a peer's shared snapshot and catches up from the stream.

Run it with the host's processes stopped and its SQL store empty (a lost disk, a new machine with the
lost host's ``host_id``), then start the host. The others keep running and writing meanwhile. It
prints the checksum of the rebuilt store and, with ``--json``, the time of each stage
(mfh_tasks.join). Exit 0 when rebuilt, 2 when the store is not empty or the host's replicator is
running, 3 when no usable snapshot is shared and the stream cannot rebuild the store by itself, 5
when NATS is unavailable; 1 when ``--expect`` differs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from mfh_api.commands import exit_code, fail, non_negative_int, positive_int, store_settings
from mfh_models import MFHError

__all__ = ["register"]


def _join(args: argparse.Namespace) -> int:
    from mfh_api.commands.replication import ProgressBar
    from mfh_core.eventbus import EventBus
    from mfh_core.sqlstore import display_url
    from mfh_models import InvalidArgument, validate_origin
    from mfh_tasks import build_hot_store
    from mfh_tasks.join import JoinResult, join_cluster
    from mfh_tasks.replay import open_target
    from mfh_tasks.snapshots import mark_verified, write_snapshot

    settings = store_settings(args)
    if not settings.replication.enabled:
        return fail("join: replication is disabled on this host (replication.enabled): there is no stream", 2)
    into = args.into or settings.storage.database_url
    snapdir = Path(settings.scheduler.snapshot_dir)
    bars: dict[str, ProgressBar] = {}

    def progress(stage: str, done: int, total: int | None) -> None:
        if args.quiet:
            return
        if stage not in bars:
            for other in bars.values():
                other.close()
            bars[stage] = ProgressBar(stage, unit="rows" if stage == "restore" else "events")
        bars[stage](done, total)

    timing: dict[str, float] = {}

    async def run() -> JoinResult:
        t0 = time.perf_counter()
        target = open_target(into)
        bus = EventBus.from_settings(settings.replication, name=f"mfh-join-{settings.host_id}")
        hot = build_hot_store(settings) if into == settings.storage.database_url and args.warm else None
        try:
            await bus.connect()
            timing["setup_s"] = round(time.perf_counter() - t0, 3)  # the empty store's schema, NATS
            result = await join_cluster(
                settings,
                target,
                bus,
                workdir=snapdir / "join",
                from_host=args.from_peer,
                hot=hot,
                warm=args.warm,
                batch=args.batch,
                progress=progress,
                own_store=into == settings.storage.database_url,
            )
            t_base = time.perf_counter()
            if into == settings.storage.database_url:
                # The store's own log starts here: the next (incremental) audit starts from this snapshot.
                base = await asyncio.to_thread(write_snapshot, target, snapdir, host=settings.host_id)
                mark_verified(base, host=settings.host_id)
            timing["base_snapshot_s"] = round(time.perf_counter() - t_base, 3)
            return result
        finally:
            t1 = time.perf_counter()
            if bars:
                list(bars.values())[-1].close()
            await bus.close()
            if hot is not None:
                await hot.close()
            target.close()
            timing["close_s"] = round(time.perf_counter() - t1, 3)

    try:
        if args.from_peer is not None:
            validate_origin(args.from_peer)
        result = asyncio.run(run())
    except InvalidArgument as e:
        return fail(f"join: {e.message}", 2)
    except MFHError as e:
        return fail(f"join: {e}", exit_code(e))
    if args.json:
        print(json.dumps({**result.as_dict(), **timing, "into": display_url(into)}))
    else:
        what = f"{result.items} rows of {result.snapshot}" if result.snapshot else "no snapshot (the whole stream)"
        print(
            f"joined from {what}, then {result.events} events of the stream (seq {result.stream_from}.."
            f"{result.stream_upto}) into {display_url(into)} in {result.seconds:.2f} s (fetch {result.fetch_s:.2f} s, "
            f"restore {result.restore_s:.2f} s, catch-up {result.catch_up_s:.2f} s, "
            f"search index {result.index_s:.2f} s, warm {result.warm_s:.2f} s)",
            file=sys.stderr,
        )
        for name, why in result.skipped.items():
            print(f"skipped {name}: {why}", file=sys.stderr)
        print(result.checksum)
    if args.expect and args.expect != result.checksum:
        return fail(f"join: checksum {result.checksum} differs from the expected {args.expect}", 1)
    return 0


def register(subparsers: Any) -> None:
    join = subparsers.add_parser(
        "join",
        help="rebuild this (empty) host from a peer's shared snapshot plus the stream after it",
        description=__doc__.split("\n\n", 1)[1].split("\n\n", 1)[0] if __doc__ else None,
    )
    join.add_argument("--from-peer", metavar="HOST", help="the peer whose snapshot to restore (default: the newest)")
    join.add_argument(
        "--into",
        metavar="DATABASE_URL",
        help="an empty database (default: this host's own store; another one leaves the host's consumer alone)",
    )
    join.add_argument(
        "--warm", type=non_negative_int, default=10_000, help="rows put in this host's Redis (default: 10000)"
    )
    join.add_argument("--expect", metavar="CHECKSUM", help="the checksum the result must equal")
    join.add_argument("--batch", type=positive_int, default=5000, help="events per transaction (default: 5000)")
    join.add_argument("--quiet", action="store_true", help="no progress bar")
    join.add_argument("--json", action="store_true", help="print the result as one JSON object")
    join.set_defaults(func=_join)
