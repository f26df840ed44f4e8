"""API key checks shared by both transports, and the start-up guard against an open, keyless bind.

Keys are compared with :func:`hmac.compare_digest` so a wrong key takes as long as a right one.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from pathlib import Path
from typing import Final

from mfh_client.types import API_KEY_METADATA
from mfh_models import ConfigError, Settings, Unauthenticated

__all__ = ["API_KEY_METADATA", "ApiKeyCheck", "check_bind_is_safe", "is_loopback", "read_file"]

#: Keys made only of these are written verbatim by every JSON encoder (no escapes), so a body that
#: carries such a key holds it byte for byte: :meth:`ApiKeyCheck.scan_json` can look for it unparsed.
_VERBATIM_KEY: Final = re.compile(rb"[A-Za-z0-9_.~+=:;@!#$%*?^|()\[\]{},-]+")
_KEY_FIELD: Final = b'"api_key"'
_KEY_VALUE: Final = re.compile(rb'\s*:\s*"([^"\\]*)"')
_KEY_COLON: Final = re.compile(rb"\s*:")


class ApiKeyCheck:
    """``check(presented)`` raises Unauthenticated unless the key matches (no key configured: all pass)."""

    def __init__(self, expected: str | None) -> None:
        self._expected = expected.encode("utf-8") if expected else None

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeyCheck:
        key = settings.server.api_key
        return cls(key.get_secret_value() if key is not None else None)

    @property
    def required(self) -> bool:
        return self._expected is not None

    def ok(self, presented: str | bytes | None) -> bool:
        if self._expected is None:
            return True
        if presented is None:
            return False
        raw = presented.encode("utf-8") if isinstance(presented, str) else presented
        return hmac.compare_digest(raw, self._expected)

    def scan_json(self, body: bytes) -> str | None:
        """Before any parsing: None if the JSON ``body`` may carry the key (check it again once parsed),
        else why it cannot ("missing api_key" / "wrong api_key"). Linear in the body, no allocation
        beyond the candidates; each candidate is compared in constant time, as :meth:`ok` does."""
        if self._expected is None or not self._scannable:
            return None
        found = False
        start = body.find(_KEY_FIELD)
        while start >= 0:
            m = _KEY_VALUE.match(body, start + len(_KEY_FIELD))
            if m is not None:
                if m.group(1):
                    found = True
                if hmac.compare_digest(m.group(1), self._expected):
                    return None
            elif _KEY_COLON.match(body, start + len(_KEY_FIELD)):
                found = True  # a key that is not a string: wrong, not missing
            start = body.find(_KEY_FIELD, start + 1)
        return "wrong api_key" if found else "missing api_key"

    @property
    def _scannable(self) -> bool:
        return self._expected is not None and _VERBATIM_KEY.fullmatch(self._expected) is not None

    def check(self, presented: str | bytes | None) -> None:
        if self.ok(presented):
            return
        if presented is None or presented in ("", b""):
            raise Unauthenticated(f"missing API key (send it as {API_KEY_METADATA!r})")
        raise Unauthenticated("wrong API key")


def is_loopback(bind: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; 0.0.0.0, '::' and names are not loopback."""
    host = bind.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_is_safe(settings: Settings, *, insecure: bool) -> None:
    """Refuse to serve a non-loopback address without an API key, TLS on gRPC and CURVE on ZeroMQ,
    unless the operator said --insecure (docs/security.md)."""
    s = settings.server
    if insecure or is_loopback(s.bind):
        return
    missing = []
    if not ApiKeyCheck.from_settings(settings).required:
        missing.append("no API key (MFH_API_KEY, server.api_key)")
    if not s.tls:
        missing.append("no TLS for gRPC (MFH_TLS_CERT and MFH_TLS_KEY, server.tls_cert_file/tls_key_file)")
    if not s.curve:
        missing.append("no CURVE for ZeroMQ (MFH_CURVE_SECRET, server.zmq_curve_secret_file)")
    if missing:
        raise ConfigError(
            f"server.bind is {s.bind!r} (reachable from other machines) with {'; '.join(missing)}: set them "
            "(docs/security.md; scripts/make_certs.sh makes test ones), bind to 127.0.0.1, "
            "or pass --insecure to accept the risk"
        )


def read_file(path: str, setting: str) -> bytes:
    """A key or certificate file the settings name; ConfigError (exit 2) naming it when it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"server.{setting}: cannot read {path!r}: {e.strerror or e}") from None
    if not data.strip():
        raise ConfigError(f"server.{setting}: {path!r} is empty")
    return data
