"""MfhStore (LangGraph's BaseStore on the hub) against LangGraph's own InMemoryStore: the same cases, the
same answers. A real hub (api + worker processes, Redis, SQLite) serves MfhStore over gRPC."""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hosts import TestHost, make_host
from services import free_port, tcp_open, wait_until

langgraph_base = pytest.importorskip("langgraph.store.base", reason="langgraph-checkpoint is not installed")
from langgraph.store.base import BaseStore, GetOp, Item, ListNamespacesOp, MatchCondition, PutOp, SearchOp  # noqa: E402
from langgraph.store.memory import InMemoryStore  # noqa: E402

from mfh_client.langgraph_store import MfhStore, decode_key, encode_key  # noqa: E402

DIMS = 16


def fake_embed(texts: list[str]) -> list[list[float]]:
    """A deterministic embedding: words hashed into DIMS buckets (texts sharing words are close)."""
    out = []
    for text in texts:
        v = [0.0] * DIMS
        for word in text.lower().split():
            h = hashlib.sha256(word.encode()).digest()
            v[h[0] % DIMS] += 1.0 + h[1] / 255
        out.append(v if any(v) else [1.0] + [0.0] * (DIMS - 1))
    return out


@pytest.fixture(scope="module")
def hub_address(tmp_path_factory: pytest.TempPathFactory, _redis_dbs: tuple[int, int]) -> Iterator[str]:
    """One hub for the module (starting one takes seconds); :func:`hub` empties it before each test."""
    from conftest import _flushed_redis

    port = free_port()
    host: TestHost = make_host(
        tmp_path_factory.mktemp("hub"),
        redis_url=_flushed_redis(_redis_dbs[0]),
        overrides={
            "storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"},
            "write_behind": {"queue_name": f"t_{uuid.uuid4().hex[:8]}"},
            "server": {"grpc_port": port, "zmq_port": free_port()},
        },
    )
    host.start_worker(threads=2)
    api = host.spawn("mfh_api.cli", "api", "--metrics-port", "0", log_name="api")
    try:
        wait_until(lambda: tcp_open("127.0.0.1", port) or api.poll() is not None, timeout=60)
        assert api.poll() is None, host.log("api")
        yield f"127.0.0.1:{port}"
    finally:
        host.stop_all()


@pytest.fixture
def hub(hub_address: str) -> str:
    """The module's hub with no live item: what earlier tests left is deleted (PERSISTED) first."""
    with MfhStore(hub_address) as store:
        for ns in store.list_namespaces(limit=10_000):
            for item in store.search(ns, limit=1000):
                store.delete(ns, item.key)
        assert store.list_namespaces() == []
    return hub_address


def both(address: str, **kw: Any) -> tuple[InMemoryStore, MfhStore]:
    index = kw.pop("index", None)
    ref = InMemoryStore(index=index) if index else InMemoryStore()
    return ref, MfhStore(address, index=index, **kw)


def comparable(result: Any) -> Any:
    """What both stores must agree on: values, keys, namespaces, scores (rounded), not the clocks."""
    if isinstance(result, Item):
        score = getattr(result, "score", None)
        return (result.namespace, result.key, result.value, None if score is None else round(score, 4))
    if isinstance(result, list):
        return [comparable(r) for r in result]
    return result


def unordered(result: Any) -> Any:
    return sorted(comparable(result), key=repr)


SEED = [
    PutOp(("users", "alice", "memories"), "m1", {"text": "likes green tea", "n": 3, "lang": "en"}),
    PutOp(("users", "alice", "memories"), "m2", {"text": "walks the dog at dawn", "n": 7, "lang": "en"}),
    PutOp(("users", "alice", "prefs"), "p1", {"text": "tea over coffee", "n": 1, "nested": {"a": 1}}),
    PutOp(("users", "bob", "memories"), "m1", {"text": "plays chess", "n": 5, "lang": "fr", "tags": ["x", "y"]}),
    PutOp(("docs",), "weird key/ü with spaces", {"text": "a key the hub escapes", "n": 9}),
    PutOp(("docs", "v1"), "d1", {"text": "version one green", "n": 2.5}),
]


