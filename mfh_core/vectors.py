"""Exact cosine top-k over client-supplied embeddings, from an in-process copy of them.

The embeddings are read from the items' payloads (``search_docs`` says which rows changed and their
dimension) and parsed here, once per change, rather than on the write path (mfh_core.searchindex).
Each namespace's vectors are held as one normalised float32 matrix. Before a query the copy asks
SQL for the namespace's generation (one primary-key read) and, when it moved, fetches only the rows
changed since: every batch that touches a namespace bumps its generation under the row's lock in
the same transaction, so generations commit in order and nothing is skipped. The answer is exact
(every candidate is scored); an expired or deleted row is masked out at query time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any, Final

import numpy as np

from mfh_core.searchindex import embedding_of

__all__ = ["VectorCache"]

_NEVER: Final = np.iinfo(np.int64).max


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

    def _grow(self, need: int) -> None:
        cap = max(need, 2 * len(self.alive), 1024)
        mat = np.zeros((cap, self.dim), dtype=np.float32)
        mat[: self.n] = self.mat[: self.n]
        alive = np.zeros(cap, dtype=bool)
        alive[: self.n] = self.alive[: self.n]
        expires = np.zeros(cap, dtype=np.int64)
        expires[: self.n] = self.expires[: self.n]
        self.mat, self.alive, self.expires = mat, alive, expires

    def update(self, rows: Iterable[tuple[str, int, bool, int | None, int | None, str | None]]) -> None:
        rows = list(rows)
        if self.n + len(rows) > len(self.alive):
            self._grow(self.n + len(rows))
        for key, chg, deleted, expires_at, dim, payload in rows:
            self.generation = max(self.generation, chg)
            i = self.pos.get(key)
            vec = embedding_of(payload) if payload is not None and not deleted and dim == self.dim else None
            if vec is None or len(vec) != self.dim:
                if i is not None:
                    self.alive[i] = False
                continue
            if i is None:
                i = self.n
                self.n += 1
                self.pos[key] = i
                self.keys.append(key)
            v = vec.astype(np.float64)
            norm = float(np.linalg.norm(v))
            self.mat[i] = v / norm if norm > 0 and np.isfinite(norm) else 0.0
            self.alive[i] = norm > 0 and np.isfinite(norm)
            self.expires[i] = _NEVER if expires_at is None else expires_at

    def top_k(self, q: np.ndarray[Any, Any], k: int, now_ms: int, allowed: set[str] | None) -> list[tuple[str, float]]:
        if allowed is None:  # views, not copies: the matrix product is the one pass over memory
            scores = self.mat[: self.n] @ q
            ok = self.alive[: self.n] & (self.expires[: self.n] > now_ms)
            idx = None
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
                    space.update(sql.vectors_since(name, space.generation))
                keys = None if allowed is None else allowed[name]
                out.extend((name, key, s) for key, s in space.top_k(q, k, now_ms, keys))
        out.sort(key=lambda t: (-t[2], t[0], t[1]))
        return out[:k]
