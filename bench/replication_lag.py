"""Replication lag: a write accepted on main_pc → readable in pc2's Redis, at 500 writes/s for 30 s.

Two hosts on this machine, each with a real worker and replicator process (``mfh replicator``),
its own Redis database and SQLite file, and one private nats-server. The api side of main_pc runs
here (stage in Redis, batch, enqueue: what the api does). Writes are scheduled open loop (write i
is due at t0 + i/rate, whether or not earlier ones finished), each to a fresh key; a separate
thread checks pc2's Redis for every outstanding key once a millisecond (one pipelined EXISTS
round trip), so the lag of a write is from its due time to the first check that finds it there.

    python bench/replication_lag.py [--rate 500] [--seconds 30] [--redis-url redis://127.0.0.1:6379]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nats
import redis
from _hosts import BenchHost, start_nats
from nats.aio.msg import Msg

from mfh_core import HotStore
from mfh_models import Kind, Op, canonical_json
from mfh_tasks import BatchQueue, build_hot_store


class Watcher(threading.Thread):
    """Checks the other host's Redis for outstanding keys every millisecond; records when each appears.

    One Lua call per check answers for every outstanding key, so checking stays cheap (and does not
    steal CPU from the hosts) even when many writes are outstanding.
    """

    _EXISTS = "local r = {} for i, k in ipairs(KEYS) do r[i] = redis.call('EXISTS', k) end return r"

    def __init__(self, redis_url: str, item_key: str) -> None:
        super().__init__(name="lag-watcher", daemon=True)
        self.client = redis.Redis.from_url(redis_url)
        self.exists = self.client.register_script(self._EXISTS)
        self.item_key = item_key  # format string with {key}
        self.incoming: queue.SimpleQueue[tuple[str, float]] = queue.SimpleQueue()
        self.outstanding: dict[str, tuple[str, float]] = {}  # key -> (redis key, due)
        self.lags_ms: list[float] = []
        self.due: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.checks = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            while not self.incoming.empty():
                key, due = self.incoming.get_nowait()
                self.outstanding[key] = (self.item_key.format(key=key), due)
                self.due[key] = due
            started = time.perf_counter()
            if self.outstanding:
                keys = list(self.outstanding)
                found = self.exists(keys=[self.outstanding[k][0] for k in keys])
                now = time.perf_counter()
                self.checks += 1
                for k, hit in zip(keys, found, strict=True):
                    if hit:
                        self.lags_ms.append((now - self.outstanding.pop(k)[1]) * 1000)
                        self.seen[k] = now
            # Every millisecond, unless a check got expensive (thousands outstanding): then at most
            # a quarter of this thread's time goes to checking, so the measurement does not add load.
            time.sleep(max(0.001, 3 * (time.perf_counter() - started)))


class Api:
    """main_pc's api side, in this process."""

    def __init__(self, host: BenchHost) -> None:
        self.queue = BatchQueue.from_settings(host.settings)
        self.hot: HotStore = build_hot_store(host.settings)
        self.payload = canonical_json({"content": "a memory of about a hundred bytes " + "x" * 60, "tags": ["lag"]})

    async def put(self, key: str) -> None:
        e = await self.hot.stage(op=Op.PUT, namespace="bench", key=key, kind=Kind.MEMORY_ITEM, payload=self.payload)
        await self.queue.submit(e)

    async def close(self) -> None:
        await self.queue.close()
        await self.hot.close()


