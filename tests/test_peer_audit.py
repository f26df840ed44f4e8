"""``mfh audit --peers [--repair]`` on two hosts of real processes (worker + replicator each), one NATS.

Rows are changed behind the hub's back in one host's SQLite file; the command, run as an operator
types it, must name exactly those keys, ``--repair`` must make both checksums equal again, and a
host whose replicator is down must be reported unreachable (exit 8).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from factories import event
from hosts import InProcessApi, make_host
from services import NatsServer, free_port, tcp_open
from test_replication import Side, expected_checksum, start_pair, stop_pair, wait_converged

from mfh_core import SqlStore
from mfh_core.eventbus import EventBus
from mfh_models import ConfigError
from mfh_tasks import PersistPipeline, build_hot_store
from mfh_tasks.replicator import Replicator
from schedules.jobs import audit_peers
from schedules.lease import SlotLease, scheduled_slot


def side(tmp_path: Path, name: str, redis_url: str, nats_url: str, **overrides: Any) -> Side:
    host = make_host(tmp_path, name=name, redis_url=redis_url, nats_url=nats_url, overrides=overrides)
    sql = SqlStore(host.settings.storage.database_url)
    sql.create_schema()
    return Side(host=host, api=InProcessApi(host), sql=sql)


@pytest.fixture
async def pair(
    tmp_path: Path, redis_url: str, redis_url_b: str, fresh_nats: NatsServer
) -> AsyncIterator[tuple[Side, Side, int]]:
    """main_pc and pc2, each with a worker and a replicator; pc2's replicator serves metrics on a free port."""
    port = free_port()
    a = side(tmp_path, "main_pc", redis_url, fresh_nats.url)
    b = side(tmp_path, "pc2", redis_url_b, fresh_nats.url, metrics={"replicator_port": port})
    try:
        await start_pair(a, b)
        yield a, b, port
    finally:
        await stop_pair(a, b)


def mfh(s: Side, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", *args], env=s.host.env, capture_output=True, text=True, timeout=120
    )


def audit(s: Side, *args: str) -> tuple[int, dict[str, Any]]:
    """``mfh audit --peers [HOSTS] --json ...``: a first argument without dashes names the hosts."""
    hosts = [args[0]] if args and not args[0].startswith("-") else []
    out = mfh(s, "audit", "--peers", *hosts, "--json", *args[len(hosts) :])
    assert out.stdout.strip(), out.stderr
    return out.returncode, json.loads(out.stdout)


def sqlite(s: Side, statement: str, *params: Any) -> None:
    """Change the host's SQLite file directly, behind the hub's back."""
    conn = sqlite3.connect(s.host.settings.storage.sqlite_path, timeout=10, isolation_level=None)
    try:
        assert conn.execute(statement, params).rowcount == 1
    finally:
        conn.close()


