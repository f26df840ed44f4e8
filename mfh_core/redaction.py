"""No log line carries a payload, an API key or a password, in any process (docs/architecture.md invariant 9).

Every entry point (api, worker, replicator, scheduler, the ``mfh`` command) calls
:func:`install_redaction` once its logging is configured, and again with the settings once they are
read. The filter sits on the root handlers, so it sees every record, ours and the libraries':

- URL passwords become ``***`` (``postgresql://user:***@host``), and so does every secret of the
  settings (the API key, the passwords of the Redis, SQL and NATS URLs), wherever it appears;
- arguments that print a whole message body are shortened: a Dramatiq message prints as
  ``actor[message id]``, not with its batch of events;
- asyncio's "Task exception was never retrieved" keeps its first line: the task's repr holds the
  exception's repr, which can hold a whole reply, payload included;
- tracebacks keep their frames and exception types; a foreign exception's message is cut where
  libraries quote data (SQLAlchemy's ``[SQL: ...] [parameters: ...]``, pydantic's ``input_value=``)
  and shortened.

Uncaught exceptions (``sys.excepthook``, ``threading.excepthook``) are printed the same way.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit

from mfh_models import MFHError, Settings

__all__ = [
    "RedactingFilter",
    "format_exception_safely",
    "install_loop_exception_handler",
    "install_redaction",
    "redact_error_text",
    "redact_text",
    "secrets_of",
]

log = logging.getLogger("mfh.redaction")

MASK: Final = "***"
_MESSAGE_LIMIT: Final = 300  # characters of a foreign exception's message that may reach a log
_URL_PASSWORD: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)[^\s@]+@")
_SQL_AND_PARAMETERS: Final = re.compile(r"\[SQL: .*?(?=\(Background on this error|\Z)", re.DOTALL)
_PYDANTIC_INPUT: Final = re.compile(r"input_value=.*?(?=, input_type=|\]$)", re.MULTILINE)
_MIN_SECRET: Final = 4  # shorter strings are too common to mask without mangling every line

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with URL passwords and each of ``secrets`` replaced by ``***``."""
    text = _URL_PASSWORD.sub(rf"\1{MASK}@", text)
    for s in secrets:
        if s in text:
            text = text.replace(s, MASK)
    return text


def redact_error_text(text: str, secrets: Iterable[str] = ()) -> str:
    """An error message kept as text (a dead letter's last traceback line): also without SQL
    statements and their parameters or pydantic's input values, which can quote a payload."""
    text = _PYDANTIC_INPUT.sub("input_value=(hidden)", _SQL_AND_PARAMETERS.sub("[SQL and parameters hidden] ", text))
    return redact_text(text, secrets)


def _exception_message(exc: BaseException, secrets: Iterable[str]) -> str:
    try:
        text = exc.message if isinstance(exc, MFHError) else str(exc)
    except Exception:
        return "(message unavailable)"
    text = _PYDANTIC_INPUT.sub("input_value=(hidden)", _SQL_AND_PARAMETERS.sub("[SQL and parameters hidden] ", text))
    text = redact_text(text, secrets)
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "... (shortened)"


def format_exception_safely(exc_info: _ExcInfo, secrets: Iterable[str] = ()) -> str:
    """A traceback with its frames and exception types, and messages that cannot quote a payload."""
    secrets = list(secrets)
    chain: list[tuple[BaseException, str | None]] = []
    exc: BaseException | None = exc_info[1]
    seen: set[int] = set()
    link: str | None = None
    while exc is not None and id(exc) not in seen and len(chain) < 5:
        seen.add(id(exc))
        chain.append((exc, link))
        if exc.__cause__ is not None:
            exc, link = exc.__cause__, "The above exception was the direct cause of the following exception:"
        elif exc.__context__ is not None and not exc.__suppress_context__:
            exc, link = exc.__context__, "During handling of the above exception, another exception occurred:"
        else:
            exc = None
    parts: list[str] = []
    for exc, link in reversed(chain):
        frames = traceback.format_list(traceback.extract_tb(exc.__traceback__)) if exc.__traceback__ else []
        block = "Traceback (most recent call last):\n" + "".join(frames) if frames else ""
        block += f"{type(exc).__module__}.{type(exc).__qualname__}: {_exception_message(exc, secrets)}"
        parts.append(block)
        if link:
            parts.append(f"\n{link}\n")
    return "\n".join(parts)


