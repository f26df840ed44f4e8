"""Restore: a snapshot taken during writes, plus the events after its watermark, rebuilds the live store;
the incremental audit starts from the verified snapshot; pruned events leave restore and audit intact."""

from __future__ import annotations

import gzip
import json
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from factories import event
from hosts import make_host

from mfh_api.cli import main as mfh
from mfh_core import SqlStore
from mfh_core.sqlstore import engine_url
from mfh_models import InvalidArgument, MemoryEvent, Op
from mfh_tasks.replay import open_target
from mfh_tasks.restore import restore_from_sql, restore_snapshot_only
from mfh_tasks.snapshots import lines_path, read_header, verified_snapshot
from schedules.jobs import audit, iter_archived_events, prune_events, snapshot


def _events(n: int, *, seed: int, keys: int = 300) -> list[MemoryEvent]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        op = Op.DELETE if rng.random() < 0.15 else Op.PUT
        origin = rng.choice(("main_pc", "pc2"))
        out.append(event(f"k{rng.randrange(keys)}", rng.randrange(1, 50 * n), origin=origin, op=op, content=i))
    return list({e.event_id: e for e in out}.values())


@pytest.fixture
def store(db_url: str) -> Iterator[SqlStore]:
    s = SqlStore(db_url)
    s.create_schema()
    yield s
    s.close()


