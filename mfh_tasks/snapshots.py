"""Snapshot files: every item row of a store as of one read view, and the event watermark it covers.

A file ``snapshot-<host>-<stamp>.jsonl.gz`` is gzipped JSON lines: a header, then one line per item
row with every column (``namespace, key, kind, payload, version, origin, deleted, updated_at,
schema_version``), tombstones included, in key order. The header (format 2)::

    {"checksum", "items", "taken_at", "host",          # as in format 1
     "format": 2, "watermark": <events seq>, "watermark_event_id": <id or null>, "events": <count>,
     "stream_seq": <first stream sequence the snapshot may lack, or null>}

``watermark`` is the highest events-table ``seq`` in the view; the view is fenced
(:meth:`mfh_core.SqlStore.snapshot`), so the events the snapshot lacks are exactly those with a
higher seq in the same store. ``stream_seq`` (when the host replicates) is the first JetStream
sequence whose event the snapshot may lack: one past its replicator's ack floor, read before the view
was opened, so every event on the stream below it is in the snapshot (own events are committed before
they are published; remote ones are applied before they are acked). A host joining from this snapshot
catches up from the stream at ``stream_seq`` (mfh_tasks.join). Format-1 files (no ``kind``, no
watermark) are listed but not restorable.

Beside each one, ``snapshot-<host>-<stamp>.lines.gz`` holds its rows' checksum lines (what
:func:`mfh_models.items_checksum` hashes), in order: the incremental audit merges the rows the
events after the watermark changed into them instead of loading every row into a table, so its cost
grows with those events, not with the store (:func:`read_checksum_lines`, :func:`merged_checksum`).

``snapshot-verified-<host>.json`` names the newest snapshot an audit proved equal to the replay of
the log up to its watermark: the incremental audit starts from it, and pruning never removes it.
"""

from __future__ import annotations

import gzip
import heapq
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mfh_core import SqlStore
from mfh_models import ChecksumRow, InvalidArgument, Kind, Record, checksum_line, checksum_order, lines_checksum

__all__ = [
    "FORMAT",
    "ROW_COLUMNS",
    "SnapshotHeader",
    "iter_snapshot_rows",
    "lines_path",
    "mark_verified",
    "merged_checksum",
    "read_checksum_lines",
    "read_header",
    "snapshots_of",
    "verified_snapshot",
    "verify_snapshot_file",
    "write_snapshot",
]

log = logging.getLogger("mfh.snapshots")

FORMAT = 2
_BATCH = 5000


@dataclass(frozen=True, slots=True)
class SnapshotHeader:
    path: Path
    checksum: str
    items: int
    taken_at: str
    host: str
    format: int
    watermark: int | None
    watermark_event_id: str | None
    events: int | None
    stream_seq: int | None = None

    @property
    def restorable(self) -> bool:
        return self.format >= 2 and self.watermark is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "checksum": self.checksum,
            "items": self.items,
            "taken_at": self.taken_at,
            "host": self.host,
            "format": self.format,
            "watermark": self.watermark,
            "watermark_event_id": self.watermark_event_id,
            "events": self.events,
            "stream_seq": self.stream_seq,
            "bytes": self.path.stat().st_size if self.path.exists() else None,
        }


def snapshots_of(directory: Path, host: str) -> list[Path]:
    """This host's snapshot files in ``directory``, oldest first (another host's never match)."""
    pattern = re.compile(rf"snapshot-{re.escape(host)}-\d{{8}}T\d{{9}}Z\.jsonl\.gz")
    return sorted(p for p in directory.glob(f"snapshot-{host}-*.jsonl.gz") if pattern.fullmatch(p.name))


def _stamp(now: float) -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1000) % 1000:03d}Z"


