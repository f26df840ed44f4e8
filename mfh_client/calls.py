"""What every client shares, whatever the transport: the calls, the endpoints and the one retry policy.

A :class:`Call` says what to do (``op`` and its arguments) and whether repeating it is harmless;
a transport turns it into a wire request and the reply back into a result. Retries and failover
are decided here, once, by what a repeat could do:

- reads, and unconditional puts (a repeat writes the same content under a newer version, so the
  stored state is the same), are retried on UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and
  on a server that went away mid-call (CANCELLED, connection reset, no ZeroMQ reply in time);
- conditional writes (an ``expected_version``) and deletes are retried only when the server
  cannot have run them: the call never reached a server (connection refused), or the server
  refused it before running it (RESOURCE_EXHAUSTED, or UNAVAILABLE while shutting down), since a
  repeat of one that ran would answer FAILED_PRECONDITION or NOT_FOUND.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mfh_client.types import Durability, PutResult, PutSpec
from mfh_models.errors import InvalidArgument, MFHError, ResourceExhausted, Unavailable
from mfh_models.records import Record

__all__ = ["Call", "Endpoints", "Failure", "RetryPolicy"]

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request, transport-free: ``op`` is the ZeroMQ action name (gRPC maps it to its method)."""

    op: str
    args: Mapping[str, Any]
    idempotent: bool  # the same final state however many times it runs


class Failure(Exception):
    """One attempt failed; ``error`` is what the caller sees if it is not retried.

    ``not_run``: the server cannot have run the call (never reached it, or refused it before running);
    ``final``: never worth repeating as it is (the request itself is too large, say).
    """

    def __init__(self, error: MFHError, *, not_run: bool = False, final: bool = False) -> None:
        super().__init__(error.message)
        self.error = error
        self.not_run = not_run
        self.final = final


# -- the calls, one builder per method, shared by the four clients ---------------------------------


def _put_args(spec: PutSpec) -> dict[str, Any]:
    return {
        "namespace": spec.namespace,
        "key": spec.key,
        "kind": spec.kind,
        "payload": spec.payload,
        "expected_version": spec.expected_version,
    }


def get(namespace: str, key: str) -> Call[Record]:
    return Call("get", {"namespace": namespace, "key": key}, idempotent=True)


def batch_get(namespace: str, keys: Sequence[str]) -> Call[tuple[list[Record], list[str]]]:
    return Call("batch_get", {"namespace": namespace, "keys": list(keys)}, idempotent=True)


def put(spec: PutSpec, durability: Durability) -> Call[PutResult]:
    args = {**_put_args(spec), "durability": Durability(durability)}
    return Call("put", args, idempotent=spec.expected_version is None)


def batch_put(specs: Sequence[PutSpec], durability: Durability) -> Call[list[PutResult]]:
    args = {"puts": [_put_args(s) for s in specs], "durability": Durability(durability)}
    return Call("batch_put", args, idempotent=all(s.expected_version is None for s in specs))


def delete(namespace: str, key: str, expected_version: int | None, durability: Durability) -> Call[PutResult]:
    args = {
        "namespace": namespace,
        "key": key,
        "expected_version": expected_version,
        "durability": Durability(durability),
    }
    return Call("delete", args, idempotent=False)


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
    return Call("list", args, idempotent=True)


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
    """How often to try a call and how long to wait between tries (exponential, with jitter, capped)."""

    retries: int = 3
    backoff: float = 0.05
    max_backoff: float = 1.0

    def attempts(self, endpoints: int) -> int:
        """Enough tries to reach every endpoint once, and at least ``retries`` repeats."""
        return max(self.retries, endpoints - 1) + 1

    def delay(self, attempt: int) -> float:
        base = min(self.backoff * (2**attempt), self.max_backoff)
        return float(base * (0.5 + random.random() / 2))  # jitter: clients that failed together spread out

    @staticmethod
    def retryable(call: Call[Any], failure: Failure) -> bool:
        """Whether repeating ``call`` after ``failure`` is safe and may succeed (see the module docstring)."""
        if failure.final:
            return False
        if failure.not_run or isinstance(failure.error, ResourceExhausted):
            return True
        return call.idempotent and isinstance(failure.error, Unavailable)
