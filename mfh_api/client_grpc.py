"""Kept for one release: the gRPC clients now live in :mod:`mfh_client`."""

from __future__ import annotations

from mfh_client import AsyncMemoryClient, MemoryClient

__all__ = ["AsyncMemoryClient", "MemoryClient"]
