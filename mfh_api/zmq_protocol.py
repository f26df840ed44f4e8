"""The ZeroMQ v1 wire protocol: JSON requests and replies, parsed with pydantic (docs/api.md).

Parsing never raises on input: anything malformed becomes an :class:`InvalidArgument` the server
turns into an error reply, so one bad client cannot take the server down (docs/architecture.md invariant 8).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from mfh_client.codecs import record_from_json, record_to_json, watch_event_to_json
from mfh_models import MAX_JSON_DEPTH, InvalidArgument, Record, decode_untrusted_json
from mfh_models.records import format_validation_error

__all__ = [
    "ACTIONS",
    "MAX_BATCH",
    "MAX_ID_CHARS",
    "RPC_NAMES",
    "SHUTTING_DOWN",
    "BatchGetPayload",
    "BatchPutPayload",
    "DeletePayload",
    "GetPayload",
    "ListNamespacesPayload",
    "ListPayload",
    "Peek",
    "PingPayload",
    "PutPayload",
    "SearchPayload",
    "V1Request",
    "WatchPayload",
    "decode_json",
    "encode",
    "encode_records",
    "error_reply",
    "get_data",
    "ok_get_reply",
    "ok_reply",
    "parse_payload",
    "parse_v1",
    "peek",
    "peek_error",
    "plain_get",
    "record_from_json",
    "record_to_json",
    "record_to_wire",
    "request_id",
    "safe_id",
    "watch_event_to_json",
]

log = logging.getLogger("mfh.api.zmq")

#: The refusal of a request that reaches a draining server: nothing was done, any replica may take it.
SHUTTING_DOWN: Final = "server is shutting down; retry on another replica (nothing was done)"
#: A sanity bound on batch sizes; the service enforces its own, smaller limits with precise messages.
MAX_BATCH: Final = 10_000
#: The longest request id echoed back; a longer one (or one that is not valid Unicode) is refused.
MAX_ID_CHARS: Final = 256
_ID_MIN, _ID_MAX = -(1 << 63), 1 << 64
#: How much of an unparsed body :func:`peek` looks at (clients send ``v`` and ``id`` first).
_PEEK_BYTES: Final = 512
_PEEK_ID = re.compile(rb'"(id|request_id)"\s*:\s*(?:"([A-Za-z0-9_.:/+=-]{0,128})"|(-?[0-9]{1,18})\b)')
_PEEK_V = re.compile(rb'"v"\s*:')
_PEEK_ACTION = re.compile(rb'"action"\s*:\s*"([a-z_]{1,32})"')

#: Levels of a request around a record payload: body, payload, puts, one put, its payload (with room to spare).
_ENVELOPE_DEPTH: Final = 8

Version = Annotated[StrictInt, Field(ge=0, lt=1 << 64)]
DurabilityName = Literal["accepted", "persisted"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GetPayload(_Strict):
    """``get``: one key."""

    namespace: StrictStr
    key: StrictStr


class BatchGetPayload(_Strict):
    """``batch_get``: several keys of one namespace."""

    namespace: StrictStr
    keys: list[StrictStr] = Field(max_length=MAX_BATCH)


class PutPayload(_Strict):
    """``put`` (and each entry of ``batch_put``): the payload as an object or as JSON text."""

    namespace: StrictStr
    key: StrictStr
    kind: StrictStr
    payload: dict[str, Any] | StrictStr
    expected_version: Version | None = None
    durability: DurabilityName = "accepted"
    ttl_seconds: StrictInt | None = Field(default=None, ge=0, description="0 or absent: no TTL")


class BatchPutPayload(_Strict):
    """``batch_put``: all or nothing, one durability for the batch."""

    puts: list[PutPayload] = Field(min_length=1, max_length=MAX_BATCH)
    durability: DurabilityName = "accepted"


class DeletePayload(_Strict):
    """``delete``: a versioned tombstone, optionally conditional."""

    namespace: StrictStr
    key: StrictStr
    expected_version: Version | None = None
    durability: DurabilityName = "accepted"


class ListPayload(_Strict):
    """``list``: one page in key order; the service caps ``page_size``."""

    namespace: StrictStr
    kind: StrictStr | None = None
    key_prefix: StrictStr = ""
    page_size: StrictInt = Field(default=100, ge=0, description="0: the default; the service caps it")
    page_token: StrictStr = ""
    include_deleted: StrictBool = False


class WatchPayload(_Strict):
    """``watch``: one long poll of the changes after ``after_sequence`` (docs/api.md, "Watch")."""

    namespace: StrictStr
    key_prefix: StrictStr = ""
    after_sequence: StrictInt | None = Field(default=None, ge=0, lt=1 << 63, description="None: the position of now")
    max_events: StrictInt = Field(default=0, ge=0, le=1000, description="0: the service's default (100)")
    wait_ms: StrictInt = Field(default=0, ge=0, le=300_000, description="capped by the request's deadline")


class MetadataFilterPayload(_Strict):
    """One ``filters.metadata`` condition; ``value`` is JSON (an array for ``in``)."""

    field: StrictStr
    op: StrictStr
    value: Any


class SearchFiltersPayload(_Strict):
    kinds: list[StrictStr] = Field(default_factory=list, max_length=16)
    tags: list[StrictStr] = Field(default_factory=list, max_length=1000)
    metadata: list[MetadataFilterPayload] = Field(default_factory=list, max_length=1000)
    updated_after_ms: StrictInt | None = None
    updated_before_ms: StrictInt | None = None


class SearchPayload(_Strict):
    """``search``: like gRPC Search; the service checks the limits and names the bad field."""

    namespace: StrictStr = ""
    namespace_prefix: StrictStr = ""
    query: StrictStr = ""
    filters: SearchFiltersPayload = SearchFiltersPayload()
    embedding: list[StrictFloat | StrictInt] = Field(default_factory=list, max_length=MAX_BATCH)
    top_k: StrictInt = 0


class ListNamespacesPayload(_Strict):
    """``list_namespaces``: one page of names."""

    prefix: StrictStr = ""
    max_depth: StrictInt = Field(default=0, ge=0, le=64)
    page_size: StrictInt = Field(default=100, ge=0)
    page_token: StrictStr = ""


class PingPayload(_Strict):
    """``ping``: answered by the process itself, no store asked (``mfh front`` heartbeats with it)."""


ACTIONS: Final[dict[str, type[_Strict]]] = {
    "get": GetPayload,
    "batch_get": BatchGetPayload,
    "put": PutPayload,
    "batch_put": BatchPutPayload,
    "delete": DeletePayload,
    "list": ListPayload,
    "watch": WatchPayload,
    "search": SearchPayload,
    "list_namespaces": ListNamespacesPayload,
    "ping": PingPayload,
}


#: Action → gRPC method name, the ``method`` label of the request metrics on both transports.
RPC_NAMES: Final[dict[str, str]] = {
    "get": "Get",
    "batch_get": "BatchGet",
    "put": "Put",
    "batch_put": "BatchPut",
    "delete": "Delete",
    "list": "List",
    "watch": "Watch",
    "search": "Search",
    "list_namespaces": "ListNamespaces",
    "ping": "Ping",
}


class _Envelope(_Strict):
    v: Literal[1]
    id: StrictStr | StrictInt | None = None
    action: StrictStr
    payload: dict[str, Any] = Field(default_factory=dict)
    api_key: StrictStr | None = None
    timeout_ms: StrictInt | None = Field(default=None, gt=0, le=300_000)


@dataclass(frozen=True, slots=True)
class V1Request:
    """A request whose envelope is valid; ``payload`` is still raw until :func:`parse_payload`."""

    id: str | int | None
    action: str
    payload: dict[str, Any]
    timeout_s: float | None = None


def decode_json(body: bytes) -> dict[str, Any]:
    """The request as a JSON object; InvalidArgument for bad UTF-8, bad or too deep JSON, or a non-object.

    The size is bounded by the socket (``MAXMSGSIZE``); the depth leaves room for the envelope
    around a payload as deep as :data:`MAX_JSON_DEPTH` (``validate_payload`` enforces that one).
    """
    obj = decode_untrusted_json(body, what="request", max_bytes=len(body), max_depth=MAX_JSON_DEPTH + _ENVELOPE_DEPTH)
    if not isinstance(obj, dict):
        raise InvalidArgument(f"request must be a JSON object, not {type(obj).__name__}")
    return obj


def safe_id(rid: Any) -> str | int | None:
    """``rid`` if a reply can always carry it (a short, valid Unicode string or a 64-bit integer), else None."""
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int):
        return rid if _ID_MIN <= rid < _ID_MAX else None
    if isinstance(rid, str) and len(rid) <= MAX_ID_CHARS:
        try:
            rid.encode("utf-8")  # a lone surrogate ("\ud800") cannot be sent back
        except UnicodeEncodeError:
            return None
        return rid
    return None


def request_id(obj: dict[str, Any], field: str = "id") -> str | int | None:
    """The client's request id (``id`` in v1) if it is one we can echo back (:func:`safe_id`), else None."""
    return safe_id(obj.get(field))


@dataclass(frozen=True, slots=True)
class Peek:
    """What an unparsed body says about its reply: the schema (v0 has no ``v``) and an echoable id."""

    legacy: bool
    rid: str | int | None
    action: str | None = None


def peek(body: bytes) -> Peek:
    """Schema and id from the first bytes of a body, without parsing it (for replies to shed requests).

    Only plain ids are recognised (ASCII letters, digits and ``_.:/+=-``, or an integer); clients
    that want their shed requests matched put ``v`` and ``id`` first, as ours do."""
    head = body[:_PEEK_BYTES]
    legacy = _PEEK_V.search(head) is None
    found = _PEEK_ACTION.search(head)
    action = found.group(1).decode("ascii") if found is not None else None
    want = b"request_id" if legacy else b"id"
    for m in _PEEK_ID.finditer(head):
        if m.group(1) == want:
            text, number = m.group(2), m.group(3)
            return Peek(legacy, text.decode("ascii") if text is not None else int(number), action)
    return Peek(legacy, None, action)


def peek_error(p: Peek, error: dict[str, Any]) -> bytes:
    """The error reply, in the schema :func:`peek` found, for a request that is answered unparsed."""
    if p.legacy:
        reply: dict[str, Any] = {"status": "error", "error": error["message"], "error_code": error["code"]}
        if p.rid is not None:
            reply["request_id"] = p.rid
        return encode(reply)
    return encode(error_reply(p.rid, error))


