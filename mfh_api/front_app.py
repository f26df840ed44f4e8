"""The ``mfh front`` process: settings → :class:`ZmqFront` + Prometheus endpoint, until a signal.

It needs no store: replicas come and go behind it (docs/operations.md, "Several api replicas"). It keeps a
heartbeat in the host's Redis (role ``front``, with its replicas, live or not: what ``mfh status`` shows), best
effort: with Redis down it serves as before.
On SIGTERM/SIGINT new requests are answered UNAVAILABLE, held ones get their answers (a few
seconds at most), then the sockets close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from typing import Any

from prometheus_client import start_http_server

from mfh_api.auth import is_loopback
from mfh_api.zmq_front import ZmqFront
from mfh_core.heartbeat import Heartbeat
from mfh_core.jsonlog import configure_json_logging
from mfh_core.redaction import install_loop_exception_handler, install_redaction
from mfh_models import ConfigError, Settings

__all__ = ["check_front_bind", "configure_front_logging", "run_front"]

log = logging.getLogger("mfh.front")


def configure_front_logging(settings: Settings, level: int = logging.INFO) -> None:
    """JSON lines on stderr (``"process": "front"``), through the redaction filter."""
    logging.basicConfig(level=level, handlers=[logging.StreamHandler(sys.stderr)], force=True)
    configure_json_logging(level, process="front")
    install_redaction(settings)


def check_front_bind(settings: Settings, *, insecure: bool) -> None:
    """Refuse a non-loopback door without CURVE unless --insecure (docs/security.md); the replicas check keys."""
    s = settings.server
    if insecure or is_loopback(s.bind) or s.curve:
        return
    raise ConfigError(
        f"server.bind is {s.bind!r} (reachable from other machines) with no CURVE for ZeroMQ (MFH_CURVE_SECRET, "
        "server.zmq_curve_secret_file): set it, bind to 127.0.0.1, or pass --insecure to accept the risk"
    )


def _start_metrics(settings: Settings) -> Any:
    port = settings.metrics.front_port
    if port == 0:
        return None
    try:
        httpd, _thread = start_http_server(port, addr=settings.server.bind)
    except OSError as e:
        raise OSError(f"cannot bind metrics to {settings.server.bind}:{port}: {e} (metrics.front_port)") from e
    return httpd


async def run_front(
    settings: Settings,
    *,
    replicas: list[str] | None = None,
    insecure: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``); ConfigError before binding for an unsafe bind or no replica."""
    check_front_bind(settings, insecure=insecure)
    endpoints = replicas or settings.front.replicas
    if not endpoints:
        raise ConfigError("front: no replica to send requests to (--replica, front.replicas, MFH_FRONT_REPLICAS)")
    install_redaction(settings)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    install_loop_exception_handler(loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    front = ZmqFront.from_settings(settings, endpoints)
    await front.start()
    httpd = None
    beating: asyncio.Task[None] | None = None
    beats = asyncio.Event()  # set: the heartbeat deletes its key and ends
    try:
        httpd = _start_metrics(settings)
        heartbeat = Heartbeat.of(
            settings,
            "front",
            metrics_port=httpd.server_port if httpd is not None else 0,
            extra=lambda: {"zmq_port": front.port, "replicas": front.replica_states()},
        )
        front.on_change = heartbeat.nudge
        beating = asyncio.create_task(heartbeat.run(beats), name="mfh-heartbeat")
        log.info(
            "front ready",
            extra={
                "zmq_port": front.port,
                "replicas": len(endpoints),
                "metrics_port": httpd.server_port if httpd is not None else None,
            },
        )
        await stop.wait()
        log.info("shutting down")
    finally:
        started = time.monotonic()
        beats.set()
        await front.close(grace=min(settings.server.deadline_seconds + 1.0, 10.0))
        if beating is not None:
            await beating
        if httpd is not None:
            httpd.shutdown()
        log.info("stopped in %.2fs", time.monotonic() - started)
