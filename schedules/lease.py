"""A leader lease in Redis, so that one scheduler per host runs the jobs.

APScheduler runs every job in every scheduler process; with two replicas each job would run
twice. Whoever holds the lease runs them; the lease expires if its holder dies.
"""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

__all__ = ["Lease"]

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
