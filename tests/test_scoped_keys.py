"""Scoped API keys (docs/security.md, "Scoped keys"): a read-only key cannot write and a key scoped to some
namespaces reads and writes nothing elsewhere, on gRPC, ZeroMQ v1 and the v0 shim; List, Watch, Search and
ListNamespaces never show another scope's records; the api reloads its keys file on SIGHUP and when it
changes, keeping the old keys when the new file is bad; hostile keys files are refused by name; the
refusals are counted per door."""

from __future__ import annotations

import hashlib
import json
import secrets
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from fuzz_strategies import granted_namespaces, namespace_patterns
from hosts import TestHost, make_host
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from services import free_port, tcp_open, wait_until

from mfh_api.grpc_server import GrpcServer
from mfh_api.keys import Grant, KeyRing
from mfh_api.keys_file import MAX_FILE_BYTES, parse_keys
from mfh_api.service import MemoryService, build_service
from mfh_api.zmq_server import ZmqServer
from mfh_client import AsyncMemoryClient, AsyncZmqClient, Durability, PutSpec
from mfh_core.metrics import AUTH_FAILURES
from mfh_models import ConfigError, NotFound, PermissionDenied, Unauthenticated

SINGLE = "single-" + secrets.token_urlsafe(16)  # server.api_key: every namespace, read-write
READER = secrets.token_urlsafe(24)  # "*", read, stored as its sha256
ALPHA = secrets.token_urlsafe(24)  # "p.a" and below, read-write, stored as its sha256
ALPHA_READER = "plain-" + secrets.token_urlsafe(16)  # "p.a.*", read, stored as given


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def keys_yaml(*entries: tuple[str, str, list[str], str]) -> str:
    return json.dumps({"keys": [{"name": n, "key": k, "namespaces": p, "mode": m} for n, k, p, m in entries]})


KEYS_FILE = keys_yaml(
    ("reader", sha(READER), ["*"], "read"),
    ("alpha", sha(ALPHA), ["p.a", "p.a.*"], "read-write"),
    ("alpha-reader", ALPHA_READER, ["p.a.*"], "read"),
)


def failures(door: str, reason: str) -> float:
    return AUTH_FAILURES.labels(door, reason)._value.get()  # type: ignore[no-any-return]


# -- the keys file and the grant, without servers ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("keys: [", "not valid YAML or JSON at line"),
        ("- a\n- b\n", "expected one mapping with the list 'keys'"),
        ("keys: []", "keys: List should have at least 1 item"),
        ("keys: 5", "'keys' must be a list"),
        ('{"keys": [{"name": "a", "key": 5, "namespaces": ["*"], "mode": "read"}]}', "keys.0.key"),
        ('{"keys": [{"name": "a", "key": "sha256:00", "namespaces": ["*"], "mode": "read"}]}', "64 lower-case hex"),
        ('{"keys": [{"name": "a", "key": "short", "namespaces": ["*"], "mode": "read"}]}', "16 to 512 characters"),
        (keys_yaml(("a", sha("x"), [], "read")), "keys.0.namespaces: List should have at least 1 item"),
        (keys_yaml(("a", sha("x"), [""], "read")), "pattern 0 is empty"),
        (keys_yaml(("a", sha("x"), ["agent-7/*"], "read")), "segments are joined by '.'"),
        (keys_yaml(("a", sha("x"), ["*"], "write")), "keys.0.mode"),
        (keys_yaml(("a b", sha("x"), ["*"], "read")), "keys.0.name"),
        (keys_yaml(("a", sha("x"), ["*"], "read"), ("a", sha("y"), ["*"], "read")), "given twice"),
        ('{"keys": [{"name": "a", "key": "' + "k" * 20 + '", "namespaces": ["*"], "mode": "read", "x": 1}]}', "x:"),
        (  # aliases: each list is parsed once, refused once
            'keys:\n  - {name: a, key: "sha256:' + "0" * 64 + '", mode: read, namespaces: [&l [a, a], *l, *l]}',
            "keys.0.namespaces.0: Input should be a valid string",
        ),
        ("[" * 5_000, "nested too deeply"),
    ],
)
def test_a_hostile_keys_file_is_refused_with_what_is_wrong(text: str, named: str) -> None:
    # Given a keys file's content an operator (or an attacker with write access) got wrong
    # When it is parsed, Then it is refused, naming the file and the problem, never echoing a key
    with pytest.raises(ConfigError) as e:
        parse_keys(text, "server.api_keys_file '/etc/mfh/keys.yaml'")
    assert e.value.message.startswith("server.api_keys_file '/etc/mfh/keys.yaml': ")
    assert named in e.value.message, e.value.message
    assert "k" * 20 not in e.value.message


