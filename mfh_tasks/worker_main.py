"""Entry module for ``dramatiq mfh_tasks.worker_main`` (what ``mfh worker`` runs).

The dramatiq CLI imports a module to find its broker, so this module is a composition root:
it reads the settings once (MFH_HOST, MFH_CONFIG_DIR and the ``${VAR}``s of the config files)
and builds the broker and actors. Nothing else imports it.
"""

from __future__ import annotations

import sys

from mfh_models import StoreNotCurrent, load_settings
from mfh_tasks.runtime import build_worker

settings = load_settings()
try:
    broker, persist_batch = build_worker(settings)
except StoreNotCurrent as e:  # one line, not dramatiq's import traceback (`mfh worker` checks first)
    print(f"mfh worker: {e}", file=sys.stderr)
    raise SystemExit(3) from None
