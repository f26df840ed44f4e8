"""Generative fuzz of the gRPC door: every MemoryFusion method, Health (Check, List, Watch), reflection.

Requests travel as bytes over a raw channel (identity serializers), so the same test sends a
well-typed message, a message with hostile values, and malformed protobuf (invalid UTF-8 in a
string field, wrong wire types, unknown fields, truncations, random bytes). Given one api with a
key, then every call ends with OK or a documented status (docs/architecture.md invariant 8: never INTERNAL
or UNKNOWN); a request built invalid (bad value, bad key, an enum value the proto does not define,
invalid UTF-8) is refused; a refused call, and any read, changes nothing in Redis or SQL; and the
api still answers a well-formed call after each example. A stream that was accepted runs until the
client's short deadline (DEADLINE_EXCEEDED is then the client's own doing).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from fuzz_harness import (
    API_KEY,
    DOCUMENTED_ERRORS,
    NS,
    PROBE_KEY,
    PROBE_NS,
    FuzzHub,
    Ledger,
    fuzz_host_fixture,
    running_hub,
    shown,
)
from fuzz_strategies import (
    KINDS,
    FieldSpec,
    api_key_variants,
    edge_payload,
    forged_tokens,
    fuzz_settings,
    has_bad,
    invalid_keys,
    invalid_kinds,
    invalid_namespaces,
    invalid_payload,
    invalid_payload_texts,
    keyset,
    list_namespaces_fields,
    mutate,
    payload_text,
    search_request,
    valid_keys,
    valid_namespaces,
    valid_payload,
)
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hosts import TestHost
from hypothesis import given
from hypothesis import strategies as st

from mfh_api.proto import pb

fuzz_host = pytest.fixture(scope="module", name="fuzz_host")(fuzz_host_fixture)

UNARY_DEADLINE_S = 5.0
STREAM_DEADLINE_S = 0.25
SERVICE = "/mfh.v1.MemoryFusion/"
HEALTH = "/grpc.health.v1.Health/"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
WRITES = frozenset({"Put", "BatchPut", "Delete"})


@dataclass
class Grpc:
    hub: FuzzHub
    channel: grpc.Channel
    ledger: Ledger


@pytest.fixture(scope="module")
def grpc_api(fuzz_host: TestHost) -> Iterator[Grpc]:
    with running_hub(fuzz_host, with_grpc=True) as hub:
        channel = grpc.insecure_channel(
            hub.grpc_target, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        )
        ledger = Ledger(hub)
        try:
            yield Grpc(hub, channel, ledger)
        finally:
            print(f"\ngRPC fuzz: {ledger.sent} requests, {ledger.accepted} accepted")
            channel.close()


# -- protobuf at the wire level ------------------------------------------------------------------


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def length_delimited(number: int, data: bytes) -> bytes:
    return tag(number, 2) + varint(len(data)) + data


BAD_UTF8 = [b"\xed\xa0\x80", b"a\xed\xbf\xbfb", b"\xff", b"\xc3", b"\xc0\x80", b"\xf4\x90\x80\x80"]

#: Where a string lives in each request, as a path of field numbers (a nested message's field last).
STRING_PATHS: dict[str, list[tuple[int, ...]]] = {
    "Get": [(1,), (2,)],
    "BatchGet": [(1,), (2,)],
    "Put": [(1, 1), (1, 2), (1, 3), (1, 4), (1, 6)],
    "BatchPut": [(1, 1, 1), (1, 1, 4)],
    "Delete": [(1,), (2,)],
    "List": [(1,), (2,), (3,), (5,)],
    "Watch": [(1,), (2,)],
    "Search": [(1,), (2,), (3,), (4, 1), (4, 2), (4, 3, 1), (4, 3, 2), (4, 3, 3)],
    "ListNamespaces": [(1,), (4,)],
    "Health": [(1,)],
    "Reflection": [(1,), (3,), (4,), (7,)],
}


def nested_string(path: tuple[int, ...], data: bytes) -> bytes:
    """A length-delimited field at ``path``; appended to a message it merges into what is there."""
    out = length_delimited(path[-1], data)
    for number in reversed(path[:-1]):
        out = length_delimited(number, out)
    return out


@st.composite
def wire_mutation(draw: st.DrawFn, body: bytes, where: str) -> tuple[bytes, bool, str]:
    """(bytes, must_fail, what): malformed protobuf built from a serialized request."""
    how = draw(
        st.sampled_from(["bad_utf8", "bad_utf8", "unknown", "wire_type", "truncate", "append", "random", "groups"])
    )
    if how == "bad_utf8":  # proto3 strings must be UTF-8: the parser refuses it (must fail)
        path = draw(st.sampled_from(STRING_PATHS[where]))
        raw = draw(st.sampled_from(BAD_UTF8))
        return body + nested_string(path, raw), True, f"invalid UTF-8 {raw!r} at field {path}"
    if how == "unknown":
        number = draw(st.integers(10, 536_870_911))
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        value = {0: varint(draw(st.integers(0, 2**64 - 1))), 1: b"\x00" * 8, 5: b"\x00" * 4}.get(wire)
        extra = tag(number, wire) + (value if value is not None else varint(3) + b"abc")
        return body + extra, False, f"unknown field {number} (wire type {wire})"
    if how == "wire_type":
        number = draw(st.integers(1, 9))
        return body + tag(number, 0) + varint(draw(st.integers(0, 2**64 - 1))), False, f"field {number} as a varint"
    if how == "truncate" and body:
        cut = draw(st.integers(0, len(body) - 1))
        return body[:cut], False, f"truncated to {cut} bytes"
    if how == "groups":
        depth = draw(st.sampled_from([100, 101, 1000, 10_000]))
        return body + tag(20, 3) * depth + tag(20, 4) * depth, False, f"groups nested {depth} deep"
    if how == "append":
        junk = draw(st.binary(min_size=1, max_size=40))
        return body + junk, False, f"appended {junk!r}"
    return draw(st.binary(max_size=200)), False, "random bytes"


# -- requests ------------------------------------------------------------------------------------


def utf8(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Protobuf strings cannot hold a lone surrogate: those travel as invalid UTF-8 bytes instead."""
    return strategy.filter(lambda s: isinstance(s, str) and not has_bad(s))


