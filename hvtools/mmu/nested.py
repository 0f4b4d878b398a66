"""The two-dimensional walk: GVA -> GPA (guest paging) -> HPA (EPT or NPT).

PURE. :func:`walk` translates a guest linear address the way a processor with EPT (Intel SDM
Vol. 3C s29.3.1, "guest-physical addresses ... used by the guest's paging structures are
translated through EPT") or nested paging (AMD64 APM Vol. 2 s15.25.5 "Nested Table Walk") does:
every guest paging-structure access (the guest CR3's table and each entry below) is itself a
guest-physical address translated through the second stage before it is read, and then so is the
final GPA. It returns a :class:`NestedTranslation` or a :class:`NestedFault`, never raising for
anything memory holds.

Every memory reference is reported, in order, with its stage (``steps``; and, with what it
served and its encryption, ``references``): a 4-level guest on a 4-level second stage with 4-KByte
pages makes 5 second-stage walks of 4 entries plus 4 guest entries, 24 references; in general
``(g + 1) * h + g`` for g guest and h second-stage levels, fewer with large pages. Guest steps
carry the host-physical address the entry was read from; the reference carries its GPA.

Faults:

- a guest fault is a page fault (``stage=GUEST``, ``code`` the #PF error code of SDM Vol. 3A
  s4.7), exactly as :func:`hvtools.mmu.paging.walk` reports it; a non-canonical address is a #GP;
- a second-stage fault keeps the second stage's kind and code (``ept-violation`` with its exit
  qualification, ``ept-misconfig``, ``npf`` with EXITINFO1, ``unbacked``, ``vm-entry-failure``),
  with ``phase`` telling whether it hit a guest paging-structure access (EPT qualification bit 8
  = 0, EXITINFO1 bit 33) or the final translation (bit 8 = 1, EXITINFO1 bit 32).

Accessed/dirty flags with ``set_ad=True`` (SDM Vol. 3A s4.8, Vol. 3C s29.3; APM s15.25.5):
guest entries get A as the walk passes them and the guest leaf A (and D on a write) once the
whole access is allowed, i.e. after the final GPA translated (the order KVM's emulated walker
uses); each update of a guest entry is a write to guest-physical memory, so the second stage must
allow writing the entry (SDM s29.3.3.2: "writes ... to guest paging structures to update
accessed and dirty flags are considered to be data writes"); a refusal is a second-stage fault
on a guest paging-structure access. The second-stage walks set their own A/D flags (EPT: only with
EPTP bit 6); the extra translation that checks the update's write access is not a reference of its
own (a processor holds that translation already), but any flag it sets is recorded on the
second-stage step it belongs to. With ``set_ad=False`` no A/D flag is modelled (no update, and no
write check for one), as in :mod:`hvtools.mmu.paging`.

Encryption (see :mod:`hvtools.mmu.encryption`): ``policy`` says which address bits are keys (they
are not reserved and are stripped: an SEV guest's C-bit never reaches the nested walk), and how
every reference is encrypted. ``Translation.encryption`` is the data access's outcome; each
reference has its own, and ``data`` lists every stage's bit.

The guest loop itself (reserved bits, access rights, protection keys) is
:func:`hvtools.mmu.paging.walk_tables`, the one :func:`hvtools.mmu.paging.walk` runs; this module
supplies its table hooks (:class:`hvtools.mmu.paging.TableAccess`): each table address goes
through the second stage before it is read, each A/D update is a second-stage write, and the
policy's guest key bits are exempt from reserved checks and stripped from addresses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from hvtools.addr import Gpa, Gva
from hvtools.errors import UsageError
from hvtools.memory.protocol import PhysMemory, WritablePhysMemory
from hvtools.mmu import ept, npt, paging
from hvtools.mmu.encryption import (
    NOT_ENCRYPTED,
    Classification,
    EncryptionPolicy,
    NoEncryption,
    Reference,
    Role,
)
from hvtools.mmu.paging import SUPERVISOR_READ, Access, AccessKind, PagingMode
from hvtools.translation import Fault, Permissions, Stage, Translation, WalkStep

_MASK64 = (1 << 64) - 1


class Phase(StrEnum):
    """Which part of a nested walk a second-stage access served."""

    GUEST_TABLE = "guest-table"  # a guest paging-structure access (an entry read or A/D update)
    FINAL = "final"  # the translation of the final guest-physical address


@dataclass(frozen=True)
class StageRequest:
    """What the nested walk asks of the second stage: translate ``gpa`` for an access of
    ``kind`` made in ``phase`` while translating linear address ``gva``; for the final access,
    how guest paging maps that linear address (user-mode, writable, executable)."""

    gpa: int
    kind: AccessKind
    phase: Phase
    gva: int
    linear_user: bool | None = None
    linear_writable: bool | None = None
    linear_executable: bool | None = None


class SecondStage(Protocol):
    """A second-stage translation (EPT, NPT, or TDX's pair of EPTs)."""

    @property
    def stage(self) -> Stage: ...

    def root(self, gpa: int) -> int:
        """The raw pointer (EPTP, nCR3) to the root table that translates ``gpa``."""
        ...

    def translate(self, memory: PhysMemory, request: StageRequest, *, set_ad: bool,
                  key_bits: int) -> Translation | Fault: ...


@dataclass(frozen=True)
class EptStage:
    """Intel EPT as the second stage (:func:`hvtools.mmu.ept.walk`)."""

    eptp: int
    controls: ept.EptControls

    @property
    def stage(self) -> Stage:
        return Stage.EPT

    def root(self, gpa: int) -> int:
        return self.eptp

    def translate(self, memory: PhysMemory, request: StageRequest, *, set_ad: bool,
                  key_bits: int) -> Translation | Fault:
        final = request.phase is Phase.FINAL
        access = ept.EptAccess(
            kind=request.kind, guest_paging=not final, gva=request.gva,
            linear_user=request.linear_user if final else None,
            linear_writable=request.linear_writable if final else None,
            linear_executable=request.linear_executable if final else None)
        return ept.walk(memory, self.eptp, request.gpa, access, controls=self.controls,
                        set_ad=set_ad, key_bits=key_bits)


@dataclass(frozen=True)
class NptStage:
    """AMD nested paging as the second stage (:func:`hvtools.mmu.npt.walk`); ``host`` is the
    host's paging state at VMRUN."""

    ncr3: int
    host: PagingMode
    guest_table_writes: bool = True

    @property
    def stage(self) -> Stage:
        return Stage.NPT

    def root(self, gpa: int) -> int:
        return self.ncr3

    def translate(self, memory: PhysMemory, request: StageRequest, *, set_ad: bool,
                  key_bits: int) -> Translation | Fault:
        access = npt.NptAccess(request.kind, guest_table=request.phase is Phase.GUEST_TABLE)
        return npt.walk(memory, self.ncr3, self.host, request.gpa, access, set_ad=set_ad,
                        key_bits=key_bits, guest_table_writes=self.guest_table_writes)


@dataclass(frozen=True)
class TdxStage:
    """A TD's second stage: the Secure EPT for private GPAs (shared bit 0) and the shared EPT
    (the VMM's) for shared ones; the shared bit is GPA bit ``gpaw - 1`` (Intel TDX module
    specification, "Secure EPT" and "Shared EPT")."""

    secure: EptStage
    shared: EptStage
    gpaw: int = 48

    def __post_init__(self) -> None:
        if self.gpaw not in (48, 52):
            raise UsageError(f"TDX GPAW {self.gpaw} is not 48 or 52")

    @property
    def stage(self) -> Stage:
        return Stage.EPT

    def pick(self, gpa: int) -> EptStage:
        return self.shared if gpa >> (self.gpaw - 1) & 1 else self.secure

    def root(self, gpa: int) -> int:
        return self.pick(gpa).eptp

    def translate(self, memory: PhysMemory, request: StageRequest, *, set_ad: bool,
                  key_bits: int) -> Translation | Fault:
        return self.pick(request.gpa).translate(memory, request, set_ad=set_ad,
                                                key_bits=key_bits)


@dataclass(frozen=True)
class MemoryReference:
    """One memory reference of a nested walk: the step (stage, entry, host-physical address),
    what it served, the guest-physical address it was for, and how it was encrypted."""

    step: WalkStep
    role: Role
    gpa: int
    classification: Classification

    @property
    def stage(self) -> Stage:
        return self.step.stage


@dataclass(frozen=True)
class NestedTranslation(Translation):
    """A nested walk that succeeded: ``output`` is the HPA, ``gpa`` the intermediate GPA.

    ``page_size`` is the smaller of the guest page and the second-stage page (what one TLB
    entry could cover); ``permissions`` combine both stages (write needs both, execute needs the
    guest's and the second stage's for this linear address's mode). ``encryption`` is the data
    access's; ``data`` lists every stage's bit for it.
    """

    gpa: int = 0
    guest_page_size: int = 0
    host_page_size: int = 0
    references: tuple[MemoryReference, ...] = ()
    data: Classification = NOT_ENCRYPTED


@dataclass(frozen=True)
class NestedFault(Fault):
    """A nested walk that faulted. ``phase`` is set for second-stage faults (None for guest
    faults and #GP); ``address`` is the GVA for a guest fault and the GPA for a second-stage
    one (the host-physical entry address for ``unbacked``)."""

    phase: Phase | None = None
    references: tuple[MemoryReference, ...] = ()


def reference_count(guest_levels: int, host_levels: int) -> int:
    """References of a walk with 4-KByte pages at both stages: ``(g + 1) * h + g``."""
    return (guest_levels + 1) * host_levels + guest_levels


class _Walk(paging.TableAccess):
    """One nested walk: the guest loop's table hooks (:class:`paging.TableAccess`) send every
    guest paging-structure access through the second stage and record it as a reference."""

    def __init__(self, memory: PhysMemory, second: SecondStage, gva: int, mode: PagingMode,
                 access: Access, writer: WritablePhysMemory | None,
                 policy: EncryptionPolicy) -> None:
        super().__init__(memory, writer, policy.guest_key_bits)
        self.second = second
        self.gva = gva
        self.mode = mode
        self.access = access
        self.lookup = access.kind is AccessKind.LOOKUP
        self.set_ad = writer is not None
        self.policy = policy
        self.refs: list[MemoryReference] = []
        # the entry last read: its second-stage references refs[first:last], its own at
        # refs[last] once recorded, and the reference that classifies it
        self._read: tuple[int, int, Reference] | None = None

    def fault(self, base: Fault, phase: Phase | None) -> NestedFault:
        return NestedFault(input=self.gva, kind=base.kind, reason=base.reason, code=base.code,
                           level=base.level, stage=base.stage, address=base.address,
                           steps=self.steps(), phase=phase, references=tuple(self.refs))

    def guest_fault(self, reason: str, level: int, *,
                    code_reason: str | None = None) -> NestedFault:
        code = 0 if self.lookup else paging.error_code(code_reason or reason, self.mode,
                                                       self.access)
        return self.fault(Fault(input=self.gva, kind="page-fault", reason=reason, code=code,
                                level=level, stage=Stage.GUEST, address=self.gva), None)

    def through_second(self, gpa: int, kind: AccessKind, phase: Phase, *,
                       linear: tuple[bool, bool, bool] | None = None
                       ) -> Translation | NestedFault:
        """Translate ``gpa``, recording each second-stage entry read as a reference."""
        user, writable, executable = linear if linear is not None else (None, None, None)
        request = StageRequest(gpa, kind, phase, self.gva, user, writable, executable)
        r = self.second.translate(self.memory, request, set_ad=self.set_ad,
                                  key_bits=self.policy.host_key_bits)
        pointer = self.second.root(gpa)
        for st in r.steps:
            ref = Reference(Role.SECOND_TABLE, self.second.stage, gpa, pointer)
            self.refs.append(MemoryReference(st, Role.SECOND_TABLE, gpa,
                                             self.policy.classify(ref)))
            pointer = st.entry
        if isinstance(r, Fault):
            return self.fault(r, phase)
        return r

    def read_table(self, level: int, gpa: int, pointer: int) -> int | Fault:
        """The guest entry at ``gpa``: refused by the encryption policy, or translated."""
        if not self.lookup:
            refusal = self.policy.guest_refusal(
                Reference(Role.GUEST_TABLE, self.second.stage, gpa, 0, pointer))
            if refusal is not None:
                return self.guest_fault(refusal, level, code_reason="reserved-bit")
        first = len(self.refs)
        kind = AccessKind.LOOKUP if self.lookup else AccessKind.READ
        t = self.through_second(gpa, kind, Phase.GUEST_TABLE)
        if isinstance(t, NestedFault):
            return t
        self._read = (first, len(self.refs),
                      Reference(Role.GUEST_TABLE, self.second.stage, gpa, t.steps[-1].entry,
                                pointer))
        return t.output

    def record(self, step: WalkStep) -> None:
        assert self._read is not None
        ref = self._read[2]
        self.refs.append(MemoryReference(step, Role.GUEST_TABLE, ref.gpa,
                                         self.policy.classify(ref)))

    def write_entry(self, gpa: int, new: int) -> NestedFault | None:
        """Update the last-read guest entry's A/D flags: a data write to ``gpa`` that the second
        stage must allow (its A/D effects land on the references that translated the read)."""
        assert self._read is not None
        first, last, _ = self._read
        request = StageRequest(gpa, AccessKind.WRITE, Phase.GUEST_TABLE, self.gva)
        r = self.second.translate(self.memory, request, set_ad=self.set_ad,
                                  key_bits=self.policy.host_key_bits)
        if isinstance(r, Fault):
            return self.fault(r, Phase.GUEST_TABLE)
        for st in r.steps:
            if st.write_back is None:
                continue
            for i in range(first, last):
                if self.refs[i].step.address == st.address:
                    self.refs[i] = replace(self.refs[i],
                                           step=replace(self.refs[i].step,
                                                        write_back=st.write_back))
        assert self.writer is not None
        self.writer.write_u64(self.refs[last].step.address, new)
        self.refs[last] = replace(self.refs[last],
                                  step=replace(self.refs[last].step, write_back=new))
        return None

    def steps(self) -> tuple[WalkStep, ...]:
        return tuple(r.step for r in self.refs)


def walk(memory: PhysMemory, cr3: int, mode: PagingMode, gva: Gva,
         access: Access = SUPERVISOR_READ, *, second: SecondStage, set_ad: bool = False,
         policy: EncryptionPolicy | None = None) -> NestedTranslation | NestedFault:
    """Translate ``gva`` through the guest's tables at ``cr3`` and the ``second`` stage.

    ``memory`` is host-physical memory (it holds the guest's tables and the second stage's);
    ``mode`` is the guest's paging state. See the module docstring for the references, the
    faults, A/D flags and encryption.
    """
    if not 0 <= gva <= _MASK64:
        raise UsageError(f"linear address {gva:#x} is not a 64-bit value")
    pol = policy if policy is not None else NoEncryption()
    w = _Walk(memory, second, gva, mode, access, paging.writer_for(memory, set_ad, access), pol)
    leaf = paging.walk_tables(w, cr3, mode, gva, access)
    if isinstance(leaf, Fault):
        return leaf if isinstance(leaf, NestedFault) else w.fault(leaf, None)
    entry, guest_perms, gpa = leaf.entry, leaf.permissions, leaf.output
    us, rw, x = guest_perms.user, guest_perms.write, guest_perms.execute
    size = paging.PAGE_SIZES[leaf.level]
    fetch = access.kind is AccessKind.FETCH
    if not w.lookup:
        refusal = pol.guest_refusal(Reference(Role.DATA, second.stage, gpa, 0, entry, fetch))
        if refusal is not None:
            return w.guest_fault(refusal, leaf.level, code_reason="reserved-bit")
    final = w.through_second(gpa, access.kind, Phase.FINAL, linear=(us, rw, x))
    if isinstance(final, NestedFault):
        return final
    new = paging.leaf_update(entry, access)
    if w.set_ad and new != entry:
        stop = w.write_entry(leaf.address, new)
        if stop is not None:
            return stop
    data = pol.classify(Reference(Role.DATA, second.stage, gpa, final.steps[-1].entry, entry,
                                  fetch))
    s = final.permissions
    second_x = s.execute_user if (s.execute_user is not None and us) else s.execute
    perms = Permissions(read=s.read, write=rw and s.write, execute=x and second_x,
                        user=us, protection_key=guest_perms.protection_key)
    return NestedTranslation(
        input=gva, output=final.output, page_size=min(size, final.page_size),
        permissions=perms, steps=w.steps(), encryption=data.encryption,
        gpa=Gpa(gpa), guest_page_size=size, host_page_size=final.page_size,
        references=tuple(w.refs), data=data)
