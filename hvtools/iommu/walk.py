"""Translate one DMA request through VT-d structures in memory (VT-d 4.x ch. 3, 7 and 9).

:func:`translate` takes a :class:`DmaRequest`, the physical memory holding the structures, the
RTADDR_REG value (its TTM field picks legacy or scalable mode) and the unit's CAP/ECAP, and
returns a :class:`~hvtools.translation.Translation` or a :class:`~hvtools.translation.Fault`
whose ``code`` is the VT-d fault reason (s7.1.3, table "Fault Conditions and Remapping
Hardware Behavior for Various Requests"). It never raises for anything found in memory or in
the registers.

Modelled: untranslated requests, legacy mode (s3.4.2: root -> context -> second stage, TT
pass-through) and scalable mode (s3.4.3: SM root -> SM context -> PASID directory -> PASID
table -> PGTT first-stage s3.6, second-stage s3.7, nested s3.8, pass-through s3.9), access
rights, reserved bits tied to the host address width, A/D/EA updates (optional write-back)
and the interrupt-range check (s3.15). Not modelled: ATS translation/translated requests, page
requests, caches (IOTLB, PASID cache), memory types, snoop attributes other than the
page-walk-snoop rule for A/D updates, interrupt requests themselves (a write *to* FEEx_xxxxh
is an interrupt, not DMA).

Choices where the specification leaves room, or where rev. 5.x differs from 4.x, are listed
in :data:`MODEL_NOTES`; where QEMU 10.0.2 reports something else, see :func:`qemu_reason`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum, StrEnum

from hvtools.addr import PAGE_4K, Iova
from hvtools.errors import HvError, UsageError
from hvtools.iommu.regs import IommuCaps
from hvtools.iommu.structures import (
    FS_FORMATS,
    SS_FORMATS,
    ContextEntry,
    FaultRecord,
    PasidDirEntry,
    PasidTableEntry,
    Pgtt,
    RootEntry,
    RtaddrReg,
    ScalableContextEntry,
    ScalableRootEntry,
    TranslationType,
    Ttm,
    VtdStruct,
    address_width_levels,
    agaw_bits,
)
from hvtools.memory.protocol import PhysMemory, WritablePhysMemory
from hvtools.translation import Fault, Outcome, Permissions, Stage, Translation, WalkStep

MASK64 = (1 << 64) - 1
#: The interrupt address range FEE0_0000h - FEEF_FFFFh (s3.15).
INTERRUPT_RANGE = range(0xFEE0_0000, 0xFEF0_0000)


class FaultReason(IntEnum):
    """VT-d non-recoverable DMA-remapping fault reasons (s7.1.3; condition codes in comments).

    Sources: the fault-conditions table of the VT-d specification (rev. 5.10 text, whose
    0x1-0x91 codes carry over from 4.x), cross-checked against Linux's
    ``dma_remap_sm_fault_reasons`` (drivers/iommu/intel/dmar.c, written from rev. 3.x) and
    QEMU 10.0.2's ``VTDFaultReason`` (hw/i386/intel_iommu_internal.h).
    """

    ROOT_NOT_PRESENT = 0x01  # LRT.2
    CONTEXT_NOT_PRESENT = 0x02  # LCT.2
    CONTEXT_INVALID = 0x03  # LCT.4.x
    ADDRESS_BEYOND_AW = 0x04  # LGN.1.x
    WRITE_DENIED = 0x05  # LGN.2
    READ_DENIED = 0x06  # LGN.3
    SS_ENTRY_ACCESS = 0x07  # LSS.1
    ROOT_TABLE_ACCESS = 0x08  # LRT.1
    CONTEXT_TABLE_ACCESS = 0x09  # LCT.1
    ROOT_RESERVED = 0x0A  # LRT.3
    CONTEXT_RESERVED = 0x0B  # LCT.3
    SS_RESERVED = 0x0C  # LSS.2
    TT_BLOCKED = 0x0D  # LCT.5
    INTERRUPT_ADDRESS = 0x0E  # LGN.4
    SM_RTADDR_INVALID = 0x30  # RTA.1
    SM_LEGACY_WITH_PASID = 0x31  # RTA.2
    SM_LEGACY_PAGE_REQUEST = 0x32  # RTA.3
    SM_ABORT_DMA = 0x33  # RTA.4
    SM_ROOT_ACCESS = 0x38  # SRT.1
    SM_ROOT_NOT_PRESENT = 0x39  # SRT.2
    SM_ROOT_RESERVED = 0x3A  # SRT.3
    SM_CONTEXT_ACCESS = 0x40  # SCT.1
    SM_CONTEXT_NOT_PRESENT = 0x41  # SCT.2
    SM_CONTEXT_RESERVED = 0x42  # SCT.3
    SM_CONTEXT_INVALID = 0x43  # SCT.4.x
    SM_DTE_CLEAR = 0x44  # SCT.5
    SM_PASIDE_CLEAR = 0x45  # SCT.6
    SM_PASID_BEYOND_PDTS = 0x46  # SCT.7
    SM_PRE_CLEAR = 0x47  # SCT.8
    SM_PASID_IS_RID_PASID = 0x48  # SCT.9
    SM_PASID_DIR_ACCESS = 0x50  # SPD.1
    SM_PASID_DIR_NOT_PRESENT = 0x51  # SPD.2
    SM_PASID_DIR_RESERVED = 0x52  # SPD.3
    SM_PASID_ENTRY_ACCESS = 0x58  # SPT.1
    SM_PASID_ENTRY_NOT_PRESENT = 0x59  # SPT.2
    SM_PASID_ENTRY_RESERVED = 0x5A  # SPT.3
    SM_PASID_ENTRY_INVALID = 0x5B  # SPT.4.x (bad PGTT, AW, FSPM, nested FSPTPTR)
    SM_ERE_CLEAR = 0x5C  # SPT.5
    SM_SRE_CLEAR = 0x5D  # SPT.6
    SM_FS_ENTRY_ACCESS = 0x70  # SFS.1
    SM_FS_NOT_PRESENT = 0x71  # SFS.2
    SM_FS_RESERVED = 0x72  # SFS.3
    SM_FSPTPTR_ACCESS = 0x73  # SFS.4
    SM_FS_BEYOND_AW = 0x74  # SFS.5 (nested)
    SM_FSPTPTR_READ_DENIED = 0x75  # SFS.6 (nested)
    SM_FS_READ_DENIED = 0x76  # SFS.7 (nested)
    SM_FS_AD_WRITE_DENIED = 0x77  # SFS.8 (nested)
    SM_SS_ENTRY_ACCESS = 0x78  # SSS.1
    SM_SS_NOT_PRESENT = 0x79  # SSS.2 (R=W=0, or no cumulative permission at all)
    SM_SS_RESERVED = 0x7A  # SSS.3
    SM_SSPTPTR_ACCESS = 0x7B  # SSS.4
    SM_SS_AD_NO_SNOOP = 0x7C  # SSS.5
    SM_SS_AD_FAILED = 0x7D  # SSS.6
    SM_NON_CANONICAL = 0x80  # SGN.1
    SM_PRIVILEGE = 0x81  # SGN.2 (U/S=0 for a user request)
    SM_EXECUTE_DENIED = 0x82  # SGN.3 (3.x/4.x; dropped in 5.x)
    SM_ADDRESS_BEYOND_HAW = 0x83  # SGN.4.x
    SM_ADDRESS_BEYOND_AW = 0x84  # SGN.5
    SM_WRITE_DENIED = 0x85  # SGN.6
    SM_READ_DENIED = 0x86  # SGN.7
    SM_INTERRUPT_ADDRESS = 0x87  # SGN.8.x
    SM_PASID_BEYOND_PSS = 0x89  # SGN.10
    SM_FS_AD_NO_SNOOP = 0x90  # SFS.9
    SM_FS_AD_FAILED = 0x91  # SFS.10


@dataclass(frozen=True)
class ReasonInfo:
    """The specification's condition code, a short description, and whether it is *qualified*
    (qualified faults are not recorded when an FPD bit on the path is Set, s7.1.1)."""

    condition: str
    text: str
    qualified: bool


_R = FaultReason
REASONS: Mapping[FaultReason, ReasonInfo] = {
    _R.ROOT_NOT_PRESENT: ReasonInfo("LRT.2", "root entry not present", False),
    _R.CONTEXT_NOT_PRESENT: ReasonInfo("LCT.2", "context entry not present", True),
    _R.CONTEXT_INVALID: ReasonInfo("LCT.4", "invalid context entry", True),
    _R.ADDRESS_BEYOND_AW: ReasonInfo("LGN.1", "address beyond the address width", True),
    _R.WRITE_DENIED: ReasonInfo("LGN.2", "no write permission", True),
    _R.READ_DENIED: ReasonInfo("LGN.3", "no read permission", True),
    _R.SS_ENTRY_ACCESS: ReasonInfo("LSS.1", "error reading a second-stage entry", True),
    _R.ROOT_TABLE_ACCESS: ReasonInfo("LRT.1", "error reading the root entry", False),
    _R.CONTEXT_TABLE_ACCESS: ReasonInfo("LCT.1", "error reading the context entry", False),
    _R.ROOT_RESERVED: ReasonInfo("LRT.3", "reserved bit set in the root entry", False),
    _R.CONTEXT_RESERVED: ReasonInfo("LCT.3", "reserved bit set in the context entry", True),
    _R.SS_RESERVED: ReasonInfo("LSS.2", "reserved bit set in a second-stage entry", True),
    _R.TT_BLOCKED: ReasonInfo("LCT.5", "translation type blocks the request", True),
    _R.INTERRUPT_ADDRESS: ReasonInfo("LGN.4", "output address in the interrupt range", True),
    _R.SM_RTADDR_INVALID: ReasonInfo("RTA.1", "SM: invalid RTADDR_REG programming", False),
    _R.SM_LEGACY_WITH_PASID: ReasonInfo("RTA.2", "SM: legacy mode (TTM=00b) request with "
                                        "PASID", False),
    _R.SM_LEGACY_PAGE_REQUEST: ReasonInfo("RTA.3", "SM: page request in legacy mode", False),
    _R.SM_ABORT_DMA: ReasonInfo("RTA.4", "SM: abort-DMA mode (TTM=11b)", False),
    _R.SM_ROOT_ACCESS: ReasonInfo("SRT.1", "SM: error reading the root entry", False),
    _R.SM_ROOT_NOT_PRESENT: ReasonInfo("SRT.2", "SM: root entry (LP/UP) not present", False),
    _R.SM_ROOT_RESERVED: ReasonInfo("SRT.3", "SM: reserved bit set in the root entry", False),
    _R.SM_CONTEXT_ACCESS: ReasonInfo("SCT.1", "SM: error reading the context entry", False),
    _R.SM_CONTEXT_NOT_PRESENT: ReasonInfo("SCT.2", "SM: context entry not present", True),
    _R.SM_CONTEXT_RESERVED: ReasonInfo("SCT.3", "SM: reserved bit set in the context entry",
                                       True),
    _R.SM_CONTEXT_INVALID: ReasonInfo("SCT.4", "SM: invalid context entry", True),
    _R.SM_DTE_CLEAR: ReasonInfo("SCT.5", "SM: DTE clear for a translation request", True),
    _R.SM_PASIDE_CLEAR: ReasonInfo("SCT.6", "SM: PASIDE clear for a request with PASID", True),
    _R.SM_PASID_BEYOND_PDTS: ReasonInfo("SCT.7", "SM: PASID beyond the PASID directory size",
                                        True),
    _R.SM_PRE_CLEAR: ReasonInfo("SCT.8", "SM: PRE clear for a page request", True),
    _R.SM_PASID_IS_RID_PASID: ReasonInfo("SCT.9", "SM: request PASID equals RID_PASID", True),
    _R.SM_PASID_DIR_ACCESS: ReasonInfo("SPD.1", "SM: error reading the PASID directory entry",
                                       False),
    _R.SM_PASID_DIR_NOT_PRESENT: ReasonInfo("SPD.2", "SM: PASID directory entry not present",
                                            True),
    _R.SM_PASID_DIR_RESERVED: ReasonInfo("SPD.3", "SM: reserved bit set in the PASID "
                                         "directory entry", True),
    _R.SM_PASID_ENTRY_ACCESS: ReasonInfo("SPT.1", "SM: error reading the PASID table entry",
                                         False),
    _R.SM_PASID_ENTRY_NOT_PRESENT: ReasonInfo("SPT.2", "SM: PASID table entry not present",
                                              True),
    _R.SM_PASID_ENTRY_RESERVED: ReasonInfo("SPT.3", "SM: reserved bit set in the PASID table "
                                           "entry", True),
    _R.SM_PASID_ENTRY_INVALID: ReasonInfo("SPT.4", "SM: invalid PASID table entry", True),
    _R.SM_ERE_CLEAR: ReasonInfo("SPT.5", "SM: execute request with ERE (or ECAP.ERS) clear",
                                True),
    _R.SM_SRE_CLEAR: ReasonInfo("SPT.6", "SM: supervisor request with SRE clear", True),
    _R.SM_FS_ENTRY_ACCESS: ReasonInfo("SFS.1", "SM: error reading a first-stage entry", True),
    _R.SM_FS_NOT_PRESENT: ReasonInfo("SFS.2", "SM: first-stage entry not present", True),
    _R.SM_FS_RESERVED: ReasonInfo("SFS.3", "SM: reserved bit set in a first-stage entry",
                                  True),
    _R.SM_FSPTPTR_ACCESS: ReasonInfo("SFS.4", "SM: error reading the first-stage root entry",
                                     True),
    _R.SM_FS_BEYOND_AW: ReasonInfo("SFS.5", "SM: first-stage address beyond the nested "
                                   "address width", True),
    _R.SM_FSPTPTR_READ_DENIED: ReasonInfo("SFS.6", "SM: nested second stage denies reading "
                                          "the first-stage root table", True),
    _R.SM_FS_READ_DENIED: ReasonInfo("SFS.7", "SM: nested second stage denies reading a "
                                     "first-stage entry", True),
    _R.SM_FS_AD_WRITE_DENIED: ReasonInfo("SFS.8", "SM: nested second stage denies the "
                                         "first-stage A/D update", True),
    _R.SM_SS_ENTRY_ACCESS: ReasonInfo("SSS.1", "SM: error reading a second-stage entry", True),
    _R.SM_SS_NOT_PRESENT: ReasonInfo("SSS.2", "SM: second-stage entry not present (R=W=0)",
                                     True),
    _R.SM_SS_RESERVED: ReasonInfo("SSS.3", "SM: reserved bit set in a second-stage entry",
                                  True),
    _R.SM_SSPTPTR_ACCESS: ReasonInfo("SSS.4", "SM: error reading the second-stage root entry",
                                     True),
    _R.SM_SS_AD_NO_SNOOP: ReasonInfo("SSS.5", "SM: second-stage A/D update without page-walk "
                                     "snoop", True),
    _R.SM_SS_AD_FAILED: ReasonInfo("SSS.6", "SM: second-stage A/D update failed", True),
    _R.SM_NON_CANONICAL: ReasonInfo("SGN.1", "SM: first-stage input address not canonical",
                                    True),
    _R.SM_PRIVILEGE: ReasonInfo("SGN.2", "SM: user request to a supervisor page", True),
    _R.SM_EXECUTE_DENIED: ReasonInfo("SGN.3", "SM: no execute permission", True),
    _R.SM_ADDRESS_BEYOND_HAW: ReasonInfo("SGN.4", "SM: address beyond the host address width",
                                         True),
    _R.SM_ADDRESS_BEYOND_AW: ReasonInfo("SGN.5", "SM: address beyond the second-stage address "
                                        "width", True),
    _R.SM_WRITE_DENIED: ReasonInfo("SGN.6", "SM: no write permission", True),
    _R.SM_READ_DENIED: ReasonInfo("SGN.7", "SM: no read permission", True),
    _R.SM_INTERRUPT_ADDRESS: ReasonInfo("SGN.8", "SM: output address in the interrupt range",
                                        True),
    _R.SM_PASID_BEYOND_PSS: ReasonInfo("SGN.10", "SM: PASID beyond ECAP.PSS", True),
    _R.SM_FS_AD_NO_SNOOP: ReasonInfo("SFS.9", "SM: first-stage A/D update without page-walk "
                                     "snoop", True),
    _R.SM_FS_AD_FAILED: ReasonInfo("SFS.10", "SM: first-stage A/D update failed", True),
}

#: Decisions the model makes where the specification leaves room or revisions differ.
MODEL_NOTES = (
    "Fault priority follows the table walk: a fault found while reading a structure wins over "
    "access-rights faults, which are decided on the cumulative rights of the whole walk "
    "(as IA-32e paging and EPT do).",
    "Second-stage R=W=0 ends the walk: legacy reports it as lack of the requested permission "
    "(0x5 write / 0x6 read, LGN.2/3), scalable mode as SSS.2 (0x79).",
    "Reserved bits: undeclared bits of each format, address bits 51:HAW (HAW defaults to "
    "CAP.MGAW+1, as QEMU), PS where the page size is unsupported (CAP.SSLPS / CAP.FS1GP) and "
    "SS SNP without ECAP.SC. Fields the spec calls 'Reserved(0) without capability X' are "
    "otherwise not checked.",
    "RID_PASID is used only with ECAP.RPS (else PASID 0) and RID_PRIV only with ECAP.RPRIVS; "
    "SCT.9 (request PASID equals RID_PASID) is checked only with ECAP.RPS.",
    "First-stage XD is honoured when the PASID entry's NXE=1 and ignored otherwise; SMEP "
    "blocks supervisor execute of user pages. Execute through the second stage needs X when "
    "SSEE=1 and follows read otherwise.",
    "A/D (and EA with EAFE) updates happen only for translations that succeed; when one is "
    "needed and ECAP.SMPWCS=0 or PWSNP=0 the walk faults (SFS.9 0x90 / SSS.5 0x7C). "
    "WalkOptions.set_ad writes the new values back.",
    "The interrupt-range check (LGN.4 / SGN.8) tests the exact output address.",
    "Requests without PASID cannot be execute requests; their privilege comes from RID_PRIV.",
    "Nested: second-stage A bits are set for the walks that read first-stage tables; the "
    "second-stage D bit of a first-stage table page is not set by first-stage A/D writes.",
)


class Access(StrEnum):
    """What a DMA request asks for (an execute request is a read with ER=1)."""

    READ = "read"
    WRITE = "write"
    EXECUTE = "execute"


_BDF = re.compile(r"^(?:[0-9a-fA-F]{1,4}:)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


def source_id(bus: int, dev: int, fn: int) -> int:
    """The 16-bit requester ID of bus:dev.fn (s3.4.1)."""
    if not (0 <= bus < 256 and 0 <= dev < 32 and 0 <= fn < 8):
        raise UsageError(f"bad PCI address {bus}:{dev}.{fn}")
    return bus << 8 | dev << 3 | fn


def parse_source_id(text: str) -> int:
    """``"BB:DD.F"`` (optionally with a ``DDDD:`` segment) to a 16-bit source ID."""
    m = _BDF.match(text.strip())
    if not m:
        raise UsageError(f"not a PCI address (BB:DD.F): {text!r}")
    return source_id(int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16))


def format_source_id(sid: int) -> str:
    """A 16-bit source ID as ``BB:DD.F``."""
    return f"{sid >> 8:02x}:{sid >> 3 & 0x1F:02x}.{sid & 7}"


@dataclass(frozen=True)
class DmaRequest:
    """An untranslated DMA request as the remapping hardware sees it (s3.1, s3.4.1).

    ``source_id`` is a 16-bit requester ID or a ``(bus, dev, fn)`` tuple. ``pasid=None`` is a
    request without PASID (scalable mode then uses the context entry's RID_PASID).
    ``privileged`` (PR) and :attr:`Access.EXECUTE` (ER) exist only on requests with PASID.
    """

    source_id: int | tuple[int, int, int]
    address: Iova
    access: Access = Access.READ
    pasid: int | None = None
    privileged: bool = False

    def __post_init__(self) -> None:
        sid = self.source_id
        if isinstance(sid, tuple):
            object.__setattr__(self, "source_id", source_id(*sid))
        elif not 0 <= sid <= 0xFFFF:
            raise UsageError(f"source id {sid:#x} is not 16 bits")
        if not 0 <= self.address <= MASK64:
            raise UsageError(f"address {self.address:#x} is not 64 bits")
        if self.pasid is not None and not 0 <= self.pasid < (1 << 20):
            raise UsageError(f"PASID {self.pasid:#x} is not 20 bits")
        if self.pasid is None and (self.privileged or self.access is Access.EXECUTE):
            raise UsageError("privileged and execute requests need a PASID "
                             "(requests without PASID take RID_PRIV and never execute)")

    @property
    def sid(self) -> int:
        """The 16-bit requester ID."""
        sid = self.source_id
        return sid if isinstance(sid, int) else source_id(*sid)

    @property
    def bus(self) -> int:
        return self.sid >> 8

    @property
    def devfn(self) -> int:
        return self.sid & 0xFF

    @property
    def write(self) -> bool:
        return self.access is Access.WRITE


@dataclass(frozen=True)
class WalkOptions:
    """Knobs of the model that no register expresses.

    ``haw``: host address width in bits (default CAP.MGAW+1, what QEMU uses for its reserved
    checks). ``set_ad``: write A/D/EA updates back into memory (needs a
    :class:`~hvtools.memory.protocol.WritablePhysMemory`), as the hardware does.
    """

    haw: int | None = None
    set_ad: bool = False


class _Abort(Exception):
    """Internal: unwinds a walk to :func:`translate` carrying the fault."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.reason)
        self.fault = fault


@dataclass
class _Entry:
    """A paging entry a walk used, kept for the A/D update."""

    step: int  # index into the walk's steps
    address: int  # where it was read (HPA)
    value: int
    level: int
    ss_writable: bool = True  # nested: may the second stage write the entry's page?


@dataclass
class _PageWalk:
    """What a first- or second-stage walk found (before access rights are applied)."""

    output: int
    page_size: int
    r: bool = True  # SS: AND of R; FS: always True
    w: bool = True  # SS: AND of W; FS: AND of R/W
    x: bool = True  # SS: AND of X; FS: no XD on the path (when NXE=1)
    us: bool = True  # FS: AND of U/S
    entries: list[_Entry] = field(default_factory=list)


@dataclass(frozen=True)
class _AdUpdate:
    entry: _Entry
    new: int
    snoop_ok: bool
    no_snoop: FaultReason
    failed: FaultReason
    stage: Stage


def _bits(lo: int, hi: int) -> int:
    """Mask of bits lo..hi inclusive (empty when hi < lo)."""
    return 0 if hi < lo else ((1 << (hi - lo + 1)) - 1) << lo


class _Walk:
    def __init__(self, req: DmaRequest, memory: PhysMemory, caps: IommuCaps,
                 options: WalkOptions) -> None:
        self.req = req
        self.memory = memory
        self.caps = caps
        self.options = options
        self.mgaw = caps.get("MGAW") + 1
        haw = options.haw if options.haw is not None else self.mgaw
        self.haw = max(12, min(haw, 64))
        self.steps: list[WalkStep] = []
        self.addr: int = req.address
        self.ad: list[_AdUpdate] = []

    # -- plumbing ---------------------------------------------------------------------------

    def cap(self, name: str) -> bool:
        return bool(self.caps.get(name))

    def fault(self, reason: FaultReason, stage: Stage, level: int = 0,
              address: int | None = None) -> _Abort:
        info = REASONS[reason]
        return _Abort(Fault(
            input=self.req.address, kind="vtd", reason=f"{info.text} ({info.condition})",
            code=int(reason), level=level, stage=stage,
            address=self.req.address if address is None else address,
            steps=tuple(self.steps)))

    def read(self, addr: int, struct: type[VtdStruct]) -> int | None:
        """The entry at ``addr``, or None when memory cannot supply it."""
        size = struct.size()
        if not 0 <= addr <= MASK64 + 1 - size:
            return None
        try:
            data = self.memory.read(addr, size)
        except HvError:
            return None
        if len(data) != size:
            return None
        return int.from_bytes(data, "little")

    def step(self, stage: Stage, level: int, struct: type[VtdStruct], addr: int,
             value: int) -> int:
        self.steps.append(WalkStep(stage, level, struct.NAME, addr, value))
        return len(self.steps) - 1

    def above_haw(self, lo_bit: int, hi_bit: int) -> int:
        """Bits of an address field (address bit 12 stored at ``lo_bit``) that lie at or above
        HAW, up to ``hi_bit``."""
        return _bits(lo_bit + self.haw - 12, hi_bit)

    def interrupt_check(self, output: int, reason: FaultReason, stage: Stage,
                        level: int) -> None:
        if output in INTERRUPT_RANGE:
            raise self.fault(reason, stage, level, output)

    # -- entry point ------------------------------------------------------------------------

    def run(self, rtaddr: int) -> Translation:
        ttm = RtaddrReg.get(rtaddr, "TTM")
        rta = (RtaddrReg.get(rtaddr, "RTA") << 12) & _bits(0, self.haw - 1)
        if ttm == Ttm.LEGACY:
            if self.req.pasid is not None:
                raise self.fault(FaultReason.SM_LEGACY_WITH_PASID, Stage.VTD_ROOT)
            return self.legacy(rta)
        if ttm == Ttm.SCALABLE and self.cap("SMTS"):
            return self.scalable(rta)
        if ttm == Ttm.ABORT_DMA and self.cap("ADMS"):
            raise self.fault(FaultReason.SM_ABORT_DMA, Stage.VTD_ROOT)
        raise self.fault(FaultReason.SM_RTADDR_INVALID, Stage.VTD_ROOT)

    # -- legacy mode (s3.4.2) ---------------------------------------------------------------

    def legacy(self, rta: int) -> Translation:
        req, root = self.req, Stage.VTD_ROOT
        re_addr = rta + req.bus * RootEntry.size()
        re = self.read(re_addr, RootEntry)
        if re is None:
            raise self.fault(FaultReason.ROOT_TABLE_ACCESS, root, address=re_addr)
        self.step(root, 0, RootEntry, re_addr, re)
        if not RootEntry.get(re, "P"):
            raise self.fault(FaultReason.ROOT_NOT_PRESENT, root)
        if re & (RootEntry.reserved_mask() | self.above_haw(12, 63)):
            raise self.fault(FaultReason.ROOT_RESERVED, root)

        ce_addr = (RootEntry.get(re, "CTP") << 12) + req.devfn * ContextEntry.size()
        ce = self.read(ce_addr, ContextEntry)
        if ce is None:
            raise self.fault(FaultReason.CONTEXT_TABLE_ACCESS, root, address=ce_addr)
        self.step(root, 0, ContextEntry, ce_addr, ce)
        if not ContextEntry.get(ce, "P"):
            raise self.fault(FaultReason.CONTEXT_NOT_PRESENT, root)
        if ce & (ContextEntry.reserved_mask() | self.above_haw(12, 63)):
            raise self.fault(FaultReason.CONTEXT_RESERVED, root)
        tt = ContextEntry.get(ce, "TT")
        aw = ContextEntry.get(ce, "AW")
        levels = address_width_levels(aw)
        agaw = agaw_bits(aw)
        if (levels is None or agaw is None or not self.caps.get("SAGAW") >> aw & 1
                or tt == TranslationType.RESERVED
                or (tt == TranslationType.ALL and not self.cap("DT"))
                or (tt == TranslationType.PASS_THROUGH and not self.cap("PT"))):
            raise self.fault(FaultReason.CONTEXT_INVALID, root)

        if tt == TranslationType.PASS_THROUGH:
            if self.addr >> self.haw:
                raise self.fault(FaultReason.ADDRESS_BEYOND_AW, root)
            self.interrupt_check(self.addr, FaultReason.INTERRUPT_ADDRESS, root, 0)
            return self.done(self.addr, PAGE_4K, Permissions(read=True, write=True, user=True))

        if self.addr >> min(self.mgaw, agaw):
            raise self.fault(FaultReason.ADDRESS_BEYOND_AW, Stage.VTD_SECOND, levels)
        walk = self.ss_walk(ContextEntry.get(ce, "SSPTPTR") << 12, levels, self.addr,
                            legacy=True)
        if req.write and not walk.w:
            raise self.fault(FaultReason.WRITE_DENIED, Stage.VTD_SECOND, 1)
        if not req.write and not walk.r:
            raise self.fault(FaultReason.READ_DENIED, Stage.VTD_SECOND, 1)
        self.interrupt_check(walk.output, FaultReason.INTERRUPT_ADDRESS, Stage.VTD_SECOND, 1)
        return self.done(walk.output, walk.page_size,
                         Permissions(read=walk.r, write=walk.w, user=True))

    # -- scalable mode (s3.4.3) -------------------------------------------------------------

    def scalable(self, rta: int) -> Translation:
        req, root = self.req, Stage.VTD_ROOT
        re_addr = rta + req.bus * ScalableRootEntry.size()
        re = self.read(re_addr, ScalableRootEntry)
        if re is None:
            raise self.fault(FaultReason.SM_ROOT_ACCESS, root, address=re_addr)
        self.step(root, 0, ScalableRootEntry, re_addr, re)
        upper = req.devfn >= 0x80
        if not ScalableRootEntry.get(re, "UP" if upper else "LP"):
            raise self.fault(FaultReason.SM_ROOT_NOT_PRESENT, root)
        rsvd = ScalableRootEntry.reserved_mask()
        if ScalableRootEntry.get(re, "LP"):
            rsvd |= self.above_haw(12, 63)
        if ScalableRootEntry.get(re, "UP"):
            rsvd |= self.above_haw(76, 127)
        present_halves = (_bits(0, 63) if ScalableRootEntry.get(re, "LP") else 0) | (
            _bits(64, 127) if ScalableRootEntry.get(re, "UP") else 0)
        if re & rsvd & present_halves:
            raise self.fault(FaultReason.SM_ROOT_RESERVED, root)

        ctp = ScalableRootEntry.get(re, "UCTP" if upper else "LCTP") << 12
        ce_addr = ctp + (req.devfn & 0x7F) * ScalableContextEntry.size()
        ce = self.read(ce_addr, ScalableContextEntry)
        if ce is None:
            raise self.fault(FaultReason.SM_CONTEXT_ACCESS, root, address=ce_addr)
        self.step(root, 0, ScalableContextEntry, ce_addr, ce)
        sce = ScalableContextEntry.decode(ce)
        if not sce["P"]:
            raise self.fault(FaultReason.SM_CONTEXT_NOT_PRESENT, root)
        if ce & (ScalableContextEntry.reserved_mask() | self.above_haw(12, 63)):
            raise self.fault(FaultReason.SM_CONTEXT_RESERVED, root)
        max_pasid = (1 << (sce["PDTS"] + 7 + 6)) - 1
        rid_pasid = sce["RID_PASID"] if self.cap("RPS") else 0
        if (not sce["DTE"] and sce["PRE"]) or rid_pasid > max_pasid:
            raise self.fault(FaultReason.SM_CONTEXT_INVALID, root)

        if req.pasid is None:
            pasid = rid_pasid
            privileged = bool(sce["RID_PRIV"]) and self.cap("RPRIVS")
            execute = False
        else:
            pasid = req.pasid
            if not sce["PASIDE"] or not self.cap("PASID"):
                raise self.fault(FaultReason.SM_PASIDE_CLEAR, root)
            if pasid >> self.caps.pasid_bits:
                raise self.fault(FaultReason.SM_PASID_BEYOND_PSS, root)
            if pasid > max_pasid:
                raise self.fault(FaultReason.SM_PASID_BEYOND_PDTS, root)
            if self.cap("RPS") and pasid == rid_pasid:
                raise self.fault(FaultReason.SM_PASID_IS_RID_PASID, root)
            privileged = req.privileged
            execute = req.access is Access.EXECUTE

        pd_addr = (sce["PASIDDIRPTR"] << 12) + (pasid >> 6) * PasidDirEntry.size()
        pde = self.read(pd_addr, PasidDirEntry)
        if pde is None:
            raise self.fault(FaultReason.SM_PASID_DIR_ACCESS, root, address=pd_addr)
        self.step(root, 0, PasidDirEntry, pd_addr, pde)
        if not PasidDirEntry.get(pde, "P"):
            raise self.fault(FaultReason.SM_PASID_DIR_NOT_PRESENT, root)
        if pde & (PasidDirEntry.reserved_mask() | self.above_haw(12, 63)):
            raise self.fault(FaultReason.SM_PASID_DIR_RESERVED, root)

        pt_addr = (PasidDirEntry.get(pde, "SMPTBLPTR") << 12) + (
            pasid & 0x3F) * PasidTableEntry.size()
        pte = self.read(pt_addr, PasidTableEntry)
        if pte is None:
            raise self.fault(FaultReason.SM_PASID_ENTRY_ACCESS, root, address=pt_addr)
        self.step(root, 0, PasidTableEntry, pt_addr, pte)
        pe = PasidTableEntry.decode(pte)
        if not pe["P"]:
            raise self.fault(FaultReason.SM_PASID_ENTRY_NOT_PRESENT, root)
        if pte & (PasidTableEntry.reserved_mask() | self.above_haw(12, 63)
                  | self.above_haw(140, 191)):
            raise self.fault(FaultReason.SM_PASID_ENTRY_RESERVED, root)
        self.check_pasid_entry(pe)
        if privileged and not (pe["SRE"] and self.cap("SRS")):
            raise self.fault(FaultReason.SM_SRE_CLEAR, root)
        if execute and not (pe["ERE"] and self.cap("ERS")):
            raise self.fault(FaultReason.SM_ERE_CLEAR, root)

        pgtt = pe["PGTT"]
        if pgtt == Pgtt.PASS_THROUGH:
            if self.addr >> self.haw:
                raise self.fault(FaultReason.SM_ADDRESS_BEYOND_HAW, root)
            self.interrupt_check(self.addr, FaultReason.SM_INTERRUPT_ADDRESS, root, 0)
            return self.done(self.addr, PAGE_4K,
                             Permissions(read=True, write=True, execute=True, user=True))
        if pgtt == Pgtt.SECOND_STAGE:
            return self.sm_second_stage(pe, execute)
        return self.sm_first_stage(pe, privileged, execute, nested=pgtt == Pgtt.NESTED)

    def check_pasid_entry(self, pe: dict[str, int]) -> None:
        """SPT.4: translation types, widths and modes the hardware does not support."""
        pgtt = pe["PGTT"]
        needs: dict[int, str] = {Pgtt.FIRST_STAGE: "FSTS", Pgtt.SECOND_STAGE: "SSTS",
                                 Pgtt.NESTED: "NEST", Pgtt.PASS_THROUGH: "PT"}
        cap = needs.get(pgtt)
        ok = cap is not None and self.cap(cap)
        if ok and pgtt in (Pgtt.SECOND_STAGE, Pgtt.NESTED):
            ok = address_width_levels(pe["AW"]) is not None and bool(
                self.caps.get("SAGAW") >> pe["AW"] & 1)
        if ok and pgtt in (Pgtt.FIRST_STAGE, Pgtt.NESTED):
            ok = pe["FSPM"] == 0 or (pe["FSPM"] == 1 and self.cap("FS5LP"))
        if ok and pgtt == Pgtt.NESTED:
            ok = not (pe["FSPTPTR"] << 12) >> self.ss_width(pe)
        if not ok:
            raise self.fault(FaultReason.SM_PASID_ENTRY_INVALID, Stage.VTD_ROOT)

    def ss_width(self, pe: dict[str, int]) -> int:
        """X of 'above 2^X - 1': min(MGAW, AGAW of the PASID entry's AW)."""
        return min(self.mgaw, agaw_bits(pe["AW"]) or 0)

    def sm_second_stage(self, pe: dict[str, int], execute: bool) -> Translation:
        levels = address_width_levels(pe["AW"]) or 0
        if self.addr >> self.ss_width(pe):
            raise self.fault(FaultReason.SM_ADDRESS_BEYOND_AW, Stage.VTD_SECOND, levels)
        walk = self.ss_walk(pe["SSPTPTR"] << 12, levels, self.addr, legacy=False)
        xok = walk.x if pe["SSEE"] else walk.r
        self.ss_rights(walk, self.req.write, execute, xok, self.addr)
        self.ss_ad(walk, self.req.write, pe)
        self.interrupt_check(walk.output, FaultReason.SM_INTERRUPT_ADDRESS, Stage.VTD_SECOND, 1)
        return self.done(walk.output, walk.page_size,
                         Permissions(read=walk.r, write=walk.w, execute=xok, user=True))

    def ss_rights(self, walk: _PageWalk, write: bool, execute: bool, xok: bool,
                  address: int) -> None:
        """SSS.2 / SGN.6 / SGN.7 / SGN.3 on the cumulative second-stage rights."""
        if not walk.r and not walk.w:
            raise self.fault(FaultReason.SM_SS_NOT_PRESENT, Stage.VTD_SECOND, 1, address)
        if write and not walk.w:
            raise self.fault(FaultReason.SM_WRITE_DENIED, Stage.VTD_SECOND, 1, address)
        if not write and not walk.r:
            raise self.fault(FaultReason.SM_READ_DENIED, Stage.VTD_SECOND, 1, address)
        if execute and not xok:
            raise self.fault(FaultReason.SM_EXECUTE_DENIED, Stage.VTD_SECOND, 1, address)

    def sm_first_stage(self, pe: dict[str, int], privileged: bool, execute: bool,
                       nested: bool) -> Translation:
        req = self.req
        levels = 5 if pe["FSPM"] == 1 else 4
        width = 12 + 9 * levels
        top = self.addr >> (width - 1)
        if top not in (0, (1 << (65 - width)) - 1):
            raise self.fault(FaultReason.SM_NON_CANONICAL, Stage.VTD_FIRST, levels)
        walk = self.fs_walk(pe, levels, nested)

        wpe = bool(pe["WPE"])
        if not privileged and not walk.us:
            raise self.fault(FaultReason.SM_PRIVILEGE, Stage.VTD_FIRST, 1)
        write_ok = walk.w or (privileged and not wpe)
        if req.write and not write_ok:
            raise self.fault(FaultReason.SM_WRITE_DENIED, Stage.VTD_FIRST, 1)
        exec_ok = walk.x and not (privileged and pe["SMEP"] and walk.us)
        if execute and not exec_ok:
            raise self.fault(FaultReason.SM_EXECUTE_DENIED, Stage.VTD_FIRST, 1)
        perms = Permissions(read=True, write=write_ok, execute=exec_ok, user=walk.us)

        if not nested:
            self.fs_ad(walk, pe, nested=False)
            self.interrupt_check(walk.output, FaultReason.SM_INTERRUPT_ADDRESS,
                                 Stage.VTD_FIRST, 1)
            return self.done(walk.output, walk.page_size, perms)

        # Nested: the first-stage output is a GPA, translated by the second stage (s3.8).
        ss_levels = address_width_levels(pe["AW"]) or 0
        gpa = walk.output
        ss = self.ss_walk(pe["SSPTPTR"] << 12, ss_levels, gpa, legacy=False, address=gpa)
        xok = ss.x if pe["SSEE"] else ss.r
        self.ss_rights(ss, req.write, execute, xok, gpa)
        self.fs_ad(walk, pe, nested=True)
        self.ss_ad(ss, req.write, pe)
        self.interrupt_check(ss.output, FaultReason.SM_INTERRUPT_ADDRESS, Stage.VTD_SECOND, 1)
        return self.done(ss.output, min(walk.page_size, ss.page_size), Permissions(
            read=ss.r, write=write_ok and ss.w, execute=exec_ok and xok, user=walk.us))

    # -- second-stage walk (s3.7, s9.8) -----------------------------------------------------

    def ss_walk(self, table: int, levels: int, addr: int, *, legacy: bool,
                address: int | None = None) -> _PageWalk:
        """Walk second-stage tables for ``addr``; faults on unreadable, non-present and
        reserved entries. Rights are left to the caller."""
        stage = Stage.VTD_SECOND
        out = _PageWalk(0, PAGE_4K)
        for level in range(levels, 0, -1):
            index = addr >> (12 + 9 * (level - 1)) & 0x1FF
            table_fmt, leaf_fmt = SS_FORMATS[level]
            e_addr = (table & _bits(12, 63)) + index * 8
            value = self.read(e_addr, table_fmt)
            if value is None:
                if level == levels:
                    reason = (FaultReason.CONTEXT_INVALID if legacy
                              else FaultReason.SM_SSPTPTR_ACCESS)
                else:
                    reason = (FaultReason.SS_ENTRY_ACCESS if legacy
                              else FaultReason.SM_SS_ENTRY_ACCESS)
                raise self.fault(reason, stage, level, address)
            large = leaf_fmt is not None and bool(value >> 7 & 1)
            fmt = leaf_fmt if large and leaf_fmt is not None else table_fmt
            step = self.step(stage, level, fmt, e_addr, value)
            if not value & 0b11:
                if legacy:
                    reason = (FaultReason.WRITE_DENIED if self.req.write
                              else FaultReason.READ_DENIED)
                else:
                    reason = FaultReason.SM_SS_NOT_PRESENT
                raise self.fault(reason, stage, level, address)
            rsvd = fmt.reserved_mask() | self.above_haw(12, 51)
            if large and not self.caps.get("SLLPS") >> (level - 2) & 1:
                rsvd |= 1 << 7
            if (level == 1 or large) and not self.cap("SC"):
                rsvd |= 1 << 11
            if value & rsvd:
                raise self.fault(FaultReason.SS_RESERVED if legacy
                                 else FaultReason.SM_SS_RESERVED, stage, level, address)
            out.r = out.r and bool(value & 1)
            out.w = out.w and bool(value & 2)
            out.x = out.x and bool(value & 4)
            out.entries.append(_Entry(step, e_addr, value, level))
            if level == 1 or large:
                shift = 12 + 9 * (level - 1)
                out.output = (value & _bits(shift, 51)) | (addr & _bits(0, shift - 1))
                out.page_size = 1 << shift
                return out
            table = value & _bits(12, 51)
        return out  # only reached with levels == 0, which validation rules out

    def ss_ad(self, walk: _PageWalk, write: bool, pe: dict[str, int]) -> None:
        """Queue second-stage A (every entry) and D (leaf, on write) when SSADE=1 (s3.7.2)."""
        if not (pe["SSADE"] and self.cap("SSADS")):
            return
        for i, entry in enumerate(walk.entries):
            leaf = i == len(walk.entries) - 1
            new = entry.value | 1 << 8 | (1 << 9 if leaf and write else 0)
            if new != entry.value:
                self.ad.append(_AdUpdate(entry, new, self.snoop_ok(pe),
                                         FaultReason.SM_SS_AD_NO_SNOOP,
                                         FaultReason.SM_SS_AD_FAILED, Stage.VTD_SECOND))

    def snoop_ok(self, pe: dict[str, int]) -> bool:
        """A/D updates need snooped page walks: ECAP.SMPWCS and PWSNP (SFS.9, SSS.5)."""
        return bool(pe["PWSNP"]) and self.cap("SMPWCS")

    # -- first-stage walk (s3.6, s9.7) ------------------------------------------------------

    def fs_walk(self, pe: dict[str, int], levels: int, nested: bool) -> _PageWalk:
        stage = Stage.VTD_FIRST
        nxe = bool(pe["NXE"])
        width = self.ss_width(pe) if nested else 64
        out = _PageWalk(0, PAGE_4K)
        xd = False
        table = pe["FSPTPTR"] << 12
        ss_levels = address_width_levels(pe["AW"]) or 0
        for level in range(levels, 0, -1):
            index = self.addr >> (12 + 9 * (level - 1)) & 0x1FF
            table_fmt, leaf_fmt = FS_FORMATS[level]
            e_gpa = table + index * 8
            e_addr, ss_writable = e_gpa, True
            if nested:
                ss = self.ss_walk(pe["SSPTPTR"] << 12, ss_levels, e_gpa, legacy=False,
                                  address=e_gpa)
                if not ss.r and not ss.w:
                    raise self.fault(FaultReason.SM_SS_NOT_PRESENT, Stage.VTD_SECOND, 1, e_gpa)
                if not ss.r:
                    raise self.fault(FaultReason.SM_FSPTPTR_READ_DENIED if level == levels
                                     else FaultReason.SM_FS_READ_DENIED, stage, level, e_gpa)
                self.ss_ad(ss, False, pe)
                e_addr, ss_writable = ss.output, ss.w
            value = self.read(e_addr, table_fmt)
            if value is None:
                raise self.fault(FaultReason.SM_FSPTPTR_ACCESS if level == levels
                                 else FaultReason.SM_FS_ENTRY_ACCESS, stage, level, e_gpa)
            large = leaf_fmt is not None and bool(value >> 7 & 1)
            fmt = leaf_fmt if large and leaf_fmt is not None else table_fmt
            step = self.step(stage, level, fmt, e_addr, value)
            if not value & 1:
                raise self.fault(FaultReason.SM_FS_NOT_PRESENT, stage, level, e_gpa)
            rsvd = fmt.reserved_mask() | self.above_haw(12, 51)
            if large and level == 3 and not self.cap("FS1GP"):
                rsvd |= 1 << 7
            if value & rsvd:
                raise self.fault(FaultReason.SM_FS_RESERVED, stage, level, e_gpa)
            out.w = out.w and bool(value & 2)
            out.us = out.us and bool(value & 4)
            xd = xd or (nxe and bool(value >> 63))
            out.entries.append(_Entry(step, e_addr, value, level, ss_writable))
            shift = 12 + 9 * (level - 1)
            if level == 1 or large:
                base = value & _bits(shift, 51)
                if base >> width:
                    raise self.fault(FaultReason.SM_FS_BEYOND_AW, stage, level, e_gpa)
                out.output = base | (self.addr & _bits(0, shift - 1))
                out.page_size = 1 << shift
                break
            table = value & _bits(12, 51)
            if table >> width:
                raise self.fault(FaultReason.SM_FS_BEYOND_AW, stage, level, e_gpa)
        out.x = not xd
        return out

    def fs_ad(self, walk: _PageWalk, pe: dict[str, int], nested: bool) -> None:
        """Queue first-stage A (and EA with EAFE) on every entry and D on the leaf for writes
        (s3.6.2). Nested, each update needs second-stage write permission (SFS.8)."""
        eafe = bool(pe["EAFE"]) and self.cap("EAFS")
        for i, entry in enumerate(walk.entries):
            leaf = i == len(walk.entries) - 1
            new = entry.value | 1 << 5 | (1 << 10 if eafe else 0) | (
                1 << 6 if leaf and self.req.write else 0)
            if new == entry.value:
                continue
            if nested and not entry.ss_writable:
                raise self.fault(FaultReason.SM_FS_AD_WRITE_DENIED, Stage.VTD_FIRST,
                                 entry.level)
            self.ad.append(_AdUpdate(entry, new, self.snoop_ok(pe), FaultReason.SM_FS_AD_NO_SNOOP,
                                     FaultReason.SM_FS_AD_FAILED, Stage.VTD_FIRST))

    # -- result -----------------------------------------------------------------------------

    def done(self, output: int, page_size: int, perms: Permissions) -> Translation:
        """Apply the queued A/D updates (faulting if one is impossible) and succeed."""
        for update in self.ad:
            if not update.snoop_ok:
                raise self.fault(update.no_snoop, update.stage, update.entry.level)
        for update in self.ad:
            if self.options.set_ad:
                mem = self.memory
                assert isinstance(mem, WritablePhysMemory)  # checked in translate()
                try:
                    mem.write_u64(update.entry.address, update.new)
                except HvError:
                    raise self.fault(update.failed, update.stage, update.entry.level) from None
            self.steps[update.entry.step] = replace(self.steps[update.entry.step],
                                                    write_back=update.new)
        return Translation(input=self.req.address, output=output, page_size=page_size,
                           permissions=perms, steps=tuple(self.steps))


def translate(request: DmaRequest, memory: PhysMemory, rtaddr: int, caps: IommuCaps,
              options: WalkOptions | None = None) -> Outcome:
    """Translate ``request`` the way a remapping unit with ``caps`` and ``rtaddr`` would.

    Returns a :class:`Translation` or a :class:`Fault` (``kind="vtd"``, ``code`` the VT-d
    fault reason). Raises only for misuse: ``set_ad`` on memory that cannot be written.
    """
    options = options or WalkOptions()
    if options.set_ad and not isinstance(memory, WritablePhysMemory):
        raise UsageError("WalkOptions.set_ad needs a WritablePhysMemory")
    walk = _Walk(request, memory, caps, options)
    try:
        return walk.run(rtaddr & MASK64)
    except _Abort as abort:
        return abort.fault


# --------------------------------------------------------------------------------------------
# Fault reporting
# --------------------------------------------------------------------------------------------

_FPD_TABLES = {ContextEntry.NAME, ScalableContextEntry.NAME, PasidDirEntry.NAME,
               PasidTableEntry.NAME}


def is_recorded(fault: Fault) -> bool:
    """Whether the hardware records ``fault`` in a fault-recording register: a qualified fault
    is suppressed by FPD=1 in the context, PASID-directory or PASID-table entry on its path
    (s7.1.1, s9.3-s9.6; FPD is bit 1 of each and is honoured even when P=0)."""
    try:
        info = REASONS[FaultReason(fault.code)]
    except ValueError:
        return True
    if not info.qualified:
        return True
    return not any(s.table in _FPD_TABLES and s.entry >> 1 & 1 for s in fault.steps)


def fault_record(request: DmaRequest, fault: Fault) -> int:
    """The FRCD_REG value the hardware records for ``fault`` (s11.4.7.6), F=1."""
    read = not request.write
    return FaultRecord.encode({
        "FI": (request.address & MASK64) >> 12, "SID": request.sid, "FR": fault.code & 0xFF,
        "PP": int(request.pasid is not None), "PV": request.pasid or 0,
        "PRIV": int(request.privileged), "EXE": int(request.access is Access.EXECUTE),
        "T1": int(read), "T2": 0, "F": 1,
    })


#: Where QEMU 10.0.2 (hw/i386/intel_iommu.c) records a scalable-mode condition under another
#: code: it reuses the legacy root/context/second-stage codes in scalable mode.
_QEMU_RENUMBERED = {
    FaultReason.SM_ROOT_ACCESS: 0x08, FaultReason.SM_ROOT_NOT_PRESENT: 0x01,
    FaultReason.SM_ROOT_RESERVED: 0x0A, FaultReason.SM_CONTEXT_ACCESS: 0x09,
    FaultReason.SM_CONTEXT_NOT_PRESENT: 0x02, FaultReason.SM_CONTEXT_RESERVED: 0x0B,
    FaultReason.SM_SSPTPTR_ACCESS: 0x03, FaultReason.SM_SS_ENTRY_ACCESS: 0x07,
    FaultReason.SM_SS_RESERVED: 0x0C, FaultReason.SM_ADDRESS_BEYOND_AW: 0x04,
    FaultReason.SM_READ_DENIED: 0x06,
}
#: Conditions QEMU 10.0.2 detects under the specification's own code.
_QEMU_SAME = frozenset({
    0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x0E,
    0x50, 0x51, 0x58, 0x59, 0x5B, 0x70, 0x71, 0x72, 0x73, 0x80, 0x81, 0x87, 0x91,
})

#: How QEMU 10.0.2 departs from this model beyond renumbering (for the differential tests).
QEMU_NOTES = (
    "Scalable mode reuses legacy codes for root, context and second-stage faults "
    "(see qemu_reason).",
    "PGTT: only first-stage (x-flts=on) or only second-stage (x-flts=off) is offered, plus "
    "pass-through; nested always faults 0x5B. x-flts selects the first-stage walk globally.",
    "Not checked by QEMU: SM context DTE/PRE/PASIDE/PDTS/RID_PASID limits, PASID-directory and "
    "PASID-entry reserved bits, SRE/ERE, SS R=W=0 as 0x79 (reported 0x5/0x6), execute, A/D "
    "snoop rules (QEMU always sets first-stage A/D, never second-stage A/D), pass-through HAW.",
    "QEMU checks each level's R/W (SS) or P/U/S/R/W (FS) before that level's reserved bits "
    "and stops there; the model decides rights on the completed walk.",
    "QEMU requires U/S=1 in every first-stage entry (no supervisor requests) and checks "
    "canonicality against the PASID entry's AW rather than the 4-level width.",
    "QEMU validates the RID_PASID PASID entry while fetching the context entry, even for "
    "requests with PASID, and honours RID_PASID without ECAP.RPS.",
    "Second-stage SNP is not reserved once QEMU runs x-scalable-mode=on (even for legacy-mode "
    "tables) or snoop-control=on, whatever ECAP.SC says.",
    "A PASID-table entry whose PGTT (or AW/FSPM for it) QEMU does not support is reported "
    "0x5B before its P bit is looked at: a non-present all-zero entry gives 0x5B, not 0x59.",
    "Legacy pass-through (TT=10b) is not limited to the host address width: 0x4 never "
    "appears there.",
    "The interrupt-range check covers the whole output page in QEMU.",
    "Fault records of scalable-mode walks for requests without PASID carry PP=1 and "
    "PV=RID_PASID in QEMU; PRIV/EXE/T2 are never set.",
    "RTADDR_REG: QEMU reads only bit 10 (scalable when x-scalable-mode=on); TTM=10b/11b are "
    "not faulted (0x30/0x33 never appear).",
    "QEMU checks the reserved bits of both halves of a scalable-mode root entry, present or "
    "not.",
)


def qemu_reason(fault: Fault, request: DmaRequest, caps: IommuCaps | None = None, *,
                patched: bool = False) -> int | None:
    """The reason code QEMU 10.0.2 records for the condition behind ``fault``, or None when
    QEMU does not detect that condition (see :data:`QEMU_NOTES`).

    ``patched``: QEMU 10.0.2 with the hvtools series (qemu-patches/, patch 0002): the PASID
    entry's PGTT selects each request's walk, nested translation reports the spec's SFS/SSS
    codes, supervisor requests are honoured and RTA.2/SPT.6 are detected
    (:data:`QEMU_PATCHED_NOTES`); every stock departure outside those stays. What the series
    supports (nested, SRE) still follows ``caps`` (ECAP.NEST, ECAP.SRS).

    ``caps`` (the unit's CAP/ECAP as QEMU reports them) settle what depends on QEMU's
    configuration: which PGTTs it accepts and whether SNP is reserved; without them QEMU's
    defaults are assumed (39/48-bit second stage, every PGTT but nested, SNP reserved only in
    scalable-mode faults). QEMU checks each paging level completely before the next, so a
    fault the model finds deeper (or on the completed walk) may surface in QEMU at a higher
    level under another code; the walk's steps say which.
    """
    code = fault.code
    try:
        reason = FaultReason(code)
    except ValueError:
        return None
    pasid_entries = [s.entry for s in fault.steps if s.table == PasidTableEntry.NAME]
    if pasid_entries and not _qemu_pgtt_ok(pasid_entries[-1], caps, patched):
        return FaultReason.SM_PASID_ENTRY_INVALID  # checked before P, reserved bits, walks
    if patched:
        nested = bool(pasid_entries) and PasidTableEntry.get(pasid_entries[-1], "PGTT") \
            == Pgtt.NESTED
        level_code = _qemu_patched_level_checks(fault, request, pasid_entries, nested)
        if level_code is None and nested and code in _QEMU_PATCHED_NESTED:
            return code
    else:
        level_code = _qemu_level_checks(fault, request)
    if level_code is not None:
        return level_code
    if reason in (FaultReason.SS_RESERVED, FaultReason.SM_SS_RESERVED) and _qemu_snp_only(
            fault, reason, caps):
        return None
    if reason is FaultReason.ADDRESS_BEYOND_AW and any(
            s.table == ContextEntry.NAME and ContextEntry.get(s.entry, "TT")
            == TranslationType.PASS_THROUGH for s in fault.steps):
        return None
    if code == FaultReason.SM_SS_NOT_PRESENT:
        return 0x05 if request.write else 0x06
    if code == FaultReason.SM_WRITE_DENIED:
        return 0x85 if fault.stage is Stage.VTD_FIRST else 0x05
    if reason in _QEMU_RENUMBERED:
        return _QEMU_RENUMBERED[reason]
    return code if code in (_QEMU_PATCHED_SAME if patched else _QEMU_SAME) else None


def _qemu_pgtt_ok(pte: int, caps: IommuCaps | None, patched: bool = False) -> bool:
    """QEMU's PASID-entry type check (vtd_pe_type_check and the level checks after it); the
    series accepts nested entries with ECAP.NEST (both stages' level checks apply)."""
    pe = PasidTableEntry.decode(pte)
    pgtt = pe["PGTT"]
    sagaw = 0b00110 if caps is None else caps.get("SAGAW")
    if pgtt == Pgtt.FIRST_STAGE:
        return (caps is None or bool(caps.get("FSTS"))) and pe["FSPM"] == 0
    if pgtt == Pgtt.SECOND_STAGE:
        return (caps is None or bool(caps.get("SSTS"))) and bool(sagaw >> pe["AW"] & 1)
    if pgtt == Pgtt.NESTED and patched:
        return ((caps is None or bool(caps.get("NEST"))) and bool(sagaw >> pe["AW"] & 1)
                and pe["FSPM"] == 0)
    if pgtt == Pgtt.PASS_THROUGH:
        return caps is None or bool(caps.get("PT"))
    return False  # nested and the reserved encodings


def _qemu_level_checks(fault: Fault, request: DmaRequest) -> int | None:
    """The first failure of the checks QEMU makes on each paging entry before its reserved
    bits (SS: the requested R or W; FS: P, U/S, then R/W for writes), or None."""
    first = [s.entry for s in fault.steps if s.stage is Stage.VTD_FIRST]
    if first:
        for entry in first:
            if not entry & 1:
                return FaultReason.SM_FS_NOT_PRESENT
            if not entry & 4:
                return FaultReason.SM_PRIVILEGE
            if request.write and not entry & 2:
                return FaultReason.SM_WRITE_DENIED
        return None
    need = 2 if request.write else 1
    for s in fault.steps:
        if s.stage is Stage.VTD_SECOND and not s.entry & need:
            return FaultReason.WRITE_DENIED if request.write else FaultReason.READ_DENIED
    return None


def _qemu_snp_only(fault: Fault, reason: FaultReason, caps: IommuCaps | None) -> bool:
    """Whether SNP (bit 11) is the only reserved bit of the faulting second-stage leaf and
    QEMU takes SNP as valid there (x-scalable-mode=on or snoop-control=on)."""
    scalable = (reason is FaultReason.SM_SS_RESERVED if caps is None
                else bool(caps.get("SMTS")) or bool(caps.get("SC")))
    ss = [s for s in fault.steps if s.stage is Stage.VTD_SECOND]
    fmt = _ss_leaf_format(ss[-1]) if ss else None
    if not scalable or fmt is None or not ss[-1].entry >> 11 & 1:
        return False
    haw = 48 if caps is None else caps.get("MGAW") + 1
    rest = ss[-1].entry & ~(1 << 11)
    return not rest & (fmt.reserved_mask() | _bits(haw, 51))


#: Conditions the patched QEMU detects under the specification's own code (beyond
#: :data:`_QEMU_SAME`): RTA.2, SPT.6, and in nested walks SFS.5-8, SSS.1-4, SGN.6/7.
_QEMU_PATCHED_SAME = _QEMU_SAME | {0x31, 0x45, 0x46, 0x5D}
_QEMU_PATCHED_NESTED = frozenset({0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x7B, 0x85, 0x86})
#: First-stage leaf formats (FS-PTE, FS-PDE(2M), FS-PDPE(1G)) by name, as walk steps carry them.
_FS_LEAVES = frozenset({FS_FORMATS[1][0].NAME, *(leaf.NAME for level in (2, 3)
                                                 if (leaf := FS_FORMATS[level][1]))})

#: How the patched QEMU (hvtools series, qemu-patches/ patch 0002) departs from this model,
#: in addition to the stock :data:`QEMU_NOTES` that still apply.
QEMU_PATCHED_NOTES = (
    "Lifted from the stock notes: PGTT is taken from each PASID entry (nested accepted with "
    "ECAP.NEST), supervisor requests are honoured (SRE, WPE; U/S not required), RTA.2 (0x31) "
    "and SPT.6 (0x5D) are detected, fault records of requests-with-PASID carry PP, the "
    "20-bit PV and PRIV, also for context and PASID-directory faults.",
    "Nested walks report the specification's codes (SFS.5-8 0x74-0x77, SSS.1-4 0x78-0x7B, "
    "SGN.6/7 0x85/0x86); second-stage-only walks keep the stock legacy codes.",
    "QEMU checks each first-stage level completely before the next (P, U/S for user "
    "requests, R/W unless a supervisor write with WPE=0, reserved bits, then in nested mode "
    "the A/D update against the second stage's write permission, SFS.8), and a nested walk "
    "translates each table address through the second stage before reading it.",
    "SM context PASIDE and PDTS are checked for requests-with-PASID (SCT.6 0x45, SCT.7 0x46); "
    "the RID_PASID entry is still validated while fetching the context entry.",
    "First-stage canonicality (stock) follows the PASID entry's AW in nested mode too.",
    "Supervisor address spaces, and requests-with-PASID in legacy mode, never take the "
    "pass-through fast path (the differential suite found both; fixed in 0002).",
)


def _qemu_patched_level_checks(fault: Fault, request: DmaRequest, pasid_entries: list[int],
                               nested: bool) -> int | None:
    """The first failure of the checks the patched QEMU makes on each paging entry before
    going deeper (see :data:`QEMU_PATCHED_NOTES`), or None."""
    if not any(s.stage is Stage.VTD_FIRST for s in fault.steps):
        if nested:
            return None  # nested second-stage walks check rights on the completed walk
        return _qemu_level_checks(fault, request)
    priv = request.privileged
    wpe = bool(pasid_entries) and bool(PasidTableEntry.get(pasid_entries[-1], "WPE"))
    first = [i for i, s in enumerate(fault.steps) if s.stage is Stage.VTD_FIRST]
    ss_writable = True
    for i, s in enumerate(fault.steps):
        if s.stage is Stage.VTD_SECOND:
            ss_writable = ss_writable and bool(s.entry & 2)
            continue
        if s.stage is not Stage.VTD_FIRST:
            continue
        entry = s.entry
        if not entry & 1:
            return FaultReason.SM_FS_NOT_PRESENT
        if not priv and not entry & 4:
            return FaultReason.SM_PRIVILEGE
        if request.write and not entry & 2 and not (priv and not wpe):
            return FaultReason.SM_WRITE_DENIED
        if i == first[-1] and fault.stage is Stage.VTD_FIRST \
                and fault.code == FaultReason.SM_FS_RESERVED:
            return None  # the model's own fault: reserved bits come before A/D
        if nested:
            flag = 1 << 5 | (1 << 6 if request.write and s.table in _FS_LEAVES else 0)
            if entry & flag != flag and not ss_writable:
                return FaultReason.SM_FS_AD_WRITE_DENIED
        ss_writable = True  # the next second-stage steps translate the next table
    return None


def _ss_leaf_format(step: WalkStep) -> type[VtdStruct] | None:
    """The second-stage leaf format a step read (SS-PTE, SS-PDE(2M), SS-PDPE(1G)), or None."""
    for level in (1, 2, 3):
        table_fmt, leaf_fmt = SS_FORMATS[level]
        fmt = table_fmt if leaf_fmt is None else leaf_fmt
        if step.level == level and step.table == fmt.NAME:
            return fmt
    return None


# --------------------------------------------------------------------------------------------
# Table dump (for `hvtools iommu tables`)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceTables:
    """One device's present context entry and PASID-table entries, as programmed."""

    sid: int
    context_address: int
    context: int  # raw ContextEntry (legacy) or ScalableContextEntry value
    scalable: bool
    pasid_entries: tuple[tuple[int, int, int], ...] = ()  # (pasid, address, raw entry)
    errors: tuple[str, ...] = ()

    @property
    def context_fields(self) -> dict[str, int]:
        return (ScalableContextEntry if self.scalable else ContextEntry).decode(self.context)


def dump_tables(memory: PhysMemory, rtaddr: int, caps: IommuCaps,
                max_pasid_entries: int = 1 << 12) -> list[DeviceTables]:
    """Every present context entry under ``rtaddr`` and, in scalable mode, every present
    PASID-table entry (at most ``max_pasid_entries`` per device). Never raises on contents."""
    walk = _Walk(DmaRequest(0, Iova(0)), memory, caps, WalkOptions())
    rtaddr &= MASK64
    scalable = RtaddrReg.get(rtaddr, "TTM") == Ttm.SCALABLE
    rta = (RtaddrReg.get(rtaddr, "RTA") << 12) & _bits(0, walk.haw - 1)
    root_fmt: type[VtdStruct] = ScalableRootEntry if scalable else RootEntry
    ctx_fmt: type[VtdStruct] = ScalableContextEntry if scalable else ContextEntry
    devices: list[DeviceTables] = []
    for bus in range(256):
        re = walk.read(rta + bus * 16, root_fmt)
        if re is None:
            continue
        halves = [(0, RootEntry.get(re, "P"), RootEntry.get(re, "CTP"))] if not scalable else [
            (0, ScalableRootEntry.get(re, "LP"), ScalableRootEntry.get(re, "LCTP")),
            (0x80, ScalableRootEntry.get(re, "UP"), ScalableRootEntry.get(re, "UCTP"))]
        for base, present, ctp in halves:
            if not present:
                continue
            count = 128 if scalable else 256
            for i in range(count):
                ce_addr = (ctp << 12) + i * ctx_fmt.size()
                ce = walk.read(ce_addr, ctx_fmt)
                if ce is None or not ce & 1:
                    continue
                sid = bus << 8 | (base + i)
                if not scalable:
                    devices.append(DeviceTables(sid, ce_addr, ce, False))
                    continue
                entries, errors = _dump_pasids(walk, ce, max_pasid_entries)
                devices.append(DeviceTables(sid, ce_addr, ce, True, entries, errors))
    return devices


def _dump_pasids(walk: _Walk, ce: int, limit: int
                 ) -> tuple[tuple[tuple[int, int, int], ...], tuple[str, ...]]:
    sce = ScalableContextEntry.decode(ce)
    entries: list[tuple[int, int, int]] = []
    errors: list[str] = []
    for d in range(1 << (sce["PDTS"] + 7)):
        pd_addr = (sce["PASIDDIRPTR"] << 12) + d * 8
        pde = walk.read(pd_addr, PasidDirEntry)
        if pde is None:
            errors.append(f"PASID directory entry {d} at {pd_addr:#x} unreadable")
            break
        if not pde & 1:
            continue
        for i in range(64):
            pt_addr = (PasidDirEntry.get(pde, "SMPTBLPTR") << 12) + i * 64
            pte = walk.read(pt_addr, PasidTableEntry)
            if pte is None:
                errors.append(f"PASID table entry {d << 6 | i:#x} at {pt_addr:#x} unreadable")
                break
            if pte & 1:
                entries.append((d << 6 | i, pt_addr, pte))
                if len(entries) >= limit:
                    errors.append(f"stopped after {limit} PASID entries")
                    return tuple(entries), tuple(errors)
    return tuple(entries), tuple(errors)
