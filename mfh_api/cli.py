"""``mfh``, the one command: each module of :mod:`mfh_api.commands` registers its subcommands.

Global options (``--host``, ``--config-dir``) are accepted before or after the subcommand, so
``mfh --host pc2 api`` and ``mfh api --host pc2`` mean the same. ``mfh --version`` prints the
installed version.

Never a traceback: every error is one ``mfh: ...`` line on stderr with its exit code. When stdout
is closed early (``mfh list --all ns | head -1``) the command stops quietly with exit code 141
(128 + SIGPIPE, what a shell reports for ``yes | head -1``).

This module imports nothing of the hub at the top: with the base install (the client alone),
``get``/``put``/``delete``/``list`` run, and a hub command says which extra to install.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import pkgutil
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

from mfh_api import commands
from mfh_api.commands import error_line, exit_code, fail, missing_server_library
from mfh_models import ConfigError, MFHError

__all__ = ["EXIT_BROKEN_PIPE", "build_parser", "main", "version"]

_SURROGATE = re.compile("[\ud800-\udfff]")
_URL_PASSWORD = re.compile(r"(://[^\s:/@]*:)[^\s@]+@")
#: Exit code when the reader of stdout went away (128 + SIGPIPE, as a shell reports it).
EXIT_BROKEN_PIPE: Final = 141
DISTRIBUTION: Final = "memory-fusion-hub"


def version() -> str:
    """The installed distribution's version (``unknown`` when run from a checkout that is not installed)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _configure_logging(argv: Sequence[str] | None) -> None:
    """The command's own log lines: JSON with ``--json`` (the hub's formatter), else one plain line each."""
    if "--json" in (sys.argv[1:] if argv is None else argv):
        try:
            from mfh_core.jsonlog import configure_json_logging
        except ModuleNotFoundError:  # the base install: no server package's libraries
            pass
        else:
            configure_json_logging(logging.WARNING, process="mfh")
            return
    logging.basicConfig(level=logging.WARNING, format="mfh: %(levelname)s %(name)s: %(message)s")


def _redaction() -> tuple[Callable[[], object], Callable[[str], str]]:
    """The hub's log redaction, or (base install: no hub, no hub logs) URL-password masking alone."""
    try:
        from mfh_core.redaction import install_redaction, redact_text
    except ModuleNotFoundError as e:
        if missing_server_library(e) is None:
            raise
        return (lambda: None), (lambda text: _URL_PASSWORD.sub(r"\1***@", text))
    return install_redaction, redact_text


def _add_globals(parser: argparse.ArgumentParser, default: Any) -> None:
    have = parser._option_string_actions
    if "--host" not in have:
        parser.add_argument(
            "--host",
            default=default,
            help="host whose <config-dir>/<host>.yaml to load (default: $MFH_HOST; unset: main_pc, "
            "or default.yaml alone when there is no main_pc.yaml)",
        )
    if "--config-dir" not in have:
        parser.add_argument(
            "--config-dir",
            default=default,
            help="directory of default.yaml and the host files (default: $MFH_CONFIG_DIR, else the shipped config/)",
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
    parser.add_argument("--version", action="version", version=f"mfh {version()}")
    _add_globals(parser, None)
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{commands.__name__}.{info.name}")
        except ModuleNotFoundError as e:
            if missing_server_library(e) is not None:  # the base install: this module's commands need the hub
                continue
            print(f"mfh: commands/{info.name}.py failed to load: {type(e).__name__}: {e}", file=sys.stderr)
            continue
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
    anything unexpected one line with exit code 1, a closed stdout exit code 141 and no message.
    """
    try:
        code = _run(argv)
    except SystemExit as e:  # argparse: --help, --version, a usage error (its message is printed)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BrokenPipeError:
        return _stdout_gone()
    try:
        sys.stdout.flush()  # a closed pipe shows here, not as "Exception ignored" at the interpreter's exit
    except BrokenPipeError:
        return _stdout_gone()
    return code


def _run(argv: Sequence[str] | None) -> int:
    _configure_logging(argv)
    install_redaction, redact_text = _redaction()
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
        code = int(func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        raise
    except ConfigError as e:
        return fail(str(e), 2)
    except MFHError as e:
        return fail(error_line(e), exit_code(e))
    except ModuleNotFoundError as e:
        needs = missing_server_library(e)
        if needs is not None:
            return fail(needs, 2)
        return fail(f"unexpected {type(e).__name__}: {redact_text(str(e))[:200]}")
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a bug of ours: say so in one line; a traceback could quote a payload
        return fail(f"unexpected {type(e).__name__}: {redact_text(str(e))[:200]}")


def _stdout_gone() -> int:
    """The reader of stdout left: no message, no "Exception ignored" at exit, exit code 141."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout was not a file descriptor
        pass
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
