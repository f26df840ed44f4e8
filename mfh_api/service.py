"""The transport-free memory service both servers (gRPC, ZeroMQ) call.

Reads: hot store first, SQL on a miss (then a read-repair fill that never overwrites a newer
staged version). Writes: stage in Redis (version assigned) and enqueue through the batcher
(DESIGN.md invariants 1, 4, 5). Redis and SQL sit behind circuit breakers; every call behind a
bulkhead. No authentication here: the transports do it before calling in.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, TypeVar

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from mfh_core import HotStore, SqlStore
from mfh_core.metrics import CACHE_LOOKUPS
from mfh_core.resilience import Bulkhead, CircuitBreaker
from mfh_models import (
    DeadlineExceeded,
    InvalidArgument,
    Kind,
    MemoryEvent,
    MFHError,
    NotFound,
    Op,
    Record,
    ResourceExhausted,
    Settings,
    Unavailable,
    VersionConflict,
    event_id_for,
    pack,
    parse_kind,
    unpack,
    validate_key,
    validate_namespace,
    validate_payload,
)
from mfh_tasks import WriteBatcher

__all__ = [
    "MAX_BATCH_GET_KEYS",
    "MAX_BATCH_PUTS",
    "MAX_PAGE_SIZE",
    "Durability",
    "MemoryService",
    "PutResult",
    "PutSpec",
    "build_service",
]

log = logging.getLogger("mfh.service")

T = TypeVar("T")

MAX_BATCH_GET_KEYS: Final = 1000
MAX_BATCH_PUTS: Final = 500
MAX_PAGE_SIZE: Final = 1000
DEFAULT_PAGE_SIZE: Final = 100
_MAX_VERSION: Final = (1 << 63) - 1
_READ_ONLY: Final = "read-only mode: redis unavailable"
_CACHE_HIT: Final = CACHE_LOOKUPS.labels("hit")  # labels() takes a lock: resolve the children once
_CACHE_MISS: Final = CACHE_LOOKUPS.labels("miss")


class Durability(StrEnum):
    ACCEPTED = "accepted"  # staged in Redis and its batch enqueued
    PERSISTED = "persisted"  # committed to SQL


@dataclass(frozen=True)
class PutResult:
    version: int
    event_id: str


@dataclass(frozen=True)
class PutSpec:
    """One put as a client asks for it; ``payload`` is a dict or JSON text."""

    namespace: str
    key: str
    kind: str
    payload: Any
    expected_version: int | None = None


@dataclass(frozen=True)
class _ValidPut:
    """A checked change, ready to stage; a delete has no kind (the key keeps its own) and payload "null"."""

    namespace: str
    key: str
    kind: Kind | None
    payload: str
    expected_version: int | None
    op: Op = Op.PUT


def _check_expected(v: int | None) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > _MAX_VERSION:
        raise InvalidArgument(f"expected_version must be an integer from 0 to {_MAX_VERSION}")
    return v


def _validate_put(spec: PutSpec) -> _ValidPut:
    ns, key = validate_namespace(spec.namespace), validate_key(spec.key)
    payload = spec.payload
    if isinstance(payload, bytes | str):
        if len(payload) > 4 * 1024 * 1024:
            raise InvalidArgument("payload is far larger than the 256 KiB limit")
        try:
            payload = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidArgument(f"payload_json is not valid JSON: {e}") from None
    kind, text = validate_payload(spec.kind, payload)
    return _ValidPut(ns, key, kind, text, _check_expected(spec.expected_version))


def _result(e: MemoryEvent) -> PutResult:
    return PutResult(version=e.version, event_id=e.event_id)


# -- atomic multi-put staging -----------------------------------------------------------------------

# Like mfh_core/lua/stage.lua for several keys at once: every check (expected_version, a delete's key
# must be live, the backlog bound) runs before anything is written, so a BatchPut is all or nothing and
# a Delete cannot tombstone a key that another call deleted a moment before. Versions grow within a batch.
# KEYS: hlc, dirty, item1..itemN
# ARGV: origin, max_backlog, then per item: op, kind, payload, has_expected, exp_ms, exp_ctr
_STAGE_MANY_LUA: Final = """
local hlc, dirty = KEYS[1], KEYS[2]
local n = #KEYS - 2
local cur, new_dirty = {}, 0
for i = 1, n do
  local item, base = KEYS[i + 2], 2 + (i - 1) * 6
  local c = redis.call('HMGET', item, 'vm', 'vc', 'd', 'k')
  cur[i] = c
  local cm, cc = tonumber(c[1]), tonumber(c[2])
  if ARGV[base + 1] == 'delete' and ((not cm) or c[3] == '1') then return {'absent', tostring(i)} end
  if ARGV[base + 4] == '1' then
    local em, ec = tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6])
    if em == 0 and ec == 0 then
      if cm and c[3] ~= '1' then return {'conflict', tostring(i), c[1], c[2]} end
    elseif (not cm) or cm ~= em or cc ~= ec then
      return {'conflict', tostring(i), c[1] or '0', c[2] or '0'}
    end
  end
  if not redis.call('ZSCORE', dirty, item) then new_dirty = new_dirty + 1 end
