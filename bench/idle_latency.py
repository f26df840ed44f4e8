"""Quiet-time latency: a PERSISTED put, and a write on one host read on the other, after idle and under load.

Two hosts on this machine (main_pc and pc2), each a real api, worker and replicator process with its
own Redis database and SQLite file, and one private nats-server; the clients are gRPC clients in
this process. Each idle trial first waits ``--idle`` seconds with nothing written anywhere, then
at once:

- ``persisted``: a PERSISTED put on main_pc, from the call until its answer;
- ``visible``: an ACCEPTED put on pc2, from the call until main_pc's api answers a Get for the key
  (polled every millisecond).

The loaded phase then runs the same two probes every 100 ms while main_pc takes PERSISTED puts at
``--rate`` per second, open loop (each timed from its scheduled start): its p99 is the
"PERSISTED put at 500/s" figure. It flushes Redis dbs 10 and 11.

    python bench/idle_latency.py [--trials 50] [--idle 5] [--rate 500] [--load-seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from _hosts import BenchHost, api_server, start_nats

from mfh_client import AsyncMemoryClient, Durability, PutSpec
from mfh_models import MFHError, NotFound

PAYLOAD = {"content": "a memory of about three hundred bytes " + "x" * 240, "tags": ["idle"]}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Probes:
    """The two measurements, over the hosts' gRPC doors."""

    def __init__(self, main: AsyncMemoryClient, pc2: AsyncMemoryClient) -> None:
        self.main, self.pc2 = main, pc2
        self.run = uuid.uuid4().hex[:6]
        self.n = 0

    def key(self, what: str) -> str:
        self.n += 1
        return f"{self.run}-{what}-{self.n}"

    async def persisted(self) -> float:
        """ms until a PERSISTED put on main_pc answers."""
        t0 = time.perf_counter()
        await self.main.put(PutSpec("idle", self.key("p"), "memory_item", PAYLOAD), durability=Durability.PERSISTED)
        return (time.perf_counter() - t0) * 1000

    async def visible(self, timeout_s: float = 10.0) -> float:
        """ms from an ACCEPTED put on pc2 until main_pc's api serves it."""
        key = self.key("v")
        t0 = time.perf_counter()
        await self.pc2.put(PutSpec("idle", key, "memory_item", PAYLOAD))
        while True:
            try:
                await self.main.get("idle", key)
                return (time.perf_counter() - t0) * 1000
            except NotFound:
                if time.perf_counter() - t0 > timeout_s:
                    raise SystemExit(f"a write on pc2 was not readable on main_pc within {timeout_s:.0f} s") from None
                await asyncio.sleep(0.001)

    async def both(self) -> tuple[float, float]:
        p, v = await asyncio.gather(self.persisted(), self.visible())
        return p, v


