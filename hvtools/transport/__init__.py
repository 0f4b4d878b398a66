"""One-sided RDMA-style transport: register memory, post remote READ/WRITE, poll completions.

:func:`open_endpoint` picks the backend: ``fabric`` (libfabric: ``tcp`` across hosts and network
namespaces, ``shm`` inside one host, ``verbs`` on RDMA hosts) or ``verbs`` (pyverbs, RC QPs
through rdma_cm). Both implement :class:`~hvtools.transport.api.Endpoint`.
"""

from __future__ import annotations

from hvtools.errors import TransportError, UsageError
from hvtools.transport.api import (
    Completion,
    Endpoint,
    MemoryRegion,
    Op,
    Peer,
    RemoteRegion,
)

BACKENDS = ("fabric", "verbs")


def open_endpoint(backend: str = "fabric", provider: str = "tcp", address: str | None = None,
                  port: int | None = None) -> Endpoint:
    """Open an endpoint bound to ``address`` (an IP of this host/namespace; tcp, verbs).

    ``port`` None picks a free one; the endpoint's ``.address`` is what peers pass to
    :meth:`Endpoint.connect`. Raises DependencyError when the backend cannot run here.
    """
    if backend == "fabric":
        from hvtools.transport.fabric import FabricEndpoint

        return FabricEndpoint(provider, address, port)
    if backend == "verbs":
        from hvtools.transport.verbs import VerbsEndpoint

        return VerbsEndpoint(address, port)
    raise UsageError(f"unknown transport backend {backend!r} (choose from {', '.join(BACKENDS)})")


__all__ = ["BACKENDS", "Completion", "Endpoint", "MemoryRegion", "Op", "Peer", "RemoteRegion",
           "TransportError", "open_endpoint"]
