"""The cluster bed's fixture and the figures each scenario reports (printed at the end of the run)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import netem_available, why_unsupported  # noqa: E402
from services import unavailable  # noqa: E402

FIGURES: list[str] = []


def record(scenario: str, **figures: Any) -> None:
    """One name=value line per scenario, for the closing note."""
    parts = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()]
    FIGURES.append(f"scenario={scenario} " + " ".join(parts))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    reason = why_unsupported()
    if reason is not None:
        unavailable(f"cluster bed: {reason}")
    from bed import Cluster

    with Cluster(tmp_path_factory.mktemp("cluster")) as c:
        FIGURES.append(f"bed netem_qdisc={'yes' if netem_available() else 'no(userspace relay)'} run={c.run_id}")
        yield c


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("cluster figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
