"""The cross-host audit's comparison: range digests of each host's items, a drill-down, the keys that differ.

Every host answers the same few questions about its SQL items table (:func:`answer`); the
coordinator (:func:`compare`) asks them round by round and narrows down to keys:

1. ``summary``: per namespace, the row count and a digest;
2. ``ranges``: for namespaces (and then key ranges) whose digests differ, the digests of their
   sub-ranges. A key's range is the hex prefix of ``sha256(key)``, so every host splits a namespace
   the same way whatever keys it holds; a round goes one or two hex digits deeper (16 or 256
   sub-ranges), as deep as the row count calls for;
3. ``rows``: a range with at most :data:`LEAF_ROWS` rows on every host is listed key by key
   (version, origin, deleted, row digest);
4. ``keys``: the rows of the keys found, read again (after a settling pause, so an event still in
   flight is not reported) with whether each row matches this host's own event log.

A row's digest is sha256 of its checksum line (mfh_models.canonical.checksum_line: namespace, key,
version, origin, deleted, payload hash); a range's digest is the sum of its rows' digests modulo
2**256, so a range's digest is the sum of its sub-ranges' and any order of rows gives the same.

The transport is a function ``ask(request, hosts) -> {host: reply}`` (mfh_tasks.peer_audit runs it
over core NATS; the unit tests call :func:`answer` directly).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mfh_models import ChecksumRow, InvalidArgument, MemoryEvent, checksum_line, event_id_for

__all__ = [
    "LEAF_ROWS",
    "Ask",
    "Difference",
    "HostRow",
    "NamespaceIndex",
    "Outcome",
    "RowSource",
    "answer",
    "compare",
    "key_range",
    "row_digest",
    "winner",
]

#: A range with at most this many rows on every host is listed key by key.
LEAF_ROWS = 64
#: Sub-ranges one ``ranges`` request may ask for (a reply of ~90 bytes each stays far below NATS's 1 MiB).
MAX_CHILDREN_PER_REQUEST = 4096
#: Rows one ``rows`` request may list; keys one ``keys`` request may name.
MAX_ROWS_PER_REQUEST = 2000
#: Hex digits of sha256: a range this deep holds one key.
_FULL_DEPTH = 64
_MOD = 1 << 256


def key_range(key: str) -> str:
    """The hex sha256 of a key: its ranges are the prefixes of this."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def row_digest(row: ChecksumRow) -> str:
    """sha256 of the row's checksum line (hex)."""
    return hashlib.sha256(checksum_line(row).encode("utf-8")).hexdigest()


class RowSource(Protocol):
    """One consistent view of a host's items and events (mfh_core.sqlstore.Snapshot is one)."""

    def namespaces(self) -> list[str]: ...

    def iter_items(self, batch: int = 5000, *, namespace: str | None = None) -> Iterable[ChecksumRow]: ...

    def items_of(self, namespace: str, keys: Sequence[str]) -> list[ChecksumRow]: ...

    def events_by_id(self, event_ids: Sequence[str]) -> dict[str, MemoryEvent]: ...


# -- the answering side ------------------------------------------------------------------------------


