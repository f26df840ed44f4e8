"""Transport security: TLS (and client certificates) on gRPC, CURVE on ZeroMQ, with the keys that
scripts/make_certs.sh makes, as an operator would; nothing readable on the wire; the bind guard."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hosts import make_host
from proxy import TcpProxy

from mfh_api.auth import check_bind_is_safe
from mfh_api.grpc_server import GrpcServer
from mfh_api.service import MemoryService, build_service
from mfh_api.zmq_server import ZmqServer
from mfh_client import AsyncMemoryClient, AsyncZmqClient, PutSpec
from mfh_client.security import CurveConfig, TlsConfig
from mfh_models import ConfigError, DeadlineExceeded, InvalidArgument, MFHError, Unavailable, load_settings

ROOT = Path(__file__).resolve().parent.parent


def tls_server(certs: Path, *, client_ca: bool = False) -> dict[str, Any]:
    return {
        "tls_cert_file": str(certs / "server.pem"),
        "tls_key_file": str(certs / "server.key"),
        "tls_client_ca_file": str(certs / "ca.pem") if client_ca else None,
    }


def curve_server(certs: Path, *, listed_only: bool = False) -> dict[str, Any]:
    return {
        "zmq_curve_secret_file": str(certs / "curve" / "server.key_secret"),
        "zmq_curve_clients_dir": str(certs / "curve" / "clients") if listed_only else None,
    }


@pytest.fixture
async def service(tmp_path: Path, redis_url: str) -> AsyncIterator[MemoryService]:
    host = make_host(
        tmp_path, redis_url=redis_url, overrides={"storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"}}
    )
    svc = await build_service(host.settings)
    try:
        yield svc
    finally:
        await svc.close()


def with_server(tmp_path: Path, **server: Any) -> Any:
    """Settings whose ``server`` section has these values (the service is built separately)."""
    host = make_host(tmp_path / uuid.uuid4().hex[:6], redis_url="redis://127.0.0.1:1/0", overrides={"server": server})
    return host.settings


async def works(client: Any) -> bool:
    """A put and a get of a fresh key through ``client``: True if both succeed, False if refused/unreachable."""
    key = f"k{secrets.token_hex(4)}"
    try:
        await client.put(PutSpec("sec", key, "memory_item", {"content": "hello"}))
        return bool((await client.get("sec", key)).key == key)
    except (Unavailable, DeadlineExceeded):
        return False
    finally:
        close = getattr(client, "aclose", None)
        if close is not None:
            await close()


async def test_grpc_over_tls_needs_the_right_ca(
    service: MemoryService, tmp_path: Path, certs: Path, other_certs: Path
) -> None:
    # Given an api serving gRPC over TLS with the script's server certificate
    server = GrpcServer(service, with_server(tmp_path, **tls_server(certs)))
    port = await server.start()
    address = [f"127.0.0.1:{port}"]
    try:
        # Then a client that trusts the CA reads and writes; a plain-text one and one trusting another CA cannot
        assert await works(AsyncMemoryClient(address, tls=TlsConfig(ca_file=str(certs / "ca.pem")), retries=0))
        assert not await works(AsyncMemoryClient(address, retries=0, timeout=2))
        assert not await works(
            AsyncMemoryClient(address, tls=TlsConfig(ca_file=str(other_certs / "ca.pem")), retries=0)
        )
        # And the name the certificate was made for is checked (here: one of the script's NAMEs)
        named = TlsConfig(ca_file=str(certs / "ca.pem"), server_name="hub.example")
        assert await works(AsyncMemoryClient(address, tls=named, retries=0))
        wrong = TlsConfig(ca_file=str(certs / "ca.pem"), server_name="not-the-hub.example")
        assert not await works(AsyncMemoryClient(address, tls=wrong, retries=0))
    finally:
        await server.stop(0)


async def test_client_certificates_when_the_hub_requires_them(
    service: MemoryService, tmp_path: Path, certs: Path, other_certs: Path
) -> None:
    server = GrpcServer(service, with_server(tmp_path, **tls_server(certs, client_ca=True)))
    port = await server.start()
    address = [f"127.0.0.1:{port}"]
    ca = str(certs / "ca.pem")
    try:
        mine = TlsConfig(ca_file=ca, cert_file=str(certs / "client.pem"), key_file=str(certs / "client.key"))
        assert await works(AsyncMemoryClient(address, tls=mine, retries=0))
        assert not await works(AsyncMemoryClient(address, tls=TlsConfig(ca_file=ca), retries=0))
        foreign = TlsConfig(
            ca_file=ca, cert_file=str(other_certs / "client.pem"), key_file=str(other_certs / "client.key")
        )
        assert not await works(AsyncMemoryClient(address, tls=foreign, retries=0))
    finally:
        await server.stop(0)


async def test_zeromq_over_curve_needs_the_servers_key(
    service: MemoryService, tmp_path: Path, certs: Path, other_certs: Path
) -> None:
    server = ZmqServer.from_settings(service, with_server(tmp_path, **curve_server(certs)))
    await server.start()
    endpoint = [server.endpoint]
    try:
        right = CurveConfig.from_files(str(certs / "curve" / "server.key"))
        assert await works(AsyncZmqClient(endpoint, curve=right, retries=0, timeout=3))
        assert not await works(AsyncZmqClient(endpoint, retries=0, timeout=1))  # plain text: no handshake
        wrong = CurveConfig.from_files(str(other_certs / "curve" / "server.key"))
        assert not await works(AsyncZmqClient(endpoint, curve=wrong, retries=0, timeout=1))
    finally:
        await server.close()


async def test_zeromq_listed_clients_only(service: MemoryService, tmp_path: Path, certs: Path) -> None:
    server = ZmqServer.from_settings(service, with_server(tmp_path, **curve_server(certs, listed_only=True)))
    await server.start()
    endpoint = [server.endpoint]
    server_key = str(certs / "curve" / "server.key")
    try:
        listed = CurveConfig.from_files(server_key, str(certs / "curve" / "client.key_secret"))
        assert await works(AsyncZmqClient(endpoint, curve=listed, retries=0, timeout=3))
        unlisted = CurveConfig.from_files(server_key)  # a fresh key pair, not in curve/clients/
        assert not await works(AsyncZmqClient(endpoint, curve=unlisted, retries=0, timeout=1))
    finally:
        await server.close()


async def test_nothing_readable_on_the_wire(service: MemoryService, tmp_path: Path, certs: Path) -> None:
    # Given both doors secured, and a proxy in front of each that records every byte (a sniffer)
    settings = with_server(tmp_path, **tls_server(certs), **curve_server(certs))
    grpc_server, zmq_server = GrpcServer(service, settings), ZmqServer.from_settings(service, settings)
    grpc_port = await grpc_server.start()
    await zmq_server.start()
    plain = ZmqServer(service, port=0)  # the control: the same traffic without CURVE
    await plain.start()
    proxies = [TcpProxy("127.0.0.1", p, capture=True).start() for p in (grpc_port, zmq_server.port, plain.port)]
    marker = f"secret-memory-{secrets.token_hex(8)}"
    try:
        tls = TlsConfig(ca_file=str(certs / "ca.pem"))
        curve = CurveConfig.from_files(str(certs / "curve" / "server.key"))
        clients: list[Any] = [
            AsyncMemoryClient([f"127.0.0.1:{proxies[0].port}"], tls=tls, retries=0),
            AsyncZmqClient([f"tcp://127.0.0.1:{proxies[1].port}"], curve=curve, retries=0, timeout=3),
            AsyncZmqClient([f"tcp://127.0.0.1:{proxies[2].port}"], retries=0, timeout=3),
        ]
        for i, c in enumerate(clients):
            # When a memory holding the marker is written and read back through each
            await c.put(PutSpec("sec", f"wire{i}", "memory_item", {"content": marker}))
            assert (await c.get("sec", f"wire{i}")).payload_obj()["content"] == marker
            await c.aclose()
        # Then the marker crossed the plain proxy in clear text, and neither secured one
        assert marker.encode() in bytes(proxies[2].captured)
        for p in proxies[:2]:
            assert len(p.captured) > 1000 and marker.encode() not in bytes(p.captured)
            assert b"memory_item" not in bytes(p.captured)
    finally:
        for p in proxies:
            p.cut()
        await grpc_server.stop(0)
        await zmq_server.close()
        await plain.close()


def test_settings_refuse_half_a_configuration(tmp_path: Path, certs: Path) -> None:
    def load(**server: Any) -> Any:
        host = make_host(tmp_path / uuid.uuid4().hex[:6], redis_url="redis://127.0.0.1:1/0")
        path = host.config_dir / "main_pc.yaml"
        data = yaml.safe_load(path.read_text())
        data["server"].update(server)
        path.write_text(yaml.safe_dump(data))
        return load_settings("main_pc", config_dir=host.config_dir, env={})

    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        load(tls_cert_file=str(certs / "server.pem"))
    with pytest.raises(ConfigError, match="must be an absolute path"):
        load(tls_cert_file="server.pem", tls_key_file="server.key")
    with pytest.raises(ConfigError, match="client certificates need TLS"):
        load(tls_client_ca_file=str(certs / "ca.pem"))
    with pytest.raises(ConfigError, match="zmq_curve_clients_dir needs zmq_curve_secret_file"):
        load(zmq_curve_clients_dir=str(certs / "curve" / "clients"))


async def test_a_missing_key_file_is_named_at_start(service: MemoryService, tmp_path: Path, certs: Path) -> None:
    gone = str(tmp_path / "nowhere.key")
    server = GrpcServer(service, with_server(tmp_path, tls_cert_file=str(certs / "server.pem"), tls_key_file=gone))
    with pytest.raises(ConfigError, match=r"nowhere\.key"):
        await server.start()
    zmq = ZmqServer(service, port=0, curve_secret_file=str(certs / "curve" / "server.key"))  # public half only
    with pytest.raises(ConfigError, match="holds no secret key"):
        await zmq.start()
    # and the client side: a missing CA file or a short CURVE key is a clear InvalidArgument
    with pytest.raises(InvalidArgument, match="cannot read the CA file"):
        AsyncMemoryClient(["127.0.0.1:1"], tls=TlsConfig(ca_file=gone))
    with pytest.raises(InvalidArgument, match="40 characters"):
        CurveConfig(b"short")
    with pytest.raises(MFHError):
        CurveConfig.from_files(gone)


def test_the_api_refuses_an_open_bind_without_tls_and_curve(tmp_path: Path, certs: Path) -> None:
    from test_cli import mfh

    host = make_host(tmp_path, redis_url="redis://127.0.0.1:1/0", overrides={"server": {"api_key": "k" * 32}})
    env = {"MFH_BIND": "0.0.0.0"}
    refused = mfh(host, "api", env=env)
    assert refused.returncode == 2, refused.stderr
    assert "no TLS for gRPC" in refused.stderr and "no CURVE for ZeroMQ" in refused.stderr
    assert "no API key" not in refused.stderr and "make_certs.sh" in refused.stderr
    # With the three set the same way (the variables default.yaml reads), the guard lets the api bind
    secured = {
        **env,
        "MFH_TLS_CERT": str(certs / "server.pem"),
        "MFH_TLS_KEY": str(certs / "server.key"),
        "MFH_CURVE_SECRET": str(certs / "curve" / "server.key_secret"),
    }
    check_bind_is_safe(load_settings("main_pc", config_dir=host.config_dir, env=secured), insecure=False)


def test_the_mfh_command_over_tls_and_curve(tmp_path: Path, redis_url: str, certs: Path) -> None:
    from services import free_port, tcp_open, wait_until
    from test_cli import mfh

    grpc_port, zmq_port = free_port(), free_port()
    server = {**tls_server(certs), **curve_server(certs), "grpc_port": grpc_port, "zmq_port": zmq_port}
    host = make_host(
        tmp_path,
        redis_url=redis_url,
        overrides={"server": server, "storage": {"redis_prefix": f"t{uuid.uuid4().hex[:8]}"}},
    )
    api = host.spawn("mfh_api.cli", "api", "--metrics-port", "0", log_name="api")
    try:
        wait_until(lambda: tcp_open("127.0.0.1", grpc_port) and tcp_open("127.0.0.1", zmq_port), 60, message="api")
        assert api.poll() is None, host.log("api")
        # The host's own api serves TLS: without the CA the command says what to give, in one line
        refused = mfh(host, "get", "sec", "k")
        assert refused.returncode == 2 and "--tls-ca" in refused.stderr, refused.stderr
        put = mfh(host, "put", "sec", "k", '{"content": "over tls"}', "--tls-ca", str(certs / "ca.pem"))
        assert put.returncode == 0, put.stderr
        # ZeroMQ to this host's api: the public key comes from the host's own key pair
        got = mfh(host, "get", "sec", "k", "--transport", "zmq")
        assert got.returncode == 0 and "over tls" in got.stdout, got.stderr
        # Given an endpoint and no key, it is plain text: the hub never answers it
        plain = mfh(
            host,
            "get",
            "sec",
            "k",
            "--transport",
            "zmq",
            "--endpoint",
            f"tcp://127.0.0.1:{zmq_port}",
            "--timeout",
            "1",
            "--retries",
            "0",
        )
        assert plain.returncode != 0
    finally:
        host.stop_all()
