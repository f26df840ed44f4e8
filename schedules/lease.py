"""Leases: one scheduler per host runs the jobs (:class:`Lease`, in the host's Redis), and one host per cluster
runs a cluster-wide job's scheduled slot (:class:`SlotLease`, in a JetStream KV bucket).

APScheduler runs every job in every scheduler process; with two replicas each job would run
twice. Whoever holds the lease runs them; the lease expires if its holder dies.

A job whose work spans the cluster (the cross-host audit) may be scheduled on every host: at each
slot (the minute the crontab names, read on the host's own clock, so skewed clocks still agree on
it), each host tries to create the key ``<job>.<slot>`` in the bucket ``<event_topic>_leases``;
JetStream creates it for exactly one of them (a write expecting no earlier revision), and the others
see who holds it and stand by. Keys expire with the bucket's TTL (7 days); nothing is released: a
slot, once taken, is done (or failed) by its holder.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import nats.js.errors
import redis.asyncio as aioredis
from apscheduler.triggers.cron import CronTrigger
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from mfh_core.jetstream import NATS_ERRORS, translate_error
from mfh_core.nats_connection import NatsConnection
from mfh_core.nats_security import NatsSecurity
from mfh_models.settings import ReplicationSettings

__all__ = ["Lease", "SlotClaim", "SlotLease", "lease_bucket", "scheduled_slot"]

#: How long a slot's key stays in the bucket (its stream's max_age): far longer than any clock skew.
SLOT_TTL_S: Final = 7 * 86_400.0
#: How far back :func:`scheduled_slot` looks for the crontab's minute (a job that started late).
_LOOK_BACK_MINUTES: Final = 60

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """Take or keep the lease; ``held`` says whether this process may run the jobs now."""

    def __init__(self, client: aioredis.Redis, key: str, *, ttl_ms: int = 30_000) -> None:
        self.client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = uuid.uuid4().hex
        self.held = False
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    async def refresh(self) -> bool:
        """Renew the lease if held, else try to take it. Call it well within ``ttl_ms``."""
        if self.held and await self._renew(keys=[self.key], args=[self.token, self.ttl_ms]):
            return True
        self.held = bool(await self.client.set(self.key, self.token, nx=True, px=self.ttl_ms))
        return self.held

    async def release(self) -> None:
        if self.held:
            await self._release(keys=[self.key], args=[self.token])
            self.held = False


def lease_bucket(event_topic: str) -> str:
    """The KV bucket of one cluster's slot leases (one per events stream)."""
    return f"{event_topic}_leases"


def scheduled_slot(cron: str, now: datetime) -> datetime:
    """The slot a job of crontab ``cron`` (UTC) that runs at ``now`` belongs to: the latest minute at or before
    ``now`` that the crontab names (within the hour before), else ``now``'s minute. Every host computes it
    from its own clock at its own firing, so a host whose clock is a few seconds off names the same slot."""
    trigger = CronTrigger.from_crontab(cron, timezone="UTC")
    minute = now.astimezone(UTC).replace(second=0, microsecond=0)
    for back in range(_LOOK_BACK_MINUTES + 1):
        candidate = minute - timedelta(minutes=back)
        if trigger.get_next_fire_time(None, candidate) == candidate:
            return candidate
    return minute


@dataclass(frozen=True, slots=True)
class SlotClaim:
    """Who runs one slot of a job: ``won`` when it is this process."""

    key: str
    won: bool
    holder: str  # the host id that holds it
    revision: int


class SlotLease:
    """Take a job's slot for this host, cluster-wide, over a connection of its own (opened per claim)."""

    def __init__(
        self, r: ReplicationSettings, *, host_id: str, ttl_s: float = SLOT_TTL_S, connect_s: float = 5.0
    ) -> None:
        self.r = r
        self.host_id = host_id
        self.bucket = lease_bucket(r.event_topic)
        self.ttl_s = ttl_s
        self.connect_s = connect_s  # how long a claim waits for NATS to answer
        self.token = uuid.uuid4().hex  # this process: a host's second scheduler is another claimant

    async def claim(self, job: str, slot: datetime) -> SlotClaim:
        """Create ``<job>.<slot>`` if absent: won; else who holds it. Unavailable when NATS does not answer."""
        key = f"{job}.{slot.astimezone(UTC):%Y%m%dT%H%MZ}"
        conn = NatsConnection(
            url=self.r.nats_url, name=f"mfh-lease-{self.host_id}", security=NatsSecurity.from_settings(self.r)
        )
        await conn.open(wait_s=self.connect_s)
        try:
            kv = await self._kv(conn)
            value = json.dumps({"host": self.host_id, "token": self.token, "taken_at": time.time()}).encode()
            try:
                revision = await kv.create(key, value)
                return SlotClaim(key=key, won=True, holder=self.host_id, revision=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                entry = await kv.get(key)
            except TimeoutError:
                # The create may have been applied and its answer lost (a leader change, a slow link): the
                # key says who holds the slot, us included. Absent, nobody does: claim it once more.
                try:
                    entry = await kv.get(key)
                except nats.js.errors.KeyNotFoundError:
                    revision = await kv.create(key, value)
                    return SlotClaim(key=key, won=True, holder=self.host_id, revision=revision)
            held = json.loads(entry.value or b"{}")
            won = held.get("token") == self.token  # our own claim, made again (a retried call)
            return SlotClaim(key=key, won=won, holder=str(held.get("host", "?")), revision=entry.revision or 0)
        except (*NATS_ERRORS, ValueError) as e:
            raise translate_error(e, f"slot lease {key} in bucket {self.bucket}") from e
        finally:
            conn.mark_closing()
            await conn.close()

    async def _kv(self, conn: NatsConnection) -> KeyValue:
        js = conn.jetstream()
        try:
            return await js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            pass
        config = KeyValueConfig(
            bucket=self.bucket,
            description="MFH: which host runs each slot of a cluster-wide scheduled job",
            history=1,
            ttl=self.ttl_s,
            storage=StorageType.FILE,
            replicas=self.r.num_replicas,
        )
        try:
            return await js.create_key_value(config=config)
        except nats.js.errors.Error:  # another host created it first (with another config, say): use it
            return await js.key_value(self.bucket)