def test_a_huge_or_unreadable_keys_file_is_refused_by_name(tmp_path: Path) -> None:
    huge = tmp_path / "huge.yaml"
    huge.write_text("keys: []\n" + "#" * MAX_FILE_BYTES)
    with pytest.raises(ConfigError, match=r"huge.yaml.*larger than"):
        KeyRing(keys_file=str(huge))
    with pytest.raises(ConfigError, match=r"absent.yaml.*cannot read"):
        KeyRing(keys_file=str(tmp_path / "absent.yaml"))
    same = tmp_path / "same.yaml"
    same.write_text(keys_yaml(("again", sha(SINGLE), ["*"], "read")))
    with pytest.raises(ConfigError, match="are the same key"):
        KeyRing(api_key=SINGLE, keys_file=str(same))


def test_the_ring_knows_each_key_by_its_hash_and_reloads_all_or_nothing(tmp_path: Path) -> None:
    # Given the single key and a keys file
    path = tmp_path / "keys.json"
    path.write_text(KEYS_FILE)
    ring = KeyRing(api_key=SINGLE, keys_file=str(path))
    # Then each key gets its grant, an unknown or missing key none
    assert ring.grant(SINGLE) == Grant("api_key", ("*",), True)
    assert ring.grant(READER) == Grant("reader", ("*",), False)
    assert ring.grant(ALPHA) == Grant("alpha", ("p.a", "p.a.*"), True)
    assert ring.grant(ALPHA_READER.encode()) == Grant("alpha-reader", ("p.a.*",), False)
    assert ring.grant(sha(READER)) is None and ring.grant(READER[:-1]) is None and ring.grant("") is None
    # And the unparsed scan finds any of them in a body, and refuses a body without one
    assert ring.scan_json(b'{"v": 1, "api_key": "' + ALPHA.encode() + b'"}') is None
    assert ring.scan_json(b'{"v": 1, "api_key": "nope"}') == "wrong api_key"
    assert ring.scan_json(b'{"v": 1}') == "missing api_key"
    # When the file is replaced by a bad one and reloaded, Then nothing changes
    path.write_text("keys: [")
    assert not ring.reload() and ring.grant(ALPHA) is not None
    # When it is replaced by a good one, Then exactly its keys (and the single key) are in force
    path.write_text(keys_yaml(("beta", sha("b" * 20), ["b"], "read")))
    assert ring.reload()
    assert ring.grant(ALPHA) is None and ring.grant("b" * 20) == Grant("beta", ("b",), False)
    assert ring.grant(SINGLE) is not None


def test_no_key_configured_is_open() -> None:
    ring = KeyRing()
    assert not ring.required and ring.grant(None) is not None and ring.scan_json(b"{}") is None


