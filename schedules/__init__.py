"""Memory Fusion Hub scheduled jobs (APScheduler): snapshots, replay audits, reconcile."""

from __future__ import annotations

from schedules.jobs import AuditResult, audit, reconcile, snapshot
from schedules.lease import Lease
from schedules.runner import run_scheduler

__all__ = ["AuditResult", "Lease", "audit", "reconcile", "run_scheduler", "snapshot"]
