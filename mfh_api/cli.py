"""``mfh``, the one command: each module of :mod:`mfh_api.commands` registers its subcommands.

Global options (``--host``, ``--config-dir``) are accepted before or after the subcommand, so
``mfh --host pc2 api`` and ``mfh api --host pc2`` mean the same.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import re
import sys
from collections.abc import Sequence
from typing import Any

from mfh_api import commands
from mfh_api.commands import exit_code, fail
from mfh_core.jsonlog import configure_json_logging
from mfh_core.redaction import install_redaction, redact_text
from mfh_models import ConfigError, MFHError

__all__ = ["build_parser", "main"]

_SURROGATE = re.compile("[\ud800-\udfff]")


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


def _not_utf8(args: argparse.Namespace) -> str | None:
    """The first option whose value did not decode as UTF-8 (Python keeps such bytes as lone surrogates)."""
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and _SURROGATE.search(item):
                return name
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the chosen command, return its exit code (2 for usage and configuration errors).

    Never a traceback: a hub error is one line with its exit code (:data:`mfh_api.commands.EXIT_CODES`),
    anything unexpected one line with exit code 1.
    """
    if "--json" in (sys.argv[1:] if argv is None else argv):  # the command's own log lines as JSON too
        configure_json_logging(logging.WARNING, process="mfh")
    else:
        logging.basicConfig(level=logging.WARNING, format="mfh: %(levelname)s %(name)s: %(message)s")
    install_redaction()
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    bad = _not_utf8(args)
    if bad is not None:
        return fail(f"argument {bad.replace('_', '-')} is not valid UTF-8", 2)
    try:
        return int(func(args) or 0)
    except ConfigError as e:
        return fail(str(e), 2)
    except MFHError as e:
        return fail(f"{e.code}: {e.message}", exit_code(e))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug of ours: say so in one line; a traceback could quote a payload
        return fail(f"unexpected {type(e).__name__}: {redact_text(str(e))[:200]}")


if __name__ == "__main__":
    sys.exit(main())
