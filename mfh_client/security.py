"""Transport security on the client side: TLS for gRPC, CURVE for ZeroMQ (docs/security.md).

    from mfh_client import MemoryClient, ZmqClient
    from mfh_client.security import CurveConfig, TlsConfig

    MemoryClient("hub1:5714", tls=TlsConfig(ca_file="/etc/mfh/ca.pem"))  # + cert_file/key_file for mTLS
    ZmqClient("tcp://hub1:5713", curve=CurveConfig.from_files("/etc/mfh/server.key"))

Both fail closed: a server whose certificate or CURVE key does not match is never sent a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import zmq
import zmq.asyncio
import zmq.auth

from mfh_models.errors import InvalidArgument

__all__ = ["CurveConfig", "TlsConfig"]


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read the {what} {path!r}: {e.strerror or e}") from None


@dataclass(frozen=True)
class TlsConfig:
    """TLS for gRPC: ``ca_file`` (PEM) the server's certificate must chain to (None: the system's roots);
    ``cert_file`` / ``key_file``: this client's certificate, for a hub that requires one;
    ``server_name``: the name to check the certificate against when it differs from the address."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise InvalidArgument("cert_file and key_file go together: set both or neither")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA file"),
            private_key=_read(self.key_file, "key file"),
            certificate_chain=_read(self.cert_file, "certificate file"),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


@dataclass(frozen=True)
class CurveConfig:
    """CURVE for ZeroMQ: the server's public key (Z85, 40 characters) and this client's key pair (a fresh
    one when not given: enough for a hub that accepts any client knowing its key)."""

    server_public_key: bytes
    public_key: bytes | None = None
    secret_key: bytes | None = None

    def __post_init__(self) -> None:
        if len(self.server_public_key) != 40:
            raise InvalidArgument("server_public_key must be a Z85 CURVE key of 40 characters")
        if (self.public_key is None) != (self.secret_key is None):
            raise InvalidArgument("public_key and secret_key go together: set both or neither")

    @classmethod
    def from_files(cls, server_key_file: str, client_secret_file: str | None = None) -> CurveConfig:
        """From zmq.auth certificate files: the server's public ``.key`` and this client's ``.key_secret``."""
        server, _ = _load(server_key_file)
        if client_secret_file is None:
            return cls(server)
        public, secret = _load(client_secret_file)
        if secret is None:
            raise InvalidArgument(f"{client_secret_file!r} holds no secret key (a .key_secret file is needed)")
        return cls(server, public, secret)

    def apply(self, sock: zmq.Socket[bytes] | zmq.asyncio.Socket) -> None:
        """Make ``sock`` a CURVE client (before it connects)."""
        public, secret = (self.public_key, self.secret_key)
        if public is None or secret is None:
            public, secret = zmq.curve_keypair()
        sock.curve_serverkey = self.server_public_key
        sock.curve_publickey = public
        sock.curve_secretkey = secret


def _load(path: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise InvalidArgument(f"cannot read the CURVE key file {path!r}: {e}") from None
    return public, secret
