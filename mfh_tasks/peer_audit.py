"""``mfh audit --peers`` over the event bus: every host's replicator answers, one host compares and repairs.

Requests and replies are JSON on core NATS (not JetStream): ``<audit_subject_prefix>.<event_topic>``,
one subject per cluster (the hosts that share a stream). A request names the hosts it is for; each
host's replicator (:class:`AuditResponder`) answers from one read view of its SQL store
(mfh_tasks.cross_audit.answer), and replies carry the host id. The coordinator (:func:`run_peer_audit`,
what the command runs) compares (mfh_tasks.cross_audit.compare), and with ``repair`` asks the host
holding the winning row of each differing key to re-publish it on the stream as a repair event
(mfh_core.jetstream.REPAIR_HEADER), which every replicator applies by the usual (version, origin)
rule, so a stale row can never win. It then audits again until the hosts agree (or a deadline), and
sends the verdict to every host: each stores it in its Redis (``<prefix>:cross_audit``, what
``mfh status`` shows) and sets the ``mfh_cross_audit_*`` gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mfh_core import SqlStore
from mfh_core.eventbus import EventBus
from mfh_core.metrics import (
    CROSS_AUDIT_DIFFERENCES,
    CROSS_AUDIT_LAST,
    CROSS_AUDIT_LAST_SUCCESS,
    CROSS_AUDIT_UNREACHABLE,
)
from mfh_models import InvalidArgument, MemoryEvent, MFHError, Op, Settings, event_id_for
from mfh_models.settings import ReplicationSettings
from mfh_tasks.cross_audit import Ask, Difference, NamespaceIndex, Outcome, answer, compare, winner

__all__ = [
    "AuditResponder",
    "PeerAudit",
    "audit_subject",
    "export_verdict",
    "nats_ask",
    "read_verdict",
    "run_peer_audit",
    "store_verdict",
]

log = logging.getLogger("mfh.audit")

#: Keys of a verdict that name differing keys (the whole list is in the command's output).
_VERDICT_KEYS = 20
#: A host drops the view it keeps for an audit after this long without a request of it.
_VIEW_IDLE_S = 120.0


def audit_subject(r: ReplicationSettings) -> str:
    """The one subject of a cluster's audit requests."""
    return f"{r.audit_subject_prefix}.{r.event_topic}"


def _verdict_key(prefix: str) -> str:
    return f"{prefix}:cross_audit"


async def read_verdict(client: aioredis.Redis, prefix: str) -> dict[str, Any] | None:
    """The last cross-host verdict this host heard of, or None."""
    raw = await client.get(_verdict_key(prefix))
    if not raw:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


async def store_verdict(client: aioredis.Redis, prefix: str, verdict: dict[str, Any]) -> dict[str, Any]:
    """Keep ``verdict`` as this host's last, carrying ``last_success_at`` (the last verdict that was ok)."""
    previous = await read_verdict(client, prefix) or {}
    if previous.get("id") == verdict.get("id"):
        return previous  # heard twice (the coordinator's own host stores it as well)
    doc = dict(verdict)
    doc["last_success_at"] = doc["checked_at"] if doc.get("ok") else previous.get("last_success_at")
    await client.set(_verdict_key(prefix), json.dumps(doc, sort_keys=True))
    return doc


def export_verdict(verdict: dict[str, Any] | None) -> None:
    """Set the ``mfh_cross_audit_*`` gauges from a stored verdict."""
    if verdict is None:
        return
    CROSS_AUDIT_DIFFERENCES.set(float(verdict.get("differences", 0)))
    CROSS_AUDIT_UNREACHABLE.set(float(len(verdict.get("unreachable", {}))))
    CROSS_AUDIT_LAST.set(float(verdict.get("checked_at", 0.0)))
    CROSS_AUDIT_LAST_SUCCESS.set(float(verdict.get("last_success_at") or 0.0))


