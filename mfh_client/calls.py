"""What every client shares, whatever the transport: the calls, the endpoints and the retry loop's policy.

A :class:`Call` says what to do (``op`` and its arguments) and what a repeat could do (its
:class:`~mfh_client.retry.CallKind`); a transport turns it into a wire request and the reply back
into a result, or raises a :class:`Failure` that says how the attempt failed. Whether to try again
is decided once, by :mod:`mfh_client.retry` (docs/api.md has the table).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mfh_client import retry
from mfh_client.retry import CallKind
from mfh_client.types import Durability, MetadataFilter, PutResult, PutSpec, SearchHit
from mfh_models.errors import InvalidArgument, MFHError
from mfh_models.records import Record, WatchedEvent

__all__ = ["Call", "Endpoints", "Failure", "RetryPolicy", "WatchResume"]

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request, transport-free: ``op`` is the ZeroMQ action name (gRPC maps it to its method)."""

    op: str
    args: Mapping[str, Any]
    kind: CallKind  # what a repeat could do


class Failure(Exception):
    """One attempt failed; ``error`` is what the caller sees if it is not retried.

    ``code`` is the gRPC status name (the same names on ZeroMQ; ``NO_REPLY`` for a ZeroMQ timeout),
    ``answered_by_server``: an MFH server said so itself, as opposed to a transport failing mid-call.
    """

    def __init__(self, error: MFHError, code: str, details: str = "", *, answered_by_server: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.code = code
        self.details = details
        self.answered_by_server = answered_by_server


# -- the calls, one builder per method, shared by the four clients ---------------------------------


def _put_args(spec: PutSpec) -> dict[str, Any]:
    return {
        "namespace": spec.namespace,
        "key": spec.key,
        "kind": spec.kind,
        "payload": spec.payload,
        "expected_version": spec.expected_version,
        "ttl_seconds": spec.ttl_seconds,
    }


def get(namespace: str, key: str) -> Call[Record]:
    return Call("get", {"namespace": namespace, "key": key}, CallKind.READ)


def batch_get(namespace: str, keys: Sequence[str]) -> Call[tuple[list[Record], list[str]]]:
    return Call("batch_get", {"namespace": namespace, "keys": list(keys)}, CallKind.READ)


def put(spec: PutSpec, durability: Durability) -> Call[PutResult]:
    args = {**_put_args(spec), "durability": Durability(durability)}
    return Call("put", args, CallKind.WRITE if spec.expected_version is None else CallKind.CONDITIONAL)


def batch_put(specs: Sequence[PutSpec], durability: Durability) -> Call[list[PutResult]]:
    args = {"puts": [_put_args(s) for s in specs], "durability": Durability(durability)}
    unconditional = all(s.expected_version is None for s in specs)
    return Call("batch_put", args, CallKind.WRITE if unconditional else CallKind.CONDITIONAL)


def delete(namespace: str, key: str, expected_version: int | None, durability: Durability) -> Call[PutResult]:
    args = {
        "namespace": namespace,
        "key": key,
        "expected_version": expected_version,
        "durability": Durability(durability),
    }
    return Call("delete", args, CallKind.CONDITIONAL)


def list_page(
    namespace: str, kind: str | None, key_prefix: str, page_size: int, page_token: str, include_deleted: bool
) -> Call[tuple[list[Record], str]]:
    args = {
        "namespace": namespace,
        "kind": kind or "",
        "key_prefix": key_prefix,
        "page_size": page_size,
        "page_token": page_token,
        "include_deleted": include_deleted,
    }
    return Call("list", args, CallKind.READ)


def watch_poll(
    namespace: str, key_prefix: str, after_sequence: int | None, wait_ms: int
) -> Call[tuple[list[WatchedEvent], int]]:
    """One ZeroMQ long poll of a Watch: the changes after ``after_sequence`` and the position to poll after."""
    args = {"namespace": namespace, "key_prefix": key_prefix, "after_sequence": after_sequence, "wait_ms": wait_ms}
    return Call("watch", args, CallKind.READ)


def _condition(c: MetadataFilter | Sequence[Any]) -> dict[str, Any]:
    if isinstance(c, MetadataFilter):
        return {"field": c.field, "op": c.op, "value": c.value}
    field_name, op, value = c
    return {"field": field_name, "op": op, "value": value}


def search(
    namespace: str,
    namespace_prefix: str,
    query: str,
    kinds: Sequence[str],
    tags: Sequence[str],
    metadata: Sequence[MetadataFilter | Sequence[Any]],
    updated_after_ms: int | None,
    updated_before_ms: int | None,
    embedding: Sequence[float],
    top_k: int,
) -> Call[list[SearchHit]]:
    filters = {
        "kinds": list(kinds),
        "tags": list(tags),
        "metadata": [_condition(c) for c in metadata],
        "updated_after_ms": updated_after_ms,
        "updated_before_ms": updated_before_ms,
    }
    args = {
        "namespace": namespace,
        "namespace_prefix": namespace_prefix,
        "query": query,
        "filters": filters,
        "embedding": [float(x) for x in embedding],
        "top_k": top_k,
    }
    return Call("search", args, CallKind.READ)


def list_namespaces(prefix: str, max_depth: int, page_size: int, page_token: str) -> Call[tuple[list[str], str]]:
    args = {"prefix": prefix, "max_depth": max_depth, "page_size": page_size, "page_token": page_token}
    return Call("list_namespaces", args, CallKind.READ)


# -- endpoints and the retry policy ------------------------------------------------------------------


@dataclass
class Endpoints:
    """The endpoints a client may use; one that failed is avoided for ``cooldown`` seconds."""

    addresses: list[str]
    cooldown: float = 2.0
    current: int = 0
    _down_until: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.addresses:
            raise InvalidArgument("at least one endpoint is required")
        self._down_until = [0.0] * len(self.addresses)

    def pick(self) -> int:
        """The current endpoint unless it failed recently; else the next healthy one (else the soonest back)."""
        now = time.monotonic()
        n = len(self.addresses)
        for step in range(n):
            i = (self.current + step) % n
            if self._down_until[i] <= now:
                self.current = i
                return i
        self.current = min(range(n), key=lambda i: self._down_until[i])
        return self.current

    def failed(self, i: int) -> None:
        """Concurrent calls that fail on one endpoint all move off it (and none moves back to it)."""
        if len(self.addresses) > 1:
            self._down_until[i] = time.monotonic() + self.cooldown
            if self.current == i:
                self.current = (i + 1) % len(self.addresses)


@dataclass(frozen=True)
class RetryPolicy:
    """How often to try a call, whether to try again (:func:`mfh_client.retry.retryable`), and how long to wait."""

    retries: int = 3
    backoff: float = 0.05

    def attempts(self, endpoints: int) -> int:
        """Enough tries to reach every endpoint once, and at least ``retries`` repeats."""
        return max(self.retries, endpoints - 1) + 1

    def delay(self, attempt: int, failure: Failure) -> float:
        return retry.delay(attempt, self.backoff, failure.code)

    @staticmethod
    def retryable(call: Call[Any], failure: Failure) -> bool:
        return retry.retryable(call.kind, failure.code, failure.details, answered_by_server=failure.answered_by_server)


@dataclass
class WatchResume:
    """Where a client's Watch goes on after a reconnect or a failover, and for how long it keeps trying.

    ``after`` is the sequence of the newest event or progress seen (None: none yet, and the first stream
    starts from now). A failed stream is opened again after it when the failure is one a read is retried on
    (:func:`mfh_client.retry.retryable`), for up to ``reconnect_for`` seconds without a stream that answers.
    """

    after: int | None
    reconnect_for: float
    attempt: int = 0
    _failing_since: float | None = None

    def seen(self, sequence: int) -> None:
        """The stream delivered ``sequence`` (an event or a progress): it works, and resumes after it."""
        self.after = sequence
        self.attempt, self._failing_since = 0, None

    def pause(self, failure: Failure, policy: RetryPolicy) -> float | None:
        """Seconds to wait before opening the stream again, or None when ``failure`` is the answer."""
        if not policy.retryable(Call("watch", {}, CallKind.READ), failure):
            return None
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since >= self.reconnect_for:
            return None
        pause = policy.delay(self.attempt, failure)
        self.attempt += 1
        return pause
