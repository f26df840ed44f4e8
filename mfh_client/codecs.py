"""Records on the wire, both ways: protobuf (gRPC) and JSON objects (ZeroMQ).

Servers and clients use these same functions, so a record reads the same on every door.
"""

from __future__ import annotations

import json
from typing import Any, Final

from mfh_client.proto import pb
from mfh_models.canonical import canonical_json
from mfh_models.records import SCHEMA_VERSION, Kind, MemoryEvent, Op, Record, WatchedEvent, event_id_for

__all__ = [
    "event_from_pb",
    "from_pb_record",
    "record_from_json",
    "record_to_json",
    "to_pb_record",
    "watch_event_from_json",
    "watch_event_to_json",
]

_KINDS: Final = frozenset(k.value for k in Kind)


def to_pb_record(r: Record) -> Any:
    return pb.Record(
        namespace=r.namespace,
        key=r.key,
        kind=r.kind.value,
        payload_json=r.payload,
        version=r.version,
        origin=r.origin,
        deleted=r.deleted,
        updated_at_ms=r.updated_at,
        schema_version=r.schema_version,
    )


def from_pb_record(m: Any) -> Record:
    return Record.model_construct(
        namespace=m.namespace,
        key=m.key,
        kind=Kind(m.kind) if m.kind in _KINDS else m.kind,
        payload=m.payload_json,
        version=m.version,
        origin=m.origin,
        deleted=m.deleted,
        updated_at=m.updated_at_ms,
        schema_version=m.schema_version or SCHEMA_VERSION,
    )


def _watched(rec: Record, op: str, event_id: str, sequence: int) -> WatchedEvent:
    return WatchedEvent.model_construct(
        event_id=event_id or event_id_for(rec.origin, rec.version),
        op=Op(op),
        namespace=rec.namespace,
        key=rec.key,
        kind=rec.kind,
        payload=rec.payload,
        version=rec.version,
        origin=rec.origin,
        created_at=rec.updated_at,
        schema_version=rec.schema_version,
        sequence=sequence,
    )


def event_from_pb(m: Any) -> WatchedEvent:
    """A Watch message as the event it reports (not for a progress event: it has no record)."""
    return _watched(from_pb_record(m.record), m.op, m.event_id, int(m.sequence))


def watch_event_to_json(sequence: int, event: MemoryEvent) -> dict[str, Any]:
    """One change of a ZeroMQ ``watch`` reply."""
    return {
        "sequence": sequence,
        "op": event.op.value,
        "event_id": event.event_id,
        "record": record_to_json(event.to_record()),
    }


def watch_event_from_json(obj: dict[str, Any]) -> WatchedEvent:
    """The inverse of :func:`watch_event_to_json`, for clients."""
    return _watched(record_from_json(obj["record"]), str(obj["op"]), str(obj["event_id"]), int(obj["sequence"]))


def record_to_json(record: Record) -> dict[str, Any]:
    """A record as the ZeroMQ protocol sends it: the payload as a JSON object, not text."""
    return {
        "namespace": record.namespace,
        "key": record.key,
        "kind": record.kind.value,
        "payload": json.loads(record.payload),
        "version": record.version,
        "origin": record.origin,
        "deleted": record.deleted,
        "updated_at_ms": record.updated_at,
        "schema_version": record.schema_version,
    }


def record_from_json(obj: dict[str, Any]) -> Record:
    """The inverse of :func:`record_to_json`, for clients: the payload back to canonical JSON text."""
    return Record(
        namespace=obj["namespace"],
        key=obj["key"],
        kind=obj["kind"],
        payload=canonical_json(obj["payload"]),
        version=obj["version"],
        origin=obj["origin"],
        deleted=obj["deleted"],
        updated_at=obj["updated_at_ms"],
        schema_version=obj["schema_version"],
    )
