"""The cluster bed's fixture and the figures each scenario reports (printed at the end of the run)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from services import unavailable

from cluster.figures import FIGURES
from cluster.netns import netem_available, why_unsupported


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    reason = why_unsupported()
    if reason is not None:
        unavailable(f"cluster bed: {reason}")
    from cluster.bed import Cluster

    with Cluster(tmp_path_factory.mktemp("cluster")) as c:
        FIGURES.append(f"bed netem_qdisc={'yes' if netem_available() else 'no(userspace relay)'} run={c.run_id}")
        yield c


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("cluster figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
