"""A corrupt or missing SQLite file: reported as such (file named, exit code 7, never 5 "worth retrying"),
and the long-running processes wait for it with one clear line instead of dying (honcho would stop the host)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from factories import event
from hosts import make_host
from services import NatsServer, wait_until

from mfh_api.cli import main as mfh
from mfh_core import SqlStore
from mfh_models import StoreDamaged


def _garble(path: Path) -> None:
    path.write_bytes(b"this is not a database, just garbage " * 200)
    for extra in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        extra.unlink(missing_ok=True)


def test_a_corrupt_sqlite_file_gives_its_own_error_and_exit_code(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a host whose SQLite file has garbage written over it
    host = make_host(tmp_path, redis_url=redis_url)
    db = Path(host.settings.storage.database_url.removeprefix("sqlite:///"))
    s = SqlStore(host.settings.storage.database_url)
    s.create_schema()
    s.apply_batch([event("a", 1)])
    s.close()
    _garble(db)
    where = ["--host", "main_pc", "--config-dir", str(host.config_dir)]
    # When `mfh checksum` runs
    code = mfh([*where, "checksum"])
    err = capsys.readouterr().err
    # Then it names the file, says it is corrupt, and exits 7 (not 5, "worth retrying")
    assert code == 7, err
    assert str(db) in err and "corrupt" in err
    # And the store raises StoreDamaged with the path
    store = SqlStore(host.settings.storage.database_url)
    with pytest.raises(StoreDamaged) as info:
        store.create_schema()
    store.close()
    assert info.value.path == str(db)


def test_a_missing_sqlite_file_is_reported_not_created(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a host whose SQLite file is gone
    host = make_host(tmp_path, redis_url=redis_url)
    db = Path(host.settings.storage.database_url.removeprefix("sqlite:///"))
    assert not db.exists()
    # When `mfh checksum` runs, then it exits 7 naming the file, and does not create an empty one
    assert mfh(["--host", "main_pc", "--config-dir", str(host.config_dir), "checksum"]) == 7
    err = capsys.readouterr().err
    assert str(db) in err and "missing" in err
    assert not db.exists()


def test_replicator_and_worker_wait_on_a_corrupt_store_and_recover_when_it_is_replaced(
    tmp_path: Path, redis_url: str, nats_server: NatsServer
) -> None:
    # Given a good store kept aside, and the host's file garbled
    host = make_host(tmp_path, redis_url=redis_url, nats_url=nats_server.url)
    db = Path(host.settings.storage.database_url.removeprefix("sqlite:///"))
    good = tmp_path / "good.db"
    s = SqlStore(f"sqlite:///{good}")
    s.create_schema()
    s.close()
    db.parent.mkdir(parents=True, exist_ok=True)
    _garble(db)
    # When the replicator and a worker start on it
    replicator = host.spawn("mfh_api.cli", "replicator", log_name="replicator")
    worker = host.start_worker(threads=1)
    try:
        for name in ("replicator", "worker"):
            wait_until(lambda n=name: "waiting, retrying every" in host.log(n), 60, message=f"{name}: {host.log(name)}")  # type: ignore[misc]
        # Then both stay up and say so in one JSON line naming the file
        assert replicator.poll() is None and worker.poll() is None
        for name in ("replicator", "worker"):
            lines = [json.loads(line) for line in host.log(name).splitlines() if "waiting, retrying" in line]
            assert len(lines) == 1 and str(db) in lines[0]["msg"] and lines[0]["level"] == "error"
        # And once a good store replaces the file, they carry on
        shutil.copy(good, db)
        wait_until(lambda: "sound again" in host.log("replicator"), 30, message=host.log("replicator"))
        wait_until(
            lambda: "replicator for main_pc: consumer" in host.log("replicator"), 30, message=host.log("replicator")
        )
        wait_until(lambda: "sound again" in host.log("worker"), 30, message=host.log("worker"))
        assert replicator.poll() is None and worker.poll() is None
    finally:
        host.stop_all()
