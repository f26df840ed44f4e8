"""Exact cosine top-k over client-supplied embeddings, from an in-process copy of them.

The embeddings are read from the items' payloads (``search_docs`` says which rows changed and their
dimension) and decoded here, once per change, rather than on the write path (mfh_core.searchindex).
A load decodes in bulk as the rows stream from SQL (:func:`decode_rows`: orjson, then one float32
matrix per chunk of rows, normalised in one vectorised step), about six times faster than parsing
each payload with the standard library, and without holding every payload's text at once.

Each namespace's vectors are held as one contiguous, normalised float32 matrix. Before a query the
copy asks SQL for the namespace's generation (one primary-key read) and, when it moved, fetches only
the rows changed since: every batch that touches a namespace bumps its generation under the row's
lock in the same transaction, so generations commit in order and nothing is skipped. The answer is
exact (every candidate is scored: one matrix-vector product over the namespace, then argpartition);
an expired or deleted row is masked out at query time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson

from mfh_core.searchindex import embedding_of

__all__ = ["DECODE_CHUNK", "VectorCache", "VectorChunk", "decode_rows"]

_NEVER: Final = np.iinfo(np.int64).max
#: Rows decoded into one float32 block (384 dims: 6 MB), so a load never holds every payload at once.
DECODE_CHUNK: Final = 4096
_F32_MAX: Final = float(np.finfo(np.float32).max)

_F32 = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True, slots=True)
class VectorChunk:
    """Changed docs of one namespace: ``keys[i]`` has normalised vector ``mat[i]`` when ``ok[i]``
    (else it has none: deleted, no embedding, another dimension, or a zero or non-finite vector)."""

    keys: list[str]
    chg: int
    ok: np.ndarray[Any, np.dtype[np.bool_]]
    expires: np.ndarray[Any, np.dtype[np.int64]]
    mat: _F32


def _vector(payload: str, dim: int) -> list[float] | _F32 | None:
    """The payload's top-level embedding when it has ``dim`` numbers (orjson; the standard parse of
    :func:`embedding_of` for what orjson refuses, e.g. integers past 64 bits)."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        vec = embedding_of(payload)
        return vec if vec is not None and len(vec) == dim else None
    emb = obj.get("embedding") if isinstance(obj, dict) else None
    if not isinstance(emb, list) or len(emb) != dim:
        return None
    return emb


