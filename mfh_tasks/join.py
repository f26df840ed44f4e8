"""Join: a host rebuilt empty restores a peer's shared snapshot and catches up from the stream.

Sharing (the scheduler, after each snapshot; ``mfh snapshot``): read the host's replicator ack floor,
then take the snapshot (so every event on the stream below ``stream_seq`` = floor + 1 is in it:
mfh_tasks.snapshots), then upload it to the cluster's snapshot bucket (mfh_core.snapshot_bucket).

Joining (``mfh join``, with the host's processes stopped and its SQL store empty):

1. pick the newest usable snapshot of a peer in the bucket (never the host's own: it may hold
   writes the host acknowledged and never published, which no other host has);
2. fetch it, and check it before anything is written: the Object Store's digest, the file's sha256,
   its rows against its header's checksum, the header against the object's headers;
3. load its rows into the empty store (every column, as ``mfh restore`` does; the search index is
   built once, after the catch-up);
4. apply every event on the stream from the snapshot's ``stream_seq`` to the stream's last sequence
   (events it already holds change nothing, docs/architecture.md invariant 2);
5. point the host's durable consumer (``replicator-<host>``) just past that last sequence, so its
   replicator carries on from there when the host starts, without reading the stream again;
6. warm the host's Redis from SQL: the newest ``warm`` rows, the newest first (which moves the host's
   clock past every restored version; other keys fill on their first read, as after any restart).

A snapshot that fails a check is skipped (logged) and the next one tried; the target stays empty. No
usable snapshot: when the stream still starts at sequence 1 it holds the whole history and is replayed
whole instead; otherwise it is an error that says how to get a snapshot shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from redis.exceptions import RedisError

from mfh_core import ApplyResult, HotStore, SqlStore
from mfh_core.eventbus import EventBus
from mfh_core.jetstream import PULL_EXPIRES_S
from mfh_core.nats_connection import NatsConnection
from mfh_core.snapshot_bucket import SharedSnapshot, SnapshotBucket, bucket_name
from mfh_models import InvalidArgument, MemoryEvent, MFHError, NotFound, Settings, Unavailable
from mfh_tasks.replicator import consumer_name
from mfh_tasks.snapshots import SnapshotHeader, iter_snapshot_rows, verify_snapshot_file

__all__ = ["JoinResult", "SnapshotSharer", "bucket_for", "join_cluster"]

log = logging.getLogger("mfh.join")

#: Called with a stage name and (done, total or None) as a join goes.
JoinProgress = Callable[[str, int, int | None], None]


def bucket_for(settings: Settings, conn: NatsConnection) -> SnapshotBucket:
    """This cluster's snapshot bucket, over ``conn``."""
    r = settings.replication
    return SnapshotBucket(conn, bucket=bucket_name(r.event_topic), num_replicas=r.num_replicas)


class SnapshotSharer:
    """The scheduler's side: where the stream stands for this host, and the upload of a snapshot."""

    def __init__(self, settings: Settings, *, keep: int = 2) -> None:
        self.settings = settings
        self.keep = keep
        self.bus = EventBus.from_settings(settings.replication, name=f"mfh-share-{settings.host_id}")
        self.bucket = bucket_for(settings, self.bus.conn)

    async def stream_seq(self) -> int | None:
        """One past this host's replicator ack floor, or None (NATS down, or no replicator consumer yet)."""
        try:
            await self.bus.connect()
            pos = await self.bus.durable_position(consumer_name(self.settings.host_id))
        except MFHError as e:
            log.warning("snapshot not shared this time: %s", e)
            return None
        if pos is None:
            log.info("snapshot not shared: consumer %s does not exist yet", consumer_name(self.settings.host_id))
            return None
        return pos[0] + 1

    async def share(self, head: SnapshotHeader) -> str | None:
        """Upload a snapshot taken with a ``stream_seq``; the bucket keeps this host's newest ``keep``."""
        if head.stream_seq is None:
            return None
        try:
            name = await self.bucket.put(
                head.path,
                host=self.settings.host_id,
                items=head.items,
                checksum=head.checksum,
                stream_seq=head.stream_seq,
                taken_at=head.taken_at,
            )
            await self.bucket.prune(self.settings.host_id, keep=self.keep)
        except MFHError as e:
            log.warning("snapshot %s not shared: %s", head.path.name, e)
            return None
        log.info("snapshot %s shared as %s (stream seq %d)", head.path.name, name, head.stream_seq)
        return name

    async def close(self) -> None:
        await self.bus.close()


