"""Security on a real network (issue 13): the secured bed (``Cluster(secure=True)``, bed.py) as
docs/security.md tells an operator to run three hosts, reached across the bridge from the test process.

One bed for every check (its build is most of the time). The capture on the bridge (sniff.py, an
AF_PACKET socket) runs from before the first nats-server starts to the end of the wire test, which runs
first: so it holds every byte of every connection the bed made, route handshakes included, and none of
the deliberately wrong clients of the later tests (a plain-text client sends its key in the clear, by
its own fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from services import tcp_open, unavailable, wait_until

from cluster.figures import record
from cluster.netns import why_unsupported
from cluster.sniff import Stream, read_frames, tcp_streams, tls_walk, zmtp_mechanism, zmtp_walk
from mfh_client import (
    AsyncMemoryClient,
    AsyncZmqClient,
    MemoryClient,
    MFHError,
    NotFound,
    PermissionDenied,
    PutSpec,
    Unauthenticated,
    ZmqClient,
)
from mfh_client.security import CurveConfig, TlsConfig
from mfh_core import SqlStore
from mfh_core.eventbus import EventBus
from mfh_core.nats_security import NatsSecurity
from mfh_models import load_settings

pytestmark = pytest.mark.cluster

HOSTS = ["main_pc", "pc2", "pc3"]
NS = "sec"
GRPC, ZMQ, NATS, ROUTE = 5714, 5713, 4222, 6222
PLAIN_GRPC, PLAIN_ZMQ = 5724, 5723  # the plain-text control replica (the wire test only)
CONTROL_KEY = f"control-{secrets.token_urlsafe(24)}"
REPLICATED_S = 30.0


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    reason = why_unsupported()
    if reason is not None:
        unavailable(f"cluster bed: {reason}")
    from cluster.bed import Cluster

    t0 = time.monotonic()
    with Cluster(tmp_path_factory.mktemp("secure"), impaired=set(), secure=True, capture=True) as c:
        record("security_bed", up_s=time.monotonic() - t0, **c.timings, run=c.run_id)
        yield c


# -- helpers ----------------------------------------------------------------------------------


def plain_config(bed: Any, host: str) -> Path:
    """A copy of the host's config without TLS, CURVE or the keys file (one key of its own instead)."""
    src = bed.hosts[host].config_dir
    dst = bed.hosts[host].dir / "config-plain"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    path = dst / f"{host}.yaml"
    cfg = yaml.safe_load(path.read_text())
    for k in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "zmq_curve_secret_file", "zmq_curve_clients_dir"):
        cfg["server"].pop(k, None)
    cfg["server"].pop("api_keys_file", None)
    cfg["server"].update({"api_key": CONTROL_KEY, "grpc_port": PLAIN_GRPC, "zmq_port": PLAIN_ZMQ})
    path.write_text(yaml.safe_dump(cfg))
    return dst


def mfh_api_argv(host: str, config_dir: Path, *extra: str) -> list[str]:
    from cluster.bed import venv_bin

    return [str(venv_bin() / "mfh"), "api", "--host", host, "--config-dir", str(config_dir), *extra]


def reader(bed: Any, host: str, **kw: Any) -> MemoryClient:
    return MemoryClient(bed.grpc(host), api_key=bed.pki.reader_key, tls=bed.pki.agent_tls(), **kw)


def zmq_endpoint(bed: Any, host: str, port: int = ZMQ) -> str:
    return f"tcp://{bed.addr(host)}:{port}"


def wait_readable(bed: Any, host: str, key: str, timeout: float = REPLICATED_S) -> Any:
    """The record ``key`` as ``host`` serves it, once it has arrived there."""
    got: list[Any] = []

    def arrived() -> bool:
        try:
            with reader(bed, host, timeout=5.0) as c:
                got.append(c.get(NS, key))
            return True
        except NotFound:
            return False

    wait_until(arrived, timeout=timeout, interval=0.05, message=f"{key} on {host}")
    return got[-1]


def in_sql(bed: Any, host: str, keys: list[str]) -> dict[str, Any]:
    store = SqlStore(bed.hosts[host].database_url)
    try:
        return store.get_many(NS, keys)
    finally:
        store.close()


