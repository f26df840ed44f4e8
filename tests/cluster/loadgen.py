"""Load for the cluster bed, run inside a host's namespace against that host's api.

    loadgen.py write --api ADDR --prefix P --rate R --count N [--keys K] --out FILE
        N puts at R/s of keys P-0..P-(N-1) (or, with --keys, cycling over P-0..P-(K-1)); one JSON
        line per acknowledged put: key, version, origin, text, t_ack (unix seconds).
    loadgen.py watch --api ADDR --prefix P --count N --out FILE
        waits for P-0, P-1, ... in turn to be readable; one JSON line each: key, version, t_seen.

Only acknowledged puts are written to the file: those are the ones no host may lose.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

from mfh_client import MemoryClient, MFHError, NotFound, PutSpec

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
    with open(args.out, "a", buffering=1) as out:
        for i in range(args.count):
            key = f"{args.prefix}-{i}"
            deadline = time.monotonic() + args.give_up
            while True:
                try:
                    rec = client.get(NAMESPACE, key, timeout=2.0)
                    out.write(json.dumps({"key": key, "version": rec.version, "t_seen": time.time()}) + "\n")
                    break
                except NotFound:
                    pass
                except MFHError as e:
                    print(f"get {key}: {e.code}", file=sys.stderr, flush=True)
                if time.monotonic() > deadline:
                    print(f"gave up on {key}", file=sys.stderr, flush=True)
                    break
                time.sleep(0.002)
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