def seed(*stores: BaseStore) -> None:
    for s in stores:
        assert s.batch(SEED) == [None] * len(SEED)


def test_get_put_delete_and_batch_order_match_inmemorystore(hub: str) -> None:
    ref, mfh = both(hub)
    seed(ref, mfh)
    ops: list[Any] = [
        GetOp(("users", "alice", "memories"), "m1"),
        GetOp(("users", "alice", "memories"), "absent"),
        GetOp(("docs",), "weird key/ü with spaces"),
        # reads in a batch see the state before the batch's writes, the last put of a key wins
        PutOp(("users", "alice", "memories"), "m1", {"text": "changed"}),
        GetOp(("users", "alice", "memories"), "m1"),
        PutOp(("users", "alice", "memories"), "m1", {"text": "changed twice"}),
        PutOp(("users", "bob", "memories"), "m1", None),
    ]
    assert comparable(mfh.batch(ops)) == comparable(ref.batch(ops))
    after = [GetOp(("users", "alice", "memories"), "m1"), GetOp(("users", "bob", "memories"), "m1")]
    assert comparable(mfh.batch(after)) == comparable(ref.batch(after))
    assert mfh.get(("users", "alice", "memories"), "m1").value == {"text": "changed twice"}  # type: ignore[union-attr]
    # and the high-level helpers: delete of an absent key is no error in either
    for s in (ref, mfh):
        s.delete(("users", "nobody"), "k")
        s.put(("users", "carol"), "k", {"v": 1})
    assert comparable(mfh.get(("users", "carol"), "k")) == comparable(ref.get(("users", "carol"), "k"))


@pytest.mark.parametrize(
    "op",
    [
        SearchOp(("users",), limit=10),
        SearchOp(("users", "alice"), limit=10),
        SearchOp(("users",), filter={"lang": "en"}, limit=10),
        SearchOp(("users",), filter={"n": {"$gte": 3, "$lt": 7}}, limit=10),
        SearchOp(("users",), filter={"n": {"$ne": 3}}, limit=10),
        SearchOp(("users",), filter={"nested": {"a": 1}}, limit=10),  # checked by the store, not the hub
        SearchOp(("users",), filter={"tags": ["x", "y"]}, limit=10),
        SearchOp((), filter={"n": {"$gt": 2}}, limit=10),  # every namespace
        SearchOp(("nothing",), limit=10),
        SearchOp(("docs",), query="ignored without an index", limit=10),
    ],
    ids=lambda op: repr(op.filter or op.namespace_prefix),
)
def test_filtered_search_matches_inmemorystore(hub: str, op: SearchOp) -> None:
    ref, mfh = both(hub)
    seed(ref, mfh)
    assert unordered(mfh.batch([op])[0]) == unordered(ref.batch([op])[0])


def test_paged_search_covers_the_same_items(hub: str) -> None:
    ref, mfh = both(hub)
    seed(ref, mfh)
    pages = [mfh.search(("users",), limit=2, offset=o) for o in (0, 2, 4)]
    assert [len(p) for p in pages] == [2, 2, 0]
    assert unordered([it for p in pages for it in p]) == unordered(ref.search(("users",), limit=10))


