"""Full garbage collections on the api's schedule, not on allocation (issue 7's fairness bench: a
full pass over 1,000 Watch streams' objects held the event loop 40-130 ms in every flooded window)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
from services import async_wait_until

from mfh_core.gc_policy import CollectorPolicy, rss_mb


class Node:
    """A container object that can sit in a reference cycle."""

    def __init__(self) -> None:
        self.other: Any = None


@pytest.fixture
def full_collections() -> Iterator[list[int]]:
    """Counts generation-2 collections while the test runs; CPython's thresholds again afterwards."""
    seen: list[int] = []
    saved = gc.get_threshold()

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)
        gc.set_threshold(*saved)
        gc.unfreeze()


def _promote_long_lived(n: int) -> list[Node]:
    """``n`` objects that survive young collections (what opening streams does), then churn."""
    kept = [Node() for _ in range(n)]
    for _ in range(200):  # short-lived garbage: young collections run, survivors are promoted
        _ = [Node() for _ in range(1000)]
    return kept


def test_growth_of_long_lived_objects_runs_no_full_collection_once_installed(full_collections: list[int]) -> None:
    policy = CollectorPolicy(full_interval_s=3600, rss_growth_mb=0)
    policy.install()
    full_collections.clear()  # install's own
    kept = _promote_long_lived(200_000)  # CPython's rule: a full pass once they exceed a quarter of the old
    assert len(kept) == 200_000
    assert full_collections == []
    assert policy.due() is None
    policy.uninstall()
    more = _promote_long_lived(200_000)  # the control: without the policy, the allocator runs one
    assert len(more) == 200_000
    assert full_collections != []


async def test_the_schedule_frees_old_garbage_in_cycles(full_collections: list[int]) -> None:
    policy = CollectorPolicy(full_interval_s=0.2, rss_growth_mb=0, check_s=0.02)
    policy.install()
    a, b = Node(), Node()
    a.other, b.other = b, a
    gc.collect(1)  # survivors of a middle collection are old: only a full collection looks at them again
    gone = weakref.ref(a)
    del a, b
    _promote_long_lived(1000)
    assert gone() is not None
    stop = asyncio.Event()
    task = asyncio.create_task(policy.run(stop))
    try:
        await async_wait_until(lambda: gone() is None, timeout=10, message="the scheduled full collection")
    finally:
        stop.set()
        await task
        policy.uninstall()
    assert policy.full_collections >= 1


def test_rss_growth_makes_a_full_collection_due_early(full_collections: list[int]) -> None:
    policy = CollectorPolicy(full_interval_s=3600, rss_growth_mb=8)
    policy.install()
    assert policy.due() is None
    ballast = bytearray(32 * 1024 * 1024)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: resident
    assert rss_mb() > 0
    assert policy.due() == "rss"
    policy.collect("rss")
    assert policy.due() is None  # measured again from here: no repeated collections while it stays
    del ballast
    policy.uninstall()
