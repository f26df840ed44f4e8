"""Expiry of records: ``expires_at_ms`` in the payload of any kind (DESIGN.md: the payload is the truth).

The expiry travels inside the payload, so the event log, replication, replay and the checksum carry it
with no column of their own. A put's ``ttl_seconds`` becomes ``expires_at_ms = now + ttl`` (and keeps
``ttl_seconds``, which refresh-on-read extends by). Readers decide with their own clock, at read time.
"""

from __future__ import annotations

import json
from typing import Any, Final

from mfh_models.canonical import canonical_json
from mfh_models.errors import InvalidArgument
from mfh_models.records import MAX_TTL_SECONDS, Record

__all__ = ["expires_at_of", "is_expired", "refreshed_payload", "with_ttl"]

_FIELD: Final = '"expires_at_ms"'


def expires_at_of(payload: str) -> int | None:
    """The expiry (unix ms) a canonical payload carries, or None; cheap when it carries none."""
    if _FIELD not in payload:
        return None
    try:
        obj = json.loads(payload)
    except ValueError:
        return None
    value = obj.get("expires_at_ms") if isinstance(obj, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_expired(record: Record, now_ms: int) -> bool:
    """True once ``now_ms`` reaches the record's expiry (a tombstone is never "expired": it is deleted)."""
    if record.deleted:
        return False
    at = expires_at_of(record.payload)
    return at is not None and now_ms >= at


def with_ttl(payload: dict[str, Any], ttl_seconds: int, now_ms: int) -> dict[str, Any]:
    """The payload with ``ttl_seconds`` and the ``expires_at_ms`` it gives from ``now_ms``."""
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidArgument(f"ttl_seconds must be an integer from 1 to {MAX_TTL_SECONDS}")
    return {**payload, "ttl_seconds": ttl_seconds, "expires_at_ms": now_ms + ttl_seconds * 1000}


def refreshed_payload(record: Record, now_ms: int) -> str | None:
    """The payload with its expiry moved to ``now + ttl_seconds``, or None when there is nothing to refresh.

    Only a record put with a TTL is refreshed, and only once a tenth of its TTL has passed, so reads
    of a hot key do not turn into one write each.
    """
    if record.deleted or '"ttl_seconds"' not in record.payload:
        return None
    obj = json.loads(record.payload)
    ttl, at = obj.get("ttl_seconds"), obj.get("expires_at_ms")
    if not isinstance(ttl, int) or not isinstance(at, int) or now_ms >= at:
        return None
    new_at = now_ms + ttl * 1000
    if new_at - at < max(ttl * 100, 1):  # less than a tenth of the TTL would be gained
        return None
    obj["expires_at_ms"] = new_at
    return canonical_json(obj)
