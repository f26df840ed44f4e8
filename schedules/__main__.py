"""``python -m schedules run|audit|snapshot|prune``: what ``mfh scheduler|audit|snapshot`` execute.

A composition root of its own (``mfh_api`` may not import ``schedules``): settings come from
MFH_HOST and MFH_CONFIG_DIR, as for the Dramatiq worker.

``audit`` and ``snapshot`` print their result once on stdout (a line, or one JSON document with
``--json``); errors are one ``mfh: ...`` line on stderr with the exit codes of ``mfh``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import logging
import sys
from pathlib import Path
from typing import Any

from mfh_core import SqlStore
from mfh_core.jsonlog import configure_json_logging
from mfh_core.redaction import install_redaction, redact_text
from mfh_models import ConfigError, MFHError, Settings, StoreDamaged, load_settings
from mfh_tasks.join import SnapshotSharer
from schedules.jobs import audit, prune_events, snapshot_and_share
from schedules.runner import run_scheduler

#: ``mfh``'s exit codes (mfh_api.commands.EXIT_CODES, which this package may not import).
_EXIT_CODES = {
    "INVALID_ARGUMENT": 2,
    "NOT_FOUND": 3,
    "FAILED_PRECONDITION": 4,
    "UNAVAILABLE": 5,
    "DEADLINE_EXCEEDED": 5,
    "RESOURCE_EXHAUSTED": 5,
    "UNAUTHENTICATED": 6,
}
_STORE_DAMAGED = 7  # corrupt or missing: no retry mends it


class _NotTheResult(logging.Filter):
    """Drops the audit's own result line: the one-shot command prints the result itself, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.msg.startswith("replay audit:") if isinstance(record.msg, str) else True


def _one_shot(job: str, settings: Settings, *, as_json: bool, full: bool) -> int:
    sch = settings.scheduler
    sql = SqlStore(settings.storage.database_url)
    try:
        sql.require_existing()  # a missing file is reported, not created empty
        sql.create_schema()
        directory = Path(sch.snapshot_dir)
        if job == "audit":
            result = audit(sql, host=settings.host_id, report_dir=directory, full=full)
            if as_json:
                print(result.to_json())
            elif result.ok:
                print(
                    f"audit ok: {result.events} events replayed in {result.seconds} s, checksum {result.live_checksum}"
                )
            else:
                print(
                    f"audit MISMATCH: live {result.live_checksum} != replayed {result.replay_checksum} "
                    f"({result.events} events)"
                )
            return 0 if result.ok else 1
        if job == "prune":
            n = prune_events(sql, directory, host=settings.host_id, archive=sch.archive_pruned_events)
            print(json.dumps({"pruned": n}) if as_json else f"pruned {n} events")
            return 0
        r = settings.replication
        path, shared = asyncio.run(_snapshot(sql, directory, settings))
        with gzip.open(path, "rt", encoding="utf-8") as f:
            header: dict[str, Any] = json.loads(f.readline())
        doc = {"path": str(path), **header, "shared": shared}
        where = f"  shared as {shared}" if shared else ("  (not shared)" if r.enabled and r.share_snapshots else "")
        text = f"{path}  {header['items']} items  {header['checksum']}{where}"
        print(json.dumps(doc, sort_keys=True) if as_json else text)
        return 0
    finally:
        sql.close()


async def _snapshot(sql: SqlStore, directory: Path, settings: Settings) -> tuple[Path, str | None]:
    r = settings.replication
    sharer = SnapshotSharer(settings, keep=r.shared_snapshots_keep) if r.enabled and r.share_snapshots else None
    try:
        return await snapshot_and_share(
            sql, directory, host=settings.host_id, keep=settings.scheduler.snapshot_keep, sharer=sharer
        )
    finally:
        if sharer is not None:
            await sharer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schedules", description=__doc__)
    parser.add_argument("job", choices=["run", "audit", "snapshot", "prune"])
    parser.add_argument("--json", action="store_true", help="audit, snapshot, prune: the result as one JSON document")
    parser.add_argument(
        "--full", action="store_true", help="audit: replay the whole log, not from the last verified snapshot"
    )
    args = parser.parse_args(argv)
    if args.job == "run":
        configure_json_logging(process="scheduler")
    else:  # a one-shot job prints its result and logs only warnings and errors
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
        logging.getLogger("mfh.schedules").addFilter(_NotTheResult())
    install_redaction()
    try:
        settings = load_settings()
        install_redaction(settings)
        if args.job == "run":
            asyncio.run(run_scheduler(settings))
            return 0
        return _one_shot(args.job, settings, as_json=args.json, full=args.full)
    except ConfigError as e:
        print(f"mfh: {e}", file=sys.stderr)
        return 2
    except StoreDamaged as e:
        print(f"mfh: {args.job}: {e}", file=sys.stderr)
        return _STORE_DAMAGED
    except MFHError as e:
        print(f"mfh: {args.job}: {e.code}: {e.message}", file=sys.stderr)
        return _EXIT_CODES.get(e.code, 1)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one line, never a traceback (it could quote a payload)
        print(f"mfh: {args.job}: unexpected {type(e).__name__}: {redact_text(str(e))[:200]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