@dataclass
class JoinResult:
    """What ``mfh join`` did, with the time of each stage."""

    source: str  # "snapshot" or "stream" (no usable snapshot, the whole stream replayed)
    snapshot: str | None  # the object restored
    peer: str | None
    items: int  # rows loaded from the snapshot
    events: int  # events applied from the stream
    stream_from: int
    stream_upto: int
    checksum: str
    warmed: int
    prepare_s: float = 0.0  # waiting out a dead replicator's pull requests, reading the stream's bounds
    fetch_s: float = 0.0  # listing, fetching and checking the snapshot
    restore_s: float = 0.0
    catch_up_s: float = 0.0
    index_s: float = 0.0  # the search index of the restored rows, built once after the catch-up
    warm_s: float = 0.0
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # snapshots refused, and why

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


Picked = tuple[SharedSnapshot, SnapshotHeader, Path, float]  # the object, its checked header, the file, fetch s


async def _pick(
    bucket: SnapshotBucket,
    host: str,
    from_host: str | None,
    first_seq: int,
    last_seq: int,
    workdir: Path,
    skipped: dict[str, str],
) -> Picked | None:
    """The first snapshot of a peer that passes every check, fetched; None when none does (``skipped`` says why)."""
    for snap in await bucket.list():
        if snap.host == host or (from_host is not None and snap.host != from_host):
            continue
        if snap.stream_seq < first_seq:
            skipped[snap.name] = f"the stream no longer holds seq {snap.stream_seq} (it starts at {first_seq})"
            continue
        if snap.stream_seq > last_seq + 1:
            skipped[snap.name] = f"it claims stream seq {snap.stream_seq}, past the stream's last ({last_seq})"
            continue
        path = workdir / snap.name.split("/", 1)[1]
        free = (await asyncio.to_thread(shutil.disk_usage, workdir)).free
        if snap.size * 2 > free:  # the file, then the rows in the store
            skipped[snap.name] = f"{snap.size} bytes, and {free} free in {workdir}"
            continue
        t0 = time.perf_counter()
        try:
            await bucket.fetch(snap, path)
            head = await asyncio.to_thread(verify_snapshot_file, path)
            mine = (head.host, head.items, head.checksum, head.stream_seq)
            if mine != (snap.host, snap.items, snap.checksum, snap.stream_seq):
                raise InvalidArgument("its file's header disagrees with the object's headers")
        except (InvalidArgument, NotFound, Unavailable) as e:
            skipped[snap.name] = e.message
            log.warning("join: %s refused: %s", snap.name, e.message)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        return snap, head, path, time.perf_counter() - t0
    return None


async def _catch_up(
    bus: EventBus, target: SqlStore, start: int, upto: int, *, batch: int, progress: JoinProgress | None
) -> int:
    """Apply the stream's events ``start..upto`` to ``target``; writing one batch overlaps reading the next."""
    done = 0
    total = max(upto - start + 1, 0)
    writing: asyncio.Future[ApplyResult] | None = None
    writing_n = 0
    buf: list[MemoryEvent] = []
    async for e in bus.iter_stream(start_seq=start, upto_seq=upto, batch=min(batch, 1000)):
        buf.append(e)
        if len(buf) >= batch:
            if writing is not None:
                await writing
                done += writing_n
                if progress is not None:
                    progress("catch-up", done, total)
            writing, writing_n = (
                asyncio.ensure_future(asyncio.to_thread(target.apply_batch, buf, published=True)),
                len(buf),
            )
            buf = []
    if writing is not None:
        await writing
        done += writing_n
    if buf:
        await asyncio.to_thread(target.apply_batch, buf, published=True)
        done += len(buf)
    if progress is not None:
        progress("catch-up", done, total)
    return done


