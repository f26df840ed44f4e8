"""Shared snapshots: a JetStream Object Store bucket each host's scheduler uploads its snapshots to.

The bucket is a stream like the events one (file storage, ``num_replicas`` copies), so a snapshot
outlives the host that took it, and a host rebuilt empty fetches a peer's over the connection it
already has (``mfh join``, mfh_tasks.join). Objects are named ``<host>/<snapshot file name>``; their
headers carry what a joiner needs to choose one without downloading it (host, item count, checksum,
the stream sequence it covers up to) and the sha256 of the file. The Object Store splits a file into
chunks (128 KiB, below NATS's max_payload) and checks the sha256 of all of them on the way back; the
file's own sha256 (a header) and its rows' checksum (:func:`mfh_tasks.snapshots.verify_snapshot_file`)
are checked again by the joiner, so a chunk damaged or replaced anywhere is refused.

Who may write the bucket is who may publish on the stream: give the hub hosts' NATS users
``$O.<bucket>.>`` (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.js.errors
from nats.js.api import ObjectMeta, ObjectStoreConfig, StorageType
from nats.js.object_store import ObjectStore

from mfh_core.jetstream import NATS_ERRORS, translate_error
from mfh_core.nats_connection import NatsConnection
from mfh_models import InvalidArgument, NotFound, Unavailable

__all__ = ["SharedSnapshot", "SnapshotBucket", "bucket_name", "file_sha256"]

log = logging.getLogger("mfh.snapshots")

_HEADERS = ("Mfh-Host", "Mfh-Items", "Mfh-Checksum", "Mfh-Stream-Seq", "Mfh-Taken-At", "Mfh-Sha256")
_HOST = r"[a-z][a-z0-9_\-]{0,31}"
_NAME = re.compile(rf"({_HOST})/snapshot-({_HOST})-\d{{8}}T\d{{9}}Z\.jsonl\.gz")


def bucket_name(event_topic: str) -> str:
    """The bucket of one cluster's shared snapshots (one per events stream)."""
    return f"{event_topic}_snapshots"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class SharedSnapshot:
    """One object of the bucket, as its headers describe it (checked again once fetched)."""

    name: str
    host: str
    items: int
    checksum: str
    stream_seq: int
    taken_at: str
    sha256: str
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "host": self.host,
            "items": self.items,
            "checksum": self.checksum,
            "stream_seq": self.stream_seq,
            "taken_at": self.taken_at,
            "bytes": self.size,
        }


def _header(headers: Any, name: str) -> str:
    value = headers.get(name) if isinstance(headers, dict) else None
    if isinstance(value, list):  # the Go client's form: a header holds a list of values
        value = value[0] if value else None
    if not isinstance(value, str) or not value or len(value) > 256:
        raise ValueError(f"header {name} missing or malformed")
    return value


def _describe(info: Any) -> SharedSnapshot:
    """The object's description, or ValueError when it is not a shared snapshot (foreign or forged)."""
    name = str(info.name or "")
    m = _NAME.fullmatch(name)
    if m is None or m.group(1) != m.group(2):
        raise ValueError("not a snapshot name")
    h = info.headers
    snap = SharedSnapshot(
        name=name,
        host=_header(h, "Mfh-Host"),
        items=int(_header(h, "Mfh-Items")),
        checksum=_header(h, "Mfh-Checksum"),
        stream_seq=int(_header(h, "Mfh-Stream-Seq")),
        taken_at=_header(h, "Mfh-Taken-At"),
        sha256=_header(h, "Mfh-Sha256"),
        size=int(info.size or 0),
    )
    if name.split("/", 1)[0] != snap.host or snap.items < 0 or snap.stream_seq < 1 or snap.size <= 0:
        raise ValueError("headers disagree with the name")
    return snap


