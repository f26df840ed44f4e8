"""Memory Fusion Hub adapters: Redis hot store and change feed, SQL store, JetStream event bus, metrics, resilience."""

from __future__ import annotations

from mfh_core.changefeed import ChangeFeed
from mfh_core.eventbus import DurableSubscription, EventBus
from mfh_core.hotstore import Change, HotEntry, HotStore
from mfh_core.sqlstore import ApplyResult, SqlStore

__all__ = [
    "ApplyResult",
    "Change",
    "ChangeFeed",
    "DurableSubscription",
    "EventBus",
    "HotEntry",
    "HotStore",
    "SqlStore",
]
