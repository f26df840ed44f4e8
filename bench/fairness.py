"""Fairness under hostile peers: well-behaved gRPC and ZeroMQ Gets alone, then beside a flood.

One api process with its shipped settings (plus an API key). In each of ``--rounds`` rounds,
back to back: alone, a well-behaved gRPC client and a well-behaved ZeroMQ client, side by side,
each sending Gets open-loop at ``--rate`` per second (latency from each request's scheduled time,
so stalls are not hidden); flooded, the same two clients again, beside a ZeroMQ peer in its own
process that sends as fast as it can without ever reading (small authenticated Gets, 300 KB
unauthenticated bodies, small unauthenticated ones) and 1,000 idle Watch streams over 10
connections, held by another process (in the measuring one, its own garbage collections over
those calls were measured too). The flooder runs at ``--flood-nice`` (a flooder on another machine takes none of the
api's CPU; on a small shared box it would otherwise measure the kernel's share of the cores). The
api's VmRSS is sampled throughout.

    python bench/fairness.py [--rate 100] [--duration 5] [--rounds 3] [--redis-url redis://127.0.0.1:6379/15]
        [--server-settings '{"max_running_per_peer": 16}']   # knob studies: merged into server:

Last line: ``name=value`` figures, including ``grpc_p99_ratio`` and ``zmq_p99_ratio`` (flooded /
alone p99 of each round, the median over rounds: a pair is measured under the same machine load;
the target is <= 2), the per-round ratios, medians of each phase's p50/p99, and ``api_rss_peak_mb``.
The rate is per client: 2 x 100 calls/s leaves the box room; at 300 the bench's own process (both
clients on one event loop) and the api's intake are near their limit on 2 busy cores already alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import redis
from _hosts import BenchHost
from read_latency import KEYS, _chunks, _free_port, open_loop, percentile, seed, spawn, wait_port

from mfh_api.proto import pb, pb_grpc

KEY = "bench-fairness-key"
HERE = os.path.abspath(__file__)
Target = tuple[Callable[[int], Awaitable[None]], Callable[[], Awaitable[None]]]


# -- the flooding peer (its own process: --flood ENDPOINT) ----------------------------------------------


def flood(endpoint: str, seconds: float) -> None:
    """Send as fast as possible for ``seconds`` from one DEALER that never reads; print the counts."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 100)  # a full pipe: try again, keep the clock in view
    sock.connect(endpoint)
    small = json.dumps(
        {"v": 1, "id": "f", "action": "get", "api_key": KEY, "payload": {"namespace": "bench", "key": "k1"}}
    ).encode()
    large = json.dumps(
        {"v": 1, "id": "L", "action": "put", "payload": {"namespace": "x", "key": "k", "pad": "y" * 300_000}}
    ).encode()
    anon = b'{"v": 1, "id": "a", "action": "get", "payload": {"namespace": "bench", "key": "k1"}}'
    pattern = [small] * 8 + [large, anon]
    sent = {"small": 0, "large": 0, "anon": 0}
    names = ["small"] * 8 + ["large", "anon"]
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        try:
            sock.send_multipart([b"", pattern[i % 10]])
        except zmq.Again:
            continue
        sent[names[i % 10]] += 1
        i += 1
    print(json.dumps(sent), flush=True)
    time.sleep(3600)  # never read: the replies stay unanswered until we are killed


# -- well-behaved clients --------------------------------------------------------------------------------


def grpc_client(target: str, timeout: float) -> Target:
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.MemoryFusionStub(channel)
    md = (("x-api-key", KEY),)

    async def call(i: int) -> None:
        await stub.Get(pb.GetRequest(namespace="bench", key=f"k{i % KEYS}"), timeout=timeout, metadata=md)

    async def close() -> None:
        await channel.close(None)

    return call, close


def zmq_client(endpoint: str, timeout: float, codes: Counter[str]) -> Target:
    """One DEALER, replies matched by id (requests pipeline as an agent's would)."""
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    pending: dict[str, asyncio.Future[None]] = {}

    async def receive() -> None:
        while True:
            reply = json.loads((await sock.recv_multipart())[-1])
            fut = pending.pop(str(reply.get("id")), None)
            if fut is not None and not fut.done():
                ok = reply.get("status") == "ok"
                if not ok:
                    codes[str((reply.get("error") or {}).get("code"))] += 1
                fut.set_result(None) if ok else fut.set_exception(RuntimeError(str(reply.get("error"))))

    receiver = asyncio.ensure_future(receive())

    async def call(i: int) -> None:
        rid = str(i)
        fut = asyncio.get_running_loop().create_future()
        pending[rid] = fut
        body = {
            "v": 1,
            "id": rid,
            "action": "get",
            "api_key": KEY,
            "payload": {"namespace": "bench", "key": f"k{i % KEYS}"},
        }
        await sock.send_multipart([b"", json.dumps(body).encode()])
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            codes["timeout"] += 1
            raise
        finally:
            pending.pop(rid, None)

    async def close() -> None:
        receiver.cancel()
        sock.close()
        ctx.term()

    return call, close


