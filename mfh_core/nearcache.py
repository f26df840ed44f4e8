"""The near cache: recently read hot-store entries kept in the api process, dropped when Redis says so.

Entries are keyed by ``(namespace, key)`` and hold the record (or a confirmed absence: neither
Redis nor SQL had the key) plus, per transport, the encoded answer (protobuf bytes, a ZeroMQ
JSON fragment), so a hit does no conversion. Two LRU tables, records bounded by entries and
bytes, absences by entries (and an age), never grow past their settings.

Correctness (docs/operations.md, "The near cache"): :class:`~mfh_core.tracking.TrackingFeed`
tells the cache about every change of a hot-store key, from any process or host, and confirms
with a ping on the same connection that it has passed on everything Redis sent before the ping.
A hit is served only while such a confirmation is at most ``max_stale_s`` old, so a write Redis
applied more than ``max_stale_s`` ago is never hidden by a cached entry. A read that was in
flight when its key changed is not stored (:meth:`NearCache.begin` / :meth:`NearCache.finish`),
and when the feed loses its connection the whole cache is dropped and stays off until tracking
is back. Writes made through this api invalidate their keys at once (read-your-writes).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from mfh_models import Record

__all__ = ["NearCache", "NearEntry", "NearStats", "Ticket"]

#: What one record entry is charged against ``max_bytes``: its payload three times (the record's
#: text and up to two transports' encodings) plus a fixed overhead (objects, table slots, headers).
_COPIES: Final = 3
_OVERHEAD: Final = 400


@dataclass(slots=True)
class NearEntry:
    """A cached answer: the record (a tombstone is a record too), or None for a confirmed absence."""

    record: Record | None
    size: int
    born: float
    wire: dict[str, Any] = field(default_factory=dict)  # transport name -> its encoded answer


@dataclass(slots=True)
class _Pending:
    readers: int = 0
    gen: int = 0  # bumped by every invalidation of the key while reads of it are in flight


@dataclass(frozen=True, slots=True)
class Ticket:
    """One read in flight; its result is stored only if nothing invalidated the key meanwhile."""

    ident: tuple[str, str]
    pending: _Pending
    gen: int
    epoch: int


@dataclass(slots=True)
class NearStats:
    """Counters for the metrics (read at scrape time: nothing is exported on the hot path)."""

    hits: int = 0
    misses: int = 0
    bypasses: int = 0  # lookups while the cache was off or its confirmation too old
    evictions: int = 0
    invalidations: int = 0  # entries dropped because their key changed
    flushes: int = 0  # whole-cache drops (connection lost, FLUSHDB, tracking off)


class NearCache:
    """Bounded LRU tables of records and absences; usable only while the invalidation feed is confirmed."""

    def __init__(
        self,
        *,
        max_entries: int,
        max_bytes: int,
        max_absent: int,
        absent_ttl_s: float,
        max_stale_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_absent = max_absent
        self.absent_ttl_s = absent_ttl_s
        self.max_stale_s = max_stale_s
        self.clock = clock
        self.stats = NearStats()
        self._records: OrderedDict[tuple[str, str], NearEntry] = OrderedDict()
        self._absent: OrderedDict[tuple[str, str], NearEntry] = OrderedDict()
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._bytes = 0
        self._epoch = 0
        self._tracking = False
        self._confirmed_at = float("-inf")
        #: Called when a lookup finds tracking on but its confirmation too old (the feed pings at once).
        self.on_stale: Callable[[], None] | None = None

    # -- state of the invalidation feed -------------------------------------------------------

    @property
    def tracking(self) -> bool:
        """Whether the invalidation feed is connected and subscribed."""
        return self._tracking

    def usable(self) -> bool:
        """Hits may be served (and results stored): tracking is on and was confirmed recently enough."""
        return self._tracking and self.clock() - self._confirmed_at <= self.max_stale_s

    def tracking_started(self) -> None:
        """The feed is subscribed again: start empty; hits wait for the first confirmation."""
        self.clear()
        self._tracking = True
        self._confirmed_at = float("-inf")

    def tracking_lost(self) -> None:
        """The feed's connection is gone (changes may be missed): drop everything and stay off."""
        self._tracking = False
        self._confirmed_at = float("-inf")
        self.clear()

    def confirmed(self, sent_at: float) -> None:
        """Every invalidation Redis sent before it saw a ping sent at ``sent_at`` has been applied."""
        if sent_at > self._confirmed_at:
            self._confirmed_at = sent_at

    # -- reads --------------------------------------------------------------------------------

    def lookup(self, ident: tuple[str, str]) -> NearEntry | None:
        """The cached answer for ``(namespace, key)``, or None (a miss, or the cache cannot be trusted now)."""
        if not self.usable():
            self.stats.bypasses += 1
            if self._tracking and self.on_stale is not None:
                self.on_stale()
            return None
        entry = self._records.get(ident)
        if entry is not None:
            self._records.move_to_end(ident)
            self.stats.hits += 1
            return entry
        entry = self._absent.get(ident)
        if entry is not None:
            if self.clock() - entry.born <= self.absent_ttl_s:
                self.stats.hits += 1
                return entry
            del self._absent[ident]
        self.stats.misses += 1
        return None

    def begin(self, ident: tuple[str, str]) -> Ticket | None:
        """Before reading ``ident`` from Redis: None when the result may not be cached at all."""
        if not self.usable():
            return None
        p = self._pending.get(ident)
        if p is None:
            p = self._pending[ident] = _Pending()
        p.readers += 1
        return Ticket(ident, p, p.gen, self._epoch)

    def finish(self, ticket: Ticket | None, record: Record | None, *, store: bool = True) -> NearEntry | None:
        """After the read (``store=False``: it failed): store its result if the key did not change meanwhile."""
        if ticket is None:
            return None
        p = ticket.pending
        p.readers -= 1
        if p.readers <= 0 and self._pending.get(ticket.ident) is p:
            del self._pending[ticket.ident]
        if not store or p.gen != ticket.gen or ticket.epoch != self._epoch or not self.usable():
            return None
        return self._store(ticket.ident, record)

    def _store(self, ident: tuple[str, str], record: Record | None) -> NearEntry:
        now = self.clock()
        self._drop(ident)
        if record is None:
            entry = NearEntry(None, 0, now)
            self._absent[ident] = entry
            self._absent.move_to_end(ident)
            while len(self._absent) > self.max_absent:
                self._absent.popitem(last=False)
                self.stats.evictions += 1
            return entry
        entry = NearEntry(record, _OVERHEAD + len(ident[0]) + len(ident[1]) + _COPIES * len(record.payload), now)
        self._records[ident] = entry
        self._bytes += entry.size
        while self._records and (len(self._records) > self.max_entries or self._bytes > self.max_bytes):
            _, old = self._records.popitem(last=False)
            self._bytes -= old.size
            self.stats.evictions += 1
        return entry

    def add_encoding(self, entry: NearEntry, transport: str, encoded: Any) -> None:
        """Keep ``entry``'s answer as ``transport`` sends it (its size was charged when it was stored)."""
        entry.wire[transport] = encoded

    # -- invalidation -------------------------------------------------------------------------

    def invalidate(self, idents: Iterable[tuple[str, str]]) -> None:
        """These keys changed: drop their entries, and results of reads of them still in flight."""
        for ident in idents:
            if self._drop(ident):
                self.stats.invalidations += 1
            p = self._pending.get(ident)
            if p is not None:
                p.gen += 1

    def clear(self) -> None:
        """Drop every entry; reads in flight store nothing."""
        if self._records or self._absent:
            self.stats.flushes += 1
        self._records.clear()
        self._absent.clear()
        self._bytes = 0
        self._epoch += 1

    def _drop(self, ident: tuple[str, str]) -> bool:
        old = self._records.pop(ident, None)
        if old is not None:
            self._bytes -= old.size
        return self._absent.pop(ident, None) is not None or old is not None

    # -- introspection ------------------------------------------------------------------------

    @property
    def entries(self) -> int:
        return len(self._records)

    @property
    def absences(self) -> int:
        return len(self._absent)

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def in_flight(self) -> int:
        """Keys with a read in flight (tests check that nothing leaks)."""
        return len(self._pending)
