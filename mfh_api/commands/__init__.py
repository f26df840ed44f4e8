"""Subcommands of ``mfh``: every module here with ``register(subparsers) -> None`` adds its own.

A command sets ``func`` on its parser (``parser.set_defaults(func=run)``); ``run(args) -> int``
returns the exit code. Global options ``--host`` and ``--config-dir`` arrive as ``args.host`` and
``args.config_dir``; :func:`settings_from` turns them into the one Settings object.

A command module imports the hub's libraries (YAML, Redis, SQLAlchemy, ...) inside its ``run``
functions, never at the top: the base install (the client alone) must still build the parser and
run ``get``/``put``/``delete``/``list``. A command that needs the hub there exits 2 with
:data:`NEEDS_SERVER` (see :func:`missing_server_library`).

Every command that prints a result takes ``--json`` (:func:`add_json`) and prints it with
:func:`emit`: one JSON document on stdout, or a line for people.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from mfh_models import (
    InvalidArgument,
    MFHError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StoreDamaged,
    Unauthenticated,
    Unavailable,
    VersionConflict,
)

if TYPE_CHECKING:
    from mfh_models import Settings

__all__ = [
    "EXIT_CODES",
    "NEEDS_POSTGRES",
    "NEEDS_SERVER",
    "SERVER_LIBRARIES",
    "add_json",
    "count",
    "emit",
    "error_line",
    "exit_code",
    "fail",
    "host_env",
    "missing_server_library",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "settings_from",
]

#: The one line a command that needs the hub prints on the base install (exit code 2).
NEEDS_SERVER: Final = "this command needs the hub: pip install 'memory-fusion-hub[server]'"
NEEDS_POSTGRES: Final = "a postgresql:// URL needs its driver ({module}): pip install 'memory-fusion-hub[postgres]'"
#: Import names of the libraries the ``[server]`` and ``[postgres]`` extras bring.
SERVER_LIBRARIES: Final = frozenset(
    {
        "yaml",
        "redis",
        "hiredis",
        "sqlalchemy",
        "dramatiq",
        "nats",
        "apscheduler",
        "prometheus_client",
        "grpc_health",
        "grpc_reflection",
        "psycopg2",
        "psycopg",
        "alembic",
    }
)

#: Exit codes of ``mfh`` (README "Operating"), first match wins:
#:
#: ==== =====================================================================
#: 0    ok
#: 1    other error (an audit or restore whose checksums differ, hosts whose keys differ, a bug)
#: 2    usage, invalid argument or configuration
#: 3    not found
#: 4    version conflict
#: 5    unavailable or exhausted: worth retrying
#: 6    unauthenticated, or the key may not do that (PERMISSION_DENIED)
#: 7    the SQL store's file is corrupt or missing: no retry mends it; restore it
#: 8    ``mfh audit --peers``: equal among the hosts that answered, but some host did not answer
#: ==== =====================================================================
EXIT_CODES: Final[tuple[tuple[type[MFHError], int], ...]] = (
    (InvalidArgument, 2),
    (NotFound, 3),
    (VersionConflict, 4),
    (StoreDamaged, 7),  # before Unavailable, its base class: not worth retrying
    (Unavailable, 5),  # includes DeadlineExceeded: worth retrying
    (ResourceExhausted, 5),
    (Unauthenticated, 6),
    (PermissionDenied, 6),  # the key is valid, but not for that namespace or not for writing
)


def exit_code(e: MFHError) -> int:
    """The exit code for a hub error (1 for anything not in the table)."""
    for cls, code in EXIT_CODES:
        if isinstance(e, cls):
            return code
    return 1


def _int(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text[:40]} is below {least}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: an integer from 0 (a version, a page size), refused at parse time with exit code 2."""
    return _int(text, 0)


def positive_int(text: str) -> int:
    """An argparse type: an integer from 1 (a count of processes, threads, rows)."""
    return _int(text, 1)


