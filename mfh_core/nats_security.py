"""How the hub reaches NATS: TLS verified against a CA (fail closed) and credentials, from ``replication:``.

nats-py upgrades a connection to TLS only when the server's INFO asks for it, even for a ``tls://``
URL: a plain-text server (or something posing as one) would be sent our credentials and events. So,
when TLS is required, the credentials are handed over through callbacks that refuse (before the
CONNECT line is written) unless the link is TLS; with no credentials, an empty token serves as that
check. A server whose certificate does not chain to the CA, or does not name the host dialled, fails
the handshake: nothing is sent to it.

Passwords in the URL (``nats://user:password@host``) are taken out of it: the URL nats-py and every
log line see carries no password (:attr:`NatsSecurity.display_url`).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import SplitResult, urlsplit, urlunsplit

import nats.errors
from nats.aio.client import Client as NATS

from mfh_models import ConfigError
from mfh_models.settings import ReplicationSettings

__all__ = ["NatsSecurity", "PlaintextRefused", "describe_connect_error", "is_fatal_connect_error"]

_AUTH_VIOLATION: Final = "Authorization Violation"


class PlaintextRefused(nats.errors.Error):
    """The server did not switch to TLS although our settings require it: nothing was sent."""

    def __str__(self) -> str:
        return "the NATS server did not offer TLS, which the settings require: nothing sent (a plain-text server?)"


def _without_userinfo(url: SplitResult) -> SplitResult:
    host = url.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{url.port}" if url.port is not None else host
    return url._replace(netloc=netloc)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_check(path: str, setting: str) -> None:
    try:
        with open(path, "rb") as f:
            if not f.read().strip():
                raise ConfigError(f"replication.{setting}: {path!r} is empty")
    except OSError as e:
        raise ConfigError(f"replication.{setting}: cannot read {path!r}: {e.strerror or e}") from None


def _tls_link(nc: NATS) -> bool:
    """Whether ``nc``'s current link is TLS. Reads nats-py internals; if they move, the answer is no."""
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    get_extra_info = getattr(writer, "get_extra_info", None)
    return callable(get_extra_info) and get_extra_info("ssl_object") is not None


