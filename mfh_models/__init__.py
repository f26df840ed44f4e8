"""Memory Fusion Hub models: records, events, settings, versions, canonical JSON and the checksum."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mfh_models.canonical import (
    ChecksumRow,
    canonical_json,
    checksum_line,
    checksum_order,
    items_checksum,
    lines_checksum,
    payload_digest,
)
from mfh_models.errors import (
    ConfigError,
    DeadlineExceeded,
    InvalidArgument,
    MFHError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    StoreDamaged,
    StoreNotCurrent,
    Unauthenticated,
    Unavailable,
    VersionConflict,
)
from mfh_models.records import (
    KIND_MODELS,
    MAX_KEY_LENGTH,
    MAX_NAMESPACE_LENGTH,
    MAX_PAYLOAD_BYTES,
    SCHEMA_VERSION,
    Kind,
    KnowledgeRecord,
    MemoryEvent,
    MemoryItem,
    Op,
    Record,
    SessionData,
    WatchedEvent,
    event_id_for,
    parse_kind,
    validate_key,
    validate_namespace,
    validate_origin,
    validate_payload,
)
from mfh_models.schemas import json_schemas
from mfh_models.untrusted import MAX_JSON_BYTES, MAX_JSON_DEPTH, decode_untrusted_json
from mfh_models.versions import pack, unpack

if TYPE_CHECKING:
    from mfh_models.settings import Settings, default_config_dir, default_data_dir, load_settings

#: Loaded on first use: an agent that installs only the client never imports settings or YAML.
_LAZY = {"Settings", "default_config_dir", "default_data_dir", "load_settings"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from mfh_models import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'mfh_models' has no attribute {name!r}")


__all__ = [
    "KIND_MODELS",
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_KEY_LENGTH",
    "MAX_NAMESPACE_LENGTH",
    "MAX_PAYLOAD_BYTES",
    "SCHEMA_VERSION",
    "ChecksumRow",
    "ConfigError",
    "DeadlineExceeded",
    "InvalidArgument",
    "Kind",
    "KnowledgeRecord",
    "MFHError",
    "MemoryEvent",
    "MemoryItem",
    "NotFound",
    "Op",
    "OutOfRange",
    "PermissionDenied",
    "Record",
    "ResourceExhausted",
    "SessionData",
    "Settings",
    "StoreDamaged",
    "StoreNotCurrent",
    "Unauthenticated",
    "Unavailable",
    "VersionConflict",
    "WatchedEvent",
    "canonical_json",
    "checksum_line",
    "checksum_order",
    "decode_untrusted_json",
    "default_config_dir",
    "default_data_dir",
    "event_id_for",
    "items_checksum",
    "json_schemas",
    "lines_checksum",
    "load_settings",
    "pack",
    "parse_kind",
    "payload_digest",
    "unpack",
    "validate_key",
    "validate_namespace",
    "validate_origin",
    "validate_payload",
]
