"""JSON schemas of the public models, for agent developers and for docs/schemas/."""

from __future__ import annotations

from typing import Any

from mfh_models.records import KIND_MODELS, MemoryEvent, Record

__all__ = ["json_schemas"]


def json_schemas() -> dict[str, dict[str, Any]]:
    """Schema per model name: the three payload kinds, the record envelope and the event."""
    out: dict[str, dict[str, Any]] = {kind.value: model.model_json_schema() for kind, model in KIND_MODELS.items()}
    out["record"] = Record.model_json_schema()
    out["memory_event"] = MemoryEvent.model_json_schema()
    return out