async def both(grpc_t: Target, zmq_t: Target, rate: float, duration: float) -> dict[str, tuple[list[float], int]]:
    """Both clients at once, each open-loop at ``rate``; a short warm-up first (discarded)."""
    try:
        await asyncio.gather(open_loop(grpc_t[0], rate, 0.5), open_loop(zmq_t[0], rate, 0.5))
        g, z = await asyncio.gather(open_loop(grpc_t[0], rate, duration), open_loop(zmq_t[0], rate, duration))
        return {"grpc": (g.latencies, g.errors), "zmq": (z.latencies, z.errors)}
    finally:
        await grpc_t[1]()
        await zmq_t[1]()


async def watcher(target: str, n: int) -> None:
    """Hold ``n`` idle Watch streams over 10 connections (its own process: --watcher TARGET); print how many
    opened, then, at a line on stdin, how many are still open, and end."""
    chans, calls = await open_watches(target, n, connections=10)
    try:
        await asyncio.sleep(2.0 if n else 0.0)  # let them open
        print(json.dumps({"open": _open(calls)}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        print(json.dumps({"still_open": _open(calls)}), flush=True)
    finally:
        for c in calls:
            c.cancel()
        for ch in chans:
            await ch.close()


async def open_watches(target: str, n: int, connections: int) -> tuple[list[grpc.aio.Channel], list[Any]]:
    local = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    chans = [grpc.aio.insecure_channel(target, options=local) for _ in range(connections)]
    md = (("x-api-key", KEY),)
    calls = [
        pb_grpc.MemoryFusionStub(chans[i % connections]).Watch(pb.WatchRequest(namespace="idle"), metadata=md)
        for i in range(n)
    ]
    return chans, calls


# -- RSS sampling ------------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """VmRSS of one process every 20 ms; ``peak_mb`` is the largest seen."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_mb = 0.0
        self.last_mb = 0.0
        self.stop = threading.Event()

    def sample(self) -> float:
        m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{self.pid}/status").read_text())
        return int(m.group(1)) / 1024 if m else 0.0

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.last_mb = self.sample()
            except OSError:
                return
            self.peak_mb = max(self.peak_mb, self.last_mb)
            time.sleep(0.02)


def summary(name: str, lat: list[float], errors: int) -> dict[str, float]:
    lat = sorted(lat)
    st = {"p50": percentile(lat, 50), "p99": percentile(lat, 99), "max": lat[-1] if lat else float("nan")}
    st["errors"] = float(errors)
    print(
        f"{name:20s} n={len(lat) + errors} errors={errors} p50={st['p50']:.2f} p99={st['p99']:.2f} "
        f"max={st['max']:.2f} ms",
        flush=True,
    )
    return st


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def one_round(
    args: argparse.Namespace, gt: str, zt: str, r: int, extra: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Alone, then flooded (idle Watch streams + the flooding peer), back to back: one pair of figures
    measured under the same machine load, whatever the other tenants of the box do meanwhile."""
    res: dict[str, dict[str, float]] = {}
    codes: dict[str, Counter[str]] = {"alone": Counter(), "flooded": Counter()}
    alone = await both(
        grpc_client(gt, args.timeout), zmq_client(zt, args.timeout, codes["alone"]), args.rate, args.duration
    )
    for name, (lat, errors) in alone.items():
        res[f"{name}_alone"] = summary(f"round {r} {name} alone", lat, errors)
    # The idle streams live in a process of their own, as the flooder does: 1,000 client calls in the
    # measuring process made its own full garbage collections (100+ ms) part of what it measured.
    watching = subprocess.Popen(  # noqa: ASYNC220 - started once, ended below
        [sys.executable, HERE, "--watcher", gt, "--watches", str(args.watches)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    flooder: subprocess.Popen[bytes] | None = None
    try:
        assert watching.stdout is not None and watching.stdin is not None
        opened = json.loads(await asyncio.to_thread(watching.stdout.readline) or b"{}").get("open", 0)
        extra["watch_streams_open"] = min(extra.get("watch_streams_open", args.watches), opened)
        flood_s, nice = args.duration + 2.5, str(args.flood_nice)
        flooder = subprocess.Popen(  # noqa: ASYNC220 - started once, never waited on here
            [sys.executable, HERE, "--flood", zt, "--flood-seconds", str(flood_s), "--flood-nice", nice],
            stdout=subprocess.PIPE,
        )
        await asyncio.sleep(1.0)  # the flood is under way before measuring
        zc = zmq_client(zt, args.timeout, codes["flooded"])
        flooded = await both(grpc_client(gt, args.timeout), zc, args.rate, args.duration)
        for name, (lat, errors) in flooded.items():
            res[f"{name}_flooded"] = summary(f"round {r} {name} flooded", lat, errors)
        assert flooder.stdout is not None
        line = await asyncio.to_thread(flooder.stdout.readline)
        for k, v in json.loads(line or b"{}").items():
            extra[f"flood_{k}"] = extra.get(f"flood_{k}", 0) + v
        watching.stdin.write(b"done\n")
        watching.stdin.flush()
        still = json.loads(await asyncio.to_thread(watching.stdout.readline) or b"{}").get("still_open", 0)
        extra["watch_streams_still_open"] = min(extra.get("watch_streams_still_open", args.watches), still)
    finally:
        for phase, seen in codes.items():  # why the well-behaved ZeroMQ peer's failures failed
            for code, n in seen.items():
                extra[f"zmq_{phase}_{code}"] = extra.get(f"zmq_{phase}_{code}", 0) + n
        if flooder is not None:
            flooder.kill()
            flooder.wait()
        watching.kill()
        watching.wait()
    return res


def _open(calls: list[Any]) -> int:
    return sum(1 for c in calls if not c.done())


async def main(args: argparse.Namespace) -> None:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    grpc_port, zmq_port = _free_port(), _free_port()
    host = BenchHost(
        redis_url=args.redis_url,
        overrides={
            "storage": {"redis_prefix": prefix},
            "server": {
                "grpc_port": grpc_port,
                "zmq_port": zmq_port,
                "metrics_port": 0,
                "api_key": KEY,
                **json.loads(args.server_settings),
            },
        },
    )
    await seed(host, prefix)
    env = {**os.environ, "MFH_CONFIG_DIR": str(host.dir), "MFH_HOST": host.name}
    api = spawn([sys.executable, "-m", "mfh_api.app"], env, host.dir / "api.log")
    sampler: RssSampler | None = None
    rounds: list[dict[str, dict[str, float]]] = []
    extra: dict[str, Any] = {}
    load = [os.getloadavg()[0]]
    try:
        wait_port(grpc_port, api, host.dir / "api.log")
        wait_port(zmq_port, api, host.dir / "api.log")
        sampler = RssSampler(api.pid)
        extra["api_rss_base_mb"] = sampler.sample()
        sampler.start()
        gt, zt = f"127.0.0.1:{grpc_port}", f"tcp://127.0.0.1:{zmq_port}"
        for r in range(1, args.rounds + 1):
            rounds.append(await one_round(args, gt, zt, r, extra))
            load.append(os.getloadavg()[0])
        extra["api_alive"] = int(api.poll() is None)
    finally:
        if sampler is not None:
            sampler.stop.set()
            sampler.join()
        api.terminate()
        api.wait(timeout=15)
        r = redis.Redis.from_url(args.redis_url)
        for batch in _chunks(list(r.scan_iter(match=f"{prefix}:*", count=1000)), 500):
            r.delete(*batch)
        r.close()
    pairs = [f"rate={args.rate:g}", f"duration_s={args.duration:g}", f"rounds={args.rounds}"]
    pairs.append(f"load1_min={min(load):.2f} load1_max={max(load):.2f}")
    for name in ("grpc", "zmq"):
        ratios = [x[f"{name}_flooded"]["p99"] / x[f"{name}_alone"]["p99"] for x in rounds]
        for phase in ("alone", "flooded"):
            for q in ("p50", "p99"):
                pairs.append(f"{name}_{phase}_{q}_ms={median([x[f'{name}_{phase}'][q] for x in rounds]):.2f}")
            pairs.append(f"{name}_errors_{phase}={sum(x[f'{name}_{phase}']['errors'] for x in rounds):.0f}")
        pairs.append(f"{name}_p99_ratio_rounds={','.join(f'{x:.2f}' for x in ratios)}")
        pairs.append(f"{name}_p99_ratio={median(ratios):.2f}")  # the median of per-round (paired) ratios
    pairs += [f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items()]
    pairs.append(f"api_rss_peak_mb={sampler.peak_mb if sampler else float('nan'):.1f}")
    print(" ".join(pairs), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second per client (open loop)")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds measured per phase")
    ap.add_argument("--rounds", type=int, default=3, help="alone/flooded pairs; figures are medians over rounds")
    ap.add_argument("--watches", type=int, default=1000, help="idle Watch streams beside the flood")
    ap.add_argument("--timeout", type=float, default=5.0, help="per-request timeout (counted as an error)")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="nothing is flushed; keys are removed")
    ap.add_argument("--flood-nice", type=int, default=10, help="niceness of the flooding process (0: same as ours)")
    ap.add_argument("--server-settings", default="{}", help="JSON merged into the server section (knob studies)")
    ap.add_argument("--flood", metavar="ENDPOINT", help=argparse.SUPPRESS)
    ap.add_argument("--watcher", metavar="TARGET", help=argparse.SUPPRESS)
    ap.add_argument("--flood-seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.flood:
        # A flooder elsewhere on the network takes none of the api's CPU; on this one box, a lower
        # priority keeps what is measured the api's own fairness, not the kernel's share of the cores.
        os.nice(a.flood_nice)
        flood(a.flood, a.flood_seconds)
    elif a.watcher:
        asyncio.run(watcher(a.watcher, a.watches))
    else:
        asyncio.run(main(a))
