"""Audit cost: the incremental audit (from the last verified snapshot) against the full one.

Writes ``--events`` events (two origins, puts and deletes over ``--keys`` keys, ~100-byte payloads)
into a SQLite store, takes a snapshot after the first 90%, then runs the full audit (the baseline;
it also verifies the snapshot on its way) and the incremental audit, which must take at most a
fifth of the full one's time (the median of ``--repeat`` incremental runs). All must agree with the
live checksum. The events are generated and inserted 5,000 at a time.

    python bench/audit.py [--events 1000000] [--keys 100000]     # a few minutes
    python bench/audit.py --events 100000                         # a quick run
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from replay import iter_generated

from mfh_core import SqlStore
from schedules.jobs import audit, snapshot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--snapshot-at", type=float, default=0.9, help="fraction of the events before the snapshot")
    ap.add_argument("--repeat", type=int, default=3, help="incremental audits (the median counts; default 3)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mfh-bench-audit-") as tmp:
        store = SqlStore(f"sqlite:///{tmp}/live.db")
        store.create_schema()
        snaps = Path(tmp) / "snapshots"
        events = iter_generated(args.events, args.keys)
        cut = int(args.events * args.snapshot_at)
        t0 = time.perf_counter()
        for done in range(0, args.events, 5000):
            if done <= cut < done + 5000:
                store.apply_batch(list(itertools.islice(events, cut - done)), published=True)
                snap = snapshot(store, snaps, host="bench")
                store.apply_batch(list(itertools.islice(events, done + 5000 - cut)), published=True)
            else:
                store.apply_batch(list(itertools.islice(events, 5000)), published=True)
        load_s = time.perf_counter() - t0
        print(f"loaded {args.events} events ({cut} before {snap.name}) in {load_s:.1f} s", file=sys.stderr)
        full = audit(store, host="bench", report_dir=snaps, full=True)
        print(f"full audit:        {full.events:>9} events in {full.seconds:7.2f} s  ok={full.ok}", file=sys.stderr)
        runs = []
        for _ in range(args.repeat):
            runs.append(audit(store, host="bench", report_dir=snaps))
            inc = runs[-1]
            print(f"incremental audit: {inc.events:>9} events in {inc.seconds:7.2f} s  ok={inc.ok}", file=sys.stderr)
        items = store.counts()["items"]
        store.close()
    inc_s = statistics.median(r.seconds for r in runs)
    ratio = inc_s / full.seconds if full.seconds else 0.0
    ok = full.ok and all(r.ok and r.mode == "incremental" for r in runs) and full.verified_snapshot is not None
    print(
        f"events={args.events} keys={args.keys} items={items} snapshot_at={cut} full_s={full.seconds:.2f} "
        f"incremental_s={inc_s:.2f} full_events_per_s={full.events / full.seconds:.0f} "
        f"incremental_events={runs[0].events} ratio={ratio:.3f} within_fifth={ratio <= 0.2} ok={ok} "
        f"load_avg={os.getloadavg()[0]:.1f}"
    )
    return 0 if ok and ratio <= 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
