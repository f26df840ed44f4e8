"""Join time of a host rebuilt empty (``mfh join``) when its peer holds 100,000 records.

A private nats-server; a peer ``main_pc`` whose SQLite is seeded in bulk with ``--records`` records
(``SqlStore.apply_batch``, 5,000 a transaction) that are also on the stream, as its history; its
replicator's consumer is past them. The peer takes a snapshot and shares it (the scheduler's job),
then ``--after`` more events reach the stream (the others kept writing). The joiner ``pc3`` then
joins into an empty SQLite and its Redis (mfh_tasks.join.join_cluster): fetch, checks, restore,
catch-up, Redis warm. Its checksum must equal the peer's. The baseline is the way before it: the
whole stream replayed into an empty SQLite (``mfh replay --from-stream``; ``--no-baseline`` skips it).

    python bench/join.py [--records 100000] [--after 5000] [--warm 10000] [--redis-url redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from _hosts import start_nats

from mfh_core import SqlStore
from mfh_core.eventbus import EventBus
from mfh_models import (
    Kind,
    MemoryEvent,
    Op,
    Settings,
    canonical_json,
    default_config_dir,
    event_id_for,
    load_settings,
    pack,
)
from mfh_tasks import build_hot_store
from mfh_tasks.join import SnapshotSharer, join_cluster
from mfh_tasks.replay import open_target, replay_from_stream
from mfh_tasks.replicator import consumer_name
from schedules.jobs import snapshot_and_share

T0_MS = 1_760_000_000_000


def records(n: int, *, start: int, origin: str, seed: int) -> list[MemoryEvent]:
    """``n`` puts of distinct keys (``start`` on), ~300-byte payloads, over 8 namespaces."""
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        version = pack(T0_MS + i, 0)
        payload = canonical_json({"content": f"memory {i} " + "x" * rng.randrange(200, 300), "tags": ["bench"]})
        out.append(
            MemoryEvent.model_construct(
                event_id=event_id_for(origin, version),
                op=Op.PUT,
                namespace=f"agent{i % 8}",
                key=f"k{i}",
                kind=Kind.MEMORY_ITEM,
                payload=payload,
                version=version,
                origin=origin,
                created_at=T0_MS + i,
                schema_version=1,
            )
        )
    return out


def host(tmp: Path, name: str, *, nats_url: str, redis_url: str, prefix: str, topic: str) -> Settings:
    d = tmp / f"config-{name}"
    d.mkdir()
    shutil.copy(default_config_dir() / "default.yaml", d / "default.yaml")
    cfg: dict[str, Any] = {
        "host_id": name,
        "storage": {"redis_url": redis_url, "redis_prefix": f"{prefix}-{name}", "sqlite_path": str(tmp / f"{name}.db"),
                    "postgres_url": None},
        "replication": {"enabled": True, "nats_url": nats_url, "event_topic": topic, "subject_prefix": f"mfh.{topic}"},
        "scheduler": {"snapshot_dir": str(tmp / f"snapshots-{name}")},
    }  # fmt: skip
    (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    return load_settings(name, config_dir=d, env={})


async def publish(bus: EventBus, events: list[MemoryEvent]) -> None:
    for i in range(0, len(events), 5000):
        chunk = events[i : i + 5000]
        if len(await bus.publish_many(chunk, max_in_flight=512)) != len(chunk):
            raise SystemExit(f"publish fell short: {bus.last_publish_error}")


async def run(args: argparse.Namespace, tmp: Path, nats_url: str) -> dict[str, Any]:
    prefix, topic = f"benchjoin-{uuid.uuid4().hex[:6]}", f"benchjoin_{uuid.uuid4().hex[:6]}"
    peer = host(tmp, "main_pc", nats_url=nats_url, redis_url=args.redis_url, prefix=prefix, topic=topic)
    joiner = host(tmp, "pc3", nats_url=nats_url, redis_url=args.redis_url, prefix=prefix, topic=topic)
    sql = SqlStore(peer.storage.database_url)
    sql.create_schema()
    bus = EventBus.from_settings(peer.replication, name="bench-join")
    await bus.connect()
    figures: dict[str, Any] = {"records": args.records, "after_snapshot_events": args.after}
    try:
        # The peer's history: in its SQL (bulk) and on the stream; its replicator's consumer is past it.
        seed = records(args.records, start=0, origin="pc2", seed=1)
        t = time.perf_counter()
        for i in range(0, len(seed), 5000):
            sql.apply_batch(seed[i : i + 5000], published=True)
        figures["seed_sql_s"] = time.perf_counter() - t
        t = time.perf_counter()
        await publish(bus, seed)
        figures["seed_stream_s"] = time.perf_counter() - t
        del seed
        last = int((await bus.stream_info())["last_seq"])
        await bus.reset_durable(consumer_name("main_pc"), start_seq=last + 1)
        # The scheduler's job on the peer: snapshot, then share.
        sharer = SnapshotSharer(peer)
        t = time.perf_counter()
        path, shared = await snapshot_and_share(
            sql, Path(peer.scheduler.snapshot_dir), host="main_pc", keep=2, sharer=sharer
        )
        figures["snapshot_and_share_s"] = time.perf_counter() - t
        figures["snapshot_mb"] = path.stat().st_size / 1e6
        await sharer.close()
        if shared is None:
            raise SystemExit("the snapshot was not shared")
        # The others keep writing: events after the snapshot, on the stream (and applied by the peer).
        after = records(args.after, start=args.records, origin="pc2", seed=2)
        await publish(bus, after)
        sql.apply_batch(after, published=True)
        # The joiner, rebuilt empty.
        target = open_target(joiner.storage.database_url)
        hot = build_hot_store(joiner)
        try:
            result = await join_cluster(joiner, target, bus, workdir=tmp / "join", hot=hot, warm=args.warm, batch=5000)
        finally:
            await hot.redis.delete(*[k async for k in hot.redis.scan_iter(f"{prefix}-pc3:*")] or ["-"])
            await hot.close()
            target.close()
        live = sql.checksum()
        figures.update(
            fetch_s=result.fetch_s, restore_s=result.restore_s, catch_up_s=result.catch_up_s, index_s=result.index_s,
            catch_up_events=result.events, warm_s=result.warm_s, warmed=result.warmed, join_s=result.seconds,
            join_ok=result.checksum == live and result.source == "snapshot",
        )  # fmt: skip
        print(
            f"join: {result.items} rows from {result.snapshot} + {result.events} events in {result.seconds:.2f} s "
            f"(fetch {result.fetch_s:.2f}, restore {result.restore_s:.2f}, catch-up {result.catch_up_s:.2f}, "
            f"index {result.index_s:.2f}, warm {result.warm_s:.2f}); checksum "
            f"{'equals' if figures['join_ok'] else 'DIFFERS FROM'} the peer's"
        )
        if not args.no_baseline:
            base = open_target(f"sqlite:///{tmp}/replayed.db")
            try:
                r = await replay_from_stream(bus, base, batch=5000)
            finally:
                base.close()
            figures["stream_replay_s"] = r.seconds
            figures["stream_replay_ok"] = r.checksum == live
            print(f"baseline: the whole stream ({r.events} events) replayed in {r.seconds:.2f} s")
    finally:
        js = bus.conn.jetstream()
        for stream in (topic, f"OBJ_{topic}_snapshots"):
            try:
                await js.delete_stream(stream)
            except Exception as e:
                print(f"stream {stream} not deleted: {type(e).__name__}", file=sys.stderr)
        await bus.close()
        sql.close()
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--after", type=int, default=5000, help="events on the stream after the snapshot")
    ap.add_argument("--warm", type=int, default=10_000, help="rows the join puts in the joiner's Redis")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/14", help="keys go under a prefix of their own")
    ap.add_argument("--no-baseline", action="store_true", help="skip the whole-stream replay")
    ap.add_argument("--quick", action="store_true", help="10,000 records, 1,000 after")
    args = ap.parse_args()
    if args.quick:
        args.records, args.after = 10_000, 1_000
    tmp = Path(tempfile.mkdtemp(prefix="mfh-bench-join-"))
    nats, url = start_nats(tmp)
    try:
        figures = asyncio.run(run(args, tmp, url))
    finally:
        nats.terminate()
        nats.wait(timeout=15)
        shutil.rmtree(tmp, ignore_errors=True)
    figures["load1"] = os.getloadavg()[0]
    ok = figures.get("join_ok") and figures.get("stream_replay_ok", True)
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