class AuditResponder:
    """This host's side of the audit, in the replicator: answers, re-publishes winners, keeps verdicts."""

    def __init__(self, *, bus: EventBus, sql: SqlStore, redis: aioredis.Redis, redis_prefix: str, host_id: str) -> None:
        self.bus = bus
        self.sql = sql
        self.redis = redis
        self.redis_prefix = redis_prefix
        self.host_id = host_id
        self.subject = ""
        self._sub: Any = None
        self._views: dict[str, tuple[dict[str, NamespaceIndex], float]] = {}  # audit id -> (indexes, last used)
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading = asyncio.Semaphore(2)  # SQL reads at once, so audits cannot crowd out the replicator

    async def start(self, subject: str) -> None:
        self.subject = subject
        self._sub = await self.bus.conn.client().subscribe(subject, cb=self._dispatch)
        with contextlib.suppress(RedisError, OSError):
            export_verdict(await read_verdict(self.redis, self.redis_prefix))
        log.info("audit responder for %s on %s", self.host_id, subject)

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _dispatch(self, msg: Any) -> None:
        """Each request in a task of its own: a hello is answered while a large digest is computed."""
        task = asyncio.create_task(self._on_request(msg), name="mfh-audit-request")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_request(self, msg: Any) -> None:
        try:
            req = json.loads(msg.data)
        except ValueError:
            return
        if not isinstance(req, dict):
            return
        hosts = req.get("hosts")
        if isinstance(hosts, list) and self.host_id not in hosts:
            return
        reply: dict[str, Any]
        try:
            reply = await self.handle(req)
        except MFHError as e:
            reply = {"error": f"{e.code}: {e.message}"}
        except Exception as e:  # one bad request must not stop the responder
            log.exception("audit request %s failed", str(req.get("op"))[:20])
            reply = {"error": f"{type(e).__name__}"}
        if msg.reply:
            data = json.dumps({**reply, "host": self.host_id}).encode()
            try:
                await msg.respond(data)
            except nats.errors.MaxPayloadError:
                await msg.respond(
                    json.dumps({"host": self.host_id, "error": f"reply of {len(data)} B too large"}).encode()
                )

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "hello":
            return {}
        if op == "verdict":
            verdict = req.get("verdict")
            if not isinstance(verdict, dict) or not isinstance(verdict.get("checked_at"), (int, float)):
                raise InvalidArgument("a verdict needs checked_at")
            export_verdict(await store_verdict(self.redis, self.redis_prefix, verdict))
            return {"stored": True}
        if op == "repair":
            return await self._republish(req)
        async with self._reading:
            return await asyncio.to_thread(self._answer, req, self._view(req))

    def _view(self, req: dict[str, Any]) -> dict[str, NamespaceIndex] | None:
        """The namespace indexes this host keeps for the request's audit (on the event loop only)."""
        audit_id = str(req.get("audit", ""))[:32]
        if not audit_id:
            return None
        now = time.monotonic()
        for old in [a for a, (_, used) in self._views.items() if now - used > _VIEW_IDLE_S]:
            del self._views[old]
        cache = self._views.get(audit_id, ({}, now))[0]
        self._views[audit_id] = (cache, now)
        while len(self._views) > 2:  # two audits at once at most keep their views
            del self._views[min(self._views, key=lambda a: self._views[a][1])]
        return cache

    def _answer(self, req: dict[str, Any], cache: dict[str, NamespaceIndex] | None) -> dict[str, Any]:
        with self.sql.snapshot() as snap:
            return answer(snap, req, cache)

    async def _republish(self, req: dict[str, Any]) -> dict[str, Any]:
        """Publish this host's row of each named key as a repair event, if it still is that (version, origin)."""
        audit_id = str(req.get("audit", ""))[:32] or secrets.token_hex(4)
        wanted: dict[str, dict[str, tuple[int, str]]] = {}
        for ns, key, version, origin in req.get("items", []):
            wanted.setdefault(str(ns), {})[str(key)] = (int(version), str(origin))
        events: list[MemoryEvent] = []
        skipped: list[str] = []
        for ns, keys in wanted.items():
            rows = await asyncio.to_thread(self.sql.get_many, ns, list(keys))
            for key, (version, origin) in keys.items():
                r = rows.get(key)
                if r is None or (r.version, r.origin) != (version, origin):
                    skipped.append(f"{ns}/{key}")  # changed since the audit read it: the next audit sees
                    continue
                events.append(
                    MemoryEvent(
                        event_id=event_id_for(r.origin, r.version),
                        op=Op.DELETE if r.deleted else Op.PUT,
                        namespace=ns,
                        key=key,
                        kind=r.kind,
                        payload=r.payload,
                        version=r.version,
                        origin=r.origin,
                        created_at=r.updated_at,
                        schema_version=r.schema_version,
                    )
                )
        published = await self.bus.publish_many(events, repair_id=audit_id)
        log.warning("audit %s: re-published %d of %d rows as repair events", audit_id, len(published), len(events))
        return {"published": len(published), "skipped": skipped, "unpublished": len(events) - len(published)}


