"""``mfh status`` and every process's metrics, on a host of real processes (issue 11).

Two hosts, main_pc and pc2, each run the four Procfile processes (api, worker (``--processes 2``
on main_pc), replicator, scheduler) against a Redis of their own with an append-only file, a
SQLite file of their own and one private NATS they replicate through, all binding their metrics
to 127.0.0.2 (a loopback address that is not the default). The tests run in file order: both
green with the lag from the peer first, then one fault at a time (SQL locked, NATS down, worker
stopped), each turning the status yellow or red and naming the cause.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
    endpoint: str  # its api's gRPC address
    workers: int  # worker processes


@dataclass
class Pair:
    a: Host  # main_pc, the host the fault tests break
    b: Host  # pc2, its peer


def mfh(host: TestHost, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", *args], env=host.env, capture_output=True, text=True, timeout=60
    )


def status(host: TestHost) -> tuple[int, dict[str, Any]]:
    out = mfh(host, "status", "--json")
    assert out.stdout.strip(), out.stderr
    return out.returncode, json.loads(out.stdout)


def reports(*hosts: TestHost) -> list[tuple[int, dict[str, Any], subprocess.CompletedProcess[str]]]:
    """``mfh status --json`` and ``mfh status`` on each host, all at once (each start-up costs seconds when loaded)."""
    with ThreadPoolExecutor() as pool:
        docs = [pool.submit(status, h) for h in hosts]
        texts = [pool.submit(mfh, h, "status") for h in hosts]
        return [(*d.result(), t.result()) for d, t in zip(docs, texts, strict=True)]


def health(host: TestHost) -> dict[str, Any]:
    """What ``mfh status --json`` prints, gathered in this process: for awaiting a state cheaply."""
    from mfh_tasks.health import gather

    return asyncio.run(gather(host.settings)).as_dict()


def roles(doc: dict[str, Any]) -> list[str]:
    return sorted(p["role"] for p in doc["processes"])


def reasons(doc: dict[str, Any]) -> dict[str, str]:
    return {r["component"]: f"{r['level']}: {r['message']}" for r in doc["reasons"]}


def peers(doc: dict[str, Any]) -> list[str]:
    return [p["origin"] for p in doc["replication"]["peers"]]


def want_roles(h: Host) -> list[str]:
    return sorted(["api", "replicator", "scheduler"] + ["worker"] * h.workers)


def _configure(tmp: Path, name: str, redis_url: str, nats_url: str) -> tuple[TestHost, dict[str, int]]:
    ports = {role: free_port() for role in ("api", "worker", "replicator", "scheduler")}
    host = make_host(
        tmp,
        name=name,
        redis_url=redis_url,
        nats_url=nats_url,
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
    return host, ports


def put(h: Host, key: str) -> None:
    out = mfh(
        h.host, "put", "ns", key, '{"content": "hello"}', "--endpoint", h.endpoint, "--persisted", "--timeout", "30"
    )
    assert out.returncode == 0, out.stderr + h.host.log("api") + h.host.log("worker")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, nats_server: NatsServer) -> Iterator[Pair]:
    """Two hosts, main_pc (``mfh worker --processes 2``) and pc2, each with its own Redis and SQLite, one NATS."""
    tmp = tmp_path_factory.mktemp("status")
    redises = [RedisServer(tmp, conf=HUB_REDIS_CONF).start(), RedisServer(tmp, conf=HUB_REDIS_CONF).start()]
    made = [_configure(tmp, name, r.url, nats_server.url) for name, r in zip(("main_pc", "pc2"), redises, strict=True)]
    grpc = [free_port(), free_port()]
    apis = [
        host.spawn("mfh_api.cli", "api", "--zmq-port", str(free_port()), "--grpc-port", str(port), log_name="api")
        for (host, _), port in zip(made, grpc, strict=True)
    ]
    try:
        # The api first: it creates the schema; the others then start together.
        for (host, _), api, port in zip(made, apis, grpc, strict=True):
            wait_until(lambda a=api, p=port: a.poll() is None and tcp_open(BIND, p), 60, message=f"{host.name} api up")
        hosts = []
        for (host, ports), port, n in zip(made, grpc, (2, 1), strict=True):
            worker = host.spawn("mfh_api.cli", "worker", "--processes", str(n), "--threads", "2", log_name="worker")
            host.spawn("mfh_api.cli", "replicator", log_name="replicator")
            host.spawn("mfh_api.cli", "scheduler", log_name="scheduler")
            hosts.append(Host(host, ports, worker, f"{BIND}:{port}", n))
        # Every process up, and each replicator's consumer on the stream, before the first write:
        # an event that waits for a replicator to start would count its start-up as lag.
        for h in hosts:
            wait_until(
                lambda h=h: (doc := health(h.host)) and roles(doc) == want_roles(h) and doc["replication"]["consumer"],
                60,
                interval=0.5,
                message=f"{h.host.name}: every process up, its replicator consuming",
            )
        for i, h in enumerate(hosts):
            put(h, f"k{i}")
        yield Pair(*hosts)
    finally:
        for host, _ in made:
            host.stop_all()
        for r in redises:
            r.kill()


@pytest.fixture(scope="module")
def running(pair: Pair) -> Host:
    return pair.a


def test_a_healthy_two_host_setup_is_green_with_lag_per_peer(pair: Pair) -> None:
    # Given two hosts, each with its four processes up, that have each written once
    for h, peer in ((pair.a, pair.b), (pair.b, pair.a)):

        def green(h: Host = h, peer: Host = peer) -> bool:
            doc = health(h.host)
            return roles(doc) == want_roles(h) and doc["status"] == "green" and peers(doc) == [peer.host.name]

        wait_until(green, 60, interval=0.2, message=f"{h.host.name} green, lag from {peer.host.name}")
    # When an operator runs mfh status on each
    seen = reports(pair.a.host, pair.b.host)
    for (h, peer), (code, doc, text) in zip(((pair.a, pair.b), (pair.b, pair.a)), seen, strict=True):
        out = text.stdout
        # Then it is green with exit 0, every process with its version and uptime, and fits 80 columns
        assert code == 0 and text.returncode == 0, out
        assert "GREEN" in out.splitlines()[0] and h.host.name in out.splitlines()[0]
        assert all(len(line) <= 80 for line in out.splitlines()), out
        for role in ("api", "worker", "replicator", "scheduler"):
            assert re.search(rf"^  {role}\s+up\s+pid \d+\s+v\S+\s+up \d", out, re.M), out
        assert doc["host_id"] == h.host.name and doc["redis"]["extra"]["persistence"] == "aof"
        assert doc["sql"]["ok"] and doc["nats"]["ok"] and doc["nats"]["extra"]["messages"] >= 2
        assert doc["write_path"]["dead_letters"] == 0 and doc["write_path"]["dirty"] == 0
        assert doc["reasons"] == []
        # and the replication lag from the peer host, measured on the event it applied
        (lag,) = doc["replication"]["peers"]
        assert lag["origin"] == peer.host.name and 0 <= lag["lag_s"] < 5, lag
        assert re.search(rf"^  from {peer.host.name}\s+lag \d+ ms", out, re.M), out


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


def test_nats_down_turns_both_hosts_yellow_naming_it(pair: Pair, nats_server: NatsServer) -> None:
    # Given the NATS both hosts replicate through, stopped
    nats_server.stop()
    try:
        # When the operator runs mfh status on each host
        seen = reports(pair.a.host, pair.b.host)
    finally:
        nats_server.start()
    # Then each is yellow (writes still work, events wait in the outbox), exit 0, naming NATS
    for code, doc, out in seen:
        text = out.stdout
        assert doc["status"] == "yellow" and code == 0, (doc["host_id"], doc["reasons"])
        assert reasons(doc)["nats"].startswith("yellow:") and "outbox" in reasons(doc)["nats"]
        assert "YELLOW" in text.splitlines()[0] and "nats" in text.splitlines()[0], text
    # and once NATS is back both hosts are green again
    for h in (pair.a, pair.b):
        wait_until(lambda h=h: health(h.host)["status"] == "green", 60, interval=0.5, message="green again")


def test_worker_stopped_turns_its_host_red_naming_it(pair: Pair) -> None:
    running = pair.a
    # Given main_pc's `mfh worker` stopped (SIGTERM, as systemd or honcho stops it)
    running.worker.send_signal(signal.SIGTERM)
    assert running.worker.wait(timeout=30) == 0, running.host.log("worker")
    # When the operator runs mfh status  Then it is red, exit 1, naming the worker
    wait_until(lambda: health(running.host)["status"] == "red", 30, interval=0.2, message="red")
    (code, doc, out), (peer_code, peer_doc, _) = reports(running.host, pair.b.host)
    assert code == 1 and "worker" not in roles(doc)
    assert reasons(doc)["worker"].startswith("red:") and "not persisted" in reasons(doc)["worker"]
    text = out.stdout
    assert re.search(r"^  worker\s+DOWN", text, re.M) and "RED" in text.splitlines()[0], text
    # and the peer host, whose worker runs, stays green: each host's status is its own
    assert peer_code == 0 and peer_doc["status"] == "green", peer_doc["reasons"]
    assert roles(peer_doc) == want_roles(pair.b)


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


def test_a_heartbeat_record_reads_back_with_or_without_what_its_role_adds() -> None:
    import json as _json

    from mfh_core.heartbeat import ProcessRecord

    # Given a front's record (its replicas in extra) and one written by an older process (no data_dir, no extra)
    front = ProcessRecord("front", "main_pc", "h", 7, "1.0", 1.0, 9718, 2.0, "/d", {"replicas": [{"live": True}]})
    older = {k: v for k, v in _json.loads(front.to_json()).items() if k not in ("data_dir", "extra")}
    # Then both read back (mfh status lists every process, old and new)
    assert ProcessRecord.from_json(front.to_json()) == front
    assert ProcessRecord.from_json(_json.dumps(older)).extra == {}