class NamespaceIndex:
    """One namespace's rows of one read view, sorted by key range: (range hash, digest, key, version,
    origin, deleted). Payloads are hashed once, when it is built; every later question is a bisect."""

    __slots__ = ("_entries", "_hashes")

    def __init__(self, rows: Iterable[ChecksumRow]) -> None:
        entries = sorted(
            (key_range(r.key), int(row_digest(r), 16), r.key, r.version, r.origin, r.deleted) for r in rows
        )
        self._entries = entries
        self._hashes = [e[0] for e in entries]

    def __len__(self) -> int:
        return len(self._entries)

    def under(self, prefix: str) -> list[tuple[str, int, str, int, str, bool]]:
        """The entries whose range hash starts with ``prefix`` ("" for all)."""
        lo = bisect.bisect_left(self._hashes, prefix)
        hi = bisect.bisect_left(self._hashes, prefix + "g") if prefix else len(self._hashes)  # "g" > any hex digit
        return self._entries[lo:hi]

    def sums(self, prefixes: Sequence[str], depth: int) -> dict[str, list[Any]]:
        """[count, hex digest] of each sub-range at ``depth`` hex digits under ``prefixes``."""
        acc: dict[str, list[int]] = {}
        for prefix in prefixes:
            for h, digest, *_ in self.under(prefix):
                a = acc.setdefault(h[:depth], [0, 0])
                a[0] += 1
                a[1] += digest
        return {k: [c, f"{t % _MOD:064x}"] for k, (c, t) in acc.items()}

    def rows(self, prefixes: Sequence[str]) -> list[list[Any]]:
        """[key, version, origin, deleted, digest] of the rows under ``prefixes``, by key."""
        out = [[k, v, o, d, f"{digest:064x}"] for p in prefixes for _, digest, k, v, o, d in self.under(p)]
        return sorted(out, key=lambda r: str(r[0]))


#: Namespace indexes one host keeps between the rounds of one audit, at most this many rows in all
#: (about 250 bytes a row); beyond it each round reads its namespaces again.
CACHE_MAX_ROWS = 500_000


def _row_doc(r: ChecksumRow) -> list[Any]:
    return [r.key, r.version, r.origin, r.deleted, row_digest(r)]


def _logged(r: ChecksumRow, events: dict[str, MemoryEvent]) -> bool | None:
    """Whether the row is what this host's own log says its (version, origin) was; None: not in the log."""
    e = events.get(event_id_for(r.origin, r.version))
    if e is None:
        return None
    return e.namespace == r.namespace and e.key == r.key and e.deleted == r.deleted and e.payload == r.payload


def _check_prefixes(prefixes: Any, depth: int | None = None) -> list[str]:
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        raise InvalidArgument("prefixes must be a list of strings")
    widths = {len(p) for p in prefixes}
    if len(widths) > 1 or any(p.strip("0123456789abcdef") for p in prefixes):
        raise InvalidArgument("prefixes must be hex strings of one length")
    if depth is not None and not (widths or {0}).pop() < depth <= _FULL_DEPTH:
        raise InvalidArgument("depth must be deeper than the prefixes and at most 64")
    return list(prefixes)


def answer(
    source: RowSource, request: dict[str, Any], cache: dict[str, NamespaceIndex] | None = None
) -> dict[str, Any]:
    """This host's reply to one audit request (without its ``host``); InvalidArgument for a bad one.

    ``cache``: the namespace indexes of this audit so far (the summary fills it, later rounds read it),
    so every round of one audit sees one view of this host; the ``keys`` round always reads afresh.
    """
    op = request.get("op")
    items = request.get("items", [])
    if not isinstance(items, list):
        raise InvalidArgument("items must be a list")

    def index(ns: str) -> NamespaceIndex:
        idx = cache.get(ns) if cache is not None else None
        if idx is None:
            idx = NamespaceIndex(source.iter_items(namespace=ns))
            if cache is not None and sum(map(len, cache.values())) + len(idx) <= CACHE_MAX_ROWS:
                cache[ns] = idx
        return idx

    if op == "summary":
        if cache is not None:
            cache.clear()
        return {"namespaces": {ns: index(ns).sums([""], 0).get("", [0, f"{0:064x}"]) for ns in source.namespaces()}}
    if op == "ranges":
        out = []
        for ns, depth, prefixes in items:
            out.append(index(str(ns)).sums(_check_prefixes(prefixes, int(depth)), int(depth)))
        return {"ranges": out}
    if op == "rows":
        return {"rows": [index(str(ns)).rows(_check_prefixes(prefixes)) for ns, prefixes in items]}
    if op == "keys":
        found: list[list[list[Any]]] = []
        for ns, keys in items:
            rows = source.items_of(str(ns), [str(k) for k in keys])
            events = source.events_by_id([event_id_for(r.origin, r.version) for r in rows])
            found.append([[*_row_doc(r), _logged(r, events)] for r in sorted(rows, key=lambda r: r.key)])
        return {"keys": found}
    raise InvalidArgument(f"unknown audit request {str(op)[:20]!r}")


