"""Kept for one release: the ZeroMQ clients now live in :mod:`mfh_client`."""

from __future__ import annotations

from mfh_client import AsyncZmqClient, ZmqClient

__all__ = ["AsyncZmqClient", "ZmqClient"]