count = non_negative_int  # retries, limits


def _float(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text[:40]} is not a number of seconds {'from' if zero else 'above'} 0")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (seconds)."""
    return _float(text, zero=False)


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number from 0 (seconds)."""
    return _float(text, zero=True)


def fail(message: str, code: int = 1) -> int:
    """Print ``mfh: message`` to stderr and return ``code`` (for ``return fail(...)``)."""
    print(f"mfh: {message}", file=sys.stderr)
    return code


def error_line(e: MFHError) -> str:
    """``CODE: message``, with how to give a key when the key was the problem."""
    line = f"{e.code}: {e.message}"
    if isinstance(e, Unauthenticated):
        line += " (pass --api-key or set MFH_API_KEY)"
    elif isinstance(e, PermissionDenied):
        line += " (the key is valid; ask for a key whose scope covers it)"
    return line


def missing_server_library(e: ModuleNotFoundError) -> str | None:
    """The one line for a library of the ``[server]``/``[postgres]`` extras that is not installed, else None."""
    top = (e.name or "").split(".")[0]
    if top not in SERVER_LIBRARIES:
        return None
    return NEEDS_POSTGRES.format(module=top) if top in ("psycopg2", "psycopg") else NEEDS_SERVER


def add_json(parser: argparse.ArgumentParser, help: str = "print the result as one JSON document") -> None:
    """The ``--json`` flag of a command that prints a result."""
    parser.add_argument("--json", action="store_true", help=help)


def emit(args: argparse.Namespace, doc: Mapping[str, Any], text: str) -> None:
    """Print ``doc`` as one JSON document with ``--json``, else ``text`` (for people)."""
    print(json.dumps(doc, sort_keys=True) if getattr(args, "json", False) else text)


def settings_from(args: argparse.Namespace, overrides: Mapping[str, Any] | None = None) -> Settings:
    """The merged settings for ``--host`` (else MFH_HOST) and ``--config-dir`` (else MFH_CONFIG_DIR)."""
    from mfh_models import load_settings  # YAML: the hub's dependency, not the client's

    return load_settings(getattr(args, "host", None), config_dir=getattr(args, "config_dir", None), overrides=overrides)


def store_settings(args: argparse.Namespace) -> Settings:
    """:func:`settings_from`, for a command that reads this host's stores (status, checksum, audit,
    snapshot, restore, replay): with neither MFH_DATA_DIR nor the configuration naming a data
    directory, the one this host's running processes announce in their heartbeats, so a second
    terminal finds the store ``scripts/run.sh`` (or a service manager) gave the hub. It is exported
    as MFH_DATA_DIR for the child processes a command starts, and named on stderr."""
    from mfh_core.heartbeat import announced_data_dirs
    from mfh_models import default_data_dir

    settings = settings_from(args)
    if os.environ.get("MFH_DATA_DIR") or settings.data_dir != str(default_data_dir(os.environ)):
        return settings
    announced = announced_data_dirs(settings.storage.redis_url, settings.storage.redis_prefix, settings.host_id)
    if len(announced) > 1:
        print(
            f"mfh: this host's processes use different data directories ({', '.join(sorted(announced))}); "
            f"reading {settings.data_dir} (set MFH_DATA_DIR to pick one)",
            file=sys.stderr,
        )
        return settings
    if not announced or announced == {settings.data_dir}:
        return settings
    (data_dir,) = announced
    print(f"mfh: using the running hub's data directory {data_dir} (MFH_DATA_DIR is not set)", file=sys.stderr)
    os.environ["MFH_DATA_DIR"] = data_dir
    return settings_from(args)


def host_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment for a child process that reads its settings itself (``dramatiq`` workers)."""
    env = dict(os.environ)
    if getattr(args, "host", None):
        env["MFH_HOST"] = args.host
    if getattr(args, "config_dir", None):
        env["MFH_CONFIG_DIR"] = str(args.config_dir)
    return env
