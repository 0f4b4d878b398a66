"""One-sided RDMA-style transport: register memory, post remote READ/WRITE, poll completions.

:func:`open_endpoint` picks the backend: ``fabric`` (libfabric: ``tcp`` across hosts and network
namespaces, ``shm`` inside one host, ``verbs`` on RDMA hosts) or ``verbs`` (pyverbs, RC QPs
through rdma_cm). Both implement :class:`~hvtools.transport.api.Endpoint`.

A target serves a file-backed region (a VM's RAM file) and drives progress::

    ep = open_endpoint("fabric", "tcp", "10.77.0.1")
    mm = mmap.mmap(fd, size)                       # writable, MAP_SHARED
    region = ep.register(mm).remote()              # publish region.to_json() and ep.address
    ep.start_progress()                            # or: with ep.serve(): ...

An initiator pulls scattered pages into its own mmap, many ops in flight::

    ep = open_endpoint("fabric", "tcp", "10.77.0.2")
    local = ep.register(dst_mm)
    peer = ep.connect(target_address)
    runs = coalesce((loc * 4096, page * 4096, 4096) for page, loc in pages)  # (local, remote, n)
    ep.read_many(peer, [(local, lo, region, ro, n) for lo, ro, n in runs], depth=256)
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