def test_a_grant_reads_its_patterns_and_writes_only_in_read_write_mode() -> None:
    g = Grant("g", ("p.a", "p.a.*", "team?"), False)
    assert g.can_read("p.a") and g.can_read("p.a.x.y") and g.can_read("team1")
    assert not g.can_read("p.ab") and not g.can_read("p") and not g.can_read("team12")
    with pytest.raises(PermissionDenied, match="read-only") as e:
        g.require("p.a", write=True)
    assert e.value.reason == "read_only"
    with pytest.raises(PermissionDenied, match="read-only"):  # whatever it would write: an empty batch too
        g.require_writer()
    with pytest.raises(PermissionDenied, match=r"may not read namespace 'p\.b'") as e:
        g.require("p.b")
    assert e.value.reason == "scope"
    assert g.subtree("p.a") == "some" and g.subtree("p.a.x") == "all" and g.subtree("p") == "some"
    assert g.subtree("q") == "none" and g.subtree("team") == "some"
    assert Grant("s", ("shared",), True).subtree("") == "some"  # ListNamespaces without a prefix


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(namespace_patterns(), min_size=1, max_size=4), st.data())
def test_scope_checks_agree_with_the_patterns(patterns: list[str], data: st.DataObject) -> None:
    # Given any patterns and names drawn near them (matching or nearly matching)
    import fnmatch

    g = Grant("fuzzed", tuple(patterns), True)
    assert g.subtree("") != "none"  # every name is under the empty prefix, those of the key too
    names = data.draw(st.lists(granted_namespaces(patterns), min_size=1, max_size=8))
    for name in names:
        # Then a name is readable exactly when a pattern matches it as a glob
        assert g.can_read(name) == any(fnmatch.fnmatchcase(name, p) for p in patterns), name
        # And a subtree said to be all readable is, and one said to be unreadable is not, name by name
        reach = g.subtree(name)
        below = [name, *(f"{name}.{n}" for n in names if n)]
        if reach == "all":
            assert all(g.can_read(n) for n in below), (name, below)
        if reach == "none":
            assert not any(g.can_read(n) for n in below), (name, below)


# -- both doors and the v0 shim, in process (real Redis, SQLite, a worker) ------------------------------


@pytest.fixture
async def hub(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[MemoryService, str, str]]:
    path = tmp_path / "keys.json"
    path.write_text(KEYS_FILE)
    host: TestHost = make_host(
        tmp_path,
        redis_url=redis_url,
        overrides={
            "storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"},
            "server": {"api_key": SINGLE, "api_keys_file": str(path)},
        },
    )
    host.start_worker(threads=2)
    svc = await build_service(host.settings)
    keys = KeyRing.from_settings(host.settings)
    grpc_server = GrpcServer(svc, host.settings, keys=keys)
    zmq_server = ZmqServer.from_settings(svc, host.settings, keys=keys)
    await grpc_server.start()
    await zmq_server.start()
    try:
        yield svc, f"127.0.0.1:{grpc_server.port}", zmq_server.endpoint
    finally:
        await zmq_server.close()
        await grpc_server.stop(grace=1.0)
        await svc.close()
        host.stop_all()


def note(ns: str, key: str, text: str = "apples and pears") -> PutSpec:
    return PutSpec(ns, key, "memory_item", {"content": text})


