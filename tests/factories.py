"""Small builders of events and records for tests."""

from __future__ import annotations

import json
from typing import Any

from mfh_models import MemoryEvent, Op, canonical_json, event_id_for, pack

T0 = 1_760_000_000_000  # a fixed unix ms so versions are reproducible


def event(
    key: str,
    version: int,
    *,
    origin: str = "main_pc",
    namespace: str = "ns",
    op: Op = Op.PUT,
    content: Any = None,
    kind: str = "memory_item",
) -> MemoryEvent:
    """An event whose version is ``pack(T0 + version, 0)`` so small ints order as expected."""
    v = pack(T0 + version, 0)
    payload = (
        "null"
        if op is Op.DELETE
        else canonical_json({"content": content if content is not None else f"{key}@{version}"})
    )
    return MemoryEvent(
        event_id=event_id_for(origin, v),
        op=op,
        namespace=namespace,
        key=key,
        kind=kind,  # type: ignore[arg-type]
        payload=payload,
        version=v,
        origin=origin,
        created_at=T0 + version,
    )


def payload(text: str, **extra: Any) -> str:
    return canonical_json({"content": text, **extra})


def loads(s: str) -> Any:
    return json.loads(s)
