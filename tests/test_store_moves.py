"""Moving a host's data: ``mfh migrate``, the warning for an empty store, and paths that ignore the cwd."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from factories import event, payload
from hosts import make_host
from services import NatsServer
from test_eventbus import new_bus

from mfh_api.service import build_service
from mfh_core import SqlStore
from mfh_models import Kind, Op, default_config_dir, load_settings
from mfh_tasks import build_hot_store
from mfh_tasks.runtime import warn_if_store_switched

_OURS = ("MFH_DATA_DIR", "MFH_CONFIG_DIR", "MFH_HOST", "MFH_SQLITE", "POSTGRES_URL", "XDG_DATA_HOME")


def mfh(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
        check=False,
    )


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _OURS}
    env.update(extra)
    return env


def test_mfh_migrate_copies_a_sqlite_store_into_postgres_by_its_plain_url(tmp_path: Path, postgres_url: str) -> None:
    # Given a SQLite store with puts, a delete, two origins and events not yet on JetStream
    source_url = f"sqlite:///{tmp_path}/main_pc.db"
    source = SqlStore(source_url)
    source.create_schema()
    source.apply_batch([event(f"k{i}", i + 1) for i in range(40)], published=True)
    source.apply_batch([event("k1", 100, op=Op.DELETE), event("k2", 101, origin="pc2"), event("k3", 102)])
    want_checksum, want_counts = source.checksum(), source.counts()
    want_log = [(e.event_id, e.version) for _, e in source.iter_events()]
    want_outbox = [e.event_id for _, e in source.unpublished()]
    source.close()
    assert len(want_outbox) == 3
    assert postgres_url.startswith("postgresql://")
    # When the operator copies it into an empty Postgres database (small batches: the bar moves)
    out = mfh("migrate", "--from", source_url, "--to", postgres_url, "--batch", "10", env=clean_env())
    # Then the command reports matching checksums, with progress on stderr and the checksum on stdout
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want_checksum
    assert "migrate [" in out.stderr and "checksums match" in out.stderr
    # And the target holds the same items, the same log in the same order, the same outbox
    target = SqlStore(postgres_url)
    try:
        assert target.checksum() == want_checksum and target.counts() == want_counts
        assert [(e.event_id, e.version) for _, e in target.iter_events()] == want_log
        assert [e.event_id for _, e in target.unpublished()] == want_outbox
    finally:
        target.close()
    # And a second copy into the now non-empty target is refused with one line, changing nothing
    again = mfh("migrate", "--from", source_url, "--to", postgres_url, "--quiet", env=clean_env())
    assert again.returncode == 2 and "empty database" in again.stderr and again.stderr.count("\n") == 1, again.stderr


async def test_an_empty_sql_store_beside_a_redis_with_data_warns_at_start(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a host whose Redis has taken writes (SQLite held them), now pointed at a brand-new store
    old = make_host(tmp_path / "old", redis_url=redis_url)
    hot = build_hot_store(old.settings)
    await hot.stage(op=Op.PUT, namespace="ns", key="k", kind=Kind.MEMORY_ITEM, payload=payload("x"))
    await hot.close()
    switched = make_host(tmp_path / "new", redis_url=redis_url)
    # When its api starts
    with caplog.at_level(logging.WARNING, logger="mfh.store"):
        service = await build_service(switched.settings)
        await service.close()
    # Then it logs one loud warning naming the way out
    (warning,) = [r for r in caplog.records if r.name == "mfh.store"]
    assert "SQL STORE IS EMPTY" in warning.getMessage() and "mfh migrate" in warning.getMessage()


async def test_a_new_host_with_an_empty_redis_and_store_does_not_warn(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    host = make_host(tmp_path, redis_url=redis_url)
    with caplog.at_level(logging.WARNING, logger="mfh.store"):
        service = await build_service(host.settings)
        await service.close()
    assert [r for r in caplog.records if r.name == "mfh.store"] == []


async def test_an_empty_sql_store_while_the_stream_holds_the_host_s_events_warns(
    tmp_path: Path, redis_url: str, nats_server: NatsServer
) -> None:
    host = make_host(tmp_path, redis_url=redis_url)
    sql = SqlStore(host.settings.storage.database_url)
    sql.create_schema()
    bus = new_bus(nats_server.url)
    await bus.connect()
    try:
        # Another host's events on the stream say nothing about this one
        assert await bus.publish(event("k", 1, origin="pc2"))
        assert await warn_if_store_switched(host.settings, sql, bus=bus) is None
        # This host's own events do
        assert await bus.publish(event("k", 2, origin=host.settings.host_id))
        message = await warn_if_store_switched(host.settings, sql, bus=bus)
        assert message is not None and "the stream holds 1 events it published" in message
        # And a store that has data is not empty: no warning
        sql.apply_batch([event("k", 2)])
        assert await warn_if_store_switched(host.settings, sql, bus=bus) is None
    finally:
        await bus.close()
        sql.close()


def test_commands_read_and_write_under_the_data_dir_from_any_directory(tmp_path: Path) -> None:
    # Given a host whose configuration names relative data paths, and its store under the data dir
    cdir = tmp_path / "config"
    cdir.mkdir()
    (cdir / "default.yaml").write_text((default_config_dir() / "default.yaml").read_text())
    host = {
        "storage": {"sqlite_path": "h.db"},
        "scheduler": {"snapshot_dir": "snaps"},
        "replication": {"enabled": False},
    }
    (cdir / "h.yaml").write_text(yaml.safe_dump(host))
    data = tmp_path / "data"
    store = SqlStore(f"sqlite:///{data}/h.db")
    store.create_schema()
    store.apply_batch([event("a", 1), event("b", 2)])
    want = store.checksum()
    store.close()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = clean_env(MFH_DATA_DIR=str(data), MFH_CONFIG_DIR=str(cdir), MFH_HOST="h")
    # When checksum and snapshot run from another directory
    out = mfh("checksum", env=env, cwd=elsewhere)
    assert out.returncode == 0 and out.stdout.strip() == want, out.stderr
    snap = mfh("snapshot", env=env, cwd=elsewhere)
    assert snap.returncode == 0, snap.stderr
    # Then they read the right store, write under the data dir, and leave the cwd untouched
    assert Path(snap.stdout.strip()).parent == data / "snaps"
    assert list(elsewhere.iterdir()) == []


def test_the_packaged_configuration_and_default_data_dir_serve_a_command_run_anywhere(tmp_path: Path) -> None:
    # Given no config dir, no data dir: only HOME (as for a user who pip-installed the hub)
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    env = clean_env(HOME=str(home))
    out = mfh("config", "show", "--format", "json", env=env, cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    data = home / ".local" / "share" / "mfh"
    assert shown["data_dir"] == str(data) and shown["storage"]["sqlite_path"] == str(data / "main_pc.db")
    assert shown["scheduler"]["snapshot_dir"] == str(data / "snapshots")
    assert list(elsewhere.iterdir()) == []
    assert load_settings(env={"HOME": str(home)}).storage.sqlite_path == str(data / "main_pc.db")


def test_a_bad_audit_cron_fails_config_show_with_one_line(tmp_path: Path) -> None:
    cdir = tmp_path / "config"
    cdir.mkdir()
    (cdir / "default.yaml").write_text((default_config_dir() / "default.yaml").read_text())
    (cdir / "h.yaml").write_text("scheduler:\n  audit_cron: '61 3 * * *'\n")
    out = mfh("config", "show", env=clean_env(MFH_CONFIG_DIR=str(cdir), MFH_HOST="h"))
    assert out.returncode == 2, out.stdout
    assert out.stderr.count("\n") == 1 and "scheduler.audit_cron" in out.stderr and "Traceback" not in out.stderr
