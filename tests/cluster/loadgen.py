"""Load for the cluster bed, run inside a host's namespace against that host's api.

    loadgen.py write --api ADDR --prefix P --rate R --count N [--keys K] --out FILE
        N puts at R/s of keys P-0..P-(N-1) (or, with --keys, cycling over P-0..P-(K-1)); one JSON
        line per acknowledged put: key, version, origin, text, t_ack (unix seconds).
    loadgen.py watch --api ADDR --prefix P --count N --out FILE
        polls P-0..P-(N-1) until each is readable; one JSON line each: key, version, t_seen.

Only acknowledged puts are written to the file: those are the ones no host may lose.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from mfh_client import MemoryClient, MFHError, PutSpec

NAMESPACE = "cluster"


def write(args: argparse.Namespace, client: MemoryClient) -> int:
    errors = 0
    t0 = time.monotonic()
    with open(args.out, "a", buffering=1) as out:
        for i in range(args.count):
            due = t0 + i / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            key = f"{args.prefix}-{i % args.keys if args.keys else i}"
            text = f"{args.origin}:{i}"
            try:
                res = client.put(PutSpec(NAMESPACE, key, "memory_item", {"content": text}), timeout=2.0)
            except MFHError as e:
                errors += 1
                print(f"put {key} failed: {e.code}", file=sys.stderr, flush=True)
                continue
            rec = {"key": key, "version": res.version, "origin": args.origin, "text": text, "t_ack": time.time()}
            out.write(json.dumps(rec) + "\n")
    print(f"done: {args.count - errors} acknowledged, {errors} failed", file=sys.stderr, flush=True)
    return 0


def watch(args: argparse.Namespace, client: MemoryClient) -> int:
    """Poll every key not seen yet (in chunks, oldest first), so one late key does not delay the others."""
    pending = [f"{args.prefix}-{i}" for i in range(args.count)]
    last_progress = time.monotonic()
    with open(args.out, "a", buffering=1) as out:
        while pending and time.monotonic() - last_progress < args.give_up:
            chunk = pending[:100]
            try:
                found, _ = client.batch_get(NAMESPACE, chunk, timeout=2.0)
            except MFHError as e:
                print(f"batch_get: {e.code}", file=sys.stderr, flush=True)
                continue
            now = time.time()
            seen = {r.key for r in found}
            for r in found:
                out.write(json.dumps({"key": r.key, "version": r.version, "t_seen": now}) + "\n")
            if seen:
                pending = [k for k in pending if k not in seen]
                last_progress = time.monotonic()
            time.sleep(0.002)
    if pending:
        print(f"gave up on {len(pending)} keys", file=sys.stderr, flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["write", "watch"])
    p.add_argument("--api", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--rate", type=float, default=50.0)
    p.add_argument("--keys", type=int, default=0)
    p.add_argument("--origin", default="")
    p.add_argument("--give-up", type=float, default=20.0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with MemoryClient(args.api, timeout=2.0, retries=2) as client:
        return write(args, client) if args.mode == "write" else watch(args, client)


if __name__ == "__main__":
    sys.exit(main())
