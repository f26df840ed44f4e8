"""Subcommands of ``mfh``: every module here with ``register(subparsers) -> None`` adds its own.

A command sets ``func`` on its parser (``parser.set_defaults(func=run)``); ``run(args) -> int``
returns the exit code. Global options ``--host`` and ``--config-dir`` arrive as ``args.host`` and
``args.config_dir``; :func:`settings_from` turns them into the one Settings object.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any, Final

from mfh_models import (
    InvalidArgument,
    MFHError,
    NotFound,
    ResourceExhausted,
    Settings,
    StoreDamaged,
    Unauthenticated,
    Unavailable,
    VersionConflict,
    load_settings,
)

__all__ = [
    "EXIT_CODES",
    "count",
    "exit_code",
    "fail",
    "host_env",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "settings_from",
]

#: Exit codes of ``mfh`` (README "Operating"), first match wins:
#:
#: ==== =====================================================================
#: 0    ok
#: 1    other error (an audit or restore whose checksums differ, a bug)
#: 2    usage, invalid argument or configuration
#: 3    not found
#: 4    version conflict
#: 5    unavailable or exhausted: worth retrying
#: 6    unauthenticated
#: 7    the SQL store's file is corrupt or missing: no retry mends it; restore it
#: ==== =====================================================================
EXIT_CODES: Final[tuple[tuple[type[MFHError], int], ...]] = (
    (InvalidArgument, 2),
    (NotFound, 3),
    (VersionConflict, 4),
    (StoreDamaged, 7),  # before Unavailable, its base class: not worth retrying
    (Unavailable, 5),  # includes DeadlineExceeded: worth retrying
    (ResourceExhausted, 5),
    (Unauthenticated, 6),
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


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text[:40]} is not a number of seconds above 0")
    return value


def fail(message: str, code: int = 1) -> int:
    """Print ``mfh: message`` to stderr and return ``code`` (for ``return fail(...)``)."""
    print(f"mfh: {message}", file=sys.stderr)
    return code


def settings_from(args: argparse.Namespace, overrides: Mapping[str, Any] | None = None) -> Settings:
    """The merged settings for ``--host`` (else MFH_HOST) and ``--config-dir`` (else MFH_CONFIG_DIR)."""
    return load_settings(getattr(args, "host", None), config_dir=getattr(args, "config_dir", None), overrides=overrides)


def host_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment for a child process that reads its settings itself (``dramatiq`` workers)."""
    env = dict(os.environ)
    if getattr(args, "host", None):
        env["MFH_HOST"] = args.host
    if getattr(args, "config_dir", None):
        env["MFH_CONFIG_DIR"] = str(args.config_dir)
    return env