def parse_v1(obj: dict[str, Any]) -> V1Request:
    """Validate the v1 envelope (``v``, ``id``, ``action``, ``payload``); the action must be known."""
    try:
        env = _Envelope.model_validate(obj)
    except ValidationError as e:
        raise InvalidArgument(f"invalid request: {format_validation_error(e)}") from None
    if env.action not in ACTIONS:
        raise InvalidArgument(f"unknown action {env.action[:40]!r}; expected one of {', '.join(ACTIONS)}")
    timeout = env.timeout_ms / 1000 if env.timeout_ms is not None else None
    return V1Request(id=env.id, action=env.action, payload=env.payload, timeout_s=timeout)


def parse_payload(action: str, payload: dict[str, Any]) -> _Strict:
    """The action's payload model; InvalidArgument names every missing or mistyped field."""
    try:
        return ACTIONS[action].model_validate(payload)
    except ValidationError as e:
        raise InvalidArgument(f"invalid {action} payload: {format_validation_error(e, 'payload.')}") from None


def ok_reply(rid: str | int | None, data: Any) -> dict[str, Any]:
    """The v1 success reply around an action's ``data``."""
    return {"v": 1, "id": rid, "status": "ok", "data": data}


def error_reply(rid: str | int | None, error: dict[str, Any]) -> dict[str, Any]:
    """``error`` is ``{"code", "message"}`` (plus ``current_version`` for FAILED_PRECONDITION)."""
    return {"v": 1, "id": rid, "status": "error", "error": error}


_UNENCODABLE: Final = {"code": "INTERNAL", "message": "the reply could not be encoded; the server logged the details"}


