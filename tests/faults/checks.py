"""The closing checks of every scenario, and the figures they produce.

- :class:`SqlChecker`: which acknowledged writes are not (yet) in SQL at their version or newer,
  and which failed writes showed up anyway.
- :func:`time_to_persist`: seconds until a set of acknowledged writes is in SQL, within a bound.
- :func:`replay_matches_live`: the event log replayed into an empty SQLite gives the live checksum.
- :func:`new_writes_succeed`: after the fault, fresh writes are acknowledged and reach SQL.
- :class:`Figures`: one scenario's ``name=value`` figures and the bounds it checked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from faults.load import NAMESPACE, Ledger, LoadGenerator, Write
from mfh_core import SqlStore
from mfh_tasks.replay import open_target, replay_from_sql


class SqlChecker:
    """Reads one host's SQL; remembers what it has confirmed (versions only grow, so it stays true)."""

    def __init__(self, url: str) -> None:
        self.sql = SqlStore(url)
        self._seen: dict[str, int] = {}

    def close(self) -> None:
        self.sql.close()

    def missing(self, writes: Iterable[Write]) -> list[Write]:
        """Acknowledged writes whose key is absent from SQL or at an older version."""
        want: dict[str, list[Write]] = {}
        for w in writes:
            if w.outcome == "acked" and w.version is not None and self._seen.get(w.key, -1) < w.version:
                want.setdefault(w.key, []).append(w)
        if not want:
            return []
        for key, row in self.sql.get_many(NAMESPACE, list(want)).items():
            self._seen[key] = row.version
        return [w for ws in want.values() for w in ws if self._seen.get(w.key, -1) < (w.version or 0)]

    def failed_but_landed(self, writes: Sequence[Write]) -> list[Write]:
        """Writes answered as definitely failed that are in SQL anyway (the answer did not say what happened)."""
        failed = [w for w in writes if w.outcome == "failed"]
        rows = self.sql.get_many(NAMESPACE, sorted({w.key for w in failed}))
        landed = []
        for w in failed:
            row = rows.get(w.key)
            if row is None:
                continue
            if w.op == "put" or row.deleted:  # a put's key is written only by that put
                landed.append(w)
        return landed

    def unknown_landed(self, writes: Sequence[Write]) -> int:
        unknown = [w for w in writes if w.outcome == "unknown"]
        rows = self.sql.get_many(NAMESPACE, sorted({w.key for w in unknown}))
        return sum(1 for w in unknown if w.key in rows and (w.op == "put" or rows[w.key].deleted))


async def time_to_persist(
    checker: SqlChecker, writes: Sequence[Write], *, since: float, limit_s: float
) -> float | None:
    """Seconds from ``since`` until every acknowledged write in ``writes`` is in SQL; None past ``limit_s``."""
    pending = [w for w in writes if w.outcome == "acked"]
    while True:
        pending = await asyncio.to_thread(checker.missing, pending)
        now = time.monotonic()
        if not pending:
            return round(max(now - since, 0.0), 2)
        if now - since > limit_s:
            return None
        await asyncio.sleep(0.1)


async def replay_matches_live(sql: SqlStore, tmp_path: Path, *, settle_s: float = 10.0) -> tuple[bool, str]:
    """Replay the events table into an empty SQLite file; compare with the live checksum once SQL is quiet."""
    deadline = time.monotonic() + settle_s
    last = -1
    while time.monotonic() < deadline:  # quiet: no new event for half a second
        n = (await asyncio.to_thread(sql.counts))["events"]
        if n == last:
            break
        last = n
        await asyncio.sleep(0.5)
    for attempt in range(3):
        live = await asyncio.to_thread(sql.checksum)
        target = open_target(f"sqlite:///{tmp_path}/replay-{time.monotonic_ns()}.db")
        try:
            result = await asyncio.to_thread(replay_from_sql, sql, target)
        finally:
            target.close()
        if result.checksum == live == await asyncio.to_thread(sql.checksum):
            return True, f"{result.events} events"
        if attempt < 2:
            await asyncio.sleep(1.0)  # a late write landed during the replay: try once SQL is quiet
    return False, f"replay {result.checksum[:12]} != live {live[:12]} ({result.events} events)"