# -- the comparing side ------------------------------------------------------------------------------

#: ``ask(request, hosts)``: send one request to these hosts, return the replies of those that answered.
Ask = Callable[[dict[str, Any], Sequence[str]], Awaitable[dict[str, dict[str, Any]]]]


@dataclass(frozen=True, slots=True)
class HostRow:
    """One host's row of a key that differs: what a repair chooses from."""

    version: int
    origin: str
    deleted: bool
    digest: str
    logged: bool | None  # the row equals this host's logged event of its (version, origin); None: no such event

    def as_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "origin": self.origin,
            "deleted": self.deleted,
            "digest": self.digest,
            "logged": self.logged,
        }


@dataclass(frozen=True, slots=True)
class Difference:
    namespace: str
    key: str
    rows: dict[str, HostRow | None]  # host -> its row, None where the host has none

    def as_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "key": self.key,
            "hosts": {h: (r.as_dict() if r else None) for h, r in sorted(self.rows.items())},
        }


@dataclass
class Outcome:
    """What one comparison found."""

    hosts: list[str]  # the hosts compared (that answered every round)
    unreachable: dict[str, str]  # host -> why it is not compared
    namespaces: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # host -> its row count
    differences: list[Difference] = field(default_factory=list)
    truncated: bool = False  # more keys differ than were listed
    rounds: int = 0
    seconds: float = 0.0

    @property
    def equal(self) -> bool:
        return not self.differences and not self.truncated


Sums = dict[str, tuple[int, str]]  # range -> (count, digest)


def _differ(per_host: dict[str, Sums], hosts: Sequence[str], rng: str) -> bool:
    return len({per_host[h].get(rng, (0, "")) for h in hosts}) > 1


def _most(per_host: dict[str, Sums], hosts: Sequence[str], rng: str) -> int:
    return max(per_host[h].get(rng, (0, ""))[0] for h in hosts)


def _chunks(items: list[Any], weight: Callable[[Any], int], limit: int) -> list[list[Any]]:
    out: list[list[Any]] = []
    cur: list[Any] = []
    total = 0
    for it in items:
        w = max(weight(it), 1)
        if cur and total + w > limit:
            out.append(cur)
            cur, total = [], 0
        cur.append(it)
        total += w
    if cur:
        out.append(cur)
    return out


class _Rounds:
    """Asks the hosts still compared; a host that misses a round leaves the comparison (unreachable)."""

    def __init__(self, ask: Ask, hosts: list[str], unreachable: dict[str, str]) -> None:
        self.ask = ask
        self.hosts = hosts
        self.unreachable = unreachable

    async def all(self, requests: list[dict[str, Any]]) -> list[dict[str, dict[str, Any]]]:
        replies = await asyncio.gather(*(self.ask(r, list(self.hosts)) for r in requests))
        for got in replies:
            for h in list(self.hosts):
                reply = got.get(h)
                why = "no answer" if reply is None else reply.get("error")
                if why is not None:
                    self.unreachable[h] = str(why)
                    self.hosts.remove(h)
        return replies


