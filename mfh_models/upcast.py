"""Upcasting stored payloads to the current ``schema_version`` on read.

Stored rows and events are never rewritten (the log is the truth, docs/architecture.md invariant 6): a payload
keeps the ``schema_version`` it was written with. When a release raises ``SCHEMA_VERSION``, it adds
one upcaster per (kind, old version), a pure function from the old payload object to the next
version's, and the read path runs the chain (v1 -> v2 -> ... -> current) before validating it. The
checksum is over what is stored, so upcasting never changes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from mfh_models.canonical import canonical_json
from mfh_models.errors import InvalidArgument
from mfh_models.records import SCHEMA_VERSION, Kind

__all__ = ["Upcaster", "Upcasters"]

#: One step: the payload object at version n -> the payload object at version n + 1.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class Upcasters:
    """The chain of steps that brings a payload of any known version to ``target``."""

    def __init__(self, *, target: int = SCHEMA_VERSION) -> None:
        self.target = target
        self._steps: dict[tuple[Kind, int], Upcaster] = {}

    def register(self, kind: Kind, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: ``fn`` turns a ``kind`` payload of ``from_version`` into one of ``from_version + 1``."""

        def add(fn: Upcaster) -> Upcaster:
            if not 1 <= from_version < self.target:
                raise ValueError(f"an upcaster starts below the target version {self.target}, not at {from_version}")
            self._steps[(kind, from_version)] = fn
            return fn

        return add

    def upcast(self, kind: Kind, payload: dict[str, Any], schema_version: int) -> dict[str, Any]:
        """The payload at ``target``, with its ``schema_version`` field set; unchanged when already there."""
        if schema_version > self.target:
            raise InvalidArgument(f"schema_version {schema_version} is newer than this release's {self.target}")
        out = payload
        for v in range(schema_version, self.target):
            step = self._steps.get((kind, v))
            if step is None:
                raise InvalidArgument(f"no upcaster for {kind.value} from schema_version {v} to {v + 1}")
            out = dict(step(dict(out)), schema_version=v + 1)
        return out

    def upcast_text(self, kind: Kind, payload: str, schema_version: int) -> tuple[str, int]:
        """The same for canonical JSON text (what the stores hold): (payload text, its version)."""
        if schema_version == self.target:
            return payload, schema_version
        return canonical_json(self.upcast(kind, json.loads(payload), schema_version)), self.target
