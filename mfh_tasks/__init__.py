"""Memory Fusion Hub tasks: the Dramatiq broker, write-behind actors, batch queue and persist path."""

from __future__ import annotations

from mfh_tasks.actors import PERSIST_ACTOR, declare_persist_actor, decode_batch, encode_batch
from mfh_tasks.broker import build_broker
from mfh_tasks.enqueue import BatchQueue
from mfh_tasks.persist import PersistPipeline
from mfh_tasks.runtime import build_hot_store, build_sql_store, build_worker

__all__ = [
    "PERSIST_ACTOR",
    "BatchQueue",
    "PersistPipeline",
    "build_broker",
    "build_hot_store",
    "build_sql_store",
    "build_worker",
    "declare_persist_actor",
    "decode_batch",
    "encode_batch",
]
