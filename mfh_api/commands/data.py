"""``mfh get|put|delete|list``: read and write memories by hand, over gRPC or ZeroMQ, with the client library.

Output is for people (``--json`` for scripts); errors go to stderr with an exit code per error
kind (see :data:`mfh_api.commands.EXIT_CODES`), so shell scripts can tell NOT_FOUND from a
conflict or an outage.

The API key comes from ``--api-key``, else ``MFH_API_KEY``, else the host's ``server.api_key``;
the endpoint from ``--endpoint``, else the host's ports. The host's configuration (YAML, a hub
dependency) is only read when one of them is missing, so with the base install (the client alone)
``mfh get ns key --endpoint HOST:PORT`` works.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from mfh_api.commands import (
    NEEDS_SERVER,
    add_json,
    count,
    error_line,
    exit_code,
    fail,
    missing_server_library,
    non_negative_int,
    positive_float,
    settings_from,
)
from mfh_client.types import Durability, PutResult, PutSpec
from mfh_models import InvalidArgument, MFHError, Record, decode_untrusted_json

__all__ = ["register"]


class _Client(Protocol):
    def get(self, namespace: str, key: str) -> Record: ...
    def put(self, spec: PutSpec, *, durability: Durability = ...) -> PutResult: ...
    def delete(
        self, namespace: str, key: str, *, expected_version: int | None = ..., durability: Durability = ...
    ) -> PutResult: ...
    def list(
        self,
        namespace: str,
        *,
        kind: str | None = ...,
        key_prefix: str = ...,
        page_size: int = ...,
        page_token: str = ...,
        include_deleted: bool = ...,
    ) -> tuple[list[Record], str]: ...
    def close(self) -> None: ...


def _local(bind: str) -> str:
    """Where a client on this machine reaches a server bound to ``bind``."""
    if bind in ("0.0.0.0", "*", ""):
        return "127.0.0.1"
    if bind == "::":
        return "[::1]"
    return f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind


_ZMQ_ENDPOINT = re.compile(r"^(tcp://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):\d{1,5}|ipc://\S+)$")
_GRPC_ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):\d{1,5}$|^(dns|ipv4|ipv6|unix|unix-abstract):\S+$")


def _check_endpoints(transport: str, endpoints: list[str]) -> None:
    """Refuse an endpoint the transport cannot parse (libzmq and gRPC would fail with a cryptic error)."""
    pattern, example = (_ZMQ_ENDPOINT, "tcp://host:port") if transport == "zmq" else (_GRPC_ENDPOINT, "host:port")
    for e in endpoints:
        if not pattern.match(e):
            raise _Usage(f"--endpoint {e[:80]!r} is not a {transport} endpoint ({example})")


def _key_and_endpoints(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The API key and endpoints: the flags, then MFH_API_KEY, then the host's settings when needed."""
    key: str | None = args.api_key or os.environ.get("MFH_API_KEY") or None
    endpoints: list[str] = list(args.endpoint or [])
    _check_endpoints(args.transport, endpoints)
    if key is not None and endpoints:
        return key, endpoints
    settings = _host_settings(args, endpoints)
    if settings is None:
        return key, endpoints
    s = settings.server
    if key is None and s.api_key:
        key = s.api_key.get_secret_value()
    if not endpoints:
        host = _local(s.bind)
        endpoints = [f"tcp://{host}:{s.zmq_port}" if args.transport == "zmq" else f"{host}:{s.grpc_port}"]
    return key, endpoints


def _host_settings(args: argparse.Namespace, endpoints: list[str]) -> Any:
    """The host's settings, or None on the base install (no YAML) when the flags say enough."""
    try:
        return settings_from(args)
    except ModuleNotFoundError as e:  # the base install: no YAML, so no host configuration to read
        if missing_server_library(e) is None:
            raise
        if endpoints:
            return None
        raise _Usage(f"give --endpoint (reading the host's configuration for it: {NEEDS_SERVER})") from None


