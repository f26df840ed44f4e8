"""``python -m schedules run|audit|snapshot``: what ``mfh scheduler|audit|snapshot`` execute.

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

from mfh_core.redaction import install_redaction, redact_text
from mfh_models import ConfigError, MFHError, Settings, load_settings
from mfh_tasks import build_sql_store
from schedules.jobs import audit, snapshot
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


class _NotTheResult(logging.Filter):
    """Drops the audit's own result line: the one-shot command prints the result itself, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.msg.startswith("replay audit:") if isinstance(record.msg, str) else True


def _one_shot(job: str, settings: Settings, as_json: bool) -> int:
    sql = build_sql_store(settings)
    try:
        directory = Path(settings.scheduler.snapshot_dir)
        if job == "audit":
            result = audit(sql, host=settings.host_id, report_dir=directory)
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
        path = snapshot(sql, directory, host=settings.host_id, keep=settings.scheduler.snapshot_keep)
        with gzip.open(path, "rt", encoding="utf-8") as f:
            head: dict[str, Any] = json.loads(f.readline())
        doc = {"path": str(path), **head}
        print(json.dumps(doc, sort_keys=True) if as_json else f"{path}  {head['items']} items  {head['checksum']}")
        return 0
    finally:
        sql.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schedules", description=__doc__)
    parser.add_argument("job", choices=["run", "audit", "snapshot"])
    parser.add_argument("--json", action="store_true", help="audit, snapshot: the result as one JSON document")
    args = parser.parse_args(argv)
    # The scheduler logs its work; a one-shot job prints its result and logs only warnings and errors.
    level = logging.INFO if args.job == "run" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s", force=True)
    if args.job != "run":
        logging.getLogger("mfh.schedules").addFilter(_NotTheResult())
    install_redaction()
    try:
        settings = load_settings()
        install_redaction(settings)
        if args.job == "run":
            asyncio.run(run_scheduler(settings))
            return 0
        return _one_shot(args.job, settings, args.json)
    except ConfigError as e:
        print(f"mfh: {e}", file=sys.stderr)
        return 2
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
