"""Entry module for ``dramatiq mfh_tasks.worker_main`` (what ``mfh worker`` runs).

The dramatiq CLI imports a module to find its broker, so this module is a composition root:
it reads the settings once (MFH_HOST, MFH_CONFIG_DIR and the ``${VAR}``s of the config files)
and builds the broker and actors. Nothing else imports it.
"""

from __future__ import annotations

from mfh_models import load_settings
from mfh_tasks.runtime import build_worker

settings = load_settings()
broker, persist_batch = build_worker(settings)
