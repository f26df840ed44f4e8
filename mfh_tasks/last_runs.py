"""The newest snapshot and the last replay audit of a host, read from where the scheduler writes them.

``mfh status`` and the scheduler's gauges (``mfh_last_snapshot_timestamp_seconds``,
``mfh_last_audit_timestamp_seconds``, ``mfh_last_audit_ok``) read them through these two
functions only, so a change of where snapshots and audits live is a change here.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mfh_core.metrics import LAST_AUDIT, LAST_AUDIT_OK, LAST_SNAPSHOT
from mfh_models import Settings

__all__ = ["AuditRun", "SnapshotRun", "export_last_runs", "last_audit", "last_snapshot"]


@dataclass(frozen=True, slots=True)
class SnapshotRun:
    path: str
    taken_at: float  # unix seconds
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class AuditRun:
    ok: bool
    checked_at: float  # unix seconds
    events: int
    seconds: float
    path: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dir(settings: Settings) -> Path:
    return Path(settings.scheduler.snapshot_dir)


def _snapshot_files(settings: Settings) -> list[Path]:
    """This host's snapshots, oldest first: ``snapshot-<host>-<stamp>.jsonl.gz``, else the older
    unscoped ``snapshot-<stamp>.jsonl.gz`` (another host's never match)."""
    d, host = _dir(settings), settings.host_id
    scoped = re.compile(rf"snapshot-{re.escape(host)}-\d{{8}}T\d+Z\.jsonl\.gz")
    files = sorted(p for p in d.glob(f"snapshot-{host}-*.jsonl.gz") if scoped.fullmatch(p.name))
    if files:
        return files
    return sorted(p for p in d.glob("snapshot-*.jsonl.gz") if _UNSCOPED.fullmatch(p.name))


_UNSCOPED = re.compile(r"snapshot-\d{8}T\d+Z\.jsonl\.gz")


def last_snapshot(settings: Settings) -> SnapshotRun | None:
    """This host's newest snapshot file, or None."""
    for path in reversed(_snapshot_files(settings)):
        try:
            st = path.stat()
        except OSError:
            continue
        return SnapshotRun(path=str(path), taken_at=st.st_mtime, bytes=st.st_size)
    return None


def last_audit(settings: Settings) -> AuditRun | None:
    """This host's ``audit-latest-<host>.json`` (else the older ``audit-latest.json``) as the audit
    job writes it, or None (none yet, or unreadable)."""
    path = _dir(settings) / f"audit-latest-{settings.host_id}.json"
    if not path.exists():
        path = _dir(settings) / "audit-latest.json"
    try:
        data = json.loads(path.read_text())
        checked = calendar.timegm(time.strptime(str(data["checked_at"]), "%Y-%m-%dT%H:%M:%SZ"))
        return AuditRun(
            ok=bool(data["ok"]),
            checked_at=float(checked),
            events=int(data.get("events", 0)),
            seconds=float(data.get("seconds", 0.0)),
            path=str(path),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_last_runs(settings: Settings) -> None:
    """Set the last-snapshot and last-audit gauges from the files."""
    snap = last_snapshot(settings)
    LAST_SNAPSHOT.set(snap.taken_at if snap else 0.0)
    audit = last_audit(settings)
    LAST_AUDIT.set(audit.checked_at if audit else 0.0)
    LAST_AUDIT_OK.set(1.0 if audit and audit.ok else 0.0)
