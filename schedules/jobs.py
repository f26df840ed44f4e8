"""The scheduler's jobs: reconcile lost batches, tombstone expired records, take snapshots, run the replay
audit and, where scheduled, the cross-host audit (once per slot in the cluster: schedules.lease.SlotLease).

Each job is a plain function of its collaborators, so tests and ``mfh`` commands run it directly.
Files carry the host id (``snapshot-<host>-<stamp>.jsonl.gz``, ``audit-latest-<host>.json``,
``audit-history-<host>.jsonl``), so hosts sharing one directory never overwrite or prune each other's.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from mfh_core import Change, HotStore, SqlStore
from mfh_core.metrics import DIRTY_ENTRIES, RECONCILE_REENQUEUED
from mfh_core.sqlstore import Snapshot
from mfh_models import MemoryEvent, MFHError, NotFound, Op, Settings, VersionConflict
from mfh_tasks.enqueue import Send
from mfh_tasks.join import SnapshotSharer
from mfh_tasks.peer_audit import PeerAudit, run_peer_audit
from mfh_tasks.recovery import requeue_dirty
from mfh_tasks.restore import load_snapshot
from mfh_tasks.snapshots import (
    SnapshotHeader,
    lines_path,
    mark_verified,
    merged_checksum,
    read_checksum_lines,
    read_header,
    snapshots_of,
    verified_snapshot,
    write_snapshot,
)
from schedules.lease import SlotLease

__all__ = [
    "AuditResult",
    "audit",
    "audit_paths",
    "audit_peers",
    "expire",
    "iter_archived_events",
    "prune_events",
    "reconcile",
    "snapshot",
    "snapshot_and_share",
    "snapshots_of",
]

log = logging.getLogger("mfh.schedules")

#: The slot leases' job name of the scheduled cross-host audit (keys ``peer_audit.<slot>``).
PEER_AUDIT_JOB: Final = "peer_audit"


async def reconcile(hot: HotStore, send: Send, *, stale_after_s: float, batch: int = 256) -> int:
    """Re-enqueue entries dirty for longer than ``stale_after_s``: their batch was lost or dead-lettered.

    Harmless when the batch was only slow: persisting twice is idempotent (docs/architecture.md invariant 2).
    """
    DIRTY_ENTRIES.set(await hot.dirty_count())
    older_than = int(time.time() * 1000 - stale_after_s * 1000)
    n = await requeue_dirty(hot, send, upto_ms=older_than, batch=batch)
    if n:
        RECONCILE_REENQUEUED.inc(n)
        log.warning("reconcile: re-enqueued %d entries dirty for over %.0f s", n, stale_after_s)
    return n


async def expire(hot: HotStore, sql: SqlStore, send: Send, *, now_ms: int, batch: int = 500) -> int:
    """Tombstone records whose ``expires_at_ms`` has passed, through the normal write path: each is a
    delete staged in Redis with a new version, conditional on the version that expired (a record put
    or refreshed since is left alone), then persisted, logged and replicated like any delete.

    Reads hide an expired record before this runs; the sweep makes the stores say so too, so replay,
    the audits and the other hosts agree. Returns how many tombstones were staged.
    """
    rows = await asyncio.to_thread(sql.expired, now_ms, limit=batch)
    events: list[MemoryEvent] = []
    for namespace, key, version in rows:
        if await hot.get(namespace, key) is None:  # the version check needs the key in Redis
            row = await asyncio.to_thread(sql.get, namespace, key)
            if row is None:
                continue
            await hot.apply(row, from_sql=True)
        try:
            events += await hot.stage_many([Change(Op.DELETE, namespace, key, None, "null", version)])
        except (VersionConflict, NotFound):
            continue  # changed since it expired (a new put, a refresh, a delete): not ours to remove
    for i in range(0, len(events), 256):
        send(events[i : i + 256])
    if events:
        log.info("expiry sweep: %d expired records tombstoned", len(events))
    return len(events)


def snapshot(sql: SqlStore, directory: Path, *, host: str, keep: int = 24, stream_seq: int | None = None) -> Path:
    """Write every item row (tombstones too) with the event watermark it covers (mfh_tasks.snapshots);
    keep this host's newest ``keep``, and always the one the last audit verified. ``stream_seq``: read
    before the call (:meth:`mfh_tasks.join.SnapshotSharer.stream_seq`)."""
    head = write_snapshot(sql, directory, host=host, stream_seq=stream_seq)
    verified = verified_snapshot(directory, host)
    for old in snapshots_of(directory, host)[:-keep]:
        if verified is None or old != verified.path:
            old.unlink()
            lines_path(old).unlink(missing_ok=True)
    log.info("snapshot %s written: %d items, watermark %s", head.path, head.items, head.watermark)
    return head.path


async def snapshot_and_share(
    sql: SqlStore, directory: Path, *, host: str, keep: int, sharer: SnapshotSharer | None
) -> tuple[Path, str | None]:
    """:func:`snapshot`, then its upload to the cluster's bucket when ``sharer`` (mfh_tasks.join) is given and
    the stream position could be read first. Returns the file and the object name (None: not shared)."""
    stream_seq = await sharer.stream_seq() if sharer is not None else None
    path = await asyncio.to_thread(snapshot, sql, directory, host=host, keep=keep, stream_seq=stream_seq)
    if sharer is None or stream_seq is None:
        return path, None
    return path, await sharer.share(read_header(path))


@dataclass(frozen=True, slots=True)
class AuditResult:
    """One audit's verdict (``audit-latest-<host>.json``); fields after ``checked_at`` came with the
    incremental audit: ``mode`` "incremental" (from ``base_snapshot``) or "full" (the whole log)."""

    host: str
    ok: bool
    live_checksum: str
    replay_checksum: str
    events: int
    seconds: float
    checked_at: str
    mode: str = "full"
    base_snapshot: str | None = None
    base_watermark: int = 0
    verified_snapshot: str | None = None  # the newer snapshot this audit proved, if any
    snapshot_mismatch: str | None = None  # a snapshot that differed from the log up to its watermark

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def audit_paths(report_dir: Path, host: str) -> tuple[Path, Path]:
    """This host's audit files: (latest, history)."""
    return report_dir / f"audit-latest-{host}.json", report_dir / f"audit-history-{host}.jsonl"


