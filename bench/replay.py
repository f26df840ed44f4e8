"""Replay speed: rebuild an items table from a 200,000-event log, and the checksum it must reach.

Generates the events (two origins, puts and deletes over 50,000 keys) into a source SQLite events
table, then replays that table into an empty SQLite (``mfh_tasks.replay.replay_from_sql``) and,
as the baseline, applies the same events held in memory with raw ``SqlStore.apply_batch`` calls
(no reading). Both must end with the source's checksum. The replay's rate leaves out computing the
checksum of the result, as the baseline's does (``replay_with_checksum_events_per_s`` includes it).

What the search index costs the write path, in the same run: the same events applied from memory
into a store without the index (``index_search=False``) beside the baseline (which writes it), in
alternating rounds (``--rounds``, the best of each kept): ``apply_unindexed_per_s``,
``apply_indexed_per_s`` and ``index_cost_ratio`` (indexed / unindexed; issue 12 asks >= 0.8), and the
same per second of the process's CPU time (``*_cpu_per_s``, ``index_cost_ratio_cpu``): on a shared,
loaded machine the clock mostly measures the wait for a core.

    python bench/replay.py [--events 200000] [--batch 5000] [--into postgresql://...]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mfh_core import SqlStore
from mfh_models import Kind, MemoryEvent, Op, canonical_json, event_id_for, pack
from mfh_tasks.replay import open_target, replay_from_sql

T0_MS = 1_760_000_000_000


def generate(n: int, keys: int, seed: int = 1) -> list[MemoryEvent]:
    """``n`` events with distinct versions, about 15% deletes, from main_pc and pc2."""
    return list(iter_generated(n, keys, seed))


def iter_generated(n: int, keys: int, seed: int = 1) -> Iterator[MemoryEvent]:
    """The events of :func:`generate`, one at a time (for a million without holding them all)."""
    rng = random.Random(seed)
    for i in range(n):
        origin = "main_pc" if rng.random() < 0.5 else "pc2"
        version = pack(T0_MS + i, rng.randrange(4))
        delete = rng.random() < 0.15
        payload = "null" if delete else canonical_json({"content": f"memory {i} " + "x" * 80, "tags": ["bench"]})
        yield MemoryEvent.model_construct(
            event_id=event_id_for(origin, version),
            op=Op.DELETE if delete else Op.PUT,
            namespace=f"agent{rng.randrange(8)}",
            key=f"k{rng.randrange(keys)}",
            kind=Kind.MEMORY_ITEM,
            payload=payload,
            version=version,
            origin=origin,
            created_at=T0_MS + i,
            schema_version=1,
        )


def apply_all(store: SqlStore, events: list[MemoryEvent], batch: int) -> None:
    for i in range(0, len(events), batch):
        store.apply_batch(events[i : i + batch], published=True)


def apply_rate(url: str, events: list[MemoryEvent], batch: int, *, index: bool, live: str) -> tuple[float, float]:
    """(events/s of ``apply_all`` into a new store at ``url``, with or without the search index; the same
    per second of this process's CPU time, which a loaded machine distorts far less than the clock)."""
    store = SqlStore(url, index_search=index)
    store.create_schema()
    try:
        t, c = time.perf_counter(), time.process_time()
        apply_all(store, events, batch)
        rate = len(events) / (time.perf_counter() - t)
        cpu_rate = len(events) / (time.process_time() - c)
        if store.checksum() != live:
            raise SystemExit(f"checksum mismatch applying {'with' if index else 'without'} the index")
    finally:
        store.close()
    return rate, cpu_rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--keys", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--into", help="replay target URL (default: an empty SQLite file in a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir with the databases (about 250 MB)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of apply without / with the index (best kept)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="mfh-bench-replay-"))
    events = generate(args.events, args.keys)
    source = SqlStore(f"sqlite:///{tmp}/source.db", index_search=False)  # only its events are read
    source.create_schema()
    t = time.perf_counter()
    apply_all(source, events, args.batch)
    live = source.checksum()
    print(f"source: {len(events)} events in {time.perf_counter() - t:.1f} s, {source.counts()['items']} items")

    unindexed: list[tuple[float, float]] = []
    indexed: list[tuple[float, float]] = []
    for r in range(max(1, args.rounds)):  # alternating, so a drift in the machine's load hits both
        unindexed.append(apply_rate(f"sqlite:///{tmp}/plain{r}.db", events, args.batch, index=False, live=live))
        indexed.append(apply_rate(f"sqlite:///{tmp}/indexed{r}.db", events, args.batch, index=True, live=live))
    un_rate, ix_rate = max(u for u, _ in unindexed), max(i for i, _ in indexed)
    un_cpu, ix_cpu = max(u for _, u in unindexed), max(i for _, i in indexed)
    print(
        f"apply from memory without the search index: {un_rate:,.0f} events/s ({un_cpu:,.0f} per CPU second), "
        f"with it: {ix_rate:,.0f} ({ix_cpu:,.0f}); rounds: "
        f"{', '.join(f'{u[0]:,.0f}/{i[0]:,.0f}' for u, i in zip(unindexed, indexed, strict=True))}; "
        "the baseline is the latter (apply_batch from memory, as a live store writes)"
    )

    target = open_target(args.into or f"sqlite:///{tmp}/replay.db")
    last = [0.0]

    def progress(done: int, total: int | None) -> None:
        now = time.perf_counter()
        if now - last[0] > 1 or done == total:
            last[0] = now
            print(f"\rreplay {done}/{total}", end="", file=sys.stderr, flush=True)

    result = replay_from_sql(source, target, batch=args.batch, progress=progress)
    print(file=sys.stderr)
    target.close()
    source.close()
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    ok = result.checksum == live
    print(
        f"replay (events table -> {args.into or 'SQLite'}): {result.events} events in {result.seconds:.2f} s, "
        f"of which {result.checksum_seconds:.2f} s computing the checksum of the result"
    )
    print(f"checksum {result.checksum} {'equals' if ok else 'DIFFERS FROM'} the live one")
    if not ok:
        raise SystemExit("checksum mismatch")
    base = ix_rate
    print(
        f"replay_events_per_s={result.apply_events_per_s:.0f} baseline_apply_batch_events_per_s={base:.0f} "
        f"ratio={result.apply_events_per_s / base:.2f} replay_with_checksum_events_per_s={result.events_per_s:.0f} "
        f"apply_unindexed_per_s={un_rate:.0f} apply_indexed_per_s={ix_rate:.0f} "
        f"index_cost_ratio={ix_rate / un_rate:.3f} apply_unindexed_cpu_per_s={un_cpu:.0f} "
        f"apply_indexed_cpu_per_s={ix_cpu:.0f} index_cost_ratio_cpu={ix_cpu / un_cpu:.3f} "
        f"load1={os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
