"""The api's event loop (``server.event_loop``, docs/operations.md): uvloop when it is installed, asyncio's
own when asked; both doors serve on either."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path

import pytest
from hosts import make_host
from services import async_wait_until

from mfh_api.app import loop_factory
from mfh_client import AsyncMemoryClient, AsyncZmqClient
from mfh_client.types import PutSpec
from mfh_models import ConfigError

_READY = r'"api ready".*"grpc_port": (\d+), "zmq_port": (\d+).*"event_loop": "(\w+)"'


@pytest.mark.parametrize(("choice", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio")])
async def test_the_api_process_runs_the_loop_it_was_given_and_serves_both_doors(
    tmp_path: Path, redis_url: str, choice: str, expected: str
) -> None:
    # Given an api process (the server extra installed: uvloop is there) with server.event_loop set
    pytest.importorskip("uvloop")
    overrides = {"server": {"event_loop": choice}, "storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"}}
    h = make_host(tmp_path, redis_url=redis_url, overrides=overrides)
    api = h.spawn("mfh_api.app", log_name="api")
    try:
        ready = await async_wait_until(lambda: re.search(_READY, h.log("api")), 60, 0.1, "api ready")
        # Then its ready line names the loop it runs on
        assert ready.group(3) == expected
        # And a write over gRPC reads back over gRPC and over ZeroMQ (the near cache's path included)
        async with AsyncMemoryClient([f"127.0.0.1:{ready.group(1)}"]) as grpc_client:
            await grpc_client.put(PutSpec("loop", "k", "memory_item", {"content": choice}))
            for _ in range(3):
                assert (await grpc_client.get("loop", "k")).payload_obj()["content"] == choice
        async with AsyncZmqClient(f"tcp://127.0.0.1:{ready.group(2)}", timeout=10) as zmq_client:
            for _ in range(3):
                assert (await zmq_client.get("loop", "k")).payload_obj()["content"] == choice
    finally:
        h.kill(api)


def test_uvloop_is_refused_by_name_without_it_and_skipped_by_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a Python where uvloop cannot be imported
    monkeypatch.setitem(sys.modules, "uvloop", None)
    # Then auto falls back to asyncio's loop, asking for uvloop by name is a configuration error
    assert loop_factory("auto") is None
    assert loop_factory("asyncio") is None
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loop_factory("uvloop")
