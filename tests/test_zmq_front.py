"""``mfh front``: one ZeroMQ door on the host's port for two api replicas, and the failover drill.

Real processes (two ``mfh api``, one ``mfh front``) on a real Redis. The gRPC half of the drill
(a client given both replicas' gRPC endpoints keeps going when one is killed) is
tests/test_failover.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
from hosts import TestHost, make_host
from services import free_port, tcp_open, wait_until

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-payload-marker"


@dataclass
class Hub:
    """Two api replicas of one host and the front before them."""

    replicas: list[TestHost]
    front: TestHost
    api_procs: list[Any] = field(default_factory=list)
    front_proc: Any = None

    @property
    def endpoints(self) -> list[str]:
        return [f"tcp://127.0.0.1:{h.settings.server.zmq_port}" for h in self.replicas]

    @property
    def door(self) -> str:
        return f"tcp://127.0.0.1:{self.front.settings.server.zmq_port}"

    def start_api(self, i: int) -> None:
        h = self.replicas[i]
        proc = h.spawn("mfh_api.app", log_name="api")
        if i < len(self.api_procs):
            self.api_procs[i] = proc
        else:
            self.api_procs.append(proc)
        port = h.settings.server.zmq_port
        wait_until(lambda: tcp_open("127.0.0.1", port), 30, message=f"api on {port}\n{h.log('api')}")

    def start_front(self, endpoints: list[str] | None = None) -> None:
        args = [a for e in (endpoints or self.endpoints) for a in ("--replica", e)]
        self.front_proc = self.front.spawn("mfh_api.cli", "front", *args, log_name="front")
        port = self.front.settings.server.zmq_port
        wait_until(lambda: tcp_open("127.0.0.1", port), 30, message=f"front on {port}\n{self.front.log('front')}")

    def metrics(self) -> str:
        port = self.front.settings.metrics.front_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        return _metric(self.metrics(), name, labels)

    def live(self) -> float:
        return self.metric("mfh_front_replicas_live")

    def replica_metric(self, i: int, name: str, **labels: str) -> float:
        port = self.replicas[i].settings.server.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return _metric(r.read().decode(), name, labels)


def _metric(text: str, name: str, labels: dict[str, str]) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name + (f"{{{want}}}" if want else "")) + r" ([0-9.e+-]+)$"
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def _host(
    tmp_path: Path,
    name: str,
    redis_url: str,
    shared: dict[str, Any],
    server: dict[str, Any],
    front: dict[str, Any] | None = None,
) -> TestHost:
    overrides = {**shared, "server": server, "metrics": {"front_port": free_port()}, "front": front or {}}
    return make_host(
        tmp_path / name, redis_url=redis_url, database_url=f"sqlite:///{tmp_path}/shared.db", overrides=overrides
    )


def build_hub(
    tmp_path: Path, redis_url: str, server: dict[str, Any] | None = None, front: dict[str, Any] | None = None
) -> Hub:
    """Two api replicas of one host (same Redis, SQLite file and queue, metrics on ports of their own) and a front
    config (``front``: its settings), nothing started."""
    shared = {
        "storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"},
        "write_behind": {"queue_name": f"t_{uuid.uuid4().hex[:8]}"},
    }
    extra = server or {}
    replicas = [
        _host(
            tmp_path,
            n,
            redis_url,
            shared,
            {"zmq_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port(), **extra},
        )
        for n in "ab"
    ]
    door = _host(
        tmp_path, "front", redis_url, shared, {"zmq_port": free_port(), "max_message_bytes": 65536, **extra}, front
    )
    return Hub(replicas=replicas, front=door)


@pytest.fixture
def hub(tmp_path: Path, redis_url: str) -> Iterator[Hub]:
    h = build_hub(tmp_path, redis_url)
    yield h
    for t in [h.front, *h.replicas]:
        t.stop_all()


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A ZeroMQ context destroyed (every socket closed, linger 0) even when the test fails: a context left
    to the garbage collector with a socket open blocks in term(), in whatever test is running then."""
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.destroy(linger=0)