async def new_writes_succeed(
    endpoints: Sequence[str], checker: SqlChecker, *, prefix: str, n: int = 30, within_s: float = 10.0
) -> tuple[int, float | None]:
    """After the fault, ``n`` fresh writes: how many were acknowledged, and seconds until they were all in SQL."""
    ledger = Ledger()
    gen = LoadGenerator(endpoints, ledger, prefix=prefix, rate_per_s=100, concurrency=4)
    try:
        t0 = time.monotonic()
        await gen.run(n)
    finally:
        await gen.close()
    acked = ledger.count("acked")
    return acked, await time_to_persist(checker, ledger.writes, since=t0, limit_s=within_s)


class Figures:
    """One scenario's figures (``name=value``) and the bounds it checks; all are reported before any fails."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.values: dict[str, Any] = {}
        self.violations: list[str] = []
        self.notes: list[str] = []

    def set(self, **values: Any) -> None:
        self.values.update(values)

    def ledger(self, ledger: Ledger) -> None:
        self.set(
            writes=len(ledger.writes),
            acked=ledger.count("acked"),
            failed=ledger.count("failed"),
            unknown=ledger.count("unknown"),
            cancelled=ledger.codes("CANCELLED"),
        )

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.violations.append(what)

    def at_most(self, name: str, bound: float) -> None:
        """The figure ``name`` is measured (not None) and at most ``bound``."""
        value = self.values.get(name)
        self.expect(value is not None and value <= bound, f"{name}={value} (bound {bound})")

    def note(self, text: str) -> None:
        self.notes.append(text)

    def line(self) -> str:
        parts = [f"scenario={self.scenario}"]
        parts += [f"{k}={'none' if v is None else v}" for k, v in self.values.items()]
        return " ".join(parts)

    def verify(self) -> None:
        """Fail with every violated bound at once (the figures line is printed by the fixture either way)."""
        if self.violations:
            detail = "\n".join(self.notes[-6:])
            raise AssertionError(f"{self.scenario}: " + "; ".join(self.violations) + (f"\n{detail}" if detail else ""))


async def finish(
    fig: Figures,
    checker: SqlChecker,
    writes: Sequence[Write],
    endpoints: Sequence[str],
    tmp_path: Path,
    *,
    label: str = "",
) -> None:
    """The closing checks, each recorded as a figure: lost, failed writes that landed, new writes, replay."""
    lost = await asyncio.to_thread(checker.missing, writes)
    landed = await asyncio.to_thread(checker.failed_but_landed, writes)
    unknown_landed = await asyncio.to_thread(checker.unknown_landed, writes)
    fig.set(
        **{f"lost{label}": len(lost), f"failed_landed{label}": len(landed), f"unknown_landed{label}": unknown_landed}
    )
    fig.expect(not lost, f"{len(lost)} acknowledged writes not in SQL{label} (first: {[w.key for w in lost[:3]]})")
    fig.expect(
        not landed,
        f"{len(landed)} writes answered as failed are in SQL{label} (attempts of the first: {landed[0].errors})"
        if landed
        else "",
    )
    acked, persisted_s = await new_writes_succeed(endpoints, checker, prefix=f"after{label}")
    fig.set(**{f"after_acked{label}": acked, f"after_persist_s{label}": persisted_s})
    fig.expect(
        acked == 30 and persisted_s is not None, f"new writes{label}: {acked}/30 acked, in SQL after {persisted_s}s"
    )
    ok, detail = await replay_matches_live(checker.sql, tmp_path)
    fig.set(**{f"replay{label}": "ok" if ok else "mismatch"})
    fig.expect(ok, f"replay{label}: {detail}")
