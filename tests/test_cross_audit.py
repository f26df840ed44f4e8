"""The cross-host audit's drill-down (mfh_tasks.cross_audit), hosts in memory answering directly.

Each host is a set of rows and an event log; ``ask`` calls :func:`answer` on each, as the
replicators do over NATS, and counts what travels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from factories import event

from mfh_models import ChecksumRow, InvalidArgument, MemoryEvent, Op
from mfh_tasks.cross_audit import Difference, HostRow, NamespaceIndex, answer, compare, key_range, row_digest, winner


class MemoryHost:
    """A host's items (the newest event per key) and its event log, as a RowSource."""

    def __init__(self, events: Iterable[MemoryEvent] = ()) -> None:
        self.rows: dict[tuple[str, str], ChecksumRow] = {}
        self.log: dict[str, MemoryEvent] = {}
        self.scans = 0  # namespaces read in full
        for e in events:
            self.apply(e)

    def apply(self, e: MemoryEvent) -> None:
        self.log[e.event_id] = e
        cur = self.rows.get((e.namespace, e.key))
        if cur is None or (e.version, e.origin) > (cur.version, cur.origin):
            self.rows[(e.namespace, e.key)] = ChecksumRow(e.namespace, e.key, e.version, e.origin, e.deleted, e.payload)

    def namespaces(self) -> list[str]:
        return sorted({ns for ns, _ in self.rows})

    def iter_items(self, batch: int = 5000, *, namespace: str | None = None) -> Iterable[ChecksumRow]:
        self.scans += 1
        return [r for (ns, _), r in self.rows.items() if namespace is None or ns == namespace]

    def items_of(self, namespace: str, keys: Sequence[str]) -> list[ChecksumRow]:
        return [self.rows[(namespace, k)] for k in keys if (namespace, k) in self.rows]

    def events_by_id(self, event_ids: Sequence[str]) -> dict[str, MemoryEvent]:
        return {i: self.log[i] for i in event_ids if i in self.log}


class Cluster:
    """Hosts answering ``ask``; ``down`` ones stay silent; counts requests and listed rows."""

    def __init__(self, hosts: dict[str, MemoryHost]) -> None:
        self.hosts = hosts
        self.down: set[str] = set()
        self.failing: dict[str, str] = {}  # host -> op it answers with an error
        self.requests: list[str] = []
        self.rows_listed = 0
        self.caches: dict[str, dict[str, NamespaceIndex]] = {h: {} for h in hosts}

    async def ask(self, request: dict[str, Any], hosts: Sequence[str]) -> dict[str, dict[str, Any]]:
        self.requests.append(str(request["op"]))
        out = {}
        for h in hosts:
            if h in self.down or h not in self.hosts:
                continue
            if self.failing.get(h) == request["op"]:
                out[h] = {"host": h, "error": "UNAVAILABLE: sqlite unavailable"}
                continue
            reply = answer(self.hosts[h], request, self.caches[h])
            self.rows_listed += sum(len(rows) for rows in reply.get("rows", []))
            out[h] = {**reply, "host": h}
        return out


def writes(n: int, namespaces: Sequence[str] = ("a", "b", "c"), origin: str = "main_pc") -> list[MemoryEvent]:
    return [event(f"k{i}", i + 1, namespace=namespaces[i % len(namespaces)], origin=origin) for i in range(n)]


def altered(r: ChecksumRow, **changes: Any) -> ChecksumRow:
    return r._replace(**changes)


async def test_equal_hosts_take_one_round() -> None:
    # Given two hosts with the same 10,000 rows in three namespaces
    events = writes(10_000)
    cluster = Cluster({"main_pc": MemoryHost(events), "pc2": MemoryHost(events)})
    # When they are compared
    out = await compare(cluster.ask, ["main_pc", "pc2"], settle_s=0)
    # Then they are equal after the summary alone
    assert out.equal and out.differences == [] and out.unreachable == {}
    assert out.rounds == 1 and cluster.requests == ["summary"]
    assert out.namespaces == 3 and out.rows == {"main_pc": 10_000, "pc2": 10_000}


async def test_the_drill_down_names_exactly_the_keys_that_differ() -> None:
    # Given two converged hosts with 10,000 rows
    events = writes(10_000)
    a, b = MemoryHost(events), MemoryHost(events)
    # and on pc2 one row's payload changed behind the hub's back (same version), one row gone on main_pc,
    # one row on pc2 still at an older version, and one tombstone on pc2 only
    r = b.rows[("b", "k1")]
    b.rows[("b", "k1")] = altered(r, payload='{"content":"edited by hand"}')
    del a.rows[("c", "k2")]
    newer = event("k3", 20_000, namespace="a")
    a.apply(newer)
    b.apply(event("k4", 20_001, namespace="b", op=Op.DELETE))
    a.apply(event("k4", 20_001, namespace="b", op=Op.DELETE))
    del a.rows[("b", "k4")]
    cluster = Cluster({"main_pc": a, "pc2": b})
    # When they are compared
    out = await compare(cluster.ask, ["main_pc", "pc2"], settle_s=0)
    # Then exactly those keys are named, each with both hosts' rows
    assert [(d.namespace, d.key) for d in out.differences] == [("a", "k3"), ("b", "k1"), ("b", "k4"), ("c", "k2")]
    assert not out.truncated and not out.equal
    by_key = {d.key: d for d in out.differences}
    assert by_key["k2"].rows["main_pc"] is None and by_key["k2"].rows["pc2"] is not None
    edited_a, edited_b = by_key["k1"].rows["main_pc"], by_key["k1"].rows["pc2"]
    assert edited_a is not None and edited_b is not None
    assert (edited_a.version, edited_a.origin) == (edited_b.version, edited_b.origin)
    assert edited_a.logged is True and edited_b.logged is False  # pc2's row is not what its log says
    tomb = by_key["k4"].rows["pc2"]
    assert tomb is not None and tomb.deleted
    # and it got there in a few rounds, listing a small part of the rows, reading each namespace once
    assert out.rounds <= 5, cluster.requests
    assert a.scans == b.scans == 3
    assert cluster.rows_listed < 10_000 // 10, cluster.rows_listed
    # and the winners follow the hub's rule
    assert winner(by_key["k1"]) == ("main_pc", edited_a)  # the copy its log confirms
    assert winner(by_key["k2"]) == ("pc2", by_key["k2"].rows["pc2"])  # the only one
    assert winner(by_key["k3"]) is not None and winner(by_key["k3"])[1].version == newer.version  # type: ignore[index]
    assert winner(by_key["k4"]) == ("pc2", tomb)  # a tombstone is a row


