"""Canonical JSON and the one checksum (docs/architecture.md invariant 7).

Canonical JSON is sorted keys, no spaces, UTF-8, no NaN/Infinity. The checksum is sha256 over
the lines ``namespace, key, version, origin, deleted, sha256(canonical payload)``, sorted by
(namespace, key) as UTF-8 bytes, so it does not depend on a database's collation. Audits,
snapshots, replay and cross-host comparison all call :func:`items_checksum`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, NamedTuple

from mfh_models.errors import InvalidArgument

__all__ = ["ChecksumRow", "canonical_json", "items_checksum", "payload_digest"]


def canonical_json(value: Any) -> str:
    """Serialise ``value`` as canonical JSON text; raises InvalidArgument for NaN or non-JSON values."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"payload is not canonical JSON: {e}") from e
    except RecursionError:  # a value built in-process, nested past the interpreter's limit
        raise InvalidArgument("payload is not canonical JSON: nested too deeply") from None


def payload_digest(canonical_payload: str) -> str:
    """Hex sha256 of a canonical JSON text."""
    return hashlib.sha256(canonical_payload.encode("utf-8")).hexdigest()


class ChecksumRow(NamedTuple):
    namespace: str
    key: str
    version: int
    origin: str
    deleted: bool
    payload: str  # canonical JSON text, exactly as stored


def checksum_line(r: ChecksumRow) -> str:
    """The line one item row adds to :func:`items_checksum` (namespaces and keys hold no tabs)."""
    return f"{r.namespace}\t{r.key}\t{r.version}\t{r.origin}\t{int(r.deleted)}\t{payload_digest(r.payload)}\n"


def checksum_order(line: str) -> tuple[bytes, bytes]:
    """The sort key of a :func:`checksum_line`: (namespace, key) in byte order."""
    namespace, key, _ = line.split("\t", 2)
    return namespace.encode(), key.encode()


def lines_checksum(lines: Iterable[str]) -> str:
    """sha256 over checksum lines already in :func:`checksum_order`."""
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8"))
    return h.hexdigest()


def items_checksum(rows: Iterable[ChecksumRow]) -> str:
    """sha256 over the sorted checksum lines of ``rows``; the same for every store and host."""
    lines = sorted(((r.namespace.encode(), r.key.encode()), checksum_line(r)) for r in rows)
    return lines_checksum(line for _, line in lines)