def _newest_restorable(directory: Path, host: str) -> SnapshotHeader | None:
    for path in reversed(snapshots_of(directory, host)):
        try:
            head = read_header(path)
        except MFHError:
            continue
        if head.restorable:
            return head
    return None


def audit(sql: SqlStore, *, host: str, report_dir: Path | None = None, full: bool = False) -> AuditResult:
    """Rebuild the items table in an empty SQLite and compare checksums with the live one.

    Incremental (the default): start from the latest verified snapshot in ``report_dir`` and apply
    the events after its watermark, so the cost grows with the events since that snapshot: only the
    rows those events write go into the table; the snapshot's checksum lines (its ``.lines.gz``)
    stand for the rest (:func:`mfh_tasks.snapshots.merged_checksum`). A snapshot without them is
    loaded row by row instead. On the
    way it passes the newest snapshot's watermark: if the rebuilt state equals that snapshot, the
    snapshot becomes the verified one (the next audit starts there). ``full``, or no verified
    snapshot: the whole log, archived events first. The live side and the events come from one
    read view, so writes during the audit cannot make it disagree.
    """
    t0 = time.perf_counter()
    events = 0
    base = None if full or report_dir is None else verified_snapshot(report_dir, host)
    newest = None if report_dir is None else _newest_restorable(report_dir, host)
    proved: SnapshotHeader | None = None
    mismatch: str | None = None
    with tempfile.TemporaryDirectory(prefix="mfh-audit-") as tmp:
        target = SqlStore(f"sqlite:///{tmp}/replay.db")
        target.create_schema()
        try:
            with sql.snapshot() as snap:
                if base is not None and base.watermark and snap.event_id_at(base.watermark) != base.watermark_event_id:
                    log.warning("audit: %s was not taken from this store's log; auditing the whole log", base.path.name)
                    base = None
                after = 0
                base_lines = None if base is None else read_checksum_lines(base)
                if base is not None:
                    if base_lines is None:
                        load_snapshot(base.path, target, verify=False)
                    after = base.watermark or 0
                elif report_dir is not None:
                    for chunk in iter_archived_events(report_dir, host):
                        target.apply_batch(chunk, published=True)
                        events += len(chunk)
                live = snap.checksum()
                check = newest
                if check is not None and (
                    (base is not None and check.path == base.path)
                    or (check.watermark or 0) < after
                    or (check.watermark and snap.event_id_at(check.watermark) != check.watermark_event_id)
                ):
                    check = None
                if check is not None:
                    events += _apply(snap, target, after, check.watermark)
                    after = check.watermark or 0
                    if _replayed(target, base_lines) == check.checksum:
                        proved = check
                    else:
                        mismatch = check.path.name
                events += _apply(snap, target, after, None)
            replayed = _replayed(target, base_lines)
        finally:
            target.close()
    result = AuditResult(
        host=host,
        ok=live == replayed and mismatch is None,
        live_checksum=live,
        replay_checksum=replayed,
        events=events,
        seconds=round(time.perf_counter() - t0, 3),
        checked_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        mode="incremental" if base is not None else "full",
        base_snapshot=base.path.name if base is not None else None,
        base_watermark=(base.watermark or 0) if base is not None else 0,
        verified_snapshot=proved.path.name if proved is not None else None,
        snapshot_mismatch=mismatch,
    )
    if proved is not None and result.ok:
        mark_verified(proved, host=host)
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


