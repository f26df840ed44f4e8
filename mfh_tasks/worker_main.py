"""Entry module for ``dramatiq mfh_tasks.worker_main`` (what ``mfh worker`` runs).

The dramatiq CLI imports a module to find its broker, so this module is a composition root:
it reads the settings once (MFH_HOST, MFH_CONFIG_DIR and the ``${VAR}``s of the config files)
and builds the broker and actors. Nothing else imports it.
"""

from __future__ import annotations

import logging
import os

from mfh_core.jsonlog import configure_json_logging
from mfh_core.redaction import install_redaction
from mfh_models import StoreNotCurrent, load_settings
from mfh_tasks.runtime import build_worker

# Dramatiq has pointed the root handler at its pipe to the parent by now: JSON lines from here on,
# through the redaction filter (its tracebacks too).
configure_json_logging(process="worker")
install_redaction()
settings = load_settings()
install_redaction(settings)
# Under `mfh worker`, prometheus_client runs in multiprocess mode (its PROMETHEUS_MULTIPROC_DIR) and
# the supervisor serves every worker process's metrics; run on its own, the worker serves them itself.
try:
    # waits while the SQL store's file is damaged
    broker, persist_batch = build_worker(settings, serve_metrics=not os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
except StoreNotCurrent as e:  # one line, not dramatiq's import traceback (`mfh worker` checks first)
    logging.getLogger("mfh.worker").error("mfh worker: %s", e)
    raise SystemExit(3) from None
