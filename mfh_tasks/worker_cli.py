"""``python -m mfh_tasks.worker_cli``: the ``dramatiq`` command with JSON log lines in its parent process too.

Dramatiq's parent process (boot, signals, exited workers) formats its lines with a fixed text
format before it imports anything of ours; this wraps its logging set-up so those lines use the
one JSON formatter (:mod:`mfh_core.jsonlog`) and the redaction filter, like the worker processes.
"""

from __future__ import annotations

import sys
from typing import Any

import dramatiq.cli as dramatiq_cli

from mfh_core.jsonlog import configure_json_logging
from mfh_core.redaction import install_redaction

__all__ = ["main"]

_setup_parent_logging = dramatiq_cli.setup_parent_logging


def _json_parent_logging(args: Any, *, stream: Any = sys.stderr) -> Any:
    logger = _setup_parent_logging(args, stream=stream)  # type: ignore[no-untyped-call]
    configure_json_logging(process="worker")
    install_redaction()
    return logger


def main() -> int:
    """Run dramatiq's own ``main`` with the parent's logging in JSON."""
    dramatiq_cli.setup_parent_logging = _json_parent_logging
    return int(dramatiq_cli.main() or 0)  # type: ignore[no-untyped-call]


if __name__ == "__main__":
    sys.exit(main())
