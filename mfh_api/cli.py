"""``mfh``, the one command: each module of :mod:`mfh_api.commands` registers its subcommands.

Global options (``--host``, ``--config-dir``) are accepted before or after the subcommand, so
``mfh --host pc2 api`` and ``mfh api --host pc2`` mean the same.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

from mfh_api import commands
from mfh_models import ConfigError

__all__ = ["build_parser", "main"]


def _add_globals(parser: argparse.ArgumentParser, default: Any) -> None:
    have = parser._option_string_actions
    if "--host" not in have:
        parser.add_argument(
            "--host", default=default, help="host whose config/<host>.yaml to load (default: $MFH_HOST)"
        )
    if "--config-dir" not in have:
        parser.add_argument(
            "--config-dir", default=default, help="directory of default.yaml and the host files (default: config/)"
        )


def _add_globals_everywhere(parser: argparse.ArgumentParser) -> None:
    """Also accept the global options after a (sub)subcommand; SUPPRESS keeps an earlier value."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _add_globals(sub, argparse.SUPPRESS)
                _add_globals_everywhere(sub)


def build_parser() -> argparse.ArgumentParser:
    """The parser with every command module's subcommands."""
    parser = argparse.ArgumentParser(
        prog="mfh", description="Memory Fusion Hub: run its processes, read and write memories."
    )
    _add_globals(parser, None)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{commands.__name__}.{info.name}")
        except Exception as e:  # one broken command module must not take the others down
            print(f"mfh: commands/{info.name}.py failed to load: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        register = getattr(module, "register", None)
        if callable(register):
            register(subparsers)
    _add_globals_everywhere(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the chosen command, return its exit code (2 for usage and configuration errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except ConfigError as e:
        print(f"mfh: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
