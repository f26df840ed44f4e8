"""The search index: derived state, one ``search_docs`` row per item, written in the item's transaction.

A row holds what search filters and ranks on, taken from the item's payload: the text (full-text),
the tags and metadata (filters), ``expires_at_ms`` (expiry), and the embedding's dimension. The
embedding itself stays in the item's payload (the truth): the api's vector cache parses it from there
when it loads a namespace, so the write path never parses an embedding's floats (mfh_core.vectors).
Rows carry the item's (version, origin) and are upserted under the same guard as ``items``, so the
index is order-insensitive and idempotent like the items (DESIGN.md invariant 2), and ``mfh replay``
rebuilds it from the log. The index is not part of the checksum (invariant 7 covers items only).

Which text each kind indexes: ``memory_item`` its content and tags; ``knowledge_record`` subject,
predicate, object and content; ``session_data`` the string values of ``data``. Filters read
``metadata`` (``data`` for session_data) and ``tags`` (memory_item).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson

__all__ = [
    "DOC_COLS",
    "MAX_QUERY_TERMS",
    "MetaFilter",
    "SearchQuery",
    "doc_row",
    "embedding_of",
    "fts_terms",
]

DOC_COLS: Final = "namespace, key, kind, version, origin, deleted, updated_at, expires_at, tags, meta, body, dim, chg"
#: Terms of one full-text query the index looks up (more is refused as oversized by the service).
MAX_QUERY_TERMS: Final = 32
_TERM: Final = re.compile(r"\w+", re.UNICODE)
_MAX_BODY_CHARS: Final = 64 * 1024
_EMBEDDING: Final = '"embedding":['


@dataclass(frozen=True, slots=True)
class MetaFilter:
    """``metadata.<field> <op> value``; op is one of eq, ne, lt, lte, gt, gte, in (value a list)."""

    field: str
    op: str
    value: Any


@dataclass(frozen=True, slots=True)
class SearchQuery:
    """A validated search: scope (one namespace, or a namespace and the names below it), filters, text."""

    namespace: str
    prefix: bool
    now_ms: int
    terms: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    meta: tuple[MetaFilter, ...] = ()
    updated_after_ms: int | None = None
    updated_before_ms: int | None = None
    limit: int | None = 10

    @property
    def filtered(self) -> bool:
        """Anything beyond scope and expiry narrows the candidates."""
        return bool(
            self.terms
            or self.kinds
            or self.tags
            or self.meta
            or self.updated_after_ms is not None
            or self.updated_before_ms is not None
        )


def fts_terms(query: str) -> tuple[str, ...]:
    """The words of a full-text query (letters, digits, underscore), lower-cased, deduplicated."""
    return tuple(dict.fromkeys(t.lower() for t in _TERM.findall(query)))


def _strings(value: Any, depth: int = 0) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif depth < 8 and isinstance(value, dict):
        for v in value.values():
            yield from _strings(v, depth + 1)
    elif depth < 8 and isinstance(value, list):
        for v in value:
            yield from _strings(v, depth + 1)


def _text(kind: str, obj: dict[str, Any]) -> str:
    if kind == "memory_item":
        content, tags = obj.get("content"), obj.get("tags")
        if type(content) is str and not tags:  # most memories: the content alone, no join
            return content[:_MAX_BODY_CHARS]
        parts = [content, *(tags or [])]
    elif kind == "knowledge_record":
        parts = [obj.get("subject"), obj.get("predicate"), obj.get("object"), obj.get("content")]
    else:
        parts = list(_strings(obj.get("data") or {}))
    return " ".join([p for p in parts if isinstance(p, str)])[:_MAX_BODY_CHARS]


def _loads(text: str) -> Any:
    """json.loads, through orjson (about 3x faster) unless the text holds what orjson refuses (an
    integer beyond 64 bits): the write path parses every payload once, here."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _dumps(value: Any, *, sort_keys: bool = False) -> str:
    """Compact JSON of a parsed value (orjson, or json for an integer beyond 64 bits)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else 0).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"), sort_keys=sort_keys, ensure_ascii=False)


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _cut_embedding(payload: str) -> tuple[Any, str | None]:
    """(the payload's object, the text of its top-level embedding array, or None without one).

    Parsing an embedding's floats is most of what indexing a record would cost, so the write path does
    not: the top-level array (validated: a flat list of numbers) is cut out of the canonical text and
    the rest is parsed with ``0`` standing where the array was. The marker is found at the top level
    only when the cut array was the top-level one (a key of that name deeper down keeps its depth), and
    a cut that broke the text fails to parse: either way the whole text is then parsed instead.
    """
    at = payload.find(_EMBEDDING)
    if at >= 0:
        start = at + len(_EMBEDDING)
        end = payload.find("]", start)
        if end > start:
            try:
                obj = _loads(f"{payload[: start - 1]}0{payload[end + 1 :]}")
            except ValueError:
                obj = None
            mark = obj.get("embedding") if isinstance(obj, dict) else None
            if type(mark) is int and mark == 0 and isinstance(obj, dict):
                del obj["embedding"]
                return obj, payload[start:end]
    obj = _loads(payload)
    vec = obj.get("embedding") if isinstance(obj, dict) else None
    if isinstance(vec, list) and vec:
        return obj, _dumps(vec)[1:-1]
    return obj, None


def embedding_of(payload: str) -> np.ndarray[Any, np.dtype[np.float32]] | None:
    """The payload's top-level embedding as float32 (the vector cache's one parse of it), or None."""
    _, text = _cut_embedding(payload)
    if text is None:
        return None
    # json's scanner reads a list of numbers about twice as fast as splitting and converting with numpy
    return np.array(json.loads(f"[{text}]"), dtype=np.float32)


def doc_row(item: tuple[Any, ...], chg: int) -> tuple[Any, ...]:
    """The ``search_docs`` row (in :data:`DOC_COLS` order) of an items row
    ``(namespace, key, kind, payload, version, origin, deleted, updated_at, schema_version)``."""
    namespace, key, kind, payload, version, origin, deleted, updated_at = item[:8]
    obj, vec = (None, None) if deleted else _cut_embedding(payload)
    if not isinstance(obj, dict):
        return (namespace, key, kind, version, origin, True, updated_at, None, "[]", "{}", "", None, chg)
    tags = [t for t in obj.get("tags") or [] if isinstance(t, str)] if kind == "memory_item" else []
    meta = obj.get("data" if kind == "session_data" else "metadata") or {}
    # Empty tags and metadata (most records) skip the encoder: the same text json.dumps gives them.
    tags_json = _dumps(tags) if tags else "[]"
    meta_json = _dumps(meta, sort_keys=True) if meta and isinstance(meta, dict) else "{}"
    return (
        namespace,
        key,
        kind,
        version,
        origin,
        False,
        updated_at,
        _int_or_none(obj.get("expires_at_ms")),
        tags_json,
        meta_json,
        _text(kind, obj),
        None if vec is None else vec.count(",") + 1,
        chg,
    )
