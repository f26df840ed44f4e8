"""Dead-letter tools for ``mfh dlq``: list, show, retry and purge batches whose retries ran out.

Dramatiq keeps dead letters as ids in the sorted set ``<ns>:<queue>.XQ`` and bodies in the hash
``<ns>:<queue>.XQ.msgs`` and has no requeue API. Retry decodes a body, resets its retry count,
enqueues it again and only then removes both entries: a crash in between at worst enqueues the
batch twice, which the idempotent persist path absorbs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

from mfh_core.redaction import redact_error_text
from mfh_models import NotFound

__all__ = ["DeadLetter", "DeadLetterDetail", "DeadLetters", "EventSummary"]


@dataclass(frozen=True, slots=True)
class EventSummary:
    """One event of a dead letter, without its payload: only the payload's size."""

    namespace: str
    key: str
    version: int
    origin: str
    op: str
    kind: str | None
    payload_bytes: int
    event_id: str


@dataclass(frozen=True, slots=True)
class DeadLetterDetail:
    """What ``mfh dlq show`` prints: the batch's events (no payloads), its retries and its last error."""

    message_id: str
    actor: str
    queue: str
    dead_since_ms: int
    enqueued_at_ms: int
    retries: int
    error: str  # the last line of the last traceback, redacted
    events: list[EventSummary]
    malformed: str  # why the body is not a list of events, if it is not

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _summary(raw: Any) -> EventSummary | None:
    if not isinstance(raw, dict):
        return None
    payload = raw.get("payload")
    size = len(payload.encode("utf-8", "replace")) if isinstance(payload, str) else len(json.dumps(payload))
    try:
        return EventSummary(
            namespace=str(raw.get("namespace", "?")),
            key=str(raw.get("key", "?")),
            version=int(raw.get("version", 0)),
            origin=str(raw.get("origin", "?")),
            op=str(raw.get("op", "?")),
            kind=None if raw.get("kind") is None else str(raw.get("kind")),
            payload_bytes=0 if payload is None else size,
            event_id=str(raw.get("event_id", "")),
        )
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message_id: str
    actor: str
    dead_since_ms: int
    retries: int
    events: int
    error: str  # the last line of the last traceback, if Dramatiq kept one

    def describe(self) -> str:
        age = max(0.0, time.time() - self.dead_since_ms / 1000)
        return (
            f"{self.message_id}  {self.actor}  {self.events} events  {self.retries} retries  "
            f"dead {age:.0f}s  {self.error or '(no traceback: rejected as invalid)'}"
        )


class DeadLetters:
    """The dead-letter queue of one Dramatiq queue on one broker."""

    def __init__(self, broker: RedisBroker, queue_name: str) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.ids_key = f"{broker.namespace}:{queue_name}.XQ"
        self.msgs_key = f"{self.ids_key}.msgs"

    def count(self) -> int:
        return int(self.broker.client.zcard(self.ids_key))

    def list(self, limit: int = 100) -> list[DeadLetter]:
        """Oldest first."""
        client = self.broker.client
        rows = cast(list[tuple[bytes, float]], client.zrange(self.ids_key, 0, limit - 1, withscores=True))
        out: list[DeadLetter] = []
        for raw_id, score in rows:
            mid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            body = client.hget(self.msgs_key, mid)
            if body is None:
                continue
            msg = Message.decode(cast(bytes, body))
            tb = str(msg.options.get("traceback") or "").strip().splitlines()
            events = msg.args[0] if msg.args else []
            out.append(
                DeadLetter(
                    message_id=mid,
                    actor=msg.actor_name,
                    dead_since_ms=int(score),
                    retries=int(msg.options.get("retries", 0)),
                    events=len(events) if isinstance(events, list) else 0,
                    error=redact_error_text(tb[-1])[:300] if tb else "",
                )
            )
        return out

    def show(self, message_id: str) -> DeadLetterDetail:
        """One dead letter in full, payloads left out; NotFound when there is no such id."""
        body = self.broker.client.hget(self.msgs_key, message_id)
        score = self.broker.client.zscore(self.ids_key, message_id)
        if body is None:
            raise NotFound(f"no dead letter {message_id[:80]!r} in {self.ids_key} (mfh dlq list shows the ids)")
        msg = Message.decode(cast(bytes, body))
        tb = str(msg.options.get("traceback") or "").strip().splitlines()
        raw_events = msg.args[0] if msg.args else None
        events: list[EventSummary] = []
        malformed = ""
        if isinstance(raw_events, list):
            for raw in raw_events:
                e = _summary(raw)
                if e is None:
                    malformed = "an entry of the batch is not an event"
                else:
                    events.append(e)
        else:
            malformed = f"the batch is a {type(raw_events).__name__}, not a list of events"
        return DeadLetterDetail(
            message_id=message_id,
            actor=msg.actor_name,
            queue=msg.queue_name,
            dead_since_ms=int(score or 0),
            enqueued_at_ms=int(msg.message_timestamp),
            retries=int(msg.options.get("retries", 0)),
            error=redact_error_text(tb[-1])[:500] if tb else "",
            events=events,
            malformed=malformed,
        )

    def retry(self, message_ids: Sequence[str] | None = None) -> int:
        """Enqueue dead letters again with a fresh retry budget (all when ``message_ids`` is None)."""
        ids = list(message_ids) if message_ids is not None else [d.message_id for d in self.list(limit=1_000_000)]
        done = 0
        for mid in ids:
            body = self.broker.client.hget(self.msgs_key, mid)
            if body is None:
                continue
            msg = Message.decode(cast(bytes, body))
            dropped = ("retries", "traceback", "requeue_timestamp", "eta")
            options = {k: v for k, v in msg.options.items() if k not in dropped}
            self.broker.enqueue(msg.copy(options=options, queue_name=self.queue_name))
            self._remove(mid)
            done += 1
        return done

    def purge(self, message_ids: Sequence[str] | None = None) -> int:
        """Drop dead letters for good (all when ``message_ids`` is None)."""
        ids = list(message_ids) if message_ids is not None else [d.message_id for d in self.list(limit=1_000_000)]
        return sum(self._remove(mid) for mid in ids)

    def _remove(self, mid: str) -> int:
        pipe = self.broker.client.pipeline()
        pipe.zrem(self.ids_key, mid)
        pipe.hdel(self.msgs_key, mid)
        removed, _ = pipe.execute()
        return int(removed)
