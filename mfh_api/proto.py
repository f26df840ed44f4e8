"""The generated gRPC modules now live in the client package: import them from :mod:`mfh_client.proto`."""

from __future__ import annotations

from mfh_client.proto import pb, pb_grpc

__all__ = ["pb", "pb_grpc"]