@pytest.fixture
def target_url(db_url: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of the same kind as ``db_url``."""
    if db_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}/restored.db"
    return str(request.getfixturevalue("postgres_url_b"))


def _write_concurrently(store: SqlStore, events: list[MemoryEvent], *, writers: int = 3, batch: int = 7) -> None:
    chunks = [events[i : i + batch] for i in range(0, len(events), batch)]

    def run(mine: list[list[MemoryEvent]]) -> None:
        for c in mine:
            store.apply_batch(c)

    threads = [threading.Thread(target=run, args=(chunks[w::writers],)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_a_snapshot_taken_during_writes_plus_the_events_after_it_restores_the_live_checksum(
    store: SqlStore, target_url: str, tmp_path: Path
) -> None:
    # Given a store with history, being written by three concurrent writers
    store.apply_batch(_events(500, seed=1))
    during = _events(3000, seed=2)
    writing = threading.Thread(target=_write_concurrently, args=(store, during))
    writing.start()
    # When a snapshot is taken while they write
    path = snapshot(store, tmp_path / "snaps", host="main_pc")
    writing.join()
    store.apply_batch(_events(200, seed=3))
    live = store.checksum()
    head = read_header(path)
    # Then the snapshot holds every item column and a watermark short of the end of the log
    with gzip.open(path, "rt") as f:
        f.readline()
        row = json.loads(f.readline())
    assert set(row) == {
        "namespace", "key", "kind", "payload", "version", "origin", "deleted", "updated_at", "schema_version"
    }  # fmt: skip
    assert head.format == 2 and 0 < head.watermark < store.counts()["events"] + 1  # type: ignore[operator]
    # And the snapshot plus the events after its watermark rebuild the live checksum
    target = open_target(target_url)
    try:
        result = restore_from_sql(path, target, store)
        assert result.ok and result.checksum == live == target.checksum()
        assert 0 < result.events < store.counts()["events"]
        # And every column came back, not only the checksummed ones
        some = store.list_page("ns", limit=50, include_deleted=True)
        assert [r.model_dump() for r in some] == [
            r.model_dump() for r in target.list_page("ns", limit=50, include_deleted=True)
        ]
    finally:
        target.close()


def test_the_snapshot_alone_restores_its_own_state_and_a_snapshot_of_another_store_is_refused(
    store: SqlStore, tmp_path: Path
) -> None:
    # Given a snapshot, then more writes
    store.apply_batch(_events(400, seed=4))
    path = snapshot(store, tmp_path / "snaps", host="main_pc")
    then = store.checksum()
    store.apply_batch(_events(100, seed=5))
    # When it is restored on its own
    target = open_target(f"sqlite:///{tmp_path}/alone.db")
    try:
        # Then the result is the state it saw ("yesterday's state")
        assert restore_snapshot_only(path, target).checksum == then == target.checksum()
    finally:
        target.close()
    # And with the events table of another store it is refused: seqs are per store
    other = SqlStore(f"sqlite:///{tmp_path}/other.db")
    other.create_schema()
    other.apply_batch(_events(50, seed=6))
    target = open_target(f"sqlite:///{tmp_path}/refused.db")
    try:
        with pytest.raises(InvalidArgument, match="not taken from this events table"):
            restore_from_sql(path, target, other)
    finally:
        target.close()
        other.close()


def test_the_incremental_audit_starts_at_the_verified_snapshot(store: SqlStore, tmp_path: Path) -> None:
    # Given a log, a snapshot, and more events
    snaps = tmp_path / "snaps"
    store.apply_batch(_events(2000, seed=7))
    first = snapshot(store, snaps, host="main_pc")
    store.apply_batch(_events(300, seed=8))
    # When the first audit runs: no verified snapshot yet, so the whole log; it proves the snapshot on the way
    full = audit(store, host="main_pc", report_dir=snaps)
    assert full.ok and full.mode == "full" and full.verified_snapshot == first.name
    assert verified_snapshot(snaps, "main_pc") is not None
    total = store.counts()["events"]
    assert full.events == total
    # And after a second snapshot and a few events, the next audit replays only what came after the first
    second = snapshot(store, snaps, host="main_pc")
    store.apply_batch(_events(100, seed=9))
    inc = audit(store, host="main_pc", report_dir=snaps)
    assert inc.ok and inc.mode == "incremental" and inc.base_snapshot == first.name
    assert inc.events == store.counts()["events"] - read_header(first).watermark  # type: ignore[operator]
    assert inc.verified_snapshot == second.name
    # And the audit file keeps the fields it had
    latest = json.loads((snaps / "audit-latest-main_pc.json").read_text())
    assert {"host", "ok", "live_checksum", "replay_checksum", "events", "seconds", "checked_at"} <= set(latest)
    # And --full still replays every event
    assert audit(store, host="main_pc", report_dir=snaps, full=True).events == store.counts()["events"]


def test_the_incremental_audit_merges_into_the_snapshots_lines_and_still_catches_a_drifted_row(
    store: SqlStore, tmp_path: Path
) -> None:
    # Given a verified snapshot (with its checksum lines beside it), then events after it: older
    # versions of its keys (the snapshot's rows win), newer ones, and keys it lacks
    snaps = tmp_path / "snaps"
    store.apply_batch(_events(1500, seed=20))
    first = snapshot(store, snaps, host="main_pc")
    assert lines_path(first).exists()
    assert audit(store, host="main_pc", report_dir=snaps, full=True).verified_snapshot == first.name
    store.apply_batch(_events(300, seed=21, keys=400))
    live = store.checksum()
    # When the incremental audit runs  Then it agrees with the live store
    inc = audit(store, host="main_pc", report_dir=snaps)
    assert inc.ok and inc.mode == "incremental" and inc.replay_checksum == live
    # and without the lines file (a snapshot from before them), or with a damaged one, it loads the rows: same verdict
    saved = lines_path(first).read_bytes()
    lines_path(first).unlink()
    assert audit(store, host="main_pc", report_dir=snaps).replay_checksum == live
    lines_path(first).write_bytes(gzip.compress(b"ns\tk1\t1\tmain_pc\t0\tfeed\n"))
    assert audit(store, host="main_pc", report_dir=snaps).replay_checksum == live
    lines_path(first).write_bytes(saved)
    # When a row changes in the live table without an event (one no event since the snapshot wrote)
    touched = {e.key for _, e in store.iter_events(after_seq=read_header(first).watermark or 0)}
    untouched = sorted({f"k{i}" for i in range(300)} - touched)[0]
    engine = sa.create_engine(engine_url(store.url))
    with engine.begin() as conn:
        drift = sa.text("UPDATE items SET payload = :p WHERE key = :k")
        assert conn.execute(drift, {"p": '{"content":"drift"}', "k": untouched}).rowcount == 1
    engine.dispose()
    # Then the incremental audit finds the mismatch
    drifted = audit(store, host="main_pc", report_dir=snaps)
    assert drifted.mode == "incremental" and not drifted.ok and drifted.live_checksum != drifted.replay_checksum


def test_pruning_then_restore_audit_and_replay_still_give_the_live_checksum(store: SqlStore, tmp_path: Path) -> None:
    # Given two snapshots over a log
    snaps = tmp_path / "snaps"
    store.apply_batch(_events(1500, seed=10))
    old = snapshot(store, snaps, host="main_pc")
    store.apply_batch(_events(500, seed=11))
    snapshot(store, snaps, host="main_pc")
    store.apply_batch(_events(200, seed=12))
    live, before = store.checksum(), store.counts()["events"]
    # When the events older than the oldest kept snapshot are pruned (and archived)
    pruned = prune_events(store, snaps, host="main_pc")
    wm = read_header(old).watermark
    assert pruned == wm - 1 and store.counts()["events"] == before - pruned  # type: ignore[operator]
    assert sum(len(c) for c in iter_archived_events(snaps, "main_pc")) == pruned
    # Then the live checksum is unchanged, the oldest snapshot still restores to it ...
    assert store.checksum() == live
    target = open_target(f"sqlite:///{tmp_path}/after-prune.db")
    try:
        assert restore_from_sql(old, target, store).checksum == live
    finally:
        target.close()
    # ... and a full audit (archives first, then the table) agrees, as does the incremental one
    assert audit(store, host="main_pc", report_dir=snaps, full=True).ok
    assert audit(store, host="main_pc", report_dir=snaps).ok


def test_mfh_restore_and_snapshot_list(tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Given a host with data and a snapshot
    host = make_host(tmp_path, redis_url=redis_url)
    where = ["--host", "main_pc", "--config-dir", str(host.config_dir)]
    s = SqlStore(host.settings.storage.database_url)
    s.create_schema()
    s.apply_batch(_events(300, seed=13))
    path = snapshot(s, Path(host.settings.scheduler.snapshot_dir), host="main_pc")
    s.apply_batch(_events(50, seed=14))
    live = s.checksum()
    s.close()
    # When `mfh snapshot list` and `mfh restore latest --into ... --events-from <this host's store>` run
    assert mfh([*where, "snapshot", "list"]) == 0
    assert path.name in capsys.readouterr().out
    into = f"sqlite:///{tmp_path}/restored.db"
    code = mfh([*where, "restore", "latest", "--into", into, "--events-from", host.settings.storage.database_url])
    out = capsys.readouterr()
    # Then it prints the live checksum and exits 0
    assert code == 0 and out.out.strip() == live, out.err
    # And --expect with a wrong checksum exits 1
    code = mfh([*where, "restore", str(path), "--into", f"sqlite:///{tmp_path}/r2.db", "--expect", "0" * 64])
    assert code == 1


def test_a_postgres_snapshot_waits_for_a_write_in_flight_so_its_watermark_misses_nothing(
    postgres_url: str, postgres_url_b: str, tmp_path: Path
) -> None:
    """A sequence hands out seqs at insert time: a write with a lower seq can commit after one with a
    higher seq. Unfenced, a snapshot between the two has the higher seq as its watermark and lacks the
    lower one, and restore (events after the watermark) loses it."""
    import sqlalchemy as sa

    from mfh_core.sqlstore import engine_url

    store = SqlStore(postgres_url)
    store.create_schema()
    slow, fast = event("slow", 1), event("fast", 2)
    engine = sa.create_engine(engine_url(postgres_url))
    try:
        # Given a write transaction that took its seq (and the write fence) but has not committed ...
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock_shared({0x6D666802})")
            conn.execute(
                sa.text(
                    "INSERT INTO events (event_id, op, namespace, key, kind, payload, version, origin, created_at,"
                    " schema_version, published) VALUES (:id, 'put', 'ns', 'slow', 'memory_item', :p, :v, 'main_pc',"
                    " :c, 1, false)"
                ),
                {"id": slow.event_id, "p": slow.payload, "v": slow.version, "c": slow.created_at},
            )
            # ... and a later one that committed with a higher seq
            store.apply_batch([fast])
            # When a snapshot is taken meanwhile
            done: list[Path] = []
            taker = threading.Thread(target=lambda: done.append(snapshot(store, tmp_path / "s", host="main_pc")))
            taker.start()
            taker.join(timeout=1.0)
            # Then it waits for the write in flight (the fence) ...
            assert not done, "the snapshot did not wait for the write in flight"
            conn.execute(
                sa.text(
                    "INSERT INTO items (namespace, key, kind, payload, version, origin, deleted, updated_at,"
                    " schema_version) VALUES ('ns', 'slow', 'memory_item', :p, :v, 'main_pc', false, :c, 1)"
                ),
                {"p": slow.payload, "v": slow.version, "c": slow.created_at},
            )
            conn.commit()
        taker.join(timeout=30)
        # ... and the snapshot plus the events after its watermark hold both writes
        target = open_target(postgres_url_b)
        try:
            result = restore_from_sql(done[0], target, store)
            assert result.ok and target.get("ns", "slow") is not None and target.get("ns", "fast") is not None
        finally:
            target.close()
    finally:
        engine.dispose()
        store.close()
