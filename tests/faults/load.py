"""Mixed writes through the gRPC client, each one recorded as acknowledged, failed or unknown.

Every put goes to a key of its own, written once; every delete goes to a key whose put was
acknowledged. So the end state each write implies is known without any guessing:

- **acked**: the server answered OK with a version; that version (or a newer one) must reach SQL.
- **failed**: every attempt got a definite answer that nothing was done (a refused connection, or
  the server's own UNAVAILABLE/RESOURCE_EXHAUSTED): the write must never show up.
- **unknown**: some attempt's outcome cannot be known (timeout, connection lost mid-call, CANCELLED).

The generator does its own retries (up to three attempts, failing over between endpoints), with a
client per endpoint that makes exactly one attempt, so each attempt's answer is seen and recorded.
As the shipped client does (``mfh_client.calls.Endpoints``), an endpoint whose attempt failed is
avoided by every writer for ``cooldown_s`` (unless all are), so that a replica which answers
"shutting down" stops getting calls.
Retries follow the client's policy (``mfh_api.client_grpc``): a put is retried on UNAVAILABLE,
DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED; a delete only when it cannot have run (refused before it
was sent, or refused by the server). CANCELLED, UNKNOWN and INTERNAL are not retried: they say
nothing about what happened.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import grpc

from mfh_api.client_grpc import AsyncMemoryClient
from mfh_api.service import PutSpec
from mfh_models import MFHError

Outcome = Literal["acked", "failed", "unknown"]
_S = grpc.StatusCode

NAMESPACE = "faults"
#: gRPC's own words for a call that never left the client: nothing was done.
_NEVER_SENT = ("failed to connect", "connection refused", "dns resolution failed", "no route to host")
#: gRPC's own words for a connection lost with the call on it: it may or may not have run.
_LOST = ("socket closed", "connection reset", "broken pipe", "goaway", "end of tcp stream", "stream removed")
_RETRY = frozenset({_S.UNAVAILABLE, _S.DEADLINE_EXCEEDED, _S.RESOURCE_EXHAUSTED})


@dataclass
class Write:
    """One write as the client saw it."""

    seq: int
    op: Literal["put", "delete"]
    key: str
    outcome: Outcome = "unknown"
    version: int | None = None
    attempts: int = 0
    errors: list[str] = field(default_factory=list)
    sent_at: float = 0.0
    done_at: float = 0.0


def classify(e: MFHError) -> tuple[Literal["definite", "ambiguous"], str]:
    """Whether a failed attempt certainly did nothing, and a short label for the figures."""
    cause = e.__cause__
    if not isinstance(cause, grpc.aio.AioRpcError):
        return "ambiguous", f"{type(e).__name__}: {e}"[:80]
    code, details = cause.code(), (cause.details() or "")
    low = details.lower()
    label = f"{code.name}: {details}"[:80]
    if code is _S.UNAVAILABLE and any(s in low for s in _NEVER_SENT):
        return "definite", label
    if code is _S.UNAVAILABLE and any(s in low for s in _LOST):
        return "ambiguous", label
    if code in (_S.UNAVAILABLE, _S.RESOURCE_EXHAUSTED, _S.INVALID_ARGUMENT, _S.FAILED_PRECONDITION):
        return "definite", label  # the server's own answer: by its contract, nothing was staged
    return "ambiguous", label  # DEADLINE_EXCEEDED, CANCELLED, UNKNOWN, INTERNAL, NOT_FOUND after a retry


class Ledger:
    """Every write of a run, and what the answers say about it."""

    def __init__(self) -> None:
        self.writes: list[Write] = []
        self.attempt_errors: collections.Counter[str] = collections.Counter()

    def count(self, outcome: Outcome) -> int:
        return sum(1 for w in self.writes if w.outcome == outcome)

    def acked(self) -> list[Write]:
        return [w for w in self.writes if w.outcome == "acked"]

    def acked_by(self, t: float) -> list[Write]:
        """Writes acknowledged at or before monotonic time ``t``."""
        return [w for w in self.writes if w.outcome == "acked" and w.done_at <= t]

    def first_ack_after(self, t: float) -> float | None:
        """When the first write acknowledged after ``t`` was answered (writes back after an outage)."""
        times = [w.done_at for w in self.writes if w.outcome == "acked" and w.done_at > t]
        return min(times) if times else None

    def codes(self, code: str) -> int:
        """Attempts answered with this gRPC code (e.g. ``CANCELLED``)."""
        return sum(n for label, n in self.attempt_errors.items() if label.startswith(f"{code}:"))

    def top_errors(self, n: int = 4) -> str:
        return "; ".join(f"{n}x {label}" for label, n in self.attempt_errors.most_common(n)) or "none"


class LoadGenerator:
    """Paced puts (70 %) and deletes (30 %) from ``concurrency`` tasks, over the given api endpoints."""

    def __init__(
        self,
        endpoints: Sequence[str],
        ledger: Ledger,
        *,
        prefix: str,
        rate_per_s: float,
        concurrency: int = 12,
        timeout_s: float = 2.0,
        attempts: int = 3,
        seed: int = 1,
        cooldown_s: float = 2.0,
    ) -> None:
        self.endpoints = list(endpoints)
        self.ledger = ledger
        self.prefix = prefix
        self.rate = rate_per_s
        self.concurrency = concurrency
        self.timeout = timeout_s
        self.max_attempts = attempts
        self.rng = random.Random(seed)
        self.clients = [AsyncMemoryClient(ep, timeout=timeout_s, retries=0) for ep in self.endpoints]
        self.cooldown = cooldown_s
        self._down_until = [0.0] * len(self.endpoints)
        self._deletable: list[str] = []
        self._seq = 0
        self.stop = asyncio.Event()

    async def close(self) -> None:
        for c in self.clients:
            await c.close()

    async def run(self, n: int | None = None) -> None:
        """Write until ``n`` writes were started or :attr:`stop` is set."""
        t0 = time.monotonic()
        start_seq = self._seq

        async def writer(slot: int) -> None:
            while not self.stop.is_set() and (n is None or self._seq - start_seq < n):
                seq = self._seq
                self._seq += 1
                delay = t0 + (seq - start_seq) / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.write_one(seq, preferred=slot % len(self.clients))

        await asyncio.gather(*(writer(i) for i in range(self.concurrency)))

    def _pick(self, preferred: int) -> int:
        """``preferred`` unless it failed within the cooldown; else the next one up (else ``preferred``)."""
        now, n = time.monotonic(), len(self.clients)
        for step in range(n):
            i = (preferred + step) % n
            if self._down_until[i] <= now:
                return i
        return preferred

    def _next_write(self, seq: int) -> Write:
        if self._deletable and self.rng.random() < 0.3:
            key = self._deletable.pop(self.rng.randrange(len(self._deletable)))
            return Write(seq=seq, op="delete", key=key)
        return Write(seq=seq, op="put", key=f"{self.prefix}/{seq}")

    async def write_one(self, seq: int, *, preferred: int = 0) -> Write:
        w = self._next_write(seq)
        self.ledger.writes.append(w)
        w.sent_at = time.monotonic()
        ambiguous = False
        endpoint = self._pick(preferred)
        for attempt in range(self.max_attempts):
            w.attempts += 1
            client = self.clients[endpoint]
            try:
                if w.op == "put":
                    spec = PutSpec(NAMESPACE, w.key, "memory_item", {"content": f"{w.key} #{seq}"})
                    r = await client.put(spec)
                else:
                    r = await client.delete(NAMESPACE, w.key)
            except MFHError as e:
                kind, label = classify(e)
                self.ledger.attempt_errors[label] += 1
                w.errors.append(label)
                ambiguous = ambiguous or kind == "ambiguous"
                cause = e.__cause__
                code = cause.code() if isinstance(cause, grpc.aio.AioRpcError) else None
                if code in _RETRY and len(self.clients) > 1:
                    self._down_until[endpoint] = time.monotonic() + self.cooldown
                if code not in _RETRY or attempt + 1 == self.max_attempts:
                    break
                if w.op == "delete" and kind == "ambiguous":
                    break  # as the client: a delete is repeated only when it cannot have run
                endpoint = (endpoint + 1) % len(self.clients)
                await asyncio.sleep(0.05 * 2**attempt)
                continue
            w.outcome, w.version, w.done_at = "acked", r.version, time.monotonic()
            if w.op == "put":
                self._deletable.append(w.key)
            return w
        w.outcome = "unknown" if ambiguous else "failed"
        w.done_at = time.monotonic()
        return w

    def start(self, n: int | None = None) -> asyncio.Task[None]:
        return asyncio.create_task(self.run(n))


async def wait_for_acks(ledger: Ledger, count: int, timeout: float) -> None:  # noqa: ASYNC109
    """Until ``count`` writes are acknowledged (the load is under way)."""
    deadline = time.monotonic() + timeout
    while ledger.count("acked") < count:
        if time.monotonic() > deadline:
            acked, errors = ledger.count("acked"), ledger.top_errors()
            raise AssertionError(f"only {acked} of {count} writes acknowledged after {timeout}s; errors: {errors}")
        await asyncio.sleep(0.02)