async def run(api: Api, watcher: Watcher, *, rate: float, seconds: float, tag: str) -> int:
    """Open-loop writes; returns how many were sent."""
    n = int(rate * seconds)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.perf_counter() + 0.05
    for i in range(n):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        key = f"{tag}-{i}"
        watcher.incoming.put((key, due))
        task = loop.create_task(api.put(key))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return n


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379", help="server; dbs 13 and 14 are flushed")
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--batch-delay-ms", type=float, help="override write_behind.batch_max_delay_ms (default: shipped)")
    ap.add_argument("--split", action="store_true", help="also time each write's arrival on the stream")
    ap.add_argument("--keep", action="store_true", help="keep the work dirs (logs, SQLite files, NATS store)")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness increment for this run and the hosts' processes (negative needs root): on a shared "
        "machine, measures MFH rather than whatever else runs",
    )
    args = ap.parse_args()
    if args.nice:
        os.nice(args.nice)  # inherited by NATS, the workers and the replicators started below

    base = args.redis_url.rstrip("/")
    url_a, url_b = f"{base}/13", f"{base}/14"
    for url in (url_a, url_b):
        redis.Redis.from_url(url).flushdb()
    work = Path(tempfile.mkdtemp(prefix="mfh-bench-lag-"))
    nats_proc, nats_url = start_nats(work)
    repl: dict[str, Any] = {"replication": {"enabled": True, "nats_url": nats_url}}
    if args.batch_delay_ms is not None:
        repl["write_behind"] = {"batch_max_delay_ms": args.batch_delay_ms}
    a = BenchHost(name="main_pc", redis_url=url_a, overrides=repl)
    b = BenchHost(name="pc2", redis_url=url_b, overrides=repl)
    api: Api | None = None
    watcher: Watcher | None = None
    on_stream: dict[str, float] = {}
    nc = None
    try:
        if args.split:
            nc = await nats.connect(nats_url)

            async def arrived(msg: Msg) -> None:
                on_stream.setdefault(json.loads(msg.data)["key"], time.perf_counter())

            await nc.subscribe("mfh.events.main_pc.>", cb=arrived)
        for h in (a, b):
            h.start_worker(threads=4)
            h.start_replicator()
        api = Api(a)
        watcher = Watcher(url_b, b.settings.storage.redis_prefix + ":i:bench:{key}")
        watcher.start()
        # Warm-up: processes started, NATS connected, consumers created.
        await run(api, watcher, rate=50, seconds=1, tag="warm")
        deadline = time.monotonic() + 60
        while len(watcher.lags_ms) < 50:
            if time.monotonic() > deadline:
                raise SystemExit(f"warm-up writes never reached pc2; see {a.dir} and {b.dir}")
            await asyncio.sleep(0.05)
        watcher.lags_ms.clear()
        print(f"replication_lag: {args.rate:.0f} writes/s for {args.seconds:.0f} s on main_pc, read on pc2")
        print(f"  work dir {work}, {nats_url}")
        sent = await run(api, watcher, rate=args.rate, seconds=args.seconds, tag="w")
        deadline = time.monotonic() + 30
        while watcher.outstanding or not watcher.incoming.empty():
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    finally:
        if nc is not None:
            await nc.close()
        if watcher is not None:
            watcher.stop.set()
        if api is not None:
            await api.close()
        for h in (a, b):
            h.stop()
        nats_proc.terminate()
        nats_proc.wait(timeout=10)
        if not args.keep:
            for d in (work, a.dir, b.dir):
                shutil.rmtree(d, ignore_errors=True)
    lags = watcher.lags_ms
    missing = sent - len(lags)
    p50, p95, p99 = pct(lags, 50), pct(lags, 95), pct(lags, 99)
    print(
        f"{len(lags)} of {sent} writes seen on pc2 ({missing} not within 30 s); "
        f"mean {statistics.fmean(lags):.1f} ms, max {max(lags):.1f} ms"
    )
    verdict = "<" if p99 < 200 and missing == 0 else "NOT <"
    print(f"p99 {verdict} 200 ms (nice={args.nice}, load1={os.getloadavg()[0]:.2f})")
    if args.split:
        keys = [k for k in watcher.seen if k in on_stream and k.startswith("w-")]
        to_stream = [(on_stream[k] - watcher.due[k]) * 1000 for k in keys]
        to_pc2 = [(watcher.seen[k] - on_stream[k]) * 1000 for k in keys]
        for name, values in (("write -> on the stream (api, worker)", to_stream), ("stream -> pc2 Redis", to_pc2)):
            print(f"  {name}: p50 {pct(values, 50):.1f} p95 {pct(values, 95):.1f} p99 {pct(values, 99):.1f} ms")
    print(f"lag_p50_ms={p50:.1f} lag_p95_ms={p95:.1f} lag_p99_ms={p99:.1f}")


if __name__ == "__main__":
    asyncio.run(main())
