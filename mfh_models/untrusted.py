"""The one decoder for JSON a peer sent: bounded, strict, and it fails only with InvalidArgument.

``json.loads`` alone is not safe on untrusted input: about 1,000 levels of nesting raise
``RecursionError`` (not a ``ValueError``), bytes are decoded with ``surrogatepass`` and an escaped
``"\\ud800"`` becomes a string that fails ``.encode("utf-8")`` far from the input, and ``NaN``
is accepted although canonical JSON refuses it. Every door (gRPC ``payload_json``, List page
tokens, ZeroMQ bodies, the v0 shim, the ``mfh`` command) decodes through :func:`decode_untrusted_json`,
so each of those cases is one clear INVALID_ARGUMENT (docs/architecture.md invariant 8).

The nesting depth is checked before parsing, without recursion: strings are cut out with one
linear regex pass, then the running bracket count is taken with C-level builtins.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any, Final, NoReturn

from mfh_models.errors import InvalidArgument

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "check_json_depth", "decode_untrusted_json", "refuse_lone_surrogates"]

#: Deepest nesting of arrays and objects accepted in a record payload (far below json's ~1,000).
MAX_JSON_DEPTH: Final = 64
#: Default size bound of one untrusted JSON text, in UTF-8 bytes (the transports cap messages too).
MAX_JSON_BYTES: Final = 4 * 1024 * 1024

# A string literal, or an unterminated one up to the end of the text. Possessive, and the closing
# quote optional, so every match succeeds from its opening quote: one linear pass, no backtracking.
_STRING: Final = re.compile(r'"(?:[^"\\]|\\.)*+"?', re.DOTALL)
_NOT_BRACKET: Final = re.compile(r"[^\[\]{}]+")
_STEP: Final = {"[": 1, "{": 1, "]": -1, "}": -1}
# \uD800-\uDFFF written as an escape; only then can json.loads produce a surrogate code point.
_ESCAPED_SURROGATE: Final = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def check_json_depth(text: str, max_depth: int = MAX_JSON_DEPTH, *, what: str = "JSON") -> None:
    """InvalidArgument if arrays and objects in ``text`` nest deeper than ``max_depth`` (strings do not count)."""
    if text.count("[") + text.count("{") <= max_depth:
        return  # cannot nest deeper than it has opening brackets: the common case costs two counts
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    deepest = max(accumulate(map(_STEP.__getitem__, brackets)), default=0)
    if deepest > max_depth:
        raise InvalidArgument(f"{what} nests deeper than {max_depth} levels")


def refuse_lone_surrogates(text: str, *, what: str = "JSON") -> None:
    """InvalidArgument if ``text`` holds a surrogate code point (it has no UTF-8 form)."""
    m = _SURROGATE.search(text)
    if m is not None:
        raise InvalidArgument(f"{what} holds a lone surrogate (U+{ord(m.group()):04X}) at character {m.start()}")


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def decode_untrusted_json(
    data: bytes | str,
    *,
    what: str = "JSON",
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Parse JSON a peer sent; InvalidArgument (naming ``what``) for anything but a bounded, valid document.

    Refused: more than ``max_bytes``, bytes that are not strict UTF-8 (raw surrogates ``\\xed\\xa0\\x80``
    included), nesting deeper than ``max_depth``, a lone surrogate escape such as ``"\\ud800"``,
    ``NaN``/``Infinity``, and anything ``json`` itself rejects.
    """
    if len(data) > max_bytes:
        unit = "characters" if isinstance(data, str) else "bytes"
        raise InvalidArgument(f"{what} is larger than {max_bytes} {unit}")
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")  # strict: encoded surrogates are refused here
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"{what} is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    elif isinstance(data, str):
        text = data
        refuse_lone_surrogates(text, what=what)  # e.g. an argument decoded with surrogateescape
    else:
        raise InvalidArgument(f"{what} must be text, not {type(data).__name__}")
    check_json_depth(text, max_depth, what=what)
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # RecursionError cannot happen past the depth check; kept as a floor
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None
    if _ESCAPED_SURROGATE.search(text) is not None:
        # Pairs were joined into one code point by json; any surrogate left is a lone one.
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidArgument(f"{what} holds a lone surrogate escape (U+{ord(e.object[e.start]):04X})") from None
    return value
