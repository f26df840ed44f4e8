"""Search and ListNamespaces: the SQL index on SQLite and Postgres, the service, and both doors with the clients."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hosts import TestHost, make_host
from hypothesis import given
from hypothesis import strategies as st

from mfh_api.grpc_server import GrpcServer
from mfh_api.proto import pb, pb_grpc
from mfh_api.search import MetadataCondition as C
from mfh_api.search import SearchSpec
from mfh_api.service import Durability, MemoryService, PutSpec, build_service
from mfh_api.zmq_server import ZmqServer
from mfh_client import AsyncMemoryClient, AsyncZmqClient, MetadataFilter
from mfh_core import SqlStore
from mfh_core.searchindex import MetaFilter, SearchQuery
from mfh_core.vectors import VectorCache
from mfh_models import InvalidArgument, Kind, MemoryEvent, Op, canonical_json
from mfh_models.namespaces import decode_namespace, encode_namespace, is_under

NOW = 1_800_000_000_000


def doc(key: str, v: int, payload: dict[str, Any] | None, ns: str = "ns") -> MemoryEvent:
    return MemoryEvent(
        event_id=f"main_pc-{v}",
        op=Op.PUT if payload is not None else Op.DELETE,
        namespace=ns,
        key=key,
        kind=Kind.MEMORY_ITEM,
        payload=canonical_json(payload) if payload is not None else "null",
        version=v,
        origin="main_pc",
        created_at=v,
    )


@pytest.fixture
def store(db_url: str) -> Any:
    s = SqlStore(db_url)
    s.create_schema()
    yield s
    s.close()


# -- the index, on both databases ------------------------------------------------------------------


def test_the_index_filters_ranks_and_follows_the_items_version_rules(store: SqlStore) -> None:
    # Given memories with text, tags and metadata, one in a child namespace, one expired
    store.apply_batch(
        [
            doc("a", 10, {"content": "the quick brown fox", "tags": ["animal", "fast"], "metadata": {"n": 3}}),
            doc("b", 11, {"content": "quick quick quick fox", "metadata": {"n": 7, "lang": "en"}}),
            doc("c", 12, {"content": "lazy dog", "metadata": {"n": "7"}}),
            doc("d", 13, {"content": "quick fox below"}, ns="ns.child"),
            doc("e", 14, {"content": "quick fox expired", "expires_at_ms": NOW}),
        ]
    )

    def keys(**kw: Any) -> list[str]:
        return [k for _, k, _ in store.search_keys(SearchQuery("ns", kw.pop("prefix", False), NOW, **kw))]

    # Then full text is ranked (more matches first), expired docs are left out, scope is segment-wise
    assert keys(terms=("quick", "fox")) == ["b", "a"]
    assert set(keys(terms=("fox",), prefix=True)) == {"a", "b", "d"}
    # And filters: tags (all of them), metadata equality, ranges of the value's own type, `in`, kind, time
    assert keys(tags=("animal", "fast")) == ["a"]
    assert keys(tags=("animal", "slow")) == []
    assert keys(meta=(MetaFilter("n", "gte", 5),)) == ["b"]  # "7" (a string) is not a number
    assert keys(meta=(MetaFilter("n", "lt", "9"),)) == ["c"]
    assert sorted(keys(meta=(MetaFilter("n", "in", (3, "7")),))) == ["a", "c"]
    assert keys(meta=(MetaFilter("lang", "eq", "en"),), terms=("fox",)) == ["b"]
    assert keys(meta=(MetaFilter("lang", "ne", "de"),)) == ["b"]
    assert keys(updated_after_ms=11, updated_before_ms=13) == ["c", "b"]  # newest first without text
    assert keys(kinds=("session_data",)) == []
    # When an older event arrives late, or a delete wins, the index follows the items table
    store.apply_batch([doc("a", 9, {"content": "stale words"})])
    assert keys(terms=("stale",)) == []
    store.apply_batch([doc("b", 20, None)])
    assert keys(terms=("quick",)) == ["a"]
    assert store.live_namespaces("", NOW) == ["ns", "ns.child"]
    assert store.expired(NOW, limit=10) == [("ns", "e", 14)]


def test_full_text_follows_new_updated_stale_and_deleted_docs_across_batches(store: SqlStore) -> None:
    # Given batches mixing new keys (in two namespaces), newer and older versions of earlier keys, and deletes
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    latest: dict[tuple[str, str], tuple[int, str | None]] = {}
    v = 100
    for _ in range(6):
        batch = []
        for _ in range(40):
            ns, key = rng.choice(["ns", "ns.x"]), f"k{rng.randrange(60)}"
            v += 2  # even versions, and odd ones now and then older than what is stored (ids stay unique)
            ver = v - 31 if rng.random() < 0.2 else v
            text = None if rng.random() < 0.15 else " ".join(rng.choices(words, k=3))
            if any(e.namespace == ns and e.key == key for e in batch):
                continue
            batch.append(doc(key, ver, {"content": text} if text else None, ns=ns))
            if ver > latest.get((ns, key), (0, None))[0]:
                latest[(ns, key)] = (ver, text)
        store.apply_batch(batch)
    # Then every word finds exactly the live docs whose newest version holds it
    for w in words:
        got = {(n, k) for n, k, _ in store.search_keys(SearchQuery("ns", True, NOW, terms=(w,), limit=None))}
        assert got == {nk for nk, (_, t) in latest.items() if t is not None and w in t.split()}, w
    # And on SQLite the FTS5 index matches its content table row for row
    if store.dialect == "sqlite":
        with store._write.begin() as conn:
            conn.exec_driver_sql("INSERT INTO search_fts(search_fts, rank) VALUES ('integrity-check', 1)")


def test_vector_top_k_is_exact_and_follows_changes(store: SqlStore) -> None:
    rng = random.Random(7)
    vecs = {f"k{i}": [rng.uniform(-1, 1) for _ in range(16)] for i in range(300)}
    store.apply_batch(
        [doc(k, 100 + i, {"content": f"item {i % 3}", "embedding": v}) for i, (k, v) in enumerate(vecs.items())]
    )
    cache = VectorCache()
    q = [rng.uniform(-1, 1) for _ in range(16)]

    def brute(allowed: set[str]) -> list[str]:
        m = np.array([vecs[k] for k in sorted(allowed)], dtype=np.float64)
        s = m @ np.array(q) / np.linalg.norm(m, axis=1)
        return [sorted(allowed)[i] for i in np.argsort(-s)[:10]]

    spaces = store.search_namespaces("ns", prefix=False)
    assert spaces[0][2] == 16
    got = cache.top_k(store, spaces, q, 10, NOW)
    assert [k for _, k, _ in got] == brute(set(vecs))
    # Combined with a filter: only the keys the index kept
    allowed = {k for _, k, _ in store.search_keys(SearchQuery("ns", False, NOW, terms=("1",), limit=None))}
    got = cache.top_k(store, spaces, q, 10, NOW, {"ns": allowed})
    assert [k for _, k, _ in got] == brute(allowed)
    # When the best one is deleted and a new vector equal to the query arrives, the cache catches up
    best = brute(set(vecs))[0]
    store.apply_batch([doc(best, 1000, None), doc("new", 1001, {"content": "x", "embedding": q})])
    got = cache.top_k(store, store.search_namespaces("ns", prefix=False), q, 10, NOW)
    assert got[0][1] == "new" and abs(got[0][2] - 1.0) < 1e-5 and best not in {k for _, k, _ in got}


def test_a_bulk_vector_load_across_chunks_matches_brute_force_and_skips_what_it_cannot_use(store: SqlStore) -> None:
    # Given more rows than one decode chunk: most with a 4-dim embedding, some with another dimension,
    # some with none, one all zeros, some expiring, and one deleted
    from mfh_core.vectors import DECODE_CHUNK

    rng = random.Random(11)
    n = DECODE_CHUNK + 300
    vecs: dict[str, list[float]] = {}
    events = []
    for i in range(n):
        key, payload = f"k{i:05d}", {"content": "x"}
        if i % 97 == 0:
            payload["embedding"] = [rng.uniform(-1, 1) for _ in range(5)]  # not the namespace's dimension
        elif i % 89 != 0:
            payload["embedding"] = vecs[key] = [rng.uniform(-1, 1) for _ in range(4)]
        if i % 50 == 1:
            payload["expires_at_ms"] = NOW - 1  # expired: never a hit
            vecs.pop(key, None)
        events.append(doc(key, 100 + i, payload))
    events[2] = doc("k00002", 102, {"content": "x", "embedding": [0.0, 0.0, 0.0, 0.0]})
    vecs.pop("k00002")
    # (the first row fixes the namespace's dimension at 4)
    events[0] = doc("k00000", 100, {"content": "x", "embedding": [0.5, 0.5, 0.5, 0.5]})
    vecs["k00000"] = [0.5, 0.5, 0.5, 0.5]
    for i in range(0, n, 1000):
        store.apply_batch(events[i : i + 1000])
    store.apply_batch([doc("k00003", 10_000, None)])
    vecs.pop("k00003")
    q = [0.3, -0.7, 0.2, 0.9]
    # When the cache loads the namespace in one go and answers a top-50
    spaces = store.search_namespaces("ns", prefix=False)
    assert spaces[0][2] == 4
    got = VectorCache().top_k(store, spaces, q, 50, NOW)
    # Then it is the exact top-50 of the usable, live rows, with their cosines
    keys = sorted(vecs)
    m = np.array([vecs[k] for k in keys], dtype=np.float32).astype(np.float64)
    s = m @ np.array(q) / np.linalg.norm(m, axis=1) / np.linalg.norm(q)
    order = np.argsort(-s, kind="stable")[:50]
    assert [k for _, k, _ in got] == [keys[i] for i in order]
    assert np.allclose([c for _, _, c in got], s[order], atol=1e-5)


def test_replay_rebuilds_the_index_and_the_checksum_ignores_it(store: SqlStore, tmp_path: Path) -> None:
    store.apply_batch([doc("a", 10, {"content": "rebuilt words", "embedding": [1.0, 2.0]})])
    before = store.checksum()
    target = SqlStore(f"sqlite:///{tmp_path}/replayed.db")
    target.create_schema()
    try:
        plain = SqlStore(f"sqlite:///{tmp_path}/plain.db", index_search=False)
        plain.create_schema()
        with store.snapshot() as snap:
            for chunk in snap.iter_events():
                target.apply_batch(chunk, published=True)
                plain.apply_batch(chunk, published=True)
        assert target.checksum() == before == plain.checksum()
        assert [k for _, k, _ in target.search_keys(SearchQuery("ns", False, NOW, terms=("rebuilt",)))] == ["a"]
        plain.close()
    finally:
        target.close()


def test_a_replay_indexes_each_key_at_its_final_version_once_it_has_applied_the_log(
    store: SqlStore, tmp_path: Path
) -> None:
    # Given a log over several batches: keys rewritten, deleted, rewritten back, in two namespaces
    from mfh_tasks.replay import open_target, replay_from_sql

    rng = random.Random(11)
    words = ["red", "green", "blue", "amber"]
    latest: dict[tuple[str, str], str | None] = {}
    v = 1000
    for _ in range(5):
        batch = []
        for i in range(30):
            ns, key = rng.choice(["ns", "ns.y"]), f"k{rng.randrange(25)}"
            v += 1
            text = None if rng.random() < 0.2 else f"{rng.choice(words)} item{i}"
            batch.append(doc(key, v, {"content": text} if text else None, ns=ns))
            latest[(ns, key)] = text
        store.apply_batch(batch)
    # When it is replayed into an empty SQLite store in small batches (the index is built at the end)
    target = open_target(f"sqlite:///{tmp_path}/replayed.db")
    try:
        result = replay_from_sql(store, target, batch=7)
        # Then the items' checksum is the live one and every word finds exactly the live docs holding it
        assert result.checksum == store.checksum()
        for w in words:
            query = SearchQuery("ns", True, NOW, terms=(w,), limit=None)
            got = {(n, k) for n, k, _ in target.search_keys(query)}
            assert got == {nk for nk, t in latest.items() if t is not None and w in t.split()}, w
            assert got == {(n, k) for n, k, _ in store.search_keys(query)}
        # And the FTS5 index matches its content table; indexing again changes nothing
        assert target.index_items() == len(latest)
        with target._write.begin() as conn:
            conn.exec_driver_sql("INSERT INTO search_fts(search_fts, rank) VALUES ('integrity-check', 1)")
        assert {(n, k) for n, k, _ in target.search_keys(SearchQuery("ns", True, NOW, limit=None))} == {
            nk for nk, t in latest.items() if t is not None
        }
    finally:
        target.close()


# -- namespaces ------------------------------------------------------------------------------------------


@given(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4))
def test_tuple_namespaces_round_trip_and_keep_prefixes(path: list[str]) -> None:
    try:
        name = encode_namespace(path)
    except InvalidArgument:
        return  # too long, or a first segment that does not start with a letter or digit
    assert decode_namespace(name) == tuple(path)
    for i in range(1, len(path) + 1):
        assert is_under(name, encode_namespace(path[:i]))
    assert encode_namespace(["users", "a.b", "x"]) == "users.a_2Eb.x"


# -- the service --------------------------------------------------------------------------------------------


@pytest.fixture
async def svc(tmp_path: Path, redis_url: str) -> AsyncIterator[MemoryService]:
    host: TestHost = make_host(
        tmp_path, redis_url=redis_url, overrides={"storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"}}
    )
    host.start_worker(threads=2)
    s = await build_service(host.settings)
    try:
        yield s
    finally:
        await s.close()
        host.stop_all()


def memo(key: str, text: str, ns: str = "mem", **extra: Any) -> PutSpec:
    return PutSpec(ns, key, "memory_item", {"content": text, **extra})


async def test_a_persisted_write_is_searchable_when_answered(svc: MemoryService) -> None:
    for i in range(5):
        # When a PERSISTED put is answered, the very next search finds it
        await svc.put(memo(f"k{i}", f"note number{i} about zebras"), durability=Durability.PERSISTED, timeout=30)
        hits = await svc.search(SearchSpec(namespace="mem", query=f"number{i} zebras"))
        assert [r.key for r, _ in hits] == [f"k{i}"]
    # And a later delete (staged, persisted or not) hides it at once: hits are overlaid with the hot store
    await svc.delete("mem", "k0")
    hits = await svc.search(SearchSpec(namespace="mem", query="zebras"))
    assert sorted(r.key for r, _ in hits) == ["k1", "k2", "k3", "k4"]


async def test_vector_search_through_the_service(svc: MemoryService) -> None:
    specs = [memo(f"v{i}", "vec", ns="vec.a", embedding=[float(i), 1.0, 0.0]) for i in range(1, 6)]
    await svc.batch_put(specs, durability=Durability.PERSISTED, timeout=30)
    hits = await svc.search(SearchSpec(namespace_prefix="vec", embedding=[1.0, 0.0, 0.0], top_k=2))
    assert [r.key for r, _ in hits] == ["v5", "v4"] and hits[0][1] > hits[1][1]
    # A put whose embedding has another dimension than the namespace's is refused
    with pytest.raises(InvalidArgument, match="dimensions"):
        await svc.put(memo("bad", "x", ns="vec.a", embedding=[1.0, 2.0]))
    with pytest.raises(InvalidArgument, match="dimensions"):
        await svc.batch_put(
            [memo("p", "x", ns="vec.b", embedding=[1.0]), memo("q", "x", ns="vec.b", embedding=[1.0, 2.0])]
        )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (SearchSpec(), "exactly one of namespace"),
        (SearchSpec(namespace="a", namespace_prefix="a"), "exactly one of namespace"),
        (SearchSpec(namespace="bad ns"), "namespace"),
        (SearchSpec(namespace="a", query="x" * 1025), "longer than 1024"),
        (SearchSpec(namespace="a", query=" ".join(f"w{i}" for i in range(33))), "at most 32"),
        (SearchSpec(namespace="a", query="!!!"), "no words"),
        (SearchSpec(namespace="a", kinds=["poem"]), "unknown kind"),
        (SearchSpec(namespace="a", top_k=5000), "top_k"),
        (SearchSpec(namespace="a", top_k=-1), "top_k"),
        (SearchSpec(namespace="a", metadata=[C("x'; drop", "eq", 1)]), "field must be"),
        (SearchSpec(namespace="a", metadata=[C("x", "like", 1)]), "op 'like'"),
        (SearchSpec(namespace="a", metadata=[C("x", "gt", True)]), "not booleans"),
        (SearchSpec(namespace="a", metadata=[C("x", "eq", {"a": 1})]), "string, number or boolean"),
        (SearchSpec(namespace="a", metadata=[C("x", "in", [])]), "'in' takes"),
        (SearchSpec(namespace="a", metadata=[C("x", "eq", float("nan"))]), "finite"),
        (SearchSpec(namespace="a", updated_after_ms=-5), "unix milliseconds"),
        (SearchSpec(namespace="a", embedding=[float("inf")]), "finite"),
        (SearchSpec(namespace="a", embedding=[0.0, 0.0]), "all zeros"),
        (SearchSpec(namespace="a", embedding=[1.0] * 5000), "at most 4096"),
        (SearchSpec(namespace="a", tags=["x" * 300]), "tags"),
    ],
)
async def test_bad_searches_are_invalid_arguments(svc: MemoryService, spec: SearchSpec, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        await svc.search(spec)


async def test_a_query_embedding_of_the_wrong_dimension_is_an_invalid_argument(svc: MemoryService) -> None:
    await svc.put(memo("v", "x", ns="dims", embedding=[1.0, 0.0]), durability=Durability.PERSISTED, timeout=30)
    with pytest.raises(InvalidArgument, match="embedding has 3 dimensions; namespace dims use 2"):
        await svc.search(SearchSpec(namespace="dims", embedding=[1.0, 0.0, 0.0]))


async def test_list_namespaces_pages_and_cuts_to_a_depth(svc: MemoryService) -> None:
    names = ["users.alice.memories", "users.alice.prefs", "users.bob.memories", "users2.x", "other"]
    await svc.batch_put([memo("k", "x", ns=n) for n in names], durability=Durability.PERSISTED, timeout=30)
    assert (await svc.list_namespaces(prefix="users"))[0] == names[:3]
    assert (await svc.list_namespaces(prefix="users", max_depth=2))[0] == ["users.alice", "users.bob"]
    page, token = await svc.list_namespaces(page_size=2)
    seen = list(page)
    while token:
        page, token = await svc.list_namespaces(page_size=2, page_token=token)
        seen += page
    assert seen == sorted(names)
    with pytest.raises(InvalidArgument, match="page_token"):
        await svc.list_namespaces(prefix="users", page_token=(await svc.list_namespaces(page_size=1))[1])
    with pytest.raises(InvalidArgument, match="max_depth"):
        await svc.list_namespaces(max_depth=-1)


# -- both doors, with the clients --------------------------------------------------------------------------


async def test_search_and_list_namespaces_on_grpc_and_zeromq(svc: MemoryService) -> None:
    grpc_server = GrpcServer(svc, svc.settings)
    await grpc_server.start()
    zmq_server = ZmqServer(svc, port=0)
    await zmq_server.start()
    g = AsyncMemoryClient([f"127.0.0.1:{grpc_server.port}"])
    z = AsyncZmqClient(zmq_server.endpoint)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_server.port}")
    try:
        from mfh_client import PutSpec as ClientPut

        await g.put(
            ClientPut("doors.x", "a", "memory_item", {"content": "red apples", "metadata": {"p": 2}}, ttl_seconds=600),
            durability=Durability.PERSISTED,
            timeout=30,
        )
        await z.put(
            ClientPut("doors.x", "b", "memory_item", {"content": "green apples", "metadata": {"p": 5}}),
            durability=Durability.PERSISTED,
            timeout=30,
        )
        for client in (g, z):
            hits = await client.search(
                namespace_prefix="doors", query="apples", metadata=[MetadataFilter("p", "gte", 3)]
            )
            assert [h.record.key for h in hits] == ["b"]
            hits = await client.search("doors.x", metadata=[("p", "in", [2])])
            assert [h.record.key for h in hits] == ["a"] and "expires_at_ms" in json.loads(hits[0].record.payload)
            assert (await client.list_namespaces(prefix="doors", max_depth=1)) == (["doors"], "")
            with pytest.raises(InvalidArgument, match="op"):
                await client.search("doors.x", metadata=[("p", "like", 1)])
            with pytest.raises(InvalidArgument):
                await client.search("doors.x", namespace_prefix="doors")
        # Hostile gRPC requests: malformed value_json, huge top_k
        stub = pb_grpc.MemoryFusionStub(channel)
        bad = [
            pb.SearchRequest(
                namespace="doors.x",
                filters=pb.SearchFilters(metadata=[pb.MetadataFilter(field="p", op="eq", value_json="{")]),
            ),
            pb.SearchRequest(namespace="doors.x", top_k=1 << 31),
            pb.SearchRequest(namespace="doors.x", embedding=[float("nan")]),
            pb.ListNamespacesRequest(prefix="bad prefix!"),
        ]
        for req in bad:
            method = stub.ListNamespaces if isinstance(req, pb.ListNamespacesRequest) else stub.Search
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await method(req, timeout=5)
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        # And hostile ZeroMQ payloads
        for payload in (
            {"namespace": "doors.x", "filters": {"metadata": [{"field": "p", "op": "eq"}]}},
            {"namespace": "doors.x", "embedding": ["x"]},
            {"namespace": "doors.x", "filters": "nope"},
            {"namespace": "doors.x", "top_k": "10"},
        ):
            body = json.dumps({"v": 1, "id": 1, "action": "search", "payload": payload}).encode()
            reply = json.loads(await zmq_server.answer(body))
            assert reply["status"] == "error" and reply["error"]["code"] == "INVALID_ARGUMENT", reply
    finally:
        await channel.close()
        await g.close()
        z.close()
        await zmq_server.close()
        await grpc_server.stop(grace=1)


@pytest.mark.parametrize(
    "payload",
    [
        {"content": "c", "embedding": [1, -2, 3.5e-7, 1e30, 0.1]},
        {"content": "c", "metadata": {"embedding": ["a]b", 1]}},
        {"content": "c", "metadata": {"embedding": [1, 2]}},
        {"session_id": "s", "data": {"embedding": [1, 2]}, "embedding": [3.0, 4.5]},
        {"session_id": "s", "data": {"embedding": [[1], 2]}},
        {"content": 'he said "embedding":[1] ok'},
        {"content": "c", "embedding": [0.25]},
    ],
)
def test_the_index_reads_only_the_top_level_embedding_and_the_rest_of_the_payload_as_it_is(
    payload: dict[str, Any],
) -> None:
    # Given a canonical payload, perhaps with a key named "embedding" below the top level
    from mfh_core.searchindex import doc_row, embedding_of

    text = canonical_json(payload)
    # When the index derives its row and the vector cache its vector
    row = doc_row(("ns", "k", "memory_item", text, 1, "main_pc", False, 1, 1), 0)
    vec = embedding_of(text)
    # Then both are what a full JSON parse gives: the top-level embedding as float32, the rest untouched
    top = payload.get("embedding")
    assert row[11] == (len(top) if top else None)
    if top:
        assert vec is not None and vec.tobytes() == np.array(top, dtype=np.float32).tobytes()
    else:
        assert vec is None
    want_meta = payload.get("metadata") or {}
    assert json.loads(row[9]) == want_meta
