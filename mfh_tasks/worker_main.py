"""Entry module for ``dramatiq mfh_tasks.worker_main`` (what ``mfh worker`` runs).

The dramatiq CLI imports a module to find its broker, so this module is a composition root:
it reads the settings once (MFH_HOST, MFH_CONFIG_DIR and the ``${VAR}``s of the config files)
and builds the broker and actors. Nothing else imports it.
"""

from __future__ import annotations

import os

from mfh_core.redaction import install_redaction
from mfh_models import load_settings
from mfh_tasks.runtime import build_worker

install_redaction()  # dramatiq has configured logging by now; its tracebacks go through the filter too
settings = load_settings()
install_redaction(settings)
# Under `mfh worker`, prometheus_client runs in multiprocess mode (its PROMETHEUS_MULTIPROC_DIR) and
# the supervisor serves every worker process's metrics; run on its own, the worker serves them itself.
broker, persist_batch = build_worker(settings, serve_metrics=not os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