NS_SPEC = FieldSpec(valid_namespaces, utf8(invalid_namespaces), required=True)
KEY_SPEC = FieldSpec(valid_keys, utf8(invalid_keys), required=True)
DURABILITY_UNKNOWN = st.sampled_from([3, 4, 99, -1, 2**31 - 1, -(2**31)])
DURABILITY = FieldSpec(st.sampled_from([0, 1]), DURABILITY_UNKNOWN)
EXPECTED = FieldSpec(
    st.none(),
    st.sampled_from([2**63, 2**64 - 1, 2**63 + 1]),
    edge=st.sampled_from([0, 1, 5, 2**62, 2**63 - 1, 111_551_774_720_000_000]),
)


def record_spec(kind: str) -> dict[str, FieldSpec]:
    text = valid_payload(kind).map(payload_text)
    return {
        "namespace": NS_SPEC,
        "key": KEY_SPEC,
        "kind": FieldSpec(st.just(kind), utf8(invalid_kinds), required=True, keep=True),
        "payload_json": FieldSpec(
            text,
            utf8(invalid_payload_texts | invalid_payload(kind).map(payload_text)),
            edge=utf8(edge_payload(kind).map(lambda p: payload_text(p[0]))) | st.just("z" * 600_000),
            required=True,
        ),
        "schema_version": FieldSpec(st.sampled_from([0, 1]), st.sampled_from([2, 99, 2**32 - 1])),
        # Server-assigned: ignored when sent, whatever they hold.
        "version": FieldSpec(st.sampled_from([0, 1, 2**64 - 1])),
        "origin": FieldSpec(st.sampled_from(["", "pc2", "evil\x00", "x" * 1000])),
        "deleted": FieldSpec(st.booleans()),
        "updated_at_ms": FieldSpec(st.sampled_from([0, -1, 2**63 - 1, -(2**63)])),
    }


