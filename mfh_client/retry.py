"""The one retry policy of every client (gRPC and ZeroMQ, sync and async); docs/api.md has the table.

:class:`mfh_client.calls.RetryPolicy` asks it; the transports classify each failure.

What a repeat could do decides it:

- reads are always safe to repeat: retried on UNAVAILABLE, CANCELLED, RESOURCE_EXHAUSTED and
  DEADLINE_EXCEEDED (and, on ZeroMQ, when no reply came);
- unconditional puts: retried on UNAVAILABLE, CANCELLED, RESOURCE_EXHAUSTED (and, on ZeroMQ, when
  no reply came: as a lost connection). A server that
  answers UNAVAILABLE staged nothing; a connection lost mid-call may have run it, and a repeat
  then writes the same content under a newer version (the same stored state). Not on
  DEADLINE_EXCEEDED: the write may be accepted (the message says so) and the caller decides;
- conditional writes (an expected_version) and deletes: retried only when the server cannot have
  run them: RESOURCE_EXHAUSTED, UNAVAILABLE answered by the server itself (nothing was staged), or
  a call that never reached a server. A repeat of one that ran would answer FAILED_PRECONDITION or
  NOT_FOUND.

CANCELLED never comes from an MFH server on purpose (it answers UNAVAILABLE while shutting down);
seen by a client it means the call was cut off, and is treated as UNAVAILABLE from the transport.
"""

from __future__ import annotations

import random
from enum import Enum
from typing import Final

__all__ = ["SERVER_ANSWER_METADATA", "CallKind", "delay", "retryable"]

#: Trailing metadata key the gRPC server sets on every error it answers itself (not the transport).
SERVER_ANSWER_METADATA: Final = "mfh-answer"

_NEVER_SENT: Final = ("failed to connect", "connection refused", "dns resolution failed", "no route to host")
_TOO_LARGE: Final = ("message larger than max", "received message larger")


class CallKind(Enum):
    READ = "read"  # Get, BatchGet, List
    WRITE = "write"  # a put or batch put without expected_version
    CONDITIONAL = "conditional"  # a write with expected_version, or a delete


def retryable(kind: CallKind, code: str, details: str = "", *, answered_by_server: bool = False) -> bool:
    """Whether a call of ``kind`` that failed with ``code`` (a gRPC status name, or the same name in a
    ZeroMQ error; ``NO_REPLY`` for a ZeroMQ timeout) may be sent again, to this or another endpoint."""
    text = details.lower()
    if code == "RESOURCE_EXHAUSTED":
        return not any(s in text for s in _TOO_LARGE)  # refused before running, unless it can never fit
    if code in ("UNAVAILABLE", "CANCELLED"):
        if kind is not CallKind.CONDITIONAL:
            return True
        never_sent = any(s in text for s in _NEVER_SENT)
        return never_sent or (answered_by_server and code == "UNAVAILABLE")
    if code == "NO_REPLY":  # ZeroMQ: no server answered in time (dead endpoint, or cut off): as a lost connection
        return kind is not CallKind.CONDITIONAL
    if code == "DEADLINE_EXCEEDED":
        return kind is CallKind.READ
    return False


def delay(attempt: int, base: float, code: str) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential with full jitter, longer for a busy
    server (RESOURCE_EXHAUSTED), capped so that a failover stays quick."""
    factor, cap = (4.0, 2.0) if code == "RESOURCE_EXHAUSTED" else (1.0, 1.0)
    top = min(base * factor * 2.0**attempt, cap)
    return float(top / 2 + random.random() * top / 2)
