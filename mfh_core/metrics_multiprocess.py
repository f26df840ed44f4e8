"""Metrics of every worker process, served by the one process that supervises them (``mfh worker``).

Dramatiq runs ``--processes N`` worker processes; each would serve only its own numbers, and only
one of them could have the port. Instead ``mfh worker`` gives them a prometheus_client
multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``; each process writes its values to files
there) and serves the merged view from start-up: counters and histograms summed over every
process that ever ran, gauges combined as each one's ``multiprocess_mode`` says (mfh_core.metrics),
with the ``live*`` gauges of processes that died left out.

Each supervisor has a directory of its own under a shared base, named by its pid, so two
``mfh worker`` lines on one host never wipe each other's files; the one that holds the port serves
all of them. A directory whose supervisor is gone is removed at the next start.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["LiveMultiProcessCollector", "prepare_multiproc_dir", "serve_multiprocess_metrics"]

_LIVE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_multiproc_dir(base: Path, pid: int | None = None) -> Path:
    """A fresh ``base/<pid>`` for this supervisor; directories of supervisors that are gone are removed."""
    base.mkdir(parents=True, exist_ok=True)
    own = pid if pid is not None else os.getpid()
    for d in base.iterdir():
        if d.is_dir() and d.name.isdigit() and (int(d.name) == own or not _alive(int(d.name))):
            shutil.rmtree(d, ignore_errors=True)
    path = base / str(own)
    path.mkdir()
    return path


class LiveMultiProcessCollector:
    """Merges the value files of every supervisor directory under ``base``, skipping dead processes' live gauges."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def files(self) -> list[str]:
        out = []
        for f in sorted(self.base.glob("*/*.db")):
            m = _LIVE_FILE.match(f.name)
            if m and not _alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    f.unlink()  # what mark_process_dead does; nobody else can know the pid is gone
                continue
            out.append(str(f))
        return out

    def collect(self) -> Iterable[Metric]:
        return MultiProcessCollector.merge(self.files(), accumulate=True)  # type: ignore[no-untyped-call,no-any-return]


def serve_multiprocess_metrics(port: int, *, addr: str, base: Path) -> CollectorRegistry:
    """Serve the merged metrics of ``base`` on ``addr:port``; OSError when the port is taken."""
    registry = CollectorRegistry()
    registry.register(LiveMultiProcessCollector(base))
    start_http_server(port, addr=addr, registry=registry)
    return registry
