"""NATS security: TLS (verified against the CA scripts/make_certs.sh makes) and a password, on a private
nats-server configured as docs/security.md shows; fail closed; no password in any output (issue 13)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from factories import event
from hosts import TestHost, make_host
from services import NatsServer, free_port, nats_server_binary, tcp_open, unavailable, wait_until

from mfh_core import SqlStore
from mfh_core.eventbus import EventBus
from mfh_core.nats_security import NatsSecurity
from mfh_core.probes import probe_nats
from mfh_models import ConfigError, Unavailable, load_settings
from mfh_models.settings import ReplicationSettings

ROOT = Path(__file__).resolve().parent.parent
USER = "mfh"
PASSWORD = "nats-pw-3f9a1c77"


class TlsNats:
    """A private nats-server with JetStream, TLS only and a user/password, from a config file like the docs'."""

    def __init__(self, workdir: Path, certs: Path, *, verify: bool = False) -> None:
        binary = nats_server_binary()
        if binary is None:
            unavailable("nats-server binary not found")
        self.port = free_port()
        conf = workdir / "nats-tls.conf"
        conf.write_text(
            f"""
listen: 127.0.0.1:{self.port}
jetstream {{ store_dir: "{workdir / "js"}" }}
tls {{
  cert_file: "{certs / "nats-server.pem"}"
  key_file: "{certs / "nats-server.key"}"
  ca_file: "{certs / "ca.pem"}"
  verify: {"true" if verify else "false"}
  timeout: 2
}}
authorization {{ user: {USER}, password: "{PASSWORD}" }}
"""
        )
        self.log_path = workdir / "nats.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(binary), "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        wait_until(lambda: b"tls_required" in self.info(), 15, message=f"nats-server on {self.port}")

    def info(self) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            return s.recv(4096)

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def tls_nats(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[TlsNats]:
    server = TlsNats(tmp_path_factory.mktemp("nats-tls"), certs)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_nats(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[TlsNats]:
    """The same, requiring a client certificate of the CA (``verify: true``)."""
    server = TlsNats(tmp_path_factory.mktemp("nats-mtls"), certs, verify=True)
    yield server
    server.stop()


def security(url: str, ca: Path, **kw: Any) -> NatsSecurity:
    return NatsSecurity(url=url, tls=True, ca_file=str(ca / "ca.pem"), **kw)


def new_bus(sec: NatsSecurity, tag: str) -> EventBus:
    return EventBus(
        nats_url=sec.url,
        stream=f"ev_{tag}",
        subject_prefix=f"mfh.{tag}",
        duplicate_window_s=60,
        max_age_s=3600,
        name=f"test-{tag}",
        security=sec,
    )


@pytest.fixture
async def good_bus(tls_nats: TlsNats, certs: Path) -> AsyncIterator[EventBus]:
    bus = new_bus(security(tls_nats.url, certs, user=USER, password=PASSWORD), f"t{time.monotonic_ns()}")
    await bus.connect()
    yield bus
    await bus.close()


# -- the bus --------------------------------------------------------------------------------------


async def test_the_bus_with_the_ca_and_the_password_publishes_and_consumes(good_bus: EventBus) -> None:
    # Given a bus that trusts the CA and knows the password
    events = [event(f"k{i}", i + 1) for i in range(3)]
    # When it publishes
    acked = await good_bus.publish_many(events)
    # Then every event is acked, and reads back from the stream
    assert acked == [e.event_id for e in events]
    assert [e.event_id async for e in good_bus.iter_stream()] == acked


async def test_a_password_in_the_url_works_and_is_not_shown(tls_nats: TlsNats, certs: Path) -> None:
    url = tls_nats.url.replace("tls://", f"tls://{USER}:{PASSWORD}@")
    bus = new_bus(security(url, certs), "urlpw")
    try:
        await bus.connect()
        assert await bus.publish_many([event("k", 1)])
        assert PASSWORD not in bus.conn.url and f"{USER}:***@" in bus.conn.url
    finally:
        await bus.close()


async def test_a_server_whose_certificate_does_not_chain_to_the_ca_is_refused(
    tls_nats: TlsNats, other_certs: Path
) -> None:
    # Given a bus that trusts another CA
    bus = new_bus(security(tls_nats.url, other_certs, user=USER, password=PASSWORD), "wrongca")
    # When it connects, it fails at once, in one line that names the cause
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as failed:
        await bus.connect(wait_s=10)
    assert time.monotonic() - t0 < 5
    message = failed.value.message
    assert "certificate failed verification" in message and "nats_tls_ca_file" in message and "\n" not in message
    assert not bus.connected and PASSWORD not in message


async def test_a_server_that_does_not_carry_the_name_is_refused(tls_nats: TlsNats, certs: Path) -> None:
    bus = new_bus(
        security(tls_nats.url, certs, user=USER, password=PASSWORD, server_name="not-this-hub.example"), "name"
    )
    with pytest.raises(Unavailable, match="Hostname mismatch"):
        await bus.connect(wait_s=10)


@pytest.mark.parametrize("password", [None, "wrong-password"])
async def test_a_missing_or_wrong_password_is_refused_clearly(
    tls_nats: TlsNats, certs: Path, password: str | None
) -> None:
    creds = {"user": USER, "password": password} if password else {}
    bus = new_bus(security(tls_nats.url, certs, **creds), "pw")
    with pytest.raises(Unavailable) as failed:
        await bus.connect(wait_s=10)
    message = failed.value.message
    assert "Authorization Violation" in message and "nats_password" in message, message
    assert (password or PASSWORD) not in message


async def test_tls_required_refuses_a_plain_text_server_before_sending_anything(
    nats_server: NatsServer, certs: Path
) -> None:
    # Given a plain nats-server (or one posing as ours), and settings that require TLS
    url = nats_server.url.replace("nats://", f"tls://{USER}:{PASSWORD}@")
    bus = new_bus(security(url, certs), "plain")
    # When the bus connects, it refuses: the credentials are never written on the plain link
    with pytest.raises(Unavailable, match="did not offer TLS"):
        await bus.connect(wait_s=10)
    without_creds = new_bus(security(nats_server.url.replace("nats://", "tls://"), certs), "plain2")
    with pytest.raises(Unavailable, match="did not offer TLS"):
        await without_creds.connect(wait_s=10)


def test_a_plain_text_client_cannot_talk_to_the_tls_only_server(tls_nats: TlsNats) -> None:
    # Given a client that speaks the protocol in plain text
    with socket.create_connection(("127.0.0.1", tls_nats.port), timeout=5) as s:
        info = json.loads(s.recv(4096).split(b" ", 1)[1])
        assert info["tls_required"] is True
        # When it logs in and pings without TLS
        s.sendall(f'CONNECT {{"user":"{USER}","pass":"{PASSWORD}"}}\r\nPING\r\n'.encode())
        got = b""
        with pytest.raises(OSError):  # reset, or (below) closed
            while chunk := s.recv(4096):
                got += chunk
            raise ConnectionResetError("closed")
    # Then the server never answers: no PONG, no session
    assert b"PONG" not in got


async def test_a_server_that_verifies_clients_takes_the_client_certificate(
    mtls_nats: TlsNats, certs: Path, other_certs: Path
) -> None:
    # Given a server with `verify: true`
    def with_cert(where: Path) -> NatsSecurity:
        return security(
            mtls_nats.url,
            certs,
            user=USER,
            password=PASSWORD,
            cert_file=str(where / "nats-client.pem"),
            key_file=str(where / "nats-client.key"),
        )

    # When a bus shows the CA's client certificate, it publishes
    bus = new_bus(with_cert(certs), "mtls")
    try:
        await bus.connect()
        assert await bus.publish_many([event("k", 1)])
    finally:
        await bus.close()
    # And without one, or with another CA's, it gets nowhere
    for sec in (security(mtls_nats.url, certs, user=USER, password=PASSWORD), with_cert(other_certs)):
        refused = new_bus(sec, "mtls2")
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match=r"cannot connect to NATS.*TLS"):
            await refused.connect(wait_s=10)
        assert not refused.connected and time.monotonic() - t0 < 5


async def test_status_probe_reports_the_cause_without_the_password(
    tls_nats: TlsNats, certs: Path, other_certs: Path
) -> None:
    url = tls_nats.url.replace("tls://", f"tls://{USER}:{PASSWORD}@")
    ok = await probe_nats(url, stream="none", security=security(url, certs))
    assert ok.ok, ok
    refused = await probe_nats(url, stream="none", security=security(url, other_certs))
    assert not refused.ok and "certificate failed verification" in refused.detail
    bad = url.replace(PASSWORD, "wrong-pass-1234")
    wrong = await probe_nats(bad, stream="none", security=security(bad, certs))
    assert not wrong.ok and "Authorization Violation" in wrong.detail
    assert all(PASSWORD not in p.detail and "wrong-pass-1234" not in p.detail for p in (ok, refused, wrong))


# -- settings -------------------------------------------------------------------------------------


def test_half_a_configuration_is_refused_when_settings_load(tmp_path: Path) -> None:
    for env, why in (
        ({"MFH_NATS_TLS_CERT": "/c.pem"}, "nats_tls_cert_file and nats_tls_key_file go together"),
        ({"MFH_NATS_USER": "u"}, "nats_user and nats_password go together"),
        ({"MFH_NATS_TLS_CA": "ca.pem"}, "must be an absolute path"),
        ({"MFH_NATS_USER": "u", "MFH_NATS_PASSWORD": "p", "MFH_NATS_TOKEN": "t"}, "set one"),
        ({"NATS_URL": "nats://u:p@h:4222", "MFH_NATS_USER": "u", "MFH_NATS_PASSWORD": "p"}, "one place"),
        ({"NATS_URL": "http://h:4222"}, "nats:// or tls://"),
    ):
        with pytest.raises(ConfigError, match=why):
            load_settings(env=env)
    s = load_settings(env={"MFH_NATS_TLS_CA": "/ca.pem", "MFH_NATS_USER": "u", "MFH_NATS_PASSWORD": PASSWORD})
    assert s.replication.nats_tls and not load_settings(env={}).replication.nats_tls
    assert load_settings(env={"NATS_URL": "tls://h:4222"}).replication.nats_tls
    shown = json.dumps(s.masked())
    assert PASSWORD not in shown and '"nats_password": "********"' in shown


def test_an_unreadable_ca_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    r = ReplicationSettings(nats_tls_ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match=r"replication\.nats_tls_ca_file: cannot read"):
        EventBus.from_settings(r)


def test_plain_text_to_another_host_is_warned_about_without_the_password() -> None:
    warning = NatsSecurity(url=f"nats://{USER}:{PASSWORD}@10.1.2.3:4222").warning()
    assert warning is not None and "plain text" in warning and "credentials" in warning and PASSWORD not in warning
    assert NatsSecurity(url="nats://127.0.0.1:4222").warning() is None
    assert NatsSecurity(url="tls://10.1.2.3:4222", tls=True).warning() is None


async def test_a_process_warns_once_at_start_when_nats_is_plain_text_to_another_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a bus on a plain nats:// URL to a host that is not loopback (an address nobody answers on)
    bus = new_bus(NatsSecurity(url=f"nats://{USER}:{PASSWORD}@192.0.2.1:4222"), "warn")
    # When it tries to connect, twice
    with caplog.at_level(logging.WARNING, logger="mfh.eventbus"):
        for _ in range(2):
            with pytest.raises(Unavailable):
                await bus.connect(wait_s=0.2)
    # Then one warning says it is plain text, without the password
    warnings = [r.getMessage() for r in caplog.records if "plain text" in r.getMessage()]
    assert len(warnings) == 1 and "192.0.2.1" in warnings[0] and PASSWORD not in caplog.text


# -- the processes --------------------------------------------------------------------------------


def full_log(host: TestHost, name: str) -> str:
    path = host.config_dir / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def mfh(host: TestHost, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", *args], env=host.env, capture_output=True, text=True, timeout=120
    )


def test_worker_and_replicator_run_over_tls_and_no_output_shows_the_password(
    tmp_path: Path, redis_url: str, tls_nats: TlsNats, certs: Path
) -> None:
    # Given a host whose NATS is TLS only with a password (given in the URL, as an operator may)
    url = tls_nats.url.replace("tls://", f"tls://{USER}:{PASSWORD}@")
    host = make_host(
        tmp_path,
        redis_url=redis_url,
        nats_url=url,
        overrides={
            "server": {"grpc_port": free_port(), "zmq_port": free_port(), "metrics_port": 0},
            "storage": {"redis_prefix": f"t{time.monotonic_ns() % 10**9}"},
            "replication": {"nats_tls_ca_file": str(certs / "ca.pem"), "event_topic": "tls_events"},
            "metrics": {"worker_port": 0, "replicator_port": 0},
        },
    )
    names = ("api", "worker", "replicator")
    try:
        host.spawn("mfh_api.cli", "api", log_name="api")
        port = host.settings.server.grpc_port
        wait_until(lambda: tcp_open("127.0.0.1", port), 60, message=f"api on {port}: {host.log('api')}")
        host.spawn("mfh_api.cli", "worker", "--processes", "1", "--threads", "2", log_name="worker")
        host.spawn("mfh_api.cli", "replicator", log_name="replicator")
        wait_until(lambda: "worker for host main_pc" in full_log(host, "worker"), 60, message="worker to start")
        wait_until(lambda: "over TLS" in full_log(host, "replicator"), 60, message="replicator on NATS")
        # When a write goes through the api and is persisted
        out = mfh(host, "put", "ns", "k1", json.dumps({"content": "over tls"}), "--persisted")
        assert out.returncode == 0, out.stderr + host.log("worker")
        # Then the worker published it over TLS, it is in SQL, and its event reaches a consumer
        wait_until(lambda: "over TLS" in full_log(host, "worker"), 30, message="worker on NATS")
        sql = SqlStore(host.settings.storage.database_url)
        try:
            wait_until(lambda: sql.counts()["events"] >= 1, 30, message="the event in SQL")
        finally:
            sql.close()

        async def consume() -> list[str]:
            bus = EventBus.from_settings(host.settings.replication, name="test-consumer")
            await bus.connect()
            try:
                return [e.key async for e in bus.iter_stream()]
            finally:
                await bus.close()

        wait_until(lambda: "k1" in asyncio.run(consume()), 30, message="the event on the stream")
        # And neither `mfh config show` nor `mfh status` shows the password
        shown = mfh(host, "config", "show", "--format", "json")
        status = mfh(host, "status")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["replication"]["nats_url"].startswith(f"tls://{USER}:****@")
        for out in (shown, status):
            assert PASSWORD not in out.stdout + out.stderr, out.stdout + out.stderr
        assert "nats" in status.stdout and "unreachable" not in status.stdout.split("nats", 1)[1].split("\n")[0]
    finally:
        host.stop_all()
    # And no process logged it
    for name in names:
        text = full_log(host, name)
        assert PASSWORD not in text, f"the password in the {name} log:\n{text[-3000:]}"


async def test_a_server_that_never_answers_is_reported_with_a_reason() -> None:
    # Given a port that accepts connections and never says a word (no INFO line)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
    try:
        bus = EventBus(
            nats_url=url,
            stream="ev_silent",
            subject_prefix="mfh.silent",
            duplicate_window_s=60,
            max_age_s=3600,
            name="test-silent",
        )
        # When the bus connects, the error says why in words, not "TimeoutError: " and nothing
        with pytest.raises(Unavailable) as failed:
            await bus.connect(wait_s=3)
        message = failed.value.message
        assert message.startswith(f"cannot connect to NATS at {url}: "), message
        reason = message.removeprefix(f"cannot connect to NATS at {url}: ")
        assert reason.strip() and not reason.rstrip().endswith(":"), message
    finally:
        silent.close()
