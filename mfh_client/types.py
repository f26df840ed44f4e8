"""What a caller hands the client and gets back: :class:`PutSpec`, :class:`PutResult`, :class:`Durability`.

The servers use the same types, so a put means the same thing on every door.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from mfh_models.records import Record

__all__ = ["API_KEY_METADATA", "Durability", "MetadataFilter", "PutResult", "PutSpec", "SearchHit"]

#: gRPC metadata key (and ZeroMQ ``api_key`` field) that carries the API key.
API_KEY_METADATA: Final = "x-api-key"


class Durability(StrEnum):
    """When a write is answered: ``ACCEPTED`` once staged and queued, ``PERSISTED`` after the SQL commit."""

    ACCEPTED = "accepted"  # staged in Redis and its batch enqueued
    PERSISTED = "persisted"  # committed to SQL


@dataclass(frozen=True)
class PutResult:
    """The version a write was given and the id of its event on the log."""

    version: int
    event_id: str


@dataclass(frozen=True)
class PutSpec:
    """One put as a client asks for it; ``payload`` is a dict or JSON text.

    ``ttl_seconds``: the record expires that long after the put (the server writes ``ttl_seconds`` and
    ``expires_at_ms`` into the payload); None or 0 = no TTL.
    """

    namespace: str
    key: str
    kind: str
    payload: Any
    expected_version: int | None = None
    ttl_seconds: int | None = None


@dataclass(frozen=True)
class MetadataFilter:
    """A search condition on a metadata field: ``op`` is eq, ne, lt, lte, gt, gte or in (``value`` a list)."""

    field: str
    op: str
    value: Any


@dataclass(frozen=True)
class SearchHit:
    """One search result: the record and its score (cosine, full-text rank, or 0 when only filtered)."""

    record: Record
    score: float