@st.composite
def put_request(draw: st.DrawFn, nested: bool = False) -> tuple[Any, bool, list[str]]:
    """A PutRequest; ``nested`` (inside a BatchPut) leaves its own durability unset: the batch's applies."""
    record = draw(mutate(record_spec(draw(st.sampled_from(KINDS))), extras_forbidden=True, max_steps=2, extras=False))
    spec = {"expected_version": EXPECTED} if nested else {"expected_version": EXPECTED, "durability": DURABILITY}
    outer = draw(mutate(spec, extras_forbidden=True, max_steps=1, extras=False))
    fields = {k: v for k, v in outer.obj.items() if v is not None}
    if "payload_json" in record.obj and len(record.obj["payload_json"]) > 500_000:
        record.must_fail = True  # beyond the message size limit: RESOURCE_EXHAUSTED
    # An unset string is "" in proto3: a required field left out is as bad as an empty one.
    msg = pb.PutRequest(record=pb.Record(**record.obj), **fields)
    return msg, record.must_fail or outer.must_fail, [*record.steps, *outer.steps]


@st.composite
def request(draw: st.DrawFn, method: str) -> tuple[Any, bool, list[str]]:
    """(message, must_fail, steps) for one MemoryFusion method."""
    if method == "Put":
        return draw(put_request())
    if method == "BatchPut":
        how = draw(st.sampled_from(["puts", "puts", "puts", "too_many", "empty"]))
        durability = draw(st.sampled_from([0, 1]) | DURABILITY_UNKNOWN)
        if how == "too_many":
            puts = [
                pb.PutRequest(
                    record=pb.Record(namespace=NS, key=f"b{i}", kind="memory_item", payload_json='{"content":"x"}')
                )
                for i in range(501)
            ]
            return pb.BatchPutRequest(puts=puts, durability=durability), True, ["501 puts"]
        if how == "empty":  # nothing to do: answered with no results, whatever the durability says
            return pb.BatchPutRequest(durability=durability), durability not in (0, 1), ["no puts"]
        drawn = draw(st.lists(put_request(nested=True), min_size=1, max_size=4))
        msgs = [m for m, _f, _s in drawn]
        dup = keyset([{"k": (m.record.namespace, m.record.key)} for m in msgs], lambda d: d["k"])
        must_fail = any(f for _m, f, _s in drawn) or dup or durability not in (0, 1)
        steps = [s for _m, _f, ss in drawn for s in ss] + (["duplicate keys"] if dup else [])
        steps.append(f"batch durability {durability}")
        return pb.BatchPutRequest(puts=msgs, durability=durability), must_fail, steps
    if method == "Search":
        built = draw(search_request(json_door=False))
        return search_message(built.obj), built.must_fail, built.steps
    if method == "ListNamespaces":
        built = draw(mutate(list_namespaces_fields(json_door=False), extras_forbidden=True, max_steps=2, extras=False))
        return pb.ListNamespacesRequest(**built.obj), built.must_fail, built.steps
    specs: dict[str, dict[str, FieldSpec]] = {
        "Get": {"namespace": NS_SPEC, "key": KEY_SPEC},
        "BatchGet": {
            "namespace": NS_SPEC,
            "keys": FieldSpec(
                st.lists(valid_keys, max_size=5),
                st.one_of(
                    st.lists(valid_keys, max_size=2).flatmap(lambda ks: utf8(invalid_keys).map(lambda b: [*ks, b])),
                    st.just([f"k{i}" for i in range(1001)]),
                ),
            ),
        },
        "Delete": {"namespace": NS_SPEC, "key": KEY_SPEC, "expected_version": EXPECTED, "durability": DURABILITY},
        "List": {
            "namespace": NS_SPEC,
            "kind": FieldSpec(st.sampled_from(["", *KINDS]), utf8(invalid_kinds).filter(bool)),
            "key_prefix": FieldSpec(st.sampled_from(["", "s", "h", "n"]), utf8(invalid_keys).filter(bool)),
            "page_size": FieldSpec(st.integers(0, 1000), edge=st.sampled_from([1001, 2**31, 2**32 - 1])),
            "page_token": FieldSpec(st.just(""), utf8(forged_tokens())),
            "include_deleted": FieldSpec(st.booleans()),
        },
        "Watch": {
            "namespace": NS_SPEC,
            "key_prefix": FieldSpec(st.sampled_from(["", "s"]), utf8(invalid_keys).filter(bool)),
            # 0 is always served (nothing is pruned here); others may be beyond the log (OUT_OF_RANGE)
            "after_sequence": FieldSpec(
                st.none() | st.just(0), edge=st.sampled_from([1, 10**6, 2**63 - 1, 2**63, 2**64 - 1])
            ),
            "send_progress": FieldSpec(st.booleans()),
        },
    }
    built = draw(mutate(specs[method], extras_forbidden=True, max_steps=2, extras=False))
    fields = {k: v for k, v in built.obj.items() if v is not None}
    return getattr(pb, f"{method}Request")(**fields), built.must_fail, built.steps


