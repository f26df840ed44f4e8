"""Memory Fusion Hub API: the service, its gRPC and ZeroMQ servers, the client and the mfh command."""

__all__: list[str] = []
