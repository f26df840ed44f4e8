"""Search at 100,000 records in one namespace, on SQLite and Postgres: what the api's Search calls cost.

Per database, in one run:

- write throughput of ``SqlStore.apply_batch`` (100-row batches, payloads with a 384-dim embedding)
  without the search index (the baseline, ``index_search=False``) and with it, over the same rows;
- (then filled to ``--records`` in 1000-row batches, and ANALYZEd as autovacuum would);
- filter + full-text p99: ``SqlStore.search_keys`` with one word, a metadata equality and a kind
  filter, top 10 (the SQL half of Search; the service adds a get_many of the hits);
- vector top-10 p99: ``VectorCache.top_k`` over 100,000 x 384 float32 embeddings, exact cosine
  (after one warm-up query that loads the namespace's vectors into the process).

Targets: full text <= 20 ms, vector <= 50 ms. SQLite goes to a temp file; Postgres to a scratch
database (``mfh_bench_search``, dropped and re-created) on ``--postgres-url``'s server; ``--skip-postgres``.

    python bench/search.py [--records 100000] [--dim 384] [--queries 200]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Iterator

from mfh_core import SqlStore
from mfh_core.searchindex import MetaFilter, SearchQuery
from mfh_core.vectors import VectorCache
from mfh_models import Kind, MemoryEvent, Op, canonical_json

NS = "bench.search"
WORDS = [f"w{i:04d}" for i in range(2000)]
NOW = int(time.time() * 1000)


def events(n: int, dim: int, seed: int, start: int = 0, size: int = 100) -> Iterator[list[MemoryEvent]]:
    rng = random.Random(seed)
    batch: list[MemoryEvent] = []
    for i in range(start, start + n):
        payload = {
            "content": " ".join(rng.choices(WORDS, k=12)),
            "tags": [f"t{rng.randrange(20)}"],
            "metadata": {"cat": rng.randrange(10), "score": rng.random()},
            "embedding": [round(rng.uniform(-1, 1), 4) for _ in range(dim)],
        }
        version = (NOW << 16) + i + 1
        batch.append(
            MemoryEvent(
                event_id=f"main_pc-{version}",
                op=Op.PUT,
                namespace=NS,
                key=f"k{i:07d}",
                kind=Kind.MEMORY_ITEM,
                payload=canonical_json(payload),
                version=version,
                origin="main_pc",
                created_at=NOW,
            )
        )
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_rate(store: SqlStore, batches: list[list[MemoryEvent]]) -> float:
    t0 = time.perf_counter()
    rows = 0
    for b in batches:
        store.apply_batch(b)
        rows += len(b)
    return rows / (time.perf_counter() - t0)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def run(url: str, plain_url: str, args: argparse.Namespace, name: str) -> dict[str, float]:
    sample = list(events(args.throughput_rows, args.dim, seed=1))
    plain = SqlStore(plain_url, index_search=False)
    plain.create_schema()
    store = SqlStore(url)
    store.create_schema()
    try:
        # Baseline and indexed writes over the same rows, interleaved halves so drift hits both
        half = len(sample) // 2
        base = [write_rate(plain, sample[:half]), write_rate(plain, sample[half:])]
        idx = [write_rate(store, sample[:half]), write_rate(store, sample[half:])]
        base_rate, idx_rate = statistics.mean(base), statistics.mean(idx)
        print(f"[{name}] writes/s without index {base_rate:,.0f}, with index {idx_rate:,.0f}")
        # Fill to --records
        t0 = time.perf_counter()
        rest = args.records - args.throughput_rows
        for b in events(rest, args.dim, seed=2, start=args.throughput_rows, size=1000):
            store.apply_batch(b)
        with store._write.begin() as conn:  # planner statistics, as autovacuum / a long-lived store has them
            conn.exec_driver_sql("ANALYZE")
        print(f"[{name}] filled to {args.records:,} records in {time.perf_counter() - t0:.1f} s (1000-row batches)")
        rng = random.Random(3)
        fts: list[float] = []
        hits = 0
        for _ in range(args.queries):
            q = SearchQuery(
                NS,
                False,
                NOW,
                terms=(rng.choice(WORDS),),
                kinds=("memory_item",),
                meta=(MetaFilter("cat", "eq", rng.randrange(10)),),
                limit=10,
            )
            t = time.perf_counter()
            hits += len(store.search_keys(q))
            fts.append((time.perf_counter() - t) * 1000)
        cache = VectorCache()
        spaces = store.search_namespaces(NS, prefix=False)
        t = time.perf_counter()
        cache.top_k(store, spaces, [rng.uniform(-1, 1) for _ in range(args.dim)], 10, NOW)
        load_s = time.perf_counter() - t
        vec: list[float] = []
        for _ in range(args.vector_queries):
            qv = [rng.uniform(-1, 1) for _ in range(args.dim)]
            t = time.perf_counter()
            spaces = store.search_namespaces(NS, prefix=False)  # what each Search reads first
            got = cache.top_k(store, spaces, qv, 10, NOW)
            vec.append((time.perf_counter() - t) * 1000)
            assert len(got) == 10
        print(
            f"[{name}] filter+full-text p50 {pct(fts, 50):.2f} ms p99 {pct(fts, 99):.2f} ms "
            f"({hits / args.queries:.1f} hits/query; target 20 ms)"
        )
        print(
            f"[{name}] vector top-10 p50 {pct(vec, 50):.2f} ms p99 {pct(vec, 99):.2f} ms "
            f"(first query loads the vectors: {load_s:.1f} s; target 50 ms)"
        )
        return {
            f"{name}_write_rows_s_noindex": round(base_rate),
            f"{name}_write_rows_s_index": round(idx_rate),
            f"{name}_write_index_ratio": round(idx_rate / base_rate, 3),
            f"{name}_fts_p99_ms": round(pct(fts, 99), 2),
            f"{name}_vector_p99_ms": round(pct(vec, 99), 2),
        }
    finally:
        store.close()
        plain.close()


def scratch_postgres(server_url: str, names: list[str]) -> list[str]:
    import psycopg2

    conn = psycopg2.connect(server_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        for n in names:
            cur.execute(f"DROP DATABASE IF EXISTS {n}")
            cur.execute(f"CREATE DATABASE {n}")
    conn.close()
    base = server_url.rsplit("/", 1)[0]
    return [f"{base}/{n}" for n in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--throughput-rows", type=int, default=10_000, help="rows of the with/without index comparison")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--vector-queries", type=int, default=100)
    ap.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--skip-postgres", action="store_true")
    args = ap.parse_args()
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="mfh-bench-search-") as tmp:
        figures |= run(f"sqlite:///{tmp}/index.db", f"sqlite:///{tmp}/plain.db", args, "sqlite")
    if not args.skip_postgres:
        url, plain = scratch_postgres(args.postgres_url, ["mfh_bench_search", "mfh_bench_search_plain"])
        figures |= run(url, plain, args, "postgres")
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
