"""scripts/run.sh runs the hub only on a Redis that keeps an append-only file (scripts/hub_redis.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis
from redis_server import HUB_REDIS_CONF, VOLATILE, RedisServer, redis_server_binary
from services import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "hub_redis.py"


def _hub_redis(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_a_redis_that_keeps_nothing_stops_the_hub_unless_accepted(tmp_path: Path) -> None:
    with RedisServer(tmp_path, args=VOLATILE) as server:
        refused = _hub_redis("--url", server.url)
        assert refused.returncode == 3, refused.stderr
        assert "keeps nothing on disk" in refused.stderr and "acknowledged write" in refused.stderr
        assert "--allow-volatile-redis" in refused.stderr
        accepted = _hub_redis("--url", server.url, "--allow-volatile")
        assert accepted.returncode == 0 and "WARNING" in accepted.stderr


def test_run_sh_stops_before_starting_processes_on_a_volatile_redis(tmp_path: Path) -> None:
    with RedisServer(tmp_path, args=VOLATILE) as server:
        env = {**os.environ, "REDIS_URL": server.url}
        run = subprocess.run(
            ["bash", str(ROOT / "scripts" / "run.sh")],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            check=False,
        )
        assert run.returncode == 3, run.stdout + run.stderr
        assert "keeps nothing on disk" in run.stderr


def test_a_redis_with_an_append_only_file_is_used(tmp_path: Path) -> None:
    with RedisServer(tmp_path, conf=HUB_REDIS_CONF) as server:
        used = _hub_redis("--url", server.url)
        assert used.returncode == 0, used.stderr
        assert "append-only file" in used.stderr


def test_nothing_answering_on_loopback_starts_the_hubs_own_redis_with_aof(tmp_path: Path) -> None:
    redis_server_binary()  # skips (or fails in CI) without redis-server
    url = f"redis://127.0.0.1:{free_port()}/0"
    started = _hub_redis("--url", url, "--dir", str(tmp_path))
    client = redis.Redis.from_url(url, socket_timeout=5, decode_responses=True)
    try:
        assert started.returncode == 0, started.stderr
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert Path(client.config_get("dir")["dir"]).is_relative_to(tmp_path)
    finally:
        if started.returncode == 0:
            client.shutdown(nosave=True)
        client.close()
