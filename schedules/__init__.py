"""Memory Fusion Hub scheduled jobs (APScheduler): snapshots, replay audits, reconcile."""

from __future__ import annotations

__all__: list[str] = []
