"""The one-sided transport API: register memory, post remote READs and WRITEs, poll completions.

The model is RDMA's (IBTA vol. 1 ch. 9.4.3-9.4.4 RDMA READ/WRITE; libfabric fi_rma(3)): a target
registers a region and publishes its :class:`RemoteRegion` (address, length, key); an initiator
moves bytes between its own registered memory and that region without the target's CPU taking
part beyond driving its provider's progress. The TARGET checks the key, the access rights and
the range (fi_mr(3) "Memory Region Keys"); a violation comes back to the initiator as a failed
:class:`Completion`, never as a trusted local check. Backends: ``fabric`` (libfabric) and
``verbs`` (pyverbs). Transport errors are :class:`~hvtools.errors.TransportError`.
"""

from __future__ import annotations

import abc
import contextlib
import mmap
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from hvtools.errors import TransportError

#: What can be registered: a writable buffer that stays put while registered.
Buffer = mmap.mmap | bytearray | memoryview

#: One op of a batch: (local region, local offset, remote region, remote offset, length).
Op = tuple["MemoryRegion", int, "RemoteRegion", int, int]

#: Contexts of ops posted by :meth:`Endpoint.read_many` / ``write_many`` carry this bit; user
#: contexts passed to :meth:`Endpoint.post_read` must leave it clear.
BATCH_CONTEXT_BIT = 1 << 63


@dataclass(frozen=True)
class RemoteRegion:
    """What a target publishes about a registration.

    ``addr`` is the address an initiator names for byte 0 of the region: the virtual address
    when the provider wants FI_MR_VIRT_ADDR, else 0 (offset addressing). ``key`` is the rkey.
    """

    addr: int
    length: int
    key: int

    def to_json(self) -> dict[str, int]:
        return {"addr": self.addr, "length": self.length, "key": self.key}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RemoteRegion:
        try:
            return cls(addr=int(data["addr"]), length=int(data["length"]), key=int(data["key"]))
        except (KeyError, TypeError, ValueError) as err:
            raise TransportError(f"malformed remote region {data!r}: {err}") from err


@dataclass(frozen=True)
class Completion:
    """One completed op: ``ok`` False carries the provider's error text."""

    context: int
    ok: bool
    error: str | None = None
    nbytes: int = 0


class MemoryRegion:
    """A local registration of ``buffer``. Keep it registered while ops use it."""

    def __init__(self, buffer: Buffer, addr: int, length: int, key: int, *,
                 remote_read: bool, remote_write: bool, handle: object = None) -> None:
        self.buffer = buffer
        self.addr = addr          # the address peers name for byte 0 (see RemoteRegion)
        self.length = length
        self.key = key
        self.remote_read = remote_read
        self.remote_write = remote_write
        self.handle = handle      # backend state (the fid_mr, descriptor, pinned pointer)

    def remote(self) -> RemoteRegion:
        """The region as a peer names it."""
        return RemoteRegion(self.addr, self.length, self.key)

    def __repr__(self) -> str:
        rights = ("r" if self.remote_read else "-") + ("w" if self.remote_write else "-")
        return (f"MemoryRegion(addr={self.addr:#x}, length={self.length}, key={self.key:#x}, "
                f"{rights})")


class Peer:
    """A resolved remote endpoint (an fi_addr_t, or a connected QP)."""

    def __init__(self, address: str, handle: object) -> None:
        self.address = address
        self.handle = handle
        #: The first error seen on this connection. A failed op (a rejected key or range, a
        #: peer gone) breaks the connection, as a remote access error moves an RC QP to the
        #: Error state; later posts raise TransportError. Open a new endpoint to retry.
        self.failed: str | None = None

    def __repr__(self) -> str:
        return f"Peer({self.address!r})"


