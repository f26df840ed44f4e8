"""Hypothesis strategies for hostile requests, shared by the gRPC, ZeroMQ v1 and v0 fuzz suites.

Every generated request says whether it **must fail**: a request built with at least one mutation
the docs call invalid (docs/api.md, docs/v0_schema.md, docs/architecture.md invariant 8) must get an error
answer; one that may be valid must get a documented answer, and changes state only if accepted.
Values that JSON cannot express as a Python object (raw bytes such as a lone surrogate encoded as
``\\xed\\xa0\\x80``, invalid UTF-8, NaN, very deep nesting, numbers of 5,000 digits) are
:class:`Raw` tokens, spliced into the encoded JSON text by :func:`encode_json`.

Settings: CI runs derandomized (the same inputs every run, so a failure reproduces from the log and
a red build is never a fluke of the draw; the inputs still cover every mutation kind, and a local run
draws new ones each time). ``MFH_FUZZ_EXAMPLES=<n>`` multiplies every test's example count (e.g. 10
for a long local run). One example sends one hostile request, then one well-formed probe; the counts
in CI: gRPC 8 x 230 + Watch 120 + Health 150 + 40 + reflection 150 + random bytes 11 x 25 + 15 fixed
cases = 2,590; ZeroMQ v1 9 x 200 + garbage 300 + 16 fixed, v0 7 x 70 + 60: 2,666 together. Search and
ListNamespaces are reads: a refused one, and an accepted one, changes nothing.
Hypothesis runs with ``deadline=None``: a round trip's time is not the property under test.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from fuzz_harness import API_KEY, ELSEWHERE_KEY, KEYS, NS, OTHER_NS, READ_ONLY_KEY, SQL_KEYS
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# -- settings ---------------------------------------------------------------------------------

MULTIPLIER = max(1, int(os.environ.get("MFH_FUZZ_EXAMPLES", "1") or "1"))
_CI = os.environ.get("CI", "").strip().lower() in ("true", "1")


def fuzz_settings(examples: int) -> settings:
    """``examples`` times MFH_FUZZ_EXAMPLES; no deadline (a round trip is not the property under test)."""
    return settings(
        max_examples=examples * MULTIPLIER,
        deadline=None,
        derandomize=_CI,
        database=None if _CI else settings.default.database,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
        print_blob=True,
    )


# -- raw JSON tokens --------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """Bytes spliced verbatim into a JSON text where this value stands; ``valid_utf8`` False taints the body."""

    text: bytes
    name: str
    bad: bool = False  # a request carrying it must be refused wherever it is (not UTF-8 / lone surrogate)

    def __repr__(self) -> str:
        return f"Raw({self.name})"


def encode_json(obj: Any) -> bytes:
    """JSON text of ``obj`` (lone surrogates as ``\\uXXXX`` escapes), :class:`Raw` tokens spliced in."""
    tokens: dict[str, bytes] = {}

    def mark(v: Any) -> Any:
        if isinstance(v, Raw):
            m = f"@@raw{uuid.uuid4().hex}@@"
            tokens[m] = v.text
            return m
        if isinstance(v, dict):
            return {mark(k) if isinstance(k, Raw) else k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v

    text = json.dumps(mark(obj), ensure_ascii=True).encode("ascii")
    for m, raw in tokens.items():
        text = text.replace(f'"{m}"'.encode(), raw)
    return text


def has_bad(obj: Any) -> bool:
    """True if ``obj`` holds a value no request may carry: a lone surrogate (escaped or raw), invalid UTF-8."""
    if isinstance(obj, Raw):
        return obj.bad
    if isinstance(obj, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in obj)
    if isinstance(obj, dict):
        return any(has_bad(k) or has_bad(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(has_bad(v) for v in obj)
    return False


def deep_array(n: int) -> Raw:
    return Raw(b"[" * n + b"]" * n, f"array nested {n} deep")


def deep_object(n: int) -> Raw:
    return Raw(b'{"a":' * n + b"1" + b"}" * n, f"object nested {n} deep")


RAW_SURROGATE = Raw(b'"\xed\xa0\x80"', "raw lone surrogate bytes", bad=True)
RAW_SURROGATE_IN_TEXT = Raw(b'"ab\xed\xb2\x80cd"', "raw low surrogate inside text", bad=True)
RAW_INVALID_UTF8 = Raw(b'"\xff\xfe"', "invalid UTF-8", bad=True)
RAW_TRUNCATED_UTF8 = Raw(b'"\xc3"', "truncated UTF-8", bad=True)
RAW_OVERLONG_NUL = Raw(b'"\xc0\x80"', "overlong NUL", bad=True)
RAW_NAN = Raw(b"NaN", "NaN")
RAW_INF = Raw(b"-Infinity", "-Infinity")
RAW_HUGE_FLOAT = Raw(b"1e400", "1e400")
RAW_5000_DIGITS = Raw(b"9" * 5000, "an integer of 5000 digits")

LONE_SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\udc80b", "\ud83d", "x\ud800\ud800"])
DEPTHS = st.sampled_from([64, 999, 1000, 1500, 5000, 50_000])  # 50,000 {"a": is 300 KB, under the message limit

raw_tokens = st.one_of(
    st.sampled_from(
        [
            RAW_SURROGATE,
            RAW_SURROGATE_IN_TEXT,
            RAW_INVALID_UTF8,
            RAW_TRUNCATED_UTF8,
            RAW_OVERLONG_NUL,
            RAW_NAN,
            RAW_INF,
            RAW_HUGE_FLOAT,
            RAW_5000_DIGITS,
        ]
    ),
    DEPTHS.map(deep_array),
    DEPTHS.map(deep_object),
)

# -- hostile values ---------------------------------------------------------------------------

HUGE_INTS = st.sampled_from([2**64, 2**64 - 1, 2**63, 2**63 - 1, -1, -(2**63) - 1, 10**30, -(10**30), 0])
hostile_numbers = st.one_of(
    HUGE_INTS,
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([RAW_NAN, RAW_INF, RAW_HUGE_FLOAT, RAW_5000_DIGITS]),
)


def long_text(sizes: list[int], char: str = "a") -> st.SearchStrategy[str]:
    return st.sampled_from(sizes).map(lambda n: char * n)


hostile_strings = st.one_of(
    st.sampled_from(
        ["", " ", "\x00", "a\x00b", "\n", "é", "\uff41\uff42", "😀", "\u202e", "../..", "*", "%", "?", "\\", "'"]
    ),
    LONE_SURROGATES,
    long_text([63, 64, 65, 255, 256, 257, 1024, 70_000]),
    st.text(max_size=30),
)

scalar_values = st.one_of(st.none(), st.booleans(), hostile_numbers, hostile_strings, raw_tokens)
hostile_values = st.recursive(
    scalar_values,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8) | LONE_SURROGATES, inner, max_size=4)
    ),
    max_leaves=8,
)


def wrong_type(expected: str, *, optional: bool = False) -> st.SearchStrategy[Any]:
    """Values of any JSON type but ``expected`` ("str", "int", "bool", "list", "dict"); no null if ``optional``."""
    by_type: dict[str, st.SearchStrategy[Any]] = {
        "str": st.text(max_size=10),
        "int": st.integers() | HUGE_INTS,
        "float": st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).filter(
            lambda f: f != int(f)
        ),
        "bool": st.booleans(),
        "list": st.lists(st.integers(), max_size=3),
        "dict": st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
        "null": st.none(),
    }
    skip = {expected, "null"} if optional else {expected}
    return st.one_of(*(s for t, s in by_type.items() if t not in skip))


# -- namespaces, keys, tokens -------------------------------------------------------------------

valid_namespaces = st.sampled_from([NS, NS, NS, OTHER_NS, "a" * 64, "0", "A.b-c_d9"])
invalid_namespaces = st.one_of(
    st.sampled_from(
        [
            "",
            "_a",
            ".a",
            "-a",
            "a b",
            "a:b",
            "a/b",
            "a@b",
            "ä",
            "a\x00",
            "a*",
            "a\n",
            " fz",
            "fz ",
            "\uff46z",
            "fz\u200b",
        ]
    ),
    long_text([65, 1000, 100_000]),
    LONE_SURROGATES,
)
valid_keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(["a" * 256, ":", "@", "/", "-", "..", "_", "k" * 255]))
invalid_keys = st.one_of(
    st.sampled_from(["", "a b", "ä", "a\x00", "a#b", "*", "a\nb", "a%b", "a?b", "a\\b", "s0 ", "\uff530", "a\u202eb"]),
    long_text([257, 1000, 100_000]),
    LONE_SURROGATES,
)
KINDS = ["memory_item", "session_data", "knowledge_record"]
invalid_kinds = st.one_of(
    st.sampled_from(
        ["", "Memory_Item", "memory_item ", "memoryitem", "event", "null", "MEMORY_ITEM", "memory_item\x00"]
    ),
    LONE_SURROGATES,
    long_text([100, 70_000]),
)


def forged_tokens() -> st.SearchStrategy[str]:
    """Page tokens no server issued: garbage, valid-looking base64 of wrong or hostile JSON."""
    import base64

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    scope = [NS, "", "", False]
    forged_json = st.one_of(
        st.just(b"{}"),
        st.just(b"[]"),
        st.just(b"null"),
        st.just(b'{"a": 5, "s": ' + json.dumps(scope).encode() + b"}"),
        st.just(b'{"a": "s1", "s": ["other", "", "", false]}'),
        st.just(b'{"a": "\\ud800", "s": ' + json.dumps(scope).encode() + b"}"),
        st.just(b'{"a": "\xed\xa0\x80", "s": ' + json.dumps(scope).encode() + b"}"),
        st.just(b'{"a": "\xff", "s": ' + json.dumps(scope).encode() + b"}"),
        st.just(b'{"a": "s1", "s": ' + json.dumps(scope).encode().replace(b'"fz"', b'"\\ud800"') + b"}"),
        DEPTHS.map(lambda n: b"[" * n + b"]" * n),
        DEPTHS.map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
        DEPTHS.map(lambda n: b'{"a": "s1", "s": ' + b"[" * n + b"]" * n + b"}"),
        st.binary(min_size=1, max_size=64),  # empty would encode to "", the valid first-page token
    )
    return st.one_of(
        forged_json.map(b64),
        st.sampled_from(["x", "====", "!!!!", "a" * 4097, "e30", "\x00", "é", "Zm9v"]),
        st.text(max_size=40).filter(bool),
        LONE_SURROGATES,
        st.binary(min_size=1, max_size=200).map(b64),
    )


# -- payloads (the record's content) --------------------------------------------------------------

small_text = st.text(min_size=1, max_size=20).filter(lambda s: not has_bad(s))
small_json = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | small_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(small_text, inner, max_size=3),
    max_leaves=6,
)
unit_floats = st.floats(min_value=0.0, max_value=1.0)


def valid_payload(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    if kind == "memory_item":
        return st.fixed_dictionaries(
            {"content": small_text},
            optional={
                "tags": st.lists(small_text, max_size=3),
                "importance": unit_floats,
                "source": small_text,
                "metadata": st.dictionaries(small_text, small_json, max_size=3),
            },
        )
    if kind == "session_data":
        return st.fixed_dictionaries(
            {"session_id": small_text},
            optional={"agent_id": small_text, "data": st.dictionaries(small_text, small_json, max_size=3)},
        )
    return st.fixed_dictionaries(
        {"subject": small_text}, optional={"object": small_text, "confidence": unit_floats, "content": small_text}
    )


_REQUIRED_FIELD = {"memory_item": "content", "session_data": "session_id", "knowledge_record": "subject"}
_NEAR_LIMIT = 256 * 1024 - 200  # the content of a payload just under 256 KiB of canonical JSON


@st.composite
def invalid_payload(draw: st.DrawFn, kind: str) -> Any:
    """A payload object (or non-object) that ``kind``'s model must refuse."""
    base = dict(draw(valid_payload(kind)))
    req = _REQUIRED_FIELD[kind]
    how = draw(
        st.sampled_from(
            ["missing", "empty", "type", "extra", "range", "schema", "not_object", "too_big", "surrogate", "tags"]
        )
    )
    if how == "missing":
        base.pop(req)
    elif how == "empty":
        base[req] = ""
    elif how == "type":
        base[req] = draw(wrong_type("str"))
    elif how == "extra":
        base[draw(st.sampled_from(["contnet", "id", "version", "__proto__", "\ud800", "x" * 300]))] = 1
    elif how == "range":
        field_ = (
            "importance" if kind == "memory_item" else "confidence" if kind == "knowledge_record" else "expires_at_ms"
        )
        base[field_] = draw(st.sampled_from([-0.01, 1.01, 1e308, -1, "0.5", RAW_NAN, RAW_INF, RAW_HUGE_FLOAT]))
        if kind == "session_data":
            base[field_] = draw(st.sampled_from([-1, -(2**63), "5", 1.5, RAW_NAN]))
    elif how == "schema":
        base["schema_version"] = draw(st.sampled_from([0, 2, -1, 2**64, "1", RAW_NAN]))
    elif how == "not_object":
        return draw(st.sampled_from([[], [1], "text", 5, True, None, RAW_NAN]))
    elif how == "too_big":
        base[req] = "x" * draw(st.sampled_from([256 * 1024 + 1, 300_000]))
    elif how == "surrogate":
        base[req] = draw(LONE_SURROGATES)
    else:
        base["tags" if kind == "memory_item" else "metadata" if kind == "knowledge_record" else "data"] = draw(
            st.sampled_from([["t"] * 65, "notalist", [1, 2], {"a": 1}] if kind == "memory_item" else [[], "x", 5])
        )
    return base