def _replayed(target: SqlStore, base_lines: list[str] | None) -> str:
    """The rebuilt table's checksum: ``target`` itself, or the base snapshot's lines with its rows merged in."""
    if base_lines is None:
        return target.checksum()
    with target.snapshot() as view:
        return merged_checksum(base_lines, view.iter_items())


def _apply(snap: Snapshot, target: SqlStore, after: int, upto: int | None) -> int:
    n = 0
    chunk: list[MemoryEvent] = []
    for _, e in snap.iter_events_after(after, upto_seq=upto):
        chunk.append(e)
        if len(chunk) >= _CHUNK:
            target.apply_batch(chunk, published=True)
            n += len(chunk)
            chunk = []
    if chunk:
        target.apply_batch(chunk, published=True)
        n += len(chunk)
    return n


_CHUNK = 5000


def prune_events(sql: SqlStore, directory: Path, *, host: str, archive: bool = True) -> int:
    """Delete the events older than the oldest kept snapshot of this store (``scheduler.prune_events``),
    archiving them first to ``events-<host>-<first>-<last>.jsonl.gz`` when ``archive``.

    Every kept snapshot (the verified one included) can still be restored and audited from, since the
    events after its watermark stay; a full replay reads the archives first (:func:`iter_archived_events`).
    """
    with sql.snapshot() as snap:
        marks = []
        for path in snapshots_of(directory, host):
            try:
                head = read_header(path)
            except MFHError:
                continue
            if head.restorable and head.watermark and snap.event_id_at(head.watermark) == head.watermark_event_id:
                marks.append(head.watermark)
    if not marks:
        return 0
    below = min(marks)
    pruned = 0
    for rows in sql.prune_events(below_seq=below, batch=_CHUNK):
        if archive:
            first, last = rows[0][0], rows[-1][0]
            out = directory / f"events-{host}-{first:012d}-{last:012d}.jsonl.gz"
            tmp = out.with_suffix(".tmp")
            with gzip.open(tmp, "wt", encoding="utf-8") as f:
                for seq, e, published in rows:
                    f.write(json.dumps({"seq": seq, "published": published, **e.model_dump(mode="json")}) + "\n")
            tmp.rename(out)
        pruned += len(rows)
    if pruned:
        log.info("pruned %d events below seq %d%s", pruned, below, " (archived)" if archive else "")
    return pruned


async def audit_peers(
    settings: Settings, *, slot: datetime | None = None, lease: SlotLease | None = None
) -> PeerAudit | None:
    """The scheduled ``mfh audit --peers`` (``--repair`` with ``scheduler.peer_audit_repair``): one log line
    with the verdict, a warning when hosts differ or did not answer; None (and a warning, no traceback)
    when NATS does not answer. The verdict is stored as the command stores it (``mfh status``, metrics).

    With ``slot`` (the scheduled minute: :func:`schedules.lease.scheduled_slot`), only the host that takes the
    slot's lease (:class:`schedules.lease.SlotLease`) runs it; on the others it logs who does and returns None.
    Every host of a cluster may so schedule it."""
    if slot is not None:
        lease = lease or SlotLease(settings.replication, host_id=settings.host_id)
        try:
            claim = await lease.claim(PEER_AUDIT_JOB, slot)
        except MFHError as e:
            log.warning("cross-host audit not run: %s", e, extra={"action": "audit_peers", "outcome": "unavailable"})
            return None
        if not claim.won:
            log.info("cross-host audit of %s: run by %s", claim.key, claim.holder,
                     extra={"action": "audit_peers", "outcome": "elsewhere"})  # fmt: skip
            return None
    try:
        result = await run_peer_audit(settings, repair=settings.scheduler.peer_audit_repair)
    except MFHError as e:
        log.warning("cross-host audit not run: %s", e, extra={"action": "audit_peers", "outcome": "unavailable"})
        return None
    v = result.verdict()
    clean = result.exit_code == 0
    log.log(
        logging.INFO if clean else logging.WARNING,
        "cross-host audit %s: %d host(s) %s, %s%s",
        v["id"],
        len(v["hosts"]),
        ",".join(v["hosts"]),
        "equal" if clean else f"{v['differences']} key(s) differ, {len(v['unreachable'])} host(s) unreachable",
        f", {v['repaired']} row(s) re-published" if v["repaired"] else "",
        extra={"action": "audit_peers", "outcome": "ok" if clean else "differs"},
    )
    return result


def iter_archived_events(directory: Path, host: str) -> Iterator[list[MemoryEvent]]:
    """The events :func:`prune_events` archived for this host, oldest first, in lists."""
    pattern = re.compile(rf"events-{re.escape(host)}-\d{{12}}-\d{{12}}\.jsonl\.gz")
    for path in sorted(p for p in directory.glob(f"events-{host}-*.jsonl.gz") if pattern.fullmatch(p.name)):
        chunk: list[MemoryEvent] = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                d.pop("seq", None)
                d.pop("published", None)
                chunk.append(MemoryEvent.model_validate(d))
        if chunk:
            yield chunk
