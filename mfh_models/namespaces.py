"""Hierarchical namespaces: MFH names are paths of segments joined by ``.`` (``users.alice.memories``).

LangGraph-style namespaces are tuples of strings; :func:`encode_namespace` maps one onto an MFH name
and :func:`decode_namespace` maps it back. Each segment keeps letters and digits as they are; every
other UTF-8 byte becomes ``_`` and two upper-case hex digits (``-`` is ``_2D``, ``.`` is ``_2E``,
``_`` is ``_5F``). An empty segment is ``_``. So a segment never holds ``.``, the mapping round-trips,
and tuple prefixes stay name prefixes: ``t1`` is a prefix of ``t2`` exactly when ``encode(t2)``
equals ``encode(t1)`` or starts with ``encode(t1) + "."`` (what :func:`is_under` tests).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from mfh_models.errors import InvalidArgument
from mfh_models.records import validate_namespace

__all__ = ["SEPARATOR", "decode_namespace", "encode_namespace", "is_under", "namespace_depth", "truncate_namespace"]

SEPARATOR: Final = "."
_PLAIN: Final = re.compile(r"[A-Za-z0-9]")
_ESCAPE: Final = re.compile(r"_([0-9A-F]{2})")


def _encode_segment(segment: str) -> str:
    if segment == "":
        return "_"
    out = []
    for ch in segment:
        if _PLAIN.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"_{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def _decode_segment(text: str) -> str:
    if text == "_":
        return ""
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "_":
            m = _ESCAPE.match(text, i)
            if m is None:
                raise InvalidArgument(f"namespace segment {text[:70]!r} is not an encoded segment")
            raw.append(int(m.group(1), 16))
            i = m.end()
        elif _PLAIN.fullmatch(text[i]):
            raw.extend(text[i].encode())
            i += 1
        else:
            raise InvalidArgument(f"namespace segment {text[:70]!r} is not an encoded segment")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(f"namespace segment {text[:70]!r} does not decode to UTF-8") from None


def encode_namespace(path: Sequence[str]) -> str:
    """The MFH name of a tuple namespace; InvalidArgument when it does not fit a name (64 characters,
    starting with a letter or digit)."""
    if isinstance(path, str) or not path or not all(isinstance(s, str) for s in path):
        raise InvalidArgument("a namespace path is a non-empty sequence of strings")
    name = SEPARATOR.join(_encode_segment(s) for s in path)
    return validate_namespace(name)


def decode_namespace(name: str) -> tuple[str, ...]:
    """The tuple namespace an MFH name stands for (the inverse of :func:`encode_namespace`)."""
    validate_namespace(name)
    return tuple(_decode_segment(s) for s in name.split(SEPARATOR))


def is_under(name: str, prefix: str) -> bool:
    """``name`` is ``prefix`` or below it (segment-wise); every name is under the empty prefix."""
    return not prefix or name == prefix or name.startswith(prefix + SEPARATOR)


def namespace_depth(name: str) -> int:
    return name.count(SEPARATOR) + 1


def truncate_namespace(name: str, depth: int) -> str:
    """The first ``depth`` segments of ``name`` (all of it when ``depth`` is 0)."""
    return SEPARATOR.join(name.split(SEPARATOR)[:depth]) if depth > 0 else name
