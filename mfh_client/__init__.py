"""The Memory Fusion Hub client: what an agent installs (``pip install memory-fusion-hub``).

    from mfh_client import MemoryClient, PutSpec

    with MemoryClient("127.0.0.1:5714") as c:
        c.put(PutSpec("my-agent", "k1", "memory_item", {"content": "the user prefers tea"}))
        print(c.get("my-agent", "k1").payload_obj())

:class:`MemoryClient` / :class:`AsyncMemoryClient` speak gRPC, :class:`ZmqClient` /
:class:`AsyncZmqClient` ZeroMQ; all four have the same methods and raise the same exceptions
(:mod:`mfh_models.errors`, re-exported here). Nothing of the server is imported: no Redis,
SQL, Dramatiq or NATS library is needed.
"""

from __future__ import annotations

from mfh_client.client import AsyncClient, AsyncMemoryClient, AsyncZmqClient, Client, MemoryClient, ZmqClient
from mfh_client.types import Durability, MetadataFilter, PutResult, PutSpec, SearchHit
from mfh_models.errors import (
    DeadlineExceeded,
    InvalidArgument,
    MFHError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    VersionConflict,
)
from mfh_models.namespaces import decode_namespace, encode_namespace
from mfh_models.records import Kind, MemoryEvent, Record

__all__ = [
    "AsyncClient",
    "AsyncMemoryClient",
    "AsyncZmqClient",
    "Client",
    "DeadlineExceeded",
    "Durability",
    "InvalidArgument",
    "Kind",
    "MFHError",
    "MemoryClient",
    "MemoryEvent",
    "MetadataFilter",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PutResult",
    "PutSpec",
    "Record",
    "ResourceExhausted",
    "SearchHit",
    "Unauthenticated",
    "Unavailable",
    "VersionConflict",
    "ZmqClient",
    "decode_namespace",
    "encode_namespace",
]
