"""``mfh config show``: the merged settings one host runs with, secrets masked, to check a deployment."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mfh_api.commands import add_json, settings_from

__all__ = ["register"]


def _show(args: argparse.Namespace) -> int:
    import yaml  # the hub's dependency (settings are YAML), imported here so the base install can list commands

    data = settings_from(args).masked()
    if args.format == "json" or args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="")
    return 0


def register(subparsers: Any) -> None:
    """Add ``mfh config show``."""
    config = subparsers.add_parser("config", help="inspect the configuration")
    actions = config.add_subparsers(title="config commands", metavar="ACTION")
    show = actions.add_parser(
        "show",
        help="print the merged settings (default.yaml + host file + environment), secrets masked",
        description="Print default.yaml merged with the host file and ${VAR}s; API key and URL passwords masked.",
    )
    show.add_argument("--format", choices=("yaml", "json"), default="yaml")
    add_json(show, "the same as --format json")
    show.set_defaults(func=_show)