Ctx = zmq.Context[zmq.Socket[bytes]]


class V0Agent:
    """A legacy agent: one REQ socket on the host's one address, flat v0 JSON, no retries of its own."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, identity: bytes) -> None:
        self.sock = ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.ROUTING_ID, identity)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        self.sock.connect(endpoint)

    def ask(self, **fields: Any) -> dict[str, Any]:
        self.sock.send(json.dumps(fields).encode())
        reply: dict[str, Any] = json.loads(self.sock.recv())
        return reply


def _replica_of(hub: Hub) -> int:
    """The replica that took this agent's requests (the front's per-replica counter)."""
    sent = [hub.metric("mfh_front_sent_total", replica=e) for e in hub.endpoints]
    return max(range(len(sent)), key=lambda i: sent[i])


def test_failover_drill_v0_agent_sees_no_error_when_its_replica_is_killed(hub: Hub, ctx: Ctx) -> None:
    # Given two api replicas behind the front, both in its rotation
    hub.start_api(0)
    hub.start_api(1)
    hub.start_front()
    wait_until(lambda: hub.live() == 2, 10, message=f"both replicas live\n{hub.front.log('front')}")
    agent = V0Agent(ctx, hub.door, b"legacy-agent-1")
    acked: dict[str, int] = {}
    errors: list[dict[str, Any]] = []
    latencies: list[float] = []
    done = 0
    kill_at: list[float] = []

    def run() -> None:
        nonlocal done
        for i in range(500):  # 1,000 calls: a store and a retrieve each
            key = f"drill-{i}"
            started = time.monotonic()
            put = agent.ask(action="store", key=key, value={"content": f"note {i}"}, request_id=f"w{i}")
            latencies.append(time.monotonic() - started)
            if put.get("status") != "success":
                errors.append(put)
                continue
            acked[key] = put["version"]
            started = time.monotonic()
            got = agent.ask(action="retrieve", key=key, request_id=f"r{i}")
            latencies.append(time.monotonic() - started)
            if got.get("status") != "success" or got["version"] < put["version"]:
                errors.append(got)
            done = i + 1

    worker = threading.Thread(target=run)
    worker.start()
    try:
        # When the replica serving the agent is SIGKILLed mid-run
        wait_until(lambda: done >= 150, 60, message="calls before the kill")
        victim = _replica_of(hub)
        kill_at.append(time.monotonic())
        TestHost.kill(hub.api_procs[victim])
        # Then the front drops it from its rotation within a second (its metric says so)
        wait_until(
            lambda: hub.metric("mfh_front_replica_up", replica=hub.endpoints[victim]) == 0,
            5,
            interval=0.005,
            message="the dead replica out of rotation",
        )
        dropped_after = time.monotonic() - kill_at[0]
        assert dropped_after < 1.0, f"dead replica dropped after {dropped_after:.3f} s"
        assert hub.metric("mfh_front_failovers_total", replica=hub.endpoints[victim]) >= 1
    finally:
        worker.join(timeout=120)
    assert not worker.is_alive()
    # and the agent saw no error, at its 1,000 calls
    assert errors == [], errors[:3]
    assert done == 500 and len(latencies) == 1000
    resent = hub.metric("mfh_front_requests_total", outcome="resent")
    lost = hub.metric("mfh_front_requests_total", outcome="lost")
    print(
        f"drill: errors {len(errors)}, resent {resent:g}, lost {lost:g}, dropped after {dropped_after * 1000:.0f} ms, "
        f"max latency {max(latencies) * 1000:.0f} ms"
    )
    assert lost == 0
    # and every acknowledged write is readable afterwards, at its version or newer
    for key, version in acked.items():
        got = agent.ask(action="retrieve", key=key)
        assert got["status"] == "success" and got["version"] >= version, got
    # and the killed replica is back in rotation once it answers again
    hub.start_api(victim)
    wait_until(lambda: hub.live() == 2, 15, message="the restarted replica back in rotation")
    agent.sock.close()
    # and the front stops cleanly on SIGTERM, with nothing of the payloads in its log
    hub.front_proc.send_signal(signal.SIGTERM)
    assert hub.front_proc.wait(timeout=20) == 0, hub.front.log("front")
    assert "note 1" not in hub.front.log("front")


def test_a_hung_replica_is_dropped_by_its_silence_and_its_reads_go_elsewhere(hub: Hub, ctx: Ctx) -> None:
    # Given two replicas behind the front and an agent reading through it
    hub.start_api(0)
    hub.start_api(1)
    hub.start_front()
    wait_until(lambda: hub.live() == 2, 10, message="both replicas live")
    agent = V0Agent(ctx, hub.door, b"reader")
    for i in range(10):
        assert agent.ask(action="store", key=f"h{i}", value={"content": "x"})["status"] == "success"
    errors: list[dict[str, Any]] = []
    reads = [0]
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            reply = agent.ask(action="retrieve", key=f"h{reads[0] % 10}")
            if reply["status"] != "success":
                errors.append(reply)
            reads[0] += 1

    worker = threading.Thread(target=run)
    worker.start()
    victim = _replica_of(hub)
    proc = hub.api_procs[victim]
    try:
        wait_until(lambda: reads[0] >= 50, 60, message="reads before the stop")
        # When the replica serving it hangs (SIGSTOP: its connection stays up, it answers nothing)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGSTOP)
        # Then its silence takes it out of the rotation after front.dead_after_ms (1 s) and a beat
        wait_until(
            lambda: hub.metric("mfh_front_replica_up", replica=hub.endpoints[victim]) == 0,
            5,
            interval=0.005,
            message="the silent replica out of rotation",
        )
        silent_for = time.monotonic() - stopped
        assert silent_for < 1.6, f"dropped after {silent_for:.3f} s"
        at_drop = reads[0]
        wait_until(lambda: reads[0] >= at_drop + 50, 60, message="reads after the drop")
    finally:
        proc.send_signal(signal.SIGCONT)
        stop.set()
        worker.join(timeout=60)
    # and the agent saw no error: the read it held went to the other replica
    assert errors == [], errors[:3]
    assert hub.metric("mfh_front_requests_total", outcome="resent") >= 1
    # and once it answers again it is back in rotation (its answer to the re-sent read is dropped)
    wait_until(lambda: hub.live() == 2, 15, message="the woken replica back in rotation")
    print(f"hung replica dropped after {silent_for * 1000:.0f} ms")
    agent.sock.close()


def test_the_front_honours_curve_like_the_api(tmp_path: Path, redis_url: str, ctx: Ctx) -> None:
    # Given replicas and a front configured with the host's CURVE key pair
    import zmq.auth

    keys = tmp_path / "curve"
    keys.mkdir()
    public_file, secret_file = zmq.auth.create_certificates(str(keys), "server")
    hub = build_hub(tmp_path, redis_url, {"zmq_curve_secret_file": secret_file})
    try:
        hub.start_api(0)
        hub.start_front(hub.endpoints[:1])
        wait_until(lambda: hub.live() == 1, 10, message=f"the replica live over CURVE\n{hub.front.log('front')}")
        server_public, _ = zmq.auth.load_certificate(public_file)

        def ping(server_key: bytes) -> dict[str, Any] | None:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RCVTIMEO, 1500)
            s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
            s.curve_serverkey = server_key
            s.connect(hub.door)
            s.send_multipart([b"", b'{"v":1,"id":1,"action":"ping"}'])
            try:
                return dict(json.loads(s.recv_multipart()[-1]))
            except zmq.Again:
                return None
            finally:
                s.close()

        # When a client knows the server's key, it is served through the front
        assert (ping(server_public) or {}).get("data") == {"serving": True}
        # When it does not, the handshake fails and nothing answers
        assert ping(zmq.curve_keypair()[0]) is None
    finally:
        for t in [hub.front, *hub.replicas]:
            t.stop_all()


def test_requests_spread_over_the_replicas(hub: Hub, ctx: Ctx) -> None:
    # Given two replicas behind the front
    hub.start_api(0)
    hub.start_api(1)
    hub.start_front()
    wait_until(lambda: hub.live() == 2, 10, message="both replicas live")
    # When 16 agents (distinct identities) each write and read
    agents = [V0Agent(ctx, hub.door, f"agent-{n}".encode()) for n in range(16)]
    for n, a in enumerate(agents):
        assert a.ask(action="put", key=f"k{n}", value={"content": "x"})["status"] == "success"
        assert a.ask(action="get", key=f"k{n}")["status"] == "success"
    # Then both replicas served some of them (an agent stays with one replica)
    sent = [hub.metric("mfh_front_sent_total", replica=e) for e in hub.endpoints]
    assert all(s > 0 for s in sent), sent
    assert sum(sent) >= 32
    for a in agents:
        a.sock.close()


def test_a_replica_stopped_with_sigterm_costs_the_agents_no_error(hub: Hub, ctx: Ctx) -> None:
    # Given two replicas behind the front and 8 agents calling through it
    hub.start_api(0)
    hub.start_api(1)
    hub.start_front()
    wait_until(lambda: hub.live() == 2, 10, message="both replicas live")
    errors: list[dict[str, Any]] = []
    calls = [0]
    stop = threading.Event()

    def run(n: int) -> None:
        agent = V0Agent(ctx, hub.door, f"agent-{n}".encode())
        i = 0
        while not stop.is_set():
            for reply in (
                agent.ask(action="put", key=f"g{n}-{i}", value={"content": "x"}),
                agent.ask(action="get", key=f"g{n}-{i}"),
            ):
                if reply["status"] != "success":
                    errors.append(reply)
            calls[0] += 2
            i += 1
        agent.sock.close()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: calls[0] >= 200, 60, message="calls before the stop")
        # When one replica is stopped the polite way (it drains: new requests are refused UNAVAILABLE)
        hub.api_procs[0].send_signal(signal.SIGTERM)
        assert hub.api_procs[0].wait(timeout=30) == 0
        at_stop = calls[0]
        wait_until(lambda: calls[0] >= at_stop + 200, 60, message="calls after the stop")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    # Then no agent saw an error: what it refused was sent to the other replica
    assert errors == [], errors[:3]
    assert hub.metric("mfh_front_replica_up", replica=hub.endpoints[0]) == 0


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 10_000)
    s.connect(endpoint)
    return s


def test_hostile_input_through_the_front_gets_answers_and_never_a_hang(hub: Hub, ctx: Ctx) -> None:
    # Given one replica behind the front
    hub.start_api(0)
    hub.start_front(hub.endpoints[:1])
    wait_until(lambda: hub.live() == 1, 10, message="the replica live")
    d = _dealer(ctx, hub.door)

    def answer(*frames: bytes) -> dict[str, Any]:
        d.send_multipart([b"", *frames])
        reply = d.recv_multipart()
        assert reply[0] == b"", reply  # the envelope came back as it was sent
        out: dict[str, Any] = json.loads(reply[-1])
        return out

    # When a peer sends garbage, an empty body, two body frames, a bad v1 and a bad v0 request
    # Then each gets the api's normal error answer
    assert answer(b"\xff\x00 garbage " + SECRET.encode())["error"]["code"] == "INVALID_ARGUMENT"
    # (a body that shows no "v" is answered in the v0 shape, as the api answers it without a front)
    assert answer()["error_code"] == "INVALID_ARGUMENT"
    assert answer(b"{}", b"{}")["error_code"] == "INVALID_ARGUMENT"
    bad_v1 = answer(json.dumps({"v": 1, "id": 7, "action": "explode"}).encode())
    assert bad_v1["id"] == 7 and bad_v1["error"]["code"] == "INVALID_ARGUMENT"
    bad_v0 = answer(json.dumps({"action": "store", "request_id": "x", "value": SECRET}).encode())
    assert bad_v0["request_id"] == "x" and bad_v0["error_code"] == "INVALID_ARGUMENT"
    assert answer(json.dumps({"v": 1, "id": "p", "action": "ping"}).encode())["data"] == {"serving": True}
    # When a peer sends a body past the door's size limit, libzmq drops it and that peer's connection
    huge = _dealer(ctx, hub.door)
    huge.send_multipart([b"", b'{"v":1,"action":"get","payload":"' + b"x" * 70_000 + b'"}'])
    # Then everyone else is still served
    assert answer(json.dumps({"v": 1, "id": 1, "action": "ping"}).encode())["status"] == "ok"
    # When 40 peers each send 20 requests at once (past the per-peer cap of 16)
    peers = [_dealer(ctx, hub.door) for _ in range(40)]
    for p in peers:
        for i in range(20):
            body = {"v": 1, "id": i, "action": "get", "payload": {"namespace": "default", "key": f"k{i}"}}
            p.send_multipart([b"", json.dumps(body).encode()])
    # Then every request gets exactly one answer: NOT_FOUND from the replica, or shed by a bound
    codes: dict[str, int] = {}
    for p in peers:
        ids = set()
        for _ in range(20):
            reply = json.loads(p.recv_multipart()[-1])
            ids.add(reply["id"])
            code = reply["error"]["code"]
            codes[code] = codes.get(code, 0) + 1
        assert ids == set(range(20))
    assert set(codes) <= {"NOT_FOUND", "RESOURCE_EXHAUSTED"} and codes.get("NOT_FOUND", 0) > 0, codes
    shed = json.loads(_one_shed(peers[0]))
    assert shed["status"] == "error" and shed["error"]["code"] == "RESOURCE_EXHAUSTED" and shed["id"] == 99
    # and the front is alive, and logged nothing a peer sent
    assert hub.front_proc.poll() is None
    assert SECRET not in hub.front.log("front")
    for s in [d, huge, *peers]:
        s.close()


_WATCH_NOW = b'{"v":1,"id":"now","action":"watch","payload":{"namespace":"x"}}'


def _one_shed(p: zmq.Socket[bytes]) -> bytes:
    """Send 30 at once from one peer; return the answer to the last (the per-peer cap is 16). Each is a
    watch that waits 3 s: long enough that on a starved box the first 16 still run when the last arrives
    (with 300 ms, the first ones had answered and the last one ran). A watch waits only after a position
    (without one it answers at once with the position of now: under load the first ones were answered
    before the last arrived, and it ran)."""
    p.send_multipart([b"", _WATCH_NOW])
    position = json.loads(p.recv_multipart()[-1])["data"]["next_sequence"]
    for i in range(30):
        watch = {"namespace": "x", "after_sequence": position, "wait_ms": 3000}
        body = {"v": 1, "id": 99 if i == 29 else i, "action": "watch", "payload": watch}
        p.send_multipart([b"", json.dumps(body).encode()])
    shed = b""
    for _ in range(30):
        reply = p.recv_multipart()[-1]
        if b'"id":99' in reply:
            shed = reply
    return shed


def test_no_live_replica_is_answered_unavailable_at_once(hub: Hub, ctx: Ctx) -> None:
    # Given a front whose only replica does not run
    hub.start_front([f"tcp://127.0.0.1:{free_port()}"])
    agent = V0Agent(ctx, hub.door, b"lonely")
    d = _dealer(ctx, hub.door)
    # When a v0 agent and a v1 client ask
    started = time.monotonic()
    v0 = agent.ask(action="get", key="k", request_id="q1")
    d.send_multipart([b"", json.dumps({"v": 1, "id": "q2", "action": "get", "payload": {}}).encode()])
    v1 = json.loads(d.recv_multipart()[-1])
    took = time.monotonic() - started
    # Then both are answered UNAVAILABLE in their own schema, at once
    assert v0["status"] == "error" and v0["error_code"] == "UNAVAILABLE" and v0["request_id"] == "q1"
    assert v1["error"]["code"] == "UNAVAILABLE" and v1["id"] == "q2"
    assert took < 1.0, took
    assert hub.metric("mfh_front_replicas_live") == 0
    agent.sock.close()
    d.close()


def _ask(sock: zmq.Socket[bytes], body: dict[str, Any]) -> dict[str, Any]:
    sock.send_multipart([b"", json.dumps(body).encode()])
    out: dict[str, Any] = json.loads(sock.recv_multipart()[-1])
    return out


def test_answers_wait_for_a_front_that_stalls_instead_of_being_lost(hub: Hub, ctx: Ctx) -> None:
    # Given one replica behind the front (and a worker: watches read the event log), and 128 agents each
    # holding a watch of one namespace through it
    hub.replicas[0].start_worker()
    hub.start_api(0)
    hub.start_front(hub.endpoints[:1])
    wait_until(lambda: hub.live() == 1, 10, message="the replica live")
    direct = _dealer(ctx, hub.endpoints[0])  # a client of the replica itself, not through the front
    now = _ask(direct, {"v": 1, "id": 0, "action": "watch", "payload": {"namespace": "big"}})["data"]["next_sequence"]
    agents = [_dealer(ctx, hub.door) for _ in range(128)]
    watch = {"namespace": "big", "after_sequence": now, "wait_ms": 20_000}
    for i, a in enumerate(agents):
        a.send_multipart([b"", json.dumps({"v": 1, "id": i, "action": "watch", "timeout_ms": 30_000,
                                           "payload": watch}).encode()])  # fmt: skip
    wait_until(lambda: hub.metric("mfh_front_requests_held") == 128, 10, message="the watches at the replica")
    # (a ping's answer through the front: the replica got every watch, sent before it on the same connection)
    assert _ask(_dealer(ctx, hub.door), {"v": 1, "id": "p", "action": "ping"})["status"] == "ok"
    # When the front stops reading (SIGSTOP: a starved or paused process) while the replica answers them all,
    # 128 answers of 200 KB each: more than TCP and the pipe between them hold
    hub.front_proc.send_signal(signal.SIGSTOP)
    try:
        put = {"namespace": "big", "key": "k", "kind": "memory_item", "payload": {"content": "x" * 200_000}}
        assert _ask(direct, {"v": 1, "id": 1, "action": "put", "payload": put})["status"] == "ok"
        wait_until(
            lambda: hub.replica_metric(0, "mfh_api_requests_total", transport="zmq", method="Watch", code="OK") >= 129,
            15,
            message="the replica answered the watches",
        )
        time.sleep(0.5)  # before the fix, an answer the pipe refused was given up on after 26 ms
    finally:
        hub.front_proc.send_signal(signal.SIGCONT)
    # Then, once it reads again, every agent gets its answer with the change
    for i, a in enumerate(agents):
        reply = json.loads(a.recv_multipart()[-1])
        assert reply["id"] == i and reply["status"] == "ok", reply.get("error")
        assert [e["record"]["key"] for e in reply["data"]["events"]] == ["k"]
    # and the replica counted the answers that waited for the front's pipe
    assert hub.replica_metric(0, "mfh_zmq_replies_delayed_total", door="api") > 0
    assert hub.replica_metric(0, "mfh_zmq_replies_dropped_total", door="api", reason="full") == 0
    for sock in [direct, *agents]:
        sock.close()


def test_a_request_whose_answer_never_comes_is_answered_at_its_deadline(
    tmp_path: Path, redis_url: str, ctx: Ctx
) -> None:
    # Given a front whose replica stays in rotation while silent (dead_after_ms 60 s), requests due in 1 s
    hub = build_hub(tmp_path, redis_url, {"deadline_seconds": 1}, front={"dead_after_ms": 60_000})
    try:
        hub.start_api(0)
        hub.start_front(hub.endpoints[:1])
        wait_until(lambda: hub.live() == 1, 10, message="the replica live")
        agent = V0Agent(ctx, hub.door, b"patient")
        d = _dealer(ctx, hub.door)
        assert agent.ask(action="retrieve", key="k")["error_code"] == "NOT_FOUND"
        # When the replica takes requests and answers none of them (SIGSTOP: its connection stays up)
        hub.api_procs[0].send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            get = {"v": 1, "id": "t", "action": "get", "timeout_ms": 500, "payload": {"namespace": "n", "key": "k"}}
            d.send_multipart([b"", json.dumps(get).encode()])
            v0 = agent.ask(action="retrieve", key="k", request_id="r1")
            v0_took = time.monotonic() - started
            v1 = json.loads(d.recv_multipart()[-1])
            # Then the front answers each DEADLINE_EXCEEDED soon after its deadline (not minutes later):
            # the v0 one after server.deadline_seconds, the v1 one after its timeout_ms, 2 s of margin each
            assert v0["error_code"] == "DEADLINE_EXCEEDED" and v0["request_id"] == "r1", v0
            assert v1["error"]["code"] == "DEADLINE_EXCEEDED" and v1["id"] == "t", v1
            assert 3.0 <= v0_took < 5.0, v0_took
            assert hub.metric("mfh_front_requests_total", outcome="expired") == 2
        finally:
            hub.api_procs[0].send_signal(signal.SIGCONT)
        # and the replica's own answers, once it runs again, are dropped as late
        wait_until(lambda: hub.metric("mfh_front_requests_total", outcome="late") >= 2, 10, message="late answers")
        agent.sock.close()
        d.close()
    finally:
        for t in [hub.front, *hub.replicas]:
            t.stop_all()


def test_status_shows_the_front_and_its_replicas_live_or_dead(hub: Hub) -> None:
    from mfh_api.commands.status import render
    from mfh_tasks.health import gather

    def fronts() -> list[dict[str, Any]]:
        doc = asyncio.run(gather(hub.front.settings)).as_dict()
        return [p for p in doc["processes"] if p["role"] == "front"]

    # Given a front for two replicas, one of which runs
    hub.start_api(0)
    hub.start_front()
    wait_until(lambda: hub.live() == 1, 10, message="one replica live")
    # Then the host's status lists the front with the replicas as its heartbeat says: one live, one not
    wait_until(lambda: [r["live"] for f in fronts() for r in f["extra"]["replicas"]] == [True, False], 10,
               message="the front's heartbeat")  # fmt: skip
    h = asyncio.run(gather(hub.front.settings))
    text = render(h)
    assert f"replica {hub.endpoints[0]}" in text and f"{hub.endpoints[1]}" in text, text
    assert "1 of 2 replica(s) live" in text and "DEAD (disconnected)" in text, text
    front = [r for r in h.reasons if r.component == "front"]
    assert [r.level for r in front] == ["yellow"] and hub.endpoints[1] in front[0].message, h.reasons
    # When the live one is killed, Then the front has none live: red
    TestHost.kill(hub.api_procs[0])
    wait_until(lambda: [r["live"] for f in fronts() for r in f["extra"]["replicas"]] == [False, False], 10,
               message="the front's heartbeat after the kill")  # fmt: skip
    h = asyncio.run(gather(hub.front.settings))
    assert any(r.component == "front" and r.level == "red" for r in h.reasons), h.reasons
    # and when the front stops, it leaves the list at once
    hub.front_proc.send_signal(signal.SIGTERM)
    assert hub.front_proc.wait(timeout=20) == 0
    assert fronts() == []


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        ({"v": 1, "action": "get", "payload": {"namespace": "n", "key": "k"}}, "read"),
        ({"v": 1, "action": "watch", "payload": {"namespace": "n"}}, "read"),
        (
            {"v": 1, "action": "put", "payload": {"namespace": "n", "key": "k", "kind": "memory_item", "payload": {}}},
            "write",
        ),
        ({"v": 1, "action": "put", "payload": {"namespace": "n", "key": "k", "expected_version": 3}}, "conditional"),
        (
            {"v": 1, "action": "batch_put", "payload": {"puts": [{"key": "a"}, {"key": "b", "expected_version": 0}]}},
            "conditional",
        ),
        ({"v": 1, "action": "batch_put", "payload": {"puts": [{"key": "a"}]}}, "write"),
        ({"v": 1, "action": "delete", "payload": {"namespace": "n", "key": "k"}}, "conditional"),
        ({"action": "store", "key": "k", "value": {}}, "write"),
        ({"action": "store", "key": "k", "value": {}, "expected_version": 0}, "conditional"),
        ({"action": "retrieve", "key": "k"}, "read"),
        ({"action": "delete", "key": "k"}, "conditional"),
        ("not json {", "read"),
    ],
)
def test_what_the_front_may_send_again(body: Any, kind: str) -> None:
    # Given a request whose replica died holding it; Then only what a repeat cannot harm is sent again
    from mfh_api.zmq_front import repeat_kind

    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    assert repeat_kind([raw]).value == kind


def test_behind_a_front_the_replica_counts_the_fronts_peers() -> None:
    # Given the envelopes a replica sees: a direct REQ or DEALER peer, and the front's peers
    from mfh_api.zmq_door import FRONT_ROUTING_PREFIX, peer_of

    front = FRONT_ROUTING_PREFIX + b"0123"
    # Then a direct peer is its connection, whatever extra frames it sends
    assert peer_of([b"\x00abcd", b""]) == b"\x00abcd"
    assert peer_of([b"\x00abcd"]) == b"\x00abcd"
    assert peer_of([b"\x00abcd", b"x", b"y", b""]) == b"\x00abcd"
    # and behind the front, each of the front's peers is one peer of its own (the tag is not counted)
    assert peer_of([front, b"agent-1", b"tag-1", b""]) == peer_of([front, b"agent-1", b"tag-2", b""])
    assert peer_of([front, b"agent-1", b"tag-1", b""]) != peer_of([front, b"agent-2", b"tag-1", b""])


def test_the_budget_is_read_from_the_envelopes_tail_without_parsing_a_large_body() -> None:
    from mfh_api.zmq_front import ZmqFront

    front = ZmqFront(["tcp://127.0.0.1:1"], deadline_s=5.0)
    big = {"v": 1, "action": "put", "namespace": "n", "key": "k", "payload": {"e": [0.5] * 20_000}}
    # the client's envelope: timeout_ms is its last member, so the tail holds it
    assert front._budget([json.dumps({**big, "timeout_ms": 1500}).encode()]) == 1.5
    assert front._budget([json.dumps({"action": "get", "timeout_ms": 250}, separators=(",", ":")).encode()]) == 0.25
    # a small body naming it elsewhere is parsed; a nested one is not the envelope's
    assert front._budget([b'{"timeout_ms": 700, "action": "get"}']) == 0.7
    assert front._budget([b'{"action": "get", "x": {"timeout_ms": 700}}']) == 5.0
    assert front._budget([b'{"action": "get", "x": {"b": 2, "timeout_ms": 700}}']) == 5.0
    # a large body naming it elsewhere gets the default budget: the front's loop parses no large body
    assert front._budget([json.dumps({"timeout_ms": 700, **big}).encode()]) == 5.0
    # hostile values: never more than the api's bound, nothing negative or zero, not JSON at all
    assert front._budget([b'{"action": "get", "timeout_ms": 999999999}']) == 300.0
    assert front._budget([b'{"action": "get", "timeout_ms": 0}']) == 5.0
    assert front._budget([b'{"action": "get", "timeout_ms": -5}']) == 5.0
    assert front._budget([b'\xff{"timeout_ms": 70']) == 5.0
    assert front._budget([b"a", b"b"]) == 5.0
