"""``mfh db upgrade``, ``mfh db status`` and ``mfh migrate``: the SQL store's schema and its moves.

Every process checks at start that its store is at the newest migration and refuses otherwise,
naming ``mfh db upgrade``; a brand-new empty database is created at head by whichever process
comes first. ``mfh migrate --from URL --to URL`` copies a store into an empty one (docs/operations.md,
"Moving a host from SQLite to Postgres").
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mfh_api.commands import exit_code, fail, settings_from
from mfh_models import MFHError

__all__ = ["register"]


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return n


def _target_url(args: argparse.Namespace) -> str:
    return str(args.url) if getattr(args, "url", None) else settings_from(args).storage.database_url


def _upgrade(args: argparse.Namespace) -> int:
    from mfh_core import SqlStore
    from mfh_core.sqlstore import display_url

    url = _target_url(args)
    try:
        store = SqlStore(url)
        try:
            before, after = store.upgrade_schema()
        finally:
            store.close()
    except MFHError as e:
        return fail(f"db upgrade: {e}", exit_code(e))
    where = display_url(url)
    if before == after:
        print(f"{where}: already at revision {after}")
    else:
        print(f"{where}: upgraded from {before or 'an unversioned schema'} to {after}")
    return 0


def _status(args: argparse.Namespace) -> int:
    from mfh_core import SqlStore
    from mfh_core.sqlstore import display_url

    url = _target_url(args)
    try:
        store = SqlStore(url)
        try:
            state = store.schema_state()
        finally:
            store.close()
    except MFHError as e:
        return fail(f"db status: {e}", exit_code(e))
    print(f"{display_url(url)}: {state.describe()}")
    return 0 if state.current or state.empty else 1


def _migrate(args: argparse.Namespace) -> int:
    from mfh_api.commands.replication import ProgressBar
    from mfh_core import SqlStore
    from mfh_core.sqlstore import display_url
    from mfh_tasks.replay import open_target
    from mfh_tasks.storecopy import copy_store

    bar = None if args.quiet else ProgressBar("migrate", unit="rows")
    try:
        source = SqlStore(args.source)
        try:
            source.create_schema()  # refuses a source that needs `mfh db upgrade` first
            target = open_target(args.target)
            try:
                result = copy_store(source, target, batch=args.batch, progress=bar)
            finally:
                target.close()
                if bar is not None:
                    bar.close()
        finally:
            source.close()
    except MFHError as e:
        return fail(f"migrate: {e}", exit_code(e))
    print(
        f"copied {result.events} events and {result.items} items from {display_url(args.source)} to "
        f"{display_url(args.target)} in {result.seconds:.2f} s; checksums match",
        file=sys.stderr,
    )
    print(result.checksum)
    return 0


def register(subparsers: Any) -> None:
    """Add ``mfh db upgrade|status`` and ``mfh migrate``."""
    db = subparsers.add_parser("db", help="the SQL store's schema: status and upgrade")
    actions = db.add_subparsers(title="db commands", metavar="ACTION")
    for name, func, help_text in (
        ("upgrade", _upgrade, "apply the pending schema migrations to this host's SQL store (or --url)"),
        ("status", _status, "print the schema revision of this host's SQL store (or --url); exit 1 when behind"),
    ):
        p = actions.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--url", metavar="DATABASE_URL", help="another store than this host's: sqlite:///... or postgresql://..."
        )
        p.set_defaults(func=func)

    migrate = subparsers.add_parser(
        "migrate",
        help="copy one SQL store into another, empty one (events and items, checksum verified)",
        description="Copy every event (commit order, published flags) and item of one store into an empty one "
        "and verify the items checksum and the counts. Stop the host's processes first.",
    )
    migrate.add_argument("--from", dest="source", required=True, metavar="DATABASE_URL", help="the store to copy")
    migrate.add_argument("--to", dest="target", required=True, metavar="DATABASE_URL", help="an empty store")
    migrate.add_argument("--batch", type=_positive, default=5000, help="rows per transaction (default: 5000)")
    migrate.add_argument("--quiet", action="store_true", help="no progress bar")
    migrate.set_defaults(func=_migrate)
