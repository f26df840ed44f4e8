"""The start-up guard against an open, keyless bind, and the reading of key and certificate files.

The API keys themselves (the single ``server.api_key`` and the scoped keys file) are :mod:`mfh_api.keys`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from mfh_client.types import API_KEY_METADATA
from mfh_models import ConfigError, Settings

__all__ = ["API_KEY_METADATA", "check_bind_is_safe", "is_loopback", "read_file"]


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
    if not (s.api_key and s.api_key.get_secret_value()) and not s.api_keys_file:
        missing.append("no API key (MFH_API_KEY, server.api_key; or MFH_API_KEYS_FILE, server.api_keys_file)")
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
