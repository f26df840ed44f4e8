"""One NATS connection with its JetStream context and PubAck multiplexer, shared by the JetStream modules.

The event bus (:mod:`mfh_core.eventbus`), its pull feeds (:mod:`mfh_core.jetstream`) and its durable
consumers (:mod:`mfh_core.subscription`) each take this object instead of reaching into another's
attributes. It reconnects forever once connected (PITFALLS: nats-py settings) and counts reconnects, so
a pull feed knows to send its pull request again. TLS and credentials come from
:class:`~mfh_core.nats_security.NatsSecurity`; no log line or error shows a password.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, ConsumerInfo
from nats.js.client import JetStreamContext

from mfh_core.jetstream import (
    JS_API_TIMEOUT_S,
    NATS_ERRORS,
    PENDING_BUFFER_BYTES,
    PING_INTERVAL_S,
    RECONNECT_WAIT_S,
    AckMux,
    translate_error,
)
from mfh_core.nats_security import NatsSecurity, describe_connect_error, is_fatal_connect_error
from mfh_models import Unavailable

__all__ = ["NatsConnection"]

log = logging.getLogger("mfh.eventbus")


class NatsConnection:
    """The client, its JetStream context and its PubAck multiplexer; ``down`` resolves when the link drops."""

    def __init__(self, *, url: str, name: str = "mfh", security: NatsSecurity | None = None) -> None:
        self.security = security if security is not None else NatsSecurity.from_url(url)
        #: For logs and messages: without a password.
        self.url = self.security.display_url
        self.name = name
        # Built now, so that an unreadable certificate is a ConfigError at start, not a retry loop.
        self._tls_context = self.security.ssl_context() if self.security.tls else None
        self._opening: asyncio.Future[BaseException] | None = None  # set on a fatal error while opening
        self._last_error: BaseException | None = None  # the last error nats-py reported while opening
        self._warned_plaintext = False
        self.js_prefix = "$JS.API"
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._acks: AckMux | None = None
        self._reconnects = 0
        self._errors_logged = 0
        # Resolved when the connection drops: PubAcks of what was already sent cannot arrive any more.
        self._down: asyncio.Future[None] | None = None
        self._closing = False

    @property
    def is_open(self) -> bool:
        """Opened and not closed (it may be reconnecting)."""
        return self._nc is not None and not self._nc.is_closed

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def reconnects(self) -> int:
        """How many times the link came back: a pull request sent before then is forgotten by the server."""
        return self._reconnects

    @property
    def acks(self) -> AckMux | None:
        return self._acks

    @property
    def down(self) -> asyncio.Future[None] | None:
        return self._down

    async def open(self, *, wait_s: float = 5.0) -> None:
        """Connect (reconnecting forever afterwards); Unavailable if NATS is not there. No-op when open."""
        if self.is_open:
            return
        self._closing = False
        loop = asyncio.get_running_loop()
        self._down = loop.create_future()
        nc = NATS()
        warning = self.security.warning()
        if warning and not self._warned_plaintext:
            self._warned_plaintext = True
            log.warning("%s", warning)
        options: dict[str, Any] = {
            **self.security.connect_options(lambda: nc, context=self._tls_context),
            "name": self.name,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": RECONNECT_WAIT_S,
            "connect_timeout": 2,
            "ping_interval": PING_INTERVAL_S,
            "max_outstanding_pings": 2,
            "pending_size": PENDING_BUFFER_BYTES,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "closed_cb": self._on_closed,
        }
        # With max_reconnect_attempts=-1 nats-py retries the first connect forever: bound it here, and
        # stop at once on what retrying cannot cure (a certificate, plain text, refused credentials).
        self._opening = fatal = loop.create_future()
        self._last_error = None
        connecting = asyncio.ensure_future(nc.connect(**options))
        try:
            await asyncio.wait({connecting, fatal}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (a process stopping): leave no connect loop behind
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await nc.close()
            raise
        finally:
            self._opening = None
        failure: BaseException | None = None
        if connecting.done() and not connecting.cancelled():
            failure = connecting.exception()
        else:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, *NATS_ERRORS, ValueError):
                await connecting
            failure = fatal.result() if fatal.done() else self._last_error or TimeoutError("no answer")
        if failure is not None:
            with contextlib.suppress(Exception):
                await nc.close()
            if not isinstance(failure, (*NATS_ERRORS, ValueError)):
                raise failure
            why = describe_connect_error(failure, self.security)
            raise Unavailable(f"cannot connect to NATS at {self.url}: {why}") from None
        self._nc = nc
        self._js = nc.jetstream(timeout=JS_API_TIMEOUT_S)
        self._acks = AckMux(nc)
        try:
            await self._acks.start()
        except BaseException as e:
            await self.close()
            if isinstance(e, NATS_ERRORS):
                raise Unavailable(f"NATS at {self.url}: {type(e).__name__}: {e}") from e
            raise

    async def _on_error(self, e: Exception) -> None:
        opening = self._opening
        if opening is not None:  # open() reports it, in one line
            self._last_error = e
            if is_fatal_connect_error(e) and not opening.done():
                opening.set_result(e)
            return
        # nats-py reports every failed reconnect attempt: log the first loudly, the rest quietly.
        self._errors_logged += 1
        level = logging.WARNING if self._errors_logged <= 1 else logging.DEBUG
        log.log(level, "NATS error at %s: %s", self.url, describe_connect_error(e, self.security))

    async def _on_disconnected(self) -> None:
        if self._down is not None and not self._down.done():
            self._down.set_result(None)
        if not self._closing:
            log.warning("disconnected from NATS at %s; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        if self._down is None or self._down.done():
            self._down = asyncio.get_running_loop().create_future()
        self._reconnects += 1
        self._errors_logged = 0
        log.info("reconnected to NATS at %s", self.url)

    async def _on_closed(self) -> None:
        log.info("NATS connection closed")

    def mark_closing(self) -> None:
        """A disconnect from now on is ours: not worth a warning."""
        self._closing = True

    async def close(self) -> None:
        self._closing = True
        nc, self._nc, self._js, self._acks = self._nc, None, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()

    def client(self) -> NATS:
        if self._nc is None or self._nc.is_closed:
            raise Unavailable("the event bus is not connected")
        return self._nc

    def jetstream(self) -> JetStreamContext:
        if self._js is None:
            raise Unavailable("the event bus is not connected")
        return self._js

    # -- consumers (the JetStream API calls both the bus and its subscriptions make) -------------

    async def add_consumer(self, stream: str, config: ConsumerConfig) -> None:
        try:
            await self.jetstream().add_consumer(stream, config)
        except (*NATS_ERRORS, ValueError) as e:
            raise translate_error(e, f"consumer {config.name} on {stream}") from e

    async def consumer_info(self, stream: str, name: str) -> ConsumerInfo:
        try:
            info: ConsumerInfo = await self.jetstream().consumer_info(stream, name)
            return info
        except (*NATS_ERRORS, ValueError) as e:
            raise translate_error(e, f"consumer info {name}") from e

    async def delete_consumer(self, stream: str, name: str) -> None:
        """Delete quietly (best effort; an ephemeral consumer also expires on its own)."""
        js = self._js
        if js is None or self._nc is None or not self._nc.is_connected:
            return
        with contextlib.suppress(*NATS_ERRORS):
            await js.delete_consumer(stream, name)
