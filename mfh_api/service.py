"""The transport-free memory service both servers (gRPC, ZeroMQ) call.

Reads: hot store first, SQL on a miss (then a read-repair fill that never overwrites a newer
staged version). Writes: stage in Redis (version assigned) and enqueue through the batch queue
(docs/architecture.md invariants 1, 4, 5). Redis and SQL sit behind circuit breakers; every call behind a
bulkhead. No authentication here: the transports do it before calling in.

:func:`build_service` is the composition root: it builds the stores, the batch queue, the change
feed, the breakers and the bulkhead from the settings and hands them to :class:`MemoryService`,
which constructs none of them (a test builds one from other parts).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from redis.exceptions import RedisError

from mfh_api.search import SearchSpec, validate_search
from mfh_client.types import Durability, PutResult, PutSpec
from mfh_core import Change, ChangeFeed, HotStore, SqlStore
from mfh_core.metrics import CACHE_LOOKUPS, register_near_cache
from mfh_core.nearcache import NearCache, NearEntry
from mfh_core.resilience import Bulkhead, CircuitBreaker, OutageLog, breaker_from_settings
from mfh_core.searchindex import SearchQuery
from mfh_core.sqlstore import WatchPage
from mfh_core.tracking import TrackingFeed
from mfh_core.vectors import VectorCache
from mfh_models import (
    DeadlineExceeded,
    InvalidArgument,
    MemoryEvent,
    MFHError,
    NotFound,
    Op,
    OutOfRange,
    Record,
    Settings,
    Unavailable,
    decode_untrusted_json,
    parse_kind,
    validate_key,
    validate_namespace,
    validate_payload,
)
from mfh_models.expiry import expires_at_of, is_expired, refreshed_payload, with_ttl
from mfh_models.namespaces import is_under, truncate_namespace
from mfh_tasks import BatchQueue, build_hot_store

__all__ = [
    "MAX_BATCH_GET_KEYS",
    "MAX_BATCH_PUTS",
    "MAX_PAGE_SIZE",
    "Durability",
    "MemoryService",
    "PutResult",
    "PutSpec",
    "SearchSpec",
    "build_service",
    "compose_service",
]

log = logging.getLogger("mfh.service")

T = TypeVar("T")

MAX_BATCH_GET_KEYS: Final = 1000
MAX_BATCH_PUTS: Final = 500
MAX_PAGE_SIZE: Final = 1000
DEFAULT_PAGE_SIZE: Final = 100
#: A token holds one key (at most 256 characters) and the scope: anything far bigger is forged.
_MAX_TOKEN_BYTES: Final = 4096
_MAX_VERSION: Final = (1 << 63) - 1
#: How often a PERSISTED waiter checks SQL itself, in case the change feed missed the commit notice.
_PERSISTED_RECHECK_S: Final = 0.5
_READ_ONLY: Final = "read-only mode: redis unavailable"
#: A Watch reads at most this many events of the log at once, looking at no more than this many sequence
#: numbers (a quiet namespace in a busy log, a resume far behind): each read is bounded.
_WATCH_PAGE: Final = 1000
_WATCH_WINDOW: Final = 20_000
#: Events a ZeroMQ watch poll returns when it does not say.
_WATCH_POLL_DEFAULT: Final = 100
#: A Watch checks at least this often, even without a commit notice, whether the log moved on (a lost
#: notice); it reads its page only when the log's head did. Every idle stream shares one read of the head,
#: at most one per :data:`_HEAD_FRESH_S`: 1,000 idle streams no longer cost 200 reads of the log a second.
_WATCH_POLL_S: Final = 5.0
_HEAD_FRESH_S: Final = 1.0
#: Progress events (when asked for) at most this often while no change matches.
_PROGRESS_EVERY_S: Final = 1.0
#: Pings of the near cache's feed come this share of ``max_stale_ms`` apart, leaving the rest for the round trip.
_PING_SHARE: Final = 0.4
_CACHE_HIT: Final = CACHE_LOOKUPS.labels("hit")  # labels() takes a lock: resolve the children once
_CACHE_MISS: Final = CACHE_LOOKUPS.labels("miss")


def _check_sequence(v: int | None) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > _MAX_VERSION:
        raise InvalidArgument(f"after_sequence must be an integer from 0 to {_MAX_VERSION}")
    return v


def _check_expected(v: int | None) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > _MAX_VERSION:
        raise InvalidArgument(f"expected_version must be an integer from 0 to {_MAX_VERSION}")
    return v


#: (namespace, key, score) from the index; (record, score) answered; names of a page.
_Hits = list[tuple[str, str, float]]
_Scored = list[tuple[Record, float]]
_Names = list[str]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _validate_put(spec: PutSpec, now_ms: int) -> tuple[Change, int | None]:
    """The change to stage and the length of the embedding its payload carries (None without one)."""
    ns, key = validate_namespace(spec.namespace), validate_key(spec.key)
    payload = spec.payload
    if isinstance(payload, bytes | str):
        payload = decode_untrusted_json(payload, what="payload_json")
    if spec.ttl_seconds and isinstance(payload, dict):
        payload = with_ttl(payload, spec.ttl_seconds, now_ms)
    kind, text = validate_payload(spec.kind, payload)
    vec = payload.get("embedding") if isinstance(payload, dict) else None
    dim = len(vec) if isinstance(vec, list) else None
    return Change(Op.PUT, ns, key, kind, text, _check_expected(spec.expected_version)), dim


def _result(e: MemoryEvent) -> PutResult:
    return PutResult(version=e.version, event_id=e.event_id)


class MemoryService:
    """Transport-free: validation, reads (hot store → SQL fallback), writes (stage → batch queue), auth-free.

    Takes its collaborators, built by :func:`build_service` (or a test); :meth:`close` closes the batch
    queue, the change feed and the hot store, then runs ``on_close`` (the SQL store's owner closes it there).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        hot: HotStore,
        sql: SqlStore,
        queue: BatchQueue,
        feed: ChangeFeed,
        redis_breaker: CircuitBreaker,
        sql_breaker: CircuitBreaker,
        bulkhead: Bulkhead,
        near: NearCache | None = None,
        tracking: TrackingFeed | None = None,
        on_close: Sequence[Callable[[], None]] = (),
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        self.settings = settings
        self.clock = clock  # unix ms: expiry is decided with it, at read time (tests inject one)
        self.vectors = VectorCache()
        self.hot = hot
        self.sql = sql
        self.queue = queue
        self.feed = feed
        self.redis_breaker = redis_breaker
        self.sql_breaker = sql_breaker
        self.bulkhead = bulkhead
        self.near = near
        self.tracking = tracking
        self._on_close = list(on_close)
        self._enqueue_outage = OutageLog(
            "write queue",
            what="write calls not enqueued",
            logger=log,
            summary_every_s=settings.resilience.circuit_breaker.summary_every_seconds,
        )
        self._closed = False
        self._head: tuple[float, int] | None = None  # (loop time read, the log's head), shared by idle Watches
        self._head_read: asyncio.Future[int] | None = None

    async def start(self) -> None:
        """Subscribe to the persisted channel (PERSISTED waiters and Watch); start the near cache's feed."""
        await self.feed.start()
        if self.tracking is not None:
            await self.tracking.start()  # the cache turns itself on once tracking is confirmed

    async def close(self) -> None:
        """Flush pending writes to the queue, then close the stores."""
        if self._closed:
            return
        self._closed = True
        await self.queue.close()
        await self.feed.close()
        if self.tracking is not None:
            await self.tracking.close()
        await self.hot.close()
        for fn in self._on_close:
            try:
                fn()
            except Exception:
                log.exception("error while closing")

    # -- adapters behind breakers -------------------------------------------------------------

    async def _redis(self, fn: Callable[[], Awaitable[T]]) -> T:
        async def guarded() -> T:
            try:
                return await fn()
            except RedisError as e:
                raise Unavailable(f"redis error: {e}") from e

        return await self.redis_breaker.call(guarded)

    async def _sql(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return await asyncio.to_thread(fn)

        return await self.sql_breaker.call(run)

    async def _fill(self, record: Record) -> Record:
        """Read-repair: put a SQL row into Redis unless a newer version is staged; return the winner."""
        try:
            applied = await self._redis(lambda: self.hot.apply(record, from_sql=True))
            if not applied:
                entry = await self._redis(lambda: self.hot.get(record.namespace, record.key))
                if entry is not None and entry.record.version > record.version:
                    return entry.record
        except Unavailable:
            pass
        return record

    # -- reads ------------------------------------------------------------------------------------

    async def _read(self, namespace: str, key: str) -> tuple[Record | None, bool]:
        """The newest known record (tombstones included) from Redis, else SQL, and whether Redis answered."""
        redis_ok = True
        try:
            entry = await self._redis(lambda: self.hot.get(namespace, key))
        except Unavailable:
            entry, redis_ok = None, False
        if entry is not None:
            _CACHE_HIT.inc()
            return entry.record, True
        _CACHE_MISS.inc()
        try:
            row = await self._sql(lambda: self.sql.get(namespace, key))
        except Unavailable as e:
            raise Unavailable(f"cannot read {namespace}/{key}: not in the hot store and SQL is down ({e})") from e
        if row is None:
            return None, redis_ok
        return (await self._fill(row) if redis_ok else row), redis_ok

    async def _lookup(self, namespace: str, key: str) -> Record | None:
        """The newest known record (tombstones included), never from the near cache; None if nothing has it."""
        return (await self._read(namespace, key))[0]

    async def _lookup_near(self, namespace: str, key: str) -> tuple[Record | None, NearEntry | None]:
        """:meth:`_lookup`, and the near cache's new entry when the answer could be kept there."""
        near = self.near
        ticket = near.begin((namespace, key)) if near is not None else None
        if near is None or ticket is None:
            return (await self._read(namespace, key))[0], None
        rec: Record | None = None
        cacheable = False
        try:
            rec, cacheable = await self._read(namespace, key)  # from SQL with Redis down: not kept
        finally:
            entry = near.finish(ticket, rec, store=cacheable)
        return rec, entry

    def cached_answer(self, namespace: str, key: str, transport: str, encode: Callable[[Record], T]) -> T | None:
        """The near cache's encoded answer for a live record, without I/O or validation (only keys that
        passed it are ever cached); NotFound for a cached absence or tombstone; None on a miss: ask
        :meth:`get_answer`."""
        near = self.near
        if near is None or type(namespace) is not str or type(key) is not str:
            return None
        entry = near.lookup((namespace, key))
        if entry is None:
            return None
        if entry.record is None or entry.record.deleted:
            raise NotFound(f"{namespace}/{key} not found")
        if expires_at_of(entry.record.payload) is not None or self._refreshes(namespace):
            return None  # expiry is decided at read time, refresh-on-read writes: the full path does both
        wire: T | None = entry.wire.get(transport)
        if wire is None:
            wire = encode(entry.record)
            near.add_encoding(entry, transport, wire)
        return wire

    async def get_answer(
        self, namespace: str, key: str, transport: str, encode: Callable[[Record], T], *, probed: bool = False
    ) -> T:
        """:meth:`get`, encoded by ``encode`` for ``transport``; the encoding is kept with the near-cache entry.
        ``probed``: :meth:`cached_answer` just missed, so the near cache is not asked again."""
        rec, entry = await self._get(namespace, key, probe=not probed)
        if entry is not None:
            wire: T | None = entry.wire.get(transport)
            if wire is not None:
                return wire
        wire = encode(rec)
        if entry is not None and self.near is not None:
            self.near.add_encoding(entry, transport, wire)
        return wire

    async def get(self, namespace: str, key: str) -> Record:
        """One live record; NotFound when absent or a tombstone."""
        return (await self._get(namespace, key))[0]

    async def _get(self, namespace: str, key: str, *, probe: bool = True) -> tuple[Record, NearEntry | None]:
        near = self.near
        entry = None
        if probe and near is not None and type(namespace) is type(key) is str:
            entry = near.lookup((namespace, key))
        if entry is not None:
            rec: Record | None = entry.record
        else:
            validate_namespace(namespace)
            validate_key(key)
            async with self.bulkhead.slot():
                rec, entry = await self._lookup_near(namespace, key)
        now = self.clock()
        if rec is None or rec.deleted or is_expired(rec, now):
            raise NotFound(f"{namespace}/{key} not found")
        refreshed = await self._maybe_refresh(rec, now)
        if refreshed is not rec:  # a new version: the cached entry's encodings are of the old one
            return refreshed, None
        return rec, entry

    def _refreshes(self, namespace: str) -> bool:
        return any(is_under(namespace, p) for p in self.settings.expiry.refresh_on_read)

    async def _maybe_refresh(self, rec: Record, now: int) -> Record:
        """Refresh-on-read: extend a TTL'd record's expiry (a conditional ACCEPTED put); on any failure the
        read is still answered, with the record as it was."""
        if not self._refreshes(rec.namespace):
            return rec
        payload = refreshed_payload(rec, now)
        if payload is None:
            return rec
        change = Change(Op.PUT, rec.namespace, rec.key, rec.kind, payload, rec.version)
        try:
            [event] = await self._redis_write(lambda: self.hot.stage_many([change]))
            await self._enqueue([event], Durability.ACCEPTED)
        except MFHError as e:
            log.debug("refresh-on-read of %s/%s skipped: %s", rec.namespace, rec.key, type(e).__name__)
            return rec
        return event.to_record()

    async def batch_get(self, namespace: str, keys: Sequence[str]) -> tuple[list[Record], list[str]]:
        """(live records in request order, missing keys in request order); duplicates answered once."""
        validate_namespace(namespace)
        unique = list(dict.fromkeys(keys))
        if len(unique) > MAX_BATCH_GET_KEYS:
            raise InvalidArgument(f"at most {MAX_BATCH_GET_KEYS} keys per BatchGet, got {len(unique)}")
        for k in unique:
            validate_key(k)
        found: dict[str, Record | None] = {}
        near = self.near
        if near is not None:
            for k in unique:
                hit = near.lookup((namespace, k))
                if hit is not None:
                    found[k] = hit.record
        rest = [k for k in unique if k not in found]
        if rest:
            async with self.bulkhead.slot():
                tickets = {k: near.begin((namespace, k)) for k in rest} if near is not None else {}
                read: dict[str, Record] = {}
                cacheable = False
                try:
                    read, cacheable = await self._read_many(namespace, rest)
                finally:
                    if near is not None:
                        for k, ticket in tickets.items():
                            near.finish(ticket, read.get(k), store=cacheable)
            found.update(read)
        now = self.clock()
        live = {k: r for k, r in found.items() if r is not None and not r.deleted and not is_expired(r, now)}
        records = [await self._maybe_refresh(live[k], now) for k in unique if k in live]
        missing = [k for k in unique if k not in live]
        return records, missing

    async def _read_many(self, namespace: str, keys: list[str]) -> tuple[dict[str, Record], bool]:
        """Records (tombstones included) of the keys Redis or SQL has, and whether Redis answered."""
        found: dict[str, Record] = {}
        redis_ok = True
        try:
            hits = await self._redis(lambda: self.hot.get_many(namespace, keys))
        except Unavailable:
            hits, redis_ok = {}, False
        found.update({k: e.record for k, e in hits.items()})
        misses = [k for k in keys if k not in found]
        _CACHE_HIT.inc(len(found))
        if misses:
            _CACHE_MISS.inc(len(misses))
            try:
                rows = await self._sql(lambda: self.sql.get_many(namespace, misses))
            except Unavailable as e:
                raise Unavailable(f"cannot read {len(misses)} keys missing from the hot store: {e}") from e
            for k, row in rows.items():
                found[k] = await self._fill(row) if redis_ok else row
        return found, redis_ok

    # -- writes -----------------------------------------------------------------------------------

    async def _ensure_hot(self, namespace: str, key: str) -> Record | None:
        """Make the hot store hold the key's newest state (fill from SQL on a miss), for version checks."""
        entry = await self._redis_write(lambda: self.hot.get(namespace, key))
        if entry is not None:
            return entry.record
        row = await self._sql(lambda: self.sql.get(namespace, key))
        if row is not None:
            await self._redis_write(lambda: self.hot.apply(row, from_sql=True))
        return row

    def _invalidate_near(self, *, namespace_keys: list[tuple[str, str]]) -> None:
        """Read-your-writes on this api: drop the keys now, before Redis's own invalidation arrives."""
        if self.near is not None:
            self.near.invalidate(namespace_keys)

    async def _redis_write(self, fn: Callable[[], Awaitable[T]]) -> T:
        """A Redis step of a write: any Redis failure means the hub is read-only for now."""
        try:
            return await self._redis(fn)
        except DeadlineExceeded:  # a Redis timeout while staging: the outcome is unknown, not "read-only"
            raise
        except Unavailable as e:
            raise Unavailable(f"{_READ_ONLY} ({e.message})") from e

    async def _enqueue(self, events: list[MemoryEvent], durability: Durability) -> list[asyncio.Future[None]] | None:
        """Hand staged events to the batch queue (acknowledged once enqueued); PERSISTED waiters register first."""
        waiters = self.feed.expect(events) if durability is Durability.PERSISTED else None
        try:
            # Shielded: once staged, a write is enqueued (or taken back) even if the caller goes away.
            await asyncio.shield(self._enqueue_or_unstage(events))
        except BaseException:
            self.feed.forget(events)
            raise
        return waiters

    async def _enqueue_or_unstage(self, events: list[MemoryEvent]) -> None:
        """Enqueue the batch of staged events; when that fails, take them back, so that UNAVAILABLE means
        nothing was staged (docs/api.md). A write that cannot be taken back (Redis went away too, or what
        was below it is unknown) stays staged and dirty: it is acknowledged, and reconcile enqueues it."""
        try:
            await self.queue.submit_many(events)
        except Unavailable as e:
            failure = e
        else:
            self._enqueue_outage.success()
            return
        try:
            unstaged = await self.hot.unstage(events)
        except (Unavailable, RedisError) as e:
            self._enqueue_outage.failure(f"{failure.message}; could not take the write back either ({e})")
            return
        self._enqueue_outage.failure(failure.message)
        if unstaged:
            raise Unavailable(f"{failure.message}; nothing was staged, retry") from failure

    async def _await_persisted(
        self,
        events: list[MemoryEvent],
        waiters: list[asyncio.Future[None]] | None,
        started: float,
        budget: float | None,
    ) -> None:
        """Wait (outside the bulkhead) for the SQL commit, within what is left of the call's deadline."""
        if waiters is None:
            return
        limit = budget if budget is not None else self.settings.server.deadline_seconds
        loop = asyncio.get_running_loop()
        all_done = asyncio.gather(*waiters)
        try:
            while True:
                left = limit - (loop.time() - started)
                if left <= 0:
                    raise DeadlineExceeded(
                        f"{len(events)} write(s) accepted (version {events[0].version}) but not yet persisted "
                        f"within {limit:.3g}s; they will still be written to SQL"
                    )
                try:
                    await asyncio.wait_for(asyncio.shield(all_done), min(left, _PERSISTED_RECHECK_S))
                    return
                except TimeoutError:
                    await self._settle_from_sql(events, waiters)
        finally:
            all_done.cancel()
            self.feed.forget(events)

    async def _settle_from_sql(self, events: list[MemoryEvent], waiters: list[asyncio.Future[None]]) -> None:
        """A commit notice can be missed (the change feed was reconnecting): the events table is the proof."""
        missing = [e.event_id for e, w in zip(events, waiters, strict=True) if not w.done()]
        try:
            found = await self._sql(lambda: self.sql.existing_events(missing))
        except Unavailable:
            return
        for e, w in zip(events, waiters, strict=True):
            if e.event_id in found and not w.done():
                w.set_result(None)

    async def put(
        self,
        spec: PutSpec,
        *,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> PutResult:
        """Create or replace one record; VersionConflict when expected_version does not match."""
        return (await self.batch_put([spec], durability=durability, timeout=timeout))[0]

    async def batch_put(
        self,
        specs: Sequence[PutSpec],
        *,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,  # noqa: ASYNC109 - the caller's remaining deadline
    ) -> list[PutResult]:
        """All or nothing: every put is validated, version-checked and staged in one Lua call."""
        if not specs:
            return []
        if len(specs) > MAX_BATCH_PUTS:
            raise InvalidArgument(f"at most {MAX_BATCH_PUTS} puts per BatchPut, got {len(specs)}")
        puts: list[Change] = []
        seen: set[tuple[str, str]] = set()
        dims: dict[str, tuple[int, int]] = {}
        now = self.clock()
        for i, spec in enumerate(specs):
            try:
                p, dim = _validate_put(spec, now)
                if dim is not None:
                    first = dims.setdefault(p.namespace, (dim, i))
                    if first[0] != dim:
                        raise InvalidArgument(
                            f"embedding has {dim} dimensions; puts[{first[1]}] to {p.namespace} has {first[0]}"
                        )
            except InvalidArgument as e:
                raise InvalidArgument(f"puts[{i}]: {e.message}" if len(specs) > 1 else e.message) from None
            if (p.namespace, p.key) in seen:
                raise InvalidArgument(f"puts[{i}]: {p.namespace}/{p.key} appears more than once in the batch")
            seen.add((p.namespace, p.key))
            puts.append(p)
        started = asyncio.get_running_loop().time()
        async with self.bulkhead.slot():
            for ns, (dim, _) in sorted(dims.items()):
                await self._check_dim(ns, dim)
            for p in puts:
                if p.expected_version is not None:
                    await self._ensure_hot(p.namespace, p.key)
            try:
                events = await self._redis_write(lambda: self.hot.stage_many(puts))
            finally:  # staged or maybe staged: this api's next read of these keys must see it
                self._invalidate_near(namespace_keys=[(p.namespace, p.key) for p in puts])
            waiters = await self._enqueue(events, durability)
        await self._await_persisted(events, waiters, started, timeout)
        return [_result(e) for e in events]

    async def _check_dim(self, namespace: str, dim: int) -> None:
        """One embedding dimension per namespace: the first claimed (in Redis, seeded from SQL) stays."""
        known = await self._redis_write(lambda: self.hot.known_dim(namespace))
        if known is None:
            try:
                rows = await self._sql(lambda: self.sql.search_namespaces(namespace, prefix=False))
            except Unavailable:
                rows = []
            seed = next((d for _, _, d in rows if d is not None), dim)
            known = await self._redis_write(lambda: self.hot.claim_dim(namespace, seed))
        if known != dim:
            raise InvalidArgument(f"embedding has {dim} dimensions; namespace {namespace} uses {known}")

    async def delete(
        self,
        namespace: str,
        key: str,
        *,
        expected_version: int | None = None,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,  # noqa: ASYNC109 - the caller's remaining deadline
    ) -> PutResult:
        """Write a versioned tombstone; NotFound when the key is absent or already deleted."""
        validate_namespace(namespace)
        validate_key(key)
        expected = _check_expected(expected_version)
        started = asyncio.get_running_loop().time()
        async with self.bulkhead.slot():
            current = await self._ensure_hot(namespace, key)
            if current is None or current.deleted or is_expired(current, self.clock()):
                raise NotFound(f"{namespace}/{key} not found")
            tombstone = Change(Op.DELETE, namespace, key, None, "null", expected)
            try:
                [event] = await self._redis_write(lambda: self.hot.stage_many([tombstone]))
            finally:
                self._invalidate_near(namespace_keys=[(namespace, key)])
            waiters = await self._enqueue([event], durability)
        await self._await_persisted([event], waiters, started, timeout)
        return _result(event)

    # -- watch and health -------------------------------------------------------------------------

    async def watch(
        self, namespace: str, key_prefix: str = "", *, after_sequence: int | None = None, progress: bool = False
    ) -> AsyncIterator[tuple[int, MemoryEvent | None]]:
        """The changes of one namespace (keys under ``key_prefix``) as (sequence, event), in the order they were
        committed to the event log (local or replicated): after ``after_sequence`` (backfill from the log, then
        live) or, when it is None, from now on. Exactly once per event; no gap, no duplicate (docs/api.md).

        With ``progress``, also (position, None): once at the start, then while nothing matches, when the log
        has moved on (at most every :data:`_PROGRESS_EVERY_S`). The stream ends with Unavailable when SQL or
        the commit notices are lost; OutOfRange when ``after_sequence`` cannot be served.
        """
        validate_namespace(namespace)
        if key_prefix:
            validate_key(key_prefix)
        after = _check_sequence(after_sequence)
        loop = asyncio.get_running_loop()
        # Subscribe before the first read of the log: a commit after that read wakes the loop below.
        async with self.feed.subscribe(namespace, key_prefix) as watcher:
            cursor = await self._watch_start(namespace, key_prefix, after)
            if progress:
                yield cursor, None
            told = loop.time()
            while True:
                page = await self._read_log(namespace, key_prefix, cursor, _WATCH_PAGE)
                for seq, event in self._unexpired(page.events):
                    yield seq, event
                moved, cursor = page.scanned_to > cursor, page.scanned_to
                if page.events:
                    told = loop.time()
                elif progress and moved and loop.time() - told >= _PROGRESS_EVERY_S:
                    told = loop.time()
                    yield cursor, None
                if cursor < page.head:
                    continue  # still catching up: read the next page now
                while not await watcher.wait(_WATCH_POLL_S) and await self._log_head() <= page.head:
                    pass  # no notice, and the log has not moved: nothing to read

    async def watch_poll(
        self,
        namespace: str,
        key_prefix: str = "",
        *,
        after_sequence: int | None,
        max_events: int = 0,
        wait_s: float = 0.0,
    ) -> tuple[list[tuple[int, MemoryEvent]], int]:
        """One long poll of :meth:`watch` (the ZeroMQ ``watch`` action): up to ``max_events`` changes after
        ``after_sequence``, waiting up to ``wait_s`` for one, and the position to poll after next. With
        ``after_sequence`` None: no events, and the position of now (to poll after)."""
        validate_namespace(namespace)
        if key_prefix:
            validate_key(key_prefix)
        after = _check_sequence(after_sequence)
        if isinstance(max_events, bool) or not isinstance(max_events, int) or not 0 <= max_events <= _WATCH_PAGE:
            raise InvalidArgument(f"max_events must be an integer from 0 to {_WATCH_PAGE} (0: {_WATCH_POLL_DEFAULT})")
        limit = max_events or _WATCH_POLL_DEFAULT
        cursor = await self._watch_start(namespace, key_prefix, after)
        if after is None:
            return [], cursor
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait_s, 0.0)
        page = await self._read_log(namespace, key_prefix, cursor, limit)
        if page.events or page.scanned_to < page.head or wait_s <= 0:
            return self._unexpired(page.events), page.scanned_to
        async with self.feed.subscribe(namespace, key_prefix) as watcher:
            while True:  # subscribed: re-read, so a commit between the read above and now is not waited for
                page = await self._read_log(namespace, key_prefix, page.scanned_to, limit)
                left = deadline - loop.time()
                if page.events or page.scanned_to < page.head or left <= 0:
                    return self._unexpired(page.events), page.scanned_to
                await watcher.wait(left)

    def _unexpired(self, events: list[tuple[int, MemoryEvent]]) -> list[tuple[int, MemoryEvent]]:
        """The changes to send: a put whose record has expired by now is invisible to Watch too (docs/api.md,
        "Expiry"); its position still counts as read."""
        now = self.clock()
        return [
            (seq, e) for seq, e in events if e.op is Op.DELETE or (at := expires_at_of(e.payload)) is None or now < at
        ]

    async def _log_head(self) -> int:
        """The event log's head, as read at most :data:`_HEAD_FRESH_S` ago: one read for every waiting stream."""
        loop = asyncio.get_running_loop()
        if self._head is not None and loop.time() - self._head[0] < _HEAD_FRESH_S:
            return self._head[1]
        if self._head_read is None:
            self._head_read = asyncio.ensure_future(self._read_head())
        return await asyncio.shield(self._head_read)  # one stream's cancellation does not cancel the others' read

    async def _read_head(self) -> int:
        try:
            head = (await self._watch_head()).head
            self._head = (asyncio.get_running_loop().time(), head)
            return head
        finally:
            self._head_read = None

    async def _watch_head(self) -> WatchPage:
        """A page of no events after the log's head: its head and oldest sequence, two index lookups."""
        read = self.sql.watch_page  # after the largest sequence there is: only the head and the oldest are read
        return await self._sql(lambda: read("", "", _MAX_VERSION, limit=1, window=1))

    async def _read_log(self, namespace: str, key_prefix: str, after: int, limit: int) -> WatchPage:
        return await self._sql(
            lambda: self.sql.watch_page(namespace, key_prefix, after, limit=limit, window=_WATCH_WINDOW)
        )

    async def _watch_start(self, namespace: str, key_prefix: str, after: int | None) -> int:
        """The position a Watch goes on after: ``after``, checked against the log, or the log's head (None)."""
        first = await self._watch_head()
        if after is None:
            return first.head
        if after > first.head:
            raise OutOfRange(
                f"after_sequence {after} is beyond this host's event log (its newest is {first.head}): the position "
                "comes from another store; list again and watch from now on"
            )
        if first.oldest is not None and after + 1 < first.oldest:
            raise OutOfRange(
                f"the events after sequence {after} were pruned (the oldest kept is {first.oldest}); "
                "list again and watch from now on"
            )
        return after

    async def health(self) -> dict[str, bool]:
        """Reachability of each dependency (for the gRPC health service and `mfh` status)."""
        redis_ok = await self.hot.ping()
        try:
            await asyncio.wait_for(asyncio.to_thread(self.sql.get, "health", "ping"), 5.0)
            sql_ok = True
        except Exception:
            sql_ok = False
        return {"redis": redis_ok, "sql": sql_ok, "changefeed": self.feed.connected}

    async def list(
        self,
        namespace: str,
        *,
        kind: str | None = None,
        key_prefix: str = "",
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        include_deleted: bool = False,
    ) -> tuple[list[Record], str]:
        """One page in key order from SQL, overlaid with newer hot entries; keys staged but not yet
        persisted appear once their batch commits (milliseconds)."""
        validate_namespace(namespace)
        k = parse_kind(kind) if kind else None
        if key_prefix:
            validate_key(key_prefix)
        if page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        scope = [namespace, k.value if k else "", key_prefix, include_deleted]
        after = _decode_token(page_token, scope)
        async with self.bulkhead.slot():
            rows = await self._sql(
                lambda: self.sql.list_page(
                    namespace,
                    kind=k,
                    key_prefix=key_prefix,
                    after_key=after,
                    limit=size + 1,
                    include_deleted=True,
                )
            )
            more = len(rows) > size
            rows = rows[:size]
            try:
                hot = await self._redis(lambda: self.hot.get_many(namespace, [r.key for r in rows]))
            except Unavailable:
                hot = {}
        out: list[Record] = []
        now = self.clock()
        for r in rows:
            entry = hot.get(r.key)
            rec = entry.record if entry is not None and entry.record.version > r.version else r
            if (rec.deleted and not include_deleted) or (k is not None and rec.kind is not k):
                continue
            if is_expired(rec, now):
                continue
            out.append(rec)
        token = _encode_token(rows[-1].key, scope) if more and rows else ""
        return out, token

    # -- search and namespaces --------------------------------------------------------------------

    async def search(self, spec: SearchSpec, *, visible: Callable[[str], bool] | None = None) -> _Scored:
        """Records in scope that pass the filters, best first: by cosine similarity with ``spec.embedding``,
        else by full-text rank, else newest first. Reads the SQL index (PERSISTED state), overlaid with newer
        hot entries: a record deleted or expired since it was indexed is left out. ``visible``: only
        namespaces it accepts (an API key's scope), ranked among themselves (the best ``top_k`` of those)."""
        now = self.clock()
        query, embedding, top_k = validate_search(spec, now)
        async with self.bulkhead.slot():
            if embedding:
                hits = await self._vector_hits(query, embedding, top_k, visible)
            elif visible is None:
                hits = await self._sql(lambda: self.sql.search_keys(query))
            else:  # every match, then the visible ones: the top_k of the key's scope, not of the whole subtree
                every = dataclasses.replace(query, limit=None)
                hits = [h for h in await self._sql(lambda: self.sql.search_keys(every)) if visible(h[0])][:top_k]
            return await self._hit_records(hits, now)

    async def _vector_hits(
        self, query: SearchQuery, embedding: Sequence[float], top_k: int, visible: Callable[[str], bool] | None
    ) -> _Hits:
        spaces = await self._sql(lambda: self.sql.search_namespaces(query.namespace, prefix=query.prefix))
        if visible is not None:
            spaces = [s for s in spaces if visible(s[0])]
        dims = sorted({d for _, _, d in spaces if d is not None})
        if dims and len(embedding) not in dims:
            where = f"namespace {query.namespace}" if not query.prefix else f"namespaces under {query.namespace}"
            raise InvalidArgument(f"embedding has {len(embedding)} dimensions; {where} use {', '.join(map(str, dims))}")
        allowed: dict[str, set[str]] | None = None
        if query.filtered:
            allowed = {}
            for ns, key, _ in await self._sql(lambda: self.sql.search_keys(query)):
                allowed.setdefault(ns, set()).add(key)
        now = query.now_ms
        return await self._sql(lambda: self.vectors.top_k(self.sql, spaces, embedding, top_k, now, allowed))

    async def _hit_records(self, hits: _Hits, now: int) -> _Scored:
        by_ns: dict[str, list[str]] = {}
        for ns, key, _ in hits:
            by_ns.setdefault(ns, []).append(key)
        found: dict[tuple[str, str], Record] = {}
        for ns, keys in by_ns.items():
            rows = await self._sql(lambda ns=ns, keys=keys: self.sql.get_many(ns, keys))  # type: ignore[misc]
            try:
                hot = await self._redis(lambda ns=ns, keys=keys: self.hot.get_many(ns, keys))  # type: ignore[misc]
            except Unavailable:
                hot = {}
            for key, row in rows.items():
                entry = hot.get(key)
                found[(ns, key)] = entry.record if entry is not None and entry.record.version > row.version else row
        out = []
        for ns, key, score in hits:
            rec = found.get((ns, key))
            if rec is not None and not rec.deleted and not is_expired(rec, now):
                out.append((rec, score))
        return out

    async def list_namespaces(
        self,
        *,
        prefix: str = "",
        max_depth: int = 0,
        page_size: int = 0,
        page_token: str = "",
        visible: Callable[[str], bool] | None = None,
    ) -> tuple[_Names, str]:
        """Names holding live (persisted, unexpired) records at or below ``prefix``, ascending; with
        ``max_depth``, cut to that many segments and deduplicated. ``visible``: only names it accepts (an
        API key's scope), before they are cut."""
        if prefix:
            validate_namespace(prefix)
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or not 0 <= max_depth <= 64:
            raise InvalidArgument("max_depth must be from 0 to 64")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 0:
            raise InvalidArgument("page_size must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        scope: list[Any] = ["namespaces", prefix, max_depth]
        after = _decode_token(page_token, scope)
        now = self.clock()
        async with self.bulkhead.slot():
            names = await self._sql(lambda: self.sql.live_namespaces(prefix, now))
        if visible is not None:
            names = [n for n in names if visible(n)]
        if max_depth:
            names = sorted({truncate_namespace(n, max_depth) for n in names})
        page = [n for n in names if n > after][: size + 1]
        more = len(page) > size
        page = page[:size]
        return page, _encode_token(page[-1], scope) if more else ""


def _encode_token(after_key: str, scope: list[Any]) -> str:
    raw = json.dumps({"a": after_key, "s": scope}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, scope: list[Any]) -> str:
    if not token:
        return ""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = decode_untrusted_json(raw, what="page_token", max_bytes=_MAX_TOKEN_BYTES, max_depth=2)
        after, got = data["a"], data["s"]
    except (InvalidArgument, ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidArgument("page_token is not a token this server issued") from None
    if got != scope or not isinstance(after, str):
        raise InvalidArgument(
            "page_token was issued for another namespace, prefix, kind, key_prefix, include_deleted or depth"
        )
    return after


def compose_service(
    settings: Settings,
    *,
    hot: HotStore,
    sql: SqlStore,
    queue: BatchQueue,
    on_close: Sequence[Callable[[], None]] = (),
) -> MemoryService:
    """A service over the given stores and queue, with its change feed, breakers and bulkhead built from settings."""
    cb, bh = settings.resilience.circuit_breaker, settings.resilience.bulkhead
    near, tracking = _near_cache(settings, hot)
    return MemoryService(
        settings=settings,
        hot=hot,
        sql=sql,
        queue=queue,
        feed=ChangeFeed(redis_url=settings.storage.redis_url, channel=hot.persisted_channel),
        redis_breaker=breaker_from_settings("redis", cb, logger=log),
        sql_breaker=breaker_from_settings("sql", cb, logger=log),
        bulkhead=Bulkhead("memory service", max_concurrent=bh.max_concurrent, max_queue_size=bh.max_queue_size),
        near=near,
        tracking=tracking,
        on_close=on_close,
    )


def _near_cache(settings: Settings, hot: HotStore) -> tuple[NearCache | None, TrackingFeed | None]:
    """The near cache and its invalidation feed (``near_cache`` settings), or neither when it is off."""
    nc = settings.near_cache
    if not nc.enabled:
        return None, None
    near = NearCache(
        max_entries=nc.max_entries,
        max_bytes=nc.max_bytes,
        max_absent=nc.max_absent_entries,
        absent_ttl_s=nc.absent_ttl_seconds,
        max_stale_s=nc.max_stale_ms / 1000,
    )
    register_near_cache(near)
    tracking = TrackingFeed(
        redis_url=settings.storage.redis_url,
        key_prefix=hot.item_prefix,  # every hot-store entry, and nothing else
        cache=near,
        ping_interval_s=_PING_SHARE * nc.max_stale_ms / 1000,
    )
    return near, tracking


async def build_service(settings: Settings) -> MemoryService:
    """The composition root of the api side: SQL store, hot store, batch queue, then the service, started."""
    from mfh_tasks.runtime import warn_if_store_switched

    sql = SqlStore(settings.storage.database_url)
    try:
        await asyncio.to_thread(sql.create_schema)  # StoreNotCurrent: refuse to start (`mfh db upgrade`)
    except Unavailable as e:  # reads are still served from Redis (docs/architecture.md, degraded modes)
        log.warning("SQL unavailable at start: %s", e)
    except BaseException:
        sql.close()
        raise
    hot = build_hot_store(settings)
    await warn_if_store_switched(settings, sql, hot=hot)
    service = compose_service(
        settings, hot=hot, sql=sql, queue=BatchQueue.from_settings(settings), on_close=[sql.close]
    )
    await service.start()
    return service
