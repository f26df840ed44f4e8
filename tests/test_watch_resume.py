"""A Watch that resumes: after a sequence of the event log (backfill, then live; no gap, no duplicate), on both
transports and in all four clients, by itself across an api restart; positions it cannot serve are refused."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import zmq
import zmq.asyncio
from hosts import TestHost, make_host
from services import async_wait_until, free_port, tcp_open

from mfh_api.grpc_server import GrpcServer
from mfh_api.service import Durability, MemoryService, PutSpec, build_service
from mfh_api.zmq_server import ZmqServer
from mfh_client import AsyncMemoryClient, AsyncZmqClient, Client, MemoryClient, OutOfRange, ZmqClient
from mfh_client.proto import pb, pb_grpc
from mfh_core import SqlStore
from mfh_models import InvalidArgument, Kind, MemoryEvent, Op, WatchedEvent

NS = "agents"


@dataclass
class Hub:
    host: TestHost
    service: MemoryService
    grpc_target: str
    zmq_endpoint: str

    async def write(self, *keys: str) -> None:
        """Each key in its own persisted put, so each is one event of the log, in this order."""
        if not self.host.procs:  # the worker starts with the first write: tests that write nothing are quick
            self.host.start_worker(threads=2)
        for k in keys:
            spec = PutSpec(NS, k, "memory_item", {"content": f"note {k}"})
            await self.service.put(spec, durability=Durability.PERSISTED, timeout=30)


@pytest.fixture
async def hub(tmp_path: Path, redis_url: str) -> AsyncIterator[Hub]:
    host = make_host(
        tmp_path, redis_url=redis_url, overrides={"storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"}}
    )
    host.start_worker(threads=2)
    service = await build_service(host.settings)
    grpc_server = GrpcServer(service, host.settings)
    await grpc_server.start()
    zmq_server = ZmqServer.from_settings(service, host.settings)
    await zmq_server.start()
    try:
        yield Hub(host, service, f"127.0.0.1:{grpc_server.port}", zmq_server.endpoint)
    finally:
        await zmq_server.close()
        await grpc_server.stop(grace=1)
        await service.close()
        host.stop_all()


CLIENTS = ["grpc", "grpc-async", "zmq", "zmq-async"]


def _client(hub: Hub, which: str) -> Any:
    target = hub.zmq_endpoint if which.startswith("zmq") else hub.grpc_target
    cls = {"grpc": MemoryClient, "grpc-async": AsyncMemoryClient, "zmq": ZmqClient, "zmq-async": AsyncZmqClient}
    return cls[which](target, timeout=5.0)


class Collector:
    """Consumes one client's Watch (a thread for the blocking clients) into ``events``, up to ``limit`` of them."""

    def __init__(self, client: Any, key_prefix: str, after: int | None, limit: int = 1000) -> None:
        self.client, self.prefix, self.after, self.limit = client, key_prefix, after, limit
        self.events: list[WatchedEvent] = []
        self.error: BaseException | None = None
        self._task: asyncio.Future[None] | None = None

    def start(self) -> Collector:
        if isinstance(self.client, Client):
            self._task = asyncio.ensure_future(asyncio.to_thread(self._run_sync))
        else:
            self._task = asyncio.ensure_future(self._run_async())
        return self

    def _run_sync(self) -> None:
        it = self.client.watch(NS, self.prefix, after_sequence=self.after)
        try:
            for ev in it:
                self.events.append(ev)
                if len(self.events) >= self.limit:
                    return
        except BaseException as e:
            self.error = e
        finally:
            it.close()

    async def _run_async(self) -> None:
        try:
            async for ev in self.client.watch(NS, self.prefix, after_sequence=self.after):
                self.events.append(ev)
                if len(self.events) >= self.limit:
                    return
        except Exception as e:
            self.error = e

    async def until(self, n: int, timeout: float = 30.0) -> list[WatchedEvent]:  # noqa: ASYNC109
        def enough() -> bool:
            if self.error is not None:
                raise AssertionError(f"the watch failed: {self.error!r}")
            return len(self.events) >= n

        await async_wait_until(enough, timeout, message=f"{n} watch events (got {len(self.events)})")
        return self.events

    async def close(self) -> None:
        """Ends an asyncio watch; a blocking one must have reached its limit (a thread cannot be cancelled)."""
        assert self._task is not None
        if isinstance(self.client, Client):
            await asyncio.wait_for(self._task, 10)
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 10)


async def _close(client: Any) -> None:
    done = client.close()
    if asyncio.iscoroutine(done):
        await done


