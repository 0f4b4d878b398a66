"""The guest-physical memory protocol every walker reads through (PURE: no adapter imports)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class PhysMemory(Protocol):
    """Byte-addressed physical memory of one address space (GPA or HPA).

    ``read`` returns exactly ``size`` bytes or raises :class:`~hvtools.errors.UsageError` for
    an address outside the backing (a walker turns that into an architected fault where the
    architecture defines one, e.g. an entry beyond MAXPHYADDR).
    """

    def read(self, addr: int, size: int) -> bytes: ...

    def read_u64(self, addr: int) -> int: ...

    def contains(self, addr: int, size: int = 1) -> bool: ...


@runtime_checkable
class WritablePhysMemory(PhysMemory, Protocol):
    """Memory a walk may write back to (A/D-bit updates), or a test may build tables in."""

    def write(self, addr: int, data: bytes) -> None: ...

    def write_u64(self, addr: int, value: int) -> None: ...