async def v0(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        await sock.send_multipart([b"", json.dumps(body).encode()])
        assert await sock.poll(10_000), "no reply"
        reply = json.loads((await sock.recv_multipart())[-1])
        assert isinstance(reply, dict)
        return reply
    finally:
        sock.close()


async def test_scopes_hold_on_both_doors_and_the_v0_shim(hub: tuple[MemoryService, str, str]) -> None:
    _svc, grpc_target, zmq_endpoint = hub
    admin = AsyncMemoryClient([grpc_target], api_key=SINGLE)
    # Given records in p.a.x and p.b.x, persisted (searchable), written with the single key (still in force)
    for ns in ("p.a.x", "p.b.x"):
        await admin.put(note(ns, "seed"), durability=Durability.PERSISTED, timeout=30)
    before = {(d, r): failures(d, r) for d in ("grpc", "zmq", "v0") for r in ("missing", "wrong", "scope", "read_only")}
    clients = {
        door: {name: make([target], api_key=key) for name, key in (("reader", READER), ("alpha", ALPHA))}
        for door, make, target in (
            ("grpc", AsyncMemoryClient, grpc_target),
            ("zmq", AsyncZmqClient, zmq_endpoint),
        )
    }
    try:
        for door, c in clients.items():
            reader, alpha = c["reader"], c["alpha"]
            # When the read-only key writes, Then it is refused and nothing changes
            assert (await reader.get("p.b.x", "seed")).key == "seed"
            with pytest.raises(PermissionDenied, match="read-only"):
                await reader.put(note("p.a.x", f"r-{door}"))
            with pytest.raises(PermissionDenied, match="read-only"):
                await reader.batch_put([note("p.a.x", f"rb-{door}")])
            with pytest.raises(PermissionDenied, match="read-only"):
                await reader.delete("p.a.x", "seed")
            # When the key scoped to p.a touches p.b, Then every call is refused
            with pytest.raises(PermissionDenied, match=r"may not read namespace 'p\.b\.x'"):
                await alpha.get("p.b.x", "seed")
            with pytest.raises(PermissionDenied):
                await alpha.batch_get("p.b.x", ["seed"])
            with pytest.raises(PermissionDenied, match="may not write"):
                await alpha.put(note("p.b.x", f"a-{door}"))
            with pytest.raises(PermissionDenied):  # a batch touching p.b is refused whole
                await alpha.batch_put([note("p.a.x", f"ab-{door}"), note("p.b.x", f"ab-{door}")])
            with pytest.raises(PermissionDenied):
                await alpha.delete("p.b.x", "seed")
            with pytest.raises(PermissionDenied):
                await alpha.list("p.b.x")
            with pytest.raises(PermissionDenied):
                await alpha.search("p.b.x", query="apples")
            with pytest.raises(PermissionDenied):
                await alpha.search(namespace_prefix="p.b", query="apples")
            with pytest.raises(PermissionDenied):
                async for _ in alpha.watch("p.b.x", after_sequence=0, reconnect_for=0):
                    pass
            # And across namespaces it sees only its own scope
            hits = await alpha.search(namespace_prefix="p", query="apples")
            assert {h.record.namespace for h in hits} == {"p.a.x"}
            assert (await alpha.list_namespaces(prefix="p")) == (["p.a.x"], "")
            assert (await alpha.list_namespaces(max_depth=2)) == (["p.a"], "")
            assert (await reader.list_namespaces(prefix="p")) == (["p.a.x", "p.b.x"], "")
            # While in its own scope it reads and writes
            await alpha.put(note("p.a.x", f"own-{door}"))
            assert (await alpha.get("p.a.x", f"own-{door}")).namespace == "p.a.x"
            assert [r.key for r in (await alpha.list("p.a.x"))[0] if r.key == "seed"] == ["seed"]
        # The v0 shim: the same answers in its own shape
        refused = [
            ({"action": "store", "namespace": "p.a.x", "key": "v0r", "value": {"content": "x"}}, READER),
            ({"action": "delete", "namespace": "p.a.x", "key": "seed"}, READER),
            ({"action": "store", "namespace": "p.b.x", "key": "v0a", "value": {"content": "x"}}, ALPHA),
            ({"action": "retrieve", "namespace": "p.b.x", "key": "seed"}, ALPHA),
            ({"action": "list", "namespace": "p.b.x"}, ALPHA),
        ]
        for body, key in refused:
            reply = await v0(zmq_endpoint, {**body, "api_key": key})
            assert reply["status"] == "error" and reply["error_code"] == "PERMISSION_DENIED", (body, reply)
        assert (await v0(zmq_endpoint, {"action": "retrieve", "namespace": "p.a.x", "key": "seed", "api_key": ALPHA}))[
            "status"
        ] == "success"
        # Unauthenticated stays UNAUTHENTICATED, on each door
        for make, target in ((AsyncMemoryClient, grpc_target), (AsyncZmqClient, zmq_endpoint)):
            for key in (None, "not-a-key-at-all"):
                bad = make([target], api_key=key)
                with pytest.raises(Unauthenticated):
                    await bad.get("p.a.x", "seed")
                close = getattr(bad, "aclose", None)
                if close is not None:
                    await close()
        assert (await v0(zmq_endpoint, {"action": "retrieve", "namespace": "p.a.x", "key": "seed"}))[
            "error_code"
        ] == "UNAUTHENTICATED"
        # Then nothing the refused calls asked for was done
        for ns, key in [("p.a.x", "r-grpc"), ("p.a.x", "rb-zmq"), ("p.b.x", "a-grpc"), ("p.a.x", "ab-grpc"),
                        ("p.a.x", "ab-zmq"), ("p.b.x", "ab-zmq"), ("p.a.x", "v0r"), ("p.b.x", "v0a")]:  # fmt: skip
            with pytest.raises(NotFound):
                await admin.get(ns, key)
        assert (await admin.get("p.b.x", "seed")).key == "seed" and (await admin.get("p.a.x", "seed")).key == "seed"
        # And each refusal was counted on its door, with its reason
        moved = {k: failures(*k) - v for k, v in before.items()}
        for door in ("grpc", "zmq"):
            assert moved[(door, "read_only")] >= 3 and moved[(door, "scope")] >= 9, (door, moved)
            assert moved[(door, "missing")] >= 1 and moved[(door, "wrong")] >= 1, (door, moved)
        assert moved[("v0", "read_only")] == 2 and moved[("v0", "scope")] == 3 and moved[("v0", "missing")] == 1
    finally:
        for c in clients.values():
            for client in c.values():
                close = getattr(client, "aclose", None)
                if close is not None:
                    await close()
                else:
                    client.close()
        await admin.aclose()


async def test_watch_shows_only_the_keys_scope(hub: tuple[MemoryService, str, str]) -> None:
    _svc, grpc_target, zmq_endpoint = hub
    admin = AsyncMemoryClient([grpc_target], api_key=SINGLE)
    g = AsyncMemoryClient([grpc_target], api_key=ALPHA_READER)
    z = AsyncZmqClient([zmq_endpoint], api_key=ALPHA_READER)
    try:
        # Given changes in p.a.w and p.b.w, persisted (in the host's event log)
        for ns in ("p.b.w", "p.a.w", "p.b.w"):
            await admin.put(note(ns, "w"), durability=Durability.PERSISTED, timeout=30)
        # When a key scoped to p.a.* watches from the start, Then it sees p.a.w's change, and cannot watch p.b.w
        for client in (g, z):
            async for ev in client.watch("p.a.w", after_sequence=0, reconnect_for=0):
                assert ev.namespace == "p.a.w"
                break
            with pytest.raises(PermissionDenied):
                async for _ in client.watch("p.b.w", after_sequence=0, reconnect_for=0):
                    pass
    finally:
        await admin.aclose()
        await g.aclose()
        z.close()


# -- a real api process: rotation by SIGHUP and by a change of the file; start-up refusals -------------


def _spawn_api(tmp_path: Path, redis_url: str, keys_path: Path) -> tuple[TestHost, Any, int, int, int]:
    host = make_host(
        tmp_path,
        redis_url=redis_url,
        overrides={
            "storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"},
            "server": {"api_keys_file": str(keys_path)},
        },
    )
    ports = free_port(), free_port(), free_port()
    proc = host.spawn(
        "mfh_api.cli", "api", "--zmq-port", str(ports[0]), "--grpc-port", str(ports[1]),
        "--metrics-port", str(ports[2]), log_name="api",
    )  # fmt: skip
    return host, proc, *ports


