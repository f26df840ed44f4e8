"""``python -m schedules run|audit|snapshot|prune``: what ``mfh scheduler|audit|snapshot`` execute.

A composition root of its own (``mfh_api`` may not import ``schedules``): settings come from
MFH_HOST and MFH_CONFIG_DIR, as for the Dramatiq worker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from mfh_core import SqlStore
from mfh_core.jsonlog import configure_json_logging
from mfh_core.redaction import install_redaction
from mfh_models import ConfigError, MFHError, Settings, StoreDamaged, load_settings
from schedules.jobs import audit, prune_events, snapshot
from schedules.runner import run_scheduler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schedules", description=__doc__)
    parser.add_argument("job", choices=["run", "audit", "snapshot", "prune"])
    parser.add_argument(
        "--full", action="store_true", help="audit: replay the whole log, not from the last verified snapshot"
    )
    args = parser.parse_args(argv)
    if args.job == "run":
        configure_json_logging(process="scheduler")
    else:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
    install_redaction()
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"mfh: {e}", file=sys.stderr)
        return 2
    install_redaction(settings)
    try:
        if args.job == "run":
            asyncio.run(run_scheduler(settings))
            return 0
        return _once(args.job, settings, full=args.full)
    except StoreDamaged as e:  # corrupt or missing: no retry mends it (exit code 7, as `mfh`)
        print(f"mfh: {args.job}: {e}", file=sys.stderr)
        return 7
    except MFHError as e:  # a store that is down or not current: one line, not a traceback
        print(f"mfh: {args.job}: {e}", file=sys.stderr)
        return 1


def _once(job: str, settings: Settings, *, full: bool = False) -> int:
    sch = settings.scheduler
    sql = SqlStore(settings.storage.database_url)
    try:
        sql.require_existing()  # a missing file is reported, not created empty
        sql.create_schema()
        if job == "audit":
            result = audit(sql, host=settings.host_id, report_dir=Path(sch.snapshot_dir), full=full)
            print(result.to_json())
            return 0 if result.ok else 1
        if job == "prune":
            n = prune_events(sql, Path(sch.snapshot_dir), host=settings.host_id, archive=sch.archive_pruned_events)
            print(f"pruned {n} events")
            return 0
        print(snapshot(sql, Path(sch.snapshot_dir), host=settings.host_id, keep=sch.snapshot_keep))
        return 0
    finally:
        sql.close()


if __name__ == "__main__":
    sys.exit(main())
