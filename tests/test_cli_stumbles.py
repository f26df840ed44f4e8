"""The stumbles a new user hit with ``mfh`` (issue 8), each as the user types it: a subprocess.

Flags the user looked for (``--api-key``, ``--version``, ``--json``), errors that must be one line
with their exit code (a service down, a port taken, a closed pipe), output printed once.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hosts import TestHost, make_host
from services import free_port, tcp_open, wait_until
from test_cli import API_KEY, RunningApi, mfh, own_prefix
from test_cli import api as api  # the fixture: `mfh api` and `mfh worker` as subprocesses

#: What ``mfh`` says when the key was missing or wrong (names both ways to give it).
KEY_HINT = "pass --api-key or set MFH_API_KEY"


def mfh_clean(host: TestHost, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``mfh`` with no MFH_API_KEY inherited from the environment running the tests."""
    base = {k: v for k, v in host.env.items() if k != "MFH_API_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one ``mfh: ...`` line of stderr (asserting there is no traceback and nothing else)."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mfh: "), done.stderr
    return lines[0]


def test_version_is_the_installed_version_on_one_line(tmp_path: Path) -> None:
    # When a user asks for the version
    done = subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", "--version"], capture_output=True, text=True, timeout=60
    )
    # Then it is the installed distribution's, on one line
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"mfh {importlib.metadata.version('memory-fusion-hub')}\n"


def test_host_help_says_which_host_applies_without_one(tmp_path: Path) -> None:
    # When a user reads --host's help
    done = subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", "get", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},
    )
    # Then it names the real default (main_pc), not only $MFH_HOST
    line = next(line for line in done.stdout.splitlines() if line.strip().startswith("--host"))
    assert "$MFH_HOST" in line and "main_pc" in line, line


@pytest.mark.parametrize("transport", ["grpc", "zmq"])
def test_every_client_command_takes_api_key_and_mfh_api_key(tmp_path: Path, api: RunningApi, transport: str) -> None:
    # Given an api that requires a key, and a client whose host file has no key
    client = make_host(tmp_path / "client", redis_url="redis://127.0.0.1:1/0")
    via = ["--transport", transport, "--endpoint", api.zmq if transport == "zmq" else api.grpc]
    # When the key is missing: Then the error says how to give it (exit 6)
    missing = mfh_clean(client, "get", "ops", "k", *via)
    assert missing.returncode == 6 and KEY_HINT in one_error_line(missing)
    wrong = mfh_clean(client, "get", "ops", "k", *via, "--api-key", "not-the-key")
    assert wrong.returncode == 6 and "UNAUTHENTICATED" in wrong.stderr and KEY_HINT in wrong.stderr
    # When it comes as --api-key, or as MFH_API_KEY: Then put, get, list and delete all work
    for how, flag, env in (("flag", ["--api-key", API_KEY], {}), ("env", [], {"MFH_API_KEY": API_KEY})):
        key = f"k-{how}"
        put = mfh_clean(client, "put", "ops", key, '{"content": "x"}', "--persisted", *via, *flag, env=env)
        assert put.returncode == 0, (how, put.stderr)
        got = mfh_clean(client, "get", "ops", key, *via, *flag, env=env)
        assert got.returncode == 0 and '"content": "x"' in got.stdout, (how, got.stderr)
        listed = mfh_clean(client, "list", "ops", "--prefix", key, *via, *flag, env=env)
        assert listed.returncode == 0 and listed.stdout.startswith(f"{key}\t"), (how, listed.stderr)
        gone = mfh_clean(client, "delete", "ops", key, *via, *flag, env=env)
        assert gone.returncode == 0 and gone.stdout.startswith(f"deleted ops/{key} "), (how, gone.stderr)


