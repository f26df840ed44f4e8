"""Per-peer accounting for the transports: what one peer, and all peers together, may hold at once.

A :class:`PeerSlots` counts held slots per peer (a ZeroMQ ROUTER identity, a gRPC connection's
peer string) and in total; a slot is refused, never queued, when either cap is reached, so one
greedy peer cannot take the capacity every other peer needs (docs/operations.md).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager

from mfh_models import ResourceExhausted

__all__ = ["PeerSlots"]


class PeerSlots:
    """At most ``max_total`` slots held at once, and at most ``max_per_peer`` by any one peer."""

    def __init__(self, what: str, *, max_total: int, max_per_peer: int) -> None:
        self.what = what
        self.max_total = max_total
        self.max_per_peer = max_per_peer
        self._held: dict[Hashable, int] = {}
        self._total = 0

    @property
    def total(self) -> int:
        return self._total

    def held_by(self, peer: Hashable) -> int:
        return self._held.get(peer, 0)

    def refusal(self, peer: Hashable) -> str | None:
        """Why a new slot for ``peer`` would be refused now, or None if it would be granted."""
        if self._total >= self.max_total:
            return f"too many {self.what} ({self.max_total}) on this server; retry shortly"
        if self._held.get(peer, 0) >= self.max_per_peer:
            return f"too many {self.what} from this connection ({self.max_per_peer}); retry shortly"
        return None

    def try_acquire(self, peer: Hashable) -> bool:
        """Take a slot for ``peer`` if both caps allow; the caller releases it with :meth:`release`."""
        if self.refusal(peer) is not None:
            return False
        self._held[peer] = self._held.get(peer, 0) + 1
        self._total += 1
        return True

    def release(self, peer: Hashable) -> None:
        n = self._held.get(peer, 0) - 1
        if n < 0:
            return
        if n:
            self._held[peer] = n
        else:
            del self._held[peer]  # the table never grows with peers that hold nothing
        self._total -= 1

    @contextmanager
    def hold(self, peer: Hashable) -> Iterator[None]:
        """One slot for the body; ResourceExhausted at once (nothing ran) when a cap is reached."""
        reason = self.refusal(peer)
        if reason is not None:
            raise ResourceExhausted(reason)
        self.try_acquire(peer)
        try:
            yield
        finally:
            self.release(peer)
