"""The blueprint's load test: single gRPC Gets at 1,000/s in total, headless, for a fixed run time.

Each Locust user holds one gRPC channel and sends ``Get(namespace, key)`` for keys ``k0`` ..
``k{--mfh-keys - 1}`` in turn, paced so that all users together offer ``--mfh-rate`` Gets per
second (``constant_throughput``). The target is ``--host HOST:PORT``: a running api's gRPC port.
A reply with a gRPC error (NOT_FOUND included) counts as a failure. The blueprint's bar: p95 <= 20 ms.

    .venv/bin/locust -f bench/locustfile.py --headless -u 50 -r 50 --run-time 60s \\
        --host 127.0.0.1:5713 --mfh-rate 1000 --csv var/bench/locust

``bench/locust_run.py`` starts an api with seeded keys (and the naive peer beside it), runs this
file against each and prints the p95 as ``name=value``.
"""

from __future__ import annotations

import time
from typing import Any

import gevent  # type: ignore[import-untyped]
import grpc
import grpc.experimental.gevent as grpc_gevent  # type: ignore[import-not-found]
from locust import User, constant_throughput, events, task
from locust.env import Environment

from mfh_client.proto import pb, pb_grpc
from mfh_client.types import API_KEY_METADATA

# Locust has monkey-patched the standard library on import; gRPC's C core must yield to gevent too
# (before any channel exists), or one blocking call would stall every user in the process.
grpc_gevent.init_gevent()


@events.init.add_listener  # type: ignore[untyped-decorator]
def _fresh_clock(**_kwargs: Any) -> None:
    # gevent's loop caches "now": after seconds of imports without a yield it lags, and Locust's
    # --run-time timer (armed right after this event) would then fire that much early.
    gevent.get_hub().loop.update_now()


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    parser.add_argument("--mfh-rate", type=float, default=1000.0, help="Gets per second offered by all users")
    parser.add_argument("--mfh-namespace", default="bench", help="namespace of the keys read")
    parser.add_argument("--mfh-keys", type=int, default=1000, help="keys k0..k{N-1} are read in turn")
    parser.add_argument("--mfh-api-key", default="", help="sent as gRPC metadata when set")
    parser.add_argument("--mfh-timeout", type=float, default=5.0, help="per-call deadline, seconds")


class GrpcGetUser(User):
    """One channel, single Gets, paced to its share of ``--mfh-rate``."""

    abstract = False

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        opts = environment.parsed_options
        assert opts is not None, "run by locust, which parses the options first"
        if not self.host:
            raise ValueError("--host HOST:PORT (the api's gRPC address) is required")
        self.namespace: str = opts.mfh_namespace
        self.keys: int = opts.mfh_keys
        self.timeout: float = opts.mfh_timeout
        self.metadata = ((API_KEY_METADATA, opts.mfh_api_key),) if opts.mfh_api_key else ()
        self.channel = grpc.insecure_channel(self.host.removeprefix("grpc://"))
        self.stub = pb_grpc.MemoryFusionStub(self.channel)
        if opts.mfh_rate <= 0:
            raise ValueError(f"--mfh-rate must be positive, not {opts.mfh_rate}")
        # This user's share of the rate; constant_throughput keeps its pacing state on the user.
        self._pace = constant_throughput(opts.mfh_rate / max(1, opts.num_users or 1))
        self.i = 0

    def wait_time(self) -> float:
        return float(self._pace(self))

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def get(self) -> None:
        key = f"k{self.i % self.keys}"
        self.i += 1
        start = time.perf_counter()
        exc: Exception | None = None
        length = 0
        try:
            reply = self.stub.Get(
                pb.GetRequest(namespace=self.namespace, key=key), timeout=self.timeout, metadata=self.metadata
            )
            length = reply.ByteSize()
        except grpc.RpcError as e:
            exc = e
        events.request.fire(  # type: ignore[no-untyped-call]
            request_type="grpc",
            name="Get",
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=exc,
            context={},
        )
