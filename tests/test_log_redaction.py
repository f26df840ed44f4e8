"""No log line carries a payload, an API key or a password, in any process (architecture.md invariant 9).

Issue 7, finding 4.

The end-to-end test runs the four processes of a host (api, worker, replicator, scheduler) with a
known API key and a Postgres URL with a known password, writes records holding a known marker,
provokes the error paths (hostile bodies, a malformed batch, bad keys), and greps every log.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid
from pathlib import Path

import grpc
import pytest
import zmq
from hosts import TestHost, make_host
from services import NatsServer, free_port, tcp_open, wait_until

from mfh_core.redaction import RedactingFilter, install_loop_exception_handler, redact_text

API_KEY = "redact-key-7c1f0b9e"
PASSWORD = "SECRETPW-41d2"
MARKER = "PAYLOAD-MARKER-5e8a"


def test_filter_masks_urls_secrets_exception_messages_and_message_bodies() -> None:
    # Given a record of each leaky sort
    f = RedactingFilter()
    f.add_secrets([API_KEY])

    class Message:  # what dramatiq passes: str() of it prints the actor's arguments
        actor_name, message_id = "persist_batch", "m-1"

        def __str__(self) -> str:
            return f"persist_batch([{{'payload': '{MARKER}'}}])"

    try:
        raise ValueError(f"[SQL: INSERT ...]\n[parameters: ('{MARKER}',)]\n(Background on this error at: x)")
    except ValueError as e:
        exc = e
    records = [
        logging.LogRecord("mfh", logging.INFO, __file__, 1, "url %s", (f"postgresql://u:{PASSWORD}@h/db",), None),
        logging.LogRecord("mfh", logging.INFO, __file__, 1, "key=%s", (API_KEY,), None),
        logging.LogRecord("dramatiq", logging.ERROR, __file__, 1, "Failed to process %s", (Message(),), None),
        logging.LogRecord("mfh", logging.ERROR, __file__, 1, "failed", (), (ValueError, exc, exc.__traceback__)),
        logging.LogRecord("x", logging.ERROR, __file__, 1, "bad: %s",
                          (ValueError(f"input_value='{MARKER}', input_type=str]"),), None),
        logging.LogRecord("asyncio", logging.ERROR, __file__, 1,
                          f"Task exception was never retrieved\nfuture: <Task {MARKER}>", (), None),
    ]  # fmt: skip
    # When each passes the filter and a formatter
    fmt = logging.Formatter()
    out = "\n".join(fmt.format(r) for r in records if f.filter(r))
    # Then no secret and no payload is left, but what happened still reads
    assert PASSWORD not in out and API_KEY not in out and MARKER not in out, out
    assert "postgresql://u:***@h/db" in out and "persist_batch[m-1]" in out and "ValueError" in out
    assert "Task exception was never retrieved" in out
    assert redact_text("nats://a:b@c redis://:pw@r:1/0") == "nats://a:***@c redis://:***@r:1/0"


def test_an_unretrieved_task_exception_is_logged_without_its_repr(caplog: pytest.LogCaptureFixture) -> None:
    # Given the api's loop exception handler, and a task that fails with a reply in its exception
    async def run() -> None:
        install_loop_exception_handler()

        async def fail() -> None:
            reply = '{"v":1,"id":"\ud800","data":{"payload":"' + MARKER + '"}}'
            reply.encode("utf-8")  # UnicodeEncodeError, whose repr holds the whole reply

        task = asyncio.ensure_future(fail())
        await asyncio.sleep(0.01)
        assert task.done()
        del task
        gc.collect()

    # When the task is collected without anyone retrieving its exception
    with caplog.at_level(logging.ERROR):
        asyncio.run(run())
    # Then one line says so by task and type, and the reply is not in it
    text = caplog.text
    assert "Task exception was never retrieved" in text and "UnicodeEncodeError" in text
    assert MARKER not in text


def test_no_process_logs_a_payload_a_key_or_a_password(
    tmp_path: Path, redis_url: str, postgres_url: str, nats_server: NatsServer
) -> None:
    # Given a host with an API key, a Postgres URL with a password (trust auth takes any), and NATS
    pg = postgres_url.replace("postgres@", f"postgres:{PASSWORD}@", 1)
    assert PASSWORD in pg
    host = make_host(
        tmp_path,
        redis_url=redis_url,
        database_url=pg,
        nats_url=nats_server.url,
        overrides={
            "storage": {"redis_prefix": f"t{uuid.uuid4().hex[:12]}"},
            "server": {"api_key": API_KEY},
            "scheduler": {"reconcile_interval_seconds": 1},
        },
    )
    zmq_port, grpc_port = free_port(), free_port()
    api = host.spawn(
        "mfh_api.cli", "api", "--zmq-port", str(zmq_port), "--grpc-port", str(grpc_port), "--metrics-port", "0",
        log_name="api",
    )  # fmt: skip
    names = ("api", "worker", "replicator", "scheduler")
    try:
        wait_until(
            lambda: api.poll() is None and tcp_open("127.0.0.1", zmq_port) and tcp_open("127.0.0.1", grpc_port),
            60,
            message=f"api to listen (log: {host.log('api')})",
        )
        # One at a time: processes creating the schema at once race in Postgres (not what is tested here)
        for args, ready in (
            (("mfh_api.cli", "worker", "--threads", "2"), "worker for host main_pc"),
            (("mfh_api.cli", "replicator"), "replicator for main_pc"),
            (("schedules", "run"), "scheduler for main_pc"),
        ):
            name = "scheduler" if args[0] == "schedules" else args[1]
            host.spawn(*args, log_name=name)
            wait_until(lambda n=name, r=ready: r in host.log(n), 60, message=f"{name} to start")  # type: ignore[misc]
        _traffic(host, zmq_port, grpc_port)
        # The worker has met the malformed batch
        wait_until(lambda: "persist_batch" in host.log("worker"), 30, message=f"worker log: {host.log('worker')}")
    finally:
        host.stop_all()
    # Then no log holds the key, the password or the payload marker, and the logs are not empty
    logs = {n: (host.config_dir / f"{n}.log").read_text(errors="replace") for n in names}
    for name, text in logs.items():
        for secret in (API_KEY, PASSWORD, MARKER):
            assert secret not in text, f"{secret} in the {name} log:\n{text[-3000:]}"
    assert "api ready" in logs["api"] and "postgres:***@" in logs["worker"]
    # And every line of every process (Dramatiq's and APScheduler's own lines too) is one JSON object
    # with the common fields; the scheduler's routine lease renewals do not show at INFO
    for name, text in logs.items():
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                pytest.fail(f"a {name} log line is not JSON: {line[:300]!r}")
            assert {"ts", "level", "logger", "msg"} <= set(record), f"{name}: {line[:300]}"
    assert "lease" not in logs["scheduler"].replace("scheduler lease taken", ""), logs["scheduler"][-2000:]
    assert "leader_only" not in logs["scheduler"]


def _traffic(host: TestHost, zmq_port: int, grpc_port: int) -> None:
    """Writes holding the marker on both transports, and the error paths a hostile peer opens."""
    from mfh_api.client_grpc import MemoryClient
    from mfh_api.client_zmq import ZmqClient
    from mfh_api.proto import pb, pb_grpc
    from mfh_api.service import Durability, PutSpec
    from mfh_tasks import build_broker, declare_persist_actor

    note = {"content": MARKER, "metadata": {"m": MARKER}}
    with MemoryClient([f"127.0.0.1:{grpc_port}"], api_key=API_KEY) as c:
        c.put(PutSpec("secrets", "g1", "memory_item", note), durability=Durability.PERSISTED)
        assert MARKER in c.get("secrets", "g1").payload
    with ZmqClient([f"tcp://127.0.0.1:{zmq_port}"], api_key=API_KEY) as z:
        z.put(PutSpec("secrets", "z1", "memory_item", note))
    md = (("x-api-key", API_KEY),)
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = pb_grpc.MemoryFusionStub(ch)
        bad = [
            lambda: stub.Put(pb.PutRequest(record=pb.Record(namespace="secrets", key="b", kind="memory_item",
                             payload_json='{"content": "", "metadata": {"m": "' + MARKER + '"}}')), metadata=md),
            lambda: stub.Put(pb.PutRequest(record=pb.Record(namespace="secrets", key="b", kind="memory_item",
                             payload_json='{"c": "' + MARKER + '"' + "[" * 5000)), metadata=md),
            lambda: stub.Get(pb.GetRequest(namespace="secrets", key="g1"), metadata=(("x-api-key", MARKER),)),
            lambda: ch.unary_unary("/grpc.health.v1.Health/Check")(b"\x0a\xff\xff" + MARKER.encode()),
            lambda: ch.unary_unary("/mfh.v1.MemoryFusion/Put")(b"\x0a\xff\xff" + MARKER.encode(), metadata=md),
        ]  # fmt: skip
        for call in bad:
            with pytest.raises(grpc.RpcError):
                call()
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{zmq_port}")
        get = b'"action": "get", "payload": {"namespace": "secrets", "key": "z1"}, "api_key": "' + API_KEY.encode()
        for body in (
            b'{"v": 1, "id": "\\ud800", ' + get + b'"}',  # a lone surrogate as the id: escaped ...
            b'{"v": 1, "id": "\xed\xa0\x80", ' + get + b'"}',  # ... and as raw bytes
            b'{"action": "retrieve", "namespace": "secrets", "key": "z1", "request_id": "\\ud800", "api_key": "'
            + API_KEY.encode() + b'"}',
            b'{"v": 1, "action": "get", "payload": {}, "api_key": "' + MARKER.encode() + b'"}',
            b'{"v": 1, "action": "put", "api_key": "' + API_KEY.encode() + b'", "payload": {"namespace": "secrets", '
            b'"key": "b", "kind": "memory_item", "payload": {"content": "x", "m": "' + MARKER.encode() + b'"}}}',
        ):  # fmt: skip
            sock.send_multipart([b"", body])
            if sock.poll(3000):
                sock.recv_multipart()
    finally:
        ctx.destroy(linger=0)
    # A malformed batch straight onto the worker's queue: its body holds the marker
    settings = host.settings
    broker = build_broker(settings)
    try:
        declare_persist_actor(broker, settings).send([{"payload": MARKER, "origin": "NOT VALID"}])
    finally:
        broker.close()
