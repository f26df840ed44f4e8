"""``mfh front``: one ZeroMQ door on ``server.zmq_port`` (5713) for several api replicas of a host."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from mfh_api.commands import fail, settings_from

__all__ = ["register"]


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (0-65535)")
    return port


def _front(args: argparse.Namespace) -> int:
    from mfh_api.front_app import configure_front_logging, run_front

    overrides: dict[str, Any] = {}
    if args.zmq_port is not None:
        overrides["server"] = {"zmq_port": args.zmq_port}
    if args.metrics_port is not None:
        overrides["metrics"] = {"front_port": args.metrics_port}
    if args.replica:
        overrides["front"] = {"replicas": args.replica}
    settings = settings_from(args, overrides or None)  # a bad --replica fails here, readably
    configure_front_logging(settings)
    try:
        asyncio.run(run_front(settings, insecure=args.insecure))
    except OSError as e:  # typically the port already in use
        return fail(f"front: {e}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``mfh front``."""
    front = subparsers.add_parser(
        "front",
        help="serve ZeroMQ on server.zmq_port for several api replicas",
        description="Bind the ZeroMQ door (v1 and v0) and spread its requests over the api replicas, "
        "dropping one that stops answering; runs until SIGTERM.",
    )
    front.add_argument(
        "--replica",
        action="append",
        metavar="ENDPOINT",
        help="an api replica's ZeroMQ endpoint, e.g. tcp://127.0.0.1:5715 (repeat it; default: front.replicas)",
    )
    front.add_argument("--zmq-port", type=_port, help="override server.zmq_port (0: any free)")
    front.add_argument("--metrics-port", type=_port, help="override metrics.front_port (0: no metrics endpoint)")
    front.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without CURVE")
    front.set_defaults(func=_front)
