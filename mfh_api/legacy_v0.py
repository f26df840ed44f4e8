"""The v0 shim: the legacy memory agents' flat JSON schema, translated to v1 and back (docs/v0_schema.md).

Legacy agents send ``{"action", <flat fields>}`` with no ``v`` on the same ZeroMQ port; every such
call is counted in ``mfh_api_legacy_v0_calls_total`` so operators see when the last one is gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from mfh_core.metrics import LEGACY_V0_CALLS
from mfh_models import InvalidArgument
from mfh_models.records import format_validation_error

__all__ = [
    "DEFAULT_KIND",
    "DEFAULT_NAMESPACE",
    "V0_ACTIONS",
    "V0Request",
    "count_call",
    "error_to_v0",
    "ok_to_v0",
    "parse_v0",
]

DEFAULT_NAMESPACE: Final = "default"
DEFAULT_KIND: Final = "memory_item"

#: v0 action → v1 action. ``store`` and ``retrieve`` are the verbs of the oldest agents.
V0_ACTIONS: Final[dict[str, str]] = {
    "get": "get",
    "retrieve": "get",
    "batch_get": "batch_get",
    "put": "put",
    "store": "put",
    "delete": "delete",
    "list": "list",
}


class _V0Fields(BaseModel):
    """Every flat field a v0 request may carry; unknown extras are ignored, as the old agents did."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    action: StrictStr
    request_id: StrictStr | StrictInt | None = None
    namespace: StrictStr = DEFAULT_NAMESPACE
    key: StrictStr | None = None
    keys: list[StrictStr] | None = None
    kind: StrictStr = DEFAULT_KIND
    value: dict[str, Any] | None = None
    expected_version: StrictInt | None = Field(default=None, ge=0)
    prefix: StrictStr = ""
    limit: StrictInt = Field(default=100, ge=1)
    cursor: StrictStr | None = None
    include_deleted: StrictBool = False


_REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "get": ("key",),
    "batch_get": ("keys",),
    "put": ("key", "value"),
    "delete": ("key",),
    "list": (),
}


@dataclass(frozen=True, slots=True)
class V0Request:
    """A v0 request translated: the v1 ``action`` and ``payload`` to run, and what the reply needs."""

    v0_action: str
    action: str
    payload: dict[str, Any]
    request_id: str | int | None


def count_call(obj: dict[str, Any]) -> None:
    """Count one v0 call by action (bounded labels: anything unknown is "unknown"), refused ones too."""
    action = obj.get("action")
    LEGACY_V0_CALLS.labels(action=action if isinstance(action, str) and action in V0_ACTIONS else "unknown").inc()


def parse_v0(obj: dict[str, Any]) -> V0Request:
    """Translate a v0 request to v1; InvalidArgument for anything malformed."""
    raw_action = obj.get("action")
    if not isinstance(raw_action, str) or raw_action not in V0_ACTIONS:
        shown = repr(raw_action)[:40] if raw_action is not None else "missing"
        raise InvalidArgument(f"unknown action {shown}; expected one of {', '.join(V0_ACTIONS)}")
    try:
        f = _V0Fields.model_validate(obj)
    except ValidationError as e:
        raise InvalidArgument(f"invalid v0 request: {format_validation_error(e)}") from None
    action = V0_ACTIONS[f.action]
    missing = [name for name in _REQUIRED[action] if getattr(f, name) is None]
    if missing:
        raise InvalidArgument(f"{f.action} needs {' and '.join(missing)}")
    payload: dict[str, Any]
    if action == "get":
        payload = {"namespace": f.namespace, "key": f.key}
    elif action == "batch_get":
        payload = {"namespace": f.namespace, "keys": f.keys}
    elif action == "put":
        payload = {"namespace": f.namespace, "key": f.key, "kind": f.kind, "payload": f.value}
        if f.expected_version is not None:
            payload["expected_version"] = f.expected_version
    elif action == "delete":
        payload = {"namespace": f.namespace, "key": f.key}
        if f.expected_version is not None:
            payload["expected_version"] = f.expected_version
    else:
        payload = {
            "namespace": f.namespace,
            "key_prefix": f.prefix,
            "page_size": f.limit,
            "page_token": f.cursor or "",
            "include_deleted": f.include_deleted,
        }
    return V0Request(v0_action=f.action, action=action, payload=payload, request_id=f.request_id)


def _item(record: dict[str, Any]) -> dict[str, Any]:
    """A v1 record as the flat v0 item (``value`` for the payload, ``updated_at`` in ms)."""
    return {
        "namespace": record["namespace"],
        "key": record["key"],
        "kind": record["kind"],
        "value": record["payload"],
        "version": record["version"],
        "origin": record["origin"],
        "deleted": record["deleted"],
        "updated_at": record["updated_at_ms"],
    }


def _with_id(reply: dict[str, Any], request_id: str | int | None) -> dict[str, Any]:
    if request_id is not None:
        reply["request_id"] = request_id
    return reply


def ok_to_v0(req: V0Request, data: dict[str, Any]) -> dict[str, Any]:
    """Translate the v1 ``data`` of a successful call into the v0 success reply."""
    reply: dict[str, Any] = {"status": "success"}
    if req.action == "get":
        reply.update(_item(data["record"]))
    elif req.action == "batch_get":
        reply["items"] = [_item(r) for r in data["records"]]
        reply["missing"] = data["missing"]
    elif req.action == "list":
        reply["items"] = [_item(r) for r in data["records"]]
        reply["next_cursor"] = data["next_page_token"] or None
    else:  # put, delete
        reply.update(key=req.payload["key"], version=data["version"], event_id=data["event_id"])
    return _with_id(reply, req.request_id)


def error_to_v0(request_id: str | int | None, error: dict[str, Any]) -> dict[str, Any]:
    """The v0 error reply: ``error`` is the message (as the old agents had it), ``error_code`` the v1 code."""
    reply: dict[str, Any] = {"status": "error", "error": error["message"], "error_code": error["code"]}
    if "current_version" in error:
        reply["current_version"] = error["current_version"]
    return _with_id(reply, request_id)
