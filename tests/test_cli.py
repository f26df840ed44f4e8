"""The ``mfh`` command as an operator runs it: a subprocess against a running ``mfh api`` and ``mfh worker``."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hosts import TestHost, make_host
from services import free_port, tcp_open, wait_until

API_KEY = "cli-secret-9f2"


def own_prefix() -> dict[str, Any]:
    """A Redis key prefix of this test's own: suites running side by side share Redis db 9."""
    return {"storage": {"redis_prefix": f"t{uuid.uuid4().hex[:12]}"}}


def mfh(
    host: TestHost, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mfh_api.cli`` (what the ``mfh`` script runs) in the host's environment."""
    return subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", *args],
        env={**host.env, **(env or {})},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    # Given a host whose API key and Redis password come from the environment
    host = make_host(
        tmp_path, redis_url="redis://:hunter2@127.0.0.1:6379/9", overrides={"server": {"api_key": API_KEY}}
    )
    # When an operator prints the merged configuration, as YAML and as JSON
    shown = mfh(host, "config", "show")
    as_json = mfh(host, "config", "show", "--format", "json")
    # Then the host's values are there and no secret is
    assert shown.returncode == 0, shown.stderr
    assert "host_id: main_pc" in shown.stdout and "api_key: '********'" in shown.stdout
    data = json.loads(as_json.stdout)
    assert data["storage"]["redis_url"] == "redis://:****@127.0.0.1:6379/9"
    for out in (shown.stdout, as_json.stdout):
        assert API_KEY not in out and "hunter2" not in out


def test_global_options_work_after_the_subcommand(tmp_path: Path) -> None:
    # Given a config dir with a host file  When --host/--config-dir come after the subcommand
    host = make_host(tmp_path, name="pc9", redis_url="redis://127.0.0.1:6379/9")
    env_free = subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", "config", "show", "--host", "pc9", "--config-dir", str(host.config_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then they are honoured
    assert env_free.returncode == 0, env_free.stderr
    assert "host_id: pc9" in env_free.stdout


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    # Given a host  When mfh runs with no command, or with a host that has no file
    host = make_host(tmp_path, redis_url="redis://127.0.0.1:6379/9")
    bare = mfh(host)
    unknown = mfh(host, "--host", "nowhere", "config", "show")
    # Then both exit 2 with a message on stderr
    assert bare.returncode == 2 and "COMMAND" in bare.stderr
    assert unknown.returncode == 2 and "no configuration for host 'nowhere'" in unknown.stderr


def test_api_refuses_an_open_bind_without_a_key(tmp_path: Path) -> None:
    # Given a host bound to every interface (MFH_BIND) and no API key
    host = make_host(tmp_path, redis_url="redis://127.0.0.1:6379/9")
    # When the api starts without --insecure
    refused = mfh(host, "api", env={"MFH_BIND": "0.0.0.0"})
    # Then it exits 2 before binding anything, saying how to fix it
    assert refused.returncode == 2 and "--insecure" in refused.stderr and "MFH_API_KEY" in refused.stderr


@dataclass
class RunningApi:
    host: TestHost
    zmq: str
    grpc: str
    metrics_port: int


@pytest.fixture
def api(tmp_path: Path, redis_url: str) -> Iterator[RunningApi]:
    """``mfh api`` on free ports (set with the replica overrides) and ``mfh worker``, as subprocesses."""
    host = make_host(tmp_path, redis_url=redis_url, overrides={**own_prefix(), "server": {"api_key": API_KEY}})
    zmq_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    ports = ["--zmq-port", str(zmq_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
    proc = host.spawn("mfh_api.cli", "api", *ports, log_name="api")
    host.spawn("mfh_api.cli", "worker", "--threads", "2", log_name="worker")
    try:
        wait_until(
            lambda: proc.poll() is None and all(tcp_open("127.0.0.1", p) for p in (zmq_port, grpc_port, metrics_port)),
            90,  # awaited: a test file running beside others can take a loaded box half a minute to start an api
            interval=0.05,
            message=f"mfh api to listen (log: {host.log('api')})",
        )
        yield RunningApi(host, f"tcp://127.0.0.1:{zmq_port}", f"127.0.0.1:{grpc_port}", metrics_port)
    finally:
        for p in host.procs:
            host.kill(p)


@pytest.mark.parametrize("transport", ["grpc", "zmq"])
def test_put_get_list_delete_over_each_transport(api: RunningApi, transport: str) -> None:
    # Given a running api and worker, and a client pointed at the api's endpoint
    endpoint = api.zmq if transport == "zmq" else api.grpc
    via = ["--transport", transport, "--endpoint", endpoint]
    h = api.host
    # When an operator puts two memories (one from stdin, persisted) and reads one back
    put = mfh(h, "put", "ops", "note-1", '{"content": "rotate the keys"}', *via)
    put2 = mfh(h, "put", "ops", "note-2", "--file", "-", "--persisted", *via, stdin='{"content": "b"}')
    got = mfh(h, "get", "ops", "note-1", *via)
    as_json = mfh(h, "get", "ops", "note-1", "--json", *via)
    # Then each succeeds with readable output
    assert put.returncode == 0, put.stderr
    assert put.stdout.startswith("put ops/note-1 version=") and put2.returncode == 0, put2.stderr
    assert got.returncode == 0 and "kind=memory_item" in got.stdout and '"content": "rotate the keys"' in got.stdout
    version = json.loads(as_json.stdout)["version"]
    # And list shows both once they are persisted

    def listing_of_two() -> subprocess.CompletedProcess[str] | None:
        r = mfh(h, "list", "ops", *via)
        return r if r.stdout.count("\n") == 2 else None

    listed = wait_until(listing_of_two, 30, interval=0.1, message="both notes to be listed")
    assert listed is not None and listed.stdout.startswith("note-1\tmemory_item\t")
    # And a stale conditional delete is refused (exit 4), a good one succeeds, and a get then misses (exit 3)
    stale = mfh(h, "delete", "ops", "note-1", "--expected-version", "1", *via)
    assert stale.returncode == 4 and "FAILED_PRECONDITION" in stale.stderr
    gone = mfh(h, "delete", "ops", "note-1", "--expected-version", str(version), *via)
    assert gone.returncode == 0 and gone.stdout.startswith("deleted ops/note-1 version=")
    missing = mfh(h, "get", "ops", "note-1", *via)
    assert missing.returncode == 3 and "NOT_FOUND" in missing.stderr and missing.stdout == ""


@pytest.mark.parametrize("transport", ["grpc", "zmq"])
def test_bad_input_exits_2_and_wrong_key_exits_6(api: RunningApi, transport: str) -> None:
    # Given a running api that requires an API key
    endpoint = api.zmq if transport == "zmq" else api.grpc
    via = ["--transport", transport, "--endpoint", endpoint]
    h = api.host
    # When the payload is not JSON, the payload fails its model, or the key is wrong
    not_json = mfh(h, "put", "ops", "k", "{oops", *via)
    invalid = mfh(h, "put", "ops", "k", '{"content": ""}', *via)
    host_file = h.config_dir / "main_pc.yaml"  # the command takes its key from the host's config
    host_file.write_text(host_file.read_text().replace(API_KEY, "not-the-key"))
    wrong = mfh(h, "get", "ops", "k", *via)
    # Then each exits with its code and a message on stderr
    assert not_json.returncode == 2 and "not valid JSON" in not_json.stderr
    assert invalid.returncode == 2 and "INVALID_ARGUMENT" in invalid.stderr
    assert wrong.returncode == 6 and "UNAUTHENTICATED" in wrong.stderr


def test_metrics_count_both_transports(api: RunningApi) -> None:
    # Given one call over each transport
    h = api.host
    for transport, endpoint in (("grpc", api.grpc), ("zmq", api.zmq)):
        mfh(h, "get", "m", "absent", "--transport", transport, "--endpoint", endpoint)
    # When the metrics endpoint is scraped
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{api.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    # Then both transports' requests are there
    assert 'mfh_api_requests_total{code="NOT_FOUND",method="Get",transport="zmq"} 1.0' in text
    assert 'mfh_api_requests_total{code="NOT_FOUND",method="Get",transport="grpc"} 1.0' in text


def test_zmq_client_survives_a_replica_sigkill(tmp_path: Path, redis_url: str) -> None:
    # Given two `mfh api` replicas of one host on their own ZeroMQ ports, and a worker
    import asyncio
    import signal

    from mfh_api.client_zmq import AsyncZmqClient
    from mfh_api.service import PutSpec

    host = make_host(tmp_path, redis_url=redis_url, overrides=own_prefix())
    ports = [free_port(), free_port()]
    replicas = [
        host.spawn(
            "mfh_api.cli", "api", "--zmq-port", str(p), "--grpc-port", "0", "--metrics-port", "0", log_name=f"api{i}"
        )
        for i, p in enumerate(ports)
    ]
    host.spawn("mfh_api.cli", "worker", "--threads", "2", log_name="worker")
    try:
        wait_until(lambda: all(tcp_open("127.0.0.1", p) for p in ports), 90, message="both replicas to listen")
        endpoints = [f"tcp://127.0.0.1:{p}" for p in ports]

        async def load() -> tuple[int, list[str], int]:
            # When four clients put and get in a loop, and replica 0 is SIGKILLed once calls flow
            done, errors, failovers = 0, [], 0
            killed = asyncio.Event()

            async def agent(n: int) -> None:
                nonlocal done, failovers
                async with AsyncZmqClient(endpoints, timeout=0.5, retries=4) as c:
                    for i in range(60):
                        try:
                            key = f"a{n}-{i}"
                            res = await c.put(PutSpec("load", key, "memory_item", {"content": key}))
                            assert (await c.get("load", key)).version >= res.version
                            done += 1
                        except Exception as e:
                            errors.append(f"{type(e).__name__}: {e}")
                        if done >= 40 and not killed.is_set():
                            killed.set()
                            host.kill(replicas[0], signal.SIGKILL)
                    failovers += c.failovers

            await asyncio.gather(*(agent(n) for n in range(4)))
            return done, errors, failovers

        done, errors, failovers = asyncio.run(load())
        # Then every call succeeded, the clients having failed over from replica 0 to replica 1
        assert replicas[0].poll() is not None and replicas[1].poll() is None
        assert errors == [] and done == 240 and failovers >= 4
    finally:
        for p in host.procs:
            host.kill(p)


HOSTILE_ARGS: list[tuple[str, list[str | bytes], str]] = [
    ("negative page size", ["list", "ns", "--page-size", "-5"], "--page-size"),
    ("page size not a number", ["list", "ns", "--page-size", "many"], "--page-size"),
    ("negative expected version on put", ["put", "ns", "k", '{"content": "x"}', "--expected-version", "-1"],
     "--expected-version"),
    ("negative expected version on delete", ["delete", "ns", "k", "--expected-version", "-1"], "--expected-version"),
    ("negative timeout", ["get", "ns", "k", "--timeout", "-1"], "--timeout"),
    ("non-UTF-8 key", ["get", "ns", b"k\xff"], "key is not valid UTF-8"),
    ("non-UTF-8 payload", ["put", "ns", "k", b'{"content": "\xff"}'], "payload is not valid UTF-8"),
    ("50,000-deep payload", ["put", "ns", "k", "[" * 50_000 + "]" * 50_000], "nests deeper than 64"),
    ("lone surrogate escape in the payload", ["put", "ns", "k", '{"content": "x", "metadata": {"m": "\\ud800"}}'],
     "lone surrogate"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "args", "needle"), HOSTILE_ARGS, ids=[c[0] for c in HOSTILE_ARGS])
def test_hostile_arguments_exit_2_with_one_error_line(
    tmp_path: Path, case: str, args: list[str | bytes], needle: str
) -> None:
    # Given a host (no server: every one of these is refused before a call is made)
    host = make_host(tmp_path, redis_url="redis://127.0.0.1:6379/9")
    # When mfh gets a hostile argument
    done = subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", *args, "--endpoint", f"127.0.0.1:{free_port()}", "--timeout", "0.2"]
        if case != "negative timeout"
        else [sys.executable, "-m", "mfh_api.cli", *args],
        env=host.env,
        capture_output=True,
        timeout=60,
    )
    # Then it exits 2 with a one-line error naming the problem, and no traceback
    stderr = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr and done.stdout == b""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("mfh") and needle in last, stderr


def test_a_second_terminal_without_mfh_data_dir_reads_the_running_hubs_store(tmp_path: Path, redis_url: str) -> None:
    # Given a hub whose api runs with a data directory of its own (as scripts/run.sh gives var/),
    # its SQLite file and snapshots relative to it, as the shipped configuration has them
    data = tmp_path / "var"
    host = make_host(
        tmp_path,
        redis_url=redis_url,
        overrides={**own_prefix(), "storage": {**own_prefix()["storage"], "sqlite_path": "memory.db"},
                   "scheduler": {"snapshot_dir": "snapshots"}},
    )  # fmt: skip
    grpc_port = free_port()
    hub_env = {**host.env, "MFH_DATA_DIR": str(data)}
    # and a second terminal: another directory, another HOME, no MFH_DATA_DIR
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    terminal = {k: v for k, v in host.env.items() if k not in ("MFH_DATA_DIR", "XDG_DATA_HOME")}
    terminal["HOME"] = str(tmp_path / "home")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "mfh_api.cli", *args]
        return subprocess.run(cmd, env=terminal, cwd=elsewhere, capture_output=True, text=True, timeout=60)

    # Before the hub runs, the command reads the default data directory, and says the store is missing
    before = run("checksum")
    assert before.returncode != 0 and str(tmp_path / "home") in before.stderr, before.stderr
    log = open(tmp_path / "api.log", "wb")  # noqa: SIM115 - lives with the process
    api = subprocess.Popen(
        [sys.executable, "-m", "mfh_api.cli", "api", "--zmq-port", str(free_port()), "--grpc-port", str(grpc_port)],
        env=hub_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: api.poll() is None and tcp_open("127.0.0.1", grpc_port), 60, message="api up")
        assert (data / "memory.db").exists()
        # When that terminal runs mfh checksum and mfh status
        checksum = wait_until(lambda: (r := run("checksum", "--json")).returncode == 0 and r, 30, message="checksum")
        status = run("status", "--json")
    finally:
        api.terminate()
        api.wait(timeout=30)
        log.close()
    # Then both read the hub's store, and say where they found it
    assert json.loads(checksum.stdout)["host_id"] == "main_pc"
    assert f"running hub's data directory {data}" in checksum.stderr, checksum.stderr
    doc = json.loads(status.stdout)
    assert doc["sql"]["ok"] and doc["host_id"] == "main_pc", doc["sql"]
    assert [p["data_dir"] for p in doc["processes"]] == [str(data)]
