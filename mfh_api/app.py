"""The api process: settings → service → gRPC + ZeroMQ servers + Prometheus endpoint, until a signal.

``python -m mfh_api.app [--host main_pc] [--insecure]`` runs it (``mfh api`` does the same).
Shutdown on SIGTERM/SIGINT: report NOT_SERVING, answer new calls UNAVAILABLE ("shutting down",
so clients fail over; never CANCELLED), let running ones finish, flush the write batcher into the
queue, close the stores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from typing import Any, Protocol

from prometheus_client import start_http_server

from mfh_api.auth import check_bind_is_safe
from mfh_api.grpc_server import GrpcServer
from mfh_api.service import MemoryService, build_service
from mfh_core.jsonlog import JsonFormatter, configure_json_logging
from mfh_core.redaction import install_loop_exception_handler, install_redaction
from mfh_core.redis_health import check_persistence
from mfh_models import ConfigError, Settings, StoreNotCurrent, load_settings

__all__ = ["JsonFormatter", "configure_logging", "main", "run_api"]

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


def _zmq_server(service: MemoryService, settings: Settings) -> _Server | None:
    try:
        from mfh_api.zmq_server import ZmqServer  # issue 3b
    except ImportError as e:
        log.warning("ZeroMQ server not available (%s); serving gRPC only", e)
        return None
    server: _Server = ZmqServer.from_settings(service, settings)
    return server


def _start_metrics(settings: Settings) -> Any:
    if settings.server.metrics_port == 0:  # 0 turns it off, as for the other processes' metrics ports
        return None
    try:
        httpd, _thread = start_http_server(settings.server.metrics_port, addr=settings.server.bind)
    except OSError as e:  # a second replica on one host: the first one serves the port
        log.warning("metrics port %d not bound (%s); continuing without it", settings.server.metrics_port, e)
        return None
    return httpd


async def run_api(settings: Settings, *, insecure: bool = False, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set); ConfigError before binding if the bind is unsafe."""
    check_bind_is_safe(settings, insecure=insecure)
    install_redaction(settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    install_loop_exception_handler(loop)  # "Task exception was never retrieved" would print a reply's repr
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    service = await build_service(settings)
    await check_persistence(service.hot.redis, url=settings.storage.redis_url, process="api")
    grpc_server = GrpcServer(service, settings)
    zmq = _zmq_server(service, settings)
    httpd = None
    try:
        await grpc_server.start()
        if zmq is not None:
            await zmq.start()
        httpd = _start_metrics(settings)
        # Start-up objects never die: keep them out of the collector's way (fewer long GC pauses).
        gc.collect()
        gc.freeze()
        log.info(
            "api ready",
            extra={
                "host_id": settings.host_id,
                "grpc_port": grpc_server.port,
                "zmq_port": zmq.port if zmq is not None else None,
                "metrics_port": httpd.server_port if httpd is not None else None,
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
        await service.close()
        if httpd is not None:
            httpd.shutdown()
        log.info("stopped in %.2fs", time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    """Entry point: read the settings once, then serve."""
    parser = argparse.ArgumentParser(prog="mfh-api", description="Memory Fusion Hub api (gRPC + ZeroMQ)")
    parser.add_argument("--host", help="host id whose config/<host>.yaml to load (default: MFH_HOST)")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without an API key")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        settings = load_settings(args.host)
        asyncio.run(run_api(settings, insecure=args.insecure))
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
