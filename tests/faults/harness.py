"""Hosts as real processes (``mfh api``, the Dramatiq worker, scheduler, replicator) on private services.

- :class:`RedisServer`: a private ``redis-server`` with an append-only file (``appendonly yes``,
  ``appendfsync everysec``, as ``scripts/bootstrap.sh`` starts it), on a free port, its files in
  the test's tmp dir, so a SIGKILL and a restart from the same dir is the crash the issue measures.
- :class:`FaultHost`: one host's config (the shipped ``default.yaml`` plus a host file that only
  points at the private services and picks free ports) and its processes, each in a session of
  its own so a SIGKILL reaches every process of it.
- :class:`SqliteLock`: another connection holding SQLite's write lock, for "SQLite locked".

Write-behind timings are the shipped ones: recovery bounds are about what an operator runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import yaml
from services import free_port, tcp_open, unavailable, wait_until

from mfh_models import Settings, default_config_dir, load_settings

Proc = subprocess.Popen[bytes]


class RedisServer:
    """A private redis-server on 127.0.0.1 that keeps an AOF in ``workdir``; restartable on the same port and dir."""

    def __init__(self, workdir: Path, *, port: int | None = None, appendfsync: str = "everysec") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server not found (scripts/bootstrap.sh installs it)")
        self.binary = binary
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.appendfsync = appendfsync
        self.proc: Proc | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def ping(self) -> bool:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:  # refused, or still loading the AOF
            return False
        finally:
            client.close()

    def start(self, timeout: float = 20.0) -> float:
        """Start (loading the AOF if there is one) and return the monotonic time it first answered PING."""
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        cmd += ["--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "", "--daemonize", "no"]
        cmd += ["--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.ping, timeout, interval=0.005, message=f"redis-server on {self.port}")
        return time.monotonic()

    def kill(self) -> None:
        """SIGKILL: what the AOF does not hold is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM: Redis flushes its AOF and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class FaultHost:
    """One host: its config dir and settings, and the processes started for it (by role)."""

    name: str
    config_dir: Path
    settings: Settings
    api_ports: list[int]
    procs: dict[str, Proc] = field(default_factory=dict)
    exited: list[Proc] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"MFH_CONFIG_DIR": str(self.config_dir), "MFH_HOST": self.name, "PYTHONUNBUFFERED": "1"})
        return env

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.api_ports]

    def log_path(self, role: str) -> Path:
        return self.config_dir / f"{role}.log"

    def _spawn(self, role: str, args: list[str]) -> Proc:
        old = self.procs.pop(role, None)
        if old is not None:
            self.exited.append(old)
        log = self.log_path(role).open("ab")
        try:
            p = subprocess.Popen(
                [sys.executable, "-m", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()  # the child holds its own descriptor
        self.procs[role] = p
        return p

    # -- the processes of a host (the Procfile's lines) ---------------------------------------------

    def start_api(self, replica: int = 0, *, wait: bool = True) -> Proc:
        """``mfh api`` on this replica's gRPC port (ZeroMQ on any free port, no metrics endpoint)."""
        port = self.api_ports[replica]
        args = ["mfh_api.cli", "api", "--grpc-port", str(port), "--zmq-port", "0", "--metrics-port", "0"]
        p = self._spawn(f"api{replica}", args)
        if wait:
            self.wait_api(replica)
        return p

    def start_worker(self, threads: int = 4) -> Proc:
        """The Dramatiq worker ``mfh worker`` runs, started directly so a group SIGKILL reaches its forks."""
        args = ["dramatiq", "mfh_tasks.worker_main", "--processes", "1", "--threads", str(threads)]
        return self._spawn("worker", args)

    def start_scheduler(self) -> Proc:
        return self._spawn("scheduler", ["schedules", "run"])

    def start_replicator(self) -> Proc:
        return self._spawn("replicator", ["mfh_api.cli", "replicator"])

    def start(self, *, worker: bool = True, scheduler: bool = True, replicator: bool = False) -> None:
        """Start the host's processes together (every api replica, then wait until each one listens)."""
        for replica in range(len(self.api_ports)):
            self.start_api(replica, wait=False)
        if worker:
            self.start_worker()
        if scheduler:
            self.start_scheduler()
        if replicator:
            self.start_replicator()
        for replica in range(len(self.api_ports)):
            self.wait_api(replica)

    def wait_api(self, replica: int = 0) -> None:
        p, port = self.procs[f"api{replica}"], self.api_ports[replica]
        wait_until(
            lambda: p.poll() is None and tcp_open("127.0.0.1", port),
            60,
            interval=0.05,
            message=f"api{replica} of {self.name} on {port}\n{self.log(f'api{replica}')}",
        )

    # -- signals ------------------------------------------------------------------------------------

    def kill(self, role: str, sig: int = signal.SIGKILL) -> Proc:
        """Signal every process of ``role`` (its whole session) and wait for the leader to exit."""
        p = self.procs[role]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, sig)
        p.wait(timeout=30)
        return p

    def terminate(self) -> None:
        """SIGTERM each leader once (a second SIGTERM hangs a Dramatiq worker)."""
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)

    def reap(self, deadline: float) -> None:
        """Wait for every process until ``deadline`` (monotonic), then SIGKILL what is left, forks included."""
        for p in [*self.procs.values(), *self.exited]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(deadline - time.monotonic(), 0.01))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # forks of a leader that exited too
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)

    def stop_all(self, grace_s: float = 5.0) -> None:
        self.terminate()
        self.reap(time.monotonic() + grace_s)

    # -- logs -----------------------------------------------------------------------------------------

    def log(self, role: str, chars: int = 3000) -> str:
        path = self.log_path(role)
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def log_lines(self, *roles: str) -> int:
        """Lines written so far to these roles' logs (to measure what an outage costs in log volume)."""
        total = 0
        for role in roles:
            path = self.log_path(role)
            if path.exists():
                with path.open("rb") as f:
                    total += sum(1 for _ in f)
        return total

    def logs(self) -> str:
        return "\n".join(f"--- {self.name} {role}\n{self.log(role)}" for role in self.procs)


