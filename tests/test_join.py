"""``mfh join``: a snapshot shared through the Object Store bucket, fetched, checked, restored, and the stream
after it applied (mfh_core.snapshot_bucket, mfh_tasks.join), against a private nats-server, real SQLite
and a real Redis. Each test has a stream and a bucket of its own."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import random
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from factories import event
from hosts import make_host
from nats.aio.msg import Msg
from nats.js.api import ObjectMeta
from services import NatsServer, async_wait_until

from mfh_api.cli import main as mfh
from mfh_core import SqlStore
from mfh_core.eventbus import EventBus
from mfh_core.snapshot_bucket import SnapshotBucket, file_sha256
from mfh_models import InvalidArgument, MemoryEvent, NotFound, Op, Settings, unpack
from mfh_tasks import build_hot_store
from mfh_tasks.join import SnapshotSharer, bucket_for, join_cluster
from mfh_tasks.replicator import consumer_name
from mfh_tasks.snapshots import read_header
from schedules.jobs import snapshot, snapshot_and_share


@dataclass
class Cluster:
    """A stream and a bucket of their own; the peer ``main_pc`` (a store, its replicator's consumer) and
    the joiner ``pc3`` (an empty store, a Redis)."""

    peer: Settings
    joiner: Settings
    peer_sql: SqlStore
    bus: EventBus
    tmp: Path

    async def publish(self, events: list[MemoryEvent]) -> None:
        assert len(await self.bus.publish_many(events)) == len(events)

    async def write_on_peer(self, events: list[MemoryEvent]) -> None:
        """The peer's own writes: committed, then published (the worker's order)."""
        await asyncio.to_thread(self.peer_sql.apply_batch, events, published=True)
        await self.publish(events)

    async def peer_applied_everything(self) -> None:
        """Until the peer's consumer has acked the whole stream."""

        async def done() -> bool:
            last = int((await self.bus.stream_info())["last_seq"])
            pos = await self.bus.durable_position(consumer_name("main_pc"))
            return pos is not None and pos[0] == last

        await async_wait_until(done, timeout=20, message="the peer applied the stream")


def _events(n: int, *, origin: str, start: int, seed: int) -> list[MemoryEvent]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        op = Op.DELETE if rng.random() < 0.1 else Op.PUT
        out.append(event(f"k{rng.randrange(150)}", start + i, origin=origin, op=op, content=f"{origin}-{i}"))
    return out


