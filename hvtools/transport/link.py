"""A throw-away two-namespace veth link for transport tests and benchmarks.

:func:`veth_link` creates network namespaces ``hvt-<tag>-a`` and ``hvt-<tag>-b`` joined by a
veth pair (rtnetlink(7), via pyroute2) with 10.199.<n>.1/24 and 10.199.<n>.2/24, and removes
both on exit, whatever happened (removing a namespace deletes its end of the pair).
:func:`inside` moves the calling thread into a namespace for a ``with`` block (setns(2) is
per thread; sockets created there stay in that namespace).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from hvtools.errors import DependencyError


@dataclass(frozen=True)
class VethLink:
    ns_a: str
    ns_b: str
    addr_a: str
    addr_b: str


@contextlib.contextmanager
def veth_link(tag: str | None = None) -> Iterator[VethLink]:
    """Two namespaces joined by a veth pair; always removed on exit."""
    try:
        from pyroute2 import NetNS, netns
    except ImportError as err:  # pragma: no cover - pyroute2 is a dependency
        raise DependencyError(f"pyroute2 is missing: {err}") from err
    if os.geteuid() != 0:
        raise DependencyError("a veth link between namespaces needs root (CAP_NET_ADMIN)")
    tag = tag or str(os.getpid())
    subnet = 1 + (os.getpid() % 250)
    link = VethLink(f"hvt-{tag}-a", f"hvt-{tag}-b", f"10.199.{subnet}.1", f"10.199.{subnet}.2")
    made: list[str] = []
    try:
        for ns in (link.ns_a, link.ns_b):
            netns.create(ns)
            made.append(ns)
        with NetNS(link.ns_a) as a:
            a.link("add", ifname="hvt0", kind="veth",
                   peer={"ifname": "hvt0", "net_ns_fd": link.ns_b})
        for ns, addr in ((link.ns_a, link.addr_a), (link.ns_b, link.addr_b)):
            with NetNS(ns) as n:
                n.link("set", index=n.link_lookup(ifname="lo")[0], state="up")
                i = n.link_lookup(ifname="hvt0")[0]
                n.addr("add", index=i, address=addr, prefixlen=24)
                n.link("set", index=i, state="up")
        yield link
    finally:
        for ns in made:
            with contextlib.suppress(OSError):
                netns.remove(ns)


def set_link_state(ns: str, up: bool) -> None:
    """Bring the namespace's end of the link up or down (cut the cable)."""
    from pyroute2 import NetNS

    with NetNS(ns) as n:
        n.link("set", index=n.link_lookup(ifname="hvt0")[0], state="up" if up else "down")


@contextlib.contextmanager
def inside(ns: str | None) -> Iterator[None]:
    """Run the ``with`` block's thread inside network namespace ``ns`` (None: stay)."""
    if ns is None:
        yield
        return
    from pyroute2 import netns

    netns.pushns(ns)
    try:
        yield
    finally:
        netns.popns()