def stop_hosts(made: list[FaultHost], grace_s: float = 5.0) -> None:
    """SIGTERM every process of every host at once, then SIGKILL what is left after ``grace_s``."""
    for host in made:
        host.terminate()
    deadline = time.monotonic() + grace_s
    for host in made:
        host.reap(deadline)


def make_fault_host(
    tmp_path: Path,
    *,
    name: str = "main_pc",
    redis_url: str,
    postgres_url: str | None = None,
    nats_url: str | None = None,
    api_replicas: int = 1,
    overrides: dict[str, Any] | None = None,
) -> FaultHost:
    """Write ``<tmp>/host-<name>/{default,<name>}.yaml``: the shipped defaults, pointed at private services."""
    cdir = tmp_path / f"host-{name}"
    cdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(default_config_dir() / "default.yaml", cdir / "default.yaml")
    ports = [free_port() for _ in range(api_replicas)]
    host: dict[str, Any] = {
        "host_id": name,
        "server": {"grpc_port": ports[0], "zmq_port": 0, "metrics_port": 0, "api_key": None},
        "metrics": {"worker_port": 0, "replicator_port": 0, "scheduler_port": 0},
        "storage": {"redis_url": redis_url, "sqlite_path": str(cdir / f"{name}.db"), "postgres_url": postgres_url},
        "replication": {"enabled": nats_url is not None, "nats_url": nats_url or "nats://127.0.0.1:1"},
        "scheduler": {"snapshot_dir": str(cdir / "snapshots")},
    }
    for section, values in (overrides or {}).items():
        host.setdefault(section, {}).update(values)
    (cdir / f"{name}.yaml").write_text(yaml.safe_dump(host))
    settings = load_settings(name, config_dir=cdir, env={})
    return FaultHost(name=name, config_dir=cdir, settings=settings, api_ports=ports)


class SqliteLock:
    """Another connection holding SQLite's write lock (``BEGIN EXCLUSIVE``) until :meth:`release`."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)

    def acquire(self) -> None:
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.execute("COMMIT")
        self.conn.close()
