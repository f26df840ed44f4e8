"""One exception tree for the hub.

    MFHError                      base; ``code`` is the wire code both transports use
    ├── InvalidArgument           INVALID_ARGUMENT: the request is malformed or out of bounds
    │   └── ConfigError           a configuration file or variable is wrong (raised at start-up)
    ├── NotFound                  NOT_FOUND: no live record under that key
    ├── VersionConflict           FAILED_PRECONDITION: expected_version does not match
    ├── StoreNotCurrent           FAILED_PRECONDITION: the SQL schema needs ``mfh db upgrade`` (start-up)
    ├── OutOfRange                OUT_OF_RANGE: a Watch position whose events were pruned, or beyond the log
    ├── Unauthenticated           UNAUTHENTICATED: missing or wrong API key
    ├── PermissionDenied          PERMISSION_DENIED: the key is valid but its scope does not cover the call
    ├── ResourceExhausted         RESOURCE_EXHAUSTED: backlog or concurrency limit reached
    └── Unavailable               UNAVAILABLE: a store is down; safe to retry
        ├── DeadlineExceeded      DEADLINE_EXCEEDED: the answer did not come in time
        └── StoreDamaged          UNAVAILABLE on the wire, but no retry mends it: the SQL store's file
                                  is corrupt or missing (``mfh restore``; exit code 7)

Driver errors are translated into these where they enter (``raise ... from e``); the
transports map ``code`` to a gRPC status or a ZeroMQ error object in one table.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DeadlineExceeded",
    "InvalidArgument",
    "MFHError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "StoreDamaged",
    "StoreNotCurrent",
    "Unauthenticated",
    "Unavailable",
    "VersionConflict",
]


class MFHError(Exception):
    """Base of every error the hub raises on purpose."""

    code = "INTERNAL"
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(MFHError):
    code = "INVALID_ARGUMENT"


class ConfigError(InvalidArgument):
    """A configuration file or variable is wrong; names the file, the field and the reason."""


class NotFound(MFHError):
    code = "NOT_FOUND"


class VersionConflict(MFHError):
    """``expected_version`` did not match the stored version; nothing was changed."""

    code = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, current_version: int = 0) -> None:
        super().__init__(message)
        self.current_version = current_version


class StoreNotCurrent(MFHError):
    """The SQL store's schema is not the one this release runs on; the message names the command."""

    code = "FAILED_PRECONDITION"


class OutOfRange(MFHError):
    """A Watch asked to resume from a position the event log cannot serve: its events were pruned, or the
    position is beyond the log (it comes from another store). List again and watch from now on."""

    code = "OUT_OF_RANGE"


class Unauthenticated(MFHError):
    code = "UNAUTHENTICATED"


class PermissionDenied(MFHError):
    """A valid key whose scope does not cover the namespace, or a read-only key asked to write; nothing ran.
    ``reason`` is ``"scope"`` or ``"read_only"`` (the auth-failure counter's label)."""

    code = "PERMISSION_DENIED"

    def __init__(self, message: str, *, reason: str = "scope") -> None:
        super().__init__(message)
        self.reason = reason


class ResourceExhausted(MFHError):
    code = "RESOURCE_EXHAUSTED"
    retryable = True


class Unavailable(MFHError):
    code = "UNAVAILABLE"
    retryable = True


class DeadlineExceeded(Unavailable):
    code = "DEADLINE_EXCEEDED"


class StoreDamaged(Unavailable):
    """The SQL store's file is corrupt or missing: the message names the file. Clients see UNAVAILABLE
    (another host can serve them); an operator restores it (docs/operations.md, "The SQLite file is corrupt")."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path
