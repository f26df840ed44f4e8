"""The keys file (``server.api_keys_file``, ``MFH_API_KEYS_FILE``): YAML or JSON, read at start and on reload.

    keys:
      - name: agent-7                  # 1-64 of letters, digits, '_', '.', '-': shown in logs, never the key
        key: "sha256:9f86d08…"         # the SHA-256 of the key (64 hex digits), or the key itself
        namespaces: ["agent-7.*", "shared"]   # globs: '*' any run of characters, '?' one
        mode: read                     # or read-write

Anything else is refused with a :class:`ConfigError` naming the file and the entry, never the key.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from mfh_models import ConfigError
from mfh_models.records import MAX_NAMESPACE_LENGTH, format_validation_error

__all__ = ["MAX_FILE_BYTES", "MAX_KEYS", "KeyEntry", "load_keys_file", "parse_keys"]

MAX_FILE_BYTES: Final = 256 * 1024  # 1000 keys of 20 patterns fit
MAX_KEYS: Final = 1000
MAX_PATTERNS: Final = 100
MIN_KEY_CHARS: Final = 16
MAX_DEPTH: Final = 16
_LOADER: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_HASHED: Final = re.compile(r"sha256:([0-9a-f]{64})")
_PLAIN_KEY: Final = re.compile(r"[A-Za-z0-9_.~+=:;@!#$%*?^|()\[\]{},-]+")
#: Namespace characters, plus the two wildcards; a pattern is never longer than a name can be, plus slack.
_PATTERN: Final = re.compile(r"[A-Za-z0-9_.*?-]+")


@dataclass(frozen=True, slots=True)
class KeyEntry:
    """One key as the ring keeps it: its SHA-256 digest, never the key (``plain`` only to know if JSON escapes it)."""

    name: str
    digest: bytes
    patterns: tuple[str, ...]
    writable: bool
    plain: str | None = None


Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


class _Key(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: Name
    key: str = Field(repr=False)
    namespaces: list[str] = Field(min_length=1, max_length=MAX_PATTERNS)
    mode: Literal["read", "read-write"]

    @field_validator("key")
    @classmethod
    def _key(cls, key: str) -> str:
        # The messages never hold the key: this file's errors go to a log line and to stderr.
        if key.startswith("sha256:"):
            if not _HASHED.fullmatch(key):
                raise ValueError("a hashed key is 'sha256:' and 64 lower-case hex digits")
        elif len(key) < MIN_KEY_CHARS or len(key) > 512:
            raise ValueError(f"a key is {MIN_KEY_CHARS} to 512 characters (or 'sha256:' and its hash)")
        elif not _PLAIN_KEY.fullmatch(key):
            raise ValueError("a key holds only letters, digits and -_.~+=:;@!#$%*?^|()[]{}, (no quote, no space)")
        return key

    @field_validator("namespaces")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for i, p in enumerate(patterns):
            if not p:
                raise ValueError(f"pattern {i} is empty (use '*' for every namespace)")
            if len(p) > MAX_NAMESPACE_LENGTH * 2:
                raise ValueError(f"pattern {i} is longer than {MAX_NAMESPACE_LENGTH * 2} characters")
            if not _PATTERN.fullmatch(p):
                raise ValueError(
                    f"pattern {p[:70]!r} may hold only namespace characters (letters, digits, '_', '.', '-'; "
                    "segments are joined by '.') and the wildcards '*' and '?'"
                )
        return patterns


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    keys: list[_Key] = Field(min_length=1, max_length=MAX_KEYS)


def parse_keys(text: str, where: str) -> list[KeyEntry]:
    """The entries of a keys file's ``text``; ConfigError starting with ``where`` on anything wrong."""
    if _flow_depth(text) > MAX_DEPTH:  # the YAML parser takes seconds to refuse thousands of brackets
        raise ConfigError(f"{where}: nested too deeply")
    try:
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML or JSON{at}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    if not isinstance(data, dict) or set(data) != {"keys"}:
        raise ConfigError(f"{where}: expected one mapping with the list 'keys' (docs/security.md)")
    if not isinstance(data["keys"], list) or len(data["keys"]) > MAX_KEYS:
        raise ConfigError(f"{where}: 'keys' must be a list of at most {MAX_KEYS} entries")
    try:
        parsed = _File.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: {format_validation_error(e)}") from None
    names: set[str] = set()
    out = []
    for k in parsed.keys:
        if k.name in names:
            raise ConfigError(f"{where}: the name {k.name!r} is given twice: each key has its own")
        names.add(k.name)
        m = _HASHED.fullmatch(k.key)
        digest = bytes.fromhex(m.group(1)) if m else _sha256(k.key)
        out.append(KeyEntry(k.name, digest, tuple(k.namespaces), k.mode == "read-write", None if m else k.key))
    return out


def load_keys_file(path: str) -> list[KeyEntry]:
    """Read and parse the keys file; ConfigError naming it (and what is wrong) when it cannot be used."""
    where = f"server.api_keys_file {path!r}"
    try:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{where}: cannot read it: {e.strerror or e}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    return parse_keys(text, where)


def _flow_depth(text: str) -> int:
    """The deepest nesting of ``[`` and ``{`` outside quotes (a file of ours needs 3)."""
    depth = deepest = 0
    quote = ""
    for ch in text:
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                break
        elif ch in "]}":
            depth -= 1
    return deepest


def _sha256(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()