@st.composite
def edge_payload(draw: st.DrawFn, kind: str) -> tuple[Any, bool]:
    """(payload, must_fail): hostile content that may well be valid (near the size limit, deep, odd numbers)."""
    base = dict(draw(valid_payload(kind)))
    req = _REQUIRED_FIELD[kind]
    how = draw(st.sampled_from(["near_limit", "deep", "raw", "unicode", "numbers"]))
    if how == "near_limit":
        base[req] = "y" * draw(st.sampled_from([_NEAR_LIMIT, 256 * 1024 - 20, 256 * 1024 - 16]))
    elif how == "deep" or how == "raw":
        holder = "metadata" if kind != "session_data" else "data"
        base[holder] = {"v": draw(raw_tokens if how == "raw" else DEPTHS.map(deep_array))}
    elif how == "unicode":
        base[req] = draw(st.sampled_from(["é", "😀" * 1000, "\x00", "\u202e", "\ufeff", "a\r\nb"]))
    else:
        holder = "metadata" if kind != "session_data" else "data"
        base[holder] = {"n": draw(hostile_numbers)}
    return base, has_bad(base)


def payload_text(obj: Any) -> str:
    """A payload as the JSON text a client sends in ``payload_json`` (non-UTF-8 raws cannot be text)."""
    return encode_json(obj).decode("utf-8", errors="surrogateescape")