def nats_ask(nc: Any, subject: str, *, timeout_s: float, audit_id: str | None = None) -> Ask:
    """The transport of :func:`mfh_tasks.cross_audit.compare`: one request, the replies within ``timeout_s``.

    Requests carry ``audit_id``, so each host answers every round of one audit from the view it took
    for that audit's summary."""
    tag = audit_id or secrets.token_hex(6)

    async def ask(request: dict[str, Any], hosts: Sequence[str]) -> dict[str, dict[str, Any]]:
        return await _gather(nc, subject, {"audit": tag, **request}, set(hosts), timeout_s=timeout_s)

    return ask


async def _gather(
    nc: Any, subject: str, request: dict[str, Any], hosts: set[str], *, timeout_s: float, discover: bool = False
) -> dict[str, dict[str, Any]]:
    """Publish with a reply inbox and collect the replies by host until each of ``hosts`` answered or
    ``timeout_s``. ``discover``: the request is for every host, and replies are awaited a little longer."""
    got: dict[str, dict[str, Any]] = {}
    done = asyncio.Event()

    async def on_reply(msg: Any) -> None:
        try:
            doc = json.loads(msg.data)
        except ValueError:
            return
        h = doc.get("host") if isinstance(doc, dict) else None
        if isinstance(h, str) and (discover or h in hosts):
            got[h] = doc
            if hosts <= got.keys():
                done.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        body = request if discover else {**request, "hosts": sorted(hosts)}
        await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout_s)
        if discover:
            await asyncio.sleep(_DISCOVER_GRACE_S)  # hosts not on the stream yet answer too
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return got


#: How long a discovering request waits for hosts nobody expected, after the expected ones answered.
_DISCOVER_GRACE_S = 0.3


