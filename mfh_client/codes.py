"""The one table from our exceptions to gRPC status codes and ZeroMQ error codes (and back).

Both transports answer an :class:`MFHError` with its code and message (docs/architecture.md, invariant 8);
anything else is INTERNAL with a generic message, its traceback only in the server log.
Clients map codes back with :func:`exception_for`, so callers catch the same exceptions
whichever transport they use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import grpc

from mfh_models.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MFHError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    VersionConflict,
)

__all__ = [
    "INTERNAL_MESSAGE",
    "RETRYABLE_GRPC_CODES",
    "ErrorCode",
    "exception_for",
    "exception_for_zmq",
    "grpc_status",
    "zmq_error",
]

INTERNAL_MESSAGE: Final = "internal error; the server logged the details"


@dataclass(frozen=True, slots=True)
class ErrorCode:
    """One row of the table: our exception, its gRPC status and its ZeroMQ ``error.code``."""

    exception: type[MFHError]
    grpc: grpc.StatusCode
    zmq: str


# Most specific first: lookups walk the exception's MRO, so DeadlineExceeded wins over Unavailable.
TABLE: Final[tuple[ErrorCode, ...]] = (
    ErrorCode(InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ErrorCode(NotFound, grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    ErrorCode(VersionConflict, grpc.StatusCode.FAILED_PRECONDITION, "FAILED_PRECONDITION"),
    ErrorCode(OutOfRange, grpc.StatusCode.OUT_OF_RANGE, "OUT_OF_RANGE"),
    ErrorCode(Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    ErrorCode(PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    ErrorCode(ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
    ErrorCode(DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
    ErrorCode(Unavailable, grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE"),
)
_BY_EXC: Final = {row.exception: row for row in TABLE}
_BY_GRPC: Final = {row.grpc: row for row in TABLE}
_BY_ZMQ: Final = {row.zmq: row for row in TABLE}

#: Codes a client may retry (on another endpoint) without changing the request.
RETRYABLE_GRPC_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)


def _row(exc: BaseException) -> ErrorCode | None:
    for cls in type(exc).__mro__:
        row = _BY_EXC.get(cls)
        if row is not None:
            return row
    return None


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message to answer ``exc`` with (INTERNAL, generic, for the unexpected)."""
    row = _row(exc)
    if row is None or not isinstance(exc, MFHError):
        return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    return row.grpc, exc.message


def zmq_error(exc: BaseException) -> dict[str, Any]:
    """The ``error`` object of a ZeroMQ reply: ``{"code", "message"}`` (plus ``current_version``)."""
    row = _row(exc)
    if row is None or not isinstance(exc, MFHError):
        return {"code": "INTERNAL", "message": INTERNAL_MESSAGE}
    out: dict[str, Any] = {"code": row.zmq, "message": exc.message}
    if isinstance(exc, VersionConflict):
        out["current_version"] = exc.current_version
    return out


def exception_for(code: grpc.StatusCode, message: str) -> MFHError:
    """Client side: the exception for a gRPC status (unknown codes become a plain MFHError)."""
    if code is grpc.StatusCode.CANCELLED:  # an MFH server never cancels a call: the connection was cut
        return Unavailable(f"call cancelled (connection cut or server stopped): {message}")
    row = _BY_GRPC.get(code)
    if row is None:
        return MFHError(f"{code.name}: {message}")
    return row.exception(message)


def exception_for_zmq(error: dict[str, Any]) -> MFHError:
    """Client side: the exception for a ZeroMQ ``error`` object."""
    code, message = str(error.get("code", "INTERNAL")), str(error.get("message", ""))
    row = _BY_ZMQ.get(code)
    if row is None:
        return MFHError(f"{code}: {message}")
    if row.exception is VersionConflict:
        return VersionConflict(message, current_version=int(error.get("current_version") or 0))
    return row.exception(message)
