"""The split-ring descriptor walker and virtio-blk request parser over fake guest memory."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from hvtools.vhost.virtq import (
    BLK_REQ_HDR,
    DESC,
    VIRTIO_BLK_T_IN,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    BlkRequest,
    Chain,
    ChainFault,
    FaultReason,
    GuestMemory,
    Region,
    Segment,
    bad_chain_status,
    parse_blk,
    walk_chain,
)

# Two regions with a hole between them: [0x0, 0x10000) and [0x20000, 0x28000).
R0, R0_SIZE, R1, R1_SIZE = 0x0, 0x10000, 0x20000, 0x8000


def memory() -> tuple[GuestMemory, bytearray, bytearray]:
    a, b = bytearray(R0_SIZE), bytearray(R1_SIZE)
    return (GuestMemory([Region(R0, R0_SIZE, 0x7000_0000, memoryview(a)),
                         Region(R1, R1_SIZE, 0x7100_0000, memoryview(b))]), a, b)


def table(*descs: tuple[int, int, int, int], size: int = 8) -> bytes:
    out = b"".join(DESC.pack(*d) for d in descs)
    return out.ljust(size * 16, b"\0")


N, W = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE


def walk(t: bytes, head: int = 0, size: int = 8, **kw: object) -> Chain | ChainFault:
    mem, _, _ = memory()
    return walk_chain(mem, t, size, head, max_bytes=int(kw.get("max_bytes", 1 << 20)),
                      indirect=bool(kw.get("indirect", True)))


def test_blk_read_chain() -> None:
    mem, a, _ = memory()
    a[0x100:0x110] = BLK_REQ_HDR.pack(VIRTIO_BLK_T_IN, 0, 7)
    t = table((0x100, 16, N, 1), (0x1000, 4096, N | W, 2), (0x200, 1, W, 0))
    chain = walk_chain(mem, t, 8, 0, max_bytes=1 << 20, indirect=False)
    assert isinstance(chain, Chain)
    req = parse_blk(mem, chain)
    assert req == BlkRequest(VIRTIO_BLK_T_IN, 7, (Segment(0x1000, 4096, True),), 0x200)


def test_header_data_and_status_sharing_descriptors() -> None:
    mem, a, _ = memory()
    a[0x100:0x110] = BLK_REQ_HDR.pack(VIRTIO_BLK_T_IN, 0, 3)
    t = table((0x100, 16, N, 1), (0x1000, 513, W, 0))  # data and status in one buffer
    chain = walk_chain(mem, t, 8, 0, max_bytes=1 << 20, indirect=False)
    assert isinstance(chain, Chain)
    req = parse_blk(mem, chain)
    assert isinstance(req, BlkRequest)
    assert req.data == (Segment(0x1000, 512, True),) and req.status_gpa == 0x1200


def test_buffer_spanning_two_regions_is_refused_across_the_hole() -> None:
    assert walk(table((R0_SIZE - 8, 16, W, 0))) == ChainFault(
        FaultReason.OUT_OF_MEMORY, f"descriptor 0: {R0_SIZE - 8:#x}+0x10")


def test_loop_is_detected() -> None:
    r = walk(table((0x100, 16, N, 1), (0x200, 16, N, 0)))
    assert isinstance(r, ChainFault) and r.reason is FaultReason.LOOP


def test_faults() -> None:
    assert walk(table((0x100, 16, 0, 0)), head=8).reason is FaultReason.BAD_HEAD  # type: ignore[union-attr]
    assert walk(table((0x100, 16, N, 9))).reason is FaultReason.BAD_NEXT  # type: ignore[union-attr]
    assert walk(table((0x100, 2 << 20, 0, 0))).reason is FaultReason.TOO_LARGE  # type: ignore[union-attr]
    assert walk(table((0x100, 16, W | N, 1), (0x200, 1, 0, 0))).reason is \
        FaultReason.WRITE_BEFORE_READ  # type: ignore[union-attr]
    assert walk(table((0x100, 32, VIRTQ_DESC_F_INDIRECT, 0)), indirect=False).reason is \
        FaultReason.INDIRECT_NOT_NEGOTIATED  # type: ignore[union-attr]
    assert walk(table((0x100, 24, VIRTQ_DESC_F_INDIRECT, 0))).reason is \
        FaultReason.BAD_INDIRECT  # type: ignore[union-attr]
    assert walk(table((0x30000, 32, VIRTQ_DESC_F_INDIRECT, 0))).reason is \
        FaultReason.OUT_OF_MEMORY  # type: ignore[union-attr]


def test_indirect_table() -> None:
    mem, a, _ = memory()
    a[0x800:0x830] = DESC.pack(0x100, 16, N, 1) + DESC.pack(R1, 512, N | W, 2) + \
        DESC.pack(0x200, 1, W, 0)
    chain = walk_chain(mem, table((0x800, 48, VIRTQ_DESC_F_INDIRECT, 0)), 8, 0,
                       max_bytes=1 << 20, indirect=True)
    assert isinstance(chain, Chain) and [s.gpa for s in chain.segments] == [0x100, R1, 0x200]


def test_bad_chain_status_of_an_oversized_request() -> None:
    mem, _, _ = memory()
    t = table((0x100, 16, N, 1), (0x1000, 2 << 20, N | W, 2), (0x200, 1, W, 0))
    assert walk(t).reason is FaultReason.TOO_LARGE  # type: ignore[union-attr]
    assert bad_chain_status(mem, t, 8, 0) == 0x200
    assert bad_chain_status(mem, table((0x100, 16, N, 1), (0x200, 16, N, 0)), 8, 0) is None


def test_slices_split_at_region_boundaries() -> None:
    a, b = bytearray(4096), bytearray(4096)
    mem = GuestMemory([Region(0, 4096, 0, memoryview(a)), Region(4096, 4096, 0, memoryview(b))])
    parts = mem.slices(4000, 200)
    assert parts is not None and [len(p) for p in parts] == [96, 104]
    assert mem.slices(8000, 200) is None


_desc = st.tuples(st.integers(0, 0x30000) | st.integers(0, 2**64 - 1),
                  st.integers(0, 0x9000) | st.integers(0, 2**32 - 1),
                  st.integers(0, 0xFFFF) | st.sampled_from([0, N, W, N | W, 4]),
                  st.integers(0, 12))


@settings(max_examples=3000, deadline=None)
@given(descs=st.lists(_desc, min_size=1, max_size=8), head=st.integers(0, 9),
       size=st.sampled_from([1, 2, 4, 8]), indirect=st.booleans(),
       hdr=st.binary(min_size=16, max_size=16), itab=st.lists(_desc, max_size=6))
def test_fuzz_walker_and_parser(descs: list[tuple[int, int, int, int]], head: int, size: int,
                                indirect: bool, hdr: bytes,
                                itab: list[tuple[int, int, int, int]]) -> None:
    """Random descriptor tables (and an indirect table in guest memory): no exception, every
    returned segment and status byte inside guest memory, and guest memory left untouched."""
    mem, a, b = memory()
    a[0x100:0x110] = hdr
    a[0x800:0x800 + 16 * len(itab)] = b"".join(DESC.pack(*d) for d in itab)
    before = (bytes(a), bytes(b))
    t = b"".join(DESC.pack(*d) for d in descs).ljust(size * 16, b"\0")[:max(size, 1) * 16]
    chain = walk_chain(mem, t, size, head, max_bytes=1 << 16, indirect=indirect)
    if isinstance(chain, Chain):
        assert len(chain.segments) <= size + (len(itab) if indirect else 0)
        for s in chain.segments:
            assert mem.contains(s.gpa, s.length)
        assert sum(s.length for s in chain.segments) <= 1 << 16
        req = parse_blk(mem, chain)
        if isinstance(req, BlkRequest):
            assert mem.contains(req.status_gpa, 1)
            assert all(mem.contains(s.gpa, s.length) for s in req.data)
    st_gpa = bad_chain_status(mem, t, size, head)
    assert st_gpa is None or mem.contains(st_gpa, 1)
    assert (bytes(a), bytes(b)) == before
    assert struct.calcsize("<QIHH") == 16