invalid_payload_texts = st.one_of(
    st.sampled_from(["", "{", "}", "null", "[]", "1", '"x"', "{'content': 'x'}", "{]", "\x00", "true", "NaN"]),
    DEPTHS.map(lambda n: "[" * n + "]" * n),
    DEPTHS.map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.sampled_from(['{"content": "\\ud800"}', '{"content": "x\\udfffy"}', '{"content": "a", "tags": ["\\ud83d"]}']),
    st.just('{"content": "' + "z" * 300_000 + '"}'),
    st.text(max_size=30).filter(lambda s: not s.strip().startswith("{")),
)


# -- Search and ListNamespaces (docs/api.md, "Search"; the limits of mfh_api.search) ---------------

META_OPS = ["eq", "ne", "lt", "lte", "gt", "gte", "in"]
_scalars = st.one_of(st.integers(-1000, 1000), st.floats(-1e6, 1e6), small_text, st.booleans())


@st.composite
def valid_condition(draw: st.DrawFn) -> dict[str, Any]:
    """``{"field", "op", "value"}`` the service accepts (ranges compare a string or a number)."""
    op = draw(st.sampled_from(META_OPS))
    if op == "in":
        value: Any = draw(st.lists(_scalars, min_size=1, max_size=5))
    elif op in ("eq", "ne"):
        value = draw(_scalars)
    else:
        value = draw(st.integers(-1000, 1000) | st.floats(-1e6, 1e6) | small_text)
    return {"field": draw(st.sampled_from(["cat", "score", "name", "a_b", "_x", "A9"])), "op": op, "value": value}


