"""Batch x86-64 paging: many linear addresses walked at once with numpy (SDM Vol. 3A s4.5-s4.7).

PURE (numpy only). :func:`translate_batch` gives, lane by lane, the outcome the scalar walker
:func:`hvtools.mmu.paging.walk` gives for the same memory, CR3, mode and access; the
differential tests in ``tests/unit/test_batch.py`` hold it to that. Every check the scalar
walker makes is vectorised; no lane falls back to the scalar walker:

- canonical-address check (SDM Vol. 1 s3.3.7.1): ``general-protection``, level 0;
- 4-level and 5-level walks with 4-KByte, 2-MByte and 1-GByte pages (s4.5), P and the
  reserved bits of each entry format under MAXPHYADDR, IA32_EFER.NXE and 1-GByte page support;
- a paging-structure entry outside the memory image is ``unbacked`` (``table-unbacked``, code
  0, ``fault_address`` = the entry's address), as in the scalar walker;
- access rights (s4.6, s4.6.2): U/S, protection keys (PKRU/IA32_PKRS), SMAP (EFLAGS.AC,
  implicit accesses), SMEP, R/W with CR0.WP, XD, reported in the scalar walker's order;
- the #PF error code (s4.7, Figure 4-12), taken from :func:`~hvtools.mmu.paging.error_code`.

Not done here: accessed/dirty write-back (s4.8). The batch path only reads memory, like a walk
with ``set_ad=False``; use the scalar walker when the A/D side effects matter. Steps (the
entries read) are not recorded either; :meth:`BatchResult.outcome` rebuilds one lane's
``Translation``/``Fault`` without them.

Memory is a :class:`PhysImage`: read-only numpy views (zero-copy) over one or more
guest-physical regions. :meth:`PhysImage.of` makes one from a :class:`BufferMemory`, from a
``MappedMemory`` (a live VM's ``RamFile``, a ``PmemDump``: anything with ``regions`` and
``view``) or from a raw buffer that holds guest-physical ``[base, base + len)``. A q35 RAM file
is not GPA-linear: RAM above the low-memory split sits at 4 GiB in guest-physical space but
right after the low part in the file. The image keeps one segment per region (GPA start, view
of that region's bytes), so an entry address is looked up in the region that holds it, exactly
as ``MappedMemory.read_u64`` does; an address in no region (the PCI hole) is unbacked.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from hvtools.addr import Gpa, Gva
from hvtools.errors import UsageError
from hvtools.memory.buffer import BufferMemory
from hvtools.memory.protocol import PhysMemory
from hvtools.mmu.paging import (
    PDE,
    PDE2M,
    PDPTE,
    PDPTE1G,
    PML4E,
    PML5E,
    PTE,
    Access,
    AccessKind,
    EntryFlag,
    PagingMode,
    error_code,
)
from hvtools.translation import Fault, Permissions, Stage, Translation

U64 = NDArray[np.uint64]
Bools = NDArray[np.bool_]

# -- outcome encoding ------------------------------------------------------------------------

#: ``BatchResult.fault_reason`` indexes this tuple; the names are the scalar walker's reasons.
REASONS: tuple[str, ...] = (
    "",  # 0: translated
    "non-canonical",
    "table-unbacked",
    "not-present",
    "reserved-bit",
    "user-supervisor",
    "protection-key",
    "smap",
    "write-protect",
    "smep",
    "execute-disable",
)
(_OK, _NONCANON, _UNBACKED, _NOTPRESENT, _RESERVED, _USER_SUP, _PKEY, _SMAP, _WP, _SMEP,
 _XDENY) = range(len(REASONS))

#: ``BatchResult.fault_kind`` indexes this tuple; the names are ``Fault.kind``.
KINDS: tuple[str, ...] = ("", "page-fault", "general-protection", "unbacked")
_KIND_OF_REASON = np.array([0, 2, 3] + [1] * (len(REASONS) - 3), dtype=np.uint8)

_BIT_P = int(EntryFlag.P)
_BIT_RW = int(EntryFlag.RW)
_BIT_US = int(EntryFlag.US)
_BIT_PS = int(EntryFlag.PS)
_XD_SHIFT = 63
_PK_SHIFT = PTE.field("PK").lo
_ADDR_51_12 = PTE.field("ADDR").mask
_ALL_ONES = (1 << 64) - 1

#: Lanes per numpy pass: the temporaries of one chunk stay in the L2 cache.
CHUNK = 1 << 14


# -- memory images ---------------------------------------------------------------------------


class _RegionLike(Protocol):
    @property
    def gpa(self) -> int: ...

    @property
    def size(self) -> int: ...


@runtime_checkable
class _RegionedMemory(Protocol):
    """``MappedMemory`` (``RamFile``, ``PmemDump``) without importing the adapter module."""

    @property
    def regions(self) -> tuple[_RegionLike, ...]: ...

    def view(self, addr: int, size: int) -> memoryview: ...


@dataclass(frozen=True)
class Segment:
    """Guest-physical ``[gpa, gpa + 8 * len(words))`` as little-endian 64-bit words.

    ``gpa`` is 8-byte aligned: entries are naturally aligned, so an entry lies in the image
    exactly when its word does.
    """

    gpa: int
    words: U64

    @property
    def end(self) -> int:
        return self.gpa + 8 * len(self.words)


class PhysImage:
    """numpy views over guest-physical memory regions, for :func:`translate_batch`.

    Zero-copy and never written: each segment is ``np.frombuffer`` over the backend's buffer,
    so a live RAM file is read as it is at the moment of the walk (stop the guest for a
    consistent answer, as for the scalar walker). A view pins its buffer: drop the image (or
    call :meth:`release`) before closing a mapped file.
    """

    def __init__(self, regions: Iterable[tuple[int, Any]]) -> None:
        """``regions``: (guest-physical start, buffer of that region's bytes) pairs."""
        segments: list[Segment] = []
        for gpa, buf in regions:
            if gpa < 0:
                raise UsageError(f"region start {gpa:#x} is negative")
            raw = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) \
                else buf.reshape(-1).view(np.uint8)
            skip = -gpa % 8
            count = max(0, (len(raw) - skip) // 8)
            if count:
                words = raw[skip:skip + 8 * count].view("<u8").astype(np.uint64, copy=False)
                segments.append(Segment(gpa + skip, words))
        segments.sort(key=lambda s: s.gpa)
        for a, b in itertools.pairwise(segments):
            if b.gpa < a.end:
                raise UsageError(f"regions at {a.gpa:#x} and {b.gpa:#x} overlap")
        self.segments: tuple[Segment, ...] = tuple(segments)

    @classmethod
    def from_buffer(cls, buf: Any, *, base: int = 0) -> PhysImage:
        """A buffer (ndarray, bytes, bytearray, memoryview, mmap) holding ``[base, ...)``."""
        return cls([(base, buf)])

    @classmethod
    def of(cls, memory: MemorySource) -> PhysImage:
        """The image of a memory backend: a BufferMemory, a MappedMemory (RamFile, PmemDump),
        an existing PhysImage, or a raw buffer at guest-physical 0."""
        if isinstance(memory, PhysImage):
            return memory
        if isinstance(memory, BufferMemory):
            return cls([(memory.base, memory.view(memory.base, memory.size))])
        if isinstance(memory, _RegionedMemory):
            return cls([(r.gpa, memory.view(r.gpa, r.size)) for r in memory.regions])
        exporter: Any = memory  # an mmap, or anything else with the buffer protocol
        try:
            memoryview(exporter).release()
        except TypeError:
            raise UsageError(
                f"no numpy view of {type(memory).__name__}: pass a BufferMemory, a RamFile/"
                "PmemDump, a PhysImage or a buffer") from None
        return cls.from_buffer(exporter)

    def release(self) -> None:
        """Drop the views (and so the buffer exports): the image reads as empty afterwards."""
        self.segments = ()

    def __enter__(self) -> PhysImage:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def read_u64(self, addr: U64) -> tuple[U64, Bools]:
        """The words at the 8-byte-aligned ``addr`` lanes, and whether each is in the image.

        What an unbacked lane reads is unspecified (the walk never looks at it).
        """
        if len(self.segments) == 1:
            seg = self.segments[0]
            rel = addr - np.uint64(seg.gpa)  # wraps below the start: one compare bounds both
            backed: Bools = rel < np.uint64(8 * len(seg.words))
            rel >>= np.uint64(3)
            entry: U64 = np.take(seg.words, rel.view(np.int64), mode="clip")
            return entry, backed
        entry = np.zeros(addr.shape, dtype=np.uint64)
        backed = np.zeros(addr.shape, dtype=np.bool_)
        for seg in self.segments:
            rel = addr - np.uint64(seg.gpa)
            inb: Bools = rel < np.uint64(8 * len(seg.words))
            rel >>= np.uint64(3)
            np.copyto(entry, np.take(seg.words, rel.view(np.int64), mode="clip"), where=inb)
            backed |= inb
        return entry, backed


#: What :meth:`PhysImage.of` (and so :func:`translate_batch`) takes; an ``mmap`` works too.
MemorySource = PhysImage | PhysMemory | NDArray[Any] | bytes | bytearray | memoryview


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchResult:
    """Per-lane outcomes of :func:`translate_batch`, in input order.

    ``ok``: translated. Where ``ok``: ``gpa``, ``page_size`` and the effective permissions
    (``write``, ``execute``, ``user``; ``pkey`` is the protection key, or -1 when protection
    keys do not apply, as ``Permissions.protection_key`` is None). Where not ``ok``: ``gpa``
    and ``page_size`` are 0, ``fault_kind`` indexes :data:`KINDS` and ``fault_reason``
    :data:`REASONS`, ``fault_code`` is the #PF error code (SDM s4.7; 0 for #GP, unbacked and
    LOOKUP faults), ``fault_level`` the paging level (5..1; 0 for #GP) and ``fault_address``
    the linear address (the entry's physical address for ``unbacked``).
    """

    gva: U64
    ok: Bools
    gpa: U64
    page_size: U64
    fault_code: NDArray[np.uint32]
    fault_level: NDArray[np.uint8]
    fault_kind: NDArray[np.uint8]
    fault_reason: NDArray[np.uint8]
    fault_address: U64
    write: Bools
    execute: Bools
    user: Bools
    pkey: NDArray[np.int8]

    def __len__(self) -> int:
        return len(self.gva)

    def outcome(self, i: int) -> Translation | Fault:
        """Lane ``i`` as the scalar walker's value, without ``steps``."""
        gva = int(self.gva[i])
        if self.ok[i]:
            pk = int(self.pkey[i])
            perms = Permissions(read=True, write=bool(self.write[i]),
                                execute=bool(self.execute[i]), user=bool(self.user[i]),
                                protection_key=None if pk < 0 else pk)
            return Translation(input=Gva(gva), output=Gpa(int(self.gpa[i])),
                               page_size=int(self.page_size[i]), permissions=perms)
        return Fault(input=gva, kind=KINDS[self.fault_kind[i]],
                     reason=REASONS[self.fault_reason[i]], code=int(self.fault_code[i]),
                     level=int(self.fault_level[i]), stage=Stage.GUEST,
                     address=int(self.fault_address[i]))


# -- the walk --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """Everything about a batch that does not depend on the lane: masks and lookup tables."""

    levels: int
    va_bits: int
    lookup: bool
    root: int
    table_mask: int
    rsvd_table: dict[int, int]  # level -> reserved bits of the table-referencing entry
    rsvd_page: dict[int, int]  # level -> reserved bits of the page entry (PS = 1, or PTE)
    codes: NDArray[np.uint32]  # reason -> #PF error code
    sizes: U64  # level -> page size (index 0 unused)
    frames: U64  # level -> frame mask of a leaf at that level


def _plan(cr3: int, mode: PagingMode, access: Access) -> _Plan:
    lookup = access.kind is AccessKind.LOOKUP
    table_mask = _ADDR_51_12 if lookup else mode.addr_mask
    rsvd_table = {5: mode.reserved_mask(PML5E), 4: mode.reserved_mask(PML4E),
                  3: mode.reserved_mask(PDPTE), 2: mode.reserved_mask(PDE)}
    rsvd_page = {3: mode.reserved_mask(PDPTE1G) if mode.page_1g else _BIT_PS,
                 2: mode.reserved_mask(PDE2M), 1: mode.reserved_mask(PTE)}
    codes = np.zeros(len(REASONS), dtype=np.uint32)
    if not lookup:
        for r in range(_NOTPRESENT, len(REASONS)):
            codes[r] = error_code(REASONS[r], mode, access)
    sizes = np.array([0] + [1 << (12 + 9 * (lv - 1)) for lv in (1, 2, 3, 4, 5)],
                     dtype=np.uint64)
    frames = np.array([table_mask & ~(int(s) - 1) & _ALL_ONES if s else 0 for s in sizes],
                      dtype=np.uint64)
    return _Plan(levels=mode.levels, va_bits=mode.va_bits, lookup=lookup,
                 root=cr3 & table_mask, table_mask=table_mask, rsvd_table=rsvd_table,
                 rsvd_page=rsvd_page, codes=codes, sizes=sizes, frames=frames)


def _as_gvas(gvas: Any) -> U64:
    """``gvas`` as a 1-D uint64 array (no copy when it already is one)."""
    if isinstance(gvas, np.ndarray):
        if gvas.ndim != 1:
            raise UsageError(f"linear addresses must be a 1-D array, not shape {gvas.shape}")
        if gvas.dtype.kind in "iu":
            if gvas.dtype.kind == "i" and gvas.size and int(gvas.min()) < 0:
                raise UsageError("a linear address is negative: not a 64-bit value")
            arr: U64 = gvas.astype(np.uint64, copy=False)
            return arr
        if gvas.dtype.kind != "O":
            raise UsageError(f"linear addresses must be integers, not {gvas.dtype}")
        gvas = gvas.tolist()
    try:  # a sequence of Python ints, any of 0 .. 2**64 - 1
        return np.fromiter((operator.index(v) for v in gvas), dtype=np.uint64)
    except TypeError as err:
        raise UsageError(f"linear addresses must be integers: {err}") from err
    except OverflowError as err:
        raise UsageError(f"a linear address is not a 64-bit value: {err}") from err


def translate_batch(mem: MemorySource, cr3: int, mode: PagingMode, gvas: Any,
                    access: Access) -> BatchResult:
    """Translate every address in ``gvas`` as :func:`~hvtools.mmu.paging.walk` would.

    ``mem`` is anything :meth:`PhysImage.of` takes (a numpy ``uint8`` array or other buffer
    holding guest-physical memory from address 0, a BufferMemory, a RamFile, a PhysImage).
    ``gvas`` is a 1-D array of 64-bit linear addresses (``uint64``). Read-only: no A/D bits are
    set (SDM s4.8), whatever ``access`` is.
    """
    image = PhysImage.of(mem)
    g = _as_gvas(gvas)
    n = len(g)
    out = BatchResult(
        gva=g, ok=np.zeros(n, np.bool_), gpa=np.zeros(n, np.uint64),
        page_size=np.zeros(n, np.uint64), fault_code=np.zeros(n, np.uint32),
        fault_level=np.zeros(n, np.uint8), fault_kind=np.zeros(n, np.uint8),
        fault_reason=np.zeros(n, np.uint8), fault_address=np.zeros(n, np.uint64),
        write=np.zeros(n, np.bool_), execute=np.zeros(n, np.bool_),
        user=np.zeros(n, np.bool_), pkey=np.zeros(n, np.int8))
    plan = _plan(cr3, mode, access)
    for lo in range(0, n, CHUNK):
        _walk_chunk(image, plan, mode, access, out, slice(lo, min(n, lo + CHUNK)))
    return out


def _walk_chunk(image: PhysImage, plan: _Plan, mode: PagingMode, access: Access,
                out: BatchResult, sl: slice) -> None:
    """Walk the lanes ``sl`` of ``out.gva``, every lane through every level in lock step.

    A lane that stops (fault or leaf) is frozen: later levels still read for it, but nothing
    of its state changes (``active`` gates every update).
    """
    gva = out.gva[sl]
    n = len(gva)
    u64 = np.uint64
    # Canonical check, SDM Vol. 1 s3.3.7.1: bits 63:va_bits-1 all equal.
    top = gva >> u64(plan.va_bits - 1)
    active: Bools = (top == 0) | (top == u64((1 << (65 - plan.va_bits)) - 1))
    reason = np.where(active, np.uint8(_OK), np.uint8(_NONCANON))
    level_of = np.zeros(n, np.uint8)
    leaf_entry = np.zeros(n, np.uint64)
    entry_addr = np.zeros(n, np.uint64)
    acc_and = np.full(n, _ALL_ONES, np.uint64)  # R/W and U/S: AND over the levels (s4.6)
    acc_or = np.zeros(n, np.uint64)  # XD: OR over the levels
    table = np.full(n, plan.root, np.uint64)

    for level in range(plan.levels, 0, -1):
        if not active.any():
            break
        shift = u64(12 + 9 * (level - 1))
        addr = (gva >> shift) & u64(0x1FF)
        addr <<= u64(3)
        addr += table
        entry, backed = image.read_u64(addr)
        present = (entry & u64(_BIT_P)).astype(np.bool_)
        good = backed & present
        if level == 1:
            is_page: Bools | bool = True
        elif level <= 3:
            is_page = (entry & u64(_BIT_PS)).astype(np.bool_)
        else:
            is_page = False
        if plan.lookup:
            bad: Bools | None = None
        else:
            if level == 1:
                rsvd: U64 | np.uint64 = u64(plan.rsvd_page[1])
            elif level <= 3:
                rsvd = np.where(is_page, u64(plan.rsvd_page[level]),
                                u64(plan.rsvd_table[level]))
            else:
                rsvd = u64(plan.rsvd_table[level])
            bad = (entry & rsvd).astype(np.bool_)
            good &= ~bad
        # This level's reason for every lane: unbacked, not present, reserved bit, or none.
        here = np.where(backed, np.uint8(_NOTPRESENT), np.uint8(_UNBACKED))
        here[good] = _OK
        if bad is not None:
            here[backed & present & bad] = _RESERVED
        np.bitwise_and(acc_and, entry, out=acc_and, where=active)
        np.bitwise_or(acc_or, entry, out=acc_or, where=active)
        stop = active & ~good
        if is_page is True:
            stop = active
        elif is_page is not False:
            stop |= active & is_page
        np.copyto(reason, here, where=stop)
        np.copyto(level_of, np.uint8(level), where=stop)
        np.copyto(leaf_entry, entry, where=stop)
        np.copyto(entry_addr, addr, where=stop)
        active &= ~stop
        np.bitwise_and(entry, u64(plan.table_mask), out=table, where=active)

    # Lanes that reached a leaf with no fault: access rights (s4.6), in walk()'s order.
    leaf = reason == _OK
    us = (acc_and & u64(_BIT_US)).astype(np.bool_)
    rw = (acc_and & u64(_BIT_RW)).astype(np.bool_)
    xd = (acc_or >> u64(_XD_SHIFT)).astype(np.bool_) if mode.nxe else np.zeros(n, np.bool_)
    keyed: Bools
    if mode.pke and mode.pks:
        keyed = np.ones(n, np.bool_)
    elif mode.pke:
        keyed = us
    elif mode.pks:
        keyed = ~us
    else:
        keyed = np.zeros(n, np.bool_)
    pk = ((leaf_entry >> u64(_PK_SHIFT)) & u64(0xF)).astype(np.int8)
    kind = access.kind
    if kind is not AccessKind.LOOKUP:
        deny = np.zeros(n, np.uint8)
        smap = access.supervisor and mode.smap and (access.implicit or not access.ac)
        if kind is AccessKind.FETCH:
            deny[xd] = _XDENY
            if access.supervisor and mode.smep:
                deny[us] = _SMEP
        else:
            if kind is AccessKind.WRITE and (access.user or mode.wp):
                deny[~rw] = _WP
            if smap:
                deny[us] = _SMAP
            if keyed.any():
                keys = np.where(us, u64(mode.pkru), u64(mode.pkrs))
                two = pk.astype(np.uint64) << u64(1)
                ad = ((keys >> two) & u64(1)).astype(np.bool_)
                pkf = ad
                if kind is AccessKind.WRITE and (access.user or mode.wp):
                    pkf = ad | ((keys >> (two + u64(1))) & u64(1)).astype(np.bool_)
                deny[keyed & pkf] = _PKEY
        if access.user:
            deny[~us] = _USER_SUP
        deny[~leaf] = _OK
        reason |= deny  # leaf lanes had reason 0; other lanes keep theirs

    ok = reason == _OK
    lv = level_of.astype(np.intp)
    size = plan.sizes[lv]
    gpa = (leaf_entry & plan.frames[lv]) | (gva & (size - u64(1)))
    o = out
    o.ok[sl] = ok
    o.gpa[sl] = np.where(ok, gpa, u64(0))
    o.page_size[sl] = np.where(ok, size, u64(0))
    o.fault_reason[sl] = reason
    o.fault_kind[sl] = _KIND_OF_REASON[reason]
    o.fault_code[sl] = plan.codes[reason]
    o.fault_level[sl] = np.where(ok, np.uint8(0), level_of)
    o.fault_address[sl] = np.where(ok, u64(0), np.where(reason == _UNBACKED, entry_addr, gva))
    o.write[sl] = ok & rw
    o.execute[sl] = ok & ~xd
    o.user[sl] = ok & us
    o.pkey[sl] = np.where(ok & keyed, pk, np.int8(-1))
