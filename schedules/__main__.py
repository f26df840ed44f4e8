"""``python -m schedules run|audit|snapshot``: what ``mfh scheduler|audit|snapshot`` execute.

A composition root of its own (``mfh_api`` may not import ``schedules``): settings come from
MFH_HOST and MFH_CONFIG_DIR, as for the Dramatiq worker.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from mfh_core.redaction import install_redaction
from mfh_models import ConfigError, MFHError, Settings, load_settings
from mfh_tasks import build_sql_store
from schedules.jobs import audit, snapshot
from schedules.runner import run_scheduler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schedules", description=__doc__)
    parser.add_argument("job", choices=["run", "audit", "snapshot"])
    args = parser.parse_args(argv)
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
        return _once(args.job, settings)
    except MFHError as e:  # a store that is down or not current: one line, not a traceback
        print(f"mfh: {args.job}: {e}", file=sys.stderr)
        return 1


def _once(job: str, settings: Settings) -> int:
    sch = settings.scheduler
    sql = build_sql_store(settings)
    try:
        if job == "audit":
            result = audit(sql, host=settings.host_id, report_dir=Path(sch.snapshot_dir))
            print(result.to_json())
            return 0 if result.ok else 1
        print(snapshot(sql, Path(sch.snapshot_dir), host=settings.host_id, keep=sch.snapshot_keep))
        return 0
    finally:
        sql.close()


if __name__ == "__main__":
    sys.exit(main())