class SnapshotBucket:
    """Upload, list and fetch shared snapshots; takes the connection it uses (the caller's event bus)."""

    def __init__(self, conn: NatsConnection, *, bucket: str, num_replicas: int = 1, timeout_s: float = 120.0) -> None:
        self.conn = conn
        self.bucket = bucket
        self.num_replicas = num_replicas
        self.timeout_s = timeout_s

    async def _store(self, *, create: bool) -> ObjectStore:
        js = self.conn.jetstream()
        try:
            try:
                return await js.object_store(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    raise NotFound(f"no shared snapshots: bucket {self.bucket} does not exist") from None
                cfg = ObjectStoreConfig(
                    description="MFH snapshots, one per host per snapshot run (mfh join)",
                    storage=StorageType.FILE,
                    replicas=self.num_replicas,
                )
                return await js.create_object_store(self.bucket, config=cfg)
        except (*NATS_ERRORS, ValueError) as e:
            raise translate_error(e, f"snapshot bucket {self.bucket}") from e

    async def put(self, path: Path, *, host: str, items: int, checksum: str, stream_seq: int, taken_at: str) -> str:
        """Upload a snapshot file; returns its object name."""
        name = f"{host}/{path.name}"
        digest = await asyncio.to_thread(file_sha256, path)
        values = (host, str(items), checksum, str(stream_seq), taken_at, digest)
        meta = ObjectMeta(name=name, headers={k: [v] for k, v in zip(_HEADERS, values, strict=True)})
        store = await self._store(create=True)
        try:
            with path.open("rb") as f:
                await asyncio.wait_for(store.put(name, f, meta=meta), self.timeout_s)
        except (*NATS_ERRORS, TimeoutError, ValueError) as e:
            raise translate_error(e, f"uploading {name} to {self.bucket}") from e
        return name

    async def list(self) -> list[SharedSnapshot]:
        """Every shared snapshot, newest stream position first; objects that are not one are skipped (logged)."""
        try:
            store = await self._store(create=False)
        except NotFound:
            return []
        try:
            infos = await asyncio.wait_for(store.list(ignore_deletes=True), self.timeout_s)
        except nats.js.errors.NotFoundError:
            return []
        except (*NATS_ERRORS, TimeoutError, ValueError) as e:
            raise translate_error(e, f"listing {self.bucket}") from e
        out = []
        for info in infos:
            try:
                out.append(_describe(info))
            except (ValueError, TypeError) as e:
                log.warning("bucket %s: object %.80r skipped: %s", self.bucket, str(info.name), e)
        return sorted(out, key=lambda s: (s.stream_seq, s.taken_at), reverse=True)

    async def fetch(self, snap: SharedSnapshot, dest: Path) -> Path:
        """Download ``snap`` to ``dest``, checked against the Object Store's digest and its own sha256 header;
        InvalidArgument (and no file) when either differs, Unavailable when it does not arrive in time."""
        store = await self._store(create=False)
        part = dest.with_name(dest.name + ".part")
        try:
            with part.open("wb") as f:
                await asyncio.wait_for(store.get(snap.name, writeinto=f), self.timeout_s)
            got = await asyncio.to_thread(file_sha256, part)
            if got != snap.sha256:
                raise InvalidArgument(
                    f"{snap.name}: its bytes hash to {got[:16]}..., its header says {snap.sha256[:16]}..."
                )
            part.rename(dest)
            return dest
        except nats.js.errors.DigestMismatchError:
            raise InvalidArgument(f"{snap.name}: a chunk is damaged (the object's digest does not match)") from None
        except nats.js.errors.ObjectNotFoundError:
            raise NotFound(f"{snap.name} is no longer in {self.bucket}") from None
        except TimeoutError:
            raise Unavailable(f"{snap.name} did not arrive within {self.timeout_s:.0f} s") from None
        except (*NATS_ERRORS, ValueError) as e:
            raise translate_error(e, f"fetching {snap.name}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()

    async def prune(self, host: str, *, keep: int) -> int:
        """Delete ``host``'s shared snapshots but its newest ``keep``; returns how many went."""
        mine = [s for s in await self.list() if s.host == host]
        mine.sort(key=lambda s: s.name, reverse=True)  # the name holds the time it was taken
        store = await self._store(create=False)
        gone = 0
        for old in mine[keep:]:
            try:
                await asyncio.wait_for(store.delete(old.name), self.timeout_s)
                gone += 1
            except (*NATS_ERRORS, TimeoutError) as e:
                log.warning("bucket %s: %s not deleted: %s", self.bucket, old.name, type(e).__name__)
        return gone
