"""The records agents store and the events that change them.

Three payload kinds (``MemoryItem``, ``SessionData``, ``KnowledgeRecord``) travel inside one
envelope, :class:`Record`, addressed by ``(namespace, key)``. Every accepted change is one
:class:`MemoryEvent`. Each model carries ``schema_version`` and can emit its JSON schema.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mfh_models.canonical import canonical_json
from mfh_models.errors import InvalidArgument
from mfh_models.untrusted import MAX_JSON_DEPTH, check_json_depth, refuse_lone_surrogates

__all__ = [
    "KIND_MODELS",
    "MAX_EMBEDDING_DIM",
    "MAX_KEY_LENGTH",
    "MAX_NAMESPACE_LENGTH",
    "MAX_PAYLOAD_BYTES",
    "MAX_TTL_SECONDS",
    "SCHEMA_VERSION",
    "Kind",
    "KnowledgeRecord",
    "MemoryEvent",
    "MemoryItem",
    "Op",
    "Record",
    "SessionData",
    "WatchedEvent",
    "event_id_for",
    "format_validation_error",
    "parse_kind",
    "validate_key",
    "validate_namespace",
    "validate_origin",
    "validate_payload",
]

SCHEMA_VERSION: Final = 1
MAX_NAMESPACE_LENGTH: Final = 64
MAX_KEY_LENGTH: Final = 256
#: Largest canonical JSON payload accepted for one record (the transports cap whole messages too).
MAX_PAYLOAD_BYTES: Final = 256 * 1024

_NAMESPACE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_KEY_RE: Final = re.compile(r"[A-Za-z0-9_.:/@\-]+")
_ORIGIN_RE: Final = re.compile(r"[a-z][a-z0-9_\-]{0,31}")


class Kind(StrEnum):
    MEMORY_ITEM = "memory_item"
    SESSION_DATA = "session_data"
    KNOWLEDGE_RECORD = "knowledge_record"


class Op(StrEnum):
    PUT = "put"
    DELETE = "delete"


def validate_namespace(namespace: str) -> str:
    """Namespaces: 1-64 characters of letters, digits, ``_ . -``, starting with a letter or digit."""
    if not isinstance(namespace, str) or not namespace:
        raise InvalidArgument("namespace is required")
    if len(namespace) > MAX_NAMESPACE_LENGTH:
        raise InvalidArgument(f"namespace is longer than {MAX_NAMESPACE_LENGTH} characters")
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise InvalidArgument(
            f"namespace {namespace[:70]!r} may hold only letters, digits, '_', '.', '-' "
            "and must start with a letter or digit"
        )
    return namespace


def validate_key(key: str) -> str:
    """Keys: 1-256 characters of letters, digits and ``_ . : / @ -``."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument("key is required")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgument(f"key is longer than {MAX_KEY_LENGTH} characters")
    if not _KEY_RE.fullmatch(key):
        raise InvalidArgument(f"key {key[:70]!r} may hold only letters, digits and '_', '.', ':', '/', '@', '-'")
    return key


def validate_origin(origin: str) -> str:
    """Host ids: lowercase ASCII, so every store orders them the same way."""
    if not isinstance(origin, str) or not _ORIGIN_RE.fullmatch(origin):
        raise InvalidArgument(f"origin {origin!r} must match {_ORIGIN_RE.pattern}")
    return origin


#: Largest embedding a record or a search may carry (floats).
MAX_EMBEDDING_DIM: Final = 4096
#: Longest TTL a put may ask for (ten years).
MAX_TTL_SECONDS: Final = 10 * 365 * 86_400

#: float32 range: embeddings are stored as float32.
_Float = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-3.4e38, le=3.4e38)]