_FILTERS = ("kinds", "tags", "updated_after_ms", "updated_before_ms")


def search_message(obj: dict[str, Any]) -> Any:
    """A SearchRequest of a flat search object (fuzz_strategies.search_request); a condition's value as JSON."""
    filters: dict[str, Any] = {k: obj[k] for k in _FILTERS if k in obj}
    if "metadata" in obj:
        filters["metadata"] = [
            pb.MetadataFilter(field=c["field"], op=c["op"], value_json=json.dumps(c["value"])) for c in obj["metadata"]
        ]
    top = {k: v for k, v in obj.items() if k not in _FILTERS and k != "metadata"}
    return pb.SearchRequest(filters=pb.SearchFilters(**filters), **top)


def grpc_metadata(draw: st.DrawFn, method: str = "") -> tuple[list[tuple[str, str]], bool, str]:
    """Metadata with a key for ``method`` (its name: whether a scoped key may call it; "" for any key)."""
    variants = api_key_variants(writes=method in WRITES, filtered=method in ("", "Search", "ListNamespaces"))
    key, ok = draw(variants.filter(lambda kv: kv[0] is ... or _ascii(kv[0])))
    if key is ...:
        return [], False, "no key"
    extra = draw(st.sampled_from([[], [], [("x-api-key", "second")], [("x-other", "1")]]))
    return [("x-api-key", key), *extra], ok, "right key" if ok else f"key {key!r:.40}"


def _ascii(s: str) -> bool:
    return s.isascii() and s.isprintable() and s == s.strip() and len(s) < 4000


# -- calls ---------------------------------------------------------------------------------------


def call(channel: grpc.Channel, path: str, body: bytes, metadata: list[tuple[str, str]], shape: str) -> str:
    """Send ``body`` as the request of ``path`` and return the final status code's name."""
    try:
        if shape == "unary":
            channel.unary_unary(path)(body, metadata=metadata, timeout=UNARY_DEADLINE_S)
        elif shape == "stream":
            for _ in channel.unary_stream(path)(body, metadata=metadata, timeout=STREAM_DEADLINE_S):
                pass
        else:
            for _ in channel.stream_stream(path)(iter([body]), metadata=metadata, timeout=UNARY_DEADLINE_S):
                pass
    except grpc.RpcError as e:
        return str(e.code().name)  # type: ignore[attr-defined]
    return "OK"


def check_grpc(
    api: Grpc,
    path: str,
    body: bytes,
    metadata: list[tuple[str, str]],
    *,
    shape: str,
    must_fail: bool,
    read_only: bool,
    why: Any,
) -> str:
    code = call(api.channel, path, body, metadata, shape)
    # An accepted stream runs until the client's own deadline. A write that is valid may also end
    # DEADLINE_EXCEEDED and still have been applied (docs/api.md): a mutation at the wire level
    # can turn durability into PERSISTED, which no worker here ever confirms.
    may_expire = not must_fail and (shape != "unary" or not read_only)
    accepted = code == "OK" or (may_expire and code == "DEADLINE_EXCEEDED")
    problems = [api.ledger.settle(rejected=not accepted, read_only=read_only)]
    allowed = DOCUMENTED_ERRORS | {"OK"}
    if may_expire:
        allowed |= {"DEADLINE_EXCEEDED"}
    if code not in allowed:
        problems.append(f"undocumented status {code}")
    elif must_fail and accepted:
        problems.append(f"a call that must be refused got {code}")
    found = [p for p in problems if p]
    assert not found, "; ".join(found) + f"\ncall: {path} {shown(body)}\nmetadata: {shown(metadata)}\nsteps: {why}"
    return code


def probe(api: Grpc) -> None:
    body = pb.GetRequest(namespace=PROBE_NS, key=PROBE_KEY).SerializeToString()
    reply = api.channel.unary_unary(SERVICE + "Get")(body, metadata=[("x-api-key", API_KEY)], timeout=5)
    assert pb.GetResponse.FromString(reply).record.key == PROBE_KEY


@st.composite
def maybe_malformed(draw: st.DrawFn, body: bytes, where: str, must_fail: bool) -> tuple[bytes, bool, str]:
    if draw(st.integers(0, 3)) == 0:
        return draw(wire_mutation(body, where))
    return body, must_fail, ""