def gauge(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    assert m is not None, text[:2000]
    return float(m.group(1))


async def test_audit_names_keys_changed_behind_the_hubs_back_and_repair_makes_hosts_equal(
    pair: tuple[Side, Side, int],
) -> None:
    a, b, metrics_port = pair
    # Given writes on both hosts (a delete among them), converged
    for i in range(150):
        await a.api.put(f"k{i}", f"from main_pc {i}")
    for i in range(150, 200):
        await b.api.put(f"k{i}", f"from pc2 {i}", namespace="other")
    await a.api.delete("k3")
    events = a.api.events + b.api.events
    await wait_converged((a, b), events, within_s=30)
    original = b.sql.get("ns", "k5")
    assert original is not None
    # When one row is edited in pc2's file (same version), one row is deleted from main_pc's file,
    # and pc2's tombstone of k3 is turned back into a live row
    sqlite(b, "UPDATE items SET payload = ? WHERE namespace = 'ns' AND key = 'k5'", '{"content":"edited by hand"}')
    sqlite(a, "DELETE FROM items WHERE namespace = 'other' AND key = 'k170'")
    sqlite(b, "UPDATE items SET deleted = 0, payload = ? WHERE namespace = 'ns' AND key = 'k3'", '{"content":"x"}')
    assert a.sql.checksum() != b.sql.checksum()
    # Then mfh audit --peers names exactly those keys, with exit code 1
    code, doc = audit(a)
    assert code == 1 and doc["hosts"] == ["main_pc", "pc2"] and doc["unreachable"] == {}, doc
    assert sorted(f"{d['namespace']}/{d['key']}" for d in doc["found_keys"]) == ["ns/k3", "ns/k5", "other/k170"]
    rows = {d["key"]: d["hosts"] for d in doc["found_keys"]}
    assert rows["k5"]["main_pc"]["logged"] is True and rows["k5"]["pc2"]["logged"] is False
    assert rows["k5"]["main_pc"]["version"] == rows["k5"]["pc2"]["version"] == original.version
    assert rows["k170"]["main_pc"] is None and rows["k170"]["pc2"]["origin"] == "pc2"
    assert rows["k3"]["main_pc"]["deleted"] is True and rows["k3"]["pc2"]["deleted"] is False
    # and the text form says the same to a person
    text = mfh(a, "audit", "--peers")
    assert text.returncode == 1 and "DIFFERS ns/k5" in text.stdout and "DIFFERS FROM ITS LOG" in text.stdout
    assert text.stdout.strip().endswith("verdict: 3 key(s) differ"), text.stdout
    # When it runs with --repair (from the other host)
    code, doc = audit(b, "--repair")
    # Then the newest rows were re-published, the hosts agree again, and the exit code is 0
    assert code == 0, doc
    assert doc["found"] == 3 and doc["repaired"] == 3 and doc["differences"] == 0 and doc["remaining_keys"] == []
    assert a.sql.checksum() == b.sql.checksum() == expected_checksum(events)
    fixed = b.sql.get("ns", "k5")
    assert fixed is not None and fixed.payload == original.payload and fixed.version == original.version
    # and pc2's status and its replicator's gauges show the last verdict
    status = mfh(b, "status", "--json")
    cross = json.loads(status.stdout)["cross_audit"]
    assert cross["ok"] is True and cross["differences"] == 0 and cross["last_success_at"] == cross["checked_at"]
    assert gauge(metrics_port, "mfh_cross_audit_differences") == 0.0
    assert gauge(metrics_port, "mfh_cross_audit_last_success_timestamp_seconds") == pytest.approx(cross["checked_at"])


async def test_the_scheduled_audit_repairs_logs_its_verdict_and_stores_it(
    pair: tuple[Side, Side, int], caplog: pytest.LogCaptureFixture
) -> None:
    a, b, _ = pair
    # Given two converged hosts, one row of pc2's file edited behind the hub's back
    for i in range(30):
        await a.api.put(f"k{i}", f"from main_pc {i}")
    events = a.api.events
    await wait_converged((a, b), events, within_s=30)
    sqlite(b, "UPDATE items SET payload = ? WHERE namespace = 'ns' AND key = 'k7'", '{"content":"edited by hand"}')
    # When main_pc's scheduler runs its cross-host audit job, scheduled with repair
    sch = a.host.settings.scheduler.model_copy(update={"peer_audit_cron": "45 3 * * *", "peer_audit_repair": True})
    settings = a.host.settings.model_copy(update={"scheduler": sch})
    with caplog.at_level(logging.INFO, logger="mfh.schedules"):
        result = await audit_peers(settings)
    # Then it found the key, repaired it, and the hosts are equal again
    assert result is not None and result.exit_code == 0
    assert [f"{d.namespace}/{d.key}" for d in result.found.differences] == ["ns/k7"] and result.repaired == 1
    assert a.sql.checksum() == b.sql.checksum() == expected_checksum(events)
    # and one log line says what happened, without any payload
    lines = [r.getMessage() for r in caplog.records if "cross-host audit" in r.getMessage()]
    assert len(lines) == 1 and "2 host(s) main_pc,pc2, equal, 1 row(s) re-published" in lines[0], lines
    assert "edited by hand" not in caplog.text and "from main_pc" not in caplog.text
    # and both hosts' status shows the verdict
    for s in (a, b):
        cross = json.loads(mfh(s, "status", "--json").stdout)["cross_audit"]
        assert cross["id"] == result.id and cross["ok"] is True and cross["repaired"] == 1, cross


async def test_the_scheduled_audit_without_nats_logs_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = make_host(
        tmp_path, name="main_pc", redis_url="redis://127.0.0.1:1/0", nats_url=f"nats://127.0.0.1:{free_port()}"
    )
    with caplog.at_level(logging.INFO, logger="mfh.schedules"):
        assert await audit_peers(host.settings) is None
    warnings = [r for r in caplog.records if r.name == "mfh.schedules"]
    assert (
        len(warnings) == 1
        and warnings[0].levelno == logging.WARNING
        and warnings[0].getMessage().startswith("cross-host audit not run: ")
    ), caplog.text
    assert all(r.exc_info is None for r in caplog.records)


async def test_two_hosts_scheduled_for_one_slot_run_the_audit_once(
    pair: tuple[Side, Side, int], caplog: pytest.LogCaptureFixture
) -> None:
    a, b, _ = pair
    # Given two converged hosts whose schedulers both have the cross-host audit at 03:45
    for i in range(10):
        await a.api.put(f"k{i}", "x")
    await wait_converged((a, b), a.api.events, within_s=30)

    def scheduled(s: Side) -> Any:
        sch = s.host.settings.scheduler.model_copy(update={"peer_audit_cron": "45 3 * * *"})
        return s.host.settings.model_copy(update={"scheduler": sch})

    slot = datetime(2026, 12, 2, 3, 45, tzinfo=UTC)
    # When both hosts' jobs fire for the same slot, at once
    with caplog.at_level(logging.INFO, logger="mfh.schedules"):
        results = await asyncio.gather(audit_peers(scheduled(a), slot=slot), audit_peers(scheduled(b), slot=slot))
    # Then exactly one ran it (and found the hosts equal); the other said who did and stood by
    ran = [r for r in results if r is not None]
    assert len(ran) == 1 and ran[0].exit_code == 0, results
    winner = ran[0].by
    lines = [r.getMessage() for r in caplog.records if r.name == "mfh.schedules"]
    assert sum("cross-host audit of peer_audit.20261202T0345Z: run by " + winner == m for m in lines) == 1, lines
    assert sum(m.startswith(f"cross-host audit {ran[0].id}: 2 host(s)") for m in lines) == 1, lines
    # and the same host's job again for that slot (a retry, a second scheduler) does not run it twice
    again = [await audit_peers(scheduled(s), slot=slot) for s in (a, b)]
    assert again == [None, None]
    # and the next slot is run once again, by whichever host takes it
    later = slot + timedelta(days=1)
    results = await asyncio.gather(audit_peers(scheduled(b), slot=later), audit_peers(scheduled(a), slot=later))
    assert sum(r is not None for r in results) == 1, results


async def test_slot_leases_race_on_real_nats(tmp_path: Path, fresh_nats: NatsServer) -> None:
    # Given three hosts' leases on one NATS (the bucket not there yet)
    hosts = [make_host(tmp_path, name=n, redis_url="redis://127.0.0.1:1/0", nats_url=fresh_nats.url)
             for n in ("main_pc", "pc2", "pc3")]  # fmt: skip
    leases = [SlotLease(h.settings.replication, host_id=h.name) for h in hosts]
    start = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
    # When all three claim each of 10 slots at once
    for n in range(10):
        slot = start + timedelta(minutes=15 * n)
        claims = await asyncio.gather(*(lease.claim("peer_audit", slot) for lease in leases))
        # Then exactly one wins each, and every one names the same holder
        assert sum(c.won for c in claims) == 1, claims
        assert len({c.holder for c in claims}) == 1 and len({c.key for c in claims}) == 1, claims
    # and the bucket is a KV bucket of its own, beside the events stream, keeping keys for days
    import nats

    nc = await nats.connect(fresh_nats.url)
    try:
        kv = await nc.jetstream().key_value("memory_events_leases")
        status = await kv.status()
        assert status.values == 10 and status.history == 1 and (status.ttl or 0) >= 86_400, status
    finally:
        await nc.close()


async def test_a_claim_whose_answer_is_lost_still_knows_it_won(tmp_path: Path, fresh_nats: NatsServer) -> None:
    # Given a lease whose create reaches the server but whose answer is lost (a leader change, a slow link)
    class LostAnswer:
        def __init__(self, kv: Any) -> None:
            self.kv = kv

        async def create(self, key: str, value: bytes) -> int:
            await self.kv.create(key, value)
            raise TimeoutError

        async def get(self, key: str) -> Any:
            return await self.kv.get(key)

    class Flaky(SlotLease):
        async def _kv(self, conn: Any) -> Any:
            return LostAnswer(await super()._kv(conn))

    hosts = [make_host(tmp_path, name=n, redis_url="redis://127.0.0.1:1/0", nats_url=fresh_nats.url)
             for n in ("main_pc", "pc2")]  # fmt: skip
    flaky = Flaky(hosts[0].settings.replication, host_id="main_pc")
    other = SlotLease(hosts[1].settings.replication, host_id="pc2")
    slot = datetime(2026, 12, 2, 3, 45, tzinfo=UTC)
    # When it claims a slot, then another host claims the same slot
    mine = await flaky.claim("peer_audit", slot)
    theirs = await other.claim("peer_audit", slot)
    # Then it knows it holds the slot (else nobody would run it: the other host stands by)
    assert mine.won and mine.holder == "main_pc", mine
    assert not theirs.won and theirs.holder == "main_pc", theirs


def test_the_slot_is_the_crontabs_minute_on_the_hosts_own_clock() -> None:
    # A job that fires on time, a little late, or much later (within the hour) belongs to the cron's minute
    at = datetime(2026, 12, 2, 3, 45, tzinfo=UTC)
    assert scheduled_slot("45 3 * * *", at + timedelta(seconds=0.3)) == at
    assert scheduled_slot("45 3 * * *", at + timedelta(minutes=7, seconds=5)) == at
    quarter = datetime(2026, 12, 2, 10, 30, tzinfo=UTC)
    assert scheduled_slot("*/15 * * * *", quarter + timedelta(minutes=1, seconds=2)) == quarter
    # and a host whose clock is 5 s ahead fires when its own clock says 03:45:00: the same slot
    assert scheduled_slot("45 3 * * *", at) == at


async def test_the_scheduled_slot_without_nats_logs_one_warning_and_skips(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host = make_host(
        tmp_path, name="pc2", redis_url="redis://127.0.0.1:1/0", nats_url=f"nats://127.0.0.1:{free_port()}"
    )
    slot = datetime(2026, 12, 2, 3, 45, tzinfo=UTC)
    lease = SlotLease(host.settings.replication, host_id="pc2", connect_s=0.5)
    with caplog.at_level(logging.INFO, logger="mfh.schedules"):
        assert await audit_peers(host.settings, slot=slot, lease=lease) is None
    lines = [r for r in caplog.records if r.name == "mfh.schedules"]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING, caplog.text
    assert lines[0].getMessage().startswith("cross-host audit not run: ") and "NATS" in lines[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records)


@pytest.mark.parametrize("cron", ["99 3 * * *", "every night", "* * * *"])
def test_a_bad_peer_audit_cron_is_refused_naming_the_setting(tmp_path: Path, cron: str) -> None:
    with pytest.raises(ConfigError, match=r"scheduler\.peer_audit_cron: "):
        make_host(tmp_path, name="main_pc", redis_url="redis://127.0.0.1:1/0", nats_url="nats://127.0.0.1:1",
                  overrides={"scheduler": {"peer_audit_cron": cron}})  # fmt: skip


async def test_a_host_whose_replicator_is_down_is_reported_unreachable(pair: tuple[Side, Side, int]) -> None:
    a, b, _ = pair
    # Given two converged hosts
    for i in range(20):
        await a.api.put(f"k{i}", "x")
        await b.api.put(f"j{i}", "y")
    await wait_converged((a, b), a.api.events + b.api.events, within_s=30)
    # When pc2's replicator is stopped
    assert b.replicator is not None
    b.replicator.terminate()
    b.replicator.wait(timeout=20)
    # Then the audit reports pc2 unreachable with exit code 8, and says so in words
    text = mfh(a, "audit", "--peers", "--timeout", "1")
    assert text.returncode == 8 and "UNREACHABLE pc2: no answer" in text.stdout, text.stdout
    # and main_pc's status shows it (yellow: the hosts could not all be compared)
    status = json.loads(mfh(a, "status", "--json").stdout)
    assert status["cross_audit"]["unreachable"] == {"pc2": "no answer"}
    assert any(r["component"] == "hosts" and r["level"] == "yellow" for r in status["reasons"]), status["reasons"]
    # and naming the peers compares exactly those, pc2 still unreachable
    code, doc = audit(a, "main_pc,pc2", "--timeout", "1")
    assert code == 8 and doc["hosts"] == ["main_pc"] and doc["unreachable"] == {"pc2": "no answer"}, doc


async def test_a_repair_event_rewrites_only_a_row_of_its_exact_version(tmp_path: Path, redis_url: str) -> None:
    # Given a replicator over real Redis and SQLite, holding k (version 10) with content edited behind its back
    host = make_host(tmp_path, name="main_pc", redis_url=redis_url, nats_url="nats://127.0.0.1:1")
    sql = SqlStore(host.settings.storage.database_url)
    sql.create_schema()
    hot = build_hot_store(host.settings)
    r = Replicator(bus=EventBus.from_settings(host.settings.replication), pipeline=PersistPipeline(sql=sql, hot=hot),
                   host_id="main_pc")  # fmt: skip
    try:
        good = event("k", 10, origin="pc2")
        await r.apply_remote([good, event("j", 20, origin="pc2")])
        conn = sqlite3.connect(host.settings.storage.sqlite_path, isolation_level=None)
        conn.execute("UPDATE items SET payload = '{\"content\":\"edited\"}' WHERE key IN ('k', 'j')")
        conn.close()
        # When repair events arrive: k's exact version, and an older version of j
        await r.persist_remote([good, event("j", 15, origin="pc2")], repairs=[good, event("j", 15, origin="pc2")])
        # Then k is rewritten and its clean Redis entry dropped (reads refill it from SQL); j keeps its newer row
        k, j = sql.get("ns", "k"), sql.get("ns", "j")
        assert k is not None and k.payload == good.payload and k.version == good.version
        assert j is not None and j.payload == '{"content":"edited"}' and j.version == event("j", 20).version
        assert await hot.get("ns", "k") is None and await hot.get("ns", "j") is not None
    finally:
        await hot.close()
        sql.close()


@pytest.mark.parametrize("args", [["--repair"], ["--peers", "--full"], ["--peers", "Not A Host"]])
def test_flags_that_do_not_go_together_are_refused(tmp_path: Path, args: list[str]) -> None:
    host = make_host(tmp_path, redis_url="redis://127.0.0.1:1", nats_url="nats://127.0.0.1:1")
    out = subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", "audit", *args], env=host.env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and out.stderr.startswith("mfh: audit") and "\n" not in out.stderr.strip(), out.stderr


def test_nats_down_is_exit_5(tmp_path: Path) -> None:
    port = free_port()
    assert not tcp_open("127.0.0.1", port)
    host = make_host(tmp_path, redis_url="redis://127.0.0.1:1", nats_url=f"nats://127.0.0.1:{port}")
    out = subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", "audit", "--peers"], env=host.env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 5 and "NATS" in out.stderr, out.stderr
