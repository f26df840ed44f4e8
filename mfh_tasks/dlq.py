"""Dead-letter tools for ``mfh dlq``: list, retry and purge batches whose retries ran out.

Dramatiq keeps dead letters as ids in the sorted set ``<ns>:<queue>.XQ`` and bodies in the hash
``<ns>:<queue>.XQ.msgs`` and has no requeue API. Retry decodes a body, resets its retry count,
enqueues it again and only then removes both entries: a crash in between at worst enqueues the
batch twice, which the idempotent persist path absorbs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from dramatiq import Message
from dramatiq.brokers.redis import RedisBroker

__all__ = ["DeadLetter", "DeadLetters"]


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
                    error=tb[-1] if tb else "",
                )
            )
        return out

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
