"""One JSON log line format for every process: api, worker (Dramatiq's own lines too), replicator,
scheduler and ``mfh --json``.

Stdlib ``logging`` with one formatter, not structlog: every library we run (Dramatiq, APScheduler,
nats-py, grpc, SQLAlchemy) logs through stdlib logging, and the redaction filter
(:mod:`mfh_core.redaction`) is a stdlib filter on the root handlers; a formatter on those same
handlers covers all of it with no second pipeline and no new dependency.

Fields: ``ts`` (unix seconds), ``level``, ``logger``, ``msg``, ``process`` (api, worker, ...), then
whichever of :data:`CONTEXT_FIELDS` the call passed in ``extra=``. Never a payload: the message is
the redacted text, and only the named context fields are copied.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Final

__all__ = ["CONTEXT_FIELDS", "JsonFormatter", "configure_json_logging"]

#: ``extra=`` keys copied into the line when present (values are ids, names, numbers: never payloads).
CONTEXT_FIELDS: Final = (
    "request_id",
    "event_id",
    "namespace",
    "action",
    "latency_ms",
    "outcome",
    "host_id",
    "grpc_port",
    "zmq_port",
    "metrics_port",
    "event_loop",
    "path",
    "seq",
)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: easy to grep and to ship."""

    def __init__(self, *, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.process is not None:
            out["process"] = self.process
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # the redaction filter leaves a safe rendering here
            out["exc"] = record.exc_text
        for k in CONTEXT_FIELDS:
            value = record.__dict__.get(k)
            if value is not None:
                out[k] = value
        return json.dumps(out, default=str)


def configure_json_logging(level: int = logging.INFO, *, process: str | None = None) -> None:
    """Every handler on the root logger (one on stderr if there is none) writes JSON lines.

    Existing handlers keep their stream and filters (the Dramatiq worker's pipe to its parent, the
    redaction filter); only their formatter changes.
    """
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        handler.setFormatter(JsonFormatter(process=process))
    root.setLevel(level)
