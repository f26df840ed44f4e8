"""Open-loop Get latency: MFH over gRPC and ZeroMQ beside a bare grpc.aio server doing one Redis GET.

Requests leave at fixed scheduled times (``--rate`` per second) whatever the replies do, and each
latency is measured from its scheduled time, so a stalled server shows up as latency instead of
silently lowering the rate (no coordinated omission). Every server runs in its own process; the
load generator is this process. Keys live under a fresh Redis key prefix, deleted at the end.

    python bench/read_latency.py [--rate 1000] [--duration 10] [--redis-url redis://127.0.0.1:6379/15]
    python bench/read_latency.py --rates 500,1000,1500,2000 --closed-loop 16,64     # what the suite runs

Prints one line per target and, last, ``name=value`` pairs (``grpc_p99_ms=…`` etc.; with ``--rates``
also ``grpc_p99_ms_at_2000=…`` per rate, with ``--closed-loop`` the maximum ``grpc_max_per_s=…``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from _hosts import BenchHost

from mfh_api.proto import pb, pb_grpc
from mfh_core import HotStore
from mfh_models import Kind, Record, canonical_json

KEYS = 1000
HERE = os.path.abspath(__file__)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the baseline server (run in its own process with --bare-server) ------------------------------------


class _Bare(pb_grpc.MemoryFusionServicer):  # type: ignore[misc]
    def __init__(self, r: Any, prefix: str) -> None:
        self.r, self.prefix = r, prefix

    async def Get(self, request: Any, context: Any) -> Any:
        value = await self.r.get(f"{self.prefix}:bare:{request.key}")
        return pb.GetResponse(record=pb.Record(namespace=request.namespace, key=request.key, payload_json=value))


async def serve_bare(port: int, redis_url: str, prefix: str) -> None:
    """grpc.aio + one Redis GET per call: what gRPC itself costs on this machine."""
    import redis.asyncio as aioredis

    pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=64, decode_responses=True)
    server = grpc.aio.server(maximum_concurrent_rpcs=256)
    pb_grpc.add_MemoryFusionServicer_to_server(_Bare(aioredis.Redis(connection_pool=pool), prefix), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# -- the load generator ------------------------------------------------------------------------------


@dataclass
class Window:
    """One open-loop run: latencies (ms, from each request's scheduled time), errors, and how late the client
    itself sent each request (ms after its scheduled time: when this lag is a large part of the latency, the
    load generator and not the server is the limit)."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    send_lag: list[float] = field(default_factory=list)
    server_cpu_s: float = 0.0  # CPU time the server process used during the window (user + system)
    client_cpu_s: float = 0.0  # and this process (the load generator)

    def add(self, other: Window) -> None:
        self.latencies += other.latencies
        self.errors += other.errors
        self.send_lag += other.send_lag
        self.server_cpu_s += other.server_cpu_s
        self.client_cpu_s += other.client_cpu_s


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (its threads included); 0.0 where /proc is missing."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def quiet_collector() -> Iterator[None]:
    """The load generator's own garbage collector kept off the measured window, for every target alike.

    With CPython's default collector the client's full collections walked everything it had imported
    (grpc, protobuf, redis, the hub's models) and every request still referenced: 26-115 ms of CPU each,
    17 of them in one run at 1,000 and 2,000/s, each a stall that the open loop rightly counts as latency of whichever
    target it hit. Collected and frozen before the window, a full collection inside it sees only what the
    window itself allocated."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def open_loop(call: Callable[[int], Awaitable[None]], rate: float, duration: float) -> Window:
    """Start call i at t0 + i/rate, whatever the replies do; only the requests in flight are kept alive."""
    loop = asyncio.get_running_loop()
    out = Window()
    n = int(rate * duration)
    t0 = loop.time() + 0.05

    async def one(i: int, scheduled: float) -> None:
        out.send_lag.append((loop.time() - scheduled) * 1000)
        try:
            await call(i)
            out.latencies.append((loop.time() - scheduled) * 1000)
        except Exception:
            out.errors += 1

    running: set[asyncio.Future[None]] = set()
    for i in range(n):
        scheduled = t0 + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(i, scheduled))
        running.add(task)
        task.add_done_callback(running.discard)
    if running:
        await asyncio.wait(running)
    return out


def percentile(sorted_ms: list[float], q: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, max(0, round(q / 100 * len(sorted_ms)) - 1))]


def grpc_call(target: str, timeout: float) -> tuple[Callable[[int], Awaitable[None]], Callable[[], Awaitable[None]]]:
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.MemoryFusionStub(channel)

    async def call(i: int) -> None:
        await stub.Get(pb.GetRequest(namespace="bench", key=f"k{i % KEYS}"), timeout=timeout)

    async def close() -> None:
        await channel.close(None)

    return call, close


def zmq_call(endpoint: str, timeout: float) -> tuple[Callable[[int], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """One DEALER socket, replies matched to requests by id (requests pipeline like an agent's would)."""
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    pending: dict[str, asyncio.Future[None]] = {}

    async def receive() -> None:
        while True:
            frames = await sock.recv_multipart()
            reply = json.loads(frames[-1])
            fut = pending.pop(str(reply.get("id")), None)
            if fut is not None and not fut.done():
                if reply.get("status") == "ok":
                    fut.set_result(None)
                else:
                    fut.set_exception(RuntimeError(str(reply.get("error"))))

    receiver = asyncio.ensure_future(receive())

    async def call(i: int) -> None:
        rid = str(i)
        fut = asyncio.get_running_loop().create_future()
        pending[rid] = fut
        body = {"v": 1, "id": rid, "action": "get", "payload": {"namespace": "bench", "key": f"k{i % KEYS}"}}
        await sock.send_multipart([b"", json.dumps(body).encode()])
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            pending.pop(rid, None)

    async def close() -> None:
        receiver.cancel()
        sock.close()
        ctx.term()

    return call, close


Target = tuple[Callable[[int], Awaitable[None]], Callable[[], Awaitable[None]]]


async def measure(target: Target, args: argparse.Namespace, rate: float | None = None, server_pid: int = 0) -> Window:
    """A warm-up (discarded), then ``--duration`` s at ``rate`` (default ``--rate``); with ``server_pid``, the
    CPU time that process and this one used in the window."""
    call, close = target
    rate = args.rate if rate is None else rate
    try:
        await open_loop(call, rate, min(2.0, args.duration))
        with quiet_collector():
            server0, client0 = cpu_seconds(server_pid) if server_pid else 0.0, time.process_time()
            w = await open_loop(call, rate, args.duration)
            w.server_cpu_s = cpu_seconds(server_pid) - server0 if server_pid else 0.0
            w.client_cpu_s = time.process_time() - client0
            return w
    finally:
        await close()


async def closed_loop(call: Callable[[int], Awaitable[None]], concurrency: int, duration: float) -> tuple[float, int]:
    """``concurrency`` callers, each sending its next request when the last one answers: (replies/s, errors)."""
    loop = asyncio.get_running_loop()
    done = errors = 0
    deadline = loop.time() + duration

    async def caller(i: int) -> None:
        nonlocal done, errors
        while loop.time() < deadline:
            try:
                await call(i)
                done += 1
            except Exception:
                errors += 1
            i += concurrency

    t0 = loop.time()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    return done / (loop.time() - t0), errors


async def max_throughput(name: str, make: Callable[[], Target], levels: list[int], seconds: float) -> dict[int, float]:
    """Closed-loop replies/s at each concurrency level (a fresh client each, after a 1 s warm-up)."""
    out: dict[int, float] = {}
    for c in levels:
        call, close = make()
        try:
            await closed_loop(call, c, min(1.0, seconds))
            with quiet_collector():
                out[c], errors = await closed_loop(call, c, seconds)
        finally:
            await close()
        print(f"{name:5s} closed loop c={c}: {out[c]:.0f}/s errors={errors}", flush=True)
    return out


def summary(name: str, w: Window, rate: float) -> dict[str, float]:
    lat, lag = sorted(w.latencies), sorted(w.send_lag)
    stats = {q: percentile(lat, float(q[1:])) for q in ("p50", "p95", "p99")}
    stats |= {"max": lat[-1] if lat else float("nan"), "errors": float(w.errors), "lag_p99": percentile(lag, 99)}
    n = len(lat) + w.errors
    stats["server_cpu_us"] = w.server_cpu_s / n * 1e6 if n else float("nan")
    stats["client_cpu_us"] = w.client_cpu_s / n * 1e6 if n else float("nan")
    print(
        f"{name:5s} rate={rate:g}/s n={n} errors={w.errors} p50={stats['p50']:.2f} "
        f"p95={stats['p95']:.2f} p99={stats['p99']:.2f} max={stats['max']:.2f} ms "
        f"(client send lag p99={stats['lag_p99']:.2f} ms; CPU per call: server {stats['server_cpu_us']:.0f} us, "
        f"client {stats['client_cpu_us']:.0f} us)",
        flush=True,
    )
    return stats


# -- orchestration -------------------------------------------------------------------------------------


async def seed(host: BenchHost, prefix: str) -> None:
    """Clean hot-store entries (as a read-repair fill leaves them) plus the bare server's plain keys."""
    s = host.settings
    hot = HotStore(redis_url=s.storage.redis_url, prefix=prefix, origin=s.host_id, cache_ttl_seconds=3600)
    payload = canonical_json({"content": "x" * 200, "tags": ["bench"], "schema_version": 1})
    for i in range(KEYS):
        rec = Record(
            namespace="bench", key=f"k{i}", kind=Kind.MEMORY_ITEM, payload=payload, version=(i + 1) << 16,
            origin=s.host_id, updated_at=1,
        )  # fmt: skip
        await hot.apply(rec, from_sql=True)
        await hot.redis.set(f"{prefix}:bare:k{i}", payload, ex=3600)
    await hot.close()


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"server not listening on {port} after {timeout}s:\n{log.read_text()[-2000:]}")


def spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - lives with the process
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def main(args: argparse.Namespace) -> None:
    if args.nice:
        os.nice(args.nice)  # inherited by the servers spawned below
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    grpc_port, zmq_port, bare_port, metrics_port = _free_port(), _free_port(), _free_port(), _free_port()
    host = BenchHost(
        redis_url=args.redis_url,
        overrides={
            "storage": {"redis_prefix": prefix},
            "server": {"grpc_port": grpc_port, "zmq_port": zmq_port, "metrics_port": metrics_port, "api_key": None},
        },
    )
    await seed(host, prefix)
    env = {**os.environ, "MFH_CONFIG_DIR": str(host.dir), "MFH_HOST": host.name}
    api = spawn([sys.executable, "-m", "mfh_api.app"], env, host.dir / "api.log")
    bare_cmd = [
        sys.executable,
        HERE,
        "--bare-server",
        str(bare_port),
        "--redis-url",
        args.redis_url,
        "--prefix",
        prefix,
    ]
    bare = spawn(bare_cmd, env, host.dir / "bare.log")
    results: dict[str, dict[str, float] | None] = {}
    near: dict[str, float] = {"hit": 0.0, "miss": 0.0, "bypass": 0.0}
    rates = sorted({args.rate, *args.rates})  # low to high; --rate's figures also print without a suffix
    at_rate: dict[float, dict[str, dict[str, float] | None]] = {rate: {} for rate in rates}
    maxima: dict[str, dict[int, float]] = {}
    try:
        wait_port(grpc_port, api, host.dir / "api.log")
        wait_port(bare_port, bare, host.dir / "bare.log")
        targets: dict[str, Callable[[], Target] | None] = {
            "grpc": lambda: grpc_call(f"127.0.0.1:{grpc_port}", args.timeout),
            "zmq": lambda: zmq_call(f"tcp://127.0.0.1:{zmq_port}", args.timeout),
            "bare": lambda: grpc_call(f"127.0.0.1:{bare_port}", args.timeout),
        }
        try:
            wait_port(zmq_port, api, host.dir / "api.log", timeout=2.0)
        except SystemExit:
            print("zmq   n/a: the api did not open its ZeroMQ port (mfh_api.zmq_server missing?)", flush=True)
            targets["zmq"] = None
        targets = {name: make for name, make in targets.items() if name in args.targets}
        for rate in rates:
            samples = {name: Window() for name in targets}
            for rnd in range(args.rounds):  # interleaved, so background noise hits every target alike
                for name, make in targets.items():
                    if make is None:
                        continue
                    w = await measure(make(), args, rate, server_pid=(bare if name == "bare" else api).pid)
                    if args.rounds > 1:
                        summary(f"{name}#{rnd + 1}", w, rate)
                    samples[name].add(w)
            for name, make in targets.items():
                at_rate[rate][name] = None if make is None else summary(name, samples[name], rate)
        results = at_rate[args.rate]
        for name, make in targets.items():
            if make is not None and args.closed_loop:
                maxima[name] = await max_throughput(name, make, args.closed_loop, args.closed_loop_seconds)
        # The 1,000 keys are read over and over: after the warm-up the api answers from its near cache.
        near = near_cache_lookups(metrics_port)
        print("api near cache lookups: " + ", ".join(f"{k} {v:.0f}" for k, v in near.items()), flush=True)
    finally:
        for p in (api, bare):
            p.terminate()
            p.wait(timeout=15)
        r = redis.Redis.from_url(args.redis_url)
        for batch in _chunks(list(r.scan_iter(match=f"{prefix}:*", count=1000)), 500):
            r.delete(*batch)
        r.close()
    pairs = [
        f"rate={args.rate:g}",
        f"duration_s={args.duration:g}",
        f"rounds={args.rounds}",
        f"nice={args.nice}",
        f"load1={os.getloadavg()[0]:.2f}",
    ]
    for name, st in results.items():
        for q in ("p50", "p95", "p99"):
            pairs.append(f"{name}_{q}_ms=" + ("nan" if st is None else f"{st[q]:.2f}"))
        pairs.append(f"{name}_errors=" + ("nan" if st is None else f"{st['errors']:.0f}"))
        pairs.append(f"{name}_send_lag_p99_ms=" + ("nan" if st is None else f"{st['lag_p99']:.2f}"))
        pairs.append(f"{name}_server_cpu_us=" + ("nan" if st is None else f"{st['server_cpu_us']:.0f}"))
        pairs.append(f"{name}_client_cpu_us=" + ("nan" if st is None else f"{st['client_cpu_us']:.0f}"))
    if args.rates:  # every rate measured, --rate included: name_p99_ms_at_1000=...
        for rate in sorted(rates):
            for name, st in at_rate[rate].items():
                for q in ("p50", "p95", "p99"):
                    pairs.append(f"{name}_{q}_ms_at_{rate:g}=" + ("nan" if st is None else f"{st[q]:.2f}"))
                pairs.append(f"{name}_errors_at_{rate:g}=" + ("nan" if st is None else f"{st['errors']:.0f}"))
    for name, by_c in maxima.items():
        pairs += [f"{name}_max_per_s_c{c}={v:.0f}" for c, v in by_c.items()]
        pairs.append(f"{name}_max_per_s={max(by_c.values()):.0f}")
    pairs.append(f"near_hit_ratio={near.get('hit', 0.0) / max(sum(near.values()), 1):.3f}")
    print(" ".join(pairs), flush=True)


def near_cache_lookups(metrics_port: int) -> dict[str, float]:
    """The api's near-cache lookups by result (hit, miss, bypass), from its metrics endpoint."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    found = re.findall(r'^mfh_near_cache_lookups_total\{result="(\w+)"\} (\S+)$', text, re.MULTILINE)
    return {"hit": 0.0, "miss": 0.0, "bypass": 0.0} | {k: float(v) for k, v in found}


def _floats(value: str) -> list[float]:
    """``"500,1000"`` -> ``[500.0, 1000.0]`` (an argparse type: bad input is a usage error)."""
    try:
        out = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {value!r}") from None
    if not out or any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"need positive numbers: {value!r}")
    return out


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rate", type=float, default=1000.0, help="requests per second (open loop)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per target")
    ap.add_argument(
        "--rates",
        type=_floats,
        default=[],
        metavar="R1,R2,...",
        help="also measure at these rates (open loop); prints name_p99_ms_at_RATE=... for each, --rate included",
    )
    ap.add_argument(
        "--closed-loop",
        type=lambda v: [int(x) for x in _floats(v)],
        default=[],
        metavar="C1,C2,...",
        help="then the maximum throughput: closed loop at these concurrencies, the best as name_max_per_s=...",
    )
    ap.add_argument("--closed-loop-seconds", type=float, default=5.0, help="seconds per closed-loop level")
    ap.add_argument(
        "--targets",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=["grpc", "zmq", "bare"],
        metavar="grpc,zmq,bare",
        help="which targets to measure (default all three)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per target (percentiles over all)")
    ap.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness increment for this run and its servers (negative needs root): on a shared machine, "
        "measures MFH rather than whatever else is running; the last line records it",
    )
    ap.add_argument("--timeout", type=float, default=5.0, help="per-request timeout (counted as an error)")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="nothing is flushed; keys are removed")
    ap.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", default="bench", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.bare_server:
        asyncio.run(serve_bare(a.bare_server, a.redis_url, a.prefix))
    else:
        asyncio.run(main(a))