def _normalised(raw: _F32) -> tuple[_F32, np.ndarray[Any, np.dtype[np.bool_]]]:
    """(rows scaled to unit length, which rows are usable: finite and not zero); norms in float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", raw, raw, dtype=np.float64))
        ok = np.isfinite(norms) & (norms > 0)
        norms[~ok] = 1.0
        mat = (raw / norms[:, None]).astype(np.float32)
    mat[~ok] = 0.0
    return mat, ok


def decode_rows(rows: Iterable[Any], dim: int | None) -> list[VectorChunk]:
    """Chunks of ``(key, chg, deleted, expires_at, dim, payload)`` rows (payload None without a vector),
    decoded for a namespace of dimension ``dim``."""
    out: list[VectorChunk] = []
    width = dim or 0
    keys: list[str] = []
    expires: list[int] = []
    ok = np.zeros(DECODE_CHUNK, dtype=bool)
    raw = np.zeros((DECODE_CHUNK, width), dtype=np.float32)
    chg = 0

    def flush() -> None:
        nonlocal ok, raw, chg
        if not keys:
            return
        n = len(keys)
        mat, good = _normalised(raw[:n])
        out.append(VectorChunk(list(keys), chg, ok[:n] & good, np.asarray(expires, dtype=np.int64), mat))
        keys.clear()
        expires.clear()
        ok = np.zeros(DECODE_CHUNK, dtype=bool)
        raw = np.zeros((DECODE_CHUNK, width), dtype=np.float32)
        chg = 0

    # a value past float32's range becomes inf: that row is then not usable (no warning)
    with np.errstate(over="ignore", invalid="ignore"):
        for key, row_chg, deleted, expires_at, row_dim, payload in rows:
            chg = max(chg, int(row_chg))
            j = len(keys)
            if dim and payload is not None and not deleted and row_dim == dim:
                vec = _vector(payload, dim)
                if vec is not None:
                    # straight into the block: no list outlives its row (millions of them would make the
                    # cyclic collector rescan every live one, a tenth of a load's time)
                    try:
                        raw[j] = vec
                        ok[j] = True
                    except (TypeError, ValueError, OverflowError):
                        raw[j] = 0.0
            keys.append(key)
            expires.append(_NEVER if expires_at is None else int(expires_at))
            if len(keys) >= DECODE_CHUNK:
                flush()
    flush()
    return out


class _Namespace:
    """One namespace's vectors: rows ``[0, n)`` of ``mat`` (normalised), with liveness and expiry."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.generation = 0
        self.n = 0
        self.keys: list[str] = []
        self.pos: dict[str, int] = {}
        self.mat = np.zeros((0, dim), dtype=np.float32)
        self.alive = np.zeros(0, dtype=bool)
        self.expires = np.zeros(0, dtype=np.int64)
        #: Rows with an expiry (most have none: the query then skips comparing expiries).
        self.expiring = 0

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * len(self.alive), 1024)
        mat = np.zeros((cap, self.dim), dtype=np.float32)
        mat[: self.n] = self.mat[: self.n]
        alive = np.zeros(cap, dtype=bool)
        alive[: self.n] = self.alive[: self.n]
        expires = np.full(cap, _NEVER, dtype=np.int64)
        expires[: self.n] = self.expires[: self.n]
        self.mat, self.alive, self.expires = mat, alive, expires

    def update(self, chunks: Sequence[VectorChunk]) -> None:
        for c in chunks:
            self.generation = max(self.generation, c.chg)
            fresh = [k for k, ok in zip(c.keys, c.ok.tolist(), strict=True) if ok and k not in self.pos]
            if self.n + len(fresh) > len(self.alive):
                self._grow(self.n + len(fresh))
            for k in fresh:
                self.pos[k] = self.n
                self.keys.append(k)
                self.n += 1
            pos = self.pos
            have = [j for j, k in enumerate(c.keys) if k in pos]
            if not have:
                continue
            at = np.fromiter((pos[c.keys[j]] for j in have), dtype=np.int64, count=len(have))
            sel = np.asarray(have, dtype=np.int64)
            ok = c.ok[sel]
            self.alive[at] = ok
            self.mat[at[ok]] = c.mat[sel[ok]]
            self.expires[at] = np.where(ok, c.expires[sel], _NEVER)
        self.expiring = int(np.count_nonzero(self.expires[: self.n] != _NEVER))

    def top_k(self, q: _F32, k: int, now_ms: int, allowed: set[str] | None) -> list[tuple[str, float]]:
        idx = None
        if allowed is None or 8 * len(allowed) >= self.n:
            # views, not copies: the matrix product is the one pass over memory
            scores = self.mat[: self.n] @ q
            ok = self.alive[: self.n].copy()
            if allowed is not None:
                keep = np.zeros(self.n, dtype=bool)
                keep[np.fromiter((self.pos[key] for key in allowed if key in self.pos), dtype=np.int64)] = True
                ok &= keep
            if self.expiring:
                ok &= self.expires[: self.n] > now_ms
        else:
            idx = np.fromiter((self.pos[key] for key in allowed if key in self.pos), dtype=np.int64)
            scores = self.mat[idx] @ q
            ok = self.alive[idx] & (self.expires[idx] > now_ms)
        live = int(np.count_nonzero(ok))
        if live == 0:
            return []
        scores[~ok] = -np.inf
        k = min(k, live)
        best = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        best = best[np.argsort(-scores[best], kind="stable")]
        rows = best if idx is None else idx[best]
        return [
            (self.keys[int(r)], float(scores[j])) for r, j in zip(rows, best, strict=True) if np.isfinite(scores[j])
        ]


class VectorCache:
    """The per-process copy of every searched namespace's embeddings (thread-safe)."""

    def __init__(self) -> None:
        self._spaces: dict[str, _Namespace] = {}
        self._lock = threading.Lock()

    def top_k(
        self,
        sql: Any,
        namespaces: list[tuple[str, int, int | None]],
        query: Sequence[float],
        k: int,
        now_ms: int,
        allowed: dict[str, set[str]] | None = None,
    ) -> list[tuple[str, str, float]]:
        """(namespace, key, cosine) of the ``k`` best live rows over ``namespaces`` (name, generation, dim)
        whose dimension is the query's; ``allowed`` limits each namespace to the keys the filters kept."""
        q64 = np.asarray(query, dtype=np.float64)
        q = (q64 / float(np.linalg.norm(q64))).astype(np.float32)
        out: list[tuple[str, str, float]] = []
        with self._lock:
            for name, generation, dim in namespaces:
                if dim != len(q) or (allowed is not None and not allowed.get(name)):
                    continue
                space = self._spaces.get(name)
                if space is None or space.dim != dim:
                    space = self._spaces[name] = _Namespace(dim)
                if space.generation < generation:
                    space.update(sql.vectors_since(name, space.generation, dim))
                keys = None if allowed is None else allowed[name]
                out.extend((name, key, s) for key, s in space.top_k(q, k, now_ms, keys))
        out.sort(key=lambda t: (-t[2], t[0], t[1]))
        return out[:k]
