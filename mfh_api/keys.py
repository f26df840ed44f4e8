"""Scoped API keys: who may read and write which namespaces, shared by both doors, reloadable without a restart.

A :class:`KeyRing` maps the SHA-256 of each key to its :class:`Grant` (name, namespace patterns, mode). It
holds no key: the single ``server.api_key`` and plain keys of the keys file are hashed when loaded, and the
file may hold ``sha256:<hex>`` instead of the key. A presented key is hashed and looked up by its digest:
what the lookup's time depends on is SHA-256(presented), which tells a caller nothing about a stored key
(the constant-time property :func:`hmac.compare_digest` gave the single key, for any number of keys).
:meth:`KeyRing.reload` swaps the whole table at once (SIGHUP, or a change of the file's mtime); a file
that does not load is refused and the old table stays.
The file's format is :mod:`mfh_api.keys_file`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

from mfh_api.keys_file import KeyEntry, load_keys_file
from mfh_client.types import API_KEY_METADATA
from mfh_core.metrics import AUTH_FAILURES
from mfh_models import ConfigError, PermissionDenied, Settings, Unauthenticated
from mfh_models.records import validate_namespace

__all__ = ["OPEN", "Door", "Grant", "KeyRing", "count_refusal"]

log = logging.getLogger("mfh.api.keys")

Door = Literal["grpc", "zmq", "v0"]
Subtree = Literal["all", "some", "none"]

#: Keys made only of these are written verbatim by every JSON encoder (no escapes), so a body that
#: carries such a key holds it byte for byte: :meth:`KeyRing.scan_json` can look for it unparsed.
_VERBATIM_KEY: Final = re.compile(r"[A-Za-z0-9_.~+=:;@!#$%*?^|()\[\]{},-]+")
_KEY_FIELD: Final = b'"api_key"'
_KEY_VALUE: Final = re.compile(rb'\s*:\s*"([^"\\]*)"')
_KEY_COLON: Final = re.compile(rb"\s*:")
_WILDCARDS: Final = re.compile(r"[*?]")


def _glob(pattern: str) -> str:
    """A namespace pattern as a regex: ``*`` is any run of characters (dots too), ``?`` one character."""
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)


@dataclass(frozen=True, slots=True)
class Grant:
    """What one key may do: read (and, if ``writable``, write) the namespaces its ``patterns`` match."""

    name: str
    patterns: tuple[str, ...]
    writable: bool
    _match: re.Pattern[str] = field(init=False, repr=False, compare=False)
    everything: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_match", re.compile("|".join(f"(?:{_glob(p)})" for p in self.patterns) or "(?!)"))
        object.__setattr__(self, "everything", "*" in self.patterns)

    def can_read(self, namespace: str) -> bool:
        return self.everything or self._match.fullmatch(namespace) is not None

    def require(self, namespace: str, *, write: bool = False) -> None:
        """PermissionDenied unless this key may read (``write``: and write) ``namespace`` (InvalidArgument for a
        malformed name, as the service would answer)."""
        if self.everything and self.writable:
            return
        validate_namespace(namespace)  # a malformed name is INVALID_ARGUMENT for every key
        if write:
            self.require_writer()
        if not self.can_read(namespace):
            what = "write" if write else "read"
            raise PermissionDenied(f"key {self.name!r} may not {what} namespace {namespace[:70]!r}")

    def require_writer(self) -> None:
        """PermissionDenied for a read-only key, whatever the call would write (an empty batch too)."""
        if not self.writable:
            raise PermissionDenied(f"key {self.name!r} is read-only: it may not write", reason="read_only")

    def subtree(self, prefix: str) -> Subtree:
        """How much of ``prefix`` and the names below it (``prefix.…``) this key may read: ``all`` (nothing to
        filter), ``some`` (filter each name with :meth:`can_read`) or ``none`` (PERMISSION_DENIED). ``all`` and
        ``none`` are sure; ``some`` may turn out to be none after filtering."""
        if self.everything:
            return "all"
        if not prefix:  # every name: some of them are the key's
            return "some"
        below = prefix + "."
        possible = False
        for p in self.patterns:
            m = _WILDCARDS.search(p)
            head = p if m is None else p[: m.start()]
            if m is not None and p == head + "*" and prefix.startswith(head):
                return "all"  # "a.*" or "a*" with a prefix under "a": every name there starts with the head
            if m is None:
                possible = possible or p == prefix or p.startswith(below)
            else:
                possible = possible or head.startswith(prefix) or prefix.startswith(head)
        return "some" if possible else "none"

    def require_subtree(self, prefix: str) -> Callable[[str], bool] | None:
        """For a call over ``prefix`` and the names below it: None (all visible), else the filter to apply;
        PermissionDenied when none of them can be visible."""
        if self.everything:
            return None
        if prefix:
            validate_namespace(prefix)
        reach = self.subtree(prefix)
        if reach == "none":
            raise PermissionDenied(f"key {self.name!r} may not read namespace {prefix[:70]!r} or any below it")
        return None if reach == "all" else self.can_read


#: The grant of every request when no key is configured (a loopback hub, as before keys).
OPEN: Final = Grant("open", ("*",), True)


def count_refusal(door: Door, reason: str) -> None:
    """One more ``mfh_api_auth_failures_total{door, reason}``."""
    AUTH_FAILURES.labels(door, reason).inc()


def _digest(raw: str | bytes) -> bytes:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw).digest()


class KeyRing:
    """The keys both doors accept (``server.api_key`` and the keys file), by SHA-256; no key configured: open."""

    def __init__(self, *, api_key: str | None = None, keys_file: str | None = None) -> None:
        self.keys_file = keys_file
        self._single: KeyEntry | None = None
        if api_key:
            self._single = KeyEntry("api_key", _digest(api_key), ("*",), True, plain=api_key)
        self._signature: tuple[int, int, int] | None = None
        self._table: dict[bytes, Grant] = {}
        self._scannable = True
        self._reloading = asyncio.Lock()
        self._tasks: set[asyncio.Task[bool]] = set()
        self._install(self._load())

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The keys of the ``server`` settings; ConfigError (exit 2) naming the keys file when it does not load."""
        s = settings.server
        return cls(api_key=s.api_key.get_secret_value() if s.api_key else None, keys_file=s.api_keys_file)

    @property
    def required(self) -> bool:
        return bool(self._table)

    @property
    def names(self) -> list[str]:
        return sorted(g.name for g in self._table.values())

    def _load(self) -> tuple[list[KeyEntry], tuple[int, int, int] | None]:
        """The entries to install, and the file's signature as it was read; ConfigError if it does not load."""
        entries = [self._single] if self._single is not None else []
        signature = None
        if self.keys_file is not None:
            signature = _signature(self.keys_file)
            entries.extend(load_keys_file(self.keys_file))
            seen: dict[bytes, str] = {}
            for e in entries:
                if e.digest in seen:
                    raise ConfigError(
                        f"server.api_keys_file {self.keys_file!r}: keys {seen[e.digest]!r} and {e.name!r} are the "
                        "same key: give each its own"
                    )
                seen[e.digest] = e.name
        return entries, signature

    def _install(self, loaded: tuple[list[KeyEntry], tuple[int, int, int] | None]) -> None:
        entries, self._signature = loaded
        self._table = {e.digest: Grant(e.name, e.patterns, e.writable) for e in entries}
        # A plain key that JSON would escape cannot be found unparsed: then every body is parsed (as before).
        # Hashed keys are taken as issued (docs/security.md: letters, digits, '-', '_').
        self._scannable = all(e.plain is None or _VERBATIM_KEY.fullmatch(e.plain) for e in entries)

    def reload(self) -> bool:
        """Read the keys file again and swap the table at once; a file that does not load is refused with a
        log line naming the problem, and the keys in force stay. True if the new keys are in force."""
        if self.keys_file is None:
            log.warning("SIGHUP: no keys file to reload (server.api_keys_file, MFH_API_KEYS_FILE)")
            return False
        try:
            loaded = self._load()
        except ConfigError as e:
            return self._refuse(e)
        return self._accept(loaded)

    async def reload_async(self) -> bool:
        """:meth:`reload`, reading and parsing in a thread: a huge or hostile file does not hold the event loop
        (both doors) while it is refused. Reloads take turns."""
        async with self._reloading:
            if self.keys_file is None:
                return self.reload()
            try:
                loaded = await asyncio.to_thread(self._load)
            except ConfigError as e:
                return self._refuse(e)
            return self._accept(loaded)

    def _refuse(self, e: ConfigError) -> bool:
        if self.keys_file is not None:
            self._signature = _signature(self.keys_file)  # refused once, not again at every look
        log.error("keys file refused; the keys in force stay: %s", e.message)
        return False

    def _accept(self, loaded: tuple[list[KeyEntry], tuple[int, int, int] | None]) -> bool:
        self._install(loaded)
        log.info("keys reloaded from %s: %d keys (%s)", self.keys_file, len(self._table), ", ".join(self.names))
        return True

    def reload_soon(self) -> None:
        """The SIGHUP handler: a reload on the running loop (kept until it ends)."""
        task = asyncio.get_running_loop().create_task(self.reload_async(), name="mfh-keys-reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def changed(self) -> bool:
        """Whether the keys file's mtime, size or inode differ from when it was last read."""
        return self.keys_file is not None and _signature(self.keys_file) != self._signature

    async def watch_file(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Reload whenever the keys file changes (a stat a second), until ``stop`` is set."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                if self.changed():
                    await self.reload_async()

    def grant(self, presented: str | bytes | None) -> Grant | None:
        """The grant of ``presented`` (OPEN when no key is configured), None for a missing or unknown key."""
        table = self._table  # one read: a reload swaps the whole dict
        if not table:
            return OPEN
        if not presented:
            return None
        return table.get(_digest(presented))

    def authenticate(self, presented: str | bytes | None, door: Door) -> Grant:
        """The grant of ``presented``; Unauthenticated (counted) when it is missing or unknown."""
        g = self.grant(presented)
        if g is not None:
            return g
        missing = not presented
        count_refusal(door, "missing" if missing else "wrong")
        if door == "grpc":
            raise Unauthenticated(
                f"missing API key (send metadata {API_KEY_METADATA!r})" if missing else "wrong API key"
            )
        raise Unauthenticated("missing api_key" if missing else "wrong api_key")

    def scan_json(self, body: bytes) -> str | None:
        """Before any parsing: None if the JSON ``body`` may carry a valid key (check it again once parsed),
        else why it cannot ("missing api_key" / "wrong api_key"). Linear in the body; each candidate is
        hashed and looked up, as :meth:`grant` does."""
        if not self._table or not self._scannable:
            return None
        found = False
        start = body.find(_KEY_FIELD)
        while start >= 0:
            m = _KEY_VALUE.match(body, start + len(_KEY_FIELD))
            if m is not None:
                if m.group(1):
                    found = True
                    if self.grant(m.group(1)) is not None:
                        return None
            elif _KEY_COLON.match(body, start + len(_KEY_FIELD)):
                found = True  # a key that is not a string: wrong, not missing
            start = body.find(_KEY_FIELD, start + 1)
        return "wrong api_key" if found else "missing api_key"


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino
