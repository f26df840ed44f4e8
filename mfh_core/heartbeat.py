"""Process heartbeats: each MFH process says in Redis that it is up, so ``mfh status`` can list them.

Every process (api replicas, each worker process, replicator, scheduler, ``mfh front``) keeps one key
``<prefix>:procs:<role>:<hostname>:<pid>`` holding its pid, version, start time and metrics
port, and what the process adds of its own (``extra``: the front's replicas, live or not). It is
refreshed every ``interval_s`` with a TTL of ``ttl_s``: a process that dies without cleaning up
disappears within the TTL, one that stops cleanly deletes its key at once.
The same start-up also sets ``mfh_processes{role,version}`` and ``mfh_process_start_timestamp_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, replace
from importlib import metadata
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from mfh_core.metrics import PROCESS_STARTED, PROCESSES

if TYPE_CHECKING:
    from mfh_models import Settings

__all__ = ["Heartbeat", "ProcessRecord", "announced_data_dirs", "hub_version", "read_processes"]

log = logging.getLogger("mfh.heartbeat")

ROLES = ("api", "worker", "replicator", "scheduler", "front")


def hub_version() -> str:
    """The installed version of the hub (``0+unknown`` when run from a tree that is not installed)."""
    try:
        return metadata.version("memory-fusion-hub")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """What one process says about itself."""

    role: str
    host_id: str
    hostname: str
    pid: int
    version: str
    started_at: float  # unix seconds
    metrics_port: int  # 0: none
    beat_at: float
    data_dir: str = ""  # where its relative data paths resolve (mfh_models.Settings.data_dir)
    extra: dict[str, Any] = field(default_factory=dict)  # the role's own (mfh front: {"replicas": [...]})

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ProcessRecord:
        data = json.loads(raw)
        fields = cls.__dataclass_fields__.items()
        required = {k: data[k] for k, f in fields if f.default is MISSING and f.default_factory is MISSING}
        return cls(**required, **{k: data[k] for k in ("data_dir", "extra") if k in data})  # older ones lack them

    def pid_gone(self) -> bool:
        """True when the record is of this machine and its pid no longer exists (a SIGKILLed process)."""
        if self.hostname != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


def _keys_pattern(prefix: str) -> str:
    return f"{prefix}:procs:*"


class Heartbeat:
    """One process's heartbeat key; :meth:`run` refreshes it until stopped, then deletes it."""

    def __init__(
        self,
        *,
        redis_url: str,
        prefix: str,
        role: str,
        host_id: str,
        metrics_port: int = 0,
        data_dir: str = "",
        interval_s: float = 5.0,
        ttl_s: float = 15.0,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            redis_url, socket_timeout=2.0, socket_connect_timeout=2.0, max_connections=2
        )
        self.interval_s = interval_s
        self.ttl_ms = int(ttl_s * 1000)
        hostname = socket.gethostname()
        pid = os.getpid()
        self.key = f"{prefix}:procs:{role}:{hostname}:{pid}"
        self.role = role
        self.record = ProcessRecord(
            role=role,
            host_id=host_id,
            hostname=hostname,
            pid=pid,
            version=hub_version(),
            started_at=time.time(),
            metrics_port=metrics_port,
            beat_at=0.0,
            data_dir=data_dir,
        )
        PROCESSES.labels(role=role, version=self.record.version).set(1)
        PROCESS_STARTED.labels(role=role).set(self.record.started_at)
        self._down = False
        self._extra = extra
        self._nudged: asyncio.Event | None = None

    @classmethod
    def of(
        cls,
        settings: Settings,
        role: str,
        *,
        metrics_port: int = 0,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> Heartbeat:
        """The heartbeat of a hub process (``role``) of the host ``settings`` describe."""
        return cls(
            redis_url=settings.storage.redis_url,
            prefix=settings.storage.redis_prefix,
            role=role,
            host_id=settings.host_id,
            data_dir=settings.data_dir or "",
            metrics_port=metrics_port,
            extra=extra,
        )

    def nudge(self) -> None:
        """Beat now rather than at the next interval (what ``extra`` says changed); a no-op before :meth:`run`."""
        if self._nudged is not None:
            self._nudged.set()

    async def beat(self) -> bool:
        """Write the key once; False (one log line per outage) while Redis is unavailable."""
        record = replace(self.record, beat_at=time.time(), extra=self._extra() if self._extra is not None else {})
        try:
            await self.redis.set(self.key, record.to_json(), px=self.ttl_ms)
        except (RedisError, OSError) as e:
            if not self._down:
                log.warning("%s heartbeat paused, Redis unavailable: %s", self.role, e)
            self._down = True
            return False
        if self._down:
            log.info("%s heartbeat resumed", self.role)
        self._down = False
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Beat every ``interval_s`` until ``stop`` is set; then delete the key and close."""
        nudged = self._nudged = asyncio.Event()
        try:
            while not stop.is_set():
                nudged.clear()
                await self.beat()
                waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(nudged.wait())]
                try:
                    await asyncio.wait(waits, timeout=self.interval_s, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
        finally:
            self._nudged = None
            await self.close()

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(self.key)
        with contextlib.suppress(Exception):
            await self.redis.aclose()


async def read_processes(client: aioredis.Redis, prefix: str) -> list[ProcessRecord]:
    """Every live heartbeat under ``prefix``, by role then start time. Redis errors propagate."""
    out: list[ProcessRecord] = []
    keys = [k async for k in client.scan_iter(match=_keys_pattern(prefix), count=200)]
    if not keys:
        return out
    for raw in await client.mget(keys):
        if raw is None:  # expired between SCAN and MGET
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            out.append(ProcessRecord.from_json(raw))
    order = {r: i for i, r in enumerate(ROLES)}
    out.sort(key=lambda p: (order.get(p.role, len(order)), p.started_at))
    return out


def announced_data_dirs(redis_url: str, prefix: str, host_id: str, *, timeout_s: float = 1.0) -> set[str]:
    """The data directories this machine's live processes of ``host_id`` announce (empty when Redis
    does not answer): for a command run without MFH_DATA_DIR to find the running hub's store."""
    import redis  # the sync client: the CLI asks once

    here = socket.gethostname()
    client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        keys = list(client.scan_iter(match=_keys_pattern(prefix), count=200))
        raws = client.mget(keys) if keys else []
    except (RedisError, OSError):
        return set()
    finally:
        client.close()
    out = set()
    for raw in raws:
        if raw is None:  # expired between SCAN and MGET
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            p = ProcessRecord.from_json(raw)
            if p.host_id == host_id and p.hostname == here and p.data_dir and not p.pid_gone():
                out.add(p.data_dir)
    return out