class _EofWarningFilter(logging.Filter):
    """asyncio warns "returning true from eof_received() has no effect when using ssl" each time a TLS
    peer closes a stream (nats-py's protocol returns True): noise, not a fault."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("returning true from eof_received()")


_EOF_FILTER: Final = _EofWarningFilter()


@dataclass(frozen=True)
class NatsSecurity:
    """TLS and credentials for one NATS URL; :meth:`connect_options` gives nats-py's keyword arguments."""

    url: str  #: as configured (it may carry a password: never log it, log ``display_url``)
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, r: ReplicationSettings) -> NatsSecurity:
        return cls(
            url=r.nats_url,
            tls=r.nats_tls,
            ca_file=r.nats_tls_ca_file,
            cert_file=r.nats_tls_cert_file,
            key_file=r.nats_tls_key_file,
            server_name=r.nats_tls_server_name,
            user=r.nats_user,
            password=r.nats_password.get_secret_value() if r.nats_password is not None else None,
            token=r.nats_token.get_secret_value() if r.nats_token is not None else None,
        )

    @classmethod
    def from_url(cls, url: str) -> NatsSecurity:
        """A URL alone: TLS (against the system's CAs) for ``tls://``, credentials from its user info."""
        return cls(url=url, tls=urlsplit(url).scheme == "tls")

    # -- the URL --------------------------------------------------------------------------------

    def _split(self) -> SplitResult | None:
        try:
            u = urlsplit(self.url)
            _ = u.port, u.password  # both raise on a malformed URL
        except ValueError:
            return None
        return u

    @property
    def server_url(self) -> str:
        """The URL nats-py dials: without user info."""
        u = self._split()
        return urlunsplit(_without_userinfo(u)) if u is not None and u.hostname else self.url

    @property
    def display_url(self) -> str:
        """The URL for logs and messages: a user name stays, a password or token becomes ``***``."""
        u = self._split()
        if u is None or not u.hostname:
            return "(unparsable NATS URL)"
        bare = _without_userinfo(u)
        if u.username is None:
            return urlunsplit(bare)
        who = f"{u.username}:***" if u.password is not None else "***"  # a lone user name is a token
        return urlunsplit(bare._replace(netloc=f"{who}@{bare.netloc}"))

    @property
    def host(self) -> str:
        u = self._split()
        return (u.hostname or "") if u is not None else ""

    def _credentials(self) -> tuple[str | None, str | None, str | None]:
        """(user, password, token), from the settings or else from the URL."""
        if self.user is not None or self.token is not None:
            return self.user, self.password, self.token
        u = self._split()
        if u is None or u.username is None:
            return None, None, None
        if u.password is None:
            return None, None, u.username  # nats://token@host
        return u.username, u.password, None

    @property
    def authenticated(self) -> bool:
        return any(c is not None for c in self._credentials())

    def warning(self) -> str | None:
        """Why this link is unsafe on a network (plain text to a non-loopback host), or None."""
        if self.tls or _is_loopback(self.host):
            return None
        who = "credentials and events" if self.authenticated else "events"
        return (
            f"NATS at {self.display_url} is reached in plain text: {who} cross the network readable; "
            "set replication.nats_tls_ca_file (MFH_NATS_TLS_CA) or a tls:// URL (docs/security.md, NATS)"
        )

    # -- what nats-py gets ----------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the server's chain against ``ca_file`` (else the system's CAs) and its name; ConfigError
        naming the setting when a file cannot be read."""
        for path, setting in (
            (self.ca_file, "nats_tls_ca_file"),
            (self.cert_file, "nats_tls_cert_file"),
            (self.key_file, "nats_tls_key_file"),
        ):
            if path is not None:
                _read_check(path, setting)
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        except ssl.SSLError as e:
            raise ConfigError(f"replication.nats_tls_ca_file: {self.ca_file!r} holds no usable CA: {e}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None and self.key_file is not None:
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file)
            except ssl.SSLError as e:
                raise ConfigError(
                    f"replication.nats_tls_cert_file/nats_tls_key_file: not a certificate and its key: {e}"
                ) from None
        return ctx

    def connect_options(
        self, client: Callable[[], NATS | None], *, context: ssl.SSLContext | None = None
    ) -> dict[str, Any]:
        """``servers``, ``tls``, ``tls_hostname``, ``user``/``password``/``token`` for ``nats.connect``.

        ``client`` returns the client being connected: with TLS required, the credentials are only
        given out once its link is TLS. ``context``: one :meth:`ssl_context` built before, else a new one.
        """
        user, password, token = self._credentials()
        options: dict[str, Any] = {"servers": [self.server_url]}
        if not self.tls:
            options.update(user=user, password=password, token=token)
            return options
        logging.getLogger("asyncio").addFilter(_EOF_FILTER)
        options["tls"] = context if context is not None else self.ssl_context()
        if self.server_name:
            options["tls_hostname"] = self.server_name

        def guarded(value: str) -> Callable[[], str]:
            def give() -> str:
                nc = client()
                if nc is None or not _tls_link(nc):
                    raise PlaintextRefused()
                return value

            return give

        if user is not None and password is not None:
            options.update(user=guarded(user), password=guarded(password))
        else:
            # nats-py asks for a token just before it writes CONNECT: an empty one is ignored by a
            # server without authorization, and the asking is our check that the link is TLS.
            options["token"] = guarded(token or "")
        return options


def is_fatal_connect_error(e: BaseException) -> bool:
    """An error that retrying the same settings will not cure: a certificate, a TLS alert (a client
    certificate the server wants), plain text, credentials. A cut link (an EOF) is not one."""
    if isinstance(e, ssl.SSLError):
        return not isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError))
    return isinstance(e, (PlaintextRefused, nats.errors.AuthorizationError)) or (
        isinstance(e, nats.errors.Error) and _AUTH_VIOLATION in str(e)
    )


def describe_connect_error(e: BaseException, security: NatsSecurity) -> str:
    """One line on why a connect failed, naming the setting to look at."""
    if isinstance(e, ssl.SSLCertVerificationError):
        why = getattr(e, "verify_message", None) or str(e)
        where = f"replication.nats_tls_ca_file ({security.ca_file})" if security.ca_file else "the system's CAs"
        return f"TLS: the server's certificate failed verification against {where}: {why}; nothing was sent"
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake failed: {getattr(e, 'reason', None) or e}"
    if isinstance(e, PlaintextRefused):
        return str(e)
    if is_fatal_connect_error(e):
        given = "the credentials given" if security.authenticated else "no credentials (none are set)"
        return (
            f"the NATS server refused {given} (Authorization Violation): "
            "check replication.nats_user/nats_password or nats_token (MFH_NATS_USER, MFH_NATS_PASSWORD, MFH_NATS_TOKEN)"
        )
    detail = str(e).strip()
    if detail:
        return f"{type(e).__name__}: {detail}"
    if isinstance(e, TimeoutError):  # nats-py's connect timeout carries no message
        return "TimeoutError: no answer within the connect timeout (is a nats-server listening there?)"
    return type(e).__name__
