"""Guest memory in a byte buffer: build page tables in place for tests and reference models.

PURE: a bytearray covering physical ``[base, base + size)``; implements
:class:`~hvtools.memory.protocol.WritablePhysMemory`.
"""

from __future__ import annotations

import struct

from hvtools.errors import UsageError

_U64 = struct.Struct("<Q")


class BufferMemory:
    """Physical memory ``[base, base + size)`` held in a bytearray (little-endian, like x86)."""

    def __init__(self, size_or_data: int | bytes | bytearray, *, base: int = 0) -> None:
        if base < 0:
            raise UsageError(f"base {base:#x} is negative")
        if isinstance(size_or_data, int):
            if size_or_data <= 0:
                raise UsageError(f"memory size {size_or_data} is not positive")
            self._buf = bytearray(size_or_data)
        else:
            self._buf = bytearray(size_or_data)
        self.base = base

    @property
    def size(self) -> int:
        return len(self._buf)

    def contains(self, addr: int, size: int = 1) -> bool:
        return size >= 0 and self.base <= addr and addr + size <= self.base + len(self._buf)

    def _offset(self, addr: int, size: int) -> int:
        if not self.contains(addr, size):
            raise UsageError(f"[{addr:#x}, +{size:#x}) is outside the buffer "
                             f"[{self.base:#x}, {self.base + len(self._buf):#x})")
        return addr - self.base

    def read(self, addr: int, size: int) -> bytes:
        off = self._offset(addr, size)
        return bytes(self._buf[off:off + size])

    def read_u64(self, addr: int) -> int:
        value: int = _U64.unpack_from(self._buf, self._offset(addr, 8))[0]
        return value

    def write(self, addr: int, data: bytes) -> None:
        off = self._offset(addr, len(data))
        self._buf[off:off + len(data)] = data

    def write_u64(self, addr: int, value: int) -> None:
        if not 0 <= value < (1 << 64):
            raise UsageError(f"{value:#x} is not a 64-bit value")
        _U64.pack_into(self._buf, self._offset(addr, 8), value)

    def view(self, addr: int, size: int) -> memoryview:
        """A zero-copy, writable view of ``[addr, addr + size)``."""
        off = self._offset(addr, size)
        return memoryview(self._buf)[off:off + size]

    def to_bytes(self) -> bytes:
        """The whole buffer (e.g. to write a pmemsave-style dump file)."""
        return bytes(self._buf)