METHODS = ["Get", "BatchGet", "Put", "BatchPut", "Delete", "List", "Search", "ListNamespaces"]


@pytest.mark.parametrize("method", METHODS)
@fuzz_settings(230)
@given(data=st.data())
def test_every_rpc_survives_hostile_requests(grpc_api: Grpc, method: str, data: st.DataObject) -> None:
    msg, must_fail, steps = data.draw(request(method), label="request")
    body, must_fail, wire = data.draw(maybe_malformed(msg.SerializeToString(), method, must_fail), label="wire")
    touches_nothing = method == "BatchPut" and not getattr(msg, "puts", True)  # an empty batch: any key may send it
    metadata, key_ok, key_step = grpc_metadata(data.draw, "" if touches_nothing else method)
    check_grpc(
        grpc_api,
        SERVICE + method,
        body,
        metadata,
        shape="unary",
        must_fail=must_fail or not key_ok,
        read_only=method not in WRITES,
        why=[*steps, wire, key_step, f"message {shown(msg, 300)}"],
    )
    probe(grpc_api)


@fuzz_settings(120)
@given(data=st.data())
def test_watch_survives_hostile_requests(grpc_api: Grpc, data: st.DataObject) -> None:
    msg, must_fail, steps = data.draw(request("Watch"), label="request")
    body, must_fail, wire = data.draw(maybe_malformed(msg.SerializeToString(), "Watch", must_fail), label="wire")
    metadata, key_ok, key_step = grpc_metadata(data.draw, "Watch")
    check_grpc(
        grpc_api,
        SERVICE + "Watch",
        body,
        metadata,
        shape="stream",
        must_fail=must_fail or not key_ok,
        read_only=True,
        why=[*steps, wire, key_step],
    )
    probe(grpc_api)


health_services = st.sampled_from(["", "mfh.v1.MemoryFusion", "grpc.health.v1.Health", "nope", "x" * 5000, "é"])


@fuzz_settings(150)
@given(data=st.data())
def test_health_check_survives_hostile_requests(grpc_api: Grpc, data: st.DataObject) -> None:
    _health_example(grpc_api, "Check", "unary", data)


@fuzz_settings(40)  # an accepted Watch stays open until the client's deadline: fewer examples
@given(data=st.data())
def test_health_watch_survives_hostile_requests(grpc_api: Grpc, data: st.DataObject) -> None:
    _health_example(grpc_api, "Watch", "stream", data)


def _health_example(grpc_api: Grpc, method: str, shape: str, data: st.DataObject) -> None:
    """Health needs no key: any key, or none, is fine."""
    body = health_pb2.HealthCheckRequest(service=data.draw(health_services)).SerializeToString()
    body, must_fail, wire = data.draw(maybe_malformed(body, "Health", False), label="wire")
    metadata, _key_ok, key_step = grpc_metadata(data.draw)  # health needs no key
    check_grpc(
        grpc_api,
        HEALTH + method,
        body,
        metadata,
        shape=shape,
        must_fail=must_fail,
        read_only=True,
        why=[wire, key_step],
    )
    probe(grpc_api)


reflection_requests = st.one_of(
    st.just(reflection_pb2.ServerReflectionRequest(list_services="")),
    st.builds(
        lambda s: reflection_pb2.ServerReflectionRequest(file_containing_symbol=s),
        st.sampled_from(["mfh.v1.MemoryFusion", "mfh.v1.Record", "nope", "", "a" * 10_000, "grpc.health.v1.Health"]),
    ),
    st.builds(
        lambda s: reflection_pb2.ServerReflectionRequest(file_by_filename=s),
        st.sampled_from(["mfh/v1/memory_fusion.proto", "../../etc/passwd", "", "é"]),
    ),
    st.builds(
        lambda n: reflection_pb2.ServerReflectionRequest(all_extension_numbers_of_type=n),
        st.sampled_from(["mfh.v1.Record", "", "nope"]),
    ),
    st.just(reflection_pb2.ServerReflectionRequest()),
)


