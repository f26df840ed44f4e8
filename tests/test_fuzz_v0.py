"""Generative fuzz of the legacy v0 schema on ZeroMQ (docs/v0_schema.md): every action and alias.

Given one api with a key, when hostile flat v0 requests arrive, then each is answered in time with
a documented ``error_code``; a request with a bad value in a field its action uses is refused; a
refused request (and any read) changes nothing; a well-formed request is answered afterwards.
Fields an action does not use are ignored by the schema, so hostile values there are "may be
valid": they only have to get a documented answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fuzz_harness import (
    FuzzHub,
    Ledger,
    ZmqPeer,
    check_zmq,
    fuzz_host_fixture,
    probe_zmq,
    running_hub,
)
from fuzz_strategies import (
    KINDS,
    FieldSpec,
    api_key_variants,
    edge_payload,
    encode_json,
    forged_tokens,
    fuzz_settings,
    has_bad,
    hostile_values,
    invalid_keys,
    invalid_kinds,
    invalid_namespaces,
    invalid_payload,
    mutate,
    raw_tokens,
    valid_keys,
    valid_namespaces,
    valid_payload,
    wrong_type,
)
from hosts import TestHost
from hypothesis import given
from hypothesis import strategies as st

V0_READS = frozenset({"get", "retrieve", "batch_get", "list"})
ALL_FIELDS = ("namespace", "key", "keys", "kind", "value", "expected_version", "prefix", "limit", "cursor")

fuzz_host = pytest.fixture(scope="module", name="fuzz_host")(fuzz_host_fixture)


@pytest.fixture(scope="module")
def v0_api(fuzz_host: TestHost) -> Iterator[tuple[FuzzHub, ZmqPeer, Ledger]]:
    with running_hub(fuzz_host, with_zmq=True) as hub:
        peer = ZmqPeer(hub.zmq_endpoint)
        ledger = Ledger(hub)
        try:
            yield hub, peer, ledger
        finally:
            print(f"\nZeroMQ v0 fuzz: {ledger.sent} requests, {ledger.accepted} accepted")
            peer.close()


version_invalid = st.one_of(st.sampled_from([-1, -(2**63), 2**64, 2**63]), wrong_type("int", optional=True))
version_edge = st.sampled_from([0, 1, 2**63 - 1, 111_551_774_720_000_000])


def used_fields(action: str, kind: str) -> dict[str, FieldSpec]:
    """The fields ``action`` reads, with their valid, invalid and hostile-but-maybe-valid values."""
    ns = FieldSpec(valid_namespaces, invalid_namespaces | wrong_type("str"), edge=st.just("default"))
    key = FieldSpec(valid_keys, invalid_keys | wrong_type("str"), required=True)
    if action in ("get", "retrieve"):
        return {"namespace": ns, "key": key}
    if action == "batch_get":
        keys_invalid = st.one_of(
            st.lists(valid_keys, max_size=2).flatmap(lambda ks: invalid_keys.map(lambda b: [*ks, b])),
            st.just([f"k{i}" for i in range(1001)]),
            wrong_type("list"),
            st.lists(wrong_type("str"), min_size=1, max_size=2),
        )
        return {"namespace": ns, "keys": FieldSpec(st.lists(valid_keys, max_size=5), keys_invalid, required=True)}
    if action in ("put", "store"):
        return {
            "namespace": ns,
            "key": key,
            "kind": FieldSpec(
                st.just(kind), invalid_kinds | wrong_type("str"), always=kind != "memory_item", keep=True
            ),
            "value": FieldSpec(
                valid_payload(kind),
                invalid_payload(kind) | wrong_type("dict").filter(lambda v: v is not None),
                edge=edge_payload(kind).map(lambda pair: pair[0]),
                required=True,
            ),
            "expected_version": FieldSpec(st.none(), version_invalid, edge=version_edge),
        }
    if action == "delete":
        return {
            "namespace": ns,
            "key": key,
            "expected_version": FieldSpec(st.none(), version_invalid, edge=version_edge),
        }
    return {  # list
        "namespace": ns,
        "prefix": FieldSpec(st.sampled_from(["", "s", "h", "n"]), invalid_keys.filter(bool) | wrong_type("str")),
        "limit": FieldSpec(
            st.integers(1, 1000),
            st.sampled_from([0, -1, -(2**63)]) | wrong_type("int").filter(lambda v: v is not None),
            edge=st.sampled_from([1001, 10**9, 2**63, 2**64]),
        ),
        "cursor": FieldSpec(st.none(), forged_tokens() | wrong_type("str", optional=True)),
        "include_deleted": FieldSpec(st.booleans(), wrong_type("bool")),
    }


@st.composite
def v0_request(draw: st.DrawFn, action: str) -> tuple[list[bytes], bool, list[str]]:
    kind = draw(st.sampled_from(KINDS))
    spec = used_fields(action, kind)
    spec["action"] = FieldSpec(
        st.just(action),
        st.sampled_from(["", "GET", "get ", "batch_put", "fetch", "\ud800", "store\x00"]) | wrong_type("str"),
        required=True,
    )
    spec["request_id"] = FieldSpec(
        st.none() | st.text(max_size=10).filter(lambda s: not has_bad(s)) | st.integers(),
        st.sampled_from([1.5, True, [], {}, "\ud800", "a\udfffb"]),
        edge=st.sampled_from([10**30, "", "x" * 10_000, "é😀"]) | raw_tokens,
    )
    built = draw(mutate(spec, extras_forbidden=False))
    obj = built.obj
    # Fields this action does not use, and unknown ones: ignored by the schema, whatever they hold.
    for name in draw(st.lists(st.sampled_from([*(f for f in ALL_FIELDS if f not in spec), "agent", "v0"]), max_size=2)):
        obj[name] = draw(hostile_values)
        built.steps.append(f"unused {name!r}")
    api_key, key_ok = draw(api_key_variants(writes=action in ("put", "store", "delete")))
    if api_key is not ...:
        obj["api_key"] = api_key
    must_fail = built.must_fail or not key_ok or has_bad(obj)
    built.steps.append("right key" if key_ok else f"key {api_key!r:.40}")
    return [encode_json(obj)], must_fail, built.steps


@pytest.mark.parametrize("action", ["get", "retrieve", "batch_get", "put", "store", "delete", "list"])
@fuzz_settings(70)
@given(data=st.data())
def test_every_v0_action_survives_hostile_requests(
    v0_api: tuple[FuzzHub, ZmqPeer, Ledger], action: str, data: st.DataObject
) -> None:
    _hub, peer, ledger = v0_api
    frames, must_fail, steps = data.draw(v0_request(action), label="request")
    check_zmq(ledger, peer, frames, must_fail=must_fail, read_only=action in V0_READS, why=steps)
    probe_zmq(peer)


@fuzz_settings(60)
@given(obj=st.dictionaries(st.sampled_from([*ALL_FIELDS, "request_id", "api_key", "x"]), hostile_values, max_size=6))
def test_v0_requests_without_a_valid_action_are_refused(v0_api: tuple[FuzzHub, ZmqPeer, Ledger], obj: Any) -> None:
    _hub, peer, ledger = v0_api
    check_zmq(ledger, peer, [encode_json(obj)], must_fail=True, read_only=True, why="no action")
    probe_zmq(peer)
