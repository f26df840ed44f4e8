"""Search and ListNamespaces requests, transport-free: what a caller may ask, checked before any store is read.

Everything here raises :class:`InvalidArgument` (never anything else) on bad input: unknown kinds,
malformed metadata filters, oversized queries, embeddings of a bad length or with non-finite values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from mfh_core.searchindex import MAX_QUERY_TERMS, MetaFilter, SearchQuery, fts_terms
from mfh_models import InvalidArgument, decode_untrusted_json, parse_kind, validate_namespace
from mfh_models.records import MAX_EMBEDDING_DIM

__all__ = [
    "DEFAULT_TOP_K",
    "MAX_QUERY_CHARS",
    "MAX_TOP_K",
    "MetadataCondition",
    "SearchSpec",
    "check_embedding",
    "parse_metadata_filter",
    "validate_search",
]

MAX_QUERY_CHARS: Final = 1024
MAX_TOP_K: Final = 1000
DEFAULT_TOP_K: Final = 10
MAX_TAGS: Final = 64
MAX_FILTERS: Final = 16
MAX_IN_VALUES: Final = 100
_MAX_VALUE_CHARS: Final = 1024
_FIELD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_OPS: Final = ("eq", "ne", "lt", "lte", "gt", "gte", "in")
_MAX_MS: Final = 1 << 53


@dataclass(frozen=True)
class MetadataCondition:
    """``metadata.<field> <op> <value>``; ``value`` is already decoded (a scalar, or a list for ``in``)."""

    field: str
    op: str
    value: Any


@dataclass(frozen=True)
class SearchSpec:
    """One search as any door receives it."""

    namespace: str = ""
    namespace_prefix: str = ""
    query: str = ""
    kinds: Sequence[str] = ()
    tags: Sequence[str] = ()
    metadata: Sequence[MetadataCondition] = ()
    updated_after_ms: int | None = None
    updated_before_ms: int | None = None
    embedding: Sequence[float] = field(default_factory=tuple)
    top_k: int = 0


def parse_metadata_filter(field_name: Any, op: Any, value_json: Any) -> MetadataCondition:
    """A gRPC MetadataFilter (value as JSON text) as a condition; InvalidArgument when it is not JSON."""
    if not isinstance(value_json, str) or not value_json:
        raise InvalidArgument(f"metadata filter on {str(field_name)[:70]!r}: value_json is required")
    value = decode_untrusted_json(value_json, what="value_json", max_bytes=64 * 1024, max_depth=2)
    return MetadataCondition(field=field_name, op=op, value=value)


def _scalar(v: Any, where: str, *, ordered: bool) -> Any:
    if isinstance(v, bool):
        if ordered:
            raise InvalidArgument(f"{where}: a range compares strings or numbers, not booleans")
        return v
    if isinstance(v, int):
        if abs(v) >= _MAX_MS * 1024:
            raise InvalidArgument(f"{where}: number out of range")
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise InvalidArgument(f"{where}: number must be finite")
        return v
    if isinstance(v, str):
        if len(v) > _MAX_VALUE_CHARS:
            raise InvalidArgument(f"{where}: string longer than {_MAX_VALUE_CHARS} characters")
        return v
    raise InvalidArgument(f"{where}: value must be a string, number or boolean")


def _condition(i: int, c: Any) -> MetaFilter:
    where = f"filters.metadata[{i}]"
    if not isinstance(c, MetadataCondition):
        raise InvalidArgument(f"{where}: not a metadata condition")
    if not isinstance(c.field, str) or not _FIELD.fullmatch(c.field):
        raise InvalidArgument(f"{where}: field must be 1-64 letters, digits or '_', not starting with a digit")
    if c.op not in _OPS:
        raise InvalidArgument(f"{where}: op {str(c.op)[:20]!r} is not one of {', '.join(_OPS)}")
    if c.op == "in":
        if not isinstance(c.value, list) or not 1 <= len(c.value) <= MAX_IN_VALUES:
            raise InvalidArgument(f"{where}: 'in' takes an array of 1 to {MAX_IN_VALUES} values")
        return MetaFilter(c.field, c.op, tuple(_scalar(v, where, ordered=False) for v in c.value))
    ordered = c.op in ("lt", "lte", "gt", "gte")
    return MetaFilter(c.field, c.op, _scalar(c.value, where, ordered=ordered))


def _ms(v: Any, name: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < _MAX_MS:
        raise InvalidArgument(f"filters.{name} must be unix milliseconds (0 to 2^53)")
    return v


def check_embedding(values: Sequence[Any], what: str = "embedding") -> list[float]:
    """Finite numbers, at most MAX_EMBEDDING_DIM of them, not all zero."""
    if len(values) > MAX_EMBEDDING_DIM:
        raise InvalidArgument(f"{what} has {len(values)} dimensions; at most {MAX_EMBEDDING_DIM}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or abs(v) > 3.4e38:
            raise InvalidArgument(f"{what} must hold finite numbers within the float32 range")
        out.append(float(v))
    if out and not any(out):
        raise InvalidArgument(f"{what} is all zeros: it has no direction to compare")
    return out


def validate_search(spec: SearchSpec, now_ms: int) -> tuple[SearchQuery, list[float], int]:
    """(the index query, the embedding or [], top_k); InvalidArgument names the first bad field."""
    if bool(spec.namespace) == bool(spec.namespace_prefix):
        raise InvalidArgument("set exactly one of namespace and namespace_prefix")
    scope = validate_namespace(spec.namespace or spec.namespace_prefix)
    if not isinstance(spec.query, str) or len(spec.query) > MAX_QUERY_CHARS:
        raise InvalidArgument(f"query is longer than {MAX_QUERY_CHARS} characters")
    terms = fts_terms(spec.query)
    if spec.query.strip() and not terms:
        raise InvalidArgument("query holds no words to search for")
    if len(terms) > MAX_QUERY_TERMS:
        raise InvalidArgument(f"query has {len(terms)} words; at most {MAX_QUERY_TERMS}")
    kinds = tuple(dict.fromkeys(parse_kind(k).value for k in spec.kinds))
    tags = tuple(dict.fromkeys(spec.tags))
    if len(tags) > MAX_TAGS or not all(isinstance(t, str) and 0 < len(t) <= 256 for t in tags):
        raise InvalidArgument(f"filters.tags: at most {MAX_TAGS} tags of 1-256 characters")
    if len(spec.metadata) > MAX_FILTERS:
        raise InvalidArgument(f"filters.metadata: at most {MAX_FILTERS} conditions")
    meta = tuple(_condition(i, c) for i, c in enumerate(spec.metadata))
    top_k = spec.top_k or DEFAULT_TOP_K
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be from 1 to {MAX_TOP_K} (0: {DEFAULT_TOP_K})")
    embedding = check_embedding(list(spec.embedding))
    query = SearchQuery(
        namespace=scope,
        prefix=bool(spec.namespace_prefix),
        now_ms=now_ms,
        terms=terms,
        kinds=kinds,
        tags=tags,
        meta=meta,
        updated_after_ms=_ms(spec.updated_after_ms, "updated_after_ms"),
        updated_before_ms=_ms(spec.updated_before_ms, "updated_before_ms"),
        limit=None if embedding else top_k,
    )
    return query, embedding, top_k
