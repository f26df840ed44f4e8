"""The one place the rest of the code imports the generated gRPC modules from.

``pb`` holds the messages and the ``Durability`` enum of ``proto/mfh/v1/memory_fusion.proto``;
``pb_grpc`` holds ``MemoryFusionStub``, ``MemoryFusionServicer`` and
``add_MemoryFusionServicer_to_server``. Both are generated into ``mfh_client._generated/`` by
``python scripts/gen_proto.py``; never edit them by hand.

Usage::

    from mfh_client.proto import pb, pb_grpc

    request = pb.GetRequest(namespace="agents", key="k1")
"""

from __future__ import annotations

from mfh_client._generated import memory_fusion_pb2 as pb
from mfh_client._generated import memory_fusion_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