class Endpoint(abc.ABC):
    """One local endpoint of a backend. Not for use after :meth:`close`."""

    #: How a peer reaches this endpoint: "host:port" (tcp) or the provider's name string (shm).
    address: str
    backend: str
    provider: str

    @abc.abstractmethod
    def register(self, buf: Buffer, *, remote_read: bool = True,
                 remote_write: bool = False) -> MemoryRegion:
        """Register ``buf`` (writable; pinned while registered) and return its region."""

    @abc.abstractmethod
    def deregister(self, mr: MemoryRegion) -> None:
        """Revoke ``mr``: later ops naming its key fail on the target."""

    @abc.abstractmethod
    def connect(self, peer: str) -> Peer:
        """Resolve a peer's :attr:`address` (no round trip is promised)."""

    @abc.abstractmethod
    def post_read(self, peer: Peer, local: MemoryRegion, local_off: int, remote: RemoteRegion,
                  remote_off: int, length: int, context: int) -> bool:
        """Post one READ (remote → local). False when the send queue is full (poll, retry)."""

    @abc.abstractmethod
    def post_write(self, peer: Peer, local: MemoryRegion, local_off: int, remote: RemoteRegion,
                   remote_off: int, length: int, context: int) -> bool:
        """Post one WRITE (local → remote). False when the send queue is full (poll, retry)."""

    @abc.abstractmethod
    def poll(self, max_entries: int = 64, timeout: float = 0.0) -> list[Completion]:
        """Completions, waiting up to ``timeout`` seconds for the first. Drives progress."""

    @abc.abstractmethod
    def start_progress(self) -> None:
        """Start a thread that drives this endpoint's progress (a target must)."""

    @abc.abstractmethod
    def stop_progress(self) -> None:
        """Stop the progress thread, if any."""

    @abc.abstractmethod
    def close(self) -> None:
        """Deregister everything and release the endpoint. Idempotent."""

    @property
    @abc.abstractmethod
    def max_outstanding(self) -> int:
        """How many ops the send queue takes at once."""

    # -- conveniences shared by the backends ------------------------------------------------
    @contextlib.contextmanager
    def serve(self) -> Iterator[Endpoint]:
        """Drive progress in a thread for the duration of the ``with`` block (targets)."""
        self.start_progress()
        try:
            yield self
        finally:
            self.stop_progress()

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_many(self, peer: Peer, ops: Iterable[Op], *, depth: int = 64,
                  progress: Callable[[int], None] | None = None,
                  timeout: float = 10.0) -> int:
        """READ every op, keeping up to ``depth`` outstanding; returns the bytes moved.

        Raises :class:`TransportError` on the first failed completion (after draining what is
        in flight), and when no completion arrives for ``timeout`` seconds (peer gone, link
        cut). Use :func:`hvtools.transport.ops.coalesce` first to merge contiguous pages.
        """
        return self._run_many(False, peer, ops, depth, progress, timeout)

    def write_many(self, peer: Peer, ops: Iterable[Op], *, depth: int = 64,
                   progress: Callable[[int], None] | None = None,
                   timeout: float = 10.0) -> int:
        """WRITE every op; like :meth:`read_many`."""
        return self._run_many(True, peer, ops, depth, progress, timeout)

    def _run_many(self, write: bool, peer: Peer, ops: Iterable[Op], depth: int,
                  progress: Callable[[int], None] | None, timeout: float) -> int:
        depth = max(1, min(depth, self.max_outstanding))
        post = self.post_write if write else self.post_read
        it = iter(ops)
        pending: dict[int, int] = {}
        seq = 0
        moved = 0
        failure: Completion | None = None
        exhausted = False
        stalled: Op | None = None
        last = time.monotonic()
        while True:
            while failure is None and not exhausted and len(pending) < depth:
                op = stalled if stalled is not None else next(it, None)
                stalled = None
                if op is None:
                    exhausted = True
                    break
                ctx = BATCH_CONTEXT_BIT | seq
                if not post(peer, op[0], op[1], op[2], op[3], op[4], ctx):
                    stalled = op      # send queue full: drive progress, then retry
                    break
                pending[ctx] = op[4]
                seq += 1
            if not pending and stalled is None:
                break                 # all done, or failed and drained
            done = self.poll(64, timeout=0.05)
            now = time.monotonic()
            if not done:
                if now - last > timeout:
                    self._abandon()
                    raise TransportError(
                        f"no completion from {peer.address} in {timeout:g} s with "
                        f"{len(pending)} ops outstanding: peer gone or link down")
                continue
            last = now
            for c in done:
                n = pending.pop(c.context, None)
                if n is None:
                    continue      # a user op's completion; not ours
                if not c.ok:
                    failure = failure or c
                else:
                    moved += n
            if progress is not None:
                progress(moved)
        if failure is not None:
            kind = "WRITE" if write else "READ"
            raise TransportError(f"remote {kind} from {peer.address} failed: {failure.error}")
        return moved

    def _abandon(self) -> None:
        """After a timeout: the ops still posted may land later, so the endpoint is unusable."""
        self.close()
