"""Entry module for ``dramatiq mfh_tasks.worker_main`` (what ``mfh worker`` runs).

The dramatiq CLI imports a module to find its broker, so this module is a composition root:
it reads the settings once (MFH_HOST, MFH_CONFIG_DIR and the ``${VAR}``s of the config files)
and builds the broker and actors. Nothing else imports it.
"""

from __future__ import annotations

import os
import sys

from mfh_core.redaction import install_redaction
from mfh_models import StoreNotCurrent, load_settings
from mfh_tasks.runtime import build_worker

install_redaction()  # dramatiq has configured logging by now; its tracebacks go through the filter too
settings = load_settings()
install_redaction(settings)
# Under `mfh worker`, prometheus_client runs in multiprocess mode (its PROMETHEUS_MULTIPROC_DIR) and
# the supervisor serves every worker process's metrics; run on its own, the worker serves them itself.
try:
    broker, persist_batch = build_worker(settings, serve_metrics=not os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
except StoreNotCurrent as e:  # one line, not dramatiq's import traceback (`mfh worker` checks first)
    print(f"mfh worker: {e}", file=sys.stderr)
    raise SystemExit(3) from None
