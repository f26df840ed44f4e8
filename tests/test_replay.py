"""Replay: the event log (SQL events table or JetStream stream) rebuilds an identical items table."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from factories import event
from hosts import make_host
from services import NatsServer

from mfh_api.cli import main as mfh
from mfh_core import SqlStore
from mfh_core.eventbus import EventBus
from mfh_models import InvalidArgument, MemoryEvent, Op
from mfh_tasks.replay import open_target, replay_from_sql, replay_from_stream


def history(n: int = 3000, keys: int = 400, seed: int = 11) -> list[MemoryEvent]:
    """Puts and deletes from two origins over shared keys, versions not in log order."""
    rng = random.Random(seed)
    out = []
    for i in range(1, n + 1):
        origin = rng.choice(("main_pc", "pc2"))
        op = Op.DELETE if rng.random() < 0.2 else Op.PUT
        out.append(event(f"k{rng.randrange(keys)}", rng.randrange(1, 10 * n), origin=origin, op=op, content=i))
    return list({e.event_id: e for e in out}.values())


@pytest.fixture
def source(tmp_path: Path) -> Iterator[SqlStore]:
    """A host's SQL store whose events arrived in shuffled batches, some twice (redeliveries)."""
    store = SqlStore(f"sqlite:///{tmp_path}/source.db")
    store.create_schema()
    events = history()
    rng = random.Random(3)
    shuffled = events + rng.sample(events, 300)
    rng.shuffle(shuffled)
    for i in range(0, len(shuffled), 97):
        store.apply_batch(shuffled[i : i + 97], published=True)
    yield store
    store.close()


def test_replay_from_the_events_table_gives_the_live_checksum(source: SqlStore, db_url: str, tmp_path: Path) -> None:
    # Given a host's store, and an empty SQLite or Postgres database
    live = source.checksum()
    target = open_target(db_url)
    seen: list[tuple[int, int | None]] = []
    try:
        # When its events table is replayed into it
        result = replay_from_sql(source, target, batch=500, progress=lambda d, t: seen.append((d, t)))
        # Then the rebuilt items table has the live checksum, and progress went up to every event
        assert result.checksum == live == target.checksum()
        total = source.counts()["events"]
        assert result.events == total and seen[-1] == (total, total)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        # and that store's own log (read back from SQLite or Postgres) replays to the same checksum
        again = open_target(f"sqlite:///{tmp_path}/again.db")
        try:
            assert replay_from_sql(target, again, batch=333).checksum == live
        finally:
            again.close()
    finally:
        target.close()


def test_replay_refuses_a_database_that_already_holds_items(source: SqlStore, tmp_path: Path) -> None:
    # Given a target that already holds an item
    url = f"sqlite:///{tmp_path}/busy.db"
    busy = SqlStore(url)
    busy.create_schema()
    busy.apply_batch([event("x", 1)])
    busy.close()
    # When a replay is aimed at it, then it is refused with a reason, and nothing is written
    with pytest.raises(InvalidArgument, match="empty database"):
        open_target(url)


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[EventBus]:
    b = EventBus(
        nats_url=nats_server.url,
        stream="replay_test",
        subject_prefix="mfh.replaytest",
        duplicate_window_s=120,
        max_age_s=3600,
    )
    await b.connect()
    yield b
    await b.close()


async def test_replay_from_the_stream_gives_the_same_checksum(bus: EventBus, source: SqlStore, tmp_path: Path) -> None:
    # Given every event of the log on the stream (published twice: the outbox relays after a lost PubAck)
    events = [e for _, e in source.iter_events()]
    assert await bus.publish_many(events) == [e.event_id for e in events]
    await bus.publish_many(events[:200])
    target = open_target(f"sqlite:///{tmp_path}/from-stream.db")
    try:
        # When the stream is replayed into an empty database
        result = await replay_from_stream(bus, target, batch=700)
    finally:
        target.close()
    # Then it has the live checksum of the store the events came from
    assert result.events == len(events)
    assert result.checksum == source.checksum()


def test_mfh_replay_prints_the_checksum_mfh_checksum_prints(
    source: SqlStore, tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a host whose database is the source store
    host = make_host(tmp_path, name="pc2", redis_url=redis_url, database_url=source.url)
    where = ["--host", "pc2", "--config-dir", str(host.config_dir)]
    # When `mfh checksum` and `mfh replay --into <empty db>` run
    assert mfh([*where, "checksum"]) == 0
    live = capsys.readouterr().out.strip()
    assert mfh([*where, "replay", "--into", f"sqlite:///{tmp_path}/cli.db"]) == 0
    out = capsys.readouterr()
    # Then the replay prints the same checksum, with a progress bar on stderr
    assert out.out.strip() == live == source.checksum()
    assert "replay [" in out.err and "100.0%" in out.err
    # And a second replay into the same database is refused (exit 2: invalid argument)
    assert mfh([*where, "replay", "--into", f"sqlite:///{tmp_path}/cli.db"]) == 2
    assert "empty database" in capsys.readouterr().err
