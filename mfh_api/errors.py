"""The status-code table lives in the client package (one source of truth): :mod:`mfh_client.codes`."""

from __future__ import annotations

from mfh_client.codes import (
    INTERNAL_MESSAGE,
    RETRYABLE_GRPC_CODES,
    TABLE,
    ErrorCode,
    exception_for,
    exception_for_zmq,
    grpc_status,
    zmq_error,
)

__all__ = [
    "INTERNAL_MESSAGE",
    "RETRYABLE_GRPC_CODES",
    "TABLE",
    "ErrorCode",
    "exception_for",
    "exception_for_zmq",
    "grpc_status",
    "zmq_error",
]