def write_snapshot(sql: SqlStore, directory: Path, *, host: str, stream_seq: int | None = None) -> SnapshotHeader:
    """Write every item row of one fenced read view, headed by its checksum and watermark.

    ``stream_seq``: read by the caller before this opens its view (see the module docstring)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"snapshot-{host}-{_stamp(time.time())}.jsonl.gz"
    tmp = final.with_suffix(".tmp")
    with sql.snapshot(fenced=True) as snap:
        watermark, watermark_id = snap.watermark()
        events = snap.counts()["events"]
        rows: list[Record] = [r for chunk in snap.iter_records(batch=_BATCH) for r in chunk]
    rows.sort(key=lambda r: (r.namespace.encode(), r.key.encode()))  # byte order, as the checksum
    lines = [checksum_line(_checksum_row(r)) for r in rows]
    checksum = lines_checksum(lines)
    head = {
        "checksum": checksum,
        "items": len(rows),
        "taken_at": final.name.removeprefix(f"snapshot-{host}-").removesuffix(".jsonl.gz"),
        "host": host,
        "format": FORMAT,
        "watermark": watermark,
        "watermark_event_id": watermark_id,
        "events": events,
        "stream_seq": stream_seq,
    }
    sidecar = lines_path(final)
    sidecar_tmp = sidecar.with_suffix(".tmp")
    with gzip.open(sidecar_tmp, "wt", encoding="utf-8", compresslevel=6) as out:
        out.writelines(lines)
    sidecar_tmp.rename(sidecar)  # before the snapshot: a snapshot's lines are there once it is
    with gzip.open(tmp, "wt", encoding="utf-8") as out:
        out.write(json.dumps(head) + "\n")
        for r in rows:
            out.write(json.dumps(_row_dict(r), separators=(",", ":")) + "\n")
    tmp.rename(final)
    return _header(final, head)


def lines_path(snapshot: Path) -> Path:
    """The checksum-lines file beside a snapshot file."""
    return snapshot.with_name(snapshot.name.removesuffix(".jsonl.gz") + ".lines.gz")


def read_checksum_lines(head: SnapshotHeader) -> list[str] | None:
    """The snapshot's checksum lines, in order, if its lines file is there and hashes to the header's
    checksum; None otherwise (an older snapshot, or a damaged file: the caller loads the rows)."""
    path = lines_path(head.path)
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return None
    except (OSError, EOFError, ValueError) as e:
        log.warning("%s is unreadable (%s): the audit loads the snapshot's rows instead", path.name, e)
        return None
    if len(lines) != head.items or lines_checksum(lines) != head.checksum:
        log.warning("%s does not match %s: the audit loads the snapshot's rows instead", path.name, head.path.name)
        return None
    return lines


def merged_checksum(base: Sequence[str], changed: Iterable[ChecksumRow]) -> str:
    """The checksum of ``base`` (a snapshot's checksum lines) after upserting ``changed`` rows into it
    under the store's rule: per key, the row with the greater (version, origin) stays."""
    new: dict[tuple[str, str], tuple[int, str, str]] = {
        (r.namespace, r.key): (r.version, r.origin, checksum_line(r)) for r in changed
    }

    kept = []
    for line in base:
        namespace, key, version, origin, _ = line.split("\t", 4)
        mine = new.pop((namespace, key), None)
        kept.append(line if mine is None or (mine[0], mine[1]) <= (int(version), origin) else mine[2])
    if not new:
        return lines_checksum(kept)
    added = sorted((v[2] for v in new.values()), key=checksum_order)  # keys the base lacks
    return lines_checksum(heapq.merge(kept, added, key=checksum_order))


def _row_dict(r: Record) -> dict[str, Any]:
    return {
        "namespace": r.namespace,
        "key": r.key,
        "kind": r.kind.value,
        "payload": r.payload,
        "version": r.version,
        "origin": r.origin,
        "deleted": r.deleted,
        "updated_at": r.updated_at,
        "schema_version": r.schema_version,
    }


def _checksum_row(r: Record) -> ChecksumRow:
    return ChecksumRow(r.namespace, r.key, r.version, r.origin, r.deleted, r.payload)


def _header(path: Path, head: dict[str, Any]) -> SnapshotHeader:
    try:
        return SnapshotHeader(
            path=path,
            checksum=str(head["checksum"]),
            items=int(head["items"]),
            taken_at=str(head.get("taken_at", "")),
            host=str(head.get("host", "")),
            format=int(head.get("format", 1)),
            watermark=None if head.get("watermark") is None else int(head["watermark"]),
            watermark_event_id=head.get("watermark_event_id"),
            events=None if head.get("events") is None else int(head["events"]),
            stream_seq=None if head.get("stream_seq") is None else int(head["stream_seq"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidArgument(f"{path} is not a snapshot file: its header lacks {e}") from None


def read_header(path: Path) -> SnapshotHeader:
    """The header of a snapshot file (raises InvalidArgument when it is not one)."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            head = json.loads(f.readline())
    except FileNotFoundError:
        raise InvalidArgument(f"no snapshot file {path}") from None
    except (OSError, EOFError, ValueError) as e:
        raise InvalidArgument(f"{path} is not a snapshot file: {e}") from None
    if not isinstance(head, dict):
        raise InvalidArgument(f"{path} is not a snapshot file")
    return _header(path, head)


#: Item columns in the order of a snapshot row tuple (and of ``SqlStore.import_item_rows``).
ROW_COLUMNS = ("namespace", "key", "kind", "payload", "version", "origin", "deleted", "updated_at", "schema_version")


def iter_snapshot_rows(path: Path, *, batch: int = _BATCH) -> Iterator[list[tuple[Any, ...]]]:
    """The item rows of a format-2 snapshot as tuples in :data:`ROW_COLUMNS` order, in lists of up to ``batch``."""
    _require_restorable(path)
    out: list[tuple[Any, ...]] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            f.readline()
            for line in f:
                d = json.loads(line)
                kind = Kind(d["kind"]).value
                out.append(
                    (
                        str(d["namespace"]),
                        str(d["key"]),
                        kind,
                        str(d["payload"]),
                        int(d["version"]),
                        str(d["origin"]),
                        bool(d["deleted"]),
                        int(d["updated_at"]),
                        int(d["schema_version"]),
                    )
                )
                if len(out) >= batch:
                    yield out
                    out = []
    except (OSError, EOFError, ValueError, KeyError) as e:
        raise InvalidArgument(f"{path.name} is damaged: {type(e).__name__}: {e}") from None
    if out:
        yield out


def verify_snapshot_file(path: Path) -> SnapshotHeader:
    """Check a restorable snapshot file against its own header without loading it anywhere: every row
    readable, no key twice, no tab or newline in a name, the row count and the checksum the header's.
    Raises InvalidArgument naming what is wrong (a damaged or forged file); returns the header."""
    head = _require_restorable(path)
    lines: list[str] = []
    seen: set[tuple[str, str]] = set()
    for rows in iter_snapshot_rows(path):
        for ns, key, _kind, payload, version, origin, deleted, _u, _s in rows:
            if any(c in ns or c in key for c in "\t\n") or (ns, key) in seen:
                raise InvalidArgument(f"{path.name} is damaged: a bad or repeated key in namespace {ns[:40]!r}")
            seen.add((ns, key))
            lines.append(checksum_line(ChecksumRow(ns, key, version, origin, deleted, payload)))
    if len(lines) != head.items:
        raise InvalidArgument(f"{path.name}: {len(lines)} rows, but its header says {head.items}: the file is damaged")
    lines.sort(key=checksum_order)
    got = lines_checksum(lines)
    if got != head.checksum:
        raise InvalidArgument(
            f"{path.name}: its rows give checksum {got[:16]}..., its header says {head.checksum[:16]}...: "
            "the file is damaged"
        )
    return head


def _require_restorable(path: Path) -> SnapshotHeader:
    head = read_header(path)
    if not head.restorable:
        raise InvalidArgument(
            f"{path.name} is a format-{head.format} snapshot (no kind, updated_at or watermark): it cannot rebuild "
            "a store; take a new one with `mfh snapshot`, or rebuild from the whole log with `mfh replay`"
        )
    return head


def _verified_path(directory: Path, host: str) -> Path:
    return directory / f"snapshot-verified-{host}.json"


def mark_verified(header: SnapshotHeader, *, host: str) -> None:
    """Record that an audit proved ``header``'s snapshot equal to the replay of the log up to its watermark."""
    path = _verified_path(header.path.parent, host)
    tmp = path.with_suffix(".tmp")
    record = {**header.as_dict(), "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def verified_snapshot(directory: Path, host: str) -> SnapshotHeader | None:
    """The newest snapshot an audit verified, if its file is still there."""
    path = _verified_path(directory, host)
    try:
        name = json.loads(path.read_text())["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    snap = directory / str(name)
    if not snap.exists():
        return None
    try:
        head = read_header(snap)
    except InvalidArgument:
        return None
    return head if head.restorable else None
