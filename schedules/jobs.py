"""The scheduler's jobs: reconcile lost batches, take snapshots, run the replay audit.

Each job is a plain function of its collaborators, so tests and ``mfh`` commands run it directly.
Files carry the host id (``snapshot-<host>-<stamp>.jsonl.gz``, ``audit-latest-<host>.json``,
``audit-history-<host>.jsonl``), so hosts sharing one directory never overwrite or prune each other's.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mfh_core import HotStore, SqlStore
from mfh_core.metrics import DIRTY_ENTRIES, RECONCILE_REENQUEUED
from mfh_models import items_checksum
from mfh_tasks.enqueue import Send
from mfh_tasks.recovery import requeue_dirty

__all__ = ["AuditResult", "audit", "audit_paths", "reconcile", "snapshot", "snapshots_of"]

log = logging.getLogger("mfh.schedules")


async def reconcile(hot: HotStore, send: Send, *, stale_after_s: float, batch: int = 256) -> int:
    """Re-enqueue entries dirty for longer than ``stale_after_s``: their batch was lost or dead-lettered.

    Harmless when the batch was only slow: persisting twice is idempotent (DESIGN.md invariant 2).
    """
    DIRTY_ENTRIES.set(await hot.dirty_count())
    older_than = int(time.time() * 1000 - stale_after_s * 1000)
    n = await requeue_dirty(hot, send, upto_ms=older_than, batch=batch)
    if n:
        RECONCILE_REENQUEUED.inc(n)
        log.warning("reconcile: re-enqueued %d entries dirty for over %.0f s", n, stale_after_s)
    return n


def snapshots_of(directory: Path, host: str) -> list[Path]:
    """This host's snapshot files in ``directory``, oldest first (another host's never match)."""
    pattern = re.compile(rf"snapshot-{re.escape(host)}-\d{{8}}T\d{{9}}Z\.jsonl\.gz")
    return sorted(p for p in directory.glob(f"snapshot-{host}-*.jsonl.gz") if pattern.fullmatch(p.name))


def snapshot(sql: SqlStore, directory: Path, *, host: str, keep: int = 24) -> Path:
    """Write every item (tombstones too) as gzipped JSON lines, headed by the checksum and the host;
    keep this host's newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z"
    final = directory / f"snapshot-{host}-{stamp}.jsonl.gz"
    tmp = final.with_suffix(".tmp")
    with sql.snapshot() as snap:
        rows = sorted(snap.iter_items(), key=lambda r: (r.namespace.encode(), r.key.encode()))
    with gzip.open(tmp, "wt", encoding="utf-8") as out:
        head = {"checksum": items_checksum(rows), "items": len(rows), "taken_at": stamp, "host": host}
        out.write(json.dumps(head) + "\n")
        for r in rows:
            out.write(json.dumps(r._asdict(), separators=(",", ":")) + "\n")
    tmp.rename(final)
    for old in snapshots_of(directory, host)[:-keep]:
        old.unlink()
    log.info("snapshot %s written", final)
    return final


@dataclass(frozen=True, slots=True)
class AuditResult:
    host: str
    ok: bool
    live_checksum: str
    replay_checksum: str
    events: int
    seconds: float
    checked_at: str

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def audit_paths(report_dir: Path, host: str) -> tuple[Path, Path]:
    """This host's audit files: (latest, history)."""
    return report_dir / f"audit-latest-{host}.json", report_dir / f"audit-history-{host}.jsonl"


def audit(sql: SqlStore, *, host: str, report_dir: Path | None = None) -> AuditResult:
    """Replay the event log into an empty SQLite and compare checksums with the live items table.

    Both sides come from one read snapshot, so writes during the audit cannot make it disagree.
    """
    t0 = time.perf_counter()
    events = 0
    with tempfile.TemporaryDirectory(prefix="mfh-audit-") as tmp:
        target = SqlStore(f"sqlite:///{tmp}/replay.db")
        target.create_schema()
        try:
            with sql.snapshot() as snap:
                live = snap.checksum()
                for chunk in snap.iter_events():
                    target.apply_batch(chunk, published=True)
                    events += len(chunk)
            replayed = target.checksum()
        finally:
            target.close()
    result = AuditResult(
        host=host,
        ok=live == replayed,
        live_checksum=live,
        replay_checksum=replayed,
        events=events,
        seconds=round(time.perf_counter() - t0, 3),
        checked_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        latest, history = audit_paths(report_dir, host)
        partial = latest.with_suffix(".tmp")
        partial.write_text(result.to_json() + "\n")
        partial.replace(latest)
        with history.open("a") as f:
            f.write(result.to_json() + "\n")
    (log.info if result.ok else log.error)("replay audit: %s", result.to_json())
    return result
