"""``mfh search`` and ``mfh namespaces``: find memories without their keys, list the namespaces in use."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from mfh_api.commands import add_json, non_negative_int
from mfh_api.commands.data import _as_json, _common, _runner, _Usage, _when
from mfh_client.types import MetadataFilter

__all__ = ["register"]

_OPS = ("eq", "ne", "lt", "lte", "gt", "gte", "in")


def _condition(text: str) -> MetadataFilter:
    """``field:op:json`` (``priority:gte:3``, ``lang:in:["en","de"]``); a value that is not JSON is a string."""
    parts = text.split(":", 2)
    if len(parts) != 3 or parts[1] not in _OPS:
        raise argparse.ArgumentTypeError(f"expected field:op:value with op one of {', '.join(_OPS)}, got {text!r}")
    try:
        value = json.loads(parts[2])
    except ValueError:
        value = parts[2]
    return MetadataFilter(parts[0], parts[1], value)


def _embedding(args: argparse.Namespace) -> list[float]:
    if not args.embedding:
        return []
    try:
        vec = json.loads(args.embedding)
    except ValueError as e:
        raise _Usage(f"--embedding is not JSON: {e}") from None
    if not isinstance(vec, list):
        raise _Usage("--embedding must be a JSON array of numbers")
    return vec


def _search(c: Any, args: argparse.Namespace) -> None:
    if bool(args.namespace) == bool(args.under):
        raise _Usage("give a namespace or --under PREFIX (one of them)")
    hits = c.search(
        args.namespace or "",
        namespace_prefix=args.under or "",
        query=args.query or "",
        kinds=args.kind or (),
        tags=args.tag or (),
        metadata=args.where or (),
        updated_after_ms=args.updated_after,
        updated_before_ms=args.updated_before,
        embedding=_embedding(args),
        top_k=args.top_k,
    )
    for h in hits:
        r = h.record
        if args.json:
            print(json.dumps({**_as_json(r), "score": h.score}, sort_keys=True))
        else:
            print(f"{h.score:.4f}\t{r.namespace}/{r.key}\t{r.kind.value}\tversion={r.version}\t{_when(r.updated_at)}")
    if not hits and not args.json:
        print("no matches", file=sys.stderr)


def _namespaces(c: Any, args: argparse.Namespace) -> None:
    token = args.page_token
    while True:
        names, token = c.list_namespaces(
            prefix=args.prefix, max_depth=args.max_depth, page_size=args.page_size, page_token=token
        )
        for n in names:
            print(n)
        if not token or not args.all:
            break
    if token:
        print(f"more: --page-token {token}", file=sys.stderr)


def register(subparsers: Any) -> None:
    """Add ``mfh search`` and ``mfh namespaces``."""
    kinds = ("memory_item", "session_data", "knowledge_record")
    p = subparsers.add_parser(
        "search", help="find memories", description="Filter, full-text and/or vector search (docs/api.md)."
    )
    p.add_argument("namespace", nargs="?", help="the namespace to search (or use --under)")
    p.add_argument("--under", metavar="PREFIX", help="search this namespace and the names below it")
    p.add_argument("-q", "--query", help="words that must all occur (ranked)")
    p.add_argument("--kind", action="append", choices=kinds, help="only this kind (repeatable)")
    p.add_argument("--tag", action="append", help="only records with this tag (repeatable: all of them)")
    p.add_argument("--where", action="append", type=_condition, help="metadata condition field:op:value")
    p.add_argument("--updated-after", type=non_negative_int, metavar="MS", help="changed at or after (unix ms)")
    p.add_argument("--updated-before", type=non_negative_int, metavar="MS", help="changed before (unix ms)")
    p.add_argument("--embedding", help="query vector as a JSON array (ranked by cosine)")
    p.add_argument("--top-k", type=non_negative_int, default=10, help="results (default 10, at most 1000)")
    add_json(p, "one JSON record (with its score) per line")
    _common(p)
    p.set_defaults(func=_runner(_search))

    ns = subparsers.add_parser(
        "namespaces", help="list namespaces", description="Namespaces holding live records, ascending."
    )
    ns.add_argument("--prefix", default="", help="only this name and the names below it")
    ns.add_argument("--max-depth", type=non_negative_int, default=0, help="cut names to this many segments")
    ns.add_argument("--page-size", type=non_negative_int, default=100)
    ns.add_argument("--page-token", default="")
    ns.add_argument("--all", action="store_true", help="follow page tokens to the end")
    _common(ns)
    ns.set_defaults(func=_runner(_namespaces))
