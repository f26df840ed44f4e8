"""``mfh status`` and every process's metrics, on a host of real processes (issue 11).

One host runs the four Procfile processes (api, ``mfh worker --processes 2``, replicator,
scheduler) against a private Redis with an append-only file, SQLite and a private NATS, all
binding their metrics to 127.0.0.2 (a loopback address that is not the default). The tests run
in file order: green first, then one fault at a time (SQL locked, NATS down, worker stopped),
each turning the status yellow or red and naming the cause.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hosts import TestHost, make_host
from redis_server import HUB_REDIS_CONF, RedisServer
from services import NatsServer, free_port, tcp_open, wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "mfh.json"
ALERTS = ROOT / "docs" / "prometheus" / "alerts.yml"
BIND = "127.0.0.2"


@dataclass
class Host:
    host: TestHost
    ports: dict[str, int]  # role -> metrics port
    worker: subprocess.Popen[bytes]


def mfh(host: TestHost, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", *args], env=host.env, capture_output=True, text=True, timeout=60
    )


def status(host: TestHost) -> tuple[int, dict[str, Any]]:
    out = mfh(host, "status", "--json")
    assert out.stdout.strip(), out.stderr
    return out.returncode, json.loads(out.stdout)


def roles(doc: dict[str, Any]) -> list[str]:
    return sorted(p["role"] for p in doc["processes"])


def reasons(doc: dict[str, Any]) -> dict[str, str]:
    return {r["component"]: f"{r['level']}: {r['message']}" for r in doc["reasons"]}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer) -> Iterator[Host]:
    tmp = tmp_path_factory.mktemp("status")
    redis = RedisServer(tmp, conf=HUB_REDIS_CONF).start()
    ports = {role: free_port() for role in ("api", "worker", "replicator", "scheduler")}
    host = make_host(
        tmp,
        redis_url=redis.url,
        nats_url=nats_server.url,
        overrides={
            "storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"},
            "server": {"bind": BIND, "metrics_port": ports["api"]},
            "metrics": {
                "worker_port": ports["worker"],
                "replicator_port": ports["replicator"],
                "scheduler_port": ports["scheduler"],
            },
        },
    )
    zmq_port, grpc_port = free_port(), free_port()
    api = host.spawn("mfh_api.cli", "api", "--zmq-port", str(zmq_port), "--grpc-port", str(grpc_port), log_name="api")
    try:
        # The api first: it creates the schema; the others then start together.
        wait_until(lambda: api.poll() is None and tcp_open(BIND, grpc_port), 60, message=f"api up\n{host.log('api')}")
        worker = host.spawn("mfh_api.cli", "worker", "--processes", "2", "--threads", "2", log_name="worker")
        host.spawn("mfh_api.cli", "replicator", log_name="replicator")
        host.spawn("mfh_api.cli", "scheduler", log_name="scheduler")
        put = mfh(
            host,
            "put",
            "ns",
            "k1",
            '{"content": "hello"}',
            "--endpoint",
            f"{BIND}:{grpc_port}",
            "--persisted",
            "--timeout",
            "30",
        )
        assert put.returncode == 0, put.stderr + host.log("api") + host.log("worker")
        yield Host(host, ports, worker)
    finally:
        host.stop_all()
        redis.kill()


def test_a_healthy_host_is_green(running: Host) -> None:
    # Given the four processes of a host, up  When an operator runs mfh status
    def all_up() -> tuple[int, dict[str, Any]] | None:
        code, doc = status(running.host)
        want = ["api", "replicator", "scheduler", "worker", "worker"]
        return (code, doc) if roles(doc) == want and doc["status"] == "green" else None

    code, doc = wait_until(all_up, 60, interval=0.5, message="all processes up and green")
    text = mfh(running.host, "status")
    # Then it is green with exit 0, every process with its version and uptime, and fits 80 columns
    assert code == 0 and text.returncode == 0, text.stdout
    assert "GREEN" in text.stdout.splitlines()[0]
    assert all(len(line) <= 80 for line in text.stdout.splitlines()), text.stdout
    for role in ("api", "worker", "replicator", "scheduler"):
        assert re.search(rf"^  {role}\s+up\s+pid \d+\s+v\S+\s+up \d", text.stdout, re.M), text.stdout
    assert doc["redis"]["extra"]["persistence"] == "aof"
    assert doc["sql"]["ok"] and doc["nats"]["ok"] and doc["nats"]["extra"]["messages"] >= 1
    assert doc["write_path"]["dead_letters"] == 0 and doc["write_path"]["dirty"] == 0
    assert doc["reasons"] == []


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://{BIND}:{port}/metrics", timeout=5) as r:
        return str(r.read().decode())


_SUFFIXES = ("", "_total", "_created", "_bucket", "_sum", "_count")


def exported_names(text: str) -> set[str]:
    """Every series name a scrape can answer: declared families (even with no samples yet) and samples."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            family = line.split()[2]
            names.update(family + s for s in _SUFFIXES)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def named_metrics() -> set[str]:
    """The mfh_* metric names the dashboard's queries and the alert rules use."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load(ALERTS.read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {m for e in exprs for m in re.findall(r"\bmfh_[a-z0-9_]+", e)}


def test_every_process_serves_metrics_on_the_configured_bind(running: Host) -> None:
    # Given the running host  When each process's metrics port is scraped on the configured bind
    scrapes = {}
    for role, port in running.ports.items():
        wait_until(lambda p=port: tcp_open(BIND, p), 30, message=f"{role} metrics on {BIND}:{port}")
        scrapes[role] = _scrape(port)
    # Then each says which process it is, and the worker's counts both worker processes
    for role, text in scrapes.items():
        assert re.search(rf'^mfh_processes\{{role="{role}",version="[^"]+"\}} ', text, re.M), (role, text[:2000])
    workers = re.search(r'^mfh_processes\{role="worker",version="[^"]+"\} (\S+)', scrapes["worker"], re.M)
    assert workers is not None and float(workers.group(1)) == 2.0, scrapes["worker"][:3000]
    # and the worker's batches from both processes are summed in one endpoint
    assert re.search(r'^mfh_persist_batches_total\{result="ok"\} [1-9]', scrapes["worker"], re.M)
    # and the scheduler samples the write path (queue depth, dead letters, dirty entries)
    for name in ("mfh_queue_depth", "mfh_dead_letters", "mfh_dirty_oldest_age_seconds", "mfh_last_audit_ok"):
        assert re.search(rf"^{name}(\{{[^}}]*\}})? ", scrapes["scheduler"], re.M), name
    # and every metric the dashboard and the alerts name is exported by some process
    exported = set().union(*(exported_names(t) for t in scrapes.values()))
    named = named_metrics()
    assert len(named) >= 15, named
    assert named <= exported, f"named but not exported: {sorted(named - exported)}"


def test_sql_locked_turns_red_naming_it(running: Host) -> None:
    # Given another connection holding the write lock of the host's SQLite file
    path = running.host.settings.storage.sqlite_path
    holder = sqlite3.connect(path, isolation_level=None, timeout=5)
    holder.execute("BEGIN IMMEDIATE")
    try:
        # When the operator runs mfh status
        code, doc = status(running.host)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # Then it is red, exit 1, and says SQL is locked
    assert code == 1 and doc["status"] == "red", doc["reasons"]
    assert reasons(doc)["sql"].startswith("red:") and "locked" in reasons(doc)["sql"]
    assert doc["sql"]["state"] == "locked"


def test_nats_down_turns_yellow_naming_it(running: Host, nats_server: NatsServer) -> None:
    # Given NATS stopped
    nats_server.stop()
    try:
        # When the operator runs mfh status
        code, doc = status(running.host)
        text = mfh(running.host, "status").stdout
    finally:
        nats_server.start()
    # Then it is yellow (writes still work, events wait in the outbox), exit 0, naming NATS
    assert doc["status"] == "yellow" and code == 0, doc["reasons"]
    assert reasons(doc)["nats"].startswith("yellow:") and "outbox" in reasons(doc)["nats"]
    assert "YELLOW" in text.splitlines()[0] and "nats" in text.splitlines()[0]
    # and once NATS is back the host is green again
    wait_until(lambda: status(running.host)[1]["status"] == "green", 60, interval=0.5, message="green again")


def test_worker_stopped_turns_red_naming_it(running: Host) -> None:
    # Given the host's `mfh worker` stopped (SIGTERM, as systemd or honcho stops it)
    running.worker.send_signal(signal.SIGTERM)
    assert running.worker.wait(timeout=30) == 0, running.host.log("worker")
    # When the operator runs mfh status  Then it is red, exit 1, naming the worker
    code, doc = wait_until(
        lambda: (r := status(running.host))[1]["status"] == "red" and r, 30, interval=0.5, message="red"
    )
    assert code == 1 and "worker" not in roles(doc)
    assert reasons(doc)["worker"].startswith("red:") and "not persisted" in reasons(doc)["worker"]
    text = mfh(running.host, "status").stdout
    assert re.search(r"^  worker\s+DOWN", text, re.M) and "RED" in text.splitlines()[0], text


def test_judge_names_each_finding_with_its_level() -> None:
    from mfh_core.heartbeat import ProcessRecord
    from mfh_core.probes import Probe
    from mfh_models import Settings
    from mfh_tasks.backlog import Backlog
    from mfh_tasks.health import HostHealth, judge
    from mfh_tasks.last_runs import AuditRun
    from mfh_tasks.peer_lag import PeerLag

    # Given a host whose stores answer and whose four processes run...
    now = 1_800_000_000.0
    procs = [ProcessRecord(r, "main_pc", "h", 1, "1.0", now - 60, 0, now) for r in ("api", "worker", "replicator")]
    procs.append(ProcessRecord("scheduler", "main_pc", "h", 2, "1.0", now - 60, 0, now))
    ok = Probe(True, 0.2, "", extra={"persistence": "aof"})
    h = HostHealth("main_pc", now, processes=procs, redis=ok, sql=ok, nats=ok)
    h.backlog = Backlog(0, 0, 0, 0, None, 0)
    assert judge(h, Settings()) == []
    # ...when a batch is dead-lettered, a peer lags, and the last audit disagreed
    h.backlog = Backlog(0, 0, 2, 0, None, 0)
    h.peers = [PeerLag("pc2", 9.5, now - 1)]
    h.audit = AuditRun(ok=False, checked_at=now - 3600, events=10, seconds=0.1, path="audit-latest.json")
    h.reasons = judge(h, Settings())
    # Then the audit is red (listed first), the others yellow, each naming what to do or what it means
    assert [(r.level, r.component) for r in h.reasons] == [
        ("red", "audit"),
        ("yellow", "dead letters"),
        ("yellow", "replication"),
    ]
    assert h.level == "red" and "mfh dlq" in h.reasons[1].message and "pc2" in h.reasons[2].message


def test_last_snapshot_and_audit_are_this_hosts(tmp_path: Path) -> None:
    from mfh_models import Settings
    from mfh_tasks.last_runs import last_audit, last_snapshot

    s = Settings(scheduler={"snapshot_dir": str(tmp_path)}, host_id="pc2")
    # Given no files  Then none yet
    assert last_snapshot(s) is None and last_audit(s) is None
    # Given an older unscoped snapshot, then host-scoped ones of two hosts sharing the directory
    (tmp_path / "snapshot-20250101T000000Z.jsonl.gz").write_bytes(b"x")
    assert str(last_snapshot(s)).find("snapshot-20250101T000000Z") > 0
    (tmp_path / "snapshot-main_pc-20250102T000000000Z.jsonl.gz").write_bytes(b"x")
    (tmp_path / "snapshot-pc2-20250101T000000000Z.jsonl.gz").write_bytes(b"x")
    (tmp_path / "audit-latest-main_pc.json").write_text(json.dumps({"ok": True, "checked_at": "2025-01-02T00:00:00Z"}))
    (tmp_path / "audit-latest-pc2.json").write_text(json.dumps({"ok": False, "checked_at": "2025-01-01T00:00:00Z"}))
    # Then this host's newest snapshot and its own audit are the ones read
    snap, audit = last_snapshot(s), last_audit(s)
    assert snap is not None and Path(snap.path).name == "snapshot-pc2-20250101T000000000Z.jsonl.gz"
    assert audit is not None and audit.ok is False and audit.checked_at == 1735689600.0