async def _puller(bus: EventBus, durable: str, *, wait_s: float) -> bool:
    """Whether a process still pulls from ``durable`` after ``wait_s``: a host that just died leaves its
    pull requests until they expire (``PULL_EXPIRES_S``), a running replicator renews them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        pos = await bus.durable_position(durable)
        if pos is None or pos[1] == 0:
            return False
        if loop.time() >= deadline:
            return True
        await asyncio.sleep(0.5)


async def _warm(hot: HotStore, target: SqlStore, limit: int) -> int:
    rows = await asyncio.to_thread(target.newest_items, limit)
    await hot.fill_many(rows)
    return len(rows)


async def join_cluster(
    settings: Settings,
    target: SqlStore,
    bus: EventBus,
    *,
    workdir: Path,
    from_host: str | None = None,
    hot: HotStore | None = None,
    warm: int = 10_000,
    batch: int = 5000,
    progress: JoinProgress | None = None,
    puller_wait_s: float = PULL_EXPIRES_S + 2,
    own_store: bool = True,
) -> JoinResult:
    """Rebuild ``target`` (empty) from a peer's shared snapshot and the stream after it; see the module docstring.

    ``own_store``: ``target`` is the host's own store, so its durable consumer is moved past the catch-up
    (and the host's replicator must not be running); otherwise (a scratch copy) the consumer is left alone."""
    t0 = time.perf_counter()
    host = settings.host_id
    if from_host == host:
        raise InvalidArgument(
            f"join restores a peer's snapshot, not {host}'s own: it may hold writes {host} never published"
        )
    durable = consumer_name(host)
    if own_store and await _puller(bus, durable, wait_s=puller_wait_s):
        raise InvalidArgument(
            f"a replicator is pulling from {durable}: stop {host}'s processes before it joins (mfh join rebuilds "
            "the store they use)"
        )
    info = await bus.stream_info()
    first_seq, last_seq = int(info["first_seq"]), int(info["last_seq"])
    if int(info["messages"]) == 0:
        first_seq = last_seq + 1
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    bucket = bucket_for(settings, bus.conn)
    skipped: dict[str, str] = {}
    t_pick = time.perf_counter()
    prepare_s = t_pick - t0  # the check for a running replicator, the stream's bounds
    picked = await _pick(bucket, host, from_host, first_seq, last_seq, workdir, skipped)
    fetch_s = time.perf_counter() - t_pick
    items = 0
    restore_s = 0.0
    snap: SharedSnapshot | None = None
    if picked is None:
        if first_seq > 1:
            why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "none is there"
            raise NotFound(
                f"no usable snapshot of a peer{f' ({from_host})' if from_host else ''} in bucket {bucket.bucket} "
                f"({why}), and the stream starts at seq {first_seq} (earlier events aged out), so replaying it "
                "cannot rebuild the store: on a healthy host run `mfh snapshot` (it shares one), then join again"
            )
        log.warning("join: no usable snapshot of a peer; the stream starts at seq 1: replaying it whole")
        start = 1
    else:
        snap, head, path, _ = picked
        assert head.stream_seq is not None
        t1 = time.perf_counter()
        try:
            for rows in iter_snapshot_rows(path):
                await asyncio.to_thread(functools.partial(target.import_item_rows, rows, index=False))
                items += len(rows)
                if progress is not None:
                    progress("restore", items, head.items)
        finally:
            path.unlink(missing_ok=True)
        restore_s = time.perf_counter() - t1
        start = head.stream_seq
    t2 = time.perf_counter()
    upto = int((await bus.stream_info())["last_seq"])
    events = await _catch_up(bus, target, start, upto, batch=batch, progress=progress)
    if own_store:
        await bus.reset_durable(durable, start_seq=upto + 1)
    catch_up_s = time.perf_counter() - t2
    t_index = time.perf_counter()
    if items:
        await asyncio.to_thread(target.index_items, batch=batch)  # the snapshot's rows, indexed once
    index_s = time.perf_counter() - t_index
    t3 = time.perf_counter()
    warmed = 0
    if hot is not None and warm > 0:
        try:
            warmed = await _warm(hot, target, warm)
        except (MFHError, RedisError, OSError) as e:
            log.warning("join: the hot store was not warmed (%s); reads fill it from SQL", e)
    warm_s = time.perf_counter() - t3
    checksum = await asyncio.to_thread(target.checksum)
    return JoinResult(
        source="snapshot" if snap is not None else "stream",
        snapshot=snap.name if snap is not None else None,
        peer=snap.host if snap is not None else None,
        items=items,
        events=events,
        stream_from=start,
        stream_upto=upto,
        checksum=checksum,
        warmed=warmed,
        prepare_s=round(prepare_s, 3),
        fetch_s=round(fetch_s, 3),
        restore_s=round(restore_s, 3),
        catch_up_s=round(catch_up_s, 3),
        index_s=round(index_s, 3),
        warm_s=round(warm_s, 3),
        seconds=round(time.perf_counter() - t0, 3),
        skipped=skipped,
    )