@fuzz_settings(150)
@given(data=st.data())
def test_reflection_survives_hostile_requests(grpc_api: Grpc, data: st.DataObject) -> None:
    msg = data.draw(reflection_requests)
    body, must_fail, wire = data.draw(maybe_malformed(msg.SerializeToString(), "Reflection", False), label="wire")
    metadata, key_ok, key_step = grpc_metadata(data.draw)
    check_grpc(
        grpc_api,
        REFLECTION,
        body,
        metadata,
        shape="bidi",
        must_fail=must_fail or not key_ok,
        read_only=True,
        why=[wire, key_step, shown(msg)],
    )
    probe(grpc_api)


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        *((SERVICE + m, "unary") for m in METHODS),
        (SERVICE + "Watch", "stream"),
        (HEALTH + "Check", "unary"),
        (REFLECTION, "bidi"),
    ],
)
@fuzz_settings(25)
@given(body=st.binary(max_size=300))
def test_random_bytes_to_every_method(grpc_api: Grpc, path: str, shape: str, body: bytes) -> None:
    code = check_grpc(
        grpc_api,
        path,
        body,
        [("x-api-key", API_KEY)],
        shape=shape,
        must_fail=False,
        read_only=path.rsplit("/", 1)[-1] not in WRITES,
        why="random bytes",
    )
    assert code != "UNKNOWN"
    probe(grpc_api)


# -- the hostile requests of issue 7, always sent ------------------------------------------------


def _put(payload_json: str = '{"content": "x"}', **kw: Any) -> bytes:
    record = pb.Record(namespace=NS, key="n1", kind="memory_item", payload_json=payload_json)
    return bytes(pb.PutRequest(record=record, **kw).SerializeToString())


def _token(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


KNOWN: list[tuple[str, str, bytes, str, bool]] = [
    *((f"Put durability {d}", SERVICE + "Put", _put(durability=d), "unary", True) for d in (3, 99, -1)),
    (
        "Delete durability 99",
        SERVICE + "Delete",
        pb.DeleteRequest(namespace=NS, key="h1", durability=99).SerializeToString(),
        "unary",
        True,
    ),
    (
        "BatchPut durability 3",
        SERVICE + "BatchPut",
        pb.BatchPutRequest(puts=[pb.PutRequest.FromString(_put())], durability=3).SerializeToString(),
        "unary",
        True,
    ),
    ("payload_json nested 1000 deep", SERVICE + "Put", _put("[" * 1000 + "]" * 1000), "unary", True),
    (
        "payload metadata nested 1000 deep",
        SERVICE + "Put",
        _put('{"content": "x", "metadata": {"d": ' + "[" * 1000 + "]" * 1000 + "}}"),
        "unary",
        False,
    ),
    (
        "payload metadata: escaped lone surrogate",
        SERVICE + "Put",
        _put('{"content": "x", "metadata": {"a": "\\ud800"}}'),
        "unary",
        True,
    ),
    (
        "page_token nested 1000 deep",
        SERVICE + "List",
        pb.ListRequest(namespace=NS, page_token=_token(b"[" * 1000 + b"]" * 1000)).SerializeToString(),
        "unary",
        True,
    ),
    (
        "page_token after-key: lone surrogate",
        SERVICE + "List",
        pb.ListRequest(
            namespace=NS, page_token=_token(b'{"a": "\\ud800", "s": ["fz", "", "", false]}')
        ).SerializeToString(),
        "unary",
        True,
    ),
    ("Health Check: invalid UTF-8", HEALTH + "Check", b"\n\x03\xed\xa0\x80", "unary", True),
    ("Health Check: bad wire format", HEALTH + "Check", b"\x00", "unary", True),
    ("Health Watch: invalid UTF-8", HEALTH + "Watch", b"\n\x03\xed\xa0\x80", "stream", True),
    ("reflection: bad wire format", REFLECTION, b"\x00", "bidi", True),
    ("reflection: invalid UTF-8", REFLECTION, b"\x1a\x03\xed\xa0\x80", "bidi", True),
]


@pytest.mark.parametrize(("name", "path", "body", "shape", "must_fail"), KNOWN, ids=[k[0] for k in KNOWN])
def test_known_hostile_requests(grpc_api: Grpc, name: str, path: str, body: bytes, shape: str, must_fail: bool) -> None:
    writes = path.rsplit("/", 1)[-1] in WRITES
    check_grpc(
        grpc_api, path, body, [("x-api-key", API_KEY)], shape=shape, must_fail=must_fail, read_only=not writes, why=name
    )
    probe(grpc_api)