class _Payload(BaseModel):
    """Fields every kind may carry: ``expires_at_ms`` (unix ms; the record is invisible from then on),
    ``ttl_seconds`` (set by a put's ``ttl_seconds``; refresh-on-read extends by it) and
    ``embedding`` (client-supplied vector for similarity search; one dimension per namespace)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=MAX_PAYLOAD_BYTES)
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    expires_at_ms: int | None = Field(default=None, strict=True, ge=0, lt=1 << 53)
    ttl_seconds: int | None = Field(default=None, strict=True, gt=0, le=MAX_TTL_SECONDS)
    embedding: list[_Float] | None = Field(default=None, min_length=1, max_length=MAX_EMBEDDING_DIM)


class MemoryItem(_Payload):
    """An episodic memory: something an agent saw, did or was told."""

    content: str = Field(min_length=1)
    tags: list[str] = Field(default_factory=list, max_length=64)
    importance: float = Field(default=0.5, ge=0.0, le=1.0)
    source: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class SessionData(_Payload):
    """Working state of one agent session."""

    session_id: str = Field(min_length=1, max_length=256)
    agent_id: str | None = Field(default=None, max_length=256)
    data: dict[str, Any] = Field(default_factory=dict)


class KnowledgeRecord(_Payload):
    """A semantic fact: subject, predicate, object, with provenance."""

    subject: str = Field(min_length=1)
    predicate: str = Field(default="is", min_length=1)
    object: str | None = None
    content: str | None = None
    confidence: float = Field(default=1.0, ge=0.0, le=1.0)
    source: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


KIND_MODELS: Final[dict[Kind, type[_Payload]]] = {
    Kind.MEMORY_ITEM: MemoryItem,
    Kind.SESSION_DATA: SessionData,
    Kind.KNOWLEDGE_RECORD: KnowledgeRecord,
}


def format_validation_error(e: ValidationError, prefix: str = "") -> str:
    """One line per problem: ``field: reason``."""
    parts = []
    for err in e.errors(include_url=False)[:10]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{prefix}{loc}: {err['msg']}")
    return "; ".join(parts)


def parse_kind(kind: str) -> Kind:
    try:
        return Kind(kind)
    except ValueError:
        raise InvalidArgument(
            f"unknown kind {str(kind)[:40]!r}; expected one of {', '.join(k.value for k in Kind)}"
        ) from None


def validate_payload(kind: str, payload: Any) -> tuple[Kind, str]:
    """Check ``payload`` against its kind's model; return the kind and the canonical JSON to store.

    The stored payload is what the client sent (with ``schema_version`` filled in), canonicalised;
    defaults are not written in, so a read returns the client's own fields.
    """
    k = parse_kind(kind)
    if not isinstance(payload, dict):
        raise InvalidArgument("payload must be a JSON object")
    try:
        KIND_MODELS[k].model_validate(payload)
    except ValidationError as e:
        raise InvalidArgument(f"invalid {k.value} payload: {format_validation_error(e)}") from None
    except (RecursionError, TypeError, ValueError) as e:  # only InvalidArgument leaves this function
        raise InvalidArgument(f"invalid {k.value} payload: {type(e).__name__}") from None
    stored = dict(payload)
    stored.setdefault("schema_version", SCHEMA_VERSION)
    text = canonical_json(stored)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        refuse_lone_surrogates(text, what="payload")
        raise  # unreachable: a str fails UTF-8 encoding only on a surrogate
    if size > MAX_PAYLOAD_BYTES:
        raise InvalidArgument(f"payload is larger than {MAX_PAYLOAD_BYTES} bytes")
    check_json_depth(text, MAX_JSON_DEPTH, what="payload")
    return k, text


def event_id_for(origin: str, version: int) -> str:
    """Event ids are ``<origin>-<version>``: unique because each host's clock is."""
    return f"{origin}-{version}"


class _Addressed(BaseModel):
    """A model addressed by (namespace, key), both validated."""

    model_config = ConfigDict(frozen=True)
    namespace: str
    key: str

    @field_validator("namespace")
    @classmethod
    def _ns(cls, v: str) -> str:
        return validate_namespace(v)

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        return validate_key(v)


class Record(_Addressed):
    """The envelope every stored memory travels in; ``payload`` is canonical JSON text."""

    kind: Kind
    payload: str
    version: int = Field(ge=0)
    origin: str
    deleted: bool = False
    updated_at: int = Field(default=0, ge=0, description="unix milliseconds of the change")
    schema_version: int = SCHEMA_VERSION

    def payload_obj(self) -> Any:
        return json.loads(self.payload)


class MemoryEvent(_Addressed):
    """One accepted change: the unit of the event log, the persist batches and replication."""

    event_id: str
    op: Op
    kind: Kind
    payload: str = Field(description="canonical JSON text; 'null' for a delete")
    version: int = Field(gt=0, lt=1 << 63)
    origin: str
    created_at: int = Field(ge=0, description="unix milliseconds when the change was staged")
    schema_version: int = SCHEMA_VERSION

    @field_validator("origin")
    @classmethod
    def _origin(cls, v: str) -> str:
        return validate_origin(v)

    @property
    def deleted(self) -> bool:
        return self.op is Op.DELETE

    def to_record(self) -> Record:
        return Record(
            namespace=self.namespace,
            key=self.key,
            kind=self.kind,
            payload=self.payload,
            version=self.version,
            origin=self.origin,
            deleted=self.deleted,
            updated_at=self.created_at,
            schema_version=self.schema_version,
        )


class WatchedEvent(MemoryEvent):
    """A change as a Watch delivers it: the event and its ``sequence`` in the host's event log, the
    position a Watch resumes after (docs/api.md, "Watch")."""

    sequence: int = Field(default=0, ge=0, lt=1 << 63)
