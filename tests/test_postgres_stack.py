"""The whole stack on Postgres by the URL the docs show (``POSTGRES_URL=postgresql://...``), as real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hosts import TestHost, make_host
from services import NatsServer, free_port, tcp_open, wait_until

from mfh_core import SqlStore


@pytest.fixture
def pg_host(
    tmp_path: Path, redis_url: str, postgres_url: str, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestHost]:
    host = make_host(
        tmp_path,
        redis_url=redis_url,
        nats_url=nats_server.url,
        overrides={"server": {"grpc_port": free_port(), "zmq_port": free_port()}},
    )
    # The store comes from default.yaml's ${POSTGRES_URL:}, as in the README: the host file names none.
    host_file = host.config_dir / f"{host.name}.yaml"
    data = yaml.safe_load(host_file.read_text())
    del data["storage"]["postgres_url"], data["storage"]["sqlite_path"]
    host_file.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("POSTGRES_URL", postgres_url)
    yield host
    host.stop_all()


def mfh(host: TestHost, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", *args],
        env=host.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def logs(host: TestHost) -> str:
    return "\n".join(f"--- {n}\n{host.log(n)}" for n in ("api", "worker", "replicator", "scheduler"))


def test_api_worker_replicator_and_scheduler_run_on_the_plain_postgresql_url(
    pg_host: TestHost, postgres_url: str, postgres_url_b: str
) -> None:
    host = pg_host
    assert postgres_url.startswith("postgresql://") and "+" not in postgres_url.split("://")[0]
    shown = json.loads(mfh(host, "config", "show", "--format", "json").stdout)
    assert shown["storage"]["postgres_url"] == postgres_url
    # Given the four processes of a host on a fresh database
    procs = {
        name: host.spawn("mfh_api.cli", *argv, log_name=name)
        for name, argv in (
            ("api", ["api"]),
            ("worker", ["worker", "--processes", "1", "--threads", "2"]),
            ("replicator", ["replicator"]),
            ("scheduler", ["scheduler"]),
        )
    }
    port = host.settings.server.grpc_port
    wait_until(lambda: tcp_open("127.0.0.1", port), 60, message=f"api on {port}\n{logs(host)}")
    # When writes go through the api and are persisted
    for i in range(3):
        out = mfh(host, "put", "ns", f"k{i}", json.dumps({"content": f"v{i}"}), "--persisted")
        assert out.returncode == 0, out.stderr + logs(host)
    assert mfh(host, "delete", "ns", "k0").returncode == 0
    sql = SqlStore(postgres_url)
    try:
        wait_until(lambda: sql.counts()["events"] == 4, 30, message=f"delete persisted\n{logs(host)}")
        # and the worker published them (NATS up: the outbox empties)
        wait_until(lambda: sql.counts()["unpublished"] == 0, 30, message=f"published\n{logs(host)}")
        live = sql.checksum()
    finally:
        sql.close()
    # Then every process is still running, none logged a traceback
    for name, p in procs.items():
        assert p.poll() is None, f"{name} exited with {p.returncode}\n{logs(host)}"
    assert "Traceback" not in logs(host) and "No module named" not in logs(host), logs(host)
    # And the operator's commands work against that store by the same URL
    checksum = mfh(host, "checksum")
    assert checksum.returncode == 0 and checksum.stdout.strip() == live, checksum.stderr
    audit = mfh(host, "audit", "--json")
    assert audit.returncode == 0 and json.loads(audit.stdout)["ok"] is True, audit.stderr
    snapshot = mfh(host, "snapshot")
    assert snapshot.returncode == 0 and f"snapshot-{host.name}-" in snapshot.stdout, snapshot.stderr
    replay = mfh(host, "replay", "--into", postgres_url_b, "--quiet")
    assert replay.returncode == 0 and replay.stdout.strip() == live, replay.stderr
    status = mfh(host, "db", "status")
    assert status.returncode == 0 and "at revision" in status.stdout, status.stderr


def test_every_spelling_of_a_postgres_url_opens_the_store(postgres_url: str) -> None:
    rest = postgres_url.split("://", 1)[1]
    for scheme in ("postgresql", "postgres", "postgresql+psycopg2"):
        store = SqlStore(f"{scheme}://{rest}")
        try:
            store.create_schema()
            assert store.counts()["items"] == 0
        finally:
            store.close()


def test_another_postgres_driver_is_refused_with_the_url_to_use() -> None:
    from mfh_models import InvalidArgument

    with pytest.raises(InvalidArgument, match=r"use postgresql://"):
        SqlStore("postgresql+asyncpg://u:secret@127.0.0.1/db")
