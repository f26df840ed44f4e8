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
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

from redis.exceptions import RedisError

from mfh_api.search import SearchSpec, validate_search
from mfh_client.types import Durability, PutResult, PutSpec
from mfh_core import Change, ChangeFeed, HotStore, SqlStore
from mfh_core.metrics import CACHE_LOOKUPS
from mfh_core.resilience import Bulkhead, CircuitBreaker, OutageLog, breaker_from_settings
from mfh_core.searchindex import SearchQuery
from mfh_core.vectors import VectorCache
from mfh_models import (
    DeadlineExceeded,
    InvalidArgument,
    MemoryEvent,
    MFHError,
    NotFound,
    Op,
    Record,
    Settings,
    Unavailable,
    decode_untrusted_json,
    parse_kind,
    validate_key,
    validate_namespace,
    validate_payload,
)
from mfh_models.expiry import is_expired, refreshed_payload, with_ttl
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
_CACHE_HIT: Final = CACHE_LOOKUPS.labels("hit")  # labels() takes a lock: resolve the children once
_CACHE_MISS: Final = CACHE_LOOKUPS.labels("miss")


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
        self._on_close = list(on_close)
        self._enqueue_outage = OutageLog(
            "write queue",
            what="write calls not enqueued",
            logger=log,
            summary_every_s=settings.resilience.circuit_breaker.summary_every_seconds,
        )
        self._closed = False

    async def start(self) -> None:
        """Subscribe to the persisted channel (PERSISTED waiters and Watch)."""
        await self.feed.start()

    async def close(self) -> None:
        """Flush pending writes to the queue, then close the stores."""
        if self._closed:
            return
        self._closed = True
        await self.queue.close()
        await self.feed.close()
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

    async def _lookup(self, namespace: str, key: str) -> Record | None:
        """The newest known record (tombstones included) from Redis, else SQL; None if neither has it."""
        redis_ok = True
        try:
            entry = await self._redis(lambda: self.hot.get(namespace, key))
        except Unavailable:
            entry, redis_ok = None, False
        if entry is not None:
            _CACHE_HIT.inc()
            return entry.record
        _CACHE_MISS.inc()
        try:
            row = await self._sql(lambda: self.sql.get(namespace, key))
        except Unavailable as e:
            raise Unavailable(f"cannot read {namespace}/{key}: not in the hot store and SQL is down ({e})") from e
        if row is None:
            return None
        return await self._fill(row) if redis_ok else row

    async def get(self, namespace: str, key: str) -> Record:
        """One live record; NotFound when absent or a tombstone."""
        validate_namespace(namespace)
        validate_key(key)
        now = self.clock()
        async with self.bulkhead.slot():
            rec = await self._lookup(namespace, key)
            if rec is None or rec.deleted or is_expired(rec, now):
                raise NotFound(f"{namespace}/{key} not found")
            return await self._maybe_refresh(rec, now)

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
        async with self.bulkhead.slot():
            found: dict[str, Record] = {}
            redis_ok = True
            try:
                hits = await self._redis(lambda: self.hot.get_many(namespace, unique))
            except Unavailable:
                hits, redis_ok = {}, False
            found.update({k: e.record for k, e in hits.items()})
            misses = [k for k in unique if k not in found]
            _CACHE_HIT.inc(len(found))
            if misses:
                _CACHE_MISS.inc(len(misses))
                try:
                    rows = await self._sql(lambda: self.sql.get_many(namespace, misses))
                except Unavailable as e:
                    raise Unavailable(f"cannot read {len(misses)} keys missing from the hot store: {e}") from e
                for k, row in rows.items():
                    found[k] = await self._fill(row) if redis_ok else row
        now = self.clock()
        live = {k: r for k, r in found.items() if not r.deleted and not is_expired(r, now)}
        records = [await self._maybe_refresh(live[k], now) for k in unique if k in live]
        missing = [k for k in unique if k not in live]
        return records, missing

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
            events = await self._redis_write(lambda: self.hot.stage_many(puts))
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
            [event] = await self._redis_write(lambda: self.hot.stage_many([tombstone]))
            waiters = await self._enqueue([event], durability)
        await self._await_persisted([event], waiters, started, timeout)
        return _result(event)

    # -- watch and health -------------------------------------------------------------------------

    async def watch(self, namespace: str, key_prefix: str = "") -> AsyncIterator[MemoryEvent]:
        """Changes of one namespace as they are persisted (local or replicated), from now on (no backfill).

        Each event carries the key's newest state when it is sent, so changes may be coalesced; delivery is
        at least once while subscribed, and the stream ends with Unavailable if the subscription drops.
        """
        validate_namespace(namespace)
        if key_prefix:
            validate_key(key_prefix)
        async with self.feed.subscribe(namespace, key_prefix) as watcher:
            last: dict[str, int] = {}
            while True:
                key, version = await watcher.next()
                if last.get(key, 0) >= version:
                    continue
                rec = await self._lookup(namespace, key)
                if rec is None or rec.version < version or is_expired(rec, self.clock()):
                    continue
                if len(last) > 10_000:
                    last.clear()
                last[key] = rec.version
                yield _event_of(rec)

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

    async def search(self, spec: SearchSpec) -> _Scored:
        """Records in scope that pass the filters, best first: by cosine similarity with ``spec.embedding``,
        else by full-text rank, else newest first. Reads the SQL index (PERSISTED state), overlaid with newer
        hot entries: a record deleted or expired since it was indexed is left out."""
        now = self.clock()
        query, embedding, top_k = validate_search(spec, now)
        async with self.bulkhead.slot():
            if embedding:
                hits = await self._vector_hits(query, embedding, top_k)
            else:
                hits = await self._sql(lambda: self.sql.search_keys(query))
            return await self._hit_records(hits, now)

    async def _vector_hits(self, query: SearchQuery, embedding: Sequence[float], top_k: int) -> _Hits:
        spaces = await self._sql(lambda: self.sql.search_namespaces(query.namespace, prefix=query.prefix))
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
        self, *, prefix: str = "", max_depth: int = 0, page_size: int = 0, page_token: str = ""
    ) -> tuple[_Names, str]:
        """Names holding live (persisted, unexpired) records at or below ``prefix``, ascending; with
        ``max_depth``, cut to that many segments and deduplicated."""
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
        if max_depth:
            names = sorted({truncate_namespace(n, max_depth) for n in names})
        page = [n for n in names if n > after][: size + 1]
        more = len(page) > size
        page = page[:size]
        return page, _encode_token(page[-1], scope) if more else ""


def _event_of(rec: Record) -> MemoryEvent:
    from mfh_core.hotstore import HotEntry

    return HotEntry(record=rec, dirty=False).to_event()


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
    return MemoryService(
        settings=settings,
        hot=hot,
        sql=sql,
        queue=queue,
        feed=ChangeFeed(redis_url=settings.storage.redis_url, channel=hot.persisted_channel),
        redis_breaker=breaker_from_settings("redis", cb, logger=log),
        sql_breaker=breaker_from_settings("sql", cb, logger=log),
        bulkhead=Bulkhead("memory service", max_concurrent=bh.max_concurrent, max_queue_size=bh.max_queue_size),
        on_close=on_close,
    )


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
