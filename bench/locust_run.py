"""The blueprint's Locust load test, run for you: MFH api and the naive peer, single gRPC Gets at 1,000/s.

Starts an api (``python -m mfh_api.app``, shipped settings, its own Redis key prefix with 1,000
seeded entries, as bench/read_latency.py does) and the naive peer beside it (a grpc.aio server doing
one Redis GET per call), then runs ``locust -f bench/locustfile.py --headless`` for ``--run-time``
seconds against each in turn, with ``--csv``, and reads the aggregated percentiles from the CSV.
Statistics are reset once all users are spawned. The blueprint's bar: p95 <= 20 ms at 1,000 reads/s.

    python bench/locust_run.py [--rate 1000] [--users 50] [--run-time 30] [--redis-url redis://127.0.0.1:6379/15]

Last line: ``name=value`` figures (``locust_p95_ms=…``, ``bare_locust_p95_ms=…``, ``p95_ok=…``).
Exit status 1 when the api's p95 misses the bar or Locust could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import resource
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import redis
from _hosts import BenchHost
from read_latency import _chunks, _free_port, seed, spawn, wait_port

HERE = Path(__file__).resolve().parent
P95_TARGET_MS = 20.0


def run_locust(args: argparse.Namespace, target: str, csv_prefix: Path, log: Path) -> dict[str, float]:
    """One headless Locust run against ``target`` (HOST:PORT); the aggregated row of its stats CSV."""
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(HERE / "locustfile.py"),
        "--headless",
        "--only-summary",
        "--reset-stats",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.users),
        "--run-time",
        f"{args.run_time:g}s",
        "--stop-timeout",
        "5",
        "--host",
        target,
        "--mfh-rate",
        f"{args.rate:g}",
        "--csv",
        str(csv_prefix),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "ab") as out:
        # Exit status 1 means "some requests failed": the CSV still holds the figures.
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=args.run_time + 120, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # Locust's own CPU (startup included): near run_time means the load generator, not the server, was the limit.
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stats = Path(f"{csv_prefix}_stats.csv")
    if not stats.exists():
        raise SystemExit(f"locust exited {proc.returncode} without {stats.name}:\n{log.read_text()[-2000:]}")
    with open(stats, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("Name") == "Aggregated"]
    if not rows:
        raise SystemExit(f"{stats}: no Aggregated row")
    row = rows[0]
    return {
        "requests": float(row["Request Count"]),
        "failures": float(row["Failure Count"]),
        "rps": float(row["Requests/s"]),
        "p50_ms": float(row["50%"]),
        "p95_ms": float(row["95%"]),
        "p99_ms": float(row["99%"]),
        "max_ms": float(row["Max Response Time"]),
        "cpu_s": round(cpu_s, 1),
    }


def main(args: argparse.Namespace) -> int:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    grpc_port, bare_port = _free_port(), _free_port()
    host = BenchHost(
        redis_url=args.redis_url,
        overrides={
            "storage": {"redis_prefix": prefix},
            "server": {"grpc_port": grpc_port, "zmq_port": _free_port(), "metrics_port": 0, "api_key": None},
        },
    )
    asyncio.run(seed(host, prefix))
    env = {**os.environ, "MFH_CONFIG_DIR": str(host.dir), "MFH_HOST": host.name}
    api = spawn([sys.executable, "-m", "mfh_api.app"], env, host.dir / "api.log")
    bare_cmd = [sys.executable, str(HERE / "read_latency.py"), "--bare-server", str(bare_port)]
    bare = spawn([*bare_cmd, "--redis-url", args.redis_url, "--prefix", prefix], env, host.dir / "bare.log")
    out = Path(tempfile.mkdtemp(prefix="mfh-bench-locust-")) if args.csv_dir is None else Path(args.csv_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    try:
        wait_port(grpc_port, api, host.dir / "api.log")
        wait_port(bare_port, bare, host.dir / "bare.log")
        targets = {"locust": grpc_port, "bare_locust": bare_port}
        if args.no_baseline:
            del targets["bare_locust"]
        for name, port in targets.items():
            st = results[name] = run_locust(args, f"127.0.0.1:{port}", out / name, out / f"{name}.log")
            print(
                f"{name:11s} {st['requests']:.0f} Gets ({st['failures']:.0f} failed) at {st['rps']:.0f}/s: "
                f"p50={st['p50_ms']:g} p95={st['p95_ms']:g} p99={st['p99_ms']:g} max={st['max_ms']:g} ms; "
                f"Locust used {st['cpu_s']:g} s CPU",
                flush=True,
            )
    finally:
        for p in (api, bare):
            p.terminate()
            p.wait(timeout=15)
        r = redis.Redis.from_url(args.redis_url)
        for batch in _chunks(list(r.scan_iter(match=f"{prefix}:*", count=1000)), 500):
            r.delete(*batch)
        r.close()
    print(f"csv and logs: {out}", flush=True)
    ok = results["locust"]["p95_ms"] <= P95_TARGET_MS and results["locust"]["failures"] == 0
    pairs = [f"rate={args.rate:g}", f"users={args.users}", f"run_time_s={args.run_time:g}"]
    for name, st in results.items():
        pairs += [f"{name}_{k}={v:g}" for k, v in st.items()]
    pairs += [f"p95_target_ms={P95_TARGET_MS:g}", f"p95_ok={ok}", f"load1={os.getloadavg()[0]:.2f}"]
    print(" ".join(pairs), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--rate", type=float, default=1000.0, help="Gets per second offered by all users together")
    ap.add_argument("--users", type=int, default=50, help="Locust users (one gRPC channel each)")
    ap.add_argument("--run-time", type=float, default=30.0, help="seconds per Locust run, after spawning")
    ap.add_argument("--no-baseline", action="store_true", help="skip the naive peer's run")
    ap.add_argument("--csv-dir", help="where Locust's CSV files and logs go (default: a new temp dir)")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15", help="nothing is flushed; keys are removed")
    a = ap.parse_args()
    if a.rate <= 0 or a.users < 1 or a.run_time <= 0:
        ap.error("--rate and --run-time must be positive and --users at least 1")
    sys.exit(main(a))
