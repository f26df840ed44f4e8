"""Serve this process's metrics over HTTP, tolerating a port another process of the host took."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

__all__ = ["serve_metrics"]

log = logging.getLogger("mfh.metrics")


def serve_metrics(port: int, *, addr: str = "127.0.0.1", what: str = "process") -> bool:
    """Start the /metrics endpoint; False (with a log line) when the port is 0 or already taken."""
    if port == 0:
        return False
    try:
        start_http_server(port, addr=addr)
    except OSError as e:
        log.warning("%s metrics not served on %s:%d: %s (another replica has it)", what, addr, port, e.strerror)
        return False
    log.info("%s metrics on http://%s:%d/metrics", what, addr, port)
    return True
