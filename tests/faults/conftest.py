"""Fixtures of the fault suite, and the figures of every scenario in pytest's terminal summary.

- ``redis_server``: a private AOF redis-server for this test (SIGKILL and restart it at will).
- ``pg_via_proxy``: a fresh Postgres database behind a TCP proxy (``tests/proxy.py``) that cuts it off.
- ``hosts``: makes :class:`~faults.harness.FaultHost` s and stops every process they started.
- ``figures``: the scenario's :class:`~faults.checks.Figures`; its ``name=value`` line is printed
  (``pytest -s``), written to ``<tmp>/figures.txt`` and repeated in the terminal summary, so CI
  output carries it whether the scenario passed or failed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from proxy import TcpProxy
from sqlalchemy.engine import make_url

from faults.checks import Figures
from faults.harness import FaultHost, RedisServer, make_fault_host, stop_hosts
from mfh_core import SqlStore

_LINES: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_OUTCOME] = report.outcome


_OUTCOME = pytest.StashKey[str]()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _LINES:
        terminalreporter.section("fault suite figures")
        for line in _LINES:
            terminalreporter.write_line(line)


@pytest.fixture
def figures(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Figures]:
    fig = Figures(request.node.name.removeprefix("test_"))
    yield fig
    outcome = request.node.stash.get(_OUTCOME, "error")
    line = f"{fig.line()} result={outcome}"
    _LINES.append(line)
    (tmp_path / "figures.txt").write_text(line + "\n")
    print(f"\n{line}")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def hosts(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[..., FaultHost]]:
    """Hosts (keyword arguments of :func:`make_fault_host`); their processes stop before Redis does."""
    made: list[FaultHost] = []

    def make(**kwargs: Any) -> FaultHost:
        host = make_fault_host(tmp_path, **kwargs)
        made.append(host)
        return host

    yield make
    stop_hosts(made)


@pytest.fixture
def pg_via_proxy(postgres_url: str) -> Iterator[tuple[str, str, TcpProxy]]:
    """A fresh Postgres database with the schema, and a URL to it through a proxy a test can cut.

    Yields (direct URL, for the checks; proxied URL, for the host; the proxy).
    """
    url = make_url(postgres_url)
    store = SqlStore(postgres_url)
    store.create_schema()
    store.close()
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    via_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    try:
        yield postgres_url, via_proxy, proxy
    finally:
        proxy.cut()
