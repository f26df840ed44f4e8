"""A private redis-server a test can SIGKILL and start again on the same port and directory.

``RedisServer(tmp_path, conf=HUB_REDIS_CONF)`` runs with the hub's shipped Redis configuration
(append-only file on), so a restart reloads what it held, as the hub's Redis would.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

import redis
from services import free_port, unavailable

from mfh_models import default_config_dir

HUB_REDIS_CONF = default_config_dir() / "redis-hub.conf"
VOLATILE = ["--appendonly", "no", "--save", ""]


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server binary not found")
    return binary


class RedisServer:
    """``conf``: a config file (None: Redis defaults); ``args``: extra command-line settings."""

    def __init__(self, workdir: Path, *, conf: Path | None = None, args: list[str] | None = None) -> None:
        self.binary = redis_server_binary()
        self.port = free_port()
        self.dir = workdir / f"redis-{self.port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = conf
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=1)

    def start(self, timeout: float = 15.0) -> RedisServer:
        cmd = [self.binary, *([str(self.conf)] if self.conf else [])]
        cmd += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), *self.args]
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError), self.client() as c:
                # A Redis loading its append-only file answers LOADING errors until it is done.
                if c.ping():
                    return self
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_tail = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                self.kill()
                raise RuntimeError(f"redis-server did not start on {self.port}:\n{log_tail}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
