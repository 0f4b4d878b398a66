"""Split virtqueues and virtio-blk requests over guest memory (virtio 1.2 s2.7, s5.2).

PURE: the memory is a table of regions, each a writable buffer (an mmap of the front-end's RAM
fd in the backend; a bytearray in the tests). The descriptor walker returns a :class:`Chain` or a
:class:`ChainFault` value naming the architected reason; it never reads or writes outside the
regions, and the only exception it raises is none at all (the fuzz test holds it to that).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# struct virtq_desc (virtio 1.2 s2.7.5): le64 addr, le32 len, le16 flags, le16 next.
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768  # virtio 1.2 s2.7: "Queue Size ... maximum 32768"

# virtio-blk (virtio 1.2 s5.2.6): struct virtio_blk_req header le32 type, le32 reserved,
# le64 sector; then data; then u8 status written by the device.
BLK_REQ_HDR = struct.Struct("<IIQ")
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20
SECTOR_SIZE = 512


@dataclass
class Region:
    """One guest RAM region: guest-physical base, size, the front-end's virtual address of it,
    and our writable view of its bytes (``len(buf) >= size``)."""

    gpa: int
    size: int
    qva: int
    buf: memoryview


class GuestMemory:
    """Guest-physical and front-end-virtual lookups over a region table."""

    def __init__(self, regions: Sequence[Region] = ()) -> None:
        self.regions = sorted(regions, key=lambda r: r.gpa)

    def find(self, gpa: int) -> int:
        """Index of the region holding ``gpa``, or -1."""
        for i, r in enumerate(self.regions):
            if r.gpa <= gpa < r.gpa + r.size:
                return i
        return -1

    def slices(self, gpa: int, length: int) -> list[memoryview] | None:
        """Views of ``[gpa, gpa+length)``, split at region boundaries; None if any byte of it
        is outside guest memory."""
        out: list[memoryview] = []
        while length > 0:
            i = self.find(gpa)
            if i < 0:
                return None
            r = self.regions[i]
            off = gpa - r.gpa
            n = min(length, r.size - off)
            out.append(r.buf[off:off + n])
            gpa += n
            length -= n
        return out

    def contains(self, gpa: int, length: int) -> bool:
        while length > 0:
            i = self.find(gpa)
            if i < 0:
                return False
            r = self.regions[i]
            n = min(length, r.size - (gpa - r.gpa))
            gpa += n
            length -= n
        return True

    def read(self, gpa: int, length: int) -> bytes | None:
        parts = self.slices(gpa, length)
        return None if parts is None else b"".join(parts)

    def qva_view(self, qva: int, length: int) -> memoryview | None:
        """The view of a front-end virtual range (vring addresses, vhost-user.rst
        SET_VRING_ADDR), which must lie in one region."""
        for r in self.regions:
            if r.qva <= qva and qva + length <= r.qva + r.size:
                off = qva - r.qva
                return r.buf[off:off + length]
        return None

    def qva_to_gpa(self, qva: int) -> int | None:
        for r in self.regions:
            if r.qva <= qva < r.qva + r.size:
                return r.gpa + (qva - r.qva)
        return None


class FaultReason(Enum):
    """Why a descriptor chain is refused (virtio 1.2 s2.7.5 driver requirements)."""

    BAD_HEAD = "head index beyond the queue size"
    BAD_NEXT = "next index beyond the table"
    LOOP = "chain longer than its table (a loop)"
    OUT_OF_MEMORY = "buffer outside guest memory"
    TOO_LARGE = "request larger than the device accepts"
    BAD_INDIRECT = "malformed indirect descriptor"
    INDIRECT_NOT_NEGOTIATED = "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC"
    WRITE_BEFORE_READ = "device-readable descriptor after a device-writable one"
    BAD_REQUEST = "not a virtio-blk request (header or status missing)"


@dataclass(frozen=True)
class ChainFault:
    reason: FaultReason
    detail: str = ""


@dataclass(frozen=True)
class Segment:
    gpa: int
    length: int
    write: bool  # device-writable


@dataclass(frozen=True)
class Chain:
    head: int
    segments: tuple[Segment, ...]

    @property
    def readable(self) -> list[Segment]:
        return [s for s in self.segments if not s.write]

    @property
    def writable(self) -> list[Segment]:
        return [s for s in self.segments if s.write]


def walk_chain(mem: GuestMemory, table: memoryview | bytes, queue_size: int, head: int, *,
               max_bytes: int, indirect: bool) -> Chain | ChainFault:
    """Follow the chain starting at ``head`` in the descriptor ``table`` (``queue_size``
    entries). Every buffer is checked against ``mem``; the chain may visit at most as many
    descriptors as its table holds (virtio 1.2 s2.7.5.3.1 for indirect tables)."""
    if not 0 <= head < queue_size:
        return ChainFault(FaultReason.BAD_HEAD, f"head {head}, queue size {queue_size}")
    if len(table) < queue_size * DESC_SIZE:
        return ChainFault(FaultReason.BAD_HEAD, "descriptor table shorter than the queue")
    segs: list[Segment] = []
    total = 0
    seen_write = False
    cur_table: memoryview | bytes = table
    cur_size = queue_size
    idx = head
    steps = 0
    in_indirect = False
    while True:
        steps += 1
        if steps > cur_size:
            return ChainFault(FaultReason.LOOP, f"more than {cur_size} descriptors")
        addr, length, flags, nxt = DESC.unpack_from(cur_table, idx * DESC_SIZE)
        if flags & VIRTQ_DESC_F_INDIRECT:
            if not indirect:
                return ChainFault(FaultReason.INDIRECT_NOT_NEGOTIATED)
            if in_indirect or flags & VIRTQ_DESC_F_NEXT:
                return ChainFault(FaultReason.BAD_INDIRECT, "nested or chained indirect")
            if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                return ChainFault(FaultReason.BAD_INDIRECT, f"indirect table of {length} bytes")
            data = mem.read(addr, length)
            if data is None:
                return ChainFault(FaultReason.OUT_OF_MEMORY,
                                  f"indirect table {addr:#x}+{length:#x}")
            cur_table, cur_size, idx, steps, in_indirect = data, length // DESC_SIZE, 0, 0, True
            continue
        write = bool(flags & VIRTQ_DESC_F_WRITE)
        if seen_write and not write:
            return ChainFault(FaultReason.WRITE_BEFORE_READ, f"descriptor {idx}")
        seen_write = seen_write or write
        total += length
        if total > max_bytes:
            return ChainFault(FaultReason.TOO_LARGE, f"more than {max_bytes} bytes")
        if not mem.contains(addr, length):
            return ChainFault(FaultReason.OUT_OF_MEMORY, f"descriptor {idx}: {addr:#x}+{length:#x}")
        segs.append(Segment(addr, length, write))
        if not flags & VIRTQ_DESC_F_NEXT:
            return Chain(head, tuple(segs))
        if nxt >= cur_size:
            return ChainFault(FaultReason.BAD_NEXT, f"next {nxt}, table of {cur_size}")
        idx = nxt


class BlkType(IntEnum):
    IN = VIRTIO_BLK_T_IN
    OUT = VIRTIO_BLK_T_OUT
    FLUSH = VIRTIO_BLK_T_FLUSH
    GET_ID = VIRTIO_BLK_T_GET_ID


@dataclass(frozen=True)
class BlkRequest:
    """A parsed virtio-blk request: ``type`` is the raw le32 (unknown types are kept so the
    device can answer VIRTIO_BLK_S_UNSUPP), ``data`` the buffers between header and status."""

    type: int
    sector: int
    data: tuple[Segment, ...]
    status_gpa: int


def _take(segs: Sequence[Segment], n: int, from_end: bool) -> tuple[list[Segment], int]:
    """Drop ``n`` bytes from the front (or end) of ``segs``; return the rest and the gpa of
    the first dropped byte."""
    segs = list(segs)
    first = -1
    if from_end:
        while n and segs:
            s = segs[-1]
            k = min(n, s.length)
            first = s.gpa + s.length - k
            segs[-1] = Segment(s.gpa, s.length - k, s.write)
            if segs[-1].length == 0:
                segs.pop()
            n -= k
    else:
        while n and segs:
            s = segs[0]
            k = min(n, s.length)
            if first < 0:
                first = s.gpa
            segs[0] = Segment(s.gpa + k, s.length - k, s.write)
            if segs[0].length == 0:
                segs.pop(0)
            n -= k
    return segs, first


def parse_blk(mem: GuestMemory, chain: Chain) -> BlkRequest | ChainFault:
    """Split a chain into header (first 16 readable bytes), data, and status (last writable
    byte), per virtio 1.2 s5.2.6."""
    readable, writable = chain.readable, chain.writable
    if sum(s.length for s in readable) < BLK_REQ_HDR.size:
        return ChainFault(FaultReason.BAD_REQUEST, "header shorter than 16 bytes")
    if sum(s.length for s in writable) < 1:
        return ChainFault(FaultReason.BAD_REQUEST, "no status byte")
    hdr = bytearray()
    for s in readable:
        got = mem.read(s.gpa, min(s.length, BLK_REQ_HDR.size - len(hdr)))
        if got is None:
            return ChainFault(FaultReason.OUT_OF_MEMORY, "header")
        hdr += got
        if len(hdr) == BLK_REQ_HDR.size:
            break
    rtype, _reserved, sector = BLK_REQ_HDR.unpack(hdr)
    out_data, _ = _take(readable, BLK_REQ_HDR.size, from_end=False)
    in_data, status_gpa = _take(writable, 1, from_end=True)
    return BlkRequest(rtype, sector, tuple(out_data + in_data), status_gpa)


def bad_chain_status(mem: GuestMemory, table: memoryview | bytes, queue_size: int,
                     head: int) -> int | None:
    """Where to write VIRTIO_BLK_S_IOERR for a refused chain: the last byte of its final
    descriptor, if the chain ends (no loop) within ``queue_size`` steps of the main table and
    that descriptor is device-writable guest memory; else None (the request is then returned
    with used length 0 and nothing is written)."""
    if not 0 <= head < queue_size or len(table) < queue_size * DESC_SIZE:
        return None
    idx = head
    for _ in range(queue_size):
        addr, length, flags, nxt = DESC.unpack_from(table, idx * DESC_SIZE)
        if flags & VIRTQ_DESC_F_NEXT:
            if nxt >= queue_size:
                return None
            idx = nxt
            continue
        if flags & VIRTQ_DESC_F_INDIRECT or not flags & VIRTQ_DESC_F_WRITE or length == 0:
            return None
        last = addr + length - 1
        return last if mem.contains(last, 1) else None
    return None
