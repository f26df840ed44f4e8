"""The figures each cluster scenario reports, printed by conftest.py at the end of the run."""

from __future__ import annotations

from typing import Any

FIGURES: list[str] = []


def record(scenario: str, **figures: Any) -> None:
    """One line of name=value figures per scenario, for the closing note."""
    parts = [f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()]
    FIGURES.append(f"scenario={scenario} " + " ".join(parts))
