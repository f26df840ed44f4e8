"""The fuzz suites' api: one real service (Redis + SQLite) with its gRPC and/or ZeroMQ server on a
private event loop thread, so that hypothesis tests (plain functions) can drive it with sync clients.

No worker runs: an accepted write is staged in Redis and its batch enqueued before it is answered,
so nothing changes the state between two requests. That makes "a rejected request changes
nothing" cheap to check around every single request: :meth:`FuzzHub.snapshot` reads the whole
Redis database of the test (the hub's keys with their values, the queue's keys by size) and the
SQL checksum of the items table (docs/architecture.md invariant 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from hosts import TestHost, make_host
from services import require

from mfh_api.grpc_server import GrpcServer
from mfh_api.service import MemoryService, PutSpec, build_service
from mfh_api.zmq_server import ZmqServer
from mfh_core import SqlStore
from mfh_models import Kind, MemoryEvent, NotFound, Op, canonical_json, event_id_for
from mfh_models.versions import pack

T = TypeVar("T")

API_KEY = "fuzz-Key_0123456789"
#: Scoped keys of the fuzz host's keys file (docs/security.md, "Scoped keys"): every namespace but read-only,
#: and read-write but only namespaces no generator makes (a prefix Search or ListNamespaces finds nothing).
READ_ONLY_KEY = "fuzz-Reader_0123456789"
ELSEWHERE_KEY = "fuzz-Elsewhere_0123456789"
KEYS_FILE = {
    "keys": [
        {"name": "fuzz-reader", "key": READ_ONLY_KEY, "namespaces": ["*"], "mode": "read"},
        {"name": "fuzz-elsewhere", "key": ELSEWHERE_KEY, "namespaces": ["zz-none", "zz-none.*"], "mode": "read-write"},
    ]
}
NS = "fz"
OTHER_NS = "fz2"
#: Keys the generated requests aim at, so that the keyspace stays small and snapshots cheap.
SQL_KEYS = ("s0", "s1", "s2", "s3", "s4", "s5")  # persisted (SQL, then filled into Redis)
SQL_TOMBSTONE = "s6"
HOT_KEYS = ("h0", "h1", "h2", "h3")  # staged only (Redis, dirty)
FRESH_KEYS = ("n0", "n1", "n2", "n3", "a/b", "x:y@z", "k.e-y_1")  # absent at the start
KEYS = (*SQL_KEYS, SQL_TOMBSTONE, *HOT_KEYS, *FRESH_KEYS)
MAX_MESSAGE_BYTES = 512 * 1024  # above the 256 KiB payload limit, so both limits can be hit
PROBE_NS = "probe"  # never generated: a well-formed read of it must always work
PROBE_KEY = "alive"


#: Every key of the database: the hub's (ARGV[1] is its prefix) with their value, the queue's by size.
#: A hash is compared by its fields and values, not by DUMP: rewriting a field with the value it
#: already holds changes the encoding's field order, not what is stored.
_DUMP_LUA = """
local out = {}
for _, k in ipairs(redis.call('KEYS', '*')) do
  local t = redis.call('TYPE', k)['ok']
  local v
  if string.sub(k, 1, #ARGV[1]) == ARGV[1] and t == 'hash' then
    local h, pairs_ = redis.call('HGETALL', k), {}
    for i = 1, #h, 2 do pairs_[#pairs_ + 1] = h[i] .. '\0' .. h[i + 1] end
    table.sort(pairs_)
    v = table.concat(pairs_, '\1') .. '\2' .. tostring(redis.call('PTTL', k) >= 0)
  elseif string.sub(k, 1, #ARGV[1]) == ARGV[1] then v = redis.call('DUMP', k)
  elseif t == 'list' then v = redis.call('LLEN', k)
  elseif t == 'hash' then v = redis.call('HLEN', k)
  elseif t == 'zset' then v = redis.call('ZCARD', k)
  elseif t == 'set' then v = redis.call('SCARD', k)
  else v = redis.call('STRLEN', k) end
  out[#out + 1] = k
  out[#out + 1] = t
  out[#out + 1] = v
end
return out
"""


@dataclass(frozen=True)
class State:
    """What a rejected request must leave as it found it."""

    redis: tuple[tuple[str, str, Any], ...]
    sql: str

    def diff(self, other: State) -> str:
        a, b = dict((k, (t, v)) for k, t, v in self.redis), dict((k, (t, v)) for k, t, v in other.redis)
        changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        sql = "" if self.sql == other.sql else f"; SQL checksum {self.sql[:12]} -> {other.sql[:12]}"
        return f"Redis keys changed: {changed}{sql}"


class FuzzHub:
    """The api under fuzz, on its own loop thread; ``grpc_port`` / ``zmq_endpoint`` once started."""

    def __init__(self, host: TestHost, *, with_grpc: bool, with_zmq: bool) -> None:
        self.host = host
        self.with_grpc, self.with_zmq = with_grpc, with_zmq
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-api", daemon=True)
        self.service: MemoryService | None = None
        self.grpc: GrpcServer | None = None
        self.zmq: ZmqServer | None = None
        s = host.settings.storage
        self.prefix = s.redis_prefix
        self.redis = redis.Redis.from_url(s.redis_url, socket_timeout=5)
        self.sql = SqlStore(s.database_url)
        db = Path(s.database_url.removeprefix("sqlite:///"))
        self._sql_files = [db, db.with_name(db.name + "-wal")]
        self._sql_stamp: tuple[tuple[int, int], ...] = ()
        self._sql_sum: str | None = None
        self._dump_script = self.redis.register_script(_DUMP_LUA)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def grpc_target(self) -> str:
        assert self.grpc is not None
        return f"127.0.0.1:{self.grpc.port}"

    @property
    def zmq_endpoint(self) -> str:
        assert self.zmq is not None
        return self.zmq.endpoint

    def start(self) -> None:
        self.thread.start()
        self.sql.create_schema()
        self._seed_sql()
        self.run(self._start())

    async def _start(self) -> None:
        settings = self.host.settings
        self.service = service = await build_service(settings)
        if self.with_grpc:
            self.grpc = GrpcServer(service, settings)
            await self.grpc.start()
        if self.with_zmq:
            self.zmq = ZmqServer.from_settings(service, settings)
            await self.zmq.start()
        for key in (*SQL_KEYS, SQL_TOMBSTONE):  # read-repair now, so that later reads change nothing
            with contextlib.suppress(NotFound):
                await service.get(NS, key)
        for i, key in enumerate(HOT_KEYS):
            await service.put(PutSpec(NS, key, "memory_item", {"content": f"hot {i}", "tags": ["t"]}))
        await service.put(PutSpec(OTHER_NS, "s0", "memory_item", {"content": "other namespace"}))
        await service.put(PutSpec(PROBE_NS, PROBE_KEY, "memory_item", {"content": "alive"}))

    def _seed_sql(self) -> None:
        """Persisted rows of every kind and a tombstone, as if a worker had written them."""
        payloads: list[tuple[Kind, dict[str, Any]]] = [
            (Kind.MEMORY_ITEM, {"content": "persisted", "importance": 0.9}),
            (Kind.SESSION_DATA, {"session_id": "sess-1", "data": {"a": [1, 2]}}),
            (Kind.KNOWLEDGE_RECORD, {"subject": "tea", "object": "hot"}),
        ]
        events = []
        for i, key in enumerate((*SQL_KEYS, SQL_TOMBSTONE)):
            kind, body = payloads[i % len(payloads)]
            version = pack(1_700_000_000_000 + i, 0)
            deleted = key == SQL_TOMBSTONE
            events.append(
                MemoryEvent(
                    event_id=event_id_for("pc2", version),
                    op=Op.DELETE if deleted else Op.PUT,
                    namespace=NS,
                    key=key,
                    kind=kind,
                    payload="null" if deleted else canonical_json({**body, "schema_version": 1}),
                    version=version,
                    origin="pc2",
                    created_at=1_700_000_000_000 + i,
                )
            )
        self.sql.apply_batch(events)

    def stop(self) -> None:
        async def _stop() -> None:
            if self.grpc is not None:
                await self.grpc.stop(grace=0.5)
            if self.zmq is not None:
                await self.zmq.close(grace=0.5)
            if self.service is not None:
                await self.service.close()

        try:
            self.run(_stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.redis.close()
            self.sql.close()

    def quiesce(self, timeout_s: float = 15.0) -> None:
        """Wait until no request is running on the api: a call whose client gave up (its deadline
        passed) still runs to the end on the server, and what it writes belongs to it, not to the next
        request the ledger judges."""

        def busy() -> bool:
            grpc_busy = self.with_grpc and self.grpc.servicer is not None and self.grpc.servicer.unary_in_flight > 0
            zmq_busy = self.with_zmq and bool(self.zmq._tasks)
            return bool(grpc_busy or zmq_busy)

        deadline = time.monotonic() + timeout_s
        while busy() and time.monotonic() < deadline:
            time.sleep(0.002)

    def snapshot(self) -> State:
        """The whole Redis database of the test (one script call) and the SQL items checksum."""
        flat = self._dump_script(args=[f"{self.prefix}:"])
        rows = sorted((flat[i].decode(), flat[i + 1].decode(), flat[i + 2]) for i in range(0, len(flat), 3))
        return State(redis=tuple(rows), sql=self._sql_checksum())

    def _sql_checksum(self) -> str:
        """The checksum, recomputed only when the SQLite files changed (any commit writes the WAL)."""
        stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in self._sql_files if p.exists())
        if stamp != self._sql_stamp or self._sql_sum is None:
            self._sql_stamp, self._sql_sum = stamp, self.sql.checksum()
        return self._sql_sum


def fuzz_host_fixture(tmp_path_factory: pytest.TempPathFactory, _redis_dbs: tuple[int, int]) -> TestHost:
    """A host on this session's first Redis database, flushed, with a key and a long cache TTL.

    Each fuzz module declares it as its module-scoped ``fuzz_host`` fixture."""
    from conftest import _redis_db_url

    url = _redis_db_url(_redis_dbs[0])
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        require(f"Redis at {url}", client.ping)
        client.flushdb()
    finally:
        client.close()
    where = tmp_path_factory.mktemp("fuzz")
    keys_file = where / "keys.json"
    keys_file.write_text(json.dumps(KEYS_FILE))
    return make_host(
        where,
        redis_url=url,
        overrides={
            "server": {
                "api_key": API_KEY,
                "api_keys_file": str(keys_file),
                "max_message_bytes": MAX_MESSAGE_BYTES,
                "deadline_seconds": 2.0,
            },
            # Entries filled from SQL must not expire mid-suite: an expiry is a keyspace change.
            "storage": {"redis_prefix": "fz", "cache_ttl_seconds": 86_400},
        },
    )


@contextlib.contextmanager
def running_hub(host: TestHost, *, with_grpc: bool = False, with_zmq: bool = False) -> Iterator[FuzzHub]:
    hub = FuzzHub(host, with_grpc=with_grpc, with_zmq=with_zmq)
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


# -- the checks every generated request goes through --------------------------------------------

#: docs/architecture.md invariant 8; on ZeroMQ the same names as ``error.code`` (docs/api.md, "Errors").
DOCUMENTED_ERRORS = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
    }
)
REPLY_TIMEOUT_S = 2.0


def shown(value: Any, limit: int = 400) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


class Ledger:
    """The state the hub is in after the last request; counts what was sent."""

    def __init__(self, hub: FuzzHub) -> None:
        self.hub = hub
        self.state = hub.snapshot()
        self.sent = 0
        self.accepted = 0

    def settle(self, *, rejected: bool, read_only: bool) -> str | None:
        """What is wrong with the state after a request: a rejected request (or any read) leaves everything as
        it was; an accepted write sets a new baseline. The baseline is updated either way, so that one
        failure does not make the next request look guilty."""
        self.sent += 1
        self.hub.quiesce()
        before, self.state = self.state, self.hub.snapshot()
        if not (rejected or read_only):
            self.accepted += 1
            return None
        if self.state == before:
            return None
        return f"a {'rejected' if rejected else 'read-only'} request changed state: {before.diff(self.state)}"


class ZmqPeer:
    """A DEALER peer that sends exact frames and waits (bounded) for one reply; reconnects after a timeout."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.zmq = zmq
        self.endpoint = endpoint
        self.ctx = zmq.Context()
        self.sock = self._open()

    def _open(self) -> Any:
        s = self.ctx.socket(self.zmq.DEALER)
        s.setsockopt(self.zmq.LINGER, 0)
        s.connect(self.endpoint)
        return s

    def ask(self, frames: list[bytes], timeout_s: float = REPLY_TIMEOUT_S) -> bytes | None:
        """The reply body to ``[b"", *frames]``, or None (after which the socket is replaced: Lazy Pirate)."""
        self.sock.send_multipart([b"", *frames])
        if self.sock.poll(int(timeout_s * 1000)):
            return bytes(self.sock.recv_multipart()[-1])
        self.sock.close()
        self.sock = self._open()
        return None

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def zmq_verdict(frames: list[bytes], reply: bytes | None) -> tuple[bool, str, dict[str, Any]]:
    """(ok?, code, reply) of a ZeroMQ reply in either schema; fails the test on no reply or a malformed one."""
    assert reply is not None, f"no reply within {REPLY_TIMEOUT_S}s to {shown(frames)}"
    try:
        obj = json.loads(reply.decode("utf-8"))  # strict UTF-8: a reply is valid UTF-8 JSON
    except (UnicodeDecodeError, ValueError) as e:
        raise AssertionError(f"reply is not UTF-8 JSON ({e}): {shown(reply)} to {shown(frames)}") from None
    assert isinstance(obj, dict), f"reply is not an object: {shown(reply)}"
    if obj.get("v") == 1:
        status = obj.get("status")
        assert status in ("ok", "error"), f"v1 reply with status {status!r}: {shown(obj)}"
        if status == "ok":
            return True, "OK", obj
        err = obj.get("error")
        assert isinstance(err, dict) and isinstance(err.get("message"), str), f"malformed error: {shown(obj)}"
        return False, str(err.get("code")), obj
    status = obj.get("status")
    assert status in ("success", "error"), f"v0 reply with status {status!r}: {shown(obj)}"
    if status == "success":
        return True, "OK", obj
    assert isinstance(obj.get("error"), str), f"malformed v0 error: {shown(obj)}"
    return False, str(obj.get("error_code")), obj


def check_zmq(
    ledger: Ledger, peer: ZmqPeer, frames: list[bytes], *, must_fail: bool, read_only: bool, why: Any = ""
) -> tuple[str, dict[str, Any]]:
    """Send one generated request and hold it to the invariants; returns (code, reply)."""
    reply = peer.ask(frames)
    if reply is None and sum(map(len, frames)) > MAX_MESSAGE_BYTES:
        # Documented (docs/api.md, "Limits"): libzmq drops it and disconnects the peer, nothing ran.
        assert not ledger.settle(rejected=True, read_only=True), "a message over the size limit changed state"
        return "DROPPED", {}
    if reply is None:
        ledger.settle(rejected=False, read_only=False)  # unknown outcome: take the state as it is now
    ok, code, obj = zmq_verdict(frames, reply)
    problems = [ledger.settle(rejected=not ok, read_only=read_only)]
    if not ok and code not in DOCUMENTED_ERRORS:
        problems.append(f"undocumented error code {code}")
    if must_fail and ok:
        problems.append("a request that must be refused was accepted")
    found = [p for p in problems if p]
    assert not found, "; ".join(found) + f"\nrequest: {shown(frames)}\nsteps: {why}\nreply: {shown(obj)}"
    return code, obj


def probe_zmq(peer: ZmqPeer) -> None:
    """A well-formed request is still answered, correctly."""
    body = json.dumps(
        {
            "v": 1,
            "id": "probe",
            "action": "get",
            "payload": {"namespace": PROBE_NS, "key": PROBE_KEY},
            "api_key": API_KEY,
        }
    ).encode()
    reply = peer.ask([body])
    assert reply is not None, "the api no longer answers a well-formed request"
    obj = json.loads(reply)
    assert obj["status"] == "ok" and obj["data"]["record"]["payload"]["content"] == "alive", obj
