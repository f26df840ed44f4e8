"""LangGraph's ``BaseStore`` on Memory Fusion Hub: ``MfhStore`` (the ``[langgraph]`` extra).

    from mfh_client.langgraph_store import MfhStore

    store = MfhStore("127.0.0.1:5714")
    store.put(("users", "alice"), "prefs", {"drink": "tea"})
    store.get(("users", "alice"), "prefs").value  # {'drink': 'tea'}

How LangGraph's model maps onto MFH's (docs/api.md, "LangGraph store"):

- A namespace tuple is one MFH namespace name (:func:`mfh_models.namespaces.encode_namespace`), so a
  tuple prefix is a name prefix and ``search`` / ``list_namespaces`` run on the hub.
- A key that is not an MFH key (letters, digits and ``_ . : / @ -``, at most 256) is stored escaped
  under ``@x:`` (:func:`encode_key`); plain keys are stored as they are.
- An item is a ``memory_item`` whose ``metadata`` is the value (so the hub's metadata filters apply to
  the value's top-level fields) and whose ``content`` is the value's text (for full-text search).
  ``created_at`` is the time of the last put, as in LangGraph's ``InMemoryStore``.
- Writes are answered once PERSISTED (default): a put is then visible to ``search`` at once, as
  LangGraph's stores promise. ``durability=Durability.ACCEPTED`` is faster; ``get`` still reads its
  own writes, ``search`` sees them once persisted.
- ``index={"dims": N, "embed": ..., "fields": [...]}`` as in LangGraph: the client embeds the indexed
  text of each put (the texts of the fields joined, one vector an item) and the hub ranks by cosine.
  Without an index a ``query`` is ignored, as in ``InMemoryStore``; ``full_text=True`` ranks it with
  the hub's full-text search instead.
- TTLs are in minutes (LangGraph's unit) and become the record's ``ttl_seconds``: the hub hides an
  expired item from every read at once. A read with ``refresh_ttl`` re-puts the item with its expiry
  moved on, conditionally on its version, once a tenth of the TTL has passed.
- Filters: ``{"field": value}`` and the ``$eq $ne $gt $gte $lt $lte`` operators. Conditions on a
  scalar go to the hub; every condition is also checked here, with LangGraph's semantics.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from langgraph.store.base import (
    BaseStore,
    GetOp,
    IndexConfig,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    TTLConfig,
)
from langgraph.store.base.embed import ensure_embeddings, get_text_at_path, tokenize_path

from mfh_client.client import AsyncClient, AsyncMemoryClient, Client, MemoryClient
from mfh_client.types import Durability, MetadataFilter, PutSpec, SearchHit
from mfh_models.errors import InvalidArgument, NotFound, VersionConflict
from mfh_models.expiry import refreshed_payload
from mfh_models.namespaces import decode_namespace, encode_namespace
from mfh_models.records import MAX_KEY_LENGTH, Record

__all__ = ["MfhStore", "decode_key", "encode_key"]

_KIND: Final = "memory_item"
_SOURCE: Final = "langgraph"
_PLAIN_KEY: Final = re.compile(r"[A-Za-z0-9_.:/@-]+")
_KEY_MARK: Final = "@x:"
_KEY_SAFE: Final = re.compile(r"[A-Za-z0-9.:/@-]")
_FIELD_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_OPS: Final = {"$eq": "eq", "$ne": "ne", "$gt": "gt", "$gte": "gte", "$lt": "lt", "$lte": "lte"}
_MAX_TOP_K: Final = 1000
_PAGE: Final = 500


def encode_key(key: str) -> str:
    """The MFH key of a LangGraph key: itself when it is one, else ``@x:`` and an escaped form."""
    if _PLAIN_KEY.fullmatch(key) and len(key) <= MAX_KEY_LENGTH and not key.startswith(_KEY_MARK):
        return key
    out = [ch if _KEY_SAFE.fullmatch(ch) else "".join(f"_{b:02X}" for b in ch.encode()) for ch in key]
    encoded = _KEY_MARK + "".join(out)
    if len(encoded) > MAX_KEY_LENGTH:
        raise InvalidArgument(f"key {key[:40]!r} is too long for the hub once escaped ({MAX_KEY_LENGTH} at most)")
    return encoded


def decode_key(stored: str) -> str:
    """The LangGraph key of an MFH key (the inverse of :func:`encode_key`)."""
    if not stored.startswith(_KEY_MARK):
        return stored
    body, raw, i = stored[len(_KEY_MARK) :], bytearray(), 0
    while i < len(body):
        if body[i] == "_":
            raw.append(int(body[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(body[i].encode())
            i += 1
    return raw.decode()


def _namespace(path: tuple[str, ...]) -> str:
    try:
        return encode_namespace(path)
    except InvalidArgument as e:
        raise InvalidNamespaceError(str(e)) from None


def _strings(value: Any, depth: int = 0) -> list[str]:
    if isinstance(value, str):
        return [value]
    if depth < 8 and isinstance(value, Mapping):
        return [s for v in value.values() for s in _strings(v, depth + 1)]
    if depth < 8 and isinstance(value, list):
        return [s for v in value for s in _strings(v, depth + 1)]
    return []


def _ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _item(record: Record) -> Item:
    obj = record.payload_obj()
    when = _ms_to_datetime(record.updated_at)
    return Item(
        value=dict(obj.get("metadata") or {}),
        key=decode_key(record.key),
        namespace=decode_namespace(record.namespace),
        created_at=when,
        updated_at=when,
    )


def _search_item(hit: SearchHit, scored: bool) -> SearchItem:
    it = _item(hit.record)
    return SearchItem(
        namespace=it.namespace,
        key=it.key,
        value=it.value,
        created_at=it.created_at,
        updated_at=it.updated_at,
        score=float(hit.score) if scored else None,
    )


# -- LangGraph's filter semantics (the same answers as its InMemoryStore) ------------------------------


def _compare(item_value: Any, wanted: Any) -> bool:
    if isinstance(wanted, Mapping):
        if any(str(k).startswith("$") for k in wanted):
            return all(_apply(item_value, op, v) for op, v in wanted.items())
        return isinstance(item_value, Mapping) and all(_compare(item_value.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, list | tuple):
        return (
            isinstance(item_value, list | tuple)
            and len(item_value) == len(wanted)
            and all(_compare(a, b) for a, b in zip(item_value, wanted, strict=True))
        )
    return bool(item_value == wanted)


def _apply(value: Any, op: str, wanted: Any) -> bool:
    if op == "$eq":
        return bool(value == wanted)
    if op == "$ne":
        return bool(value != wanted)
    if op not in _OPS:
        raise InvalidArgument(f"unsupported filter operator {op!r}; expected one of {', '.join(_OPS)}")
    try:
        a, b = float(value), float(wanted)
    except (TypeError, ValueError):
        return False
    return {"$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[op]


def _matches(value: Mapping[str, Any], filters: Mapping[str, Any] | None) -> bool:
    return not filters or all(_compare(value.get(k), v) for k, v in filters.items())


def _is_scalar(v: Any) -> bool:
    return isinstance(v, str | bool) or (isinstance(v, int | float) and math.isfinite(v))


def _hub_filters(filters: Mapping[str, Any] | None) -> list[MetadataFilter]:
    """The conditions the hub can check exactly as LangGraph does (equality on scalars; ranges on numbers)."""
    out: list[MetadataFilter] = []
    for name, wanted in (filters or {}).items():
        if not _FIELD_NAME.fullmatch(str(name)):
            continue
        if _is_scalar(wanted):
            out.append(MetadataFilter(name, "eq", wanted))
        elif isinstance(wanted, Mapping) and wanted and all(str(k).startswith("$") for k in wanted):
            for op, v in wanted.items():
                numeric = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                if (op in ("$eq", "$ne") and _is_scalar(v)) or (op in _OPS and numeric):
                    out.append(MetadataFilter(name, _OPS[op], v))
    return out


def _does_match(cond: MatchCondition, ns: tuple[str, ...]) -> bool:
    path = tuple(cond.path)
    if len(ns) < len(path):
        return False
    pairs = (
        zip(ns, path, strict=False) if cond.match_type == "prefix" else zip(reversed(ns), reversed(path), strict=False)
    )
    return all(p == "*" or a == p for a, p in pairs)


# -- planning a batch: LangGraph evaluates every read against the state before the batch's writes ------


@dataclass
class _Plan:
    results: list[Result]
    reads: list[tuple[int, Op]] = field(default_factory=list)
    writes: dict[tuple[tuple[str, ...], str], PutOp] = field(default_factory=dict)


def _plan(ops: Iterable[Op]) -> _Plan:
    plan = _Plan(results=[])
    for i, op in enumerate(ops):
        plan.results.append(None)
        if isinstance(op, PutOp):
            _namespace(op.namespace)
            plan.writes[(op.namespace, op.key)] = op
        elif isinstance(op, GetOp | SearchOp | ListNamespacesOp):
            plan.reads.append((i, op))
        else:
            raise ValueError(f"unknown operation type: {type(op).__name__}")
    return plan


def _ttl_seconds(minutes: float | None) -> int | None:
    if minutes is None:
        return None
    if not minutes > 0:
        raise InvalidArgument("ttl must be a positive number of minutes")
    return max(1, math.ceil(minutes * 60))


def _namespace_page(names: list[str], op: ListNamespacesOp) -> list[tuple[str, ...]]:
    found = [decode_namespace(n) for n in names]
    if op.match_conditions:
        found = [ns for ns in found if all(_does_match(c, ns) for c in op.match_conditions)]
    if op.max_depth is not None:
        found = [ns[: op.max_depth] for ns in found]
    return sorted(set(found))[op.offset : op.offset + op.limit]


def _list_prefix(op: ListNamespacesOp) -> str:
    """The encoded name prefix a listing can be narrowed to on the hub (a prefix condition without '*')."""
    for cond in op.match_conditions or ():
        if cond.match_type == "prefix" and cond.path:
            fixed: list[str] = []
            for label in cond.path:
                if label == "*":
                    break
                fixed.append(label)
            if fixed:
                return _namespace(tuple(fixed))
    return ""


class MfhStore(BaseStore):
    """LangGraph's ``BaseStore`` on a Memory Fusion Hub (gRPC): ``batch`` and ``abatch`` with get, put,
    delete, search and list_namespaces, and TTLs. See the module's docstring for the mapping."""

    supports_ttl: bool = True

    __slots__ = (
        "_aclient",
        "_client",
        "_embeddings",
        "_endpoints",
        "_fields",
        "_options",
        "durability",
        "full_text",
        "index_config",
        "ttl_config",
    )

    def __init__(
        self,
        endpoints: str | Sequence[str] = "127.0.0.1:5714",
        *,
        api_key: str | None = None,
        index: IndexConfig | None = None,
        ttl: TTLConfig | None = None,
        durability: Durability = Durability.PERSISTED,
        full_text: bool = False,
        client: Client | None = None,
        aclient: AsyncClient | None = None,
        timeout: float | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._options: dict[str, Any] = {"api_key": api_key}
        if timeout is not None:
            self._options["timeout"] = timeout
        self._client = client
        self._aclient = aclient
        self.durability = durability
        self.full_text = full_text
        self.ttl_config = ttl
        self.index_config = dict(index) if index else None
        self._embeddings = ensure_embeddings(index.get("embed")) if index else None
        self._fields = [(p, tokenize_path(p) if p != "$" else p) for p in (index or {}).get("fields") or ["$"]]

    # -- clients ---------------------------------------------------------------------------------------

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = MemoryClient(self._endpoints, **self._options)
        return self._client

    @property
    def aclient(self) -> AsyncClient:
        if self._aclient is None:
            self._aclient = AsyncMemoryClient(self._endpoints, **self._options)
        return self._aclient

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> MfhStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def aclose(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()

    # -- pure parts ------------------------------------------------------------------------------------

    def _texts(self, op: PutOp) -> list[str]:
        assert op.value is not None
        if op.index is False:
            return []
        paths = self._fields if op.index is None else [(p, tokenize_path(p)) for p in op.index]
        texts: list[str] = []
        for path, tokens in paths:
            texts.extend(_strings(dict(op.value)) if path == "$" else get_text_at_path(op.value, tokens))
        return [t for t in texts if t]

    def _spec(self, op: PutOp, embedding: list[float] | None) -> PutSpec:
        assert op.value is not None
        value = dict(op.value)
        payload: dict[str, Any] = {
            "content": " ".join(_strings(value))[:60_000] or "-",
            "metadata": value,
            "source": _SOURCE,
        }
        if embedding:
            payload["embedding"] = [float(x) for x in embedding]
        return PutSpec(_namespace(op.namespace), encode_key(op.key), _KIND, payload, ttl_seconds=_ttl_seconds(op.ttl))

    def _refresh(self, op: GetOp | SearchOp) -> bool:
        if op.refresh_ttl is not None:
            return bool(op.refresh_ttl)
        return bool((self.ttl_config or {}).get("refresh_on_read", True))

    def _search_args(self, op: SearchOp, scope: str, embedding: list[float] | None) -> dict[str, Any]:
        _check_filter(op.filter)
        needs_all = any(
            not (_FIELD_NAME.fullmatch(str(k)) and _is_scalar_condition(v)) for k, v in (op.filter or {}).items()
        )
        top_k = _MAX_TOP_K if needs_all else min(_MAX_TOP_K, max(1, op.offset + op.limit))
        return {
            "namespace_prefix": scope,
            "query": op.query if op.query and self.full_text and not embedding else "",
            "metadata": _hub_filters(op.filter),
            "embedding": embedding or (),
            "top_k": top_k,
        }

    @staticmethod
    def _search_result(op: SearchOp, hits: list[SearchHit], scored: bool) -> list[SearchItem]:
        if scored:
            hits = sorted(hits, key=lambda h: -h.score)
        items = [_search_item(h, scored) for h in hits]
        items = [it for it in items if _matches(it.value, op.filter)]
        return items[op.offset : op.offset + op.limit]

    def _to_embed(self, values: list[PutOp]) -> dict[int, str]:
        """Of the puts with a value, which to embed (their index) and the text to embed."""
        if self._embeddings is None:
            return {}
        return {n: "\n".join(t) for n, t in enumerate(self._texts(op) for op in values) if t}

    def _specs(self, values: list[PutOp], wanted: dict[int, str], vectors: list[list[float]]) -> list[PutSpec]:
        by_index = {n: list(v) for n, v in zip(wanted, vectors, strict=True)}
        return [self._spec(op, by_index.get(n)) for n, op in enumerate(values)]

    # -- the sync path ---------------------------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        plan = _plan(ops)
        for i, op in plan.reads:
            if isinstance(op, GetOp):
                plan.results[i] = self._get(op)
            elif isinstance(op, SearchOp):
                plan.results[i] = self._search(op)
            else:
                assert isinstance(op, ListNamespacesOp)
                plan.results[i] = _namespace_page(_all_names(self.client, prefix=_list_prefix(op)), op)
        self._write(list(plan.writes.values()))
        return plan.results

    def _get(self, op: GetOp) -> Item | None:
        try:
            record = self.client.get(_namespace(op.namespace), encode_key(op.key))
        except NotFound:
            return None
        if self._refresh(op):
            self._refresh_record(record)
        return _item(record)

    def _refresh_record(self, record: Record) -> None:
        spec = _refresh_spec(record)
        if spec is not None:
            with contextlib.suppress(VersionConflict, NotFound):  # written meanwhile, with its own expiry
                self.client.put(spec, durability=Durability.ACCEPTED)

    def _search(self, op: SearchOp) -> list[SearchItem]:
        embedding = None
        if op.query and self._embeddings is not None:
            embedding = list(self._embeddings.embed_query(op.query))
        scopes = [_namespace(tuple(op.namespace_prefix))] if op.namespace_prefix else _all_names(self.client, depth=1)
        hits = [h for scope in scopes for h in self.client.search(**self._search_args(op, scope, embedding))]
        if self._refresh(op):
            for hit in hits:
                self._refresh_record(hit.record)
        return self._search_result(op, hits, scored=embedding is not None)

    def _write(self, puts: list[PutOp]) -> None:
        values = [op for op in puts if op.value is not None]
        wanted = self._to_embed(values)
        vectors = self._embeddings.embed_documents(list(wanted.values())) if wanted and self._embeddings else []
        if values:
            self.client.batch_put(self._specs(values, wanted, vectors), durability=self.durability)
        for op in puts:
            if op.value is None:
                with contextlib.suppress(NotFound):
                    self.client.delete(_namespace(op.namespace), encode_key(op.key), durability=self.durability)

    # -- the async path (the same steps, awaited) ------------------------------------------------------

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        plan = _plan(ops)
        for i, op in plan.reads:
            if isinstance(op, GetOp):
                plan.results[i] = await self._aget(op)
            elif isinstance(op, SearchOp):
                plan.results[i] = await self._asearch(op)
            else:
                assert isinstance(op, ListNamespacesOp)
                plan.results[i] = _namespace_page(await _aall_names(self.aclient, prefix=_list_prefix(op)), op)
        await self._awrite(list(plan.writes.values()))
        return plan.results

    async def _aget(self, op: GetOp) -> Item | None:
        try:
            record = await self.aclient.get(_namespace(op.namespace), encode_key(op.key))
        except NotFound:
            return None
        if self._refresh(op):
            await self._arefresh_record(record)
        return _item(record)

    async def _arefresh_record(self, record: Record) -> None:
        spec = _refresh_spec(record)
        if spec is not None:
            with contextlib.suppress(VersionConflict, NotFound):
                await self.aclient.put(spec, durability=Durability.ACCEPTED)

    async def _asearch(self, op: SearchOp) -> list[SearchItem]:
        embedding = None
        if op.query and self._embeddings is not None:
            embedding = list(await self._embeddings.aembed_query(op.query))
        prefix = tuple(op.namespace_prefix)
        scopes = [_namespace(prefix)] if prefix else await _aall_names(self.aclient, depth=1)
        hits = [h for scope in scopes for h in await self.aclient.search(**self._search_args(op, scope, embedding))]
        if self._refresh(op):
            await asyncio.gather(*(self._arefresh_record(h.record) for h in hits))
        return self._search_result(op, hits, scored=embedding is not None)

    async def _awrite(self, puts: list[PutOp]) -> None:
        values = [op for op in puts if op.value is not None]
        wanted = self._to_embed(values)
        vectors = await self._embeddings.aembed_documents(list(wanted.values())) if wanted and self._embeddings else []
        if values:
            await self.aclient.batch_put(self._specs(values, wanted, vectors), durability=self.durability)
        for op in puts:
            if op.value is None:
                with contextlib.suppress(NotFound):
                    await self.aclient.delete(_namespace(op.namespace), encode_key(op.key), durability=self.durability)


def _refresh_spec(record: Record) -> PutSpec | None:
    """The conditional re-put that moves a read item's expiry on (None: nothing to refresh yet)."""
    payload = refreshed_payload(record, int(time.time() * 1000))
    if payload is None:
        return None
    return PutSpec(record.namespace, record.key, record.kind.value, payload, expected_version=record.version)


def _check_filter(filters: Mapping[str, Any] | None, depth: int = 0) -> None:
    """Unknown ``$`` operators are refused before anything is asked (not only when an item is compared)."""
    for value in (filters or {}).values():
        if isinstance(value, Mapping):
            for k in value:
                if str(k).startswith("$") and k not in _OPS:
                    raise InvalidArgument(f"unsupported filter operator {k!r}; expected one of {', '.join(_OPS)}")
            if depth < 8:
                _check_filter({k: v for k, v in value.items() if not str(k).startswith("$")}, depth + 1)


def _is_scalar_condition(v: Any) -> bool:
    return _is_scalar(v) or (
        isinstance(v, Mapping) and bool(v) and all(k in _OPS and _is_scalar(x) for k, x in v.items())
    )


def _all_names(client: Client, *, prefix: str = "", depth: int = 0) -> list[str]:
    names: list[str] = []
    token = ""
    while True:
        page, token = client.list_namespaces(prefix=prefix, max_depth=depth, page_size=_PAGE, page_token=token)
        names.extend(page)
        if not token:
            return names


async def _aall_names(client: AsyncClient, *, prefix: str = "", depth: int = 0) -> list[str]:
    names: list[str] = []
    token = ""
    while True:
        page, token = await client.list_namespaces(prefix=prefix, max_depth=depth, page_size=_PAGE, page_token=token)
        names.extend(page)
        if not token:
            return names
