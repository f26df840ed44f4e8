"""``mfh migrate``: copy one SQL store into another (SQLite to Postgres, or back), checksum verified.

The events keep their commit order and published flags (the outbox relays what was not yet on
JetStream); the items are copied as they are, under the usual version guard. Both are read from one
snapshot of the source, so the copy is of one moment; the target must be empty. The result is
verified with the one checksum (``mfh_models.items_checksum``, docs/architecture.md invariant 7) and by the
event count: a mismatch raises instead of reporting success.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mfh_core import SqlStore
from mfh_models import MFHError
from mfh_tasks.replay import Progress

__all__ = ["CopyMismatch", "CopyResult", "copy_store"]


class CopyMismatch(MFHError):
    """The target does not match the source after the copy (nothing is deleted: inspect, then retry)."""

    code = "DATA_LOSS"


@dataclass(frozen=True, slots=True)
class CopyResult:
    events: int
    items: int
    checksum: str
    seconds: float


def copy_store(
    source: SqlStore, target: SqlStore, *, batch: int = 5000, progress: Progress | None = None
) -> CopyResult:
    """Copy every event and item of ``source`` into the empty ``target``; verify; return what was copied.

    ``progress`` is called with (rows copied so far, rows in total): events first, then items.
    """
    t0 = time.perf_counter()
    with source.snapshot() as snap:
        counts = snap.counts()
        total = counts["events"] + counts["items"]
        checksum = snap.checksum()
        done = 0
        for rows in snap.iter_event_rows(batch=batch):
            target.import_rows(rows, [])
            done += len(rows)
            if progress is not None:
                progress(done, total)
        for records in snap.iter_records(batch=batch):
            target.import_rows([], records)
            done += len(records)
            if progress is not None:
                progress(done, total)
    got = target.counts()
    copied = target.checksum()
    if copied != checksum or got["events"] != counts["events"] or got["items"] != counts["items"]:
        raise CopyMismatch(
            f"the copy does not match its source: items checksum {copied[:12]} against {checksum[:12]}, "
            f"{got['events']}/{counts['events']} events, {got['items']}/{counts['items']} items"
        )
    return CopyResult(counts["events"], counts["items"], checksum, time.perf_counter() - t0)