@pytest.fixture
async def cluster(nats_server: NatsServer, redis_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    tag = secrets.token_hex(4)
    repl = {"event_topic": f"join_{tag}", "subject_prefix": f"mfh.j{tag}", "audit_subject_prefix": f"mfh.ja{tag}"}
    peer = make_host(tmp_path, name="main_pc", redis_url=redis_url, nats_url=nats_server.url,
                     overrides={"replication": repl}).settings  # fmt: skip
    joiner = make_host(tmp_path, name="pc3", redis_url=redis_url, nats_url=nats_server.url,
                       overrides={"replication": repl}).settings  # fmt: skip
    sql = SqlStore(peer.storage.database_url)
    sql.create_schema()
    bus = EventBus.from_settings(peer.replication, name=f"test-join-{tag}")
    await bus.connect()

    async def replicate(e: MemoryEvent, msg: Msg) -> None:  # the replicator's contract: apply, then ack
        if e.origin != "main_pc":
            await asyncio.to_thread(sql.apply_batch, [e], published=True)
        await msg.ack()

    sub = await bus.subscribe_durable(consumer_name("main_pc"), replicate, ack_wait_s=5.0)
    try:
        yield Cluster(peer, joiner, sql, bus, tmp_path)
    finally:
        await sub.close()
        js = bus.conn.jetstream()
        for stream in (peer.replication.event_topic, f"OBJ_{peer.replication.event_topic}_snapshots"):
            with contextlib.suppress(Exception):  # not created by every test
                await js.delete_stream(stream)
        await bus.close()
        sql.close()


async def _share(c: Cluster) -> tuple[Path, str | None]:
    sharer = SnapshotSharer(c.peer)
    try:
        return await snapshot_and_share(
            c.peer_sql, Path(c.peer.scheduler.snapshot_dir), host="main_pc", keep=24, sharer=sharer
        )
    finally:
        await sharer.close()


def _empty_target(c: Cluster) -> SqlStore:
    target = SqlStore(c.joiner.storage.database_url)
    target.create_schema()
    return target


async def test_a_shared_snapshot_round_trips_byte_equal(cluster: Cluster) -> None:
    # Given a peer's snapshot of 400 rows, shared to the bucket
    await cluster.write_on_peer(_events(400, origin="main_pc", start=1, seed=1))
    await cluster.peer_applied_everything()
    path, name = await _share(cluster)
    assert name == f"main_pc/{path.name}"
    # When it is listed and fetched
    bucket = bucket_for(cluster.peer, cluster.bus.conn)
    (listed,) = await bucket.list()
    got = await bucket.fetch(listed, cluster.tmp / "fetched.jsonl.gz")
    # Then the bytes are the file's, and the object's headers say what its header says
    assert got.read_bytes() == path.read_bytes()
    head = read_header(path)
    assert (listed.host, listed.items, listed.checksum, listed.stream_seq) == (
        "main_pc", head.items, head.checksum, head.stream_seq,
    )  # fmt: skip
    assert head.stream_seq == int((await cluster.bus.stream_info())["last_seq"]) + 1


async def test_join_restores_a_peers_snapshot_and_applies_only_the_stream_after_it(
    cluster: Cluster, redis_url: str
) -> None:
    # Given a peer with its own writes and another host's, shared as a snapshot...
    c = cluster
    await c.write_on_peer(_events(300, origin="main_pc", start=1, seed=2))
    await c.publish(_events(300, origin="pc2", start=1000, seed=3))
    await c.peer_applied_everything()
    path, _ = await _share(c)
    watermark = read_header(path).stream_seq
    assert watermark is not None
    # ...then more writes after it, and the stream's events before the snapshot gone (max_age, prune)
    await c.publish(_events(200, origin="pc2", start=2000, seed=4))
    await c.write_on_peer(_events(100, origin="main_pc", start=3000, seed=5))
    await c.bus.conn.jetstream().purge_stream(c.peer.replication.event_topic, seq=watermark)
    await c.peer_applied_everything()
    # When pc3, rebuilt empty, joins
    target = _empty_target(c)
    hot = build_hot_store(c.joiner)
    try:
        result = await join_cluster(c.joiner, target, c.bus, workdir=c.tmp / "join", hot=hot, warm=50)
        # Then it holds what the peer holds, from the snapshot plus the 300 events after it
        assert result.source == "snapshot" and result.peer == "main_pc"
        assert result.checksum == c.peer_sql.checksum() == target.checksum()
        assert (result.items, result.events) == (read_header(path).items, 300)
        assert result.stream_from == watermark
        # ...its replicator will carry on after the last event it applied
        ci = await c.bus.conn.jetstream().consumer_info(c.peer.replication.event_topic, consumer_name("pc3"))
        assert ci.config.opt_start_seq == result.stream_upto + 1
        assert await c.bus.durable_position(consumer_name("pc3")) == (result.stream_upto, 0)  # its next snapshot's
        # ...and its Redis holds the newest rows, its clock past every restored version
        assert result.warmed == 50
        newest = target.newest_items(1)[0]
        entry = await hot.get(newest.namespace, newest.key)
        assert entry is not None and entry.record.version == newest.version
        ms, ctr = (int(x) for x in await hot.redis.hmget(hot.hlc_key, "m", "c"))
        assert (ms, ctr) >= unpack(newest.version)
    finally:
        await hot.close()
        target.close()


async def test_a_reset_consumer_keeps_its_start_when_the_replicator_subscribes(cluster: Cluster) -> None:
    # Given pc3's consumer set to start at the stream's 11th message (what a join leaves)
    c = cluster
    await c.publish(_events(20, origin="pc2", start=1, seed=6))
    first = int((await c.bus.stream_info())["first_seq"])
    await c.bus.reset_durable(consumer_name("pc3"), start_seq=first + 10)
    got: list[str] = []

    async def handler(e: MemoryEvent, msg: Msg) -> None:
        got.append(e.event_id)
        await msg.ack()

    # When its replicator subscribes with its own config (deliver all)
    sub = await c.bus.subscribe_durable(consumer_name("pc3"), handler)
    try:
        await async_wait_until(lambda: len(got) >= 10, timeout=10, message="deliveries")
        ci = await c.bus.conn.jetstream().consumer_info(c.peer.replication.event_topic, consumer_name("pc3"))
        assert ci.num_pending == 0 and ci.delivered.stream_seq == first + 19
    finally:
        await sub.close()
    # Then it is delivered the last 10 only
    assert len(got) == 10


async def test_join_without_a_snapshot_replays_a_stream_that_starts_at_seq_1_and_refuses_one_that_does_not(
    cluster: Cluster,
) -> None:
    c = cluster
    await c.write_on_peer(_events(100, origin="main_pc", start=1, seed=7))
    await c.peer_applied_everything()
    # Given no shared snapshot, and the whole history on the stream: the stream is replayed whole
    target = _empty_target(c)
    try:
        result = await join_cluster(c.joiner, target, c.bus, workdir=c.tmp / "join")
        assert (result.source, result.snapshot, result.stream_from) == ("stream", None, 1)
        assert result.checksum == c.peer_sql.checksum()
    finally:
        target.close()
    # Given the stream's first events gone: a clear error, and the store left empty
    await c.bus.conn.jetstream().purge_stream(c.peer.replication.event_topic, seq=50)
    (c.tmp / "empty.db").unlink(missing_ok=True)
    empty = SqlStore(f"sqlite:///{c.tmp}/empty.db")
    empty.create_schema()
    try:
        with pytest.raises(NotFound, match=r"no usable snapshot of a peer.*mfh snapshot"):
            await join_cluster(c.joiner, empty, c.bus, workdir=c.tmp / "join")
        assert (empty.counts()["items"], empty.counts()["events"]) == (0, 0)
    finally:
        empty.close()


async def _put_raw(bucket: SnapshotBucket, name: str, data: bytes, headers: dict[str, Any]) -> None:
    store = await bucket._store(create=True)
    await store.put(name, data, meta=ObjectMeta(name=name, headers=headers))


def _headers(path: Path, *, host: str = "pc2", **over: Any) -> dict[str, list[str]]:
    head = read_header(path)
    h = {
        "Mfh-Host": host,
        "Mfh-Items": str(head.items),
        "Mfh-Checksum": head.checksum,
        "Mfh-Stream-Seq": str(head.stream_seq),
        "Mfh-Taken-At": "20991231T235959999Z",  # newer than the genuine one: tried first
        "Mfh-Sha256": file_sha256(path),
        **over,
    }
    return {k: [str(v)] for k, v in h.items()}


def _forge(path: Path, out: Path, *, host: str = "pc2", tamper: bool = False) -> Path:
    """A copy of ``path`` claimed to be ``host``'s; with ``tamper``, one row's payload changed (header kept)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    head = json.loads(lines[0])
    head["host"] = host
    lines[0] = json.dumps(head) + "\n"
    if tamper:
        row = json.loads(lines[1])
        row["payload"] = '{"content":"forged"}'
        lines[1] = json.dumps(row) + "\n"
    with gzip.open(out, "wt", encoding="utf-8") as f:
        f.writelines(lines)
    return out


async def test_a_damaged_chunk_is_refused_and_leaves_no_file(cluster: Cluster) -> None:
    # Given a shared snapshot whose last chunk was replaced in the bucket (same size, one byte changed)
    c = cluster
    await c.write_on_peer(_events(1500, origin="main_pc", start=1, seed=8))
    await c.peer_applied_everything()
    path, name = await _share(c)
    assert name is not None
    bucket = bucket_for(c.peer, c.bus.conn)
    store = await bucket._store(create=False)
    info = await store.get_info(name)
    chunk_subject = f"$O.{bucket.bucket}.C.{info.nuid}"
    size = info.options.max_chunk_size if info.options and info.options.max_chunk_size else 128 * 1024
    data = path.read_bytes()
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    bad = bytearray(chunks[-1])
    bad[len(bad) // 2] ^= 0xFF
    chunks[-1] = bytes(bad)
    js = c.bus.conn.jetstream()
    await js.purge_stream(f"OBJ_{bucket.bucket}", subject=chunk_subject)
    for ch in chunks:
        await js.publish(chunk_subject, ch)
    # When it is fetched
    (listed,) = await bucket.list()
    dest = c.tmp / "fetched.jsonl.gz"
    with pytest.raises(InvalidArgument, match="damaged"):
        await bucket.fetch(listed, dest)
    # Then nothing is left behind
    assert not dest.exists() and not list(c.tmp.glob("fetched*"))


async def test_hostile_objects_in_the_bucket_change_nothing(cluster: Cluster) -> None:
    # Given a genuine snapshot of main_pc, and pc2's "snapshots" that lie in every way, all newer
    c = cluster
    await c.write_on_peer(_events(200, origin="main_pc", start=1, seed=9))
    await c.peer_applied_everything()
    path, _ = await _share(c)
    head = read_header(path)
    assert head.stream_seq is not None
    bucket = bucket_for(c.peer, c.bus.conn)
    stamp = "20991231T235959999Z"
    tampered = _forge(path, c.tmp / "t.jsonl.gz", tamper=True)
    honest = _forge(path, c.tmp / "h.jsonl.gz")
    hostile = {
        f"pc2/snapshot-pc2-{stamp}.jsonl.gz": (tampered.read_bytes(), _headers(tampered)),  # rows changed
        "pc2/snapshot-pc2-20991231T235959998Z.jsonl.gz": (b"not gzip at all", _headers(honest)),  # wrong bytes
        "pc2/snapshot-pc2-20991231T235959997Z.jsonl.gz": (
            honest.read_bytes(), _headers(honest, **{"Mfh-Stream-Seq": 10**9}),  # skips the whole stream
        ),
        "pc2/snapshot-pc2-20991231T235959996Z.jsonl.gz": (
            honest.read_bytes(), _headers(honest, **{"Mfh-Items": "lots"}),  # malformed header
        ),
        f"pc2/snapshot-main_pc-{stamp}.jsonl.gz": (honest.read_bytes(), _headers(honest)),  # name of another host
        "pc2/anything.bin": (b"x", _headers(honest)),  # not a snapshot name
        "pc2/snapshot-pc2-20991231T235959995Z.jsonl.gz": (  # header agrees with itself, not with the object
            honest.read_bytes(), _headers(honest, **{"Mfh-Checksum": "0" * 64}),
        ),
    }  # fmt: skip
    for name, (data, headers) in hostile.items():
        await _put_raw(bucket, name, data, headers)
    # When pc3 joins
    target = _empty_target(c)
    try:
        result = await join_cluster(c.joiner, target, c.bus, workdir=c.tmp / "join")
        # Then it restored the genuine one, and said why it refused the others
        assert result.peer == "main_pc" and result.checksum == c.peer_sql.checksum()
        assert len(result.skipped) == 4, result.skipped
    finally:
        target.close()
    # And with only the hostile ones there (and the stream's start gone), it refuses and writes nothing
    store = await bucket._store(create=False)
    for s in await bucket.list():
        if s.host == "main_pc":
            await store.delete(s.name)
    await c.bus.conn.jetstream().purge_stream(c.peer.replication.event_topic, seq=head.stream_seq)
    empty = SqlStore(f"sqlite:///{c.tmp}/empty.db")
    empty.create_schema()
    try:
        with pytest.raises(NotFound, match="no usable snapshot"):
            await join_cluster(c.joiner, empty, c.bus, workdir=c.tmp / "join")
        assert empty.counts()["items"] == 0
        assert not list((c.tmp / "join").iterdir())
    finally:
        empty.close()


async def test_join_refuses_while_the_hosts_replicator_is_pulling(cluster: Cluster) -> None:
    c = cluster

    async def handler(e: MemoryEvent, msg: Msg) -> None:
        await msg.ack()

    sub = await c.bus.subscribe_durable(consumer_name("pc3"), handler)
    target = _empty_target(c)
    try:
        await async_wait_until(
            lambda: _waiting(c.bus, "pc3"), timeout=10, message="the consumer has a pull request waiting"
        )
        with pytest.raises(InvalidArgument, match="stop pc3's processes"):
            await join_cluster(c.joiner, target, c.bus, workdir=c.tmp / "join", puller_wait_s=1.0)
        # ...but a scratch copy may be built meanwhile, and leaves the consumer where it is
        scratch = SqlStore(f"sqlite:///{c.tmp}/scratch.db")
        scratch.create_schema()
        try:
            before = await c.bus.durable_position(consumer_name("pc3"))
            await join_cluster(c.joiner, scratch, c.bus, workdir=c.tmp / "join", own_store=False)
            after = await c.bus.durable_position(consumer_name("pc3"))
            assert before is not None and after is not None and after[0] == before[0]
        finally:
            scratch.close()
        with pytest.raises(InvalidArgument, match="not pc3's own"):
            await join_cluster(c.joiner, target, c.bus, workdir=c.tmp / "join", from_host="pc3")
        assert target.counts()["items"] == 0
    finally:
        await sub.close()
        target.close()


async def _waiting(bus: EventBus, host: str) -> bool:
    pos = await bus.durable_position(consumer_name(host))
    return pos is not None and pos[1] > 0


def test_mfh_join_needs_replication(tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    host = make_host(tmp_path, name="pc3", redis_url=redis_url)
    code = mfh(["join", "--host", "pc3", "--config-dir", str(host.config_dir)])
    assert code == 2
    assert "replication is disabled" in capsys.readouterr().err


def test_a_snapshot_without_a_stream_position_is_not_shared(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path}/a.db")
    store.create_schema()
    try:
        store.apply_batch([event("k", 1)])
        head = read_header(snapshot(store, tmp_path, host="main_pc"))
        assert head.stream_seq is None and head.restorable
    finally:
        store.close()