def settle(bed: Any) -> None:
    """A write on every host, once in every host's SQL: what was accepted before it has had its chance
    to land everywhere, so what is absent now was never written."""
    tag = secrets.token_hex(4)
    keys = []
    for h in HOSTS:
        with bed.client(h, timeout=5.0) as c:
            c.put(PutSpec(NS, f"settle-{tag}-{h}", "memory_item", {"content": "settle"}))
        keys.append(f"settle-{tag}-{h}")
    for h in HOSTS:
        wait_until(lambda h=h: len(in_sql(bed, h, keys)) == len(keys), timeout=REPLICATED_S, message=f"settle {h}")


def stream_kind(s: Stream) -> str:
    ports = {s.flow[1], s.flow[3]}
    for port, kind in ((GRPC, "grpc"), (ZMQ, "zmq"), (NATS, "nats"), (ROUTE, "route")):
        if port in ports:
            return kind
    if ports & {PLAIN_GRPC, PLAIN_ZMQ}:
        return "control"
    return f"other:{sorted(ports)}"


# -- the bind guard ---------------------------------------------------------------------------


def test_the_api_refuses_a_network_bind_without_tls_and_curve(bed: Any) -> None:
    # Given the bed's apis, bound to 0.0.0.0: they run with TLS, CURVE and keys, without --insecure
    for h in HOSTS:
        assert "--insecure" not in bed.hosts[h].procs["api"].args and bed.hosts[h].procs["api"].poll() is None
    # When pc2 starts an api with an API key but neither TLS nor CURVE, bound to its address on the bridge
    refused = subprocess.run(
        bed.net.exec_argv("pc2", mfh_api_argv("pc2", plain_config(bed, "pc2"))),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # Then it refuses, naming what is missing, and opens no door
    assert refused.returncode == 2, refused.stderr
    assert "no TLS for gRPC" in refused.stderr and "no CURVE for ZeroMQ" in refused.stderr, refused.stderr
    assert "no API key" not in refused.stderr and "--insecure" in refused.stderr
    assert not tcp_open(bed.addr("pc2"), PLAIN_GRPC) and not tcp_open(bed.addr("pc2"), PLAIN_ZMQ)
    # And nothing but the api's and NATS's doors is reachable on the bridge (Redis listens on loopback)
    for h in HOSTS:
        assert not tcp_open(bed.addr(h), 6380), f"{h}'s Redis is reachable from the bridge"


# -- the wire ---------------------------------------------------------------------------------


async def read_stream_for(bed: Any, host: str, marker: str) -> int:
    """Over NATS from the bridge side (TLS, the CA, the password): the events holding ``marker``."""
    r = load_settings(host, config_dir=bed.hosts[host].config_dir, env={}).replication
    bus = EventBus.from_settings(r, name="test-wire")
    try:
        await bus.connect(wait_s=10)
        return sum([marker in e.payload async for e in bus.iter_stream()])
    finally:
        await bus.close()


def test_the_wire_between_the_hosts_holds_no_marker_and_no_key(bed: Any) -> None:
    if bed.sniffer is None:
        pytest.skip("the capture was stopped by an earlier run of this test")
    pki = bed.pki
    marker, control_marker = f"marker-{secrets.token_hex(12)}", f"plain-{secrets.token_hex(12)}"
    # Given the control: a plain-text replica on main_pc (--insecure), with a key of its own
    control = bed.spawn("main_pc", "api-plain", mfh_api_argv("main_pc", plain_config(bed, "main_pc"), "--insecure"))
    try:
        try:
            wait_until(
                lambda: tcp_open(bed.addr("main_pc"), PLAIN_GRPC) and tcp_open(bed.addr("main_pc"), PLAIN_ZMQ),
                timeout=60,
                interval=0.1,
                message="the plain-text control replica",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}:\n{bed.log('main_pc', 'api-plain')}") from None
        t0 = time.monotonic()
        # When the marker is written over gRPC/TLS on main_pc and over ZeroMQ/CURVE on pc2 (the writer key)
        with bed.client("main_pc") as c:
            written = c.put(PutSpec(NS, "wire-grpc", "memory_item", {"content": marker}))
        with ZmqClient(zmq_endpoint(bed, "pc2"), api_key=pki.writer_key, curve=pki.agent_curve("pc2")) as z:
            z.put(PutSpec(NS, "wire-zmq", "memory_item", {"content": marker}))
        # And read back on the other hosts with the reader key, once replicated (over the TLS routes)
        assert wait_readable(bed, "pc3", "wire-grpc").version == written.version
        assert wait_readable(bed, "pc3", "wire-zmq").payload_obj()["content"] == marker
        with ZmqClient(zmq_endpoint(bed, "main_pc"), api_key=pki.reader_key, curve=pki.agent_curve("main_pc")) as z:
            wait_until(lambda: _zmq_has(z, "wire-zmq"), timeout=REPLICATED_S, message="wire-zmq over CURVE")
            assert z.get(NS, "wire-zmq").payload_obj()["content"] == marker
        # And read from the stream by a NATS client on the bridge side (TLS, the password)
        assert asyncio.run(read_stream_for(bed, "pc2", marker)) >= 2
        # And the control marker is written in plain text, on both doors of the control replica
        with MemoryClient(f"{bed.addr('main_pc')}:{PLAIN_GRPC}", api_key=CONTROL_KEY) as plain:
            plain.put(PutSpec(NS, "wire-plain", "memory_item", {"content": control_marker}))
        with ZmqClient(zmq_endpoint(bed, "main_pc", PLAIN_ZMQ), api_key=CONTROL_KEY) as plain_zmq:
            plain_zmq.put(PutSpec(NS, "wire-plain-zmq", "memory_item", {"content": control_marker}))
        assert wait_readable(bed, "pc2", "wire-plain").payload_obj()["content"] == control_marker
        traffic_s = time.monotonic() - t0
    finally:
        _stop(control)
    stats = bed.stop_capture()
    # Then the capture saw everything the kernel gave it: no frame dropped, no hole in any stream
    assert stats["drops"] == 0 and stats["frames"] > 100, stats
    frames = list(read_frames(bed.capture_path))
    raw = b"".join(frames)
    streams = tcp_streams(bed.capture_path)
    kinds: dict[str, list[Stream]] = {}
    for s in streams.values():
        if s.data:  # (the bed's and the tests' port probes open and close connections that carry nothing)
            kinds.setdefault(stream_kind(s), []).append(s)
    assert set(kinds) == {"grpc", "zmq", "nats", "route", "control"}, f"the capture saw {sorted(kinds)}"
    assert not [s.flow for s in streams.values() if s.missing], "the capture has holes"
    # And every pair of hosts exchanged TLS records on its routes, from the handshake on (the capture
    # started before the servers, so it saw each route's SYN and ClientHello)
    addrs = {bed.addr(h): h for h in HOSTS}
    pairs: dict[frozenset[str], int] = {}
    for s in kinds["route"]:
        assert s.started, s.flow
        pair = frozenset((addrs[s.flow[0]], addrs[s.flow[2]]))
        pairs[pair] = pairs.get(pair, 0) + len(s.data)
    assert len(pairs) == 3 and min(pairs.values()) > 10_000, pairs
    tls_bytes = records = 0
    for kind in ("grpc", "nats", "route"):
        for s in kinds[kind]:
            w = tls_walk(s.data)
            assert s.started and w.whole, (kind, s.flow, w, s.data[:80])
            assert w.plain_prefix == 0 or s.data.startswith(b"INFO {"), (kind, s.flow)
            tls_bytes, records = tls_bytes + w.covered, records + w.units
    assert any(tls_walk(s.data).kinds.get("application_data", 0) > 10 for s in kinds["grpc"])
    # And ZeroMQ spoke CURVE: every frame after the greeting is a CURVE command, none a message in clear
    curve_frames = 0
    for s in kinds["zmq"]:
        w = zmtp_walk(s.data)
        assert zmtp_mechanism(s.data) == b"CURVE" and w.whole and "other" not in w.kinds, (s.flow, w)
        curve_frames += w.kinds.get("MESSAGE", 0)
    assert curve_frames >= 4
    # And neither the marker nor any key or password is anywhere in it (frames, or streams reassembled)
    for name, secret in {"marker": marker, **pki.all_secrets}.items():
        assert secret.encode() not in raw, f"the {name} crossed the bridge in clear text"
        assert not [s.flow for s in streams.values() if secret.encode() in s.data], f"the {name} is in a stream"
    secured = [s for k, ss in kinds.items() if k != "control" for s in ss]
    assert not [s.flow for s in secured if b"memory_item" in s.data or control_marker.encode() in s.data]
    # While the control's marker and key cross in clear text (so the capture can see a leak), on both doors
    for port in (PLAIN_GRPC, PLAIN_ZMQ):
        to_control = b"".join(s.data for s in kinds["control"] if s.flow[3] == port)
        assert control_marker.encode() in to_control, f"the capture missed the plain-text control on {port}"
    assert CONTROL_KEY.encode() in b"".join(s.data for s in kinds["control"] if s.flow[3] == PLAIN_ZMQ)
    assert zmtp_mechanism(next(s.data for s in kinds["control"] if s.flow[3] == PLAIN_ZMQ)) == b"NULL"
    record(
        "security_wire",
        frames=stats["frames"],
        captured_mb=stats["bytes"] / 1e6,
        streams=len(streams),
        tls_records=records,
        tls_mb=tls_bytes / 1e6,
        route_kb_min=min(pairs.values()) / 1e3,
        curve_messages=curve_frames,
        traffic_s=traffic_s,
    )


def _zmq_has(z: ZmqClient, key: str) -> bool:
    try:
        z.get(NS, key)
        return True
    except NotFound:
        return False


def _stop(p: subprocess.Popen[bytes]) -> None:
    from cluster.bed import _kill

    _kill(p)


# -- who may read and write -------------------------------------------------------------------


@pytest.fixture(scope="module")
def target(bed: Any) -> Any:
    """A record on every host, which the wrong clients try to read, overwrite and delete."""
    with bed.client("main_pc") as c:
        c.put(PutSpec(NS, "target", "memory_item", {"content": f"target-{secrets.token_hex(6)}"}))
    return {h: wait_readable(bed, h, "target") for h in HOSTS}


async def attempt(client: Any, key: str, wrote: list[str], read: list[str]) -> str:
    """A put of ``key`` and a get of the target through ``client``: what was refused, and how."""
    outcome = []
    try:
        for op in ("put", "get"):
            try:
                if op == "put":
                    await client.put(PutSpec(NS, key, "memory_item", {"content": "intruder"}))
                    wrote.append(key)
                else:
                    await client.get(NS, "target")
                    read.append(key)
            except MFHError as e:
                outcome.append(type(e).__name__)
    finally:
        close = getattr(client, "aclose", None)
        await (close() if close is not None else asyncio.sleep(0))
    return "/".join(outcome)


async def wrong_clients(bed: Any, other: Path, tag: str) -> dict[str, str]:
    """Every host's doors, knocked on by clients lacking one thing each: name -> the errors they got."""
    pki = bed.pki
    ca, agent = str(pki.dir("main_pc") / "ca.pem"), pki.agent_tls()
    foreign_cert = {"cert_file": str(other / "client.pem"), "key_file": str(other / "client.key")}
    grpc: dict[str, dict[str, Any]] = {
        "grpc plain text": {"api_key": pki.writer_key},
        "grpc another CA": {"api_key": pki.writer_key, "tls": TlsConfig(ca_file=str(other / "ca.pem"), **foreign_cert)},
        "grpc no client certificate": {"api_key": pki.writer_key, "tls": TlsConfig(ca_file=ca)},
        "grpc another CA's client certificate": {
            "api_key": pki.writer_key,
            "tls": TlsConfig(ca_file=ca, **foreign_cert),
        },
        "grpc no key": {"tls": agent},
        "grpc wrong key": {"api_key": f"wrong-{secrets.token_urlsafe(24)}", "tls": agent},
    }
    jobs: dict[str, Any] = {}
    wrote: list[str] = []
    read: list[str] = []
    for i, h in enumerate(HOSTS):
        neighbour = HOSTS[(i + 1) % len(HOSTS)]
        for name, kw in grpc.items():
            client = AsyncMemoryClient([bed.grpc(h)], retries=0, timeout=5.0, **kw)
            jobs[f"{h} {name}"] = attempt(client, f"bad-{tag}-{len(jobs)}", wrote, read)
        zmq: dict[str, dict[str, Any]] = {
            "zmq plain text": {"api_key": pki.writer_key},
            "zmq another host's server key": {"api_key": pki.writer_key, "curve": pki.agent_curve(neighbour)},
            "zmq unlisted client key": {  # the host's key, and a fresh key pair of the client's
                "api_key": pki.writer_key,
                "curve": CurveConfig.from_files(str(pki.dir(h) / "curve" / "server.key")),
            },
            "zmq no key": {"curve": pki.agent_curve(h)},
            "zmq wrong key": {"api_key": f"wrong-{secrets.token_urlsafe(24)}", "curve": pki.agent_curve(h)},
        }
        for name, kw in zmq.items():
            answered = name.endswith(("no key", "wrong key"))  # no answer at all is the others' refusal: wait less
            client = AsyncZmqClient([zmq_endpoint(bed, h)], retries=0, timeout=5.0 if answered else 1.5, **kw)
            jobs[f"{h} {name}"] = attempt(client, f"bad-{tag}-{len(jobs)}", wrote, read)
    outcomes = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
    assert not wrote and not read, f"wrong clients wrote {wrote} / read {read}: {outcomes}"
    return outcomes


async def wrong_nats_clients(bed: Any, other: Path) -> dict[str, str]:
    """NATS clients on the bridge side (TLS) without the password, with a wrong one, or trusting another CA."""
    pki = bed.pki
    url, ca = f"tls://{bed.addr('pc3')}:{NATS}", str(pki.dir("pc3") / "ca.pem")
    cases = {
        "nats no password": NatsSecurity(url=url, tls=True, ca_file=ca),
        "nats wrong password": NatsSecurity(url=url, tls=True, ca_file=ca, user=pki.nats_user, password="wrong-pw-0"),
        "nats another CA": NatsSecurity(
            url=url, tls=True, ca_file=str(other / "ca.pem"), user=pki.nats_user, password=pki.nats_password
        ),
    }
    out = {}
    for name, sec in cases.items():
        bus = EventBus(
            nats_url=sec.url,
            stream="memory_events",
            subject_prefix="mfh.events",
            duplicate_window_s=60,
            max_age_s=3600,
            name="test-intruder",
            security=sec,
        )
        try:
            await bus.connect(wait_s=5)
            out[name] = "connected"
        except MFHError as e:
            out[name] = type(e).__name__
        finally:
            with contextlib.suppress(Exception):
                await bus.close()
    return out


def plain_nats_publish(bed: Any, host: str) -> bytes:
    """The protocol in plain text, with the right password: log in, publish an event, ping."""
    pki = bed.pki
    with socket.create_connection((bed.addr(host), NATS), timeout=5) as s:
        info = s.recv(4096)
        assert b'"tls_required":true' in info, info[:200]
        got = b""
        try:
            s.sendall(
                f'CONNECT {{"user":"{pki.nats_user}","pass":"{pki.nats_password}","verbose":false}}\r\n'
                f"PUB mfh.events.{host}.forged 7\r\nforged!\r\nPING\r\n".encode()
            )
            while chunk := s.recv(4096):
                got += chunk
        except OSError:
            pass
        return got


def test_without_the_right_certificate_or_key_nothing_is_read_or_written(
    bed: Any, target: dict[str, Any], other_certs: Path
) -> None:
    t0 = time.monotonic()
    tag = secrets.token_hex(4)
    # When, on every host, gRPC and ZeroMQ clients each lacking one thing try to write a key and read the target
    outcomes = asyncio.run(wrong_clients(bed, other_certs, tag))
    # Then each was refused: no answer without TLS or CURVE, UNAUTHENTICATED without the key
    for name, got in outcomes.items():
        errors = got.split("/")
        assert len(errors) == 2, (name, got)
        if name.endswith(("no key", "wrong key")):
            assert set(errors) == {"Unauthenticated"}, (name, got)
        else:
            assert set(errors) <= {"Unavailable", "DeadlineExceeded"}, (name, got)
    # And NATS, from the bridge: no link without the password or with another CA, and plain text gets nothing
    nats = asyncio.run(wrong_nats_clients(bed, other_certs))
    assert set(nats.values()) == {"Unavailable"}, nats
    messages_before = asyncio.run(stream_messages(bed))
    assert b"PONG" not in plain_nats_publish(bed, "pc2")
    # And after every host has had the time to apply what it might have accepted, no host holds any of it
    settle(bed)
    intruders = [f"bad-{tag}-{i}" for i in range(len(outcomes))]
    for h in HOSTS:
        assert in_sql(bed, h, intruders) == {}, h
        with reader(bed, h) as c:
            assert c.get(NS, "target").version == target[h].version
            for k in intruders:
                with pytest.raises(NotFound):
                    c.get(NS, k)
    assert asyncio.run(stream_forged(bed)) == []
    assert asyncio.run(stream_messages(bed)) == messages_before + len(HOSTS), "the stream holds more than the settle"
    record("security_refusals", clients=len(outcomes) + len(nats) + 1, seconds=time.monotonic() - t0)


async def _bus(bed: Any, host: str) -> EventBus:
    r = load_settings(host, config_dir=bed.hosts[host].config_dir, env={}).replication
    bus = EventBus.from_settings(r, name="test-check")
    await bus.connect(wait_s=10)
    return bus


async def stream_messages(bed: Any) -> int:
    bus = await _bus(bed, "main_pc")
    try:
        return int((await bus.stream_info())["messages"])
    finally:
        await bus.close()


async def stream_forged(bed: Any) -> list[str]:
    """The forged subject, if a message on it reached the stream."""
    bus = await _bus(bed, "main_pc")
    try:
        info = await bus.conn.jetstream().stream_info(bus.stream, subjects_filter=f"{bus.subject_prefix}.*.forged")
        return list(info.state.subjects or {})
    finally:
        await bus.close()


def test_a_read_only_key_reads_but_cannot_write(bed: Any, target: dict[str, Any]) -> None:
    pki = bed.pki
    tag = secrets.token_hex(4)
    # Given the reader key, on gRPC/TLS and ZeroMQ/CURVE of every host
    for h in HOSTS:
        clients: list[Any] = [
            reader(bed, h, retries=0),
            ZmqClient(zmq_endpoint(bed, h), api_key=pki.reader_key, curve=pki.agent_curve(h), retries=0),
        ]
        for door, c in zip(("grpc", "zmq"), clients, strict=True):
            with c:
                # Then it reads the target
                assert c.get(NS, "target").version == target[h].version
                # But may not put, batch-put, overwrite or delete
                with pytest.raises(PermissionDenied):
                    c.put(PutSpec(NS, f"ro-{tag}-{h}-{door}", "memory_item", {"content": "ro"}))
                with pytest.raises(PermissionDenied):
                    c.batch_put([PutSpec(NS, f"ro-{tag}-{h}-{door}-b", "memory_item", {"content": "ro"})])
                with pytest.raises(PermissionDenied):
                    c.put(PutSpec(NS, "target", "memory_item", {"content": "overwritten"}))
                with pytest.raises(PermissionDenied):
                    c.delete(NS, "target")
    unknown = MemoryClient(bed.grpc("pc3"), api_key=pki.reader_key[::-1], tls=pki.agent_tls(), retries=0)
    with unknown, pytest.raises(Unauthenticated):  # (the reader key is a key: an unknown one is not)
        unknown.get(NS, "target")
    # And nothing changed anywhere
    settle(bed)
    attempted = [f"ro-{tag}-{x}-{d}{b}" for x in HOSTS for d in ("grpc", "zmq") for b in ("", "-b")]
    for h in HOSTS:
        assert in_sql(bed, h, attempted) == {}, h
        assert in_sql(bed, h, ["target"])["target"].version == target[h].version