@st.composite
def invalid_condition(draw: st.DrawFn) -> dict[str, Any]:
    """A condition the service must refuse, one part made wrong."""
    cond = dict(draw(valid_condition()))
    how = draw(st.sampled_from(["field", "op", "range_bool", "in_shape", "value_type", "long_string"]))
    if how == "field":
        cond["field"] = draw(st.sampled_from(["", "1a", "a-b", "a.b", "a b", "é", "a" * 65, "a'b", "a;--"]))
    elif how == "op":
        cond["op"] = draw(st.sampled_from(["", "EQ", "like", "=", "in ", "contains", "\x00"]))
    elif how == "range_bool":
        cond["op"], cond["value"] = draw(st.sampled_from(["lt", "lte", "gt", "gte"])), draw(st.booleans())
    elif how == "in_shape":
        cond["op"] = "in"
        cond["value"] = draw(st.sampled_from([[], 5, "x", {"a": 1}, list(range(101)), [[1]], [{"a": 1}]]))
    elif how == "value_type":
        cond["op"], cond["value"] = draw(st.sampled_from(["eq", "ne", "lt"])), draw(st.sampled_from([[1], {}, None]))
    else:
        cond["op"], cond["value"] = "eq", "v" * 1025
    return cond


def search_fields(*, json_door: bool) -> dict[str, FieldSpec]:
    """The fields of a Search beside its scope (``json_door``: ZeroMQ, where any JSON type can arrive)."""

    def wrong(t: str, *, optional: bool = False) -> st.SearchStrategy[Any]:
        return wrong_type(t, optional=optional) if json_door else st.nothing()

    return {
        "query": FieldSpec(
            st.sampled_from(["", "hot", "hot 3", "other namespace", "  ", "alive"]),
            st.sampled_from(["!!!", "...", "q" * 1025, " ".join(f"w{i}" for i in range(33))]) | wrong("str"),
            edge=hostile_strings.filter(lambda v: not has_bad(v) and len(v) <= 1024),
        ),
        "kinds": FieldSpec(
            st.lists(st.sampled_from(KINDS), max_size=3),
            st.lists(invalid_kinds.filter(lambda k: not has_bad(k)), min_size=1, max_size=2) | wrong("list"),
        ),
        "tags": FieldSpec(
            st.lists(small_text.filter(lambda t: len(t) <= 256), max_size=3),
            st.sampled_from([[""], ["t" * 257], [f"t{i}" for i in range(65)]]) | wrong("list"),
        ),
        "metadata": FieldSpec(
            st.lists(valid_condition(), max_size=3),
            st.lists(valid_condition(), max_size=2).flatmap(lambda ok: invalid_condition().map(lambda b: [*ok, b]))
            | st.lists(valid_condition(), min_size=17, max_size=17),
        ),
        # optional on the JSON door (null: no bound), so null is not a wrong type there
        "updated_after_ms": FieldSpec(
            st.integers(0, 2**53 - 1), st.sampled_from([-1, 2**53, 2**63 - 1, -(2**63)]) | wrong("int", optional=True)
        ),
        "updated_before_ms": FieldSpec(
            st.integers(0, 2**53 - 1), st.sampled_from([-1, 2**53, 2**63 - 1]) | wrong("int", optional=True)
        ),
        # The fuzz namespaces hold no embeddings, so no dimension is fixed yet: any length up to 4096 is fine.
        "embedding": FieldSpec(
            st.lists(st.floats(-1.0, 1.0, width=32).filter(bool), min_size=1, max_size=8) | st.just([]),
            st.sampled_from([[0.0], [0.0, 0.0, 0.0], [0.5] * 4097])
            | st.sampled_from([[float("nan"), 1.0], [float("inf")], [1e39]] if not json_door else [[1e39], [True]])
            | wrong("list"),
        ),
        "top_k": FieldSpec(
            st.integers(0, 1000), st.sampled_from([1001, 2**31, 2**32 - 1] + ([-1] if json_door else [])) | wrong("int")
        ),
    }