def test_vector_search_ranks_like_inmemorystore(hub: str) -> None:
    index: Any = {"dims": DIMS, "embed": fake_embed, "fields": ["text"]}
    ref, mfh = both(hub, index=index)
    seed(ref, mfh)
    for query, prefix, flt in [
        ("green tea", ("users",), None),
        ("the dog", ("users", "alice"), None),
        ("green", (), None),
        ("tea", ("users",), {"lang": "en"}),
    ]:
        got = mfh.search(prefix, query=query, filter=flt, limit=3)
        want = ref.search(prefix, query=query, filter=flt, limit=3)
        assert [(i.namespace, i.key) for i in got] == [(i.namespace, i.key) for i in want], query
        assert all(math.isclose(a.score or 0, b.score or 0, abs_tol=1e-4) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize(
    "op",
    [
        ListNamespacesOp(),
        ListNamespacesOp(max_depth=1),
        ListNamespacesOp(max_depth=2),
        ListNamespacesOp(match_conditions=(MatchCondition("prefix", ("users",)),)),
        ListNamespacesOp(match_conditions=(MatchCondition("prefix", ("users", "*", "memories")),)),
        ListNamespacesOp(match_conditions=(MatchCondition("suffix", ("memories",)),)),
        ListNamespacesOp(match_conditions=(MatchCondition("suffix", ("v1",)), MatchCondition("prefix", ("docs",)))),
        ListNamespacesOp(limit=2, offset=1),
    ],
    ids=repr,
)
def test_list_namespaces_matches_inmemorystore(hub: str, op: ListNamespacesOp) -> None:
    ref, mfh = both(hub)
    seed(ref, mfh)
    assert mfh.batch([op]) == ref.batch([op])


async def test_the_async_path_gives_the_sync_answers(hub: str) -> None:
    ref, mfh = both(hub)
    await mfh.abatch(SEED)
    ref.batch(SEED)
    ops: list[Any] = [
        GetOp(("users", "alice", "memories"), "m2"),
        SearchOp(("users",), filter={"lang": "en"}, limit=10),
        ListNamespacesOp(max_depth=2),
        PutOp(("users", "alice", "memories"), "m2", None),
    ]
    got, want = await mfh.abatch(ops), ref.batch(ops)
    assert comparable(got[0]) == comparable(want[0])
    assert unordered(got[1]) == unordered(want[1])
    assert got[2:] == want[2:]
    assert await mfh.aget(("users", "alice", "memories"), "m2") is None
    await mfh.aclose()


def test_ttl_is_kept_in_minutes_and_an_expired_item_is_gone(hub: str) -> None:
    mfh = MfhStore(hub, ttl={"refresh_on_read": True})
    mfh.put(("sessions",), "s1", {"step": 1}, ttl=10)
    record = mfh.client.get("sessions", "s1")
    payload = record.payload_obj()
    assert payload["ttl_seconds"] == 600 and payload["expires_at_ms"] - record.updated_at in range(599_000, 601_000)
    # a TTL too short to outlive the test: gone for get, search and listing once expired
    mfh.put(("sessions",), "s2", {"step": 2}, ttl=1 / 60)
    # (a read that refreshes would keep it alive: LangGraph's refresh-on-read)
    wait_until(lambda: mfh.get(("sessions",), "s2", refresh_ttl=False) is None, timeout=10)
    assert [i.key for i in mfh.search(("sessions",))] == ["s1"]


@pytest.mark.parametrize("key", ["plain-key_1", "with space", "ünïcode", "@x:looks-escaped", "a" * 256, "%/_:"])
def test_keys_round_trip(key: str) -> None:
    assert decode_key(encode_key(key)) == key


def test_bad_input_is_refused_before_anything_is_written(hub: str) -> None:
    from langgraph.store.base import InvalidNamespaceError

    from mfh_models import InvalidArgument

    mfh = MfhStore(hub)
    with pytest.raises(InvalidNamespaceError):
        mfh.put(("a.b",), "k", {"v": 1})  # LangGraph's own check: no '.' in a label
    with pytest.raises(InvalidNamespaceError):
        mfh.put(("x" * 80,), "k", {"v": 1})  # too long for an MFH name
    with pytest.raises(InvalidArgument):
        mfh.put(("ok",), "k", {"v": 1}, ttl=-5)
    with pytest.raises(InvalidArgument):
        mfh.search(("ok",), filter={"n": {"$regex": "x"}})
    assert mfh.list_namespaces() == []
