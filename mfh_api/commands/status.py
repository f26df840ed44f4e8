"""``mfh status [--json] [--watch]``: this host's health at a glance, green, yellow or red with the reasons.

Reads what the host's processes publish (heartbeats, the replicator's lag, the scheduler's files)
and probes Redis, SQL and NATS itself, so it works while any process is down. Exit code 0 when
green or yellow, 1 when red (and 2 for a bad configuration, as every ``mfh`` command).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from mfh_api.commands import positive_float, store_settings

__all__ = ["register", "render"]

WIDTH = 80
_MARK = {"green": "GREEN", "yellow": "YELLOW", "red": "RED"}


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def _fit(line: str) -> str:
    return line if len(line) <= WIDTH else line[: WIDTH - 1] + "…"


def _wrap(prefix: str, text: str) -> list[str]:
    """``prefix`` then ``text`` wrapped at 80 columns, continuation lines indented under the text."""
    import textwrap

    return textwrap.wrap(text, WIDTH, initial_indent=prefix, subsequent_indent=" " * len(prefix)) or [prefix]


def _front_lines(p: Any) -> list[str]:
    """The replicas behind one ``mfh front``, as its heartbeat last said (every few seconds, and at each change)."""
    out = []
    replicas = p.extra.get("replicas") or []
    live = sum(1 for r in replicas if r.get("live"))
    out.append(_fit(f"    ZeroMQ :{p.extra.get('zmq_port', '?')}  {live} of {len(replicas)} replica(s) live"))
    for r in replicas:
        state = "live" if r.get("live") else f"DEAD ({r.get('why') or 'no answer'})"
        out.append(_fit(f"    replica {r.get('endpoint')!s:<28} {state}"))
    return out


def render(h: Any) -> str:
    """The 80-column report of a :class:`mfh_tasks.health.HostHealth`."""
    now = h.checked_at
    top = h.reasons[0] if h.reasons else None
    lines = [_fit(f"mfh status: host {h.host_id}  {_MARK[h.level]}" + (f"  ({top.component})" if top else ""))]
    lines.append("")
    lines.append("processes")
    roles = ["api", "worker", "replicator", "scheduler"]
    for role in roles + sorted({p.role for p in h.processes} - set(roles)):
        procs = [p for p in h.processes if p.role == role]
        if not procs:
            lines.append(_fit(f"  {role:<11} DOWN"))
        for p in procs:
            port = f"  metrics :{p.metrics_port}" if p.metrics_port else ""
            lines.append(
                _fit(f"  {role:<11} up    pid {p.pid:<7} v{p.version:<8} up {_ago(now - p.started_at):<6}{port}")
            )
            if role == "front":
                lines.extend(_front_lines(p))
    lines.append("services")
    r = h.redis
    if r is not None:
        state = "ok" if r.ok else r.state
        extra = f"  {r.extra.get('persistence', '?')}" if r.ok else f"  {r.detail}"
        lines.append(_fit(f"  {'redis':<11} {state:<5} {_ms(r.latency_ms):<9} {h.redis_where}{extra}"))
    if h.sql is not None:
        lines.append(
            _fit(f"  {'sql':<11} {'ok' if h.sql.ok else h.sql.state:<5} {_ms(h.sql.latency_ms):<9} {h.sql.detail}")
        )
    if h.nats is None:
        lines.append(f"  {'nats':<11} off   (replication disabled)")
    else:
        n = h.nats
        lines.append(_fit(f"  {'nats':<11} {'ok' if n.ok else n.state:<5} {_ms(n.latency_ms):<9} {n.detail}"))
    b = h.backlog
    lines.append("write path")
    if b is None:
        lines.append("  (unknown: Redis did not answer)")
    else:
        oldest = "-" if b.oldest_dirty_age_s is None else _ago(b.oldest_dirty_age_s)
        unpublished = "?" if b.unpublished is None else str(b.unpublished)
        lines.append(_fit(f"  queued {b.queued}  retrying {b.delayed}  dirty {b.dirty} (oldest {oldest})"))
        lines.append(_fit(f"  unpublished events {unpublished}  dead letters {b.dead_letters}"))
    lines.append("replication")
    if h.nats is None:
        lines.append("  off")
    elif not h.peers and h.consumer is None:
        lines.append("  no events from other hosts applied yet")
    for p in h.peers:
        lines.append(
            _fit(f"  from {p.origin:<12} lag {p.lag_s * 1000:.0f} ms  (last event {_ago(now - p.applied_at)} ago)")
        )
    if h.consumer is not None:
        lines.append(_fit(f"  stream backlog: {h.consumer.pending} undelivered, {h.consumer.ack_pending} unacked"))
    lines.append("housekeeping")
    snap = h.snapshot
    lines.append(_fit(f"  snapshot  {'none yet' if snap is None else f'{_ago(now - snap.taken_at)} ago  {snap.path}'}"))
    a = h.audit
    if a is None:
        lines.append("  audit     none yet")
    else:
        verdict = "ok" if a.ok else "MISMATCH"
        lines.append(
            _fit(f"  audit     {verdict}  {_ago(now - a.checked_at)} ago  {a.events} events in {a.seconds:.1f}s")
        )
    v = h.cross_audit
    if v is None:
        lines.append("  hosts     no cross-host audit yet (mfh audit --peers)")
    else:
        n, gone = int(v.get("differences", 0)), sorted(v.get("unreachable") or {})
        verdict = f"DIFFER {n} key(s)" if n or v.get("truncated") else "equal"
        compared = f"{len(v.get('hosts', []))} host(s)" + (f", no answer: {', '.join(gone)}" if gone else "")
        lines.append(_fit(f"  hosts     {verdict}  {_ago(now - float(v.get('checked_at', 0)))} ago  {compared}"))
    if h.reasons:
        lines.append("")
        for reason in h.reasons:
            lines.extend(_wrap(f"{reason.level.upper():<7}{reason.component}: ", reason.message))
    else:
        lines.append("")
        lines.append("all green")
    return "\n".join(lines)


def _once(args: argparse.Namespace) -> tuple[int, str]:
    from mfh_tasks.health import gather

    h = asyncio.run(gather(store_settings(args), timeout_s=args.timeout))
    out = json.dumps(h.as_dict(), indent=None if args.watch else 2, sort_keys=True) if args.json else render(h)
    return (1 if h.level == "red" else 0), out


def _run(args: argparse.Namespace) -> int:
    if not args.watch:
        code, out = _once(args)
        print(out)
        return code
    clear = sys.stdout.isatty() and not args.json
    code = 0
    try:
        while True:
            code, out = _once(args)
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")
            print(out, flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return code


def register(subparsers: Any) -> None:
    """Add ``mfh status``."""
    p = subparsers.add_parser(
        "status",
        help="this host at a glance: processes, stores, backlog, replication, audits (exit 1 when red)",
        description="Green, yellow or red for this host, with the reasons. Exit code 1 when red.",
    )
    p.add_argument("--json", action="store_true", help="one JSON document (with --watch: one per line)")
    p.add_argument("--watch", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=positive_float, default=2.0, help="seconds between refreshes (default: 2)")
    p.add_argument("--timeout", type=positive_float, default=2.0, help="seconds per probe (default: 2)")
    p.set_defaults(func=_run)
