"""Hybrid logical clock versions (docs/architecture.md invariant 1).

A version is ``unix_ms << 16 | counter``: 64 bits, ordered by wall time first. The clock itself
lives in Redis (one Lua script assigns versions atomically per host); this module only packs,
unpacks and orders them. Between hosts the larger ``(version, origin)`` wins.
"""

from __future__ import annotations

__all__ = ["COUNTER_BITS", "MAX_COUNTER", "newer", "pack", "unpack"]

COUNTER_BITS = 16
MAX_COUNTER = (1 << COUNTER_BITS) - 1


def pack(unix_ms: int, counter: int) -> int:
    """Combine wall-clock milliseconds and a logical counter into one version."""
    return (unix_ms << COUNTER_BITS) | counter


def unpack(version: int) -> tuple[int, int]:
    """Split a version into (unix_ms, counter)."""
    return version >> COUNTER_BITS, version & MAX_COUNTER


def newer(a_version: int, a_origin: str, b_version: int, b_origin: str) -> bool:
    """True when change a beats change b under last-writer-wins on (version, origin)."""
    return (a_version, a_origin) > (b_version, b_origin)