def keys(events: list[WatchedEvent]) -> list[str]:
    return [e.key for e in events]


def _assert_log_order(events: list[WatchedEvent]) -> None:
    seqs = [e.sequence for e in events]
    assert seqs == sorted(set(seqs)), f"sequences not strictly increasing: {seqs}"


# -- resume after N events ------------------------------------------------------------------------


@pytest.mark.parametrize("which", CLIENTS)
async def test_a_watch_resumed_after_n_events_gets_exactly_the_rest_then_goes_live(hub: Hub, which: str) -> None:
    # Given six changes under w/, with others around them (another prefix, another namespace)
    await hub.write("w/0", "x/0", "w/1", "w/2")
    await hub.service.put(
        PutSpec("other", "w/9", "memory_item", {"content": "elsewhere"}), durability=Durability.PERSISTED
    )
    await hub.write("w/3", "w/4")
    await hub.service.delete(NS, "w/1", durability=Durability.PERSISTED)
    client = _client(hub, which)
    try:
        # When a watch from the start of the log reads them, and a second one resumes after the third
        first = Collector(client, "w/", 0, limit=6).start()
        everything = (await first.until(6))[:6]
        await first.close()
        assert keys(everything) == ["w/0", "w/1", "w/2", "w/3", "w/4", "w/1"]
        assert everything[-1].op is Op.DELETE and everything[0].op is Op.PUT
        _assert_log_order(everything)
        resumed = Collector(client, "w/", everything[2].sequence, limit=6).start()
        backfill = await resumed.until(3)
        # Then it gets exactly the three after it, with the same sequences
        assert [(e.key, e.sequence) for e in backfill] == [(e.key, e.sequence) for e in everything[3:]]
        # And then the live changes, each once, right after the backfill
        await hub.write("w/5", "x/1", "w/6")
        got = await resumed.until(5)
        await hub.write("w/7")
        got = await resumed.until(6)
        await resumed.close()
        assert keys(got) == ["w/3", "w/4", "w/1", "w/5", "w/6", "w/7"]
        _assert_log_order(got)
        assert json.loads(got[3].payload)["content"] == "note w/5"
    finally:
        await _close(client)


@pytest.mark.parametrize("which", ["grpc-async", "zmq"])
async def test_a_watch_from_now_sees_only_what_is_committed_after_it_started(hub: Hub, which: str) -> None:
    await hub.write("w/old")
    client = _client(hub, which)
    try:
        watch = Collector(client, "w/", None, limit=1).start()
        # (the ZeroMQ client's first poll asks where now is; its second one waits, subscribed, for a change)
        await async_wait_until(lambda: len(hub.service.feed._watchers) >= 1, 10, message="watching")
        await hub.write("w/new")
        got = await watch.until(1)
        await watch.close()
        assert keys(got) == ["w/new"]
    finally:
        await _close(client)


# -- positions the log cannot serve -----------------------------------------------------------------


@pytest.mark.parametrize("which", CLIENTS)
async def test_a_position_beyond_the_log_is_out_of_range_and_not_retried(hub: Hub, which: str) -> None:
    client = _client(hub, which)
    try:
        watch = Collector(client, "w/", 10_000).start()
        await async_wait_until(lambda: watch.error is not None, 10, message="the watch refused")
        await watch.close()
        assert isinstance(watch.error, OutOfRange), repr(watch.error)
        assert "beyond this host's event log" in watch.error.message
        assert client.failovers == 0
    finally:
        await _close(client)


async def test_a_pruned_position_is_out_of_range_and_the_oldest_kept_one_resumes(hub: Hub) -> None:
    # Given five changes of which the two oldest were pruned
    await hub.write("w/0", "w/1", "w/2", "w/3", "w/4")
    seqs = [s for s, _ in hub.service.sql.iter_events()]
    assert list(hub.service.sql.prune_events(below_seq=seqs[2]))
    client = AsyncMemoryClient(hub.grpc_target, timeout=5.0)
    try:
        # When a watch resumes after a pruned event, Then OUT_OF_RANGE says to list again
        for after in (0, seqs[0]):
            with pytest.raises(OutOfRange, match="pruned"):
                async for _ in client.watch(NS, after_sequence=after):
                    pass
        # And one that resumes right before the oldest kept event gets it and the rest
        watch = Collector(client, "", seqs[1], limit=3).start()
        got = await watch.until(3)
        await watch.close()
        assert keys(got) == ["w/2", "w/3", "w/4"]
    finally:
        await client.close()