end
local max_backlog = tonumber(ARGV[2])
if max_backlog > 0 and new_dirty > 0 and redis.call('ZCARD', dirty) + new_dirty > max_backlog then
  return {'backlog'}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', hlc, 'm', 'c')
local hm, hc = tonumber(h[1]), tonumber(h[2]) or 0
local snow = string.format('%.0f', now)
local out = {'ok', snow}
for i = 1, n do
  local item, base = KEYS[i + 2], 2 + (i - 1) * 6
  local m, c = now, 0
  local function bump(om, oc)
    if om and (om > m or (om == m and oc + 1 > c)) then m, c = om, oc + 1 end
  end
  bump(hm, hc)
  bump(tonumber(cur[i][1]), tonumber(cur[i][2]) or 0)
  if c > 65535 then m, c = m + 1, 0 end
  hm, hc = m, c
  local kind = ARGV[base + 2]
  if kind == '' then kind = cur[i][4] or 'memory_item' end
  local deleted = '0'
  if ARGV[base + 1] == 'delete' then deleted = '1' end
  local ms, cs = string.format('%.0f', m), string.format('%.0f', c)
  redis.call('HSET', item, 'vm', ms, 'vc', cs, 'o', ARGV[1], 'd', deleted, 'k', kind, 'p', ARGV[base + 3],
    'u', snow, 'dirty', '1')
  redis.call('PERSIST', item)
  redis.call('ZADD', dirty, now, item)
  out[#out + 1] = ms
  out[#out + 1] = cs
  out[#out + 1] = kind
end
redis.call('HSET', hlc, 'm', string.format('%.0f', hm), 'c', string.format('%.0f', hc))
return out
"""


async def _stage_many(hot: HotStore, script: AsyncScript, changes: Sequence[_ValidPut]) -> list[MemoryEvent]:
    """Stage every change or none (NotFound / VersionConflict / ResourceExhausted name the first that failed)."""
    keys = [hot.hlc_key, hot.dirty_key, *(hot.item_key(p.namespace, p.key) for p in changes)]
    args: list[Any] = [hot.origin, hot.max_backlog]
    for p in changes:
        ms, ctr = unpack(p.expected_version) if p.expected_version is not None else (0, 0)
        kind = p.kind.value if p.kind is not None else ""
        args += [p.op.value, kind, p.payload, "1" if p.expected_version is not None else "0", ms, ctr]
    res = await script(keys=keys, args=args)
    if res[0] in ("conflict", "absent"):
        i = int(res[1]) - 1
        p, where = changes[i], f"puts[{i}]: " if len(changes) > 1 else ""
        if res[0] == "absent":
            raise NotFound(f"{where}{p.namespace}/{p.key} not found")
        current = pack(int(res[2]), int(res[3]))
        raise VersionConflict(
            f"{where}{p.namespace}/{p.key}: expected version {p.expected_version}, current is {current or 'absent'}",
            current_version=current,
        )
    if res[0] == "backlog":
        raise ResourceExhausted(
            f"write backlog is full ({hot.max_backlog} unpersisted entries): the SQL store is behind; retry later"
        )
    now = int(res[1])
    return [
        MemoryEvent(
            event_id=event_id_for(hot.origin, v := pack(int(res[2 + 3 * i]), int(res[3 + 3 * i]))),
            op=p.op,
            namespace=p.namespace,
            key=p.key,
            kind=Kind(res[4 + 3 * i]),
            payload=p.payload,
            version=v,
            origin=hot.origin,
            created_at=now,
        )
        for i, p in enumerate(changes)
    ]


# -- the persisted channel: PERSISTED waiters and Watch streams ---------------------------------------


class _Watcher:
    def __init__(self, namespace: str, prefix: str, size: int) -> None:
        self.namespace, self.prefix = namespace, prefix
        self.queue: asyncio.Queue[tuple[str, int] | None] = asyncio.Queue(size)
        self.error: MFHError | None = None

    def fail(self, error: MFHError) -> None:
        if self.error is None:
            self.error = error
            with contextlib.suppress(asyncio.QueueFull):
                self.queue.put_nowait(None)

    async def next(self) -> tuple[str, int]:
        item = await self.queue.get() if self.error is None else None
        if item is None:
            assert self.error is not None
            raise self.error
        return item


class ChangeFeed:
    """One Redis subscription per service to ``HotStore.persisted_channel`` (mark_clean publishes
    ``[[namespace, key, version], ...]`` after each SQL commit): wakes PERSISTED waiters, feeds Watch."""

    def __init__(self, *, redis_url: str, channel: str, watch_queue_size: int = 1000) -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            redis_url, decode_responses=True, socket_connect_timeout=5.0, socket_keepalive=True
        )
        self.channel = channel
        self.watch_queue_size = watch_queue_size
        self._waiters: dict[tuple[str, str, int], asyncio.Future[None]] = {}
        self._watchers: set[_Watcher] = set()
        self._task: asyncio.Task[None] | None = None
        self._subscribed: asyncio.Event | None = None
        self.connected = False

    async def start(self, wait: float = 5.0) -> None:
        self._subscribed = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="mfh-changefeed")
        try:
            await asyncio.wait_for(self._subscribed.wait(), wait)
        except TimeoutError:
            log.warning("not subscribed to %s yet; PERSISTED writes and Watch wait for redis", self.channel)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for w in list(self._watchers):
            w.fail(Unavailable("server is shutting down"))
        await self._redis.aclose()

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.connected, backoff = True, 0.05
                assert self._subscribed is not None
                self._subscribed.set()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None:
                        self._dispatch(msg["data"])
            except (RedisError, OSError) as e:
                if self.connected:
                    log.warning("change feed lost its redis subscription: %s", e)
                self.connected = False
                # Watchers may have missed changes: end their streams so clients re-list and re-watch.
                for w in list(self._watchers):
                    w.fail(Unavailable(f"watch interrupted: redis subscription lost ({e})"))
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _dispatch(self, data: Any) -> None:
        try:
            entries = [(str(ns), str(key), int(v)) for ns, key, v in json.loads(data)]
        except (ValueError, TypeError):
            log.warning("ignoring a malformed message on %s: %.200r", self.channel, data)
            return
        for ns, key, v in entries:
            fut = self._waiters.get((ns, key, v))
            if fut is not None and not fut.done():
                fut.set_result(None)
            for w in self._watchers:
                if w.namespace == ns and key.startswith(w.prefix):
                    try:
                        w.queue.put_nowait((key, v))
                    except asyncio.QueueFull:
                        w.fail(ResourceExhausted("watch stream fell behind; list again and re-watch"))

    def expect(self, events: Sequence[MemoryEvent]) -> list[asyncio.Future[None]]:
        """Futures resolved when each event's batch is committed (register before enqueueing)."""
        loop = asyncio.get_running_loop()
        futs = []
        for e in events:
            fut = self._waiters.setdefault((e.namespace, e.key, e.version), loop.create_future())
            futs.append(fut)
        return futs

    def forget(self, events: Sequence[MemoryEvent]) -> None:
        for e in events:
            self._waiters.pop((e.namespace, e.key, e.version), None)

    @contextlib.asynccontextmanager
    async def subscribe(self, namespace: str, prefix: str) -> AsyncIterator[_Watcher]:
        if not self.connected:
            raise Unavailable("watch unavailable: not subscribed to redis")
        w = _Watcher(namespace, prefix, self.watch_queue_size)
        self._watchers.add(w)
        try:
            yield w
        finally:
            self._watchers.discard(w)


class MemoryService:
    """Transport-free: validation, reads (hot store → SQL fallback), writes (stage → batcher), auth-free."""

    def __init__(
        self,
        *,
        settings: Settings,
        hot: HotStore,
        sql: SqlStore,
        batcher: WriteBatcher,
        on_close: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.settings = settings
        self.hot = hot
        self.sql = sql
        self.batcher = batcher
        self._on_close = list(on_close)
        cb, bh = settings.resilience.circuit_breaker, settings.resilience.bulkhead
        self.redis_breaker = CircuitBreaker(
            "redis", failure_threshold=cb.failure_threshold, reset_timeout=cb.reset_timeout
        )
        self.sql_breaker = CircuitBreaker("sql", failure_threshold=cb.failure_threshold, reset_timeout=cb.reset_timeout)
        self.bulkhead = Bulkhead("memory service", max_concurrent=bh.max_concurrent, max_queue_size=bh.max_queue_size)
        self.feed = ChangeFeed(redis_url=settings.storage.redis_url, channel=hot.persisted_channel)
        self._stage_many = hot.redis.register_script(_STAGE_MANY_LUA)
        self._closed = False

    async def start(self) -> None:
        """Subscribe to the persisted channel (PERSISTED waiters and Watch)."""
        await self.feed.start()

    async def close(self) -> None:
        """Flush pending writes to the queue, then close the stores."""
        if self._closed:
            return
        self._closed = True
        await self.batcher.close()
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
        async with self.bulkhead.slot():
            rec = await self._lookup(namespace, key)
        if rec is None or rec.deleted:
            raise NotFound(f"{namespace}/{key} not found")
        return rec

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
        records = [found[k] for k in unique if k in found and not found[k].deleted]
        missing = [k for k in unique if k not in found or found[k].deleted]
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
        except Unavailable as e:
            raise Unavailable(f"{_READ_ONLY} ({e.message})") from e

    async def _enqueue(self, events: list[MemoryEvent], durability: Durability) -> list[asyncio.Future[None]] | None:
        """Hand staged events to the batcher (acknowledged once enqueued); PERSISTED waiters are registered first."""
        waiters = self.feed.expect(events) if durability is Durability.PERSISTED else None
        try:
            # Shielded: once staged, a write is enqueued even if the caller goes away.
            await asyncio.shield(self.batcher.submit_many(events))
        except BaseException:
            self.feed.forget(events)
            raise
        return waiters

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
        left = limit - (asyncio.get_running_loop().time() - started)
        try:
            await asyncio.wait_for(asyncio.gather(*waiters), max(left, 0.0))
        except TimeoutError:
            raise DeadlineExceeded(
                f"{len(events)} write(s) accepted (version {events[0].version}) but not yet persisted "
                f"within {limit:.3g}s; they will still be written to SQL"
            ) from None
        finally:
            self.feed.forget(events)

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
        puts: list[_ValidPut] = []
        seen: set[tuple[str, str]] = set()
        for i, spec in enumerate(specs):
            try:
                p = _validate_put(spec)
            except InvalidArgument as e:
                raise InvalidArgument(f"puts[{i}]: {e.message}" if len(specs) > 1 else e.message) from None
            if (p.namespace, p.key) in seen:
                raise InvalidArgument(f"puts[{i}]: {p.namespace}/{p.key} appears more than once in the batch")
            seen.add((p.namespace, p.key))
            puts.append(p)
        started = asyncio.get_running_loop().time()
        async with self.bulkhead.slot():
            for p in puts:
                if p.expected_version is not None:
                    await self._ensure_hot(p.namespace, p.key)
            events = await self._redis_write(lambda: _stage_many(self.hot, self._stage_many, puts))
            waiters = await self._enqueue(events, durability)
        await self._await_persisted(events, waiters, started, timeout)
        return [_result(e) for e in events]

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
            if current is None or current.deleted:
                raise NotFound(f"{namespace}/{key} not found")
            tombstone = _ValidPut(namespace, key, None, "null", expected, op=Op.DELETE)
            [event] = await self._redis_write(lambda: _stage_many(self.hot, self._stage_many, [tombstone]))
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
                if rec is None or rec.version < version:
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
        for r in rows:
            entry = hot.get(r.key)
            rec = entry.record if entry is not None and entry.record.version > r.version else r
            if (rec.deleted and not include_deleted) or (k is not None and rec.kind is not k):
                continue
            out.append(rec)
        token = _encode_token(rows[-1].key, scope) if more and rows else ""
        return out, token


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
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, got = data["a"], data["s"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidArgument("page_token is not a token this server issued") from None
    if got != scope or not isinstance(after, str):
        raise InvalidArgument("page_token was issued for another namespace, kind, key_prefix or include_deleted")
    return after


async def build_service(settings: Settings) -> MemoryService:
    """Composition root of the api side: hot store, SQL store, broker + persist sender, batcher."""
    from mfh_tasks import build_broker, build_hot_store, declare_persist_actor, encode_batch

    hot = build_hot_store(settings)
    sql = SqlStore(settings.storage.database_url)
    try:
        await asyncio.to_thread(sql.create_schema)
    except Unavailable as e:  # reads are still served from Redis (DESIGN.md degraded modes)
        log.warning("SQL unavailable at start: %s", e)
    broker = build_broker(settings)
    actor = declare_persist_actor(broker, settings)
    wb = settings.write_behind

    def send(events: list[MemoryEvent]) -> None:
        actor.send(encode_batch(events))

    batcher = WriteBatcher(
        send,
        max_size=wb.batch_max_size,
        max_delay_s=wb.batch_max_delay_ms / 1000,
    )
    service = MemoryService(settings=settings, hot=hot, sql=sql, batcher=batcher, on_close=[broker.close, sql.close])
    await service.start()
    return service
