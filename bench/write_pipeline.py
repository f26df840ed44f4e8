"""Persisted writes per second: the batched write-behind pipeline vs one Dramatiq message per write.

Both runs stage writes in Redis exactly as the api does (HotStore.stage_many, then BatchQueue), with
a real ``dramatiq`` worker process persisting into SQLite; a write counts once its entry is clean
(its version committed to SQL). The baseline is the same pipeline with micro-batches of one.
Clients stage ``--stage-batch`` writes per call (8: BatchPut-sized requests); a third run feeds the
batched pipeline with single Puts, where this one process's Redis client, not the pipeline, is the limit.
Redis db 12 by default is flushed: point --redis-url at a scratch database.

    python bench/write_pipeline.py [--writes 20000] [--rounds 3] [--embedding-dim 384]

``--embedding-dim`` gives the batched rounds' records an embedding (384 floats: ~3 KB of JSON each).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import redis
from _hosts import BenchHost

from mfh_core import Change, HotStore
from mfh_models import Kind, Op, canonical_json
from mfh_tasks import BatchQueue, build_hot_store


async def run_round(
    host: BenchHost,
    *,
    writes: int,
    batch_size: int,
    concurrency: int,
    stage_batch: int,
    tag: str,
    embedding_dim: int = 0,
) -> float:
    """Stage ``writes`` writes with ``concurrency`` callers; return persisted writes/s."""
    s = host.settings
    s = s.model_copy(update={"write_behind": s.write_behind.model_copy(update={"batch_max_size": batch_size})})
    queue = BatchQueue.from_settings(s)
    hot: HotStore = build_hot_store(s)
    body: dict[str, object] = {"content": "x" * 200, "tags": ["bench"], "importance": 0.5}
    if embedding_dim:
        rng = random.Random(1)
        body["embedding"] = [round(rng.uniform(-1, 1), 4) for _ in range(embedding_dim)]
    payload = canonical_json(body)
    next_i = 0

    async def writer() -> None:
        # Each writer is a client: it stages ``stage_batch`` writes per call (a BatchPut; 1 = a Put)
        # and waits until they are enqueued, as the api does before it answers.
        nonlocal next_i
        while next_i < writes:
            first, next_i = next_i, min(next_i + stage_batch, writes)
            changes = [Change(Op.PUT, "bench", f"{tag}-{i}", Kind.MEMORY_ITEM, payload) for i in range(first, next_i)]
            await queue.submit_many(await hot.stage_many(changes))

    t0 = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(concurrency)))
    acked = time.perf_counter() - t0
    while await hot.dirty_count() > 0:
        await asyncio.sleep(0.005)
        if time.perf_counter() - t0 > 300:
            raise SystemExit(f"{tag}: not persisted after 300 s; see {host.dir}/worker.log")
    elapsed = time.perf_counter() - t0
    await queue.close()
    await hot.close()
    print(
        f"  {tag:<10} {writes:>6} writes  acked in {acked:6.2f} s  persisted in {elapsed:6.2f} s"
        f"  = {writes / elapsed:8.0f} writes/s  ({queue.batches_sent} messages)"
    )
    return writes / elapsed


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    ap.add_argument("--writes", type=int, default=20_000, help="writes per batched round")
    ap.add_argument("--single-writes", type=int, default=4_000, help="writes per one-message-per-write round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--threads", type=int, default=4, help="worker threads")
    ap.add_argument("--stage-batch", type=int, default=8, help="writes staged per client call (1 = single Puts)")
    ap.add_argument(
        "--embedding-dim", type=int, default=0, help="records carry an embedding of this many floats (0 = none)"
    )
    args = ap.parse_args()

    redis.Redis.from_url(args.redis_url).flushdb()
    host = BenchHost(redis_url=args.redis_url)
    batch_size = host.settings.write_behind.batch_max_size
    host.start_worker(threads=args.threads)
    print(
        f"write_pipeline: SQLite {host.settings.storage.sqlite_path}, 1 worker process x {args.threads} threads, "
        f"{args.concurrency} concurrent writers staging {args.stage_batch} writes per call, "
        f"batch_max_size={batch_size}"
    )
    try:
        await run_round(
            host,
            writes=500,
            batch_size=batch_size,
            concurrency=args.concurrency,
            stage_batch=args.stage_batch,
            tag="warmup",
        )
        batched: list[float] = []
        per_put: list[float] = []
        single: list[float] = []
        for r in range(args.rounds):
            batched.append(
                await run_round(
                    host,
                    writes=args.writes,
                    batch_size=batch_size,
                    concurrency=args.concurrency,
                    stage_batch=args.stage_batch,
                    tag=f"batched{r}",
                    embedding_dim=args.embedding_dim,
                )
            )
            # The same pipeline fed by single Puts: this process's staging is then the limit, not the pipeline.
            per_put.append(
                await run_round(
                    host,
                    writes=args.writes,
                    batch_size=batch_size,
                    concurrency=args.concurrency,
                    stage_batch=1,
                    tag=f"perput{r}",
                )
            )
            single.append(
                await run_round(
                    host,
                    writes=args.single_writes,
                    batch_size=1,
                    concurrency=args.concurrency,
                    stage_batch=args.stage_batch,
                    tag=f"single{r}",
                )
            )
    finally:
        host.stop()
    b, p1, s1 = statistics.median(batched), statistics.median(per_put), statistics.median(single)
    print(
        f"median batched: {b:.0f} persisted writes/s ({p1:.0f} when fed by single Puts); "
        f"one message per write: {s1:.0f} writes/s; ratio {b / s1:.1f}x"
    )
    print(
        f"persisted_writes_per_s={b:.0f} single_message_writes_per_s={s1:.0f} ratio={b / s1:.2f} "
        f"per_put_staging_writes_per_s={p1:.0f} stage_batch={args.stage_batch} embedding_dim={args.embedding_dim}"
    )


if __name__ == "__main__":
    asyncio.run(main())