def test_every_command_that_prints_a_result_has_json(tmp_path: Path, api: RunningApi) -> None:
    # Given a running api and a record written through it
    h, via = api.host, ["--endpoint", api.grpc]
    put = mfh(h, "put", "js", "k", '{"content": "x"}', "--persisted", "--json", *via)
    # When each command that prints a result runs with --json
    runs = {
        "put": put,
        "get": mfh(h, "get", "js", "k", "--json", *via),
        "checksum": mfh(h, "checksum", "--json"),
        "audit": mfh(h, "audit", "--json"),
        "snapshot": mfh(h, "snapshot", "--json"),
        "replay": mfh(h, "replay", "--into", f"sqlite:///{tmp_path / 'replayed.db'}", "--json"),
        "dlq list": mfh(h, "dlq", "list", "--json"),
        "dlq retry": mfh(h, "dlq", "retry", "--json"),
        "dlq purge": mfh(h, "dlq", "purge", "--all", "--json"),
        "config show": mfh(h, "config", "show", "--json"),
        "delete": mfh(h, "delete", "js", "k", "--json", *via),
    }
    # Then each prints exactly one JSON document on stdout
    docs = {}
    for name, done in runs.items():
        assert done.returncode == 0, (name, done.stderr)
        docs[name] = json.loads(done.stdout)  # raises on anything but one document
    assert docs["put"]["version"] >= 1 and docs["put"]["deleted"] is False and docs["put"]["event_id"]
    assert docs["delete"]["deleted"] is True and docs["delete"]["version"] > docs["put"]["version"]
    assert docs["audit"]["ok"] is True and docs["audit"]["live_checksum"] == docs["checksum"]["checksum"]
    assert docs["replay"]["checksum"] == docs["checksum"]["checksum"] and docs["replay"]["events"] >= 1
    assert docs["snapshot"]["items"] == 1 and Path(docs["snapshot"]["path"]).exists()
    assert docs["dlq list"]["total"] == 0 and docs["dlq retry"] == {"retried": 0} and docs["dlq purge"] == {"purged": 0}
    assert docs["config show"]["host_id"] == "main_pc"


def test_audit_prints_its_result_once(tmp_path: Path, redis_url: str) -> None:
    # Given a host with an (empty) store: `mfh db upgrade` creates it (a missing file is exit 7)
    host = make_host(tmp_path, redis_url=redis_url, overrides=own_prefix())
    assert mfh(host, "db", "upgrade").returncode == 0
    # When an operator runs the audit
    done = mfh(host, "audit")
    # Then its result is printed once: one line on stdout, nothing about it on stderr
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("audit ok: ") and done.stdout.count("\n") == 1
    checksum = done.stdout.split()[-1]
    assert (done.stdout + done.stderr).count(checksum) == 1, done.stderr