def _works(cli: Any, key: str) -> bool | None:
    """True if ``key`` reads through the running api, False if refused (UNAUTHENTICATED), None otherwise."""
    from mfh_client import MemoryClient

    with MemoryClient([cli], api_key=key, retries=0) as c:
        try:
            c.get("r", "absent")
        except NotFound:
            return True
        except Unauthenticated:
            return False
    return None


def test_keys_rotate_by_sighup_and_by_a_change_of_the_file(tmp_path: Path, redis_url: str) -> None:
    old, new, newer = (secrets.token_urlsafe(24) for _ in range(3))
    keys_path = tmp_path / "keys.yaml"
    keys_path.write_text(keys_yaml(("old", sha(old), ["*"], "read-write"), ("ro", sha(READER), ["r"], "read")))
    host, proc, _zmq_port, grpc_port, metrics_port = _spawn_api(tmp_path, redis_url, keys_path)
    target = f"127.0.0.1:{grpc_port}"
    try:
        wait_until(lambda: proc.poll() is None and tcp_open("127.0.0.1", grpc_port), 90, interval=0.05,
                   message=f"api to listen (log: {host.log('api')})")  # fmt: skip
        assert _works(target, old) is True and _works(target, new) is False
        # The mfh command: a refused write is one line and exit code 6
        done = subprocess.run(
            [sys.executable, "-m", "mfh_api.cli", "put", "r", "k", '{"content": "x"}', "--endpoint", target],
            env={**host.env, "MFH_API_KEY": READER},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 6, done.stderr
        assert done.stderr.startswith("mfh: PERMISSION_DENIED: key 'ro' is read-only") and done.stderr.count("\n") == 1
        # When the file gets a new key instead of the old and the api gets SIGHUP
        keys_path.write_text(keys_yaml(("new", sha(new), ["*"], "read-write")))
        proc.send_signal(signal.SIGHUP)
        # Then the new key works and the old one is refused, without a restart
        wait_until(lambda: _works(target, new) is True and _works(target, old) is False, 30, interval=0.05,
                   message=f"the new keys (log: {host.log('api')})")  # fmt: skip
        # When the file is broken and the api gets SIGHUP, Then it says why and the keys in force stay
        keys_path.write_text("keys:\n  - name: [")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "keys file refused" in host.log("api"), 30, message="the refusal in the log")
        assert "not valid YAML or JSON" in host.log("api") and str(keys_path) in host.log("api")
        assert _works(target, new) is True and proc.poll() is None
        # When the file is fixed, without a signal, Then the api picks it up by itself
        keys_path.write_text(keys_yaml(("newer", sha(newer), ["*"], "read")))
        wait_until(lambda: _works(target, newer) is True and _works(target, new) is False, 30, interval=0.05,
                   message=f"the file's change (log: {host.log('api')})")  # fmt: skip
        # And the api's /metrics shows the refusals per door and reason
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        assert 'mfh_api_auth_failures_total{door="grpc",reason="wrong"}' in body
        assert 'mfh_api_auth_failures_total{door="grpc",reason="read_only"} 1.0' in body
        # No log line holds a key
        log_text = (host.config_dir / "api.log").read_text()
        assert all(k not in log_text for k in (old, new, newer, READER, sha(new)[7:]))
    finally:
        host.stop_all()


@pytest.mark.parametrize("content", ["keys: [", '{"keys": [{"name": "a", "key": "x", "namespaces": [], "mode": 1}]}'])
def test_the_api_refuses_to_start_on_a_bad_keys_file(tmp_path: Path, redis_url: str, content: str) -> None:
    keys_path = tmp_path / "keys.yaml"
    keys_path.write_text(content)
    host, proc, *_ = _spawn_api(tmp_path, redis_url, keys_path)
    try:
        assert proc.wait(timeout=90) == 2
        assert f"server.api_keys_file {str(keys_path)!r}" in host.log("api"), host.log("api")
    finally:
        host.stop_all()