async def test_bad_positions_on_the_wire_are_refused_with_the_documented_codes(hub: Hub) -> None:
    await hub.write("w/0")
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(hub.zmq_endpoint)

    async def zmq_watch(payload: dict[str, Any]) -> dict[str, Any]:
        body = {"v": 1, "id": "w", "action": "watch", "payload": {"namespace": NS, **payload}}
        await sock.send_multipart([b"", json.dumps(body).encode()])
        assert await sock.poll(10_000), "no reply"
        reply = json.loads((await sock.recv_multipart())[-1])
        assert isinstance(reply, dict)
        return reply

    try:
        for bad in ({"after_sequence": -1}, {"after_sequence": 1 << 63}, {"after_sequence": "1"}, {"max_events": 1001}):
            reply = await zmq_watch(bad)
            assert reply["status"] == "error" and reply["error"]["code"] == "INVALID_ARGUMENT", (bad, reply)
        reply = await zmq_watch({"after_sequence": 99_999})
        assert reply["error"]["code"] == "OUT_OF_RANGE", reply
        # A first poll without a position answers at once with where now is; one after it waits for a change
        now = await zmq_watch({"wait_ms": 5000})
        assert now["status"] == "ok" and now["data"]["events"] == [] and now["data"]["next_sequence"] > 0
        quiet = await zmq_watch({"after_sequence": now["data"]["next_sequence"], "wait_ms": 200})
        assert quiet["data"] == {"events": [], "next_sequence": now["data"]["next_sequence"]}
    finally:
        ctx.destroy(linger=0)

    async with grpc.aio.insecure_channel(hub.grpc_target) as ch:
        stub = pb_grpc.MemoryFusionStub(ch)
        call = stub.Watch(pb.WatchRequest(namespace=NS, after_sequence=99_999), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call:
                pass
        assert e.value.code() is grpc.StatusCode.OUT_OF_RANGE
        # With send_progress, the first message is the position the stream starts from
        call = stub.Watch(pb.WatchRequest(namespace=NS, send_progress=True), timeout=10)
        first = await anext(aiter(call))
        call.cancel()
        assert not first.HasField("record") and first.op == "" and first.sequence == now["data"]["next_sequence"]


def _event(i: int, ns: str) -> MemoryEvent:
    return MemoryEvent(
        event_id=f"main_pc-{i}", op=Op.PUT, namespace=ns, key=f"k{i}", kind=Kind.MEMORY_ITEM,
        payload='{"content":"x","schema_version":1}', version=i, origin="main_pc", created_at=1,
    )  # fmt: skip


def test_a_log_read_is_bounded_by_its_page_and_its_window(db_url: str) -> None:
    # Given a log of eight events, namespace a at the 1st, 3rd, 5th and 7th, namespace b in between
    sql = SqlStore(db_url)
    sql.create_schema()
    try:
        for i in range(1, 9):
            sql.apply_batch([_event(i, "a" if i % 2 else "b")])
        seq = {e.key: s for s, e in sql.iter_events()}
        base = seq["k1"] - 1
        # When reads go on from where the last one stopped, Then each sees at most its page and window
        page = sql.watch_page("a", "", base, limit=10, window=4)
        assert [e.key for _, e in page.events] == ["k1", "k3"] and page.scanned_to == seq["k4"]
        assert page.head == seq["k8"] and page.oldest == seq["k1"]
        page = sql.watch_page("a", "", page.scanned_to, limit=1, window=100)
        assert [e.key for _, e in page.events] == ["k5"] and page.scanned_to == seq["k5"]
        page = sql.watch_page("a", "k7", page.scanned_to, limit=10, window=100)
        assert [e.key for _, e in page.events] == ["k7"] and page.scanned_to == seq["k8"]
        assert sql.watch_page("a", "", seq["k8"], limit=10, window=100).events == []
    finally:
        sql.close()


def test_on_postgres_a_read_waits_for_a_lower_sequence_still_committing(postgres_url: str) -> None:
    import psycopg2

    from mfh_core.sqlstore import _WRITE_FENCE

    # Given a write transaction that took a sequence number and has not committed, and a later one that has
    sql = SqlStore(postgres_url)
    sql.create_schema()
    slow = psycopg2.connect(postgres_url)
    try:
        cur = slow.cursor()
        cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (_WRITE_FENCE,))
        e = _event(1, "a")
        cur.execute(
            "INSERT INTO events (event_id, op, namespace, key, kind, payload, version, origin, created_at,"
            " schema_version, published) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, false) RETURNING seq",
            (e.event_id, e.op.value, e.namespace, e.key, e.kind.value, e.payload, e.version, e.origin, 1, 1),
        )
        row = cur.fetchone()
        assert row is not None
        low = row[0]
        sql.apply_batch([_event(2, "a")])
        # When a Watch reads the log meanwhile
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            read = pool.submit(sql.watch_page, "a", "", 0, limit=10, window=100)
            with pytest.raises(concurrent.futures.TimeoutError):
                read.result(timeout=0.5)  # it waits at the fence (nothing to await: the point is that it waits)
            slow.commit()
            page = read.result(timeout=10)
        # Then it sees the lower sequence too, before the higher one: resuming after it skips nothing
        assert [(s, ev.key) for s, ev in page.events] == [(low, "k1"), (low + 1, "k2")]
    finally:
        slow.close()
        sql.close()


