"""JetStream plumbing under the event bus: the wire format, error translation, the PubAck multiplexer.

The JetStream modules, each importing only those above it: this one, :mod:`mfh_core.nats_connection`
(the connection they all share), :mod:`mfh_core.pull_feed` (one pull consumer's messages),
:mod:`mfh_core.subscription` (durable consumers), :mod:`mfh_core.eventbus` (the bus's public surface).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from mfh_models import InvalidArgument, MemoryEvent, Unavailable
from mfh_models.records import format_validation_error

log = logging.getLogger("mfh.eventbus")

MSG_ID_HEADER: Final = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER: Final = "Nats-Expected-Stream"
#: Set on an event the cross-host audit re-publishes (its value: the audit's id); every host applies it,
#: its own origin's too, and may rewrite a row that holds the same (version, origin) with other content.
REPAIR_HEADER: Final = "Mfh-Repair"
#: Client-side buffer for commands written while reconnecting (PITFALLS: set one deliberately).
PENDING_BUFFER_BYTES: Final = 8 * 1024 * 1024
RECONNECT_WAIT_S: Final = 0.5
#: Seconds between client PINGs; two missed PONGs mark a silently dead server.
PING_INTERVAL_S: Final = 10
JS_API_TIMEOUT_S: Final = 5.0
#: A pull request lives this long on the server; heartbeats show it is still there.
PULL_EXPIRES_S: Final = 10.0
PULL_HEARTBEAT_S: Final = 1.0

FIRST: Final = asyncio.FIRST_COMPLETED

NATS_ERRORS: Final = (nats.errors.Error, OSError, asyncio.TimeoutError)


def encode_event(event: MemoryEvent) -> bytes:
    """The message body of one event."""
    return event.model_dump_json().encode()


def decode_event(data: bytes) -> MemoryEvent:
    """Parse a message body; InvalidArgument for anything that is not a valid MemoryEvent."""
    try:
        return MemoryEvent.model_validate_json(data)
    except ValidationError as e:
        raise InvalidArgument(f"not a MemoryEvent: {format_validation_error(e)}") from None
    except InvalidArgument as e:
        raise InvalidArgument(f"not a MemoryEvent: {e.message}") from None
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"not a MemoryEvent: {e}") from None


def translate_error(e: BaseException, what: str) -> Exception:
    """NATS errors as hub errors: a rejected request is the caller's fault, anything else is 'unavailable'."""
    if isinstance(e, nats.js.errors.BadRequestError):
        return InvalidArgument(f"{what}: {e.description or e}")
    if isinstance(e, ValueError):
        return InvalidArgument(f"{what}: {e}")
    return Unavailable(f"{what}: {type(e).__name__}: {e}")


def msg_status(msg: Msg) -> str | None:
    return msg.headers.get("Status") if msg.headers else None


def msg_description(msg: Msg) -> str:
    return (msg.headers or {}).get("Description", "")


def ack_error(msg: Msg) -> str | None:
    """None when ``msg`` is a PubAck (a duplicate one too), else why the publish failed."""
    status = msg_status(msg)
    if status:
        return f"status {status} {msg_description(msg)}".strip() if status != "503" else "no stream answered (503)"
    try:
        resp = json.loads(msg.data)
    except ValueError:
        return "unreadable PubAck"
    if not isinstance(resp, dict):
        return "unreadable PubAck"
    if "error" in resp:
        err = resp["error"]
        return str(err.get("description", err)) if isinstance(err, dict) else str(err)
    return None if "seq" in resp else "PubAck without a sequence"


class AckMux:
    """PubAcks to futures through one wildcard inbox: no task or timer per message, unlike ``js.publish``.

    Not nats-py's ``publish_async``: in 2.16 an error reply leaves its future pending forever."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._futures: dict[str, asyncio.Future[str | None]] = {}
        self._tokens = itertools.count(1)
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)

    async def send(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> tuple[str, asyncio.Future[str | None]]:
        token = str(next(self._tokens))
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._futures[token] = fut
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._futures.pop(token, None)
            raise
        return token, fut

    def forget(self, token: str) -> None:
        fut = self._futures.pop(token, None)
        if fut is not None and not fut.done():
            fut.cancel()

    async def _on_reply(self, msg: Msg) -> None:
        fut = self._futures.pop(msg.subject[len(self._prefix) :], None)
        if fut is not None and not fut.done():
            fut.set_result(ack_error(msg))


def all_done(futures: Sequence[asyncio.Future[Any]]) -> asyncio.Future[None]:
    """One future for many, without a task per future (``asyncio.gather`` wraps each one)."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    remaining = len(futures)

    def one(_: asyncio.Future[Any]) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining <= 0 and not done.done():
            done.set_result(None)

    for f in futures:
        f.add_done_callback(one)
    if not futures:
        done.set_result(None)
    return done


def msg_metadata(msg: Msg | None) -> Msg.Metadata | None:
    if msg is None:
        return None
    try:
        return msg.metadata
    except (nats.errors.Error, ValueError, IndexError):
        return None


def redelivery_delay(msg: Msg) -> float:
    try:
        attempts = msg.metadata.num_delivered
    except Exception:
        attempts = 1
    return float(min(30.0, 0.5 * 2 ** min(max(attempts - 1, 0), 6)))


async def quietly(aw: Awaitable[None], what: str) -> None:
    try:
        await aw
    except Exception as e:
        log.debug("%s failed: %s: %s", what, type(e).__name__, e)
