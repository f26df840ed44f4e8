"""Two hosts (each api + worker + replicator, its own Redis db and SQLite), one private NATS:
NATS down for 10 s between them, and a replicator SIGKILLed twice, both under writes on both hosts.

Each host must end with every write acknowledged on either host (at its version or newer), the same
checksum as the other host, and a replay equal to its live checksum.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from services import NatsServer, async_wait_until

from faults.checks import Figures, SqlChecker, finish
from faults.harness import FaultHost, RedisServer, stop_hosts
from faults.load import Ledger, LoadGenerator, Write, wait_for_acks
from mfh_core.eventbus import EventBus
from mfh_tasks.replicator import consumer_name

pytestmark = pytest.mark.slow

CONVERGE_BOUND_S = 30.0
LOG_LINES_BOUND = 100  # worker + replicator lines of both hosts over the outage


@dataclass
class Side:
    host: FaultHost
    ledger: Ledger
    gen: LoadGenerator
    checker: SqlChecker


@pytest.fixture
async def pair(
    hosts: Callable[..., FaultHost], redis_server: RedisServer, fresh_nats: NatsServer
) -> AsyncIterator[tuple[Side, Side]]:
    made = [
        hosts(name=name, redis_url=redis_server.url(db), nats_url=fresh_nats.url)
        for db, name in enumerate(("main_pc", "pc2"))
    ]
    bus = EventBus.from_settings(made[0].settings.replication, name="mfh-fault-test")
    await bus.connect()  # creates the stream
    await bus.close()
    for host in made:
        host.start(scheduler=False, replicator=True)
    nc = await nats.connect(fresh_nats.url)
    try:
        js = nc.jetstream()
        for host in made:
            await async_wait_until(
                lambda h=host: js.consumer_info(h.settings.replication.event_topic, consumer_name(h.name)),
                30,
                interval=0.05,
                message=f"consumer of {host.name}\n{host.logs()}",
            )
    finally:
        await nc.close()
    sides = []
    for i, host in enumerate(made):
        ledger = Ledger()
        gen = LoadGenerator(host.endpoints, ledger, prefix=host.name, rate_per_s=150, concurrency=8, seed=i)
        sides.append(Side(host, ledger, gen, SqlChecker(host.settings.storage.database_url)))
    try:
        yield sides[0], sides[1]
    finally:
        for s in sides:
            s.gen.stop.set()
            await s.gen.close()
            s.checker.close()
        await asyncio.to_thread(stop_hosts, made)  # while NATS still runs


def everything(a: Side, b: Side) -> list[Write]:
    return [*a.ledger.writes, *b.ledger.writes]


async def converge(a: Side, b: Side, since: float, limit_s: float) -> float | None:
    """Seconds from ``since`` until both hosts hold every acknowledged write and the same checksum."""
    writes = everything(a, b)
    while True:
        left = [await asyncio.to_thread(s.checker.missing, writes) for s in (a, b)]
        if not any(left):
            sums = [await asyncio.to_thread(s.checker.sql.checksum) for s in (a, b)]
            if sums[0] == sums[1]:
                return round(time.monotonic() - since, 2)
        if time.monotonic() - since > limit_s:
            return None
        await asyncio.sleep(0.2)


async def closing(a: Side, b: Side, figures: Figures, tmp_path: Path) -> None:
    """Per host: nothing lost, new writes succeed, replay equals live; then both hosts equal again."""
    for s, label in ((a, "_a"), (b, "_b")):
        await finish(figures, s.checker, everything(a, b), s.host.endpoints, tmp_path, label=label)
    after = await converge(a, b, time.monotonic(), 15.0)
    figures.set(equal_after_s=after)
    figures.expect(after is not None, "the hosts' checksums differ after the closing writes")


async def test_nats_down_for_10s_between_two_hosts(
    pair: tuple[Side, Side], fresh_nats: NatsServer, figures: Figures, tmp_path: Path
) -> None:
    a, b = pair
    # Given writes on both hosts, replicating
    loads = [s.gen.start() for s in pair]
    for s in pair:
        await wait_for_acks(s.ledger, 300, 60)
    # When NATS is down for 10 s
    lines_before = sum(s.host.log_lines("worker", "replicator") for s in pair)
    await asyncio.to_thread(fresh_nats.stop)
    await asyncio.sleep(10.0)  # the outage itself
    await asyncio.to_thread(fresh_nats.start)
    t_up = time.monotonic()
    log_lines = sum(s.host.log_lines("worker", "replicator") for s in pair) - lines_before
    await asyncio.sleep(2.0)
    for s in pair:
        s.gen.stop.set()
    await asyncio.gather(*loads)
    # Then both hosts hold every acknowledged write and agree, the logs stayed quiet, and the closing checks pass
    converged = await converge(a, b, t_up, CONVERGE_BOUND_S)
    for s, label in ((a, "_a"), (b, "_b")):
        figures.set(**{f"acked{label}": s.ledger.count("acked"), f"failed{label}": s.ledger.count("failed")})
        figures.set(**{f"unknown{label}": s.ledger.count("unknown")})
    figures.set(recovery_s=converged, log_lines=log_lines)
    figures.at_most("recovery_s", CONVERGE_BOUND_S)
    figures.at_most("log_lines", LOG_LINES_BOUND)
    figures.note(f"{a.host.log('worker', 800)}\n{a.host.log('replicator', 800)}")
    await closing(a, b, figures, tmp_path)
    figures.verify()


async def test_replicator_sigkilled_twice_under_writes(
    pair: tuple[Side, Side], figures: Figures, tmp_path: Path
) -> None:
    a, b = pair
    # Given writes on both hosts, replicating
    loads = [s.gen.start() for s in pair]
    # When main_pc's replicator is SIGKILLed twice (and started again each time)
    for at in (300, 1000):
        await wait_for_acks(b.ledger, at, 60)
        await asyncio.to_thread(a.host.kill, "replicator")
        a.host.start_replicator()
    await asyncio.sleep(2.0)
    for s in pair:
        s.gen.stop.set()
    await asyncio.gather(*loads)
    t_end = time.monotonic()
    # Then main_pc catches up on everything pc2 wrote, both agree, and each event is in its log once
    converged = await converge(a, b, t_end, CONVERGE_BOUND_S)
    logged = [e.event_id for _, e in a.checker.sql.iter_events()]
    duplicates = len(logged) - len(set(logged))
    for s, label in ((a, "_a"), (b, "_b")):
        figures.set(**{f"acked{label}": s.ledger.count("acked"), f"failed{label}": s.ledger.count("failed")})
        figures.set(**{f"unknown{label}": s.ledger.count("unknown")})
    figures.set(recovery_s=converged, duplicates=duplicates)
    figures.at_most("recovery_s", CONVERGE_BOUND_S)
    figures.expect(duplicates == 0, f"{duplicates} events logged twice on main_pc")
    figures.note(a.host.log("replicator", 1500))
    await closing(a, b, figures, tmp_path)
    figures.verify()
