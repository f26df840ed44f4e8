"""``mfh api`` and ``mfh worker``: the long-running processes of a host (one Procfile line each).

``--zmq-port``/``--grpc-port``/``--metrics-port`` let a second api replica run on the same host:
ZeroMQ cannot share a bound TCP port, so each replica gets its own and clients fail over between them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mfh_api.commands import fail, host_env, positive_int, settings_from
from mfh_models import StoreNotCurrent, Unavailable

if TYPE_CHECKING:
    from mfh_models import Settings

__all__ = ["register"]


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (0-65535)")
    return port


def _api(args: argparse.Namespace) -> int:
    from mfh_api.app import configure_logging, run_api

    server = {
        name: value
        for name, value in (
            ("zmq_port", args.zmq_port),
            ("grpc_port", args.grpc_port),
            ("metrics_port", args.metrics_port),
        )
        if value is not None
    }
    settings = settings_from(args, {"server": server} if server else None)
    configure_logging()
    try:
        asyncio.run(run_api(settings, insecure=args.insecure))
    except StoreNotCurrent as e:
        return fail(f"api: {e}")
    except OSError as e:  # typically a port already in use
        return fail(f"api: {e}")
    return 0


def worker_metrics_base(settings: Settings) -> Path:
    """Where the worker processes of a host keep their metric files (beside the snapshots)."""
    return Path(settings.scheduler.snapshot_dir).parent / "prometheus" / f"worker-{settings.host_id}"


def _worker(args: argparse.Namespace) -> int:
    from mfh_core.metrics_multiprocess import prepare_multiproc_dir, serve_multiprocess_metrics

    settings = settings_from(args)  # fail here, readably, on a bad configuration
    refusal = _store_refusal(settings)
    if refusal is not None:
        return fail(f"worker: {refusal}")
    wb = settings.write_behind
    processes = args.processes or wb.worker_processes
    threads = args.threads or wb.worker_threads
    argv = [sys.executable, "-m", "mfh_tasks.worker_cli", "mfh_tasks.worker_main", "--processes", str(processes)]
    argv += ["--threads", str(threads)]
    env = host_env(args)
    # Every worker process counts: they write their metrics to files, this process serves the sum.
    base = worker_metrics_base(settings)
    own = prepare_multiproc_dir(base)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(own)
    port, bind = settings.metrics.worker_port, settings.server.bind
    if port:
        try:
            serve_multiprocess_metrics(port, addr=bind, base=base)
            where = f"http://{bind}:{port}/metrics"
            print(f"mfh worker: metrics of {processes} worker process(es) on {where}", file=sys.stderr)
        except OSError as e:  # a second `mfh worker` on the host: the first one serves this one's files too
            print(f"mfh worker: metrics not served on {bind}:{port}: {e.strerror} (another has it)", file=sys.stderr)
    try:
        return _supervise(argv, env)
    finally:
        shutil.rmtree(own, ignore_errors=True)


def _store_refusal(settings: Settings) -> str | None:
    """Why the worker must not start (its SQL store is not current), or None. A store that is down is
    not a refusal: the worker retries its batches until it is back."""
    from mfh_core import SqlStore

    store = SqlStore(settings.storage.database_url)
    try:
        store.create_schema()
    except StoreNotCurrent as e:
        return str(e)
    except Unavailable:
        return None
    finally:
        store.close()
    return None


def _supervise(argv: list[str], env: dict[str, str]) -> int:
    """Run dramatiq in a session of its own and pass it exactly one SIGTERM.

    honcho stops a process by signalling its whole group; a dramatiq worker process that gets a
    second SIGTERM (one from the group signal, one forwarded by dramatiq's main process) calls
    sys.exit in its main thread and then hangs on its own threads instead of shutting down.
    """
    child = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_die_with_parent)
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return child.wait()


def _die_with_parent() -> None:
    # If this supervisor is SIGKILLed, dramatiq still gets its one SIGTERM (Linux).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def register(subparsers: Any) -> None:
    """Add ``mfh api`` and ``mfh worker``."""
    api = subparsers.add_parser(
        "api",
        help="serve gRPC, ZeroMQ (v1 and v0) and /metrics",
        description="Serve the hub's gRPC and ZeroMQ front doors and the Prometheus endpoint until SIGTERM.",
    )
    api.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without an API key")
    api.add_argument(
        "--zmq-port", type=_port, help="override server.zmq_port, e.g. for a second replica on one host (0: any free)"
    )
    api.add_argument("--grpc-port", type=_port, help="override server.grpc_port (0: any free)")
    api.add_argument("--metrics-port", type=_port, help="override server.metrics_port (0: no metrics endpoint)")
    api.set_defaults(func=_api)

    worker = subparsers.add_parser(
        "worker",
        help="run the Dramatiq write-behind workers",
        description="exec `python -m dramatiq mfh_tasks.worker_main` with this host's settings.",
    )
    worker.add_argument("--processes", type=positive_int, help="default: write_behind.worker_processes")
    worker.add_argument("--threads", type=positive_int, help="default: write_behind.worker_threads")
    worker.set_defaults(func=_worker)
