"""Redis hot store: one hash per (namespace, key), staged writes, the host's hybrid logical clock.

Entries are written by four Lua scripts so each step is atomic (docs/architecture.md invariants 1, 3, 5):
``stage`` assigns a version and writes a dirty entry with no TTL; ``mark_clean`` starts the TTL
only for the version that reached SQL; ``apply`` takes a remote or SQL version only if newer;
``unstage`` takes back a staged version whose batch could not be enqueued.
Every dirty entry is also in one sorted set (score = staged ms), which bounds the backlog and
lets reconcile re-enqueue anything whose batch went missing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mfh_core.coalesce import Coalescer
from mfh_models import (
    SCHEMA_VERSION,
    DeadlineExceeded,
    Kind,
    MemoryEvent,
    MFHError,
    NotFound,
    Op,
    Record,
    ResourceExhausted,
    Unavailable,
    VersionConflict,
    event_id_for,
    pack,
    unpack,
)

__all__ = ["Change", "HotEntry", "HotStore"]

_FIELDS = ("vm", "vc", "o", "d", "k", "p", "u", "dirty")


class NeverSent(RedisConnectionError):
    """Redis could not be reached (connect or handshake failed): no command of the call went out."""


class _NeverSentOnConnect(AbstractConnection):
    """A connection whose connect failures are :class:`NeverSent`, so a caller can tell "nothing was sent"
    from "the connection was lost with the command on it" (the command may have run: Redis executes
    what it read before it shuts down, without answering)."""

    async def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        try:
            await super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)
        except NeverSent:
            raise
        except (RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise NeverSent(str(e)) from e


class _Connection(_NeverSentOnConnect, aioredis.Connection):
    pass


class _SSLConnection(_NeverSentOnConnect, aioredis.SSLConnection):
    pass


class _UnixConnection(_NeverSentOnConnect, aioredis.UnixDomainSocketConnection):
    pass


def never_sent_connection_class(redis_url: str) -> type[AbstractConnection]:
    """The connection class for ``redis_url``'s scheme (rediss: TLS, unix: a socket), with connect failures
    raised as NeverSent. Passing a ``connection_class`` to ``from_url`` replaces the one the scheme
    chooses, so it must be chosen by scheme here (a rediss:// URL would otherwise go out in plain text)."""
    scheme = redis_url.split("://", 1)[0].lower()
    return {"rediss": _SSLConnection, "unix": _UnixConnection}.get(scheme, _Connection)


def _lua(name: str) -> str:
    return resources.files("mfh_core").joinpath("lua", name).read_text(encoding="utf-8")


@dataclass(frozen=True, slots=True)
class HotEntry:
    """What Redis holds for one key: the record (maybe a tombstone) and whether SQL has it yet."""

    record: Record
    dirty: bool

    def to_event(self) -> MemoryEvent:
        r = self.record
        return MemoryEvent(
            event_id=event_id_for(r.origin, r.version),
            op=Op.DELETE if r.deleted else Op.PUT,
            namespace=r.namespace,
            key=r.key,
            kind=r.kind,
            payload=r.payload,
            version=r.version,
            origin=r.origin,
            created_at=r.updated_at,
        )


@dataclass(frozen=True, slots=True)
class Change:
    """A validated change to stage; a delete has no kind (the key keeps its own) and payload "null"."""

    op: Op
    namespace: str
    key: str
    kind: Kind | None
    payload: str
    expected_version: int | None = None


class HotStore:
    """The per-host Redis hot store. Async; one instance per event loop."""

    def __init__(
        self,
        *,
        redis_url: str,
        prefix: str,
        origin: str,
        cache_ttl_seconds: int,
        max_backlog: int = 0,
        max_connections: int = 64,
        socket_timeout: float = 5.0,
        clock_skew_ms: int = 0,
    ) -> None:
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            decode_responses=True,
            connection_class=never_sent_connection_class(redis_url),
        )
        self.redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self.prefix = prefix
        self.item_prefix = f"{prefix}:i:"  # every entry's key starts so (the near cache tracks this prefix)
        self.origin = origin
        self.ttl = cache_ttl_seconds
        self.max_backlog = max_backlog
        self.clock_skew_ms = clock_skew_ms  # test only: added to Redis TIME for new versions (stage.lua)
        self.hlc_key = f"{prefix}:hlc"
        self.dirty_key = f"{prefix}:dirty"
        self.persisted_channel = f"{prefix}:persisted"
        self._stage = self.redis.register_script(_lua("stage.lua"))
        #: Concurrent stage_many calls share one script call (each keeps its own all-or-nothing result).
        self.stager: Coalescer[Sequence[Change], list[MemoryEvent]] = Coalescer(self._stage_groups, weight=len)
        self._apply = self.redis.register_script(_lua("apply.lua"))
        self._mark_clean = self.redis.register_script(_lua("mark_clean.lua"))
        self._unstage = self.redis.register_script(_lua("unstage.lua"))
        self._sweep_window = self.redis.register_script(_lua("sweep_window.lua"))
        self._evict = self.redis.register_script(_lua("evict.lua"))
        self.sweep_cursor_key = f"{prefix}:recovery:swept_upto"
        self.run_id_key = f"{prefix}:recovery:run_id"
        self.reconnect_key = f"{prefix}:recovery:reconnect"
        self.catch_up_key = f"{prefix}:recovery:catch_up"

    def item_key(self, namespace: str, key: str) -> str:
        return f"{self.item_prefix}{namespace}:{key}"

    def _split_item_key(self, item_key: str) -> tuple[str, str]:
        ns, _, key = item_key[len(self.prefix) + 3 :].partition(":")
        return ns, key

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except RedisError:
            return False

    async def stage(
        self,
        *,
        op: Op,
        namespace: str,
        key: str,
        kind: Kind | None,
        payload: str,
        expected_version: int | None = None,
    ) -> MemoryEvent:
        """Atomically version and stage one change (see :meth:`stage_many`)."""
        [event] = await self.stage_many([Change(op, namespace, key, kind, payload, expected_version)])
        return event

    async def stage_many(self, changes: Sequence[Change]) -> list[MemoryEvent]:
        """Version and stage every change or none, in one Lua call (shared with concurrent callers).

        Raises NotFound (a delete of an absent or deleted key), VersionConflict or ResourceExhausted
        (the dirty set is at ``max_backlog``), naming the first change that failed; Unavailable when
        Redis could not be reached (nothing was sent, so nothing staged); DeadlineExceeded when the call
        was sent and not answered, in time or at all (a lost connection): the change may be staged, and
        reconcile then persists it.
        """
        if not changes:
            return []
        return await self.stager.submit(changes)

    async def _stage_groups(self, groups: list[Sequence[Change]]) -> list[list[MemoryEvent] | BaseException]:
        """One script call for several callers' groups; per group its events or its error (stage.lua)."""
        keys = [self.hlc_key, self.dirty_key]
        args: list[Any] = [self.origin, self.max_backlog, self.clock_skew_ms, len(groups), *map(len, groups)]
        for changes in groups:
            for c in changes:
                keys.append(self.item_key(c.namespace, c.key))
                ms, ctr = unpack(c.expected_version) if c.expected_version is not None else (0, 0)
                kind = c.kind.value if c.kind is not None else ""
                args += [c.op.value, kind, c.payload, "1" if c.expected_version is not None else "0", ms, ctr]
        try:
            results = await self._stage(keys=keys, args=args)
        except NeverSent as e:
            raise Unavailable(f"redis unavailable: {e}") from e
        except (RedisTimeoutError, RedisConnectionError) as e:
            # Sent, and no answer (a timeout, or the connection lost, e.g. Redis shutting down): the script may
            # have run, so the caller cannot be told "nothing was staged"; a staged write is persisted by reconcile.
            raise DeadlineExceeded(
                f"redis did not answer while staging ({e}); the write may be staged: re-read the key"
            ) from e
        out: list[list[MemoryEvent] | BaseException] = []
        for changes, res in zip(groups, results, strict=True):
            try:
                out.append(self._staged(changes, res))
            except MFHError as e:
                out.append(e)
        return out

    def _staged(self, changes: Sequence[Change], res: list[Any]) -> list[MemoryEvent]:
        """One group's events, or its error raised."""
        if res[0] in ("conflict", "absent"):
            i = int(res[1]) - 1
            c, where = changes[i], f"puts[{i}]: " if len(changes) > 1 else ""
            if res[0] == "absent":
                raise NotFound(f"{where}{c.namespace}/{c.key} not found")
            current = pack(int(res[2]), int(res[3]))
            raise VersionConflict(
                f"{where}{c.namespace}/{c.key}: expected version {c.expected_version}, "
                f"current is {current or 'absent'}",
                current_version=current,
            )
        if res[0] == "backlog":
            raise ResourceExhausted(
                f"write backlog is full ({self.max_backlog} unpersisted entries): the SQL store is behind; retry later"
            )
        now = int(res[1])
        events = []
        for i, c in enumerate(changes):
            version = pack(int(res[2 + 3 * i]), int(res[3 + 3 * i]))
            events.append(
                MemoryEvent.model_construct(  # validated: a Change, the script's versions, our origin
                    event_id=event_id_for(self.origin, version),
                    op=c.op,
                    namespace=c.namespace,
                    key=c.key,
                    kind=Kind(res[4 + 3 * i]),
                    payload=c.payload,
                    version=version,
                    origin=self.origin,
                    created_at=now,
                    schema_version=SCHEMA_VERSION,
                )
            )
        return events

    async def unstage(self, events: Sequence[MemoryEvent]) -> bool:
        """Take back the staged versions of one call whose batch was never enqueued, all or nothing.

        True: none of them is staged any more (each entry holds what it held before). False: all
        stay staged, because what was below one of them is unknown; they are then persisted like
        any staged write whose batch went missing (reconcile). Atomic with the version checks: an
        entry that moved on to a newer version is left as it is.
        """
        if not events:
            return True
        keys = [self.dirty_key, *(self.item_key(e.namespace, e.key) for e in events)]
        args: list[Any] = []
        for e in events:
            args.extend(unpack(e.version))
        return bool(await self._call(self._unstage, keys, args) == "unstaged")

    async def apply(self, record: Record, *, from_sql: bool) -> bool:
        """Take a version made elsewhere if it is newer; True when it was applied.

        ``from_sql``: a read-repair fill (clean, with TTL); otherwise a remote event (dirty until persisted).
        """
        keys, args = self._apply_args(record, from_sql=from_sql)
        return bool(await self._call(self._apply, keys, args))

    async def fill_many(self, records: Sequence[Record], *, chunk: int = 500) -> int:
        """:meth:`apply` with ``from_sql`` for many rows, ``chunk`` per round trip (a joined host warming
        its Redis); returns how many were newer than what the entries held."""
        return sum(await self.apply_many(records, from_sql=True, chunk=chunk))

    async def apply_many(self, records: Sequence[Record], *, from_sql: bool, chunk: int = 500) -> list[bool]:
        """:meth:`apply` for many records, ``chunk`` per pipelined round trip; whether each was applied, in order.

        Each record is still its own script call (atomic on its own), so the outcome is that of applying
        them one after the other (the replicator's hot stage takes a fetched batch so: one round trip
        instead of one per event)."""
        won: list[bool] = []
        try:
            for i in range(0, len(records), chunk):
                calls = [self._apply_args(r, from_sql=from_sql) for r in records[i : i + chunk]]
                # EVALSHA itself, not the script object, which makes the pipeline ask SCRIPT EXISTS first:
                # a second round trip per chunk. A script Redis lost (a restart) is loaded and run again,
                # for those calls only (none of them ran).
                async with self.redis.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        pipe.evalsha(self._apply.sha, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
                for (keys, args), result in zip(calls, results, strict=True):
                    if isinstance(result, NoScriptError):
                        result = await self._apply(keys=keys, args=args)
                    elif isinstance(result, BaseException):
                        raise result
                    won.append(bool(result))
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise Unavailable(f"redis unavailable: {e}") from e
        return won

    def _apply_args(self, record: Record, *, from_sql: bool) -> tuple[list[str], list[Any]]:
        vm, vc = unpack(record.version)
        args = [
            vm,
            vc,
            record.origin,
            "1" if record.deleted else "0",
            record.kind.value,
            record.payload,
            record.updated_at,
            "fill" if from_sql else "remote",
            self.ttl,
        ]
        return [self.item_key(record.namespace, record.key), self.hlc_key, self.dirty_key], args

    async def evict_clean(self, namespace: str, key: str, version: int, origin: str) -> bool:
        """Drop the entry if it is clean and holds exactly ``(version, origin)``: reads refill it from SQL."""
        vm, vc = unpack(version)
        return bool(await self._call(self._evict, [self.item_key(namespace, key)], [vm, vc, origin]))

    async def mark_clean(self, events: Sequence[MemoryEvent]) -> int:
        """Entries still at a persisted version become clean and get their TTL; announce the batch."""
        if not events:
            return 0
        newest: dict[str, int] = {}
        for e in events:
            item = self.item_key(e.namespace, e.key)
            if e.version > newest.get(item, 0):
                newest[item] = e.version
        keys = [self.dirty_key, *newest]
        notification = json.dumps([[e.namespace, e.key, e.version] for e in events], separators=(",", ":"))
        args: list[Any] = [self.ttl, self.persisted_channel, notification]
        for v in newest.values():
            args.extend(unpack(v))
        return int(await self._call(self._mark_clean, keys, args))

    async def get(self, namespace: str, key: str) -> HotEntry | None:
        """The entry for one key, tombstones included; None on a miss."""
        try:
            raw = await self.redis.hmget(self.item_key(namespace, key), list(_FIELDS))
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise Unavailable(f"redis unavailable: {e}") from e
        return self._entry(namespace, key, raw)  # type: ignore[arg-type]

    async def get_many(self, namespace: str, keys: Iterable[str]) -> dict[str, HotEntry]:
        """Entries for many keys of one namespace in one round trip; misses are absent."""
        keys = list(keys)
        if not keys:
            return {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for k in keys:
                    pipe.hmget(self.item_key(namespace, k), list(_FIELDS))
                rows = await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise Unavailable(f"redis unavailable: {e}") from e
        out: dict[str, HotEntry] = {}
        for k, raw in zip(keys, rows, strict=True):
            entry = self._entry(namespace, k, raw)
            if entry is not None:
                out[k] = entry
        return out

    async def claim_dim(self, namespace: str, dim: int) -> int:
        """The namespace's embedding dimension: the first one claimed (here or seeded from SQL) stays."""
        key = f"{self.prefix}:dim:{namespace}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(key, dim, nx=True)
            pipe.get(key)
            _, got = await pipe.execute()
        return int(got) if got is not None else dim

    async def known_dim(self, namespace: str) -> int | None:
        """The dimension claimed for the namespace on this host, if any."""
        got = await self.redis.get(f"{self.prefix}:dim:{namespace}")
        return int(got) if got is not None else None

    async def ttl_of(self, namespace: str, key: str) -> int:
        """Seconds left before the entry expires; -1 when it has no TTL (dirty), -2 when absent."""
        return int(await self.redis.ttl(self.item_key(namespace, key)))

    async def holds_data(self) -> bool:
        """Whether this Redis has ever staged a write here (its clock exists) or holds any entry."""
        if await self.redis.exists(self.hlc_key):
            return True
        async for _ in self.redis.scan_iter(match=f"{self.prefix}:i:*", count=1000):
            return True
        return False

    async def dirty_count(self) -> int:
        try:
            return int(await self.redis.zcard(self.dirty_key))
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise Unavailable(f"redis unavailable: {e}") from e

    async def stale_dirty(self, *, older_than_ms: int, limit: int = 1000) -> list[MemoryEvent]:
        """Events of entries dirty since before ``older_than_ms`` (unix ms): batches that may be lost."""
        out: list[MemoryEvent] = []
        async for page in self.dirty_events(upto_ms=older_than_ms, page=min(limit, 2000)):
            out.extend(page)
            if len(out) >= limit:
                break
        return out[:limit]

    async def dirty_events(
        self, *, after_ms: int | None = None, upto_ms: int | None = None, page: int = 2000
    ) -> AsyncIterator[list[MemoryEvent]]:
        """Pages of events of the entries staged in ``(after_ms, upto_ms]`` (None: unbounded) and still dirty.

        One ZRANGEBYSCORE and one pipelined read per page. Index members whose entry is gone are removed.
        """
        low: str = f"({after_ms}" if after_ms is not None else "-inf"
        high: str = str(upto_ms) if upto_ms is not None else "+inf"
        seen_at_low: set[str] = set()
        while True:
            found: list[Any] = await self.redis.zrangebyscore(
                self.dirty_key, low, high, start=len(seen_at_low), num=page, withscores=True
            )
            rows: list[tuple[str, float]] = [(str(pair[0]), float(pair[1])) for pair in found]
            members = [m for m, _ in rows if m not in seen_at_low]
            if not members:
                return
            async with self.redis.pipeline(transaction=False) as pipe:
                for item in members:
                    pipe.hmget(item, list(_FIELDS))
                raws = await pipe.execute()
            events, gone = [], []
            for item, raw in zip(members, raws, strict=True):
                ns, key = self._split_item_key(item)
                entry = self._entry(ns, key, raw)
                if entry is None:
                    gone.append(item)
                elif entry.dirty:
                    events.append(entry.to_event())
            if gone:
                await self.redis.zrem(self.dirty_key, *gone)
            if events:
                yield events
            if len(rows) < page:
                return
            # Next page from the last score on, past the entries of that score already seen (many
            # entries can share one millisecond; members of one score come in a fixed order).
            last = rows[-1][1]
            if low != str(int(last)):
                seen_at_low = set()
            low = str(int(last))
            seen_at_low.update(m for m, sc in rows if sc == last)

    async def sweep_window(self, *, stale_ms: int) -> tuple[int | None, int]:
        """Take the next window of staged times to sweep: ``(after, upto]``, upto = Redis time - ``stale_ms``."""
        after, upto = await self._call(self._sweep_window, [self.sweep_cursor_key], [stale_ms])
        return (int(after) if after else None), int(upto)

    async def claim_restart(self, run_id: str) -> bool:
        """True once per Redis run for the first caller that sees ``run_id`` differ from the one recorded."""
        previous = await self.redis.set(self.run_id_key, run_id, get=True)
        return previous != run_id

    async def claim_reconnect(self, *, within_ms: int = 10_000) -> bool:
        """True for the first of the processes that saw Redis come back within ``within_ms`` of each other."""
        return bool(await self.redis.set(self.reconnect_key, self.origin, nx=True, px=within_ms))

    async def persisted_already(self, events: Sequence[MemoryEvent]) -> list[bool]:
        """Per event: whether its entry is clean at exactly its version (that version is in SQL). One
        pipelined round trip; an entry that is gone or dirty says no."""
        if not events:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for e in events:
                pipe.hmget(self.item_key(e.namespace, e.key), ["vm", "vc", "dirty"])
            raws = await pipe.execute()
        out = []
        for e, (vm, vc, dirty) in zip(events, raws, strict=True):
            out.append(vm is not None and vc is not None and dirty == "0" and pack(int(vm), int(vc)) == e.version)
        return out

    async def claim_catch_up(self, *, within_ms: int = 2_000) -> bool:
        """True for the first of the workers whose SQL came back within ``within_ms`` of each other
        (the one that persists the dirty entries at once: mfh_tasks.persist)."""
        return bool(await self.redis.set(self.catch_up_key, self.origin, nx=True, px=within_ms))

    def _entry(self, namespace: str, key: str, raw: list[str | None]) -> HotEntry | None:
        vm, vc, origin, deleted, kind, payload, updated, dirty = raw
        if vm is None or vc is None:
            return None
        record = Record.model_construct(
            namespace=namespace,
            key=key,
            kind=Kind(kind or Kind.MEMORY_ITEM.value),
            payload=payload or "null",
            version=pack(int(vm), int(vc)),
            origin=origin or "",
            deleted=deleted == "1",
            updated_at=int(updated or 0),
        )
        return HotEntry(record=record, dirty=dirty == "1")

    async def _call(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except (RedisConnectionError, RedisTimeoutError) as e:
            raise Unavailable(f"redis unavailable: {e}") from e