@pytest.mark.parametrize("action", [["list"], ["retry"], ["purge", "--all"]])
def test_dlq_with_redis_down_is_one_line_exit_5(tmp_path: Path, action: list[str]) -> None:
    # Given a host whose Redis does not answer
    host = make_host(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    # When an operator looks at the dead-letter queue
    done = mfh(host, "dlq", *action)
    # Then one line says Redis is unavailable, with exit code 5 (worth retrying)
    assert done.returncode == 5, done.stderr
    assert "Redis" in one_error_line(done) and "unavailable" in done.stderr


def test_a_bad_audit_cron_is_refused_by_config_show_and_the_scheduler(tmp_path: Path) -> None:
    # Given a host file with an impossible audit time
    host = make_host(tmp_path, redis_url="redis://127.0.0.1:1/0")
    host_file = host.config_dir / "main_pc.yaml"
    data = yaml.safe_load(host_file.read_text())
    data["scheduler"]["audit_cron"] = "99 3 * * *"
    host_file.write_text(yaml.safe_dump(data))
    # When the configuration is checked, and the scheduler started
    shown = mfh(host, "config", "show")
    scheduler = mfh(host, "scheduler")
    # Then both refuse it in one line naming the setting (exit 2), the scheduler without a traceback
    for done in (shown, scheduler):
        assert done.returncode == 2, done.stderr
        assert "scheduler.audit_cron" in one_error_line(done)


@pytest.mark.parametrize(
    "args",
    [
        ["get", "ns", "k", "--endpoint", ""],
        ["get", "ns", "k", "--transport", "zmq", "--endpoint", "garbage"],
        ["put", "ns", "k", '{"content": "x"}', "--transport", "zmq", "--endpoint", "127.0.0.1:5713"],
        ["list", "ns", "--endpoint", "tcp://127.0.0.1:5714"],
    ],
    ids=["empty grpc endpoint", "zmq endpoint without scheme", "grpc endpoint given to zmq", "zmq endpoint to grpc"],
)
def test_a_malformed_endpoint_is_a_usage_error(tmp_path: Path, args: list[str]) -> None:
    # Given a host  When the endpoint is not one the transport can use
    host = make_host(tmp_path, redis_url="redis://127.0.0.1:1/0")
    done = mfh(host, *args)
    # Then one line names it (exit 2), instead of libzmq's or gRPC core's own error
    assert done.returncode == 2, done.stderr
    assert "--endpoint" in one_error_line(done)


def _closed_stdout_run(host: TestHost, *args: str) -> subprocess.CompletedProcess[str]:
    """``mfh args`` whose stdout is a pipe nobody reads any more (``| head -1`` once head has exited)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "mfh_api.cli", *args],
            env=host.env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)


def test_a_closed_stdout_ends_quietly_with_141(api: RunningApi) -> None:
    # Given a record to print
    h, via = api.host, ["--endpoint", api.grpc]
    assert mfh(h, "put", "pipe", "k", '{"content": "x"}', "--persisted", *via).returncode == 0
    # When the reader of mfh's output has gone (`mfh get ... | head -1`)
    runs = [
        _closed_stdout_run(h, "get", "pipe", "k", *via),
        _closed_stdout_run(h, "list", "pipe", "--json", *via),
        _closed_stdout_run(h, "config", "show"),
    ]
    # Then mfh stops without a word (no "Broken pipe", no "Exception ignored"), exit code 141 like other tools
    for done in runs:
        assert (done.returncode, done.stderr) == (141, ""), done.args


def test_a_shell_pipe_into_head_prints_no_error(api: RunningApi) -> None:
    # Given a listing far longer than a pipe buffer holds
    h, via = api.host, ["--endpoint", api.grpc]
    big = json.dumps({"content": "x" * 60_000})
    for i in range(3):
        assert mfh(h, "put", "head", f"k{i}", big, "--persisted", *via).returncode == 0
    # When a user pipes it into head, as typed in a shell
    cmd = f"{sys.executable} -m mfh_api.cli list head --json --endpoint {api.grpc} | head -c 10"
    done = subprocess.run(["sh", "-c", cmd], env=h.env, capture_output=True, text=True, timeout=60)
    # Then head's ten characters arrive and nothing complains
    assert done.returncode == 0 and len(done.stdout) == 10 and done.stderr == "", done.stderr


@contextlib.contextmanager
def _listener() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("which", ["--zmq-port", "--grpc-port", "--metrics-port"])
def test_api_exits_at_once_naming_a_taken_port(tmp_path: Path, redis_url: str, which: str) -> None:
    # Given a port another program listens on
    host = make_host(tmp_path, redis_url=redis_url, overrides=own_prefix())
    with _listener() as taken:
        ports = {"--zmq-port": free_port(), "--grpc-port": free_port(), "--metrics-port": free_port(), which: taken}
        # When the api is told to serve on it
        started = time.monotonic()
        done = mfh(host, "api", *[str(x) for kv in ports.items() for x in kv])
        took = time.monotonic() - started
    # Then it exits at once, non-zero, with one line naming the port and the flag to change it
    assert done.returncode == 1, done.stderr
    line = one_error_line(done)
    assert f"port {taken}" in line and "already in use" in line and which in line
    assert took < 15, f"took {took:.1f} s"


def test_api_refuses_a_bind_address_this_machine_lacks(tmp_path: Path, redis_url: str) -> None:
    # Given a host told to bind to an address no interface here has (TEST-NET-1)
    host = make_host(tmp_path, redis_url=redis_url, overrides=own_prefix())
    # When its api starts
    done = mfh(host, "api", "--insecure", env={"MFH_BIND": "192.0.2.1"})
    # Then one line names the address and the setting, instead of gRPC core's log lines
    assert done.returncode == 1, done.stderr
    line = one_error_line(done)
    assert "192.0.2.1" in line and "MFH_BIND" in line


def test_two_hosts_cannot_share_one_grpc_port(tmp_path: Path, redis_url: str, redis_url_b: str) -> None:
    # Given host main_pc's api serving gRPC on a port
    a = make_host(tmp_path / "a", redis_url=redis_url, overrides=own_prefix())
    grpc_port = free_port()
    first = a.spawn(
        "mfh_api.cli", "api", "--grpc-port", str(grpc_port), "--zmq-port", "0", "--metrics-port", "0", log_name="api"
    )
    try:
        wait_until(lambda: first.poll() is None and tcp_open("127.0.0.1", grpc_port), 30, message="main_pc's api")
        # When host pc2's api is started on the same gRPC port (its own ZeroMQ port)
        b = make_host(tmp_path / "b", name="pc2", redis_url=redis_url_b, overrides=own_prefix())
        second = mfh(b, "api", "--grpc-port", str(grpc_port), "--zmq-port", "0", "--metrics-port", "0")
        # And a second replica of main_pc on the same port
        replica = mfh(a, "api", "--grpc-port", str(grpc_port), "--zmq-port", "0", "--metrics-port", "0")
        # Then both refuse at once with one line naming the port (no SO_REUSEPORT sharing), and the first serves on
        for done in (second, replica):
            assert done.returncode == 1, done.stderr
            assert f"gRPC port {grpc_port}" in one_error_line(done)
        assert first.poll() is None
        got = mfh(a, "get", "ns", "absent", "--endpoint", f"127.0.0.1:{grpc_port}")
        assert got.returncode == 3, got.stderr
    finally:
        for p in a.procs:
            a.kill(p)
