"""Audit cost: the incremental audit (from the last verified snapshot) against the full one.

Writes ``--events`` events (two origins, puts and deletes over ``--keys`` keys, ~100-byte payloads)
into a SQLite store, takes a snapshot after the first 90%, then runs the full audit (the baseline;
it also verifies the snapshot on its way) and the incremental audit, which must take at most a
fifth of the full one's time. Both must agree with the live checksum.

    python bench/audit.py [--events 1000000] [--keys 100000]     # a few minutes
    python bench/audit.py --events 100000                         # a quick run
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from replay import generate

from mfh_core import SqlStore
from schedules.jobs import audit, snapshot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--snapshot-at", type=float, default=0.9, help="fraction of the events before the snapshot")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mfh-bench-audit-") as tmp:
        store = SqlStore(f"sqlite:///{tmp}/live.db")
        store.create_schema()
        snaps = Path(tmp) / "snapshots"
        events = generate(args.events, args.keys)
        cut = int(len(events) * args.snapshot_at)
        t0 = time.perf_counter()
        for i in range(0, cut, 5000):
            store.apply_batch(events[i : min(i + 5000, cut)], published=True)
        snap = snapshot(store, snaps, host="bench")
        for i in range(cut, len(events), 5000):
            store.apply_batch(events[i : i + 5000], published=True)
        load_s = time.perf_counter() - t0
        print(f"loaded {len(events)} events ({cut} before {snap.name}) in {load_s:.1f} s", file=sys.stderr)
        full = audit(store, host="bench", report_dir=snaps, full=True)
        print(f"full audit:        {full.events:>9} events in {full.seconds:7.2f} s  ok={full.ok}", file=sys.stderr)
        inc = audit(store, host="bench", report_dir=snaps)
        print(f"incremental audit: {inc.events:>9} events in {inc.seconds:7.2f} s  ok={inc.ok}", file=sys.stderr)
        store.close()
    ratio = inc.seconds / full.seconds if full.seconds else 0.0
    ok = full.ok and inc.ok and inc.mode == "incremental" and full.verified_snapshot is not None
    print(
        f"events={len(events)} snapshot_at={cut} full_s={full.seconds:.2f} incremental_s={inc.seconds:.2f} "
        f"full_events_per_s={full.events / full.seconds:.0f} incremental_events={inc.events} "
        f"ratio={ratio:.3f} within_fifth={ratio <= 0.2} ok={ok}"
    )
    return 0 if ok and ratio <= 0.2 else 1


if __name__ == "__main__":
    sys.exit(main())