@st.composite
def search_request(draw: st.DrawFn, *, json_door: bool) -> Built:
    """A Search as a flat object: scope (exactly one of namespace and namespace_prefix) and the fields above."""
    how = draw(st.sampled_from(["namespace", "namespace", "prefix", "both", "neither", "bad"]))
    scope: dict[str, Any] = {}
    must_fail = how in ("both", "neither", "bad")
    if how in ("namespace", "both"):
        scope["namespace"] = draw(valid_namespaces)
    if how in ("prefix", "both"):
        scope["namespace_prefix"] = draw(st.sampled_from(["fz", "fz2", "a", "0", "probe"]))
    if how == "bad":
        bad = invalid_namespaces.filter(lambda n: n != "" and not has_bad(n))
        scope[draw(st.sampled_from(["namespace", "namespace_prefix"]))] = draw(bad)
    rest = draw(mutate(search_fields(json_door=json_door), extras_forbidden=True, max_steps=2, extras=json_door))
    obj = {**scope, **rest.obj}
    return Built(obj, must_fail or rest.must_fail, [f"scope {how}", *rest.steps])


def list_namespaces_fields(*, json_door: bool) -> dict[str, FieldSpec]:
    def wrong(t: str) -> st.SearchStrategy[Any]:
        return wrong_type(t) if json_door else st.nothing()

    return {
        "prefix": FieldSpec(
            st.sampled_from(["", "fz", "fz2", "probe", "a"]),
            invalid_namespaces.filter(lambda n: n != "" and not has_bad(n)) | wrong("str"),
        ),
        "max_depth": FieldSpec(st.integers(0, 64), st.sampled_from([65, 2**31, 2**32 - 1]) | wrong("int")),
        "page_size": FieldSpec(
            st.integers(0, 1000),
            (st.sampled_from([-1]) if json_door else st.nothing()) | wrong("int"),
            edge=st.sampled_from([1001, 2**31, 2**32 - 1]),
        ),
        "page_token": FieldSpec(st.just(""), forged_tokens().filter(lambda t: not has_bad(t)) | wrong("str")),
    }


