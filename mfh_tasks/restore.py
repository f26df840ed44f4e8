"""Restore: rebuild a store from a snapshot file plus the events after its watermark.

The snapshot's rows go in as they are (every column), then the events come through
``SqlStore.apply_batch``, the one write path: idempotent and order-insensitive (docs/architecture.md
invariant 2), so an event the snapshot already holds changes nothing. The result is checked:

- the rows loaded must give the snapshot header's checksum (the file is intact);
- with ``events_from`` (the events table of the store the snapshot was taken from, or of a copy
  of it), the events after the watermark and the source's live checksum come from one read view,
  and the rebuilt checksum must equal it;
- from the stream there is no live checksum to compare with: the caller may pass ``expect``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from mfh_core import SqlStore
from mfh_core.eventbus import EventBus
from mfh_models import InvalidArgument, MemoryEvent
from mfh_tasks.replay import Progress
from mfh_tasks.snapshots import SnapshotHeader, iter_snapshot_rows, read_header

__all__ = ["RestoreResult", "load_snapshot", "restore_from_sql", "restore_from_stream", "restore_snapshot_only"]


@dataclass(frozen=True, slots=True)
class RestoreResult:
    snapshot: str
    items: int  # rows loaded from the snapshot
    events: int  # events applied after it
    checksum: str  # of the rebuilt store
    expected: str | None  # what it had to equal (None: nothing to compare with)
    seconds: float

    @property
    def ok(self) -> bool:
        return self.expected is None or self.expected == self.checksum

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


def load_snapshot(path: Path, target: SqlStore, *, verify: bool = True) -> tuple[SnapshotHeader, int]:
    """Copy a format-2 snapshot's rows into ``target``; with ``verify``, raises InvalidArgument when
    they do not give the header's checksum (a damaged file). Returns (header, rows loaded).

    The audit loads without ``verify``: its own final comparison with the live checksum covers it."""
    head = read_header(path)
    n = 0
    for rows in iter_snapshot_rows(path):
        target.import_item_rows(rows)
        n += len(rows)
    if n != head.items:
        raise InvalidArgument(f"{path.name}: {n} rows, but its header says {head.items}: the file is damaged")
    if not verify:
        return head, n
    got = target.checksum()
    if got != head.checksum:
        raise InvalidArgument(
            f"{path.name}: {n} rows with checksum {got[:16]}..., but its header says {head.items} rows, "
            f"{head.checksum[:16]}...: the file is damaged"
        )
    return head, n


def _batches(events: Iterator[tuple[int, MemoryEvent]], size: int) -> Iterator[list[MemoryEvent]]:
    batch: list[MemoryEvent] = []
    for _, e in events:
        batch.append(e)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def restore_snapshot_only(path: Path, target: SqlStore) -> RestoreResult:
    """The store exactly as the snapshot saw it ("yesterday's state"), checked against its header."""
    t0 = time.perf_counter()
    head, n = load_snapshot(path, target)
    return RestoreResult(path.name, n, 0, head.checksum, head.checksum, round(time.perf_counter() - t0, 3))


def restore_from_sql(
    path: Path, target: SqlStore, source: SqlStore, *, batch: int = 5000, progress: Progress | None = None
) -> RestoreResult:
    """The snapshot plus ``source``'s events after its watermark; must give ``source``'s live checksum.

    ``source`` must be the store the snapshot was taken from (or a copy of it): event seqs are per
    store, so the event at the watermark must be the one the snapshot names.
    """
    t0 = time.perf_counter()
    head, n = load_snapshot(path, target)
    assert head.watermark is not None  # load_snapshot refuses format 1
    done = 0
    with source.snapshot() as view:
        if head.watermark and view.event_id_at(head.watermark) != head.watermark_event_id:
            raise InvalidArgument(
                f"{path.name} was not taken from this events table: its watermark event "
                f"(seq {head.watermark}, {head.watermark_event_id}) is not there; use a snapshot of that store, "
                "or `mfh replay` its whole log"
            )
        total = max(view.counts()["events"] - (head.events or 0), 0)
        for events in _batches(view.iter_events_after(head.watermark, batch=batch), batch):
            target.apply_batch(events, published=True)
            done += len(events)
            if progress is not None:
                progress(done, total)
        live = view.checksum()
    return RestoreResult(path.name, n, done, target.checksum(), live, round(time.perf_counter() - t0, 3))


async def restore_from_stream(
    path: Path,
    target: SqlStore,
    bus: EventBus,
    *,
    expect: str | None = None,
    batch: int = 5000,
    progress: Progress | None = None,
) -> RestoreResult:
    """The snapshot plus every event on the stream (as of the call).

    Stream sequences are not events-table seqs, so the whole stream is applied: events the snapshot
    already holds change nothing (invariant 2); the cost grows with the stream, which its
    ``max_age`` bounds. ``expect``: the checksum the result must equal (another host's ``mfh checksum``).
    """
    t0 = time.perf_counter()
    head, n = await asyncio.to_thread(load_snapshot, path, target)
    total = int((await bus.stream_info())["messages"])
    done = 0
    buf: list[MemoryEvent] = []
    async for event in bus.iter_stream(batch=min(batch, 1000)):
        buf.append(event)
        if len(buf) >= batch:
            await asyncio.to_thread(target.apply_batch, buf, published=True)
            done += len(buf)
            buf = []
            if progress is not None:
                progress(done, total)
    if buf:
        await asyncio.to_thread(target.apply_batch, buf, published=True)
        done += len(buf)
    checksum = await asyncio.to_thread(target.checksum)
    del head
    return RestoreResult(path.name, n, done, checksum, expect, round(time.perf_counter() - t0, 3))
