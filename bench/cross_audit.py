"""Cross-host audit cost: ``mfh audit --peers`` between two hosts, against one host's ``mfh checksum``.

Two SQLite stores get the same ``--keys`` rows (about 100-byte payloads, ``--namespaces``
namespaces); each is answered by an AuditResponder (what every replicator runs) on a real NATS,
with a stream and subjects of the bench's own. It times the comparison of equal hosts, then of
hosts where ``--diffs`` rows of the second were changed behind the hub's back (it must name exactly
those), against the baseline: the full checksum of one store (``mfh checksum``). Medians of
``--repeat`` runs; the two responders and the comparing side share this process and its cores.

    python bench/cross_audit.py [--keys 10000] [--nats nats://127.0.0.1:4222] [--redis redis://127.0.0.1:6379/13]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time

import redis.asyncio as aioredis

from mfh_core import SqlStore
from mfh_core.eventbus import EventBus
from mfh_models import Kind, MemoryEvent, Op, canonical_json, event_id_for, pack
from mfh_tasks.cross_audit import compare
from mfh_tasks.peer_audit import AuditResponder, nats_ask


def rows(n: int, namespaces: int) -> list[MemoryEvent]:
    t0 = int(time.time() * 1000) - n
    out = []
    for i in range(n):
        v = pack(t0 + i, 0)
        payload = canonical_json({"content": f"memory {i} " + "x" * 80, "tags": ["bench"]})
        out.append(
            MemoryEvent(
                event_id=event_id_for("main_pc", v),
                op=Op.PUT,
                namespace=f"ns{i % namespaces}",
                key=f"agent/{i}",
                kind=Kind.MEMORY_ITEM,
                payload=payload,
                version=v,
                origin="main_pc",
                created_at=t0 + i,
            )
        )
    return out


async def run(args: argparse.Namespace) -> int:
    tag = secrets.token_hex(4)
    stream, prefix = f"bench_audit_{tag}", f"bench.{tag}.events"
    subject = f"bench.{tag}.audit.{stream}"
    events = rows(args.keys, args.namespaces)
    with tempfile.TemporaryDirectory(prefix="mfh-bench-cross-audit-") as tmp:
        stores = {h: SqlStore(f"sqlite:///{tmp}/{h}.db") for h in ("main_pc", "pc2")}
        buses: list[EventBus] = []
        responders: list[AuditResponder] = []
        redis: aioredis.Redis = aioredis.Redis.from_url(args.redis, decode_responses=True)
        try:
            for sql in stores.values():
                sql.create_schema()
                for i in range(0, len(events), 5000):
                    sql.apply_batch(events[i : i + 5000], published=True)
            for host, sql in stores.items():
                bus = EventBus(
                    nats_url=args.nats, stream=stream, subject_prefix=prefix, duplicate_window_s=60, max_age_s=600,
                    name=f"bench-{host}",
                )  # fmt: skip
                await bus.connect()
                buses.append(bus)
                responder = AuditResponder(bus=bus, sql=sql, redis=redis, redis_prefix=f"bench{tag}", host_id=host)
                await responder.start(subject)
                responders.append(responder)
            ask = nats_ask(buses[0].conn.client(), subject, timeout_s=30)
            hosts = list(stores)

            def checksum() -> float:
                t = time.perf_counter()
                stores["main_pc"].checksum()
                return time.perf_counter() - t

            baseline, equal, differ = [], [], []
            rounds = 0
            for _ in range(args.repeat):
                baseline.append(await asyncio.to_thread(checksum))
                out = await compare(ask, hosts, settle_s=0)
                assert out.equal and out.unreachable == {}, out
                equal.append(out.seconds)
            conn = sqlite3.connect(f"{tmp}/pc2.db", isolation_level=None)
            changed = sorted(events[i * (len(events) // args.diffs)].key for i in range(args.diffs))
            for key in changed:
                conn.execute('UPDATE items SET payload = \'{"content":"edited"}\' WHERE key = ?', (key,))
            conn.close()
            for _ in range(args.repeat):
                out = await compare(ask, hosts, settle_s=0)
                assert sorted(d.key for d in out.differences) == changed, out.differences
                differ.append(out.seconds)
                rounds = out.rounds
        finally:
            for responder in responders:
                await responder.close()
            if buses:
                await buses[0].conn.jetstream().delete_stream(stream)
            for bus in buses:
                await bus.close()
            await redis.aclose()
            for sql in stores.values():
                sql.close()
    b, e, d = (statistics.median(x) for x in (baseline, equal, differ))
    load = os.getloadavg()[0]
    print(
        f"{args.keys} keys, {args.namespaces} namespaces, load average {load:.1f}: checksum {b:.3f} s, "
        f"equal hosts {e:.3f} s, {args.diffs} differing keys found in {d:.3f} s ({rounds} rounds)",
        file=sys.stderr,
    )
    print(
        f"keys={args.keys} checksum_s={b:.3f} audit_equal_s={e:.3f} audit_diff_s={d:.3f} rounds={rounds} "
        f"equal_vs_checksum={e / b:.2f} diff_vs_checksum={d / b:.2f} load={load:.1f}"
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=10_000)
    ap.add_argument("--namespaces", type=int, default=4)
    ap.add_argument("--diffs", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nats", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    return asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
