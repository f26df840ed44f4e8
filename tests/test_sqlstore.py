"""Contract suite for SqlStore, run on SQLite and on Postgres (the ``db_url`` fixture)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

import pytest
from factories import event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from legacy_store import build_legacy_store

from mfh_api.cli import main as cli_main
from mfh_core import SqlStore
from mfh_models import InvalidArgument, Op, Unavailable


@pytest.fixture(params=["fresh", "upgraded"])
def store(db_url: str, request: pytest.FixtureRequest) -> Iterator[SqlStore]:
    """A new store created at head, or one of release 0.1.0 (tests/fixtures) upgraded by ``mfh db upgrade``."""
    if request.param == "upgraded":
        build_legacy_store(db_url, rows=False)
        legacy = SqlStore(db_url)
        state = legacy.schema_state()
        legacy.close()
        assert state.revision is None and state.has_tables  # the 0.1.0 tables, not an empty database
        assert cli_main(["db", "upgrade", "--url", db_url]) == 0
    s = SqlStore(db_url)
    s.create_schema()
    yield s
    s.close()


def test_apply_batch_stores_events_and_items(store: SqlStore) -> None:
    # Given two puts to different keys
    batch = [event("a", 1), event("b", 2)]
    # When they are applied
    res = store.apply_batch(batch)
    # Then both events are in the log and both items are readable
    assert (res.events, res.keys) == (2, 2)
    a = store.get("ns", "a")
    assert a is not None and a.version == batch[0].version and a.payload == batch[0].payload
    assert store.counts() == {"items": 2, "events": 2, "unpublished": 2}


def test_older_version_never_overwrites_newer(store: SqlStore) -> None:
    store.apply_batch([event("k", 5)])
    store.apply_batch([event("k", 3)])
    got = store.get("ns", "k")
    assert got is not None and got.version == event("k", 5).version
    # the older event is still in the log: the log holds every change
    assert store.counts()["events"] == 2


def test_delete_then_late_older_put_stays_deleted(store: SqlStore) -> None:
    # Given a put at v1 and a delete at v3
    store.apply_batch([event("k", 1), event("k", 3, op=Op.DELETE)])
    # When a put at v2 arrives late
    store.apply_batch([event("k", 2)])
    # Then the key stays a tombstone
    got = store.get("ns", "k")
    assert got is not None and got.deleted and got.version == event("k", 3).version
    assert store.list_page("ns") == []
    assert [r.key for r in store.list_page("ns", include_deleted=True)] == ["k"]


def test_equal_versions_tie_break_on_origin(store: SqlStore) -> None:
    store.apply_batch([event("k", 1, origin="pc2", content="from pc2")])
    store.apply_batch([event("k", 1, origin="main_pc", content="from main")])
    got = store.get("ns", "k")
    assert got is not None and got.origin == "pc2"


def test_batch_touching_one_key_twice_keeps_the_newest(store: SqlStore) -> None:
    # Postgres rejects an upsert that touches a row twice; the store reduces the batch first.
    store.apply_batch([event("k", 2), event("k", 7), event("k", 4), event("k", 7)])
    got = store.get("ns", "k")
    assert got is not None and got.version == event("k", 7).version
    assert store.counts()["events"] == 3


def test_reapplying_a_batch_changes_nothing(store: SqlStore) -> None:
    batch = [event(f"k{i}", i) for i in range(50)]
    store.apply_batch(batch)
    before = (store.checksum(), store.counts())
    store.apply_batch(list(reversed(batch)))
    assert (store.checksum(), store.counts()) == before


def test_list_pages_in_byte_order_with_prefix_and_kind(store: SqlStore) -> None:
    keys = ["b", "a", "a/2", "a/1", "B", "c:x"]
    store.apply_batch([event(k, i + 1) for i, k in enumerate(keys)])
    store.apply_batch([event("kr", 50, kind="knowledge_record")])
    page1 = store.list_page("ns", limit=3)
    page2 = store.list_page("ns", after_key=page1[-1].key, limit=3)
    assert [r.key for r in page1 + page2] == ["B", "a", "a/1", "a/2", "b", "c:x"][:6]
    assert [r.key for r in store.list_page("ns", key_prefix="a/")] == ["a/1", "a/2"]
    from mfh_models import Kind

    assert [r.key for r in store.list_page("ns", kind=Kind.KNOWLEDGE_RECORD)] == ["kr"]


def test_events_iterate_in_commit_order_and_outbox_marks(store: SqlStore) -> None:
    batch = [event(f"k{i}", i) for i in range(1, 11)]
    store.apply_batch(batch[:5])
    store.apply_batch(batch[5:])
    seqs = [s for s, _ in store.iter_events(batch=3)]
    assert seqs == sorted(seqs) and len(seqs) == 10
    store.mark_published([e.event_id for e in batch[:4]])
    pending = store.unpublished()
    assert [e.event_id for _, e in pending] == sorted(
        [e.event_id for e in batch[4:]], key=lambda i: [e.event_id for e in batch].index(i)
    )
    assert store.counts()["unpublished"] == 6


def test_events_applied_as_published_are_not_in_the_outbox(store: SqlStore) -> None:
    store.apply_batch([event("r", 1, origin="pc2")], published=True)
    assert store.unpublished() == []


def test_checksum_is_independent_of_insert_order(store: SqlStore, tmp_path: object) -> None:
    batch = [event(f"k{i % 17}", i, op=Op.DELETE if i % 5 == 0 else Op.PUT) for i in range(1, 120)]
    store.apply_batch(batch)
    other = SqlStore(f"sqlite:///{tmp_path}/other.db")
    other.create_schema()
    try:
        shuffled = batch[:]
        random.Random(7).shuffle(shuffled)
        for i in range(0, len(shuffled), 13):
            other.apply_batch(shuffled[i : i + 13])
        assert other.checksum() == store.checksum()
    finally:
        other.close()


_events = st.lists(
    st.builds(
        # A host's clock never gives two changes one version, so (origin, version) is unique per change.
        lambda k, v, o, d: event(f"k{k}", (v * 8 + k) * 2 + d, origin=o, op=Op.DELETE if d else Op.PUT),
        st.integers(0, 5),
        st.integers(1, 30),
        st.sampled_from(["main_pc", "pc2"]),
        st.booleans(),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=_events, data=st.data())
def test_any_permutation_with_duplicates_gives_the_same_checksum(
    db_url: str, tmp_path_factory: pytest.TempPathFactory, events: list, data: st.DataObject
) -> None:
    # Given a reference store that applied the events in order, one batch
    ref = SqlStore(f"sqlite:///{tmp_path_factory.mktemp('ref')}/ref.db")
    ref.create_schema()
    # and a store under test that gets a permutation with duplicates, in random batch sizes
    dup = events + data.draw(st.lists(st.sampled_from(events), max_size=10))
    perm = data.draw(st.permutations(dup))
    sizes = data.draw(st.lists(st.integers(1, 8), min_size=len(perm), max_size=len(perm)))
    store = SqlStore(db_url if "sqlite" not in db_url else f"sqlite:///{tmp_path_factory.mktemp('p')}/p.db")
    store.create_schema()
    try:
        if "postgres" in db_url:
            _truncate(store)
        ref.apply_batch(events)
        i = 0
        for size in sizes:
            if i >= len(perm):
                break
            store.apply_batch(perm[i : i + size])
            i += size
        # Then the checksums match
        assert store.checksum() == ref.checksum()
    finally:
        store.close()
        ref.close()


def _truncate(store: SqlStore) -> None:
    import sqlalchemy as sa

    with store._write.begin() as conn:
        conn.execute(sa.text("TRUNCATE items, events"))


def test_sqlite_needs_a_file() -> None:
    with pytest.raises(InvalidArgument):
        SqlStore("sqlite://")
    with pytest.raises(InvalidArgument):
        SqlStore("mysql://x/y")


def test_unreachable_postgres_is_unavailable() -> None:
    # a port nothing listens on: the driver error is translated, not leaked
    store = SqlStore("postgresql+psycopg2://postgres@127.0.0.1:1/none?connect_timeout=1")
    with pytest.raises(Unavailable):
        store.get("ns", "k")
    store.close()


def test_permutations_small_exhaustive(store: SqlStore) -> None:
    evs = [event("k", 1), event("k", 2, op=Op.DELETE), event("k", 3, origin="pc2"), event("k", 3)]
    expected = None
    for perm in itertools.permutations(evs):
        _reset(store)
        for e in perm:
            store.apply_batch([e])
        c = store.checksum()
        expected = expected or c
        assert c == expected


def _reset(store: SqlStore) -> None:
    import sqlalchemy as sa

    with store._write.begin() as conn:
        conn.execute(sa.text("DELETE FROM items"))
        conn.execute(sa.text("DELETE FROM events"))