def _security(args: argparse.Namespace) -> dict[str, Any]:
    """TLS / CURVE options of the client: the flags, then their variables, then (CURVE) the host's key pair."""
    from mfh_client.security import CurveConfig, TlsConfig

    def flag(name: str, var: str) -> str | None:
        value: str | None = getattr(args, name) or os.environ.get(var) or None
        return value

    if args.transport == "zmq":
        server_key = flag("curve_server_key", "MFH_CURVE_SERVER_KEY")
        if server_key is None and not args.endpoint:  # this host's own api: its key pair names its public key
            server_key = _host_settings(args, []).server.zmq_curve_secret_file
        if server_key is None:
            return {}
        return {"curve": CurveConfig.from_files(server_key, flag("curve_secret", "MFH_CURVE_CLIENT_SECRET"))}
    ca, cert, key = (
        flag("tls_ca", "MFH_TLS_CA"),
        flag("tls_cert", "MFH_TLS_CLIENT_CERT"),
        flag("tls_key", "MFH_TLS_CLIENT_KEY"),
    )
    if ca is None and cert is None and (args.endpoint or not _host_settings(args, []).server.tls):
        return {}
    if ca is None and cert is None:
        raise _Usage("this host's api serves TLS: give --tls-ca (the CA of server.tls_cert_file) or MFH_TLS_CA")
    return {
        "tls": TlsConfig(
            ca_file=ca, cert_file=cert, key_file=key, server_name=flag("tls_server_name", "MFH_TLS_SERVER_NAME")
        )
    }


def _client(args: argparse.Namespace) -> _Client:
    key, endpoints = _key_and_endpoints(args)
    security = _security(args)
    if args.transport == "zmq":
        from mfh_client import ZmqClient

        return ZmqClient(endpoints, api_key=key, timeout=args.timeout, retries=args.retries, **security)
    from mfh_client import MemoryClient

    return MemoryClient(endpoints, api_key=key, timeout=args.timeout, retries=args.retries, **security)


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _as_json(r: Record) -> dict[str, Any]:
    return {**r.model_dump(mode="json"), "payload": r.payload_obj()}


def _get(c: _Client, args: argparse.Namespace) -> None:
    r = c.get(args.namespace, args.key)
    if args.json:
        print(json.dumps(_as_json(r), indent=2, sort_keys=True))
        return
    print(f"{r.namespace}/{r.key}  kind={r.kind.value}  version={r.version}  origin={r.origin}  {_when(r.updated_at)}")
    print(json.dumps(r.payload_obj(), indent=2, sort_keys=True, ensure_ascii=False))


def _payload(args: argparse.Namespace) -> Any:
    if args.file:
        try:
            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        except OSError as e:
            raise _Usage(f"cannot read {args.file}: {e.strerror or e}") from None
    elif args.payload is not None:
        text = args.payload
    else:
        raise _Usage("give the payload as an argument, or with --file PATH (--file - reads stdin)")
    try:
        return decode_untrusted_json(text, what="the payload")
    except InvalidArgument as e:
        raise _Usage(e.message) from None


def _durability(args: argparse.Namespace) -> Durability:
    return Durability.PERSISTED if args.persisted else Durability.ACCEPTED


def _written(args: argparse.Namespace, res: PutResult, verb: str) -> None:
    if args.json:
        doc = {"namespace": args.namespace, "key": args.key, "version": res.version, "event_id": res.event_id}
        print(json.dumps({**doc, "deleted": verb == "deleted"}, sort_keys=True))
    else:
        print(f"{verb} {args.namespace}/{args.key} version={res.version} event={res.event_id}")


def _put(c: _Client, args: argparse.Namespace) -> None:
    spec = PutSpec(
        args.namespace,
        args.key,
        args.kind,
        _payload(args),
        expected_version=args.expected_version,
        ttl_seconds=args.ttl or None,
    )
    _written(args, c.put(spec, durability=_durability(args)), "put")


def _delete(c: _Client, args: argparse.Namespace) -> None:
    res = c.delete(args.namespace, args.key, expected_version=args.expected_version, durability=_durability(args))
    _written(args, res, "deleted")


def _list(c: _Client, args: argparse.Namespace) -> None:
    token, shown = args.page_token, 0
    while True:
        records, token = c.list(
            args.namespace,
            kind=args.kind,
            key_prefix=args.prefix,
            page_size=args.page_size,
            page_token=token,
            include_deleted=args.include_deleted,
        )
        for r in records:
            if args.json:
                print(json.dumps(_as_json(r), sort_keys=True))
            else:
                mark = "  (deleted)" if r.deleted else ""
                print(f"{r.key}\t{r.kind.value}\tversion={r.version}\t{_when(r.updated_at)}{mark}")
        shown += len(records)
        if not token or not args.all:
            break
    if token:
        print(f"more: --page-token {token}", file=sys.stderr)
    elif not args.json and shown == 0:
        print(f"no records in {args.namespace}", file=sys.stderr)


class _Usage(Exception):
    """A command-line mistake found after parsing (exit code 2)."""


