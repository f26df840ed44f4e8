"""The ZeroMQ v1 wire protocol: JSON requests and replies, parsed with pydantic (docs/api.md).

Parsing never raises on input: anything malformed becomes an :class:`InvalidArgument` the server
turns into an error reply, so one bad client cannot take the server down (DESIGN.md invariant 8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from mfh_client.codecs import record_from_json, record_to_json
from mfh_models import MAX_JSON_DEPTH, InvalidArgument, decode_untrusted_json
from mfh_models.records import format_validation_error

__all__ = [
    "ACTIONS",
    "MAX_BATCH",
    "RPC_NAMES",
    "BatchGetPayload",
    "BatchPutPayload",
    "DeletePayload",
    "GetPayload",
    "ListPayload",
    "PutPayload",
    "V1Request",
    "decode_json",
    "encode",
    "error_reply",
    "ok_reply",
    "parse_payload",
    "parse_v1",
    "record_from_json",
    "record_to_json",
    "request_id",
]

#: A sanity bound on batch sizes; the service enforces its own, smaller limits with precise messages.
MAX_BATCH: Final = 10_000

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


ACTIONS: Final[dict[str, type[_Strict]]] = {
    "get": GetPayload,
    "batch_get": BatchGetPayload,
    "put": PutPayload,
    "batch_put": BatchPutPayload,
    "delete": DeletePayload,
    "list": ListPayload,
}


#: Action → gRPC method name, the ``method`` label of the request metrics on both transports.
RPC_NAMES: Final[dict[str, str]] = {
    "get": "Get",
    "batch_get": "BatchGet",
    "put": "Put",
    "batch_put": "BatchPut",
    "delete": "Delete",
    "list": "List",
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


def request_id(obj: dict[str, Any], field: str = "id") -> str | int | None:
    """The client's request id (``id`` in v1) if it is one we can echo back, else None."""
    rid = obj.get(field)
    return rid if isinstance(rid, str | int) and not isinstance(rid, bool) else None


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


def encode(reply: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON, the one wire form of every reply."""
    return json.dumps(reply, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