def _short_arg(arg: Any, secrets: Iterable[str]) -> Any:
    if isinstance(arg, BaseException):
        return f"{type(arg).__name__}: {_exception_message(arg, secrets)}"
    actor, message_id = getattr(arg, "actor_name", None), getattr(arg, "message_id", None)
    if isinstance(actor, str) and isinstance(message_id, str):  # a Dramatiq message: its args are the batch
        return f"{actor}[{message_id}]"
    if isinstance(arg, asyncio.Future):
        return f"<{type(arg).__name__} {arg.get_name() if isinstance(arg, asyncio.Task) else ''}>"
    return arg


class RedactingFilter(logging.Filter):
    """Rewrites each record in place (message, arguments, traceback) so no secret or payload is written."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: list[str] = []

    def add_secrets(self, secrets: Iterable[str]) -> None:
        for s in secrets:
            if s and len(s) >= _MIN_SECRET and s not in self.secrets:
                self.secrets.append(s)
        self.secrets.sort(key=len, reverse=True)  # a longer secret first, in case one contains another

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if record.args:
                args = record.args
                if isinstance(args, tuple):
                    record.args = tuple(_short_arg(a, self.secrets) for a in args)
                elif isinstance(args, dict):
                    record.args = {k: _short_arg(v, self.secrets) for k, v in args.items()}
            message = record.getMessage()
        except Exception:
            message = f"{record.msg!s} (arguments not shown)"
        if record.name == "asyncio" and "\n" in message:
            message = message.split("\n", 1)[0]  # the rest is reprs of tasks and futures, replies included
        record.msg, record.args = redact_text(message, self.secrets), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = format_exception_safely(record.exc_info, self.secrets)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info, self.secrets)
        return True


_FILTER: Final = RedactingFilter()


def secrets_of(settings: Settings) -> list[str]:
    """The API key, the NATS password or token, and every password in the settings' URLs."""
    out: list[str] = []
    if settings.server.api_key is not None:
        out.append(settings.server.api_key.get_secret_value())
    for nats_secret in (settings.replication.nats_password, settings.replication.nats_token):
        if nats_secret is not None:
            out.append(nats_secret.get_secret_value())
    urls = [settings.storage.redis_url, settings.storage.postgres_url, settings.replication.nats_url]
    urls.append(getattr(settings.storage, "database_url", None))
    for url in urls:
        if not isinstance(url, str):
            continue
        try:
            password = urlsplit(url).password
        except ValueError:
            continue
        if password:
            out.append(password)
    try:  # nats://token@host: a lone user name in the NATS URL is a token
        nats_url = urlsplit(settings.replication.nats_url)
        if nats_url.username and nats_url.password is None:
            out.append(nats_url.username)
    except ValueError:
        pass
    return out


def _excepthook(etype: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    print(format_exception_safely((etype, value, tb), _FILTER.secrets), file=sys.stderr)


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None or args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    print(f"Exception in thread {name}:", file=sys.stderr)
    _excepthook(args.exc_type, args.exc_value, args.exc_traceback)


def install_redaction(settings: Settings | None = None) -> RedactingFilter:
    """Put the one filter on every root handler (call again after replacing handlers), learn ``settings``' secrets."""
    if settings is not None:
        _FILTER.add_secrets(secrets_of(settings))
    for handler in logging.getLogger().handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    return _FILTER


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    task = context.get("task") or context.get("future")
    name = task.get_name() if isinstance(task, asyncio.Task) else type(task).__name__ if task is not None else "-"
    message = str(context.get("message") or "unhandled error in the event loop").split("\n", 1)[0]
    if isinstance(exc, BaseException):
        log.error("%s (task %s): %s", message, name, type(exc).__name__, exc_info=(type(exc), exc, exc.__traceback__))
    else:
        log.error("%s (task %s)", message, name)


def install_loop_exception_handler(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Log what the loop could not deliver by task name and exception type, never by repr (a reply's, say)."""
    (loop or asyncio.get_running_loop()).set_exception_handler(_loop_exception)
