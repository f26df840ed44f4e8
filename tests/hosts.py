"""Test hosts: a config dir with a host file of test overrides, for in-process objects and subprocesses."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mfh_core import HotStore
from mfh_models import Kind, MemoryEvent, NotFound, Op, Settings, canonical_json, default_config_dir, load_settings
from mfh_tasks import BatchQueue, build_hot_store

# Quick recovery for tests: a dead worker's messages are requeued 1 s after its last heartbeat,
# and every broker call runs maintenance.
FAST_RECOVERY = {"heartbeat_timeout_ms": 1000, "maintenance_chance": 1_000_000, "min_backoff_ms": 50}


@dataclass
class TestHost:
    """One MFH host for a test: its settings, and the environment its processes need."""

    __test__ = False  # not a test class

    name: str
    config_dir: Path
    settings: Settings
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"MFH_CONFIG_DIR": str(self.config_dir), "MFH_HOST": self.name, "PYTHONUNBUFFERED": "1"})
        return env

    def spawn(self, *args: str, log_name: str | None = None) -> subprocess.Popen[bytes]:
        """Start ``python -m <args>`` in its own process group, logging to the config dir."""
        log = open(self.config_dir / f"{log_name or args[0]}.log", "ab")  # noqa: SIM115 - lives with the process
        p = subprocess.Popen(
            [sys.executable, "-m", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs.append(p)
        return p

    def start_worker(self, threads: int = 4) -> subprocess.Popen[bytes]:
        return self.spawn(
            "dramatiq", "mfh_tasks.worker_main", "--processes", "1", "--threads", str(threads), log_name="worker"
        )

    @staticmethod
    def kill(p: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (dramatiq forks its workers)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        p.wait(timeout=30)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    # The leader only: dramatiq forwards it once to its workers; a group-wide
                    # SIGTERM reaches each worker twice, and a second one makes it hang.
                    p.send_signal(signal.SIGTERM)
                    p.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self.kill(p)

    def log(self, name: str = "worker") -> str:
        path = self.config_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def make_host(
    tmp_path: Path,
    *,
    name: str = "main_pc",
    redis_url: str,
    database_url: str | None = None,
    nats_url: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> TestHost:
    """Write ``<tmp>/config-<name>/{default,<name>}.yaml`` and load it."""
    cdir = tmp_path / f"config-{name}"
    cdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(default_config_dir() / "default.yaml", cdir / "default.yaml")
    uid = uuid.uuid4().hex[:8]
    host: dict[str, Any] = {
        "host_id": name,
        "server": {"zmq_port": 0, "grpc_port": 0, "metrics_port": 0, "api_key": None},
        "metrics": {"worker_port": 0, "replicator_port": 0, "scheduler_port": 0},
        "storage": {"redis_url": redis_url, "sqlite_path": str(tmp_path / f"{name}.db"), "postgres_url": None},
        "write_behind": {"queue_name": f"t_{uid}", **FAST_RECOVERY},
        "replication": {"enabled": nats_url is not None, "nats_url": nats_url or "nats://127.0.0.1:1"},
        "scheduler": {"snapshot_dir": str(tmp_path / f"snapshots-{name}")},
    }
    if database_url and not database_url.startswith("sqlite"):
        host["storage"]["postgres_url"] = database_url
    elif database_url:
        host["storage"]["sqlite_path"] = database_url.removeprefix("sqlite:///")
    _deep_update(host, overrides or {})
    (cdir / f"{name}.yaml").write_text(yaml.safe_dump(host))
    return TestHost(name=name, config_dir=cdir, settings=load_settings(name, config_dir=cdir, env={}))


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


class InProcessApi:
    """The api side of one host, in this process: stage in Redis, then batch and enqueue (what the api does).

    ``events`` keeps every accepted change, for tests that compute the expected end state.
    """

    def __init__(self, host: TestHost) -> None:
        self.queue = BatchQueue.from_settings(host.settings)
        self.hot: HotStore = build_hot_store(host.settings)
        self.events: list[MemoryEvent] = []

    async def put(self, key: str, text: str, namespace: str = "ns") -> MemoryEvent:
        payload = canonical_json({"content": text})
        e = await self.hot.stage(op=Op.PUT, namespace=namespace, key=key, kind=Kind.MEMORY_ITEM, payload=payload)
        self.events.append(e)
        await self.queue.submit(e)
        return e

    async def delete(self, key: str, namespace: str = "ns") -> MemoryEvent | None:
        """None, as the api's NOT_FOUND, when the key is absent or already deleted here."""
        try:
            e = await self.hot.stage(op=Op.DELETE, namespace=namespace, key=key, kind=None, payload="null")
        except NotFound:
            return None
        self.events.append(e)
        await self.queue.submit(e)
        return e

    async def close(self) -> None:
        await self.queue.close()
        await self.hot.close()
