"""The api process: settings → service → gRPC + ZeroMQ servers + Prometheus endpoint, until a signal.

``python -m mfh_api.app [--host main_pc] [--insecure]`` runs it (``mfh api`` does the same).
SIGHUP (or a change of the keys file) reloads the scoped API keys (docs/security.md).
Shutdown on SIGTERM/SIGINT: report NOT_SERVING, answer new calls UNAVAILABLE ("shutting down",
so clients fail over; never CANCELLED), let running ones finish, flush the write batcher into the
queue, close the stores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from prometheus_client import start_http_server

from mfh_api.auth import check_bind_is_safe
from mfh_api.grpc_server import GrpcServer
from mfh_api.keys import KeyRing
from mfh_api.service import MemoryService, build_service
from mfh_core.gc_policy import CollectorPolicy
from mfh_core.heartbeat import Heartbeat
from mfh_core.jsonlog import JsonFormatter, configure_json_logging
from mfh_core.redaction import install_loop_exception_handler, install_redaction
from mfh_core.redis_health import check_persistence
from mfh_models import ConfigError, Settings, StoreNotCurrent, load_settings

__all__ = ["JsonFormatter", "check_ports_free", "configure_logging", "main", "run_api"]

log = logging.getLogger("mfh.api")


class _Server(Protocol):
    async def start(self) -> Any: ...
    async def close(self, grace: float = ...) -> None: ...

    port: int


def configure_logging(level: int = logging.INFO, settings: Settings | None = None) -> None:
    """JSON lines on stderr, through the redaction filter (``settings`` adds its exact secrets)."""
    logging.basicConfig(level=level, handlers=[logging.StreamHandler(sys.stderr)], force=True)
    configure_json_logging(level, process="api")
    install_redaction(settings)


def _zmq_server(service: MemoryService, settings: Settings, keys: KeyRing) -> _Server | None:
    try:
        from mfh_api.zmq_server import ZmqServer  # issue 3b
    except ImportError as e:
        log.warning("ZeroMQ server not available (%s); serving gRPC only", e)
        return None
    server: _Server = ZmqServer.from_settings(service, settings, keys=keys)
    return server


def _in_use(bind: str, port: int) -> bool:
    """Whether something listens on ``bind:port`` (a probe bind, as the servers bind: SO_REUSEADDR, no SO_REUSEPORT)."""
    try:
        addresses = socket.getaddrinfo(bind or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"cannot bind to {bind}: {e.strerror or e} (server.bind, MFH_BIND)") from None
    for family, kind, proto, _name, addr in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT left by a stopped api is no user
            try:
                probe.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
                raise OSError(f"cannot bind to {bind}:{port}: {e.strerror or e} (server.bind, MFH_BIND)") from None
    return False


def check_ports_free(settings: Settings) -> None:
    """OSError naming the first port of this api (ZeroMQ, gRPC, metrics) that something already listens on.

    Run before anything starts, so a taken port ends ``mfh api`` at once. gRPC binds without
    SO_REUSEPORT: two processes never share a port (another host's api would answer this host's
    clients), and replicas of one host each get their own ports (``--grpc-port``, ``--zmq-port``).
    """
    s = settings.server
    _in_use(s.bind, 0)  # an address this machine does not have, before gRPC core logs its own complaint
    for name, port, flag in (
        ("ZeroMQ", s.zmq_port, "--zmq-port"),
        ("gRPC", s.grpc_port, "--grpc-port"),
        ("metrics", s.metrics_port, "--metrics-port"),
    ):
        if port and _in_use(s.bind, port):
            raise OSError(
                f"{name} port {port} on {s.bind} is already in use (another mfh api or another program); "
                f"stop it, or give this api its own port with {flag}"
                + (" (0 turns the metrics endpoint off)" if name == "metrics" else "")
            )


def _start_metrics(settings: Settings) -> Any:
    if settings.server.metrics_port == 0:  # 0 turns it off, as for the other processes' metrics ports
        return None
    try:
        httpd, _thread = start_http_server(settings.server.metrics_port, addr=settings.server.bind)
    except OSError as e:  # taken since check_ports_free looked
        raise OSError(f"cannot bind metrics to {settings.server.bind}:{settings.server.metrics_port}: {e}") from e
    return httpd


async def run_api(settings: Settings, *, insecure: bool = False, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set); ConfigError before binding if the bind is unsafe."""
    check_bind_is_safe(settings, insecure=insecure)
    keys = KeyRing.from_settings(settings)  # a keys file that does not load ends the api here (exit 2)
    check_ports_free(settings)
    install_redaction(settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    install_loop_exception_handler(loop)  # "Task exception was never retrieved" would print a reply's repr
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, keys.reload_soon)
    if keys.keys_file is not None:
        log.info("API keys from %s: %d keys (%s)", keys.keys_file, len(keys.names), ", ".join(keys.names))
    service = await build_service(settings)
    await check_persistence(service.hot.redis, url=settings.storage.redis_url, process="api")
    beat_stop = asyncio.Event()
    heartbeat = Heartbeat.of(settings, "api", metrics_port=settings.server.metrics_port)
    beating = asyncio.create_task(heartbeat.run(beat_stop), name="mfh-heartbeat")
    grpc_server = GrpcServer(service, settings, keys=keys)
    zmq = _zmq_server(service, settings, keys)
    watching = asyncio.create_task(keys.watch_file(beat_stop), name="mfh-keys") if keys.keys_file else None
    httpd = None
    s = settings.server
    collector = CollectorPolicy(full_interval_s=s.gc_full_interval_seconds, rss_growth_mb=s.gc_rss_growth_mb)
    collecting: asyncio.Task[None] | None = None
    try:
        # Start-up objects never die: frozen out of every collection, before the first client can
        # wait on one; from then on full collections run on the policy's schedule, not on allocation.
        collector.install()
        collecting = asyncio.create_task(collector.run(beat_stop), name="mfh-gc")
        await grpc_server.start()
        if zmq is not None:
            await zmq.start()
        httpd = _start_metrics(settings)
        log.info(
            "api ready",
            extra={
                "host_id": settings.host_id,
                "grpc_port": grpc_server.port,
                "zmq_port": zmq.port if zmq is not None else None,
                "metrics_port": httpd.server_port if httpd is not None else None,
                "event_loop": type(loop).__module__.split(".")[0],  # uvloop or asyncio
            },
        )
        await stop.wait()
        log.info("shutting down")
    finally:
        started = time.monotonic()
        # Both front doors drain at once: new calls get UNAVAILABLE (retry elsewhere), calls in flight
        # finish (their own deadline, plus a margin, bounds the wait), then the stores close.
        grace = min(settings.server.deadline_seconds + 1.0, 10.0)
        stops = [grpc_server.stop(grace=grace)] + ([zmq.close(grace=grace)] if zmq is not None else [])
        await asyncio.gather(*stops)
        beat_stop.set()
        await beating
        if watching is not None:
            await watching
        if collecting is not None:
            await collecting
        collector.uninstall()
        await service.close()
        if httpd is not None:
            httpd.shutdown()
        log.info("stopped in %.2fs", time.monotonic() - started)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The api's event loop (``server.event_loop``): uvloop's for ``auto`` when it is installed (the server
    extra ships it) and for ``uvloop``; None (asyncio's own) for ``asyncio``. ConfigError for ``uvloop``
    without uvloop. uvloop's loop takes less CPU per callback and per socket wake-up than the selector
    loop, which is where a Get answered from the near cache spends most of its time besides grpc."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("server.event_loop is uvloop, but uvloop is not installed (pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: list[str] | None = None) -> int:
    """Entry point: read the settings once, then serve."""
    parser = argparse.ArgumentParser(prog="mfh-api", description="Memory Fusion Hub api (gRPC + ZeroMQ)")
    parser.add_argument("--host", help="host id whose config/<host>.yaml to load (default: MFH_HOST)")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without an API key")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        settings = load_settings(args.host)
        with asyncio.Runner(loop_factory=loop_factory(settings.server.event_loop)) as runner:
            runner.run(run_api(settings, insecure=args.insecure))
    except ConfigError as e:
        print(f"mfh api: {e}", file=sys.stderr)
        return 2
    except StoreNotCurrent as e:
        print(f"mfh api: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mfh api: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