async def test_a_whole_missing_namespace_is_truncated_at_max_keys() -> None:
    # Given pc2 without namespace "c" (3,334 rows)
    events = writes(10_000)
    cluster = Cluster({"main_pc": MemoryHost(events), "pc2": MemoryHost(e for e in events if e.namespace != "c")})
    # When compared with at most 100 keys listed
    out = await compare(cluster.ask, ["main_pc", "pc2"], max_keys=100, settle_s=0)
    # Then 100 keys of "c" are named and the outcome says there are more
    assert len(out.differences) == 100 and out.truncated and not out.equal
    assert {d.namespace for d in out.differences} == {"c"}
    assert all(d.rows["pc2"] is None for d in out.differences)


async def test_three_hosts_and_a_silent_one() -> None:
    # Given three hosts, one row missing on pc3, and pc4 that does not answer
    events = writes(2_000)
    hosts = {h: MemoryHost(events) for h in ("main_pc", "pc2", "pc3")}
    del hosts["pc3"].rows[("a", "k9")]
    cluster = Cluster(hosts)
    # When the four are compared
    out = await compare(cluster.ask, ["main_pc", "pc2", "pc3", "pc4"], settle_s=0)
    # Then pc4 is unreachable, and the missing row is named with the three answering hosts' rows
    assert out.unreachable == {"pc4": "no answer"}
    assert out.hosts == ["main_pc", "pc2", "pc3"]
    assert [(d.key, sorted(h for h, r in d.rows.items() if r is None)) for d in out.differences] == [("k9", ["pc3"])]


async def test_a_host_that_fails_mid_audit_leaves_the_comparison() -> None:
    # Given two hosts that differ, and pc2 failing its row listing
    events = writes(500)
    b = MemoryHost(events)
    del b.rows[("a", "k0")]
    cluster = Cluster({"main_pc": MemoryHost(events), "pc2": b})
    cluster.failing["pc2"] = "rows"
    # When compared
    out = await compare(cluster.ask, ["main_pc", "pc2"], settle_s=0)
    # Then pc2 is reported with its error, and nothing is claimed about keys
    assert out.unreachable == {"pc2": "UNAVAILABLE: sqlite unavailable"}
    assert out.differences == [] and out.hosts == ["main_pc"]


def test_range_digests_add_up_and_bad_requests_are_refused() -> None:
    # Given one host's rows
    host = MemoryHost(writes(3_000, namespaces=("a",)))
    whole = answer(host, {"op": "summary"})["namespaces"]["a"]
    # When its namespace is split one and two hex digits deep
    one = answer(host, {"op": "ranges", "items": [["a", 1, [""]]]})["ranges"][0]
    two = answer(host, {"op": "ranges", "items": [["a", 2, sorted(one)]]})["ranges"][0]
    # Then the sub-ranges' counts and digests add up to the namespace's
    for level in (one, two):
        assert sum(c for c, _ in level.values()) == whole[0] == 3_000
        assert sum(int(d, 16) for _, d in level.values()) % (1 << 256) == int(whole[1], 16)
    # and a key falls in the range of its hash, its row digest as listed
    r = host.rows[("a", "k7")]
    listed = answer(host, {"op": "rows", "items": [["a", [key_range("k7")[:2]]]]})["rows"][0]
    assert ["k7", r.version, r.origin, r.deleted, row_digest(r)] in listed
    assert len(listed) <= 3_000 / 256 * 3
    # and malformed requests change nothing and say why
    for bad in (
        {"op": "ranges", "items": [["a", 1, ["zz"]]]},
        {"op": "ranges", "items": [["a", 1, ["a", "bc"]]]},
        {"op": "ranges", "items": [["a", 1, ["ab"]]]},  # not deeper than its prefixes
        {"op": "drop"},
        {"op": "rows", "items": "a"},
    ):
        with pytest.raises(InvalidArgument):
            answer(host, bad)


def test_winner_leaves_an_unsettled_conflict_to_the_operator() -> None:
    # Given two rows with the same (version, origin) and different content, both confirmed by their logs
    one = HostRow(5, "main_pc", False, "aa", True)
    other = HostRow(5, "main_pc", False, "bb", True)
    # Then no winner is picked; with one contradicted by its log, the other wins; a newer version always wins
    assert winner(Difference("ns", "k", {"main_pc": one, "pc2": other})) is None
    contradicted = dataclasses.replace(other, logged=False)
    assert winner(Difference("ns", "k", {"main_pc": one, "pc2": contradicted})) == ("main_pc", one)
    newer = HostRow(6, "main_pc", False, "cc", None)
    assert winner(Difference("ns", "k", {"main_pc": one, "pc2": newer, "pc3": None})) == ("pc2", newer)