def encode(reply: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the one wire form of every reply; never raises.

    A reply that cannot be encoded (a lone surrogate, a NaN, anything not JSON) becomes an INTERNAL
    error reply in the same schema, with the id only if :func:`safe_id` allows it, so every
    request still gets exactly one valid reply."""
    try:
        return json.dumps(reply, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError) as e:  # UnicodeEncodeError is a ValueError
        log.error("ZeroMQ reply not encodable (%s); answering INTERNAL", type(e).__name__)  # no reply content
    return _unencodable(reply)


def _unencodable(reply: dict[str, Any]) -> bytes:
    """The INTERNAL error reply, in ``reply``'s schema, that stands in for a reply that cannot be encoded."""
    if "v" in reply:
        fallback: dict[str, Any] = error_reply(safe_id(reply.get("id")), _UNENCODABLE)
    else:
        fallback = {"status": "error", "error": _UNENCODABLE["message"], "error_code": _UNENCODABLE["code"]}
        rid = safe_id(reply.get("request_id"))
        if rid is not None:
            fallback["request_id"] = rid
    return json.dumps(fallback, separators=(",", ":"), ensure_ascii=True).encode("ascii")


# -- the fast path of reads ------------------------------------------------------------------------
#
# A record's payload is canonical JSON text already: it is spliced into the reply as it is
# (orjson.Fragment) instead of being parsed and written again, and replies that hold only records
# (get, batch_get, list) are written by orjson. Nothing here produces canonical JSON (the checksum's
# is mfh_models.canonical_json), so any valid JSON encoding does.

_ENVELOPE_FIELDS: Final = frozenset({"v", "id", "action", "payload", "api_key", "timeout_ms"})


def record_to_wire(record: Record) -> dict[str, Any]:
    """:func:`record_to_json` for :func:`encode_records`: the same object, the payload text spliced in as is."""
    return {
        "namespace": record.namespace,
        "key": record.key,
        "kind": record.kind.value,
        "payload": orjson.Fragment(record.payload),
        "version": record.version,
        "origin": record.origin,
        "deleted": record.deleted,
        "updated_at_ms": record.updated_at,
        "schema_version": record.schema_version,
    }


def get_data(record: Record) -> bytes:
    """The ``data`` of a ``get`` reply as JSON bytes: what the near cache keeps for ZeroMQ."""
    return orjson.dumps({"record": record_to_wire(record)})


def encode_records(reply: dict[str, Any]) -> bytes:
    """:func:`encode` for a reply built from records (strings, integers, booleans, payload fragments:
    no floats, so nothing orjson would write as ``null`` where json would refuse); never raises."""
    try:
        return orjson.dumps(reply)
    except TypeError as e:  # orjson.JSONEncodeError: a string with a lone surrogate, an integer past 64 bits
        log.error("ZeroMQ reply not encodable (%s); answering INTERNAL", type(e).__name__)
    return _unencodable(reply)


def ok_get_reply(rid: str | int | None, data: bytes) -> bytes:
    """A v1 ``get`` success reply around its encoded ``data`` (:func:`get_data`)."""
    return b'{"v":1,"id":' + orjson.dumps(rid) + b',"status":"ok","data":' + data + b"}"


def plain_get(body: bytes) -> tuple[str | int | None, str, str, str | None, int | None] | None:
    """``(id, namespace, key, api_key, timeout_ms)`` when ``body`` is a well-formed v1 ``get`` of the plainest
    shape (every field of the right type, nothing else); None for anything else, which then takes the full
    path (:func:`decode_json`, :func:`parse_v1`, :func:`parse_payload`) and gets its precise answer there.

    Accepts only what the full path accepts too: strict UTF-8 JSON (orjson refuses bad UTF-8, lone
    surrogates and NaN), ``v`` the integer 1, an id :func:`safe_id` can echo, a payload of exactly two strings.
    """
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(obj) is not dict or obj.get("action") != "get" or not _ENVELOPE_FIELDS.issuperset(obj):
        return None
    v, rid, payload = obj.get("v"), obj.get("id"), obj.get("payload")
    if type(v) is not int or v != 1 or type(payload) is not dict or len(payload) != 2:
        return None
    ns, key = payload.get("namespace"), payload.get("key")
    if type(ns) is not str or type(key) is not str:
        return None
    if rid is not None and not (
        (type(rid) is str and len(rid) <= MAX_ID_CHARS) or (type(rid) is int and _ID_MIN <= rid < _ID_MAX)
    ):
        return None
    api_key, timeout_ms = obj.get("api_key"), obj.get("timeout_ms")
    if api_key is not None and type(api_key) is not str:
        return None
    if timeout_ms is not None and not (type(timeout_ms) is int and 0 < timeout_ms <= 300_000):
        return None
    return rid, ns, key, api_key, timeout_ms
