"""Make sure the Redis the hub is configured to use answers and keeps an append-only file.

What ``scripts/run.sh`` runs before it starts the hub (``scripts/bootstrap.sh --hub``):

- the Redis at the configured URL (``storage.redis_url`` of ``MFH_HOST``'s config; by default the
  hub's own, ``127.0.0.1:6380``) answers and keeps an append-only file: use it;
- it answers but keeps nothing on disk (or only RDB snapshots): stop with exit code 3 and say what
  a crash would lose, unless ``--allow-volatile`` accepts that loss (then warn and go on);
- it answers but refuses ``CONFIG GET``: what it keeps is unknown; warn and go on;
- nothing answers and the URL is a loopback address without a password: start the hub's own
  ``redis-server`` there with ``config/redis-hub.conf`` (AOF on), its files in ``--dir``
  (``var/redis-<port>``), and wait until it answers;
- nothing answers elsewhere: exit code 1.

    python scripts/hub_redis.py [--url URL] [--allow-volatile] [--dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis

from mfh_core.redis_health import describe_url, persistence_of_sync
from mfh_models import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent
HUB_CONF = ROOT / "config" / "redis-hub.conf"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
EXIT_VOLATILE = 3


def say(msg: str) -> None:
    print(f"hub-redis: {msg}", file=sys.stderr)


def answers(url: str) -> redis.Redis | None:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError:
        client.close()
        return None
    return client


def start_own(url: str, data_dir: Path) -> int:
    parts = urlsplit(url)
    port = parts.port or 6379
    binary = shutil.which("redis-server")
    if binary is None:
        say("redis-server is not installed (apt-get install redis-server)")
        return 1
    where = data_dir / f"redis-{port}"
    where.mkdir(parents=True, exist_ok=True)
    say(f"starting the hub's own Redis on 127.0.0.1:{port} (append-only file in {where})")
    cmd = [binary, str(HUB_CONF), "--port", str(port), "--dir", str(where)]
    cmd += ["--logfile", str(where / "redis.log"), "--daemonize", "yes"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        client = answers(url)
        if client is not None:
            mode = persistence_of_sync(client)
            client.close()
            say(f"Redis on 127.0.0.1:{port} is up ({mode})")
            return 0
        time.sleep(0.1)
    say(f"Redis did not answer on 127.0.0.1:{port} within 15 s; see {where / 'redis.log'}")
    return 1


def check(url: str, *, allow_volatile: bool, data_dir: Path) -> int:
    """The selection logic; returns the exit code."""
    where = describe_url(url)
    client = answers(url)
    if client is None:
        parts = urlsplit(url)
        if parts.hostname in LOOPBACK and not parts.password:
            return start_own(url, data_dir)
        say(f"nothing answers at {where}; start that Redis, or point REDIS_URL at one")
        return 1
    try:
        mode = persistence_of_sync(client)
    finally:
        client.close()
    if mode == "aof":
        say(f"using Redis at {where} (append-only file)")
        return 0
    if mode == "unknown":
        say(f"using Redis at {where}; it refuses CONFIG GET, so make sure it keeps an append-only file")
        return 0
    kept = "only RDB snapshots" if mode == "rdb" else "nothing on disk"
    loss = (
        f"Redis at {where} keeps {kept}: if it crashes or restarts, every acknowledged write not yet"
        " persisted to SQL (durability ACCEPTED, the default) and every queued write batch is lost"
    )
    if allow_volatile:
        say(f"WARNING: {loss}; going on because --allow-volatile-redis was given")
        return 0
    say(f"ERROR: {loss}.")
    say(
        "Turn on its append-only file (CONFIG SET appendonly yes, and appendonly yes in its redis.conf),"
        " or point REDIS_URL at another Redis, or unset REDIS_URL to use the hub's own (127.0.0.1:6380),"
        " or accept the loss: scripts/run.sh --allow-volatile-redis"
    )
    return EXIT_VOLATILE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="hub_redis.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--url", help="Redis URL (default: storage.redis_url of the MFH_HOST configuration)")
    ap.add_argument("--allow-volatile", action="store_true", help="accept a Redis that keeps nothing on disk")
    ap.add_argument("--dir", type=Path, default=ROOT / "var", help="where the hub's own Redis keeps its files")
    args = ap.parse_args(argv)
    url = args.url
    if url is None:
        try:
            url = load_settings().storage.redis_url
        except ConfigError as e:
            say(str(e))
            return 2
    return check(url, allow_volatile=args.allow_volatile, data_dir=args.dir)


if __name__ == "__main__":
    sys.exit(main())