def _runner(action: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            client = _client(args)
        except _Usage as e:
            return fail(str(e), 2)
        try:
            action(client, args)
        except _Usage as e:
            return fail(str(e), 2)
        except MFHError as e:
            return fail(error_line(e), exit_code(e))
        except BrokenPipeError:  # the reader of stdout left (``| head -1``): mfh_api.cli ends quietly
            raise
        except OSError as e:
            return fail(str(e))
        finally:
            client.close()
        return 0

    return run


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", choices=("grpc", "zmq"), default="grpc", help="default: grpc")
    p.add_argument(
        "--endpoint",
        action="append",
        help="host:port (gRPC) or tcp://host:port (ZeroMQ); repeat for failover (default: this host's api)",
    )
    p.add_argument("--timeout", type=positive_float, default=5.0, help="seconds per attempt (default: 5)")
    p.add_argument("--retries", type=count, default=1, help="retries of a failed idempotent call (default: 1)")
    p.add_argument(
        "--api-key",
        help="the hub's API key (default: $MFH_API_KEY, else the host's server.api_key; "
        "the variable keeps it out of the process list)",
    )
    sec = p.add_argument_group("transport security (docs/security.md)")
    sec.add_argument("--tls-ca", help="gRPC over TLS: the CA file the hub's certificate chains to ($MFH_TLS_CA)")
    sec.add_argument("--tls-cert", help="this client's certificate, for a hub that requires one ($MFH_TLS_CLIENT_CERT)")
    sec.add_argument("--tls-key", help="its private key ($MFH_TLS_CLIENT_KEY)")
    sec.add_argument("--tls-server-name", help="the name to check the hub's certificate against ($MFH_TLS_SERVER_NAME)")
    sec.add_argument(
        "--curve-server-key",
        help="ZeroMQ over CURVE: the hub's public .key file ($MFH_CURVE_SERVER_KEY; default: this host's key pair)",
    )
    sec.add_argument(
        "--curve-secret",
        help="this client's .key_secret file, for a hub listing its clients ($MFH_CURVE_CLIENT_SECRET)",
    )


def register(subparsers: Any) -> None:
    """Add ``mfh get``, ``put``, ``delete`` and ``list``."""
    get = subparsers.add_parser("get", help="print one memory", description="Print one live record and its payload.")
    get.add_argument("namespace")
    get.add_argument("key")
    add_json(get, "the whole record as JSON")
    _common(get)
    get.set_defaults(func=_runner(_get))

    put = subparsers.add_parser("put", help="write one memory", description="Create or replace one record.")
    put.add_argument("namespace")
    put.add_argument("key")
    put.add_argument("payload", nargs="?", help='the payload JSON, e.g. \'{"content": "..."}\'')
    put.add_argument("--file", help="read the payload JSON from a file ('-' for stdin)")
    put.add_argument("--kind", default="memory_item", choices=("memory_item", "session_data", "knowledge_record"))
    put.add_argument(
        "--expected-version", type=non_negative_int, help="write only if the key is at this version (0: absent)"
    )
    put.add_argument("--persisted", action="store_true", help="answer after the SQL commit, not on acceptance")
    put.add_argument(
        "--ttl", type=non_negative_int, metavar="SECONDS", help="the record expires this long after the put"
    )
    add_json(put, "the version and event id as JSON")
    _common(put)
    put.set_defaults(func=_runner(_put))

    delete = subparsers.add_parser("delete", help="delete one memory", description="Tombstone one record.")
    delete.add_argument("namespace")
    delete.add_argument("key")
    delete.add_argument("--expected-version", type=non_negative_int, help="delete only if the key is at this version")
    delete.add_argument("--persisted", action="store_true", help="answer after the SQL commit")
    add_json(delete, "the tombstone's version and event id as JSON")
    _common(delete)
    delete.set_defaults(func=_runner(_delete))

    ls = subparsers.add_parser("list", help="list a namespace", description="List records in key order.")
    ls.add_argument("namespace")
    ls.add_argument("--kind", choices=("memory_item", "session_data", "knowledge_record"))
    ls.add_argument("--prefix", default="", help="only keys starting with this")
    ls.add_argument("--page-size", type=non_negative_int, default=100, help="0: the server's default")
    ls.add_argument("--page-token", default="", help="continue from a previous listing")
    ls.add_argument("--all", action="store_true", help="follow page tokens to the end")
    ls.add_argument("--include-deleted", action="store_true", help="show tombstones too")
    add_json(ls, "one JSON record per line (JSON lines: --all streams page after page)")
    _common(ls)
    ls.set_defaults(func=_runner(_list))
