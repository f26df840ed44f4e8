"""The newest snapshot and the last replay audit of a host, read from where the scheduler writes them.

``mfh status`` and the scheduler's gauges (``mfh_last_snapshot_timestamp_seconds``,
``mfh_last_audit_timestamp_seconds``, ``mfh_last_audit_ok``) read them through these two
functions only, so a change of where snapshots and audits live is a change here.
"""

from __future__ import annotations

import calendar
import json
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


def last_snapshot(settings: Settings) -> SnapshotRun | None:
    """The newest ``snapshot-*.jsonl.gz``, or None."""
    files = sorted(_dir(settings).glob("snapshot-*.jsonl.gz"))
    for path in reversed(files):
        try:
            st = path.stat()
        except OSError:
            continue
        return SnapshotRun(path=str(path), taken_at=st.st_mtime, bytes=st.st_size)
    return None


def last_audit(settings: Settings) -> AuditRun | None:
    """``audit-latest.json`` as written by the audit job, or None (none yet, or unreadable)."""
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
