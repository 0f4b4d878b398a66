"""Shadow paging for a nested (L2) guest, both directions: shadow EPT and reverse shadow tables.

PURE. Three address spaces: L2-physical (the L2 guest's GPAs), L1-physical (the L1 hypervisor's
GPAs) and host-physical (L0). EPT12 is L1's EPT for L2 (its tables live in L1-physical memory),
EPT01 is L0's EPT for L1 (Intel SDM Vol. 3C s29.3). :class:`L1Memory` and :class:`L2Memory` are
views of those spaces over host memory, read and written through EPT01 (and EPT12).

- :class:`ShadowEpt`: EPT02, the table the processor really uses for L2, composed from EPT12 and
  EPT01 lazily as KVM's nested MMU does (Documentation/virt/kvm/x86/mmu.rst: a miss walks the
  guest's table, translates the result, installs a shadow entry; the guest table pages that a
  shadow entry was derived from are write-tracked). A write by L1 to such a page traps and every
  EPT02 entry derived from the written entry is re-derived: updated in place when the fresh walk
  still translates, zapped otherwise. INVEPT (SDM Vol. 3C s29.4.3) zaps everything.
- :class:`ReverseShadow`: the seed design. When L2 write-protects entries of its own page table,
  L1 shadows them: a table in L1-physical memory that maps L2 GVA -> L1 GPA directly (L2's paging
  composed with EPT12); L0 keeps EPT01 for L1 GPA -> HPA, so the processor walks the shadow table
  nested under EPT01. L2 writes to the L2 table pages the shadow was derived from trap likewise.

Both always agree (:func:`agree`) with a fresh two-dimensional walk
(:func:`hvtools.mmu.nested.walk` over the current tables with :class:`ComposedEpt`, i.e. EPT12
then EPT01, as the second stage): same host-physical output and effective permissions, or a
fault at the same place (:func:`fault_place`: kind, reason, code, level, stage, address, phase).
Page sizes are not compared: shadows install 4-KByte leaves only.

Model choices: a miss (a shadow walk that faults) takes the slow path, which *is* the fresh walk,
so a fault reported to the guest always comes from the current tables. Shadow entries are keyed
by 4-KByte page and depend on the exact 8-byte entries (L1-physical addresses) the fresh walk
read; a write traps when it lands on a 4-KByte page holding any such entry ("write-protected").
EPT01 is L0's own table and is not tracked: after changing it, call ``invept``/``invalidate``.
Not modelled: EPT A/D flags (EPTPs with bit 6 set are refused), mode-based execute control,
encryption key bits, CR0.WP = 0 and EFER.NXE = 0 for the reverse shadow (a shadow PTE could not
express EPT12's write or execute denial), aliasing in EPT01 (two L1 GPAs, one HPA).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from hvtools.addr import PAGE_4K, Gva
from hvtools.errors import UsageError
from hvtools.memory.protocol import PhysMemory, WritablePhysMemory
from hvtools.mmu import ept, nested, paging
from hvtools.mmu.ept import EptAccess, EptBuilder, EptControls, EptFlag, EptPointer
from hvtools.mmu.nested import EptStage, NestedFault, NestedTranslation, Phase, StageRequest
from hvtools.mmu.paging import SUPERVISOR_READ, Access, AccessKind, EntryFlag, PagingMode
from hvtools.translation import Fault, Permissions, Stage, Translation

A = TypeVar("A", EptAccess, Access)

_MASK64 = (1 << 64) - 1
_GPA_BITS = (1 << 48) - 1  # the EPT walk uses GPA bits 47:0 only (s29.3.2)
_PK = paging.PTE.field("PK")
_PROT = EntryFlag.RW | EntryFlag.US | EntryFlag.XD


# -- agreement -------------------------------------------------------------------------------


def fault_place(f: Fault) -> tuple[object, ...]:
    """Where and why a walk stopped: what two faults must share to be "the same fault"."""
    phase = f.phase if isinstance(f, NestedFault) else None
    return (f.kind, f.reason, f.code, f.level, f.stage, f.address, phase)


def agree(a: Translation | Fault, b: Translation | Fault) -> bool:
    """Both translate to the same address with the same effective permissions, or both fault
    at the same :func:`fault_place`. Page size and steps are not compared."""
    if isinstance(a, Translation) and isinstance(b, Translation):
        return a.output == b.output and a.permissions == b.permissions
    if isinstance(a, Fault) and isinstance(b, Fault):
        return fault_place(a) == fault_place(b)
    return False


@dataclass
class ShadowCounters:
    """What a shadow did. ``traps``: writes that landed on a write-protected page (one per write
    call and 4-KByte page). ``updates``: shadow entries re-derived after a trap that still
    translate (rewritten in place, maybe to the same value). ``zaps``: shadow entries removed,
    after a trap whose fresh walk no longer translates, or by an invalidation. ``faults_in``:
    entries installed on a miss. ``prefills``: entries installed eagerly (ReverseShadow.protect).
    ``invalidations``: INVEPT / invalidate calls. ``hits`` / ``misses``: accesses the shadow
    answered / that took the slow path (a fresh walk)."""

    traps: int = 0
    updates: int = 0
    zaps: int = 0
    faults_in: int = 0
    prefills: int = 0
    invalidations: int = 0
    hits: int = 0
    misses: int = 0


# -- memory views ----------------------------------------------------------------------------


def _chunks(addr: int, size: int) -> Iterator[tuple[int, int, int]]:
    """``(address, offset into the request, length)`` pieces that stay within one 4K page."""
    done = 0
    while done < size:
        n = min(size - done, PAGE_4K - ((addr + done) & (PAGE_4K - 1)))
        yield addr + done, done, n
        done += n


class _TranslatedMemory:
    """Memory of an address space reached through an EPT: ``_outer`` translates a page."""

    lower: PhysMemory

    def _outer(self, addr: int, kind: AccessKind) -> int | Fault:
        raise NotImplementedError

    def _must(self, addr: int, kind: AccessKind) -> int:
        r = self._outer(addr, kind)
        if isinstance(r, Fault):
            raise UsageError(f"{addr:#x} is not {kind}able through its EPT: {r.kind} "
                             f"({r.reason}) at level {r.level}")
        return r

    #: The translation a ``contains`` just made, reused by a read of that page right after it
    #: (a walker checks then reads each entry); any other call drops it.
    _last: tuple[int, int] | None = None

    def contains(self, addr: int, size: int = 1) -> bool:
        self._last = None
        if size < 0 or addr < 0:
            return False
        for a, _, n in _chunks(addr, size):
            out = self._outer(a, AccessKind.READ)
            if isinstance(out, Fault) or not self.lower.contains(out, n):
                return False
            self._last = (a >> 12, out - a)
        return True

    def read(self, addr: int, size: int) -> bytes:
        self._last = None
        data = bytearray(size)
        for a, off, n in _chunks(addr, size):
            data[off:off + n] = self.lower.read(self._must(a, AccessKind.READ), n)
        return bytes(data)

    def read_u64(self, addr: int) -> int:
        last, self._last = self._last, None
        if addr & 7:
            return int.from_bytes(self.read(addr, 8), "little")
        if last is not None and last[0] == addr >> 12:
            return self.lower.read_u64(addr + last[1])
        return self.lower.read_u64(self._must(addr, AccessKind.READ))


class L1Memory(_TranslatedMemory):
    """L1-physical memory: host memory through EPT01 (a read needs R, a write W).

    Writes are reported to ``watchers`` (called with the L1 GPA and size, after the write): this
    is how a shadow sees writes to the pages it write-protects. Inside :meth:`recording`, the
    address of every 8-byte read is logged (the entries a walk depended on).
    """

    def __init__(self, host: PhysMemory, eptp01: int, controls: EptControls) -> None:
        self.lower = host
        self.host = host
        self.eptp01 = eptp01
        self.controls = controls
        self.watchers: list[Callable[[int, int], None]] = []
        self._log: list[int] | None = None

    def _outer(self, addr: int, kind: AccessKind) -> int | Fault:
        r = ept.walk(self.host, self.eptp01, addr, EptAccess(kind), controls=self.controls)
        return r.output if isinstance(r, Translation) else r

    def read_u64(self, addr: int) -> int:
        if self._log is not None:
            self._log.append(addr)
        return super().read_u64(addr)

    @contextmanager
    def recording(self) -> Iterator[list[int]]:
        """Log the L1 GPA of every 8-byte read made inside the block."""
        log: list[int] = []
        outer, self._log = self._log, log
        try:
            yield log
        finally:
            self._log = outer

    def write(self, addr: int, data: bytes) -> None:
        self._last = None
        host = self.host
        if not isinstance(host, WritablePhysMemory):
            raise UsageError("writing L1 memory needs a WritablePhysMemory host")
        hpas = [(a, off, n, self._must(a, AccessKind.WRITE)) for a, off, n in
                _chunks(addr, len(data))]
        for a, off, n, hpa in hpas:
            host.write(hpa, data[off:off + n])
            for watch in list(self.watchers):
                watch(a, n)

    def write_u64(self, addr: int, value: int) -> None:
        if not 0 <= value <= _MASK64:
            raise UsageError(f"{value:#x} is not a 64-bit value")
        self.write(addr, value.to_bytes(8, "little"))


class L2Memory(_TranslatedMemory):
    """L2-physical memory: L1 memory through EPT12 (writes go through :class:`L1Memory`, so
    its watchers see them)."""

    def __init__(self, l1: L1Memory, eptp12: int) -> None:
        self.lower = l1
        self.l1 = l1
        self.eptp12 = eptp12

    def _outer(self, addr: int, kind: AccessKind) -> int | Fault:
        r = ept.walk(self.l1, self.eptp12, addr, EptAccess(kind), controls=self.l1.controls)
        return r.output if isinstance(r, Translation) else r

    def write(self, addr: int, data: bytes) -> None:
        self._last = None
        for a, off, n in _chunks(addr, len(data)):
            self.l1.write(self._must(a, AccessKind.WRITE), data[off:off + n])

    def write_u64(self, addr: int, value: int) -> None:
        if not 0 <= value <= _MASK64:
            raise UsageError(f"{value:#x} is not a 64-bit value")
        self.write(addr, value.to_bytes(8, "little"))


# -- the reference second stage --------------------------------------------------------------


def _ept_access(request: StageRequest) -> EptAccess:
    final = request.phase is Phase.FINAL
    return EptAccess(kind=request.kind, guest_paging=not final, gva=request.gva,
                     linear_user=request.linear_user if final else None,
                     linear_writable=request.linear_writable if final else None,
                     linear_executable=request.linear_executable if final else None)


def _check_eptp(eptp: int, name: str) -> None:
    if EptPointer.field("AD").get(eptp & _MASK64):
        raise UsageError(f"{name} enables EPT A/D flags, which shadowing does not model")


@dataclass(frozen=True)
class ComposedEpt:
    """L2 GPA -> HPA the long way, as a :class:`~hvtools.mmu.nested.SecondStage`: EPT12 (read
    in L1-physical memory, each of its entries through EPT01), then EPT01 on the L1 GPA.

    A fault keeps the EPT walk's own kind and code: an EPT12 fault has the L2 GPA as
    ``address`` (L0 reflects it to L1), an EPT01 fault the L1 GPA (L0 handles it); an EPT12
    entry that EPT01 refuses to read gives that EPT01 fault (at the entry's L1 GPA). The
    permissions of a translation are the AND of both stages'.
    """

    eptp12: int
    eptp01: int
    controls: EptControls

    @property
    def stage(self) -> Stage:
        return Stage.EPT

    def root(self, gpa: int) -> int:
        return self.eptp12

    def translate(self, memory: PhysMemory, request: StageRequest, *, set_ad: bool,
                  key_bits: int) -> Translation | Fault:
        if set_ad or key_bits:
            raise UsageError("ComposedEpt models neither A/D updates nor key bits")
        return self.translate_gpa(L1Memory(memory, self.eptp01, self.controls), request.gpa,
                                  _ept_access(request))

    def translate_gpa(self, l1: L1Memory, gpa: int, access: EptAccess = ept.EPT_READ
                      ) -> Translation | Fault:
        """Translate L2 GPA ``gpa``, reading EPT12 through ``l1``."""
        r12 = ept.walk(l1, self.eptp12, gpa, access, controls=self.controls)
        if isinstance(r12, Fault):
            if r12.kind == "unbacked" and r12.address is not None:
                f01 = ept.walk(l1.host, self.eptp01, r12.address, ept.EPT_READ,
                               controls=self.controls)
                if isinstance(f01, Fault):
                    return f01
            return r12
        r01 = ept.walk(l1.host, self.eptp01, r12.output, access, controls=self.controls)
        if isinstance(r01, Fault):
            return r01
        p, q = r12.permissions, r01.permissions
        perms = Permissions(read=p.read and q.read, write=p.write and q.write,
                            execute=p.execute and q.execute, user=False)
        return Translation(input=gpa, output=r01.output,
                           page_size=min(r12.page_size, r01.page_size), permissions=perms,
                           steps=r12.steps + r01.steps)


# -- write tracking --------------------------------------------------------------------------


class _Deps:
    """Which shadow entries (keys) were derived from which 8-byte entries (L1 GPAs)."""

    def __init__(self) -> None:
        self.by_addr: dict[int, set[int]] = {}
        self.by_key: dict[int, tuple[int, ...]] = {}
        self.frames: dict[int, int] = {}  # 4K frame -> entries in it that something uses

    def add(self, key: int, addrs: list[int]) -> None:
        self.remove(key)
        self.by_key[key] = tuple(sorted({a & ~7 for a in addrs}))
        for a in self.by_key[key]:
            users = self.by_addr.setdefault(a, set())
            if not users:
                self.frames[a >> 12] = self.frames.get(a >> 12, 0) + 1
            users.add(key)

    def remove(self, key: int) -> None:
        for a in self.by_key.pop(key, ()):
            users = self.by_addr[a]
            users.discard(key)
            if not users:
                del self.by_addr[a]
                self.frames[a >> 12] -= 1
                if not self.frames[a >> 12]:
                    del self.frames[a >> 12]

    def hit(self, addr: int, size: int) -> set[int] | None:
        """None when ``[addr, addr + size)`` touches no write-protected page; else the keys
        derived from the entries it overwrote."""
        if not any(f in self.frames for f in range(addr >> 12, ((addr + size - 1) >> 12) + 1)):
            return None
        keys: set[int] = set()
        for a in range(addr & ~7, addr + size, 8):
            keys |= self.by_addr.get(a, set())
        return keys

    def clear(self) -> None:
        self.by_addr.clear()
        self.by_key.clear()
        self.frames.clear()


@dataclass
class _Entry(Generic[A]):
    leaf: int  # where the shadow leaf entry lives (EPT02: host-physical; reverse: L1 GPA)
    access: A  # the access it was derived with (re-derivations use it again)


class _TrappingShadow(Generic[A]):
    """What both shadows share: entries derived from guest-table entries whose pages are
    write-protected; a write there traps, and each affected entry is re-derived (an update)
    or removed (a zap). Subclasses say how an entry is (re)filled and where its leaf lives."""

    counters: ShadowCounters
    _entries: dict[int, _Entry[A]]
    _deps: _Deps

    def _fill(self, key: int, access: A) -> bool:
        """(Re)derive the entry for ``key``: True if installed, False if removed."""
        raise NotImplementedError

    def _leaf_memory(self) -> WritablePhysMemory:
        raise NotImplementedError

    def _drop(self, key: int) -> bool:
        self._deps.remove(key)
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._leaf_memory().write_u64(entry.leaf, 0)
        return True

    def _on_write(self, gpa: int, size: int) -> None:
        keys = self._deps.hit(gpa, size)
        if keys is None:
            return
        self.counters.traps += 1
        for key in sorted(keys):
            entry = self._entries.get(key)
            if entry is None:
                continue
            if self._fill(key, entry.access):
                self.counters.updates += 1
            else:
                self.counters.zaps += 1


# -- shadow EPT ------------------------------------------------------------------------------


class ShadowEpt(_TrappingShadow[EptAccess]):
    """EPT02 for an L2 guest, composed lazily from EPT12 and EPT01 and kept coherent.

    ``l1`` is L1-physical memory (its host must be writable: EPT02 is built there, in
    ``ept02_tables`` = [first, limit) host-physical); ``eptp12`` is L1's EPTP for L2. Also a
    :class:`~hvtools.mmu.nested.SecondStage`, so ``nested.walk(..., second=shadow)`` runs L2's
    paging on EPT02 as the processor would, faulting entries in as it goes.
    """

    def __init__(self, l1: L1Memory, eptp12: int, *, ept02_tables: tuple[int, int]) -> None:
        host = l1.host
        if not isinstance(host, WritablePhysMemory):
            raise UsageError("a shadow EPT needs a WritablePhysMemory host to build EPT02 in")
        if l1.controls.mbec:
            raise UsageError("shadow EPT does not model mode-based execute control")
        _check_eptp(eptp12, "EPTP12")
        _check_eptp(l1.eptp01, "EPTP01")
        self.l1 = l1
        self.host = host
        self.controls = l1.controls
        self.composed = ComposedEpt(eptp12, l1.eptp01, l1.controls)
        self._ept02 = EptBuilder(host, first_table=ept02_tables[0],
                                 table_limit=ept02_tables[1])
        self.eptp02 = self._ept02.eptp()
        self.counters = ShadowCounters()
        self._entries: dict[int, _Entry[EptAccess]] = {}
        self._deps = _Deps()
        l1.watchers.append(self._on_write)

    # SecondStage protocol
    @property
    def stage(self) -> Stage:
        return Stage.EPT

    def root(self, gpa: int) -> int:
        return self.eptp02

    def translate(self, memory: PhysMemory, request: StageRequest, *, set_ad: bool,
                  key_bits: int) -> Translation | Fault:
        if set_ad or key_bits:
            raise UsageError("ShadowEpt models neither A/D updates nor key bits")
        return self.translate_gpa(request.gpa, _ept_access(request))

    @property
    def entries(self) -> frozenset[int]:
        """L2 GPAs (4-KByte pages) EPT02 maps now."""
        return frozenset(p << 12 for p in self._entries)

    @property
    def write_protected(self) -> frozenset[int]:
        """L1 GPAs (4-KByte pages) of the EPT12 tables writes to which trap."""
        return frozenset(f << 12 for f in self._deps.frames)

    def reference(self, gpa: int, access: EptAccess = ept.EPT_READ) -> Translation | Fault:
        """The fresh walk of ``gpa`` through the current EPT12 and EPT01 (no side effects)."""
        return self.composed.translate_gpa(L1Memory(self.host, self.l1.eptp01, self.controls),
                                           gpa, access)

    def translate_gpa(self, gpa: int, access: EptAccess = ept.EPT_READ) -> Translation | Fault:
        """L2 GPA -> HPA: EPT02 if it allows the access (a hit), else the fresh walk (a miss),
        whose translation is installed in EPT02 (a fault-in) and whose fault is returned."""
        r = ept.walk(self.host, self.eptp02, gpa, access, controls=self.controls)
        if isinstance(r, Translation):
            self.counters.hits += 1
            return r
        self.counters.misses += 1
        page = (gpa & _GPA_BITS) >> 12
        fresh = self._derive(page, access, gpa)
        if isinstance(fresh, Translation) and page not in self._entries:
            self.counters.faults_in += 1 if self._install(page, fresh, access) else 0
        return fresh

    def _derive(self, page: int, access: EptAccess, gpa: int | None = None
                ) -> Translation | Fault:
        with self.l1.recording() as log:
            fresh = self.composed.translate_gpa(self.l1, page << 12 if gpa is None else gpa,
                                                access)
        if isinstance(fresh, Translation):
            self._deps.add(page, log)
        return fresh

    def _install(self, page: int, fresh: Translation, access: EptAccess) -> bool:
        p = fresh.permissions
        flags = ((EptFlag.R if p.read else 0) | (EptFlag.W if p.write else 0)
                 | (EptFlag.X if p.execute else 0))
        if not flags or (flags == EptFlag.X and not self.controls.execute_only):
            self._drop(page)
            return False
        leaf = self._ept02.map(page << 12, fresh.output & ~(PAGE_4K - 1), flags=flags)
        self._entries[page] = _Entry(leaf, access)
        return True

    def _fill(self, page: int, access: EptAccess) -> bool:
        fresh = self._derive(page, access)
        if isinstance(fresh, Translation) and self._install(page, fresh, access):
            return True
        self._drop(page)
        return False

    def _leaf_memory(self) -> WritablePhysMemory:
        return self.host

    def l1_write(self, gpa: int, value: int) -> Fault | None:
        """L1 stores the 64-bit ``value`` at L1 GPA ``gpa``; a store to a write-protected EPT12
        page traps and re-derives the EPT02 entries built from the entry it overwrote. Returns
        EPT01's fault when EPT01 refuses the store (nothing is written)."""
        r = ept.walk(self.host, self.l1.eptp01, gpa, ept.EPT_WRITE, controls=self.controls)
        if isinstance(r, Fault):
            return r
        self.l1.write_u64(gpa, value)
        return None

    def invept(self) -> int:
        """INVEPT (SDM Vol. 3C s29.4.3, single-context or all-context: one EPTP12 here): zap
        every EPT02 entry and lift the write protection. Returns how many were zapped."""
        dropped = 0
        for page in list(self._entries):
            dropped += self._drop(page)
        self._deps.clear()
        self.counters.zaps += dropped
        self.counters.invalidations += 1
        return dropped


# -- reverse shadow page tables --------------------------------------------------------------


_PREFILL_ACCESS = Access(AccessKind.READ, ac=True)  # a supervisor read SMAP does not refuse


class ReverseShadow(_TrappingShadow[Access]):
    """L1's shadow page table for an L2 guest, mapping L2 GVA -> L1 GPA (the seed design).

    L2's own page table (root ``l2_cr3``, built in ``l2_tables`` = [first, limit) L2-physical by
    :meth:`map`) maps GVA -> L2 GPA; EPT12 maps L2 GPA -> L1 GPA; the shadow table (in
    ``shadow_tables``, L1-physical) holds their composition with 4-KByte leaves whose rights
    are both stages' (RW = guest RW and EPT12 W; XD = guest XD or not EPT12 X), and the
    processor walks it nested under EPT01. :meth:`protect` (L2 write-protecting entries) makes
    L1 shadow that GVA at once; with ``fill_on_miss`` any miss is shadowed too. Writes by L2
    (and by L1) to a page holding an entry a shadow PTE was derived from (an L2 table entry or
    an EPT12 entry) trap and re-derive it.
    """

    def __init__(self, l1: L1Memory, eptp12: int, mode: PagingMode, *,
                 l2_tables: tuple[int, int], shadow_tables: tuple[int, int],
                 fill_on_miss: bool = True) -> None:
        if not (mode.wp and mode.nxe):
            raise UsageError("a reverse shadow needs CR0.WP = 1 and EFER.NXE = 1 (a shadow PTE "
                             "cannot express EPT12's write or execute denial otherwise)")
        if l1.controls.mbec:
            raise UsageError("reverse shadow does not model mode-based execute control")
        _check_eptp(eptp12, "EPTP12")
        _check_eptp(l1.eptp01, "EPTP01")
        self.l1 = l1
        self.eptp12 = eptp12
        self.mode = mode
        self.fill_on_miss = fill_on_miss
        self.counters = ShadowCounters()
        self.l2 = L2Memory(self.l1, self.eptp12)
        self._guest = paging.TableBuilder(self.l2, la57=self.mode.la57,
                                          first_table=l2_tables[0], table_limit=l2_tables[1])
        # The shadow table is L1's own: written through a view no one watches.
        quiet = L1Memory(self.l1.host, self.l1.eptp01, self.l1.controls)
        self._shadow = paging.TableBuilder(quiet, la57=self.mode.la57,
                                           first_table=shadow_tables[0],
                                           table_limit=shadow_tables[1])
        self._quiet = quiet
        self.ept01 = EptStage(self.l1.eptp01, self.l1.controls)
        self.ept12 = EptStage(self.eptp12, self.l1.controls)
        self.composed = ComposedEpt(self.eptp12, self.l1.eptp01, self.l1.controls)
        self._entries: dict[int, _Entry[Access]] = {}
        self._deps = _Deps()
        self.l1.watchers.append(self._on_write)

    @property
    def l2_cr3(self) -> int:
        return self._guest.cr3

    @property
    def shadow_cr3(self) -> int:
        return self._shadow.cr3

    @property
    def entries(self) -> frozenset[int]:
        """GVAs (4-KByte pages, canonical) the shadow maps now."""
        return frozenset(self._gva(k) for k in self._entries)

    @property
    def write_protected(self) -> frozenset[int]:
        """L1 GPAs (4-KByte pages) of the L2 table and EPT12 pages writes to which trap."""
        return frozenset(f << 12 for f in self._deps.frames)

    def _key(self, gva: int) -> int:
        return (gva & ((1 << self.mode.va_bits) - 1)) >> 12

    def _gva(self, key: int) -> Gva:
        return paging.canonical(key << 12, self.mode.la57)

    # -- the walks

    def reference(self, gva: int, access: Access = SUPERVISOR_READ
                  ) -> NestedTranslation | NestedFault:
        """The fresh two-dimensional walk: L2's table, then EPT12, then EPT01."""
        return nested.walk(self.l1.host, self.l2_cr3, self.mode, Gva(gva), access,
                           second=self.composed)

    def translate(self, gva: int, access: Access = SUPERVISOR_READ
                  ) -> NestedTranslation | NestedFault:
        """GVA -> L1 GPA -> HPA through the shadow and EPT01 when it allows the access (a hit);
        else the fresh walk (a miss), shadowing the GVA when ``fill_on_miss``."""
        r = nested.walk(self.l1.host, self.shadow_cr3, self.mode, Gva(gva), access,
                        second=self.ept01)
        if isinstance(r, NestedTranslation):
            self.counters.hits += 1
            return r
        self.counters.misses += 1
        if self.fill_on_miss and paging.is_canonical(gva, self.mode.la57) \
                and self._key(gva) not in self._entries:
            self.counters.faults_in += self._fill(self._key(gva), access)
        return self.reference(gva, access)

    def _fill(self, key: int, access: Access) -> bool:
        with self.l1.recording() as log:
            c = nested.walk(self.l1, self.l2_cr3, self.mode, self._gva(key), access,
                            second=self.ept12)
        if not isinstance(c, NestedTranslation):
            self._drop(key)
            return False
        self._deps.add(key, log)
        p = c.permissions
        if not p.read:  # execute-only in EPT12: no PTE expresses it; leave it to the slow path
            self._drop(key)
            return False
        leaf = next(s.entry for s in reversed(c.steps) if s.stage is Stage.GUEST)
        flags = (EntryFlag.P | (EntryFlag.RW if p.write else 0) | (EntryFlag.US if p.user else 0)
                 | (0 if p.execute else EntryFlag.XD))
        addr = self._shadow.map(self._gva(key), c.output & ~(PAGE_4K - 1), flags=flags,
                                pkey=_PK.get(leaf))
        self._entries[key] = _Entry(addr, access)
        return True

    def _leaf_memory(self) -> WritablePhysMemory:
        return self._quiet

    # -- L2's operations

    def l2_write(self, gpa: int, value: int) -> Fault | None:
        """L2 stores the 64-bit ``value`` at L2 GPA ``gpa`` (through EPT12 and EPT01); a store
        to a write-protected page traps and re-derives the shadow PTEs built from the entry it
        overwrote. Returns the EPT fault when either EPT refuses the store."""
        r = self.composed.translate_gpa(self._quiet, gpa, ept.EPT_WRITE)
        if isinstance(r, Fault):
            return r
        self.l2.write_u64(gpa, value)
        return None

    def _leaf(self, gva: int) -> tuple[int, int] | None:
        """(L2 GPA, value) of the leaf entry that maps ``gva`` in L2's table, or None."""
        table = self.l2_cr3
        for level in range(self.mode.levels, 0, -1):
            addr = (table & self.mode.addr_mask) + (((gva >> (12 + 9 * (level - 1))) & 0x1FF)
                                                    << 3)
            try:
                entry = self.l2.read_u64(addr)
            except UsageError:
                return None
            if not entry & EntryFlag.P:
                return None
            if level == 1 or (level <= 3 and entry & EntryFlag.PS):
                return addr, entry
            table = entry
        return None

    def map(self, gva: int, l2_gpa: int, flags: int = EntryFlag.P | EntryFlag.RW | EntryFlag.US,
            size: int = PAGE_4K) -> int:
        """L2 maps ``gva`` -> ``l2_gpa`` in its own table (creating tables from ``l2_tables``);
        returns the leaf's L2 GPA. Its stores trap like any other."""
        return self._guest.map(gva, l2_gpa, size, flags=flags)

    def unmap(self, gva: int) -> bool:
        """L2 clears the leaf that maps ``gva``; False when nothing mapped it."""
        found = self._leaf(gva)
        if found is None:
            return False
        return self.l2_write(found[0], 0) is None

    def protect(self, gva: int, flags: int) -> bool:
        """L2 sets the RW, US and XD bits of the leaf that maps ``gva`` to those of ``flags``
        (e.g. without RW: write-protect), and L1 shadows ``gva`` (a prefill) if it does not
        already. False when nothing mapped ``gva``."""
        found = self._leaf(gva)
        if found is None:
            return False
        addr, entry = found
        if self.l2_write(addr, (entry & ~_PROT) | (flags & _PROT)) is not None:
            return False
        key = self._key(gva)
        if key not in self._entries:
            self.counters.prefills += self._fill(key, _PREFILL_ACCESS)
        return True

    def invalidate(self, gva: int | None = None) -> int:
        """Drop the shadow PTE of ``gva`` (INVLPG), or all of them (a flush); returns how many
        were zapped."""
        keys = list(self._entries) if gva is None else [self._key(gva)]
        dropped = sum(self._drop(k) for k in keys)
        self.counters.zaps += dropped
        self.counters.invalidations += 1
        return dropped
