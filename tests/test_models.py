"""mfh_models: validation of names and payloads, canonical JSON, the checksum, versions and settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import event
from hypothesis import given
from hypothesis import strategies as st

from mfh_models import (
    MAX_PAYLOAD_BYTES,
    ChecksumRow,
    ConfigError,
    InvalidArgument,
    Kind,
    MemoryEvent,
    canonical_json,
    decode_untrusted_json,
    default_config_dir,
    items_checksum,
    json_schemas,
    load_settings,
    pack,
    unpack,
    validate_key,
    validate_namespace,
    validate_payload,
)


@pytest.mark.parametrize("ns", ["", "a" * 65, "-lead", "has space", "semi;colon", "ünï", "a:b", "x/y", "\x00"])
def test_bad_namespaces_are_refused_with_a_reason(ns: str) -> None:
    with pytest.raises(InvalidArgument, match="namespace"):
        validate_namespace(ns)


@pytest.mark.parametrize("key", ["", "k" * 257, "has space", "new\nline", "quote'", "emoji😀", "a*b"])
def test_bad_keys_are_refused_with_a_reason(key: str) -> None:
    with pytest.raises(InvalidArgument, match="key"):
        validate_key(key)


def test_good_names_pass() -> None:
    assert validate_namespace("agent-7.episodic_v2") == "agent-7.episodic_v2"
    assert validate_key("session:42/turn@3.json-x") == "session:42/turn@3.json-x"


@pytest.mark.parametrize(
    ("kind", "payload", "needle"),
    [
        ("memory_item", {}, "content"),
        ("memory_item", {"content": "x", "importance": 2}, "importance"),
        ("memory_item", {"content": "x", "surprise": 1}, "surprise"),
        ("session_data", {"data": {}}, "session_id"),
        ("knowledge_record", {"subject": ""}, "subject"),
        ("memory_item", ["not", "an", "object"], "JSON object"),
        ("memory_item", {"content": "x", "metadata": {"n": float("nan")}}, "canonical JSON"),
        ("episodic", {"content": "x"}, "unknown kind"),
        ("memory_item", {"content": "x", "schema_version": 99}, "schema_version"),
    ],
)
def test_bad_payloads_are_refused_with_the_field(kind: str, payload: object, needle: str) -> None:
    with pytest.raises(InvalidArgument, match=needle):
        validate_payload(kind, payload)


def test_oversized_payload_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="larger than"):
        validate_payload("memory_item", {"content": "x", "metadata": {"blob": "y" * MAX_PAYLOAD_BYTES}})


def test_payload_is_stored_as_the_clients_fields_canonicalised() -> None:
    kind, text = validate_payload("memory_item", {"tags": ["b"], "content": "héllo"})
    assert kind is Kind.MEMORY_ITEM
    assert text == '{"content":"héllo","schema_version":1,"tags":["b"]}'


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c)
    )
)
def test_canonical_json_is_stable_under_key_order(value: object) -> None:
    text = canonical_json(value)
    assert canonical_json(json.loads(text)) == text


def test_checksum_ignores_row_order_and_sees_every_field() -> None:
    rows = [ChecksumRow("ns", f"k{i}", i, "main_pc", False, '{"a":1}') for i in range(5)]
    base = items_checksum(rows)
    assert items_checksum(reversed(rows)) == base
    for change in ({"version": 99}, {"origin": "pc2"}, {"deleted": True}, {"payload": '{"a":2}'}, {"key": "zz"}):
        assert items_checksum([rows[0]._replace(**change), *rows[1:]]) != base  # type: ignore[arg-type]


def test_checksum_sorts_by_bytes_not_locale() -> None:
    a = [ChecksumRow("ns", "B", 1, "o", False, "{}"), ChecksumRow("ns", "a", 1, "o", False, "{}")]
    assert items_checksum(a) == items_checksum(a[::-1])


@given(st.integers(0, (1 << 47) - 1), st.integers(0, 65535))
def test_versions_pack_and_unpack(ms: int, counter: int) -> None:
    assert unpack(pack(ms, counter)) == (ms, counter)
    assert pack(ms, counter) < pack(ms + 1, 0)


def test_event_refuses_bad_origin_and_version() -> None:
    good = event("k", 1).model_dump()
    with pytest.raises(InvalidArgument):
        MemoryEvent.model_validate({**good, "origin": "Main PC"})
    with pytest.raises(ValueError):
        MemoryEvent.model_validate({**good, "version": 0})


def test_json_schemas_cover_every_model() -> None:
    schemas = json_schemas()
    assert set(schemas) == {"memory_item", "session_data", "knowledge_record", "record", "memory_event"}
    assert "schema_version" in schemas["memory_item"]["properties"]


# -- settings -----------------------------------------------------------------------------------


def _config_dir(tmp_path: Path, host_yaml: str) -> Path:
    (tmp_path / "default.yaml").write_text((default_config_dir() / "default.yaml").read_text())
    (tmp_path / "h.yaml").write_text(host_yaml)
    return tmp_path


def test_settings_merge_default_host_and_environment(tmp_path: Path) -> None:
    cdir = _config_dir(tmp_path, "host_id: h\nserver:\n  grpc_port: 6000\n")
    s = load_settings("h", config_dir=cdir, env={"REDIS_URL": "redis://r:1/3", "MFH_API_KEY": "s3cret"})
    assert (s.host_id, s.server.grpc_port, s.server.zmq_port) == ("h", 6000, 5713)
    assert s.storage.redis_url == "redis://r:1/3"
    assert s.server.api_key is not None and s.server.api_key.get_secret_value() == "s3cret"
    assert s.masked()["server"]["api_key"] == "********"
    assert "s3cret" not in json.dumps(s.masked())


def test_shipped_host_files_load() -> None:
    for host in ("main_pc", "pc2"):
        s = load_settings(host, env={})
        assert s.host_id == host
    a, b = load_settings("main_pc", env={}), load_settings("pc2", env={})
    assert a.storage.redis_url != b.storage.redis_url and a.storage.sqlite_path != b.storage.sqlite_path


@pytest.mark.parametrize(
    ("host_yaml", "needle"),
    [
        ("server:\n  grpc_port: 70000\n", "server.grpc_port"),
        ("server:\n  grcp_port: 1\n", "grcp_port"),
        ("storage: [1, 2\n", "not valid YAML"),
        ("- a list\n", "mapping"),
        ("storage:\n  redis_url: ${NO_SUCH_VAR}\n", "NO_SUCH_VAR"),
        ("host_id: 'Main PC'\n", "origin"),
    ],
)
def test_bad_config_names_the_file_field_and_reason(tmp_path: Path, host_yaml: str, needle: str) -> None:
    cdir = _config_dir(tmp_path, host_yaml)
    with pytest.raises(ConfigError) as info:
        load_settings("h", config_dir=cdir, env={})
    assert needle in str(info.value) and "h.yaml" in str(info.value)


def test_unknown_host_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no configuration for host"):
        load_settings("nowhere", config_dir=_config_dir(tmp_path, ""), env={})


def test_without_a_host_the_first_host_applies(tmp_path: Path) -> None:
    # A command run without --host must read the same stores as the Procfile's processes.
    assert load_settings(env={}).storage.sqlite_path == load_settings("main_pc", env={}).storage.sqlite_path
    cdir = _config_dir(tmp_path, "")
    data = tmp_path / "data"
    got = load_settings(config_dir=cdir, env={"MFH_DATA_DIR": str(data)}).storage.sqlite_path
    assert got == str(data / "memory.db")  # no main_pc.yaml there: default.yaml's file, under the data dir


# -- untrusted JSON: one decoder for every door (issue 7, findings 1 and 2) -----------------------------

DEEP = 50_000  # far past json's ~1,000-level recursion limit


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[" * DEEP + "]" * DEEP, "deeper than 64"),
        ('{"a":' * DEEP + "1" + "}" * DEEP, "deeper than 64"),
        ("[" * 65 + "]" * 65, "deeper than 64"),
        ("[" * DEEP, "deeper than 64"),  # unterminated, too
        ('{"content": "\\ud800"}', "lone surrogate"),
        ('{"content": "\\udc00\\ud800"}', "lone surrogate"),  # a low before a high is no pair
        (b'{"content": "\xed\xa0\x80"}', "not valid UTF-8"),  # a surrogate encoded as raw bytes
        (b'{"content": "\xff"}', "not valid UTF-8"),
        ('{"content": "\udcff"}', "lone surrogate"),  # what surrogateescape makes of a non-UTF-8 argument
        ('{"n": NaN}', "NaN is not allowed"),
        ('{"n": -Infinity}', "Infinity is not allowed"),
        ("{nope", "not valid JSON"),
        ("x" * 101, "larger than 100"),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_untrusted_json_is_refused_with_invalid_argument(text: str | bytes, needle: str) -> None:
    # Given hostile JSON  When it is decoded  Then only InvalidArgument comes out, saying why
    with pytest.raises(InvalidArgument, match=needle):
        decode_untrusted_json(text, what="payload_json", max_bytes=100 if text == "x" * 101 else 10_000_000)


def test_untrusted_json_accepts_what_is_only_tricky() -> None:
    # Brackets inside strings do not count as nesting; a surrogate pair is one character; 64 levels pass
    assert decode_untrusted_json('{"s": "' + "[{" * 5000 + '\\"]"}') == {"s": "[{" * 5000 + '"]'}
    assert decode_untrusted_json('{"e": "\\ud83d\\ude00"}') == {"e": "😀"}
    assert decode_untrusted_json(b'{"e": "\xf0\x9f\x98\x80"}') == {"e": "😀"}
    assert decode_untrusted_json('"\\\\ud800"') == "\\ud800"  # an escaped backslash, then text
    assert decode_untrusted_json("[" * 64 + "]" * 64) is not None


def test_untrusted_json_depth_check_is_linear_on_unterminated_strings() -> None:
    # Given half a million escaped quotes that never close (quadratic for a naive string regex)
    import time

    text = '"' + '\\"' * 500_000 + "[" * 100
    started = time.perf_counter()
    with pytest.raises(InvalidArgument):
        decode_untrusted_json(text)
    assert time.perf_counter() - started < 2.0


def _nested(levels: int) -> dict[str, object]:
    root: dict[str, object] = {}
    node = root
    for _ in range(levels):
        child: dict[str, object] = {}
        node["d"] = child
        node = child
    return root


@pytest.mark.parametrize(
    "payload",
    [
        {"content": "\ud800"},  # what json.loads makes of an escaped lone surrogate
        {"content": "x", "metadata": {"k\udcff": 1}},
        {"content": "x", "metadata": _nested(5000)},  # built in-process, past json.dumps' recursion limit
    ],
    ids=["surrogate value", "surrogate key", "deep in-process"],
)
def test_validate_payload_raises_only_invalid_argument(payload: dict[str, object]) -> None:
    # Given a payload no wire could carry  When it is validated  Then the one error is InvalidArgument
    with pytest.raises(InvalidArgument):
        validate_payload("memory_item", payload)


def test_validate_payload_caps_nesting_at_64_levels() -> None:
    ok_payload = json.loads('{"content": "x", "metadata": {"a": ' + "[" * 62 + "]" * 62 + "}}")
    validate_payload("memory_item", ok_payload)
    deep = json.loads('{"content": "x", "metadata": {"a": ' + "[" * 63 + "]" * 63 + "}}")
    with pytest.raises(InvalidArgument, match="deeper than 64"):
        validate_payload("memory_item", deep)


def test_relative_data_paths_resolve_against_the_data_dir_never_the_cwd(tmp_path: Path) -> None:
    cdir = _config_dir(tmp_path, "scheduler:\n  snapshot_dir: snaps\nstorage:\n  sqlite_path: /abs/h.db\n")
    # MFH_DATA_DIR wins; relative paths land under it, absolute ones stay
    s = load_settings("h", config_dir=cdir, env={"MFH_DATA_DIR": str(tmp_path / "d")})
    assert s.data_dir == str(tmp_path / "d")
    assert s.scheduler.snapshot_dir == str(tmp_path / "d" / "snaps") and s.storage.sqlite_path == "/abs/h.db"
    # without it: $XDG_DATA_HOME/mfh, else ~/.local/share/mfh
    s = load_settings("h", config_dir=cdir, env={"XDG_DATA_HOME": str(tmp_path / "x")})
    assert s.scheduler.snapshot_dir == str(tmp_path / "x" / "mfh" / "snaps")
    s = load_settings("h", config_dir=cdir, env={"HOME": str(tmp_path / "home")})
    assert s.scheduler.snapshot_dir == str(tmp_path / "home" / ".local" / "share" / "mfh" / "snaps")


def test_the_default_configuration_ships_inside_the_package() -> None:
    import mfh_models

    assert default_config_dir() == Path(mfh_models.__file__).parent / "config"
    assert {"default.yaml", "main_pc.yaml", "pc2.yaml"} <= {p.name for p in default_config_dir().iterdir()}


@pytest.mark.parametrize(
    "cron", ["30 3 * * *", "*/15 * * * *", "0 0-23/2 1,15 * mon-fri", "5 4 * jan-mar 0", "0 12 31 12 6"]
)
def test_a_valid_audit_cron_is_accepted_and_apscheduler_takes_it(tmp_path: Path, cron: str) -> None:
    from apscheduler.triggers.cron import CronTrigger

    cdir = _config_dir(tmp_path, f"scheduler:\n  audit_cron: '{cron}'\n")
    assert load_settings("h", config_dir=cdir, env={}).scheduler.audit_cron == cron
    CronTrigger.from_crontab(cron, timezone="UTC")


@pytest.mark.parametrize(
    ("cron", "why"),
    [
        ("30 3 * *", "5 fields"),
        ("61 3 * * *", "out of range"),
        ("0 24 * * *", "out of range"),
        ("*/0 * * * *", "step"),
        ("0 3 * * someday", "not a number"),
        ("0 5-2 * * *", "backwards"),
        ("every night", "5 fields"),
    ],
)
def test_a_bad_audit_cron_is_refused_by_settings_validation(tmp_path: Path, cron: str, why: str) -> None:
    cdir = _config_dir(tmp_path, f"scheduler:\n  audit_cron: '{cron}'\n")
    with pytest.raises(ConfigError, match=why) as e:
        load_settings("h", config_dir=cdir, env={})
    assert "scheduler.audit_cron" in str(e.value) and "\n" not in str(e.value)


def test_a_payload_of_an_older_schema_version_is_upcast_on_read() -> None:
    from mfh_models import SCHEMA_VERSION, Kind
    from mfh_models.upcast import Upcasters

    # Given a future release at schema_version 2 that split MemoryItem "content" into "text" + "lang"
    upcasters = Upcasters(target=SCHEMA_VERSION + 1)

    @upcasters.register(Kind.MEMORY_ITEM, from_version=SCHEMA_VERSION)
    def _split_content(p: dict[str, object]) -> dict[str, object]:
        p["text"] = p.pop("content")
        p.setdefault("lang", "en")
        return p

    stored = '{"content":"hello","schema_version":1}'
    # When a stored v1 payload is read
    text, version = upcasters.upcast_text(Kind.MEMORY_ITEM, stored, SCHEMA_VERSION)
    # Then it arrives in v2's shape, and a v2 payload passes untouched
    assert version == SCHEMA_VERSION + 1
    assert json.loads(text) == {"text": "hello", "lang": "en", "schema_version": 2}
    assert upcasters.upcast_text(Kind.MEMORY_ITEM, text, version) == (text, version)
    # A kind with no step, or a payload from a newer release, is a clear error
    with pytest.raises(InvalidArgument, match="no upcaster for session_data"):
        upcasters.upcast_text(Kind.SESSION_DATA, stored, SCHEMA_VERSION)
    with pytest.raises(InvalidArgument, match="newer"):
        upcasters.upcast(Kind.MEMORY_ITEM, {}, SCHEMA_VERSION + 2)


@pytest.mark.parametrize("prefix", ["mfh.events", "mfh.events.audit"])
def test_audit_subjects_inside_the_stream_are_refused(tmp_path: Path, prefix: str) -> None:
    # Given audit subjects the events stream (mfh.events.>) would capture  Then the settings say so
    cdir = _config_dir(tmp_path, f"replication:\n  audit_subject_prefix: '{prefix}'\n")
    with pytest.raises(ConfigError, match="would store the audit's requests"):
        load_settings("h", config_dir=cdir, env={})
    (tmp_path / "ok").mkdir()
    cdir = _config_dir(tmp_path / "ok", "replication:\n  audit_subject_prefix: 'mfh.eventsaudit'\n")
    assert load_settings("h", config_dir=cdir, env={}).replication.audit_subject_prefix == "mfh.eventsaudit"