# -- an api restarted under a watching client ----------------------------------------------------------


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str) -> Iterator[list[TestHost]]:
    """Two api configs of one host (same Redis, SQLite file and queue), each on its own ports."""
    shared = {
        "storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"},
        "write_behind": {"queue_name": f"t_{uuid.uuid4().hex[:8]}"},
    }
    hosts = [
        make_host(
            tmp_path / name,
            redis_url=redis_url,
            database_url=f"sqlite:///{tmp_path}/shared.db",
            overrides={**shared, "server": {"grpc_port": free_port(), "zmq_port": free_port()}},
        )
        for name in ("a", "b")
    ]
    yield hosts
    for h in hosts:
        h.stop_all()


async def _api_up(h: TestHost) -> None:
    for port in (h.settings.server.grpc_port, h.settings.server.zmq_port):
        await async_wait_until(lambda p=port: tcp_open("127.0.0.1", p), 30, message=f"api on {port}\n{h.log('api')}")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["grpc-async", "zmq-async", "grpc-async-failover"])
async def test_a_watching_client_resumes_by_itself_across_an_api_sigkill_and_sees_every_event_once(
    replicas: list[TestHost], which: str
) -> None:
    # Given two api replicas of one host, a worker, a client watching on replica a, a writer on replica b
    a, b = replicas
    api_a = a.spawn("mfh_api.app", log_name="api")
    b.spawn("mfh_api.app", log_name="api")
    a.start_worker(threads=2)
    await asyncio.gather(_api_up(a), _api_up(b))
    s = a.settings.server
    # (the failover client knows both replicas: it goes on on b while a is down)
    clients: dict[str, Callable[[], Any]] = {
        "grpc-async": lambda: AsyncMemoryClient(f"127.0.0.1:{s.grpc_port}", timeout=2.0),
        "zmq-async": lambda: AsyncZmqClient(f"tcp://127.0.0.1:{s.zmq_port}", timeout=2.0),
        "grpc-async-failover": lambda: AsyncMemoryClient(
            [f"127.0.0.1:{s.grpc_port}", f"127.0.0.1:{b.settings.server.grpc_port}"], timeout=2.0
        ),
    }
    watcher = clients[which]()
    writer = AsyncMemoryClient(f"127.0.0.1:{b.settings.server.grpc_port}", timeout=10.0, retries=5)

    async def write(*ks: str) -> None:
        for k in ks:
            await writer.put(PutSpec(NS, k, "memory_item", {"content": k}), durability=Durability.PERSISTED)

    watch = Collector(watcher, "r/", 0).start()
    try:
        await write("r/0", "r/1", "r/2")
        await watch.until(3)
        # When replica a is SIGKILLed, changes are committed while it is down, and it is started again
        a.kill(api_a, signal.SIGKILL)
        await write("r/3", "r/4", "r/5")
        a.spawn("mfh_api.app", log_name="api")
        await _api_up(a)
        await write("r/6", "r/7")
        # Then the client, reconnected by itself, has every change exactly once, in log order
        got = await watch.until(8, timeout=60)
        await write("r/8")
        got = await watch.until(9)
        assert keys(got) == [f"r/{i}" for i in range(9)], keys(got)
        _assert_log_order(got)
        assert watcher.failovers >= 1
    finally:
        await watch.close()
        await _close(watcher)
        await writer.close()


async def test_invalid_argument_in_a_watch_is_not_retried(hub: Hub) -> None:
    client = AsyncZmqClient(hub.zmq_endpoint, timeout=2.0)
    try:
        with pytest.raises(InvalidArgument):
            async for _ in client.watch("bad namespace!"):
                pass
        assert client.failovers == 0
    finally:
        client.close()