@dataclass
class PeerAudit:
    """One ``mfh audit --peers`` run: what it found, what it repaired, what it ended with."""

    id: str
    by: str
    found: Outcome  # the first comparison
    final: Outcome  # after the repair (the first one when there was none)
    repaired: int | None = None  # rows re-published (None: no --repair)
    unresolved: list[Difference] | None = None  # differing keys no rule could pick a winner for
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 equal everywhere, 1 keys differ, 8 equal among the hosts that answered but some did not."""
        if not self.final.equal:
            return 1
        return 8 if self.final.unreachable else 0

    def verdict(self) -> dict[str, Any]:
        f = self.final
        keys = [f"{d.namespace}/{d.key}" for d in f.differences]
        return {
            "id": self.id,
            "by": self.by,
            "checked_at": time.time(),
            "ok": self.exit_code == 0,
            "hosts": f.hosts,
            "unreachable": f.unreachable,
            "found": len(self.found.differences),
            "differences": len(f.differences),
            "truncated": f.truncated,
            "keys": keys[:_VERDICT_KEYS],
            "repaired": self.repaired,
            "namespaces": f.namespaces,
            "rows": f.rows,
            "rounds": self.found.rounds,
            "seconds": round(self.seconds, 3),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.verdict(),
            "exit_code": self.exit_code,
            "found_keys": [d.as_dict() for d in self.found.differences],
            "remaining_keys": [d.as_dict() for d in self.final.differences],
            "unresolved_keys": [d.as_dict() for d in self.unresolved or []],
        }


async def _repair(ask: Ask, outcome: Outcome, audit_id: str) -> tuple[int, list[Difference]]:
    """Ask each winning host to re-publish its rows; (rows published, keys without a winner)."""
    plan: dict[str, list[list[Any]]] = {}
    unresolved: list[Difference] = []
    for d in outcome.differences:
        w = winner(d)
        if w is None:
            unresolved.append(d)
            continue
        host, row = w
        plan.setdefault(host, []).append([d.namespace, d.key, row.version, row.origin])
    published = 0
    for host, items in sorted(plan.items()):
        for i in range(0, len(items), 1000):
            got = await ask({"op": "repair", "audit": audit_id, "items": items[i : i + 1000]}, [host])
            reply = got.get(host, {})
            if "error" in reply or not reply:
                log.warning(
                    "audit %s: %s did not re-publish its rows: %s", audit_id, host, reply.get("error", "no answer")
                )
            published += int(reply.get("published", 0))
    return published, unresolved


async def run_peer_audit(
    settings: Settings,
    *,
    peers: Sequence[str] | None = None,
    repair: bool = False,
    timeout_s: float = 5.0,
    round_timeout_s: float = 120.0,
    max_keys: int = 1000,
    settle_s: float = 0.5,
    repair_wait_s: float = 15.0,
) -> PeerAudit:
    """Compare this cluster's hosts (``peers``, else every host on the stream and every one that answers).

    A host that does not answer a first "hello" within ``timeout_s`` is unreachable; the hosts that
    did get ``round_timeout_s`` for each round (a large store takes a while to digest). Unavailable
    when NATS does not answer. The verdict goes to every host compared (and this host's Redis, best
    effort), whatever it is.
    """
    t0 = time.perf_counter()
    audit_id = secrets.token_hex(6)
    r = settings.replication
    subject = audit_subject(r)
    bus = EventBus.from_settings(r, name=f"mfh-audit-{settings.host_id}")
    await bus.connect()
    try:
        nc = bus.conn.client()
        expected = set(peers) if peers else await bus.origins() | {settings.host_id}
        hello = await _gather(nc, subject, {"op": "hello"}, expected, timeout_s=timeout_s, discover=not peers)
        silent = {h: "no answer" for h in sorted(expected - set(hello))}
        hosts = sorted(set(hello) - silent.keys())
        found = await compare(nats_ask(nc, subject, timeout_s=round_timeout_s, audit_id=audit_id), hosts,
                              max_keys=max_keys, settle_s=settle_s)  # fmt: skip
        found.unreachable = {**silent, **found.unreachable}
        result = PeerAudit(id=audit_id, by=settings.host_id, found=found, final=found)
        if repair:
            ask = nats_ask(nc, subject, timeout_s=round_timeout_s, audit_id=audit_id)
            result.repaired, result.unresolved = await _repair(ask, found, audit_id) if found.differences else (0, [])
            if result.repaired:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + repair_wait_s
                while True:
                    again_ask = nats_ask(nc, subject, timeout_s=round_timeout_s)  # a fresh view each time
                    again = await compare(again_ask, found.hosts, max_keys=max_keys, settle_s=0)
                    if again.equal or loop.time() >= deadline:
                        break
                    await asyncio.sleep(0.2)
                again.unreachable = {**found.unreachable, **again.unreachable}
                result.final = again
        result.seconds = time.perf_counter() - t0
        verdict = result.verdict()
        with contextlib.suppress(*_NATS_SEND_ERRORS):
            await nc.publish(subject, json.dumps({"op": "verdict", "verdict": verdict}).encode())
            await nc.flush(timeout=2)
    finally:
        await bus.close()
    await _store_here(settings, verdict)
    return result


_NATS_SEND_ERRORS = (nats.errors.Error, OSError, TimeoutError)


async def _store_here(settings: Settings, verdict: dict[str, Any]) -> None:
    """This host's copy of the verdict, even when its replicator is down (best effort)."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        settings.storage.redis_url, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
    )
    try:
        await store_verdict(client, settings.storage.redis_prefix, verdict)
    except (RedisError, OSError) as e:
        log.warning("the verdict was not stored in this host's Redis: %s", e)
    finally:
        await client.aclose()
