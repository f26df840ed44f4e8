"""Bytes per record: what a 300-byte memory costs in Redis (hot store entry, dirty and clean) and in
SQLite (the events row plus the items row, with their indexes).

Stages ``--records`` puts through ``HotStore.stage_many`` into a Redis under a fresh prefix (INFO
``used_memory`` before and after; the baseline is the same Redis before the run), then persists the
same events into an empty SQLite and divides its file size (after a checkpoint) by the count.

    python bench/sizing.py --redis redis://127.0.0.1:6379/15 [--records 20000] [--payload-bytes 300]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import sys
import tempfile
import uuid
from pathlib import Path

from mfh_core import HotStore, SqlStore
from mfh_core.hotstore import Change
from mfh_models import Kind, Op, canonical_json


async def _redis(url: str, n: int, payload: str) -> tuple[float, float, list[object]]:
    hot = HotStore(redis_url=url, prefix=f"size{uuid.uuid4().hex[:8]}", origin="main_pc", cache_ttl_seconds=3600)
    try:
        before = int((await hot.redis.info("memory"))["used_memory"])
        events = []
        for i in range(0, n, 500):
            keys = [f"memory-{j:08d}" for j in range(i, min(i + 500, n))]
            changes = [Change(Op.PUT, "agent-ns", key, Kind.MEMORY_ITEM, payload) for key in keys]
            events += await hot.stage_many(changes)
        dirty = int((await hot.redis.info("memory"))["used_memory"])
        for i in range(0, len(events), 500):
            await hot.mark_clean(events[i : i + 500])
        clean = int((await hot.redis.info("memory"))["used_memory"])
        await hot.redis.flushdb()
        return (dirty - before) / n, (clean - before) / n, list(events)
    finally:
        await hot.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", required=True, help="a Redis database this bench may flush (say /15)")
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--payload-bytes", type=int, default=300)
    args = ap.parse_args()
    filler = "x" * max(args.payload_bytes - len(canonical_json({"content": "", "tags": ["t"]})), 0)
    payload = canonical_json({"content": filler, "tags": ["t"]})
    dirty, clean, events = asyncio.run(_redis(args.redis, args.records, payload))
    with tempfile.TemporaryDirectory(prefix="mfh-bench-size-") as tmp:
        empty = SqlStore(f"sqlite:///{tmp}/empty.db")
        empty.create_schema()
        empty.close()
        base = Path(f"{tmp}/empty.db").stat().st_size
        store = SqlStore(f"sqlite:///{tmp}/size.db")
        store.create_schema()
        for i in range(0, len(events), 1000):
            store.apply_batch(events[i : i + 1000], published=True)  # type: ignore[arg-type]
        store.close()
        with contextlib.closing(sqlite3.connect(f"{tmp}/size.db")) as conn:  # fold the WAL in: the file as it stays
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        sqlite_bytes = (Path(f"{tmp}/size.db").stat().st_size - base) / args.records
    print(
        f"payload_bytes={len(payload)} records={args.records} redis_dirty_bytes_per_record={dirty:.0f} "
        f"redis_clean_bytes_per_record={clean:.0f} sqlite_bytes_per_record={sqlite_bytes:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
