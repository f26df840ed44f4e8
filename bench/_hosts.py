"""Bench helpers: a throwaway host config and worker processes (the same shape the tests use)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
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

    def start_worker(self, *, processes: int = 1, threads: int = 4) -> None:
        env = {**os.environ, "MFH_CONFIG_DIR": str(self.dir), "MFH_HOST": self.name}
        log = open(self.dir / "worker.log", "ab")  # noqa: SIM115 - lives with the process
        cmd = [
            sys.executable,
            "-m",
            "dramatiq",
            "mfh_tasks.worker_main",
            "--processes",
            str(processes),
            "--threads",
            str(threads),
        ]
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        self.procs.clear()