async def load(
    client: AsyncMemoryClient, *, rate: float, seconds: float, stop: asyncio.Event
) -> tuple[list[float], int]:
    """PERSISTED puts at ``rate``/s open loop on main_pc: latencies (ms, from each scheduled start) and errors."""
    lat: list[float] = []
    errors = 0
    tasks: set[asyncio.Task[None]] = set()
    run = uuid.uuid4().hex[:6]

    async def one(i: int, due: float) -> None:
        nonlocal errors
        try:
            spec = PutSpec("load", f"{run}-{i}", "memory_item", PAYLOAD)
            await client.put(spec, durability=Durability.PERSISTED)
            lat.append((time.perf_counter() - due) * 1000)
        except MFHError:
            errors += 1

    t0 = time.perf_counter() + 0.01
    for i in range(int(rate * seconds)):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    stop.set()
    return lat, errors


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379", help="server; dbs 10 and 11 are flushed")
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of quiet before each idle trial")
    ap.add_argument("--rate", type=float, default=500.0, help="PERSISTED puts/s on main_pc in the loaded phase")
    ap.add_argument("--load-seconds", type=float, default=10.0)
    ap.add_argument("--keep", action="store_true", help="keep the work dirs (logs, SQLite files, NATS store)")
    args = ap.parse_args()

    base = args.redis_url.rstrip("/")
    url_a, url_b = f"{base}/10", f"{base}/11"
    for url in (url_a, url_b):
        redis.Redis.from_url(url).flushdb()
    work = Path(tempfile.mkdtemp(prefix="mfh-bench-idle-"))
    nats_proc, nats_url = start_nats(work)

    def overrides() -> dict[str, Any]:
        return {"replication": {"enabled": True, "nats_url": nats_url}, "server": api_server()}

    hosts = [BenchHost(name=n, redis_url=u, overrides=overrides()) for n, u in (("main_pc", url_a), ("pc2", url_b))]
    clients: list[AsyncMemoryClient] = []
    idle: list[tuple[float, float]] = []
    loaded: list[tuple[float, float]] = []
    load_lat: list[float] = []
    load_errors = 0
    probe_errors: list[str] = []
    try:
        for h in hosts:
            h.start_worker(threads=4)
            h.start_replicator()
        addresses = [h.start_api() for h in hosts]
        clients = [AsyncMemoryClient(a, timeout=10.0, retries=0) for a in addresses]
        probes = Probes(*clients)
        print(f"idle_latency: main_pc {addresses[0]}, pc2 {addresses[1]}, {nats_url}, work dir {work}", flush=True)
        # Warm-up: processes up, NATS consumers created, both directions replicating.
        deadline = time.monotonic() + 90
        while True:
            try:
                await asyncio.wait_for(probes.both(), 15)
                break
            except (MFHError, TimeoutError, SystemExit) as e:
                if time.monotonic() > deadline:
                    raise SystemExit(f"warm-up failed ({e}); see {hosts[0].dir} and {hosts[1].dir}") from None
                await asyncio.sleep(0.5)
        for _ in range(20):
            await probes.both()

        for i in range(args.trials):
            await asyncio.sleep(args.idle)
            p, v = await probes.both()
            idle.append((p, v))
            print(f"  idle trial {i + 1:>3}: persisted {p:7.1f} ms  visible on main_pc {v:7.1f} ms", flush=True)

        stop = asyncio.Event()

        async def probe_under_load() -> None:
            await asyncio.sleep(0.5)
            while not stop.is_set() and len(loaded) < args.trials:
                try:
                    loaded.append(await probes.both())
                except MFHError as e:  # shed under overload: counted, not timed
                    probe_errors.append(type(e).__name__)
                await asyncio.sleep(0.1)

        prober = asyncio.create_task(probe_under_load())
        load_lat, load_errors = await load(clients[0], rate=args.rate, seconds=args.load_seconds, stop=stop)
        await prober
    finally:
        for c in clients:
            await c.close()
        for h in hosts:
            h.stop()
        nats_proc.terminate()
        nats_proc.wait(timeout=10)
        if not args.keep:
            for d in (work, *(h.dir for h in hosts)):
                shutil.rmtree(d, ignore_errors=True)

    def line(name: str, values: list[float]) -> str:
        return f"{name}: n={len(values)} p50 {pct(values, 50):.1f} p99 {pct(values, 99):.1f} max {max(values):.1f} ms"

    ip, iv = [p for p, _ in idle], [v for _, v in idle]
    lp, lv = [p for p, _ in loaded], [v for _, v in loaded]
    print(line(f"after {args.idle:g} s idle, PERSISTED put", ip))
    print(line(f"after {args.idle:g} s idle, pc2 write readable on main_pc", iv))
    print(line(f"under {args.rate:g} PERSISTED puts/s, PERSISTED put (probe)", lp))
    print(line(f"under {args.rate:g} PERSISTED puts/s, pc2 write readable on main_pc", lv))
    print(line(f"the {args.rate:g}/s PERSISTED puts themselves ({load_errors} errors)", load_lat))
    figures = {
        "idle_s": f"{args.idle:g}",
        "trials": str(len(idle)),
        "idle_persisted_p50_ms": f"{pct(ip, 50):.1f}",
        "idle_persisted_p99_ms": f"{pct(ip, 99):.1f}",
        "idle_visible_p50_ms": f"{pct(iv, 50):.1f}",
        "idle_visible_p99_ms": f"{pct(iv, 99):.1f}",
        "loaded_persisted_p50_ms": f"{pct(lp, 50):.1f}",
        "loaded_persisted_p99_ms": f"{pct(lp, 99):.1f}",
        "loaded_visible_p50_ms": f"{pct(lv, 50):.1f}",
        "loaded_visible_p99_ms": f"{pct(lv, 99):.1f}",
        "rate": f"{args.rate:g}",
        "persisted_at_rate_p50_ms": f"{pct(load_lat, 50):.1f}",
        "persisted_at_rate_p99_ms": f"{pct(load_lat, 99):.1f}",
        "persisted_at_rate_errors": str(load_errors),
        "loaded_probe_errors": str(len(probe_errors)),
        "load1": f"{os.getloadavg()[0]:.2f}",
    }
    print(" ".join(f"{k}={v}" for k, v in figures.items()), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