# -- generic mutation of a flat object ----------------------------------------------------------


@dataclass
class FieldSpec:
    """One field: how a valid, a certainly invalid and a hostile-but-maybe-valid value are drawn."""

    valid: st.SearchStrategy[Any]
    invalid: st.SearchStrategy[Any] | None = None
    edge: st.SearchStrategy[Any] | None = None
    required: bool = False
    always: bool = False  # present in the valid starting point even when optional
    keep: bool = False  # never dropped (another field's validity depends on it)


@dataclass
class Built:
    """A generated object, whether it must be refused, and what was done to it (for the failure report)."""

    obj: dict[str, Any]
    must_fail: bool
    steps: list[str] = field(default_factory=list)


EXTRA_NAMES = st.sampled_from(["extra", "agent", "timestamp", "Namespace", "namespace ", "__class__", "v2", "\ud800"])


@st.composite
def mutate(
    draw: st.DrawFn, spec: dict[str, FieldSpec], *, extras_forbidden: bool, max_steps: int = 3, extras: bool = True
) -> Built:
    """Start valid, then apply 0..max_steps mutations: drop, wrong value, hostile value, unknown field
    (``extras`` False: no unknown fields, for protobuf messages, whose unknown fields live at the wire level)."""
    obj: dict[str, Any] = {}
    for name, f in spec.items():
        if f.required or f.always or draw(st.booleans()):
            obj[name] = draw(f.valid)
    bad: set[str] = set()
    unknown: set[str] = set()  # not ``extras``: that is the parameter saying whether to add any
    steps: list[str] = []
    for _ in range(draw(st.integers(0, max_steps))):
        op = draw(st.sampled_from(["drop", "invalid", "invalid", "edge", "extra" if extras else "edge"]))
        name = draw(st.sampled_from(sorted(spec)))
        f = spec[name]
        if op == "drop":
            if f.keep:
                continue
            obj.pop(name, None)
            bad.discard(name)
        elif op == "invalid" and f.invalid is not None:
            obj[name] = draw(f.invalid)
            bad.add(name)
        elif op == "edge" and f.edge is not None:
            obj[name] = draw(f.edge)
            bad.discard(name)
        elif op == "extra":
            extra = draw(EXTRA_NAMES)
            if extra in spec:
                continue
            obj[extra] = draw(hostile_values)
            unknown.add(extra)
            name = extra
        else:
            continue
        steps.append(f"{op} {name!r}")
    missing = [n for n, f in spec.items() if f.required and n not in obj]
    must_fail = bool(missing) or bool(bad & obj.keys()) or (extras_forbidden and bool(unknown)) or has_bad(obj)
    return Built(obj, must_fail, steps)