async def compare(
    ask: Ask,
    hosts: Sequence[str],
    *,
    max_keys: int = 1000,
    settle_s: float = 0.5,
    max_rounds: int = 16,
) -> Outcome:
    """Compare the hosts' items; the keys that differ, each with every host's row.

    ``hosts``: the hosts to compare (those that answer the summary; the others are unreachable).
    ``max_keys``: list at most this many keys (``truncated`` says when more differ).
    """
    t0 = time.perf_counter()
    unreachable: dict[str, str] = {}
    rounds = _Rounds(ask, sorted(hosts), unreachable)
    (summary,) = await rounds.all([{"op": "summary"}])
    out = Outcome(hosts=rounds.hosts, unreachable=unreachable, rounds=1)
    per_ns: dict[str, Sums] = {
        h: {ns: (int(c), str(d)) for ns, (c, d) in summary[h]["namespaces"].items()} for h in rounds.hosts
    }
    out.rows = {h: sum(c for c, _ in per_ns[h].values()) for h in rounds.hosts}
    names = sorted({ns for h in rounds.hosts for ns in per_ns[h]})
    out.namespaces = len(names)
    if len(rounds.hosts) < 2:
        out.seconds = time.perf_counter() - t0
        return out
    # the frontier: (namespace, range, most rows any host holds in it), ranges of one namespace at one depth
    frontier = [
        (ns, "", max(per_ns[h].get(ns, (0, ""))[0] for h in rounds.hosts))
        for ns in names
        if _differ(per_ns, rounds.hosts, ns)
    ]
    candidates: dict[str, set[str]] = {}
    found = 0
    while frontier and out.rounds < max_rounds and found <= max_keys and len(rounds.hosts) >= 2:
        leaves = [f for f in frontier if f[2] <= LEAF_ROWS or len(f[1]) >= _FULL_DEPTH]
        inner = [f for f in frontier if f not in leaves]
        requests: list[dict[str, Any]] = []
        # rows: group the leaf ranges by namespace, chunked by the rows they list
        leaf_groups = _group(leaves)
        row_chunks = _chunks(leaf_groups, lambda g: g[2], MAX_ROWS_PER_REQUEST)
        for chunk in row_chunks:
            requests.append({"op": "rows", "items": [[ns, prefixes] for ns, prefixes, _ in chunk]})
        # ranges: deeper by one or two hex digits, as the row count calls for
        inner_items = []
        for ns, rng, most in inner:
            step = max(1, min(2, math.ceil(math.log(most / LEAF_ROWS, 16))))
            inner_items.append((ns, rng, min(len(rng) + step, _FULL_DEPTH)))
        range_groups: dict[tuple[str, int, int], list[str]] = {}
        for ns, rng, depth in inner_items:
            range_groups.setdefault((ns, len(rng), depth), []).append(rng)
        range_reqs: list[tuple[str, int, list[str]]] = []
        for (ns, width, depth), rngs in range_groups.items():
            per = max(1, MAX_CHILDREN_PER_REQUEST // 16 ** (depth - width))
            range_reqs.extend((ns, depth, rngs[i : i + per]) for i in range(0, len(rngs), per))
        range_chunks = _chunks(range_reqs, lambda r: len(r[2]) * 16 ** (r[1] - len(r[2][0])), MAX_CHILDREN_PER_REQUEST)
        for chunk in range_chunks:
            requests.append({"op": "ranges", "items": [[ns, depth, rngs] for ns, depth, rngs in chunk]})
        replies = await rounds.all(requests)
        out.rounds += 1
        if len(rounds.hosts) < 2:
            break
        frontier = []
        for chunk, got in zip(row_chunks, replies[: len(row_chunks)], strict=True):
            for i, (ns, _, _) in enumerate(chunk):
                listed = {h: {str(r[0]): tuple(r[1:]) for r in got[h]["rows"][i]} for h in rounds.hosts}
                for key in sorted(set().union(*listed.values())):
                    if len({listed[h].get(key) for h in rounds.hosts}) > 1:
                        candidates.setdefault(ns, set()).add(key)
                        found += 1
        for chunk, got in zip(range_chunks, replies[len(row_chunks) :], strict=True):
            for i, (ns, _, _) in enumerate(chunk):
                subs: dict[str, Sums] = {
                    h: {k: (int(c), str(d)) for k, (c, d) in got[h]["ranges"][i].items()} for h in rounds.hosts
                }
                for rng in sorted(set().union(*subs.values())):
                    if _differ(subs, rounds.hosts, rng):
                        frontier.append((ns, rng, _most(subs, rounds.hosts, rng)))
    out.truncated = bool(frontier) or found > max_keys
    keys = sorted((ns, k) for ns, ks in candidates.items() for k in ks)[:max_keys]
    if keys and len(rounds.hosts) >= 2:
        if settle_s > 0:
            await asyncio.sleep(settle_s)  # an event still on its way is not a difference
        out.differences = await _confirm(rounds, keys)
        out.rounds += 1
    out.seconds = time.perf_counter() - t0
    return out


def _group(leaves: list[tuple[str, str, int]]) -> list[tuple[str, list[str], int]]:
    """Leaf ranges of one namespace (and one depth) together: (namespace, ranges, rows)."""
    groups: dict[tuple[str, int], tuple[list[str], list[int]]] = {}
    for ns, rng, most in leaves:
        rngs, total = groups.setdefault((ns, len(rng)), ([], [0]))
        rngs.append(rng)
        total[0] += most
    out: list[tuple[str, list[str], int]] = []
    for (ns, _), (rngs, total) in groups.items():
        # split a group whose rows exceed one request
        cur: list[str] = []
        n = 0
        per = max(total[0] // max(len(rngs), 1), 1)
        for rng in rngs:
            if cur and n + per > MAX_ROWS_PER_REQUEST:
                out.append((ns, cur, n))
                cur, n = [], 0
            cur.append(rng)
            n += per
        if cur:
            out.append((ns, cur, n))
    return out


async def _confirm(rounds: _Rounds, keys: list[tuple[str, str]]) -> list[Difference]:
    """Read the candidate keys again on every host; those still differing, with each host's row."""
    by_ns: dict[str, list[str]] = {}
    for ns, k in keys:
        by_ns.setdefault(ns, []).append(k)
    items = [
        (ns, ks[i : i + MAX_ROWS_PER_REQUEST])
        for ns, ks in by_ns.items()
        for i in range(0, len(ks), MAX_ROWS_PER_REQUEST)
    ]
    chunks = _chunks(items, lambda it: len(it[1]), MAX_ROWS_PER_REQUEST)
    replies = await rounds.all([{"op": "keys", "items": [[ns, ks] for ns, ks in chunk]} for chunk in chunks])
    out: list[Difference] = []
    if len(rounds.hosts) < 2:
        return out
    for chunk, got in zip(chunks, replies, strict=True):
        for i, (ns, ks) in enumerate(chunk):
            rows = {
                h: {str(r[0]): HostRow(int(r[1]), str(r[2]), bool(r[3]), str(r[4]), r[5]) for r in got[h]["keys"][i]}
                for h in rounds.hosts
            }
            for k in ks:
                seen = {h: rows[h].get(k) for h in rounds.hosts}
                if len({(r.version, r.origin, r.deleted, r.digest) if r else None for r in seen.values()}) > 1:
                    out.append(Difference(ns, k, seen))
    return out


def winner(diff: Difference) -> tuple[str, HostRow] | None:
    """The host whose row every host should hold, by the hub's rule: the larger (version, origin) wins.

    Rows that share the largest (version, origin) but differ in content cannot both be right: the
    one its host's event log confirms wins; None when the log does not settle it (both or neither
    confirmed with different content), which leaves the key to the operator.
    """
    present = {h: r for h, r in diff.rows.items() if r is not None}
    if not present:
        return None
    top = max((r.version, r.origin) for r in present.values())
    tops = {h: r for h, r in sorted(present.items()) if (r.version, r.origin) == top}
    for pick in (
        tops,
        {h: r for h, r in tops.items() if r.logged},
        {h: r for h, r in tops.items() if r.logged is not False},
    ):
        if pick and len({r.digest for r in pick.values()}) == 1:
            return next(iter(pick.items()))
    return None
