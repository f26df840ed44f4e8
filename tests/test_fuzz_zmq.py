"""Generative fuzz of the ZeroMQ v1 protocol (docs/api.md): every action, the envelope, whole-body garbage.

Given one api (real Redis + SQLite, a key configured), when hostile requests arrive one at a time,
then each gets a reply within a bounded time, only with a documented error code; a request built
invalid is refused; a refused request (and any read) leaves Redis and SQL exactly as they were;
and a well-formed request is still answered after every example. See tests/fuzz_strategies.py for
the example counts (``MFH_FUZZ_EXAMPLES`` multiplies them) and why CI runs derandomized.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fuzz_harness import (
    API_KEY,
    ELSEWHERE_KEY,
    NS,
    READ_ONLY_KEY,
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
    RAW_SURROGATE,
    Built,
    FieldSpec,
    api_key_variants,
    deep_array,
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
    invalid_payload_texts,
    keyset,
    list_namespaces_fields,
    mutate,
    payload_text,
    raw_tokens,
    search_request,
    valid_keys,
    valid_namespaces,
    valid_payload,
    wrong_type,
)
from hosts import TestHost
from hypothesis import given
from hypothesis import strategies as st

READS = frozenset({"get", "batch_get", "list", "watch", "search", "list_namespaces"})
_FILTERED = frozenset({"search", "list_namespaces"})  # to a key's scope, rather than refused

fuzz_host = pytest.fixture(scope="module", name="fuzz_host")(fuzz_host_fixture)


@dataclass
class Zmq:
    hub: FuzzHub
    peer: ZmqPeer
    ledger: Ledger


@pytest.fixture(scope="module")
def zmq_api(fuzz_host: TestHost) -> Iterator[Zmq]:
    with running_hub(fuzz_host, with_zmq=True) as hub:
        peer = ZmqPeer(hub.zmq_endpoint)
        ledger = Ledger(hub)
        try:
            yield Zmq(hub, peer, ledger)
        finally:
            print(f"\nZeroMQ v1 fuzz: {ledger.sent} requests, {ledger.accepted} accepted")
            peer.close()


# -- payload specs per action --------------------------------------------------------------------

versions_invalid = st.one_of(st.sampled_from([-1, 2**64, 2**63, -(2**63), 10**30]), wrong_type("int", optional=True))
versions_edge = st.sampled_from([0, 1, 5, 2**62, 2**63 - 1, 111_551_774_720_000_000])
durability_invalid = st.one_of(
    st.sampled_from(["PERSISTED", "Accepted", "fast", "", "persisted ", "accepted\x00", None, 1, 2, 3, -1, 99]),
    wrong_type("str"),
)
key_lists_invalid = st.one_of(
    st.lists(valid_keys, max_size=3).flatmap(lambda ks: invalid_keys.map(lambda bad: [*ks, bad])),
    st.lists(wrong_type("str"), min_size=1, max_size=3),
    st.just([f"k{i}" for i in range(1001)]),
    wrong_type("list"),
)


def namespace_spec() -> FieldSpec:
    return FieldSpec(valid_namespaces, invalid_namespaces | wrong_type("str"), required=True)


def key_spec() -> FieldSpec:
    return FieldSpec(valid_keys, invalid_keys | wrong_type("str"), required=True)


def put_spec(kind: str) -> dict[str, FieldSpec]:
    as_text = valid_payload(kind).map(payload_text)
    return {
        "namespace": namespace_spec(),
        "key": key_spec(),
        "kind": FieldSpec(st.just(kind), invalid_kinds | wrong_type("str"), required=True, keep=True),
        "payload": FieldSpec(
            valid_payload(kind) | as_text,
            invalid_payload(kind) | invalid_payload_texts | invalid_payload(kind).map(payload_text),
            edge=edge_payload(kind).map(lambda pair: pair[0]),
            required=True,
        ),
        "expected_version": FieldSpec(st.none(), versions_invalid, edge=versions_edge),
        "durability": FieldSpec(st.just("accepted"), durability_invalid),
    }


@st.composite
def put_payload(draw: st.DrawFn) -> Built:
    return draw(mutate(put_spec(draw(st.sampled_from(KINDS))), extras_forbidden=True))


@st.composite
def batch_put_payload(draw: st.DrawFn) -> Built:
    how = draw(st.sampled_from(["puts", "puts", "puts", "empty", "too_many", "not_list", "mutated"]))
    durability = draw(st.one_of(st.none(), st.just("accepted"), durability_invalid))
    puts: Any
    must_fail = durability is not None and durability != "accepted"
    steps = [f"batch {how}"]
    if how in ("puts", "mutated"):
        built = draw(st.lists(put_payload(), min_size=1, max_size=4))
        puts = [b.obj for b in built]
        must_fail |= any(b.must_fail for b in built)
        must_fail |= keyset(puts, lambda p: (p["namespace"], p["key"]))
        steps += [s for b in built for s in b.steps]
    elif how == "empty":
        puts, must_fail = [], True
    elif how == "too_many":
        puts = [
            {"namespace": NS, "key": f"b{i}", "kind": "memory_item", "payload": {"content": "x"}} for i in range(501)
        ]
        must_fail = True
    else:
        puts, must_fail = draw(wrong_type("list")), True
    obj: dict[str, Any] = {"puts": puts}
    if durability is not None:
        obj["durability"] = durability
    if how == "mutated":
        obj[draw(st.sampled_from(["extra", "put", "namespace"]))] = draw(hostile_values)
        must_fail = True
    return Built(obj, must_fail or has_bad(obj), steps)


PAYLOADS: dict[str, Any] = {
    "get": lambda: mutate({"namespace": namespace_spec(), "key": key_spec()}, extras_forbidden=True),
    "batch_get": lambda: mutate(
        {
            "namespace": namespace_spec(),
            "keys": FieldSpec(st.lists(valid_keys, max_size=5), key_lists_invalid, required=True),
        },
        extras_forbidden=True,
    ),
    "put": put_payload,
    "batch_put": batch_put_payload,
    "delete": lambda: mutate(
        {
            "namespace": namespace_spec(),
            "key": key_spec(),
            "expected_version": FieldSpec(st.none(), versions_invalid, edge=versions_edge),
            "durability": FieldSpec(st.just("accepted"), durability_invalid),
        },
        extras_forbidden=True,
    ),
    "list": lambda: mutate(
        {
            "namespace": namespace_spec(),
            "kind": FieldSpec(
                st.none() | st.sampled_from(KINDS), invalid_kinds.filter(bool) | wrong_type("str", optional=True)
            ),
            "key_prefix": FieldSpec(
                st.sampled_from(["", "s", "h", "n", "a/"]), invalid_keys.filter(bool) | wrong_type("str")
            ),
            "page_size": FieldSpec(
                st.integers(0, 1000),
                st.sampled_from([-1, -(2**63)]) | wrong_type("int"),
                edge=st.sampled_from([1001, 10**9, 2**63, 2**64]),
            ),
            "page_token": FieldSpec(st.just(""), forged_tokens() | wrong_type("str")),
            "include_deleted": FieldSpec(st.booleans(), wrong_type("bool")),
        },
        extras_forbidden=True,
    ),
    "watch": lambda: mutate(
        {
            "namespace": namespace_spec(),
            "key_prefix": FieldSpec(st.sampled_from(["", "s", "a/"]), invalid_keys.filter(bool) | wrong_type("str")),
            # 0 is always served (nothing is pruned here); others may be beyond the log (OUT_OF_RANGE)
            "after_sequence": FieldSpec(
                st.none() | st.just(0),
                st.sampled_from([-1, -(2**63), 2**63, 2**64, 10**30]) | wrong_type("int", optional=True),
                edge=st.sampled_from([1, 10**6, 2**63 - 1]),
            ),
            "max_events": FieldSpec(
                st.integers(0, 1000), st.sampled_from([-1, 1001, 2**63]) | wrong_type("int"), edge=st.just(1000)
            ),
            "wait_ms": FieldSpec(st.sampled_from([0, 1, 20]), st.sampled_from([-1, 300_001]) | wrong_type("int")),
        },
        extras_forbidden=True,
    ),
}

_FILTERS = ("kinds", "tags", "metadata", "updated_after_ms", "updated_before_ms")


def nest_filters(built: Built) -> Built:
    """The ZeroMQ shape of a flat search object: the filter fields under ``filters``."""
    obj = {k: v for k, v in built.obj.items() if k not in _FILTERS}
    filters = {k: v for k, v in built.obj.items() if k in _FILTERS}
    if filters:
        obj["filters"] = filters
    return Built(obj, built.must_fail, built.steps)


PAYLOADS["search"] = lambda: search_request(json_door=True).map(nest_filters)
PAYLOADS["list_namespaces"] = lambda: mutate(list_namespaces_fields(json_door=True), extras_forbidden=True)

ids_valid = st.one_of(st.none(), st.text(max_size=12).filter(lambda s: not has_bad(s)), st.integers(-(2**63), 2**63))
ids_edge = st.sampled_from([10**30, -(10**30), "", "x" * 10_000, "é😀", "\x00"])
ids_invalid = st.one_of(
    st.sampled_from([1.5, True, False, [], {}, ["a"], {"id": 1}]),
    st.sampled_from(["\ud800", "a\udfffb", "\ud83d"]),
)


@st.composite
def v1_request(draw: st.DrawFn, action: str) -> tuple[list[bytes], bool, list[str]]:
    """(frames, must_fail, steps) of one v1 request for ``action``, mutated at every level."""
    payload = draw(PAYLOADS[action]())
    spec = {
        "v": FieldSpec(
            st.just(1),
            st.sampled_from([0, 2, -1, "1", None, [], {}, 2**64, "v1"]),
            edge=st.sampled_from([1.0, True]),
            always=True,
        ),
        "id": FieldSpec(ids_valid, ids_invalid, edge=ids_edge | raw_tokens),
        "action": FieldSpec(
            st.just(action),
            st.sampled_from(["", "GET", "get ", "store", "retrieve", "drop", "batch-get", "list\x00", "\ud800"])
            | wrong_type("str"),
            required=True,
        ),
        "payload": FieldSpec(st.just(payload.obj), wrong_type("dict"), required=True, keep=True),
        "timeout_ms": FieldSpec(
            st.sampled_from([2000, 10_000, 300_000]),
            st.sampled_from([0, -1, 300_001, 2**64, "100", 1.5, True, 10**30]) | wrong_type("int", optional=True),
        ),
    }
    env = draw(mutate(spec, extras_forbidden=True, max_steps=2))
    obj = env.obj
    api_key, key_ok = draw(api_key_variants(writes=action not in READS, filtered=action in _FILTERED))
    if api_key is not ...:
        obj["api_key"] = api_key
    ours = obj.get("payload") is payload.obj
    if "v" not in obj:  # read as v0 now: its own rules (test_fuzz_v0); only what no schema accepts must fail
        must_fail = has_bad(obj) or (not key_ok and api_key not in (READ_ONLY_KEY, ELSEWHERE_KEY))
    else:
        must_fail = env.must_fail or (ours and payload.must_fail) or not key_ok or has_bad(obj)
    steps = [*env.steps, *(payload.steps if ours else []), "right key" if key_ok else f"key {api_key!r:.40}"]
    return [encode_json(obj)], must_fail, steps


@pytest.mark.parametrize(
    "action", ["get", "batch_get", "put", "batch_put", "delete", "list", "watch", "search", "list_namespaces"]
)
@fuzz_settings(200)
@given(data=st.data())
def test_every_v1_action_survives_hostile_requests(zmq_api: Zmq, action: str, data: st.DataObject) -> None:
    frames, must_fail, steps = data.draw(v1_request(action), label="request")
    check_zmq(zmq_api.ledger, zmq_api.peer, frames, must_fail=must_fail, read_only=action in READS, why=steps)
    probe_zmq(zmq_api.peer)


# -- whole messages -----------------------------------------------------------------------------

VALID_GET = encode_json(
    {"v": 1, "id": 1, "action": "get", "payload": {"namespace": NS, "key": "s1"}, "api_key": API_KEY}
)

garbage_bodies = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(
        [
            b"",
            b"null",
            b"[]",
            b"1",
            b'"x"',
            b"{",
            b"\x00",
            b"\xff\xfe{}",
            b"{}",
            b'{"v": 1}',
            b'{"v": 1, "action": "get"}',
            b'{"v": 1, "id": "\xed\xa0\x80", "action": "get"}',
            b'{"v": 1, "id": "\\ud800", "action": "get"}',
            b'{"v": 1, "id": "r", "action": "get", "api_key": "\\udfff"}',
            b'{"v": 1, "id": "r", "action": "get", "api_key": "\xed\xbf\xbf"}',
            VALID_GET.replace(b'"s1"', b'"s\xed\xa0\x801"'),
            VALID_GET.replace(b'"s1"', b'"s\\ud8001"'),
            VALID_GET.replace(b'"s1"', b'"s\xff1"'),
            VALID_GET[:-1],
            VALID_GET + b"x",
            VALID_GET + VALID_GET,
            b'{"v": 1, "v": 2, "action": "get", "payload": {"namespace": "fz", "key": "s1"}}',
        ]
    ),
    st.sampled_from([999, 1000, 1500, 10_000, 200_000]).map(lambda n: b"[" * n + b"]" * n),
    st.sampled_from([999, 1000, 1500, 10_000, 80_000]).map(lambda n: b'{"v":' * n + b"1" + b"}" * n),
    st.sampled_from([1000, 5000, 100_000]).map(
        lambda n: b'{"v": 1, "id": 1, "action": "get", "payload": {"namespace": ' + b"[" * n + b"]" * n + b"}}"
    ),
    st.sampled_from([1000, 5000, 100_000]).map(
        lambda n: b'{"v": 1, "id": ' + b"[" * n + b"]" * n + b', "action": "get"}'
    ),
    # bytes inside the "action" key (at least one: nothing inserted would be the valid request itself)
    st.binary(min_size=1, max_size=50).map(lambda b: VALID_GET[:20] + b + VALID_GET[20:]),
)


@fuzz_settings(300)
@given(body=garbage_bodies, split=st.sampled_from([1, 1, 1, 0, 2, 3]))
def test_whole_body_garbage_and_bad_framing_are_refused(zmq_api: Zmq, body: bytes, split: int) -> None:
    frames = [body] * split  # 0 frames after the delimiter, or several: not one JSON frame
    check_zmq(zmq_api.ledger, zmq_api.peer, frames, must_fail=True, read_only=True, why=f"{split} frame(s)")
    probe_zmq(zmq_api.peer)


# -- the hostile requests of issue 7, always sent (the generated ones reach them only by chance) --


def _b64(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _v1(action: str, payload: dict[str, Any], **envelope: Any) -> bytes:
    return encode_json({"v": 1, "id": "k", "action": action, "payload": payload, "api_key": API_KEY, **envelope})


_NOTE = {"content": "x"}
KNOWN: list[tuple[str, bytes, bool]] = [
    ("id: raw surrogate bytes", VALID_GET.replace(b'"id": 1', b'"id": "\xed\xa0\x80"'), True),
    ("id: escaped lone surrogate", _v1("get", {"namespace": NS, "key": "s1"}, id="\ud800"), True),
    (
        "v0 request_id: escaped lone surrogate",
        encode_json({"action": "get", "key": "s1", "request_id": "\udfff", "api_key": API_KEY}),
        True,
    ),
    (
        "v0 request_id: raw surrogate bytes",
        b'{"action": "get", "key": "s1", "request_id": "\xed\xa0\x80", "api_key": "' + API_KEY.encode() + b'"}',
        True,
    ),
    ("api_key: lone surrogate", _v1("get", {"namespace": NS, "key": "s1"}, api_key="\ud800"), True),
    ("v0 api_key: lone surrogate", encode_json({"action": "get", "key": "s1", "api_key": "\ud800"}), True),
    ("whole body nested 1000 deep", b"[" * 1000 + b"]" * 1000, True),
    ("object body nested 5000 deep", b'{"v":' * 5000 + b"1" + b"}" * 5000, True),
    (
        "payload text nested 1000 deep",
        _v1("put", {"namespace": NS, "key": "n0", "kind": "memory_item", "payload": "[" * 1000 + "]" * 1000}),
        True,
    ),
    (
        "metadata nested 1000 deep",
        _v1(
            "put",
            {
                "namespace": NS,
                "key": "n0",
                "kind": "memory_item",
                "payload": {**_NOTE, "metadata": {"d": deep_array(1000)}},
            },
        ),
        False,
    ),
    (
        "metadata value: lone surrogate",
        _v1(
            "put",
            {"namespace": NS, "key": "n0", "kind": "memory_item", "payload": {**_NOTE, "metadata": {"a": "\ud800"}}},
        ),
        True,
    ),
    (
        "metadata value: raw surrogate bytes",
        _v1(
            "put",
            {
                "namespace": NS,
                "key": "n0",
                "kind": "memory_item",
                "payload": {**_NOTE, "metadata": {"a": RAW_SURROGATE}},
            },
        ),
        True,
    ),
    (
        "v0 value metadata: lone surrogate",
        encode_json(
            {"action": "store", "key": "n0", "api_key": API_KEY, "value": {**_NOTE, "metadata": {"\ud800": 1}}}
        ),
        True,
    ),
    (
        "page_token nested 1000 deep",
        _v1("list", {"namespace": NS, "page_token": _b64(b"[" * 1000 + b"]" * 1000)}),
        True,
    ),
    (
        "page_token after-key: lone surrogate",
        _v1("list", {"namespace": NS, "page_token": _b64(b'{"a": "\\ud800", "s": ["fz", "", "", false]}')}),
        True,
    ),
    (
        "v0 cursor nested 1000 deep",
        encode_json({"action": "list", "api_key": API_KEY, "cursor": _b64(b"{" * 0 + b"[" * 1000 + b"]" * 1000)}),
        True,
    ),
]


@pytest.mark.parametrize(("name", "body", "must_fail"), KNOWN, ids=[k[0] for k in KNOWN])
def test_known_hostile_requests(zmq_api: Zmq, name: str, body: bytes, must_fail: bool) -> None:
    read_only = b'"put"' not in body and b'"store"' not in body
    check_zmq(zmq_api.ledger, zmq_api.peer, [body], must_fail=must_fail, read_only=read_only, why=name)
    probe_zmq(zmq_api.peer)
