"""Reads of the search index (``search_docs``, ``search_namespaces``) in SQLite and Postgres dialects.

Every value travels as a bound parameter; the only text spliced into SQL is a metadata field name,
which the service has checked against ``[A-Za-z_][A-Za-z0-9_]{0,63}``. Range comparisons only match
values of the query value's JSON type, so SQLite (which orders numbers before text) and Postgres
(jsonb ordering) give the same answers.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mfh_core.searchindex import SearchQuery
from mfh_core.vectors import DECODE_CHUNK, VectorChunk, decode_rows

__all__ = ["VectorChunk", "expired", "live_namespaces", "namespace_rows", "search_keys", "vectors_since"]

_FIELD: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_OPS: Final = {"eq": "=", "ne": "<>", "lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
_LIVE: Final = "NOT d.deleted AND (d.expires_at IS NULL OR d.expires_at > :now)"


def _one_statement(conn: Connection) -> Connection:
    """``conn`` for one read statement: on Postgres in autocommit (the statement's own snapshot), which
    spares the BEGIN and ROLLBACK round trips, a third of a short search's time on a loaded host."""
    return conn.execution_options(isolation_level="AUTOCOMMIT") if conn.dialect.name == "postgresql" else conn


def _scope(column: str, namespace: str, prefix: bool, params: dict[str, Any]) -> str:
    params["ns"] = namespace
    if not prefix:
        return f"{column} = :ns"
    # Names below "a.b" sort between "a.b." and "a.b/" ('/' follows '.').
    params["ns_lo"], params["ns_hi"] = namespace + ".", namespace + "/"
    return f"({column} = :ns OR ({column} >= :ns_lo AND {column} < :ns_hi))"


def _json_type(value: Any) -> str:
    return "string" if isinstance(value, str) else "number"


def _filters(q: SearchQuery, dialect: str, params: dict[str, Any]) -> list[str]:
    pg = dialect == "postgresql"
    where = [_scope("d.namespace", q.namespace, q.prefix, params), _LIVE]
    params["now"] = q.now_ms
    if q.kinds:
        names = []
        for i, k in enumerate(q.kinds):
            params[f"k{i}"] = k
            names.append(f":k{i}")
        where.append(f"d.kind IN ({', '.join(names)})")
    if q.updated_after_ms is not None:
        params["ua"] = q.updated_after_ms
        where.append("d.updated_at >= :ua")
    if q.updated_before_ms is not None:
        params["ub"] = q.updated_before_ms
        where.append("d.updated_at < :ub")
    for i, tag in enumerate(q.tags):
        if pg:
            params[f"t{i}"] = json.dumps([tag])
            where.append(f"d.tags @> CAST(:t{i} AS jsonb)")
        else:
            params[f"t{i}"] = tag
            where.append(f"EXISTS (SELECT 1 FROM json_each(d.tags) WHERE json_each.value = :t{i})")
    for i, f in enumerate(q.meta):
        if not _FIELD.fullmatch(f.field):  # the service checks first; this keeps SQL safe regardless
            raise ValueError(f"bad metadata field {f.field!r}")
        values = list(f.value) if f.op == "in" else [f.value]
        if pg:
            ref = f"(d.meta -> '{f.field}')"
            names = []
            for j, v in enumerate(values):
                params[f"m{i}_{j}"] = json.dumps(v)
                names.append(f"CAST(:m{i}_{j} AS jsonb)")
        else:
            ref = f"json_extract(d.meta, '$.{f.field}')"
            names = []
            for j, v in enumerate(values):
                params[f"m{i}_{j}"] = v
                names.append(f":m{i}_{j}")
        if f.op == "in":
            where.append(f"{ref} IN ({', '.join(names)})")
            continue
        if f.op in ("lt", "lte", "gt", "gte"):
            want = _json_type(f.value)
            if pg:
                where.append(f"jsonb_typeof({ref}) = '{want}'")
            else:
                types = "'text'" if want == "string" else "'integer', 'real'"
                where.append(f"json_type(d.meta, '$.{f.field}') IN ({types})")
        where.append(f"{ref} {_OPS[f.op]} {names[0]}")
    return where


def search_keys(conn: Connection, dialect: str, q: SearchQuery) -> list[tuple[str, str, float]]:
    """(namespace, key, score) of live docs matching ``q``: ranked by full text when it has terms
    (higher is better), else newest first; ``q.limit`` None returns every match, unordered."""
    params: dict[str, Any] = {}
    where = _filters(q, dialect, params)
    if q.terms and dialect == "postgresql":
        params["q"] = " ".join(q.terms)
        src = "search_docs d, plainto_tsquery('english', :q) tq"
        where.append("d.body_tsv @@ tq")  # stored (migration 0003): no candidate's body is parsed again
        score = "ts_rank_cd(d.body_tsv, tq)"
        order = "s DESC, d.namespace, d.key"
    elif q.terms:
        params["q"] = " ".join(f'"{t}"' for t in q.terms)  # \w+ terms: no quote can occur inside
        src = "search_fts JOIN search_docs d ON d.rowid = search_fts.rowid"
        where.append("search_fts MATCH :q")
        score = "-bm25(search_fts)"
        order = "s DESC, d.namespace, d.key"
    else:
        src = "search_docs d"
        score = "0.0"
        order = "d.updated_at DESC, d.namespace, d.key"
    sql = f"SELECT d.namespace, d.key, {score} AS s FROM {src} WHERE {' AND '.join(where)}"
    if q.limit is not None:
        params["lim"] = q.limit
        sql += f" ORDER BY {order} LIMIT :lim"
    return [(r[0], r[1], float(r[2])) for r in _one_statement(conn).execute(sa.text(sql), params)]


def namespace_rows(conn: Connection, namespace: str, prefix: bool) -> list[tuple[str, int, int | None]]:
    """(namespace, generation, embedding dimension) of the namespaces in scope."""
    params: dict[str, Any] = {}
    scope = _scope("namespace", namespace, prefix, params)
    sql = f"SELECT namespace, generation, dim FROM search_namespaces WHERE {scope}"
    return [
        (r[0], int(r[1]), None if r[2] is None else int(r[2]))
        for r in _one_statement(conn).execute(sa.text(sql), params)
    ]


def vectors_since(conn: Connection, namespace: str, after_chg: int, dim: int | None) -> list[VectorChunk]:
    """The namespace's docs changed after ``after_chg`` (on a first load, only those with an embedding),
    decoded for dimension ``dim`` as the rows stream in (mfh_core.vectors.decode_rows); the payload
    (which holds the embedding) is read only for a live doc with one. Doc and item are read in one
    statement: written in one transaction, they agree."""
    sql = (
        "SELECT d.key, d.chg, d.deleted, d.expires_at, d.dim, "
        "CASE WHEN d.dim IS NOT NULL AND NOT d.deleted THEN i.payload END "
        "FROM search_docs d JOIN items i ON i.namespace = d.namespace AND i.key = d.key "
        "WHERE d.namespace = :ns AND d.chg > :after AND (d.dim IS NOT NULL OR :after > 0)"
    )
    # Streamed (a server-side cursor on Postgres): a first load never holds every payload's text at once
    rows = conn.execution_options(yield_per=DECODE_CHUNK).execute(sa.text(sql), {"ns": namespace, "after": after_chg})
    return decode_rows(rows, dim)


def live_namespaces(conn: Connection, prefix: str, now_ms: int) -> list[str]:
    """Names (ascending) that hold at least one live, unexpired record, at or below ``prefix``."""
    params: dict[str, Any] = {"now": now_ms}
    scope = _scope("n.namespace", prefix, True, params) if prefix else "1 = 1"
    sql = (
        f"SELECT n.namespace FROM search_namespaces n WHERE {scope} AND EXISTS "
        f"(SELECT 1 FROM search_docs d WHERE d.namespace = n.namespace AND {_LIVE}) ORDER BY n.namespace"
    )
    return [r[0] for r in conn.execute(sa.text(sql), params)]


def expired(conn: Connection, now_ms: int, limit: int) -> list[tuple[str, str, int]]:
    """(namespace, key, version) of live docs whose expiry has passed, soonest expired first."""
    sql = (
        "SELECT namespace, key, version FROM search_docs "
        "WHERE expires_at <= :now AND NOT deleted ORDER BY expires_at LIMIT :lim"
    )
    return [(r[0], r[1], int(r[2])) for r in conn.execute(sa.text(sql), {"now": now_ms, "lim": limit})]