def api_key_variants(*, writes: bool = False, filtered: bool = False) -> st.SearchStrategy[tuple[Any, bool]]:
    """(the api key to send or ``...`` for none, whether it is the right one for the call). The scoped keys of
    the fuzz host are right for some calls only: the read-only key unless the call ``writes``; the key of
    namespaces no generator makes only for a call that ``filtered`` to its scope (a prefix Search,
    ListNamespaces), else PERMISSION_DENIED."""
    wrong = st.one_of(
        st.sampled_from(
            ["", "wrong", API_KEY[:-1], API_KEY + "x", API_KEY.upper(), " " + API_KEY, API_KEY + "\x00", "x" * 5000]
        ),
        LONE_SURROGATES,
        st.text(max_size=30).filter(lambda s: s not in (API_KEY, READ_ONLY_KEY, ELSEWHERE_KEY)),
    )
    return st.one_of(
        st.just((API_KEY, True)),
        st.just((API_KEY, True)),
        st.just((API_KEY, True)),
        st.just((API_KEY, True)),
        st.just((..., False)),
        st.just((READ_ONLY_KEY, not writes)),
        st.just((ELSEWHERE_KEY, filtered)),
        wrong.map(lambda k: (k, False)),
    )


_SEGMENTS: Final = ["a", "b", "ab", "a-b", "x1", "_"]
_WILD_SEGMENTS: Final = [*_SEGMENTS, "*", "?", "a*", "*b", "x?", "a?b"]


def namespace_patterns() -> st.SearchStrategy[str]:
    """Namespace patterns of an API key's scope (docs/security.md): segments, globs within and across them."""
    return st.one_of(
        st.just("*"),
        st.lists(st.sampled_from(_WILD_SEGMENTS), min_size=1, max_size=4).map(".".join),
    )


@st.composite
def granted_namespaces(draw: st.DrawFn, patterns: list[str]) -> str:
    """A namespace near one of ``patterns``: an instance of it (each ``*`` some text, dots too, each ``?`` one
    character), often nudged off it (a character more or less, a segment more)."""
    pattern = draw(st.sampled_from(patterns))
    filler = st.text(alphabet="ab1.-", max_size=6)
    name = "".join(draw(filler) if c == "*" else draw(st.sampled_from("ab1-")) if c == "?" else c for c in pattern)
    nudge = draw(st.sampled_from(["", "", "", "drop", "char", "segment"]))
    if nudge == "drop" and len(name) > 1:
        name = name[:-1]
    elif nudge == "char":
        name += draw(st.sampled_from("ab1"))
    elif nudge == "segment":
        name += "." + draw(st.sampled_from(_SEGMENTS))
    return name or "a"


def keyset(specs: list[dict[str, Any]], key_of: Callable[[dict[str, Any]], tuple[Any, Any]]) -> bool:
    """True if two entries address the same (namespace, key)."""
    seen = set()
    for s in specs:
        try:
            k = key_of(s)
            hash(k)
        except (KeyError, TypeError):
            continue
        if k in seen:
            return True
        seen.add(k)
    return False


__all__ = [
    "KINDS",
    "MULTIPLIER",
    "SQL_KEYS",
    "Built",
    "FieldSpec",
    "Raw",
    "api_key_variants",
    "edge_payload",
    "encode_json",
    "forged_tokens",
    "fuzz_settings",
    "granted_namespaces",
    "has_bad",
    "hostile_strings",
    "hostile_values",
    "invalid_keys",
    "invalid_kinds",
    "invalid_namespaces",
    "invalid_payload",
    "invalid_payload_texts",
    "keyset",
    "list_namespaces_fields",
    "mutate",
    "namespace_patterns",
    "payload_text",
    "raw_tokens",
    "search_request",
    "valid_keys",
    "valid_namespaces",
    "valid_payload",
    "wrong_type",
]
