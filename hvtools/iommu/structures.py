"""VT-d translation structures and the registers that reach them, bit for bit.

Intel Virtualization Technology for Directed I/O, Architecture Specification rev. 4.x:
chapter 9 (translation structure formats), section 11.4 (registers). Field names follow 4.x
("SSPTPTR", "FSPM", "SSADE"); the 3.x / Linux / QEMU names ("SLPTPTR", "FLPM", "SLADE", ...)
are accepted as aliases by :meth:`VtdStruct.field` and :meth:`VtdStruct.encode`.

Each structure declares every bit: an architected field, an ``IGN_*`` field the hardware
ignores, or nothing, which makes it reserved (:meth:`~hvtools.bits.BitStruct.reserved_mask`).
Address fields are declared up to bit 51 (the largest host address width); the walker adds
bits ``51:HAW`` to the reserved mask for the platform at hand.

Rev. 5.x of the specification adds Host Permission Table fields (SM context-entry bits 5-6,
PASID-table-entry bits 256-335), SS I/O read/write bits (SS entries 61-62) and drops the
execute controls; those 5.x-only bits are reserved (or, for the dropped ones, still declared)
here, because the model is 4.x.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from hvtools.bits import BitField, BitStruct

#: MMIO offsets in a remapping unit's register page (VT-d 4.x s11.4, table "register map").
GCMD_REG_OFFSET = 0x18
GSTS_REG_OFFSET = 0x1C
RTADDR_REG_OFFSET = 0x20
CCMD_REG_OFFSET = 0x28
FSTS_REG_OFFSET = 0x34
FECTL_REG_OFFSET = 0x38
IQH_REG_OFFSET = 0x80
IQT_REG_OFFSET = 0x88
IQA_REG_OFFSET = 0x90

#: Host address width bits a paging-entry address field can ever hold (s9.7, s9.8: "51:HAW").
MAX_HAW = 52


@dataclass(frozen=True)
class VtdStruct(BitStruct):
    """A VT-d structure: a BitStruct with a byte size, a spec name and field-name aliases."""

    #: The specification's name for the structure, used in walk steps.
    NAME: ClassVar[str] = ""
    #: Older (3.x, Linux, QEMU) field names mapped to the 4.x names.
    ALIASES: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def size(cls) -> int:
        """Bytes the structure occupies in memory."""
        return cls.WIDTH // 8

    @classmethod
    def field(cls, name: str) -> BitField:
        return super().field(cls.ALIASES.get(name, name))

    @classmethod
    def get(cls, value: int, name: str) -> int:
        """One field of ``value`` (by 4.x name or alias)."""
        return cls.field(name).get(value)

    @classmethod
    def from_bytes(cls, data: bytes) -> int:
        """The little-endian value of ``data`` (exactly :meth:`size` bytes)."""
        if len(data) != cls.size():
            raise ValueError(f"{cls.__name__} is {cls.size()} bytes, got {len(data)}")
        return int.from_bytes(data, "little")

    @classmethod
    def to_bytes(cls, value: int) -> bytes:
        """``value`` as it sits in memory (little-endian, :meth:`size` bytes)."""
        if not 0 <= value < (1 << cls.WIDTH):
            raise ValueError(f"{value:#x} does not fit in {cls.WIDTH} bits")
        return value.to_bytes(cls.size(), "little")


# --------------------------------------------------------------------------------------------
# Registers (s11.4)
# --------------------------------------------------------------------------------------------


class Ttm(IntEnum):
    """RTADDR_REG.TTM, translation table mode (s11.4.5)."""

    LEGACY = 0b00
    SCALABLE = 0b01
    RESERVED = 0b10
    ABORT_DMA = 0b11  # needs ECAP.ADMS


class RtaddrReg(VtdStruct):
    """RTADDR_REG, root table address register at offset 0x20 (s11.4.5). Bits 9:0 reserved."""

    NAME = "RTADDR_REG"
    WIDTH = 64
    FIELDS = (
        BitField("TTM", 10, 11, "Translation table mode: 00 legacy, 01 scalable, "
                 "10 reserved, 11 abort-DMA (Ttm)"),
        BitField("RTA", 12, 63, "Root table address, 4 KiB aligned (address bits 63:12)"),
    )

    @classmethod
    def value(cls, root_table: int, ttm: Ttm | int = Ttm.LEGACY) -> int:
        """The register value for a 4 KiB aligned root table and a mode."""
        if root_table & 0xFFF:
            raise ValueError(f"root table {root_table:#x} is not 4 KiB aligned")
        return cls.encode({"TTM": int(ttm), "RTA": root_table >> 12})


class GcmdReg(VtdStruct):
    """GCMD_REG, global command register at 0x18 (s11.4.4.1). Bits 22:0 reserved."""

    NAME = "GCMD_REG"
    WIDTH = 32
    FIELDS = (
        BitField("CFI", 23, 23, "Compatibility format interrupt"),
        BitField("SIRTP", 24, 24, "Set interrupt remap table pointer"),
        BitField("IRE", 25, 25, "Interrupt remapping enable"),
        BitField("QIE", 26, 26, "Queued invalidation enable"),
        BitField("WBF", 27, 27, "Write buffer flush"),
        BitField("EAFL", 28, 28, "Enable advanced fault logging"),
        BitField("SFL", 29, 29, "Set fault log"),
        BitField("SRTP", 30, 30, "Set root table pointer (latches RTADDR_REG)"),
        BitField("TE", 31, 31, "Translation enable"),
    )


class GstsReg(VtdStruct):
    """GSTS_REG, global status register at 0x1C (s11.4.4.2). Bits 22:0 reserved."""

    NAME = "GSTS_REG"
    WIDTH = 32
    FIELDS = (
        BitField("CFIS", 23, 23, "Compatibility format interrupt status"),
        BitField("IRTPS", 24, 24, "Interrupt remapping table pointer status"),
        BitField("IRES", 25, 25, "Interrupt remapping enable status"),
        BitField("QIES", 26, 26, "Queued invalidation enable status"),
        BitField("WBFS", 27, 27, "Write buffer flush status"),
        BitField("AFLS", 28, 28, "Advanced fault logging status"),
        BitField("FLS", 29, 29, "Fault log status"),
        BitField("RTPS", 30, 30, "Root table pointer status"),
        BitField("TES", 31, 31, "Translation enable status"),
    )


class FstsReg(VtdStruct):
    """FSTS_REG, fault status register at 0x34 (s11.4.7.1)."""

    NAME = "FSTS_REG"
    WIDTH = 32
    FIELDS = (
        BitField("PFO", 0, 0, "Primary fault overflow"),
        BitField("PPF", 1, 1, "Primary pending fault (some FRCD has F=1)"),
        BitField("IQE", 4, 4, "Invalidation queue error"),
        BitField("ICE", 5, 5, "Invalidation completion error"),
        BitField("ITE", 6, 6, "Invalidation time-out error"),
        BitField("FRI", 8, 15, "Fault record index of the first pending fault"),
    )


class FaultRecord(VtdStruct):
    """A fault recording register FRCD_REG[n], 128 bits at CAP.FRO*16 + n*16 (s11.4.7.6)."""

    NAME = "FRCD_REG"
    WIDTH = 128
    ALIASES: ClassVar[Mapping[str, str]] = {"T": "T1"}
    FIELDS = (
        BitField("FI", 12, 63, "Fault info: page address (bits 63:12) of the faulting request"),
        BitField("SID", 64, 79, "Source identifier (bus:dev.fn) of the faulting request"),
        BitField("T2", 92, 92, "Type bit 2: with T1, 00 write, 01 page request, 10 read, "
                 "11 AtomicOp"),
        BitField("PRIV", 93, 93, "Privilege mode requested"),
        BitField("EXE", 94, 94, "Execute permission requested"),
        BitField("PP", 95, 95, "PASID present"),
        BitField("FR", 96, 103, "Fault reason (s7.1.3)"),
        BitField("PV", 104, 123, "PASID value"),
        BitField("AT", 124, 125, "Address type of the request"),
        BitField("T1", 126, 126, "Type bit 1: 0 write (or page request), 1 read (or AtomicOp)"),
        BitField("F", 127, 127, "Fault: the record is valid (write 1 to clear)"),
    )


# --------------------------------------------------------------------------------------------
# Root and context tables (s9.1 - s9.4)
# --------------------------------------------------------------------------------------------


class RootEntry(VtdStruct):
    """Root entry (legacy mode), 128 bits, 256 per root table indexed by bus (s9.1)."""

    NAME = "RootEntry"
    WIDTH = 128
    FIELDS = (
        BitField("P", 0, 0, "Present"),
        BitField("CTP", 12, 63, "Context-table pointer (address bits 63:12)"),
    )


class ScalableRootEntry(VtdStruct):
    """Scalable-mode root entry, 128 bits: lower half for devfn 0-127, upper for 128-255 (s9.2)."""

    NAME = "ScalableRootEntry"
    WIDTH = 128
    FIELDS = (
        BitField("LP", 0, 0, "Lower present"),
        BitField("LCTP", 12, 63, "Lower context-table pointer (devfn 0-127, address bits 63:12)"),
        BitField("UP", 64, 64, "Upper present"),
        BitField("UCTP", 76, 127, "Upper context-table pointer (devfn 128-255, bits 63:12)"),
    )


class TranslationType(IntEnum):
    """Legacy context-entry TT field (s9.3)."""

    UNTRANSLATED = 0b00  # untranslated requests through second-stage tables
    ALL = 0b01  # also translation/translated requests (needs ECAP.DT)
    PASS_THROUGH = 0b10  # needs ECAP.PT
    RESERVED = 0b11


class ContextEntry(VtdStruct):
    """Context entry (legacy mode), 128 bits, 256 per context table indexed by devfn (s9.3)."""

    NAME = "ContextEntry"
    WIDTH = 128
    ALIASES: ClassVar[Mapping[str, str]] = {"SLPTPTR": "SSPTPTR"}
    FIELDS = (
        BitField("P", 0, 0, "Present"),
        BitField("FPD", 1, 1, "Fault processing disable"),
        BitField("TT", 2, 3, "Translation type (TranslationType)"),
        BitField("SSPTPTR", 12, 63, "Second-stage page-table pointer (address bits 63:12)"),
        BitField("AW", 64, 66, "Address width: 1=39-bit/3-level, 2=48/4, 3=57/5"),
        BitField("IGN_70_67", 67, 70, "Ignored"),
        BitField("DID", 72, 87, "Domain identifier"),
    )


class ScalableContextEntry(VtdStruct):
    """Scalable-mode context entry, 256 bits, 128 per table indexed by devfn[6:0] (s9.4)."""

    NAME = "ScalableContextEntry"
    WIDTH = 256
    FIELDS = (
        BitField("P", 0, 0, "Present"),
        BitField("FPD", 1, 1, "Fault processing disable"),
        BitField("DTE", 2, 2, "Device-TLB enable"),
        BitField("PASIDE", 3, 3, "PASID enable: requests-with-PASID allowed"),
        BitField("PRE", 4, 4, "Page request enable"),
        BitField("PDTS", 9, 11, "PASID directory size: 2^(PDTS+7) entries"),
        BitField("PASIDDIRPTR", 12, 63, "PASID directory pointer (address bits 63:12)"),
        BitField("RID_PASID", 64, 83, "PASID used for requests-without-PASID (needs ECAP.RPS)"),
        BitField("RID_PRIV", 84, 84, "Privilege for requests-without-PASID (needs ECAP.RPRIVS)"),
    )


# --------------------------------------------------------------------------------------------
# PASID structures (s9.5, s9.6)
# --------------------------------------------------------------------------------------------


class PasidDirEntry(VtdStruct):
    """Scalable-mode PASID directory entry, 64 bits, indexed by PASID[19:6] (s9.5)."""

    NAME = "PasidDirEntry"
    WIDTH = 64
    FIELDS = (
        BitField("P", 0, 0, "Present"),
        BitField("FPD", 1, 1, "Fault processing disable"),
        BitField("SMPTBLPTR", 12, 63, "Scalable-mode PASID table pointer (address bits 63:12)"),
    )


class Pgtt(IntEnum):
    """PASID-granular translation type, PASID-table entry bits 8:6 (s9.6)."""

    FIRST_STAGE = 0b001
    SECOND_STAGE = 0b010
    NESTED = 0b011
    PASS_THROUGH = 0b100


class PasidTableEntry(VtdStruct):
    """Scalable-mode PASID table entry, 512 bits, indexed by PASID[5:0] (s9.6).

    SSEE, ERE, EMT, PWT, PCD, NXE and SMEP are the 3.x/4.x execute and memory-type controls
    (reserved or ignored in 5.x); bits 511:192 are reserved in 4.x.
    """

    NAME = "PasidTableEntry"
    WIDTH = 512
    ALIASES: ClassVar[Mapping[str, str]] = {
        "SLEE": "SSEE", "SLADE": "SSADE", "SLPTPTR": "SSPTPTR", "FLPM": "FSPM",
        "FLPTPTR": "FSPTPTR"}
    FIELDS = (
        BitField("P", 0, 0, "Present"),
        BitField("FPD", 1, 1, "Fault processing disable"),
        BitField("AW", 2, 4, "Second-stage address width: 1=39/3-level, 2=48/4, 3=57/5"),
        BitField("SSEE", 5, 5, "Second-stage execute enable"),
        BitField("PGTT", 6, 8, "PASID-granular translation type (Pgtt)"),
        BitField("SSADE", 9, 9, "Second-stage accessed/dirty enable"),
        BitField("SSPTPTR", 12, 63, "Second-stage page-table pointer (address bits 63:12)"),
        BitField("DID", 64, 79, "Domain identifier"),
        BitField("PWSNP", 87, 87, "Page-walk snoop"),
        BitField("PGSNP", 88, 88, "Page snoop"),
        BitField("CD", 89, 89, "Cache disable"),
        BitField("EMTE", 90, 90, "Extended memory type enable"),
        BitField("EMT", 91, 93, "Extended memory type"),
        BitField("PWT", 94, 94, "Page-level write-through (first-stage root)"),
        BitField("PCD", 95, 95, "Page-level cache disable (first-stage root)"),
        BitField("PAT", 96, 127, "Page attribute table PA0-PA7"),
        BitField("SRE", 128, 128, "Supervisor request enable"),
        BitField("ERE", 129, 129, "Execute request enable"),
        BitField("FSPM", 130, 131, "First-stage paging mode: 0 4-level, 1 5-level"),
        BitField("WPE", 132, 132, "Write protect enable for supervisor requests"),
        BitField("NXE", 133, 133, "No-execute enable (XD honoured)"),
        BitField("SMEP", 134, 134, "Supervisor-mode execute prevention"),
        BitField("EAFE", 135, 135, "Extended accessed flag enable"),
        BitField("FSPTPTR", 140, 191, "First-stage page-table pointer (address bits 63:12)"),
    )


# --------------------------------------------------------------------------------------------
# Second-stage paging entries (s9.8; translation in s3.7; EPT-compatible)
# --------------------------------------------------------------------------------------------

_SS_LOW = (
    BitField("R", 0, 0, "Read"),
    BitField("W", 1, 1, "Write"),
    BitField("X", 2, 2, "Execute (honoured when SSEE=1)"),
)
_SS_HIGH = (
    BitField("IGN_61_52", 52, 61, "Ignored"),
    BitField("IGN_63", 63, 63, "Ignored"),
)
_SS_TABLE = (
    *_SS_LOW,
    BitField("IGN_6_3", 3, 6, "Ignored"),
    BitField("A", 8, 8, "Accessed (when SSADE=1)"),
    BitField("IGN_10_9", 9, 10, "Ignored"),
    BitField("ADDR", 12, 51, "Next table address (bits 51:12)"),
    *_SS_HIGH,
)
_SS_LEAF_LOW = (
    *_SS_LOW,
    BitField("EMT", 3, 5, "Extended memory type"),
    BitField("IPAT", 6, 6, "Ignore PAT"),
    BitField("A", 8, 8, "Accessed (when SSADE=1)"),
    BitField("D", 9, 9, "Dirty (when SSADE=1)"),
    BitField("IGN_10", 10, 10, "Ignored"),
    BitField("SNP", 11, 11, "Snoop (reserved without ECAP.SC)"),
)


class SsPml5e(VtdStruct):
    """SS-PML5E, references a second-stage PML4 table (s9.8). Bits 7, 11, 62 reserved."""

    NAME = "SS-PML5E"
    FIELDS = _SS_TABLE


class SsPml4e(VtdStruct):
    """SS-PML4E, references a second-stage page-directory-pointer table (s9.8)."""

    NAME = "SS-PML4E"
    FIELDS = _SS_TABLE


class SsPdpe(VtdStruct):
    """SS-PDPE with PS=0, references a second-stage page directory (s9.8)."""

    NAME = "SS-PDPE"
    FIELDS = (*_SS_TABLE, BitField("PS", 7, 7, "Page size: 0 here"))


class SsPdpe1G(VtdStruct):
    """SS-PDPE with PS=1, maps a 1 GiB page (s9.8). Bits 29:12 and 62 reserved."""

    NAME = "SS-PDPE(1G)"
    FIELDS = (*_SS_LEAF_LOW, BitField("PS", 7, 7, "Page size: 1 here"),
              BitField("ADDR", 30, 51, "1 GiB page frame (bits 51:30)"), *_SS_HIGH)


class SsPde(VtdStruct):
    """SS-PDE with PS=0, references a second-stage page table (s9.8)."""

    NAME = "SS-PDE"
    FIELDS = (*_SS_TABLE, BitField("PS", 7, 7, "Page size: 0 here"))


class SsPde2M(VtdStruct):
    """SS-PDE with PS=1, maps a 2 MiB page (s9.8). Bits 20:12 and 62 reserved."""

    NAME = "SS-PDE(2M)"
    FIELDS = (*_SS_LEAF_LOW, BitField("PS", 7, 7, "Page size: 1 here"),
              BitField("ADDR", 21, 51, "2 MiB page frame (bits 51:21)"), *_SS_HIGH)


class SsPte(VtdStruct):
    """SS-PTE, maps a 4 KiB page (s9.8). Bit 62 reserved."""

    NAME = "SS-PTE"
    FIELDS = (*_SS_LEAF_LOW, BitField("IGN_7", 7, 7, "Ignored"),
              BitField("ADDR", 12, 51, "4 KiB page frame (bits 51:12)"), *_SS_HIGH)


# --------------------------------------------------------------------------------------------
# First-stage paging entries (s9.7; translation in s3.6; IA-32e compatible)
# --------------------------------------------------------------------------------------------

_FS_LOW = (
    BitField("P", 0, 0, "Present"),
    BitField("RW", 1, 1, "Read/write"),
    BitField("US", 2, 2, "User/supervisor"),
)
_FS_HIGH = (
    BitField("IGN_62_52", 52, 62, "Ignored"),
    BitField("XD", 63, 63, "Execute disable (when NXE=1)"),
)
_FS_TABLE = (
    *_FS_LOW,
    BitField("IGN_3", 3, 3, "Ignored"),
    BitField("IGN_4", 4, 4, "Ignored"),
    BitField("A", 5, 5, "Accessed"),
    BitField("IGN_6", 6, 6, "Ignored"),
    BitField("IGN_9_8", 8, 9, "Ignored"),
    BitField("EA", 10, 10, "Extended accessed (when EAFE=1)"),
    BitField("IGN_11", 11, 11, "Ignored"),
    BitField("ADDR", 12, 51, "Next table address (bits 51:12)"),
    *_FS_HIGH,
)
_FS_LEAF_LOW = (
    *_FS_LOW,
    BitField("PWT", 3, 3, "Page-level write-through"),
    BitField("PCD", 4, 4, "Page-level cache disable"),
    BitField("A", 5, 5, "Accessed"),
    BitField("D", 6, 6, "Dirty"),
    BitField("G", 8, 8, "Global (ignored by VT-d)"),
    BitField("IGN_9", 9, 9, "Ignored"),
    BitField("EA", 10, 10, "Extended accessed (when EAFE=1)"),
    BitField("IGN_11", 11, 11, "Ignored"),
)


class FsPml5e(VtdStruct):
    """FS-PML5E, references a PML4 table (s9.7 table "PML5E"). Bit 7 reserved."""

    NAME = "FS-PML5E"
    FIELDS = _FS_TABLE


class FsPml4e(VtdStruct):
    """FS-PML4E, references a page-directory-pointer table (s9.7). Bit 7 reserved."""

    NAME = "FS-PML4E"
    FIELDS = _FS_TABLE


class FsPdpe(VtdStruct):
    """FS-PDPE with PS=0, references a page directory (s9.7)."""

    NAME = "FS-PDPE"
    FIELDS = (*_FS_TABLE, BitField("PS", 7, 7, "Page size: 0 here"))


class FsPdpe1G(VtdStruct):
    """FS-PDPE with PS=1, maps a 1 GiB page (s9.7; needs CAP.FS1GP). Bits 29:13 reserved."""

    NAME = "FS-PDPE(1G)"
    FIELDS = (*_FS_LEAF_LOW, BitField("PS", 7, 7, "Page size: 1 here"),
              BitField("PAT", 12, 12, "Page attribute"),
              BitField("ADDR", 30, 51, "1 GiB page frame (bits 51:30)"), *_FS_HIGH)


class FsPde(VtdStruct):
    """FS-PDE with PS=0, references a page table (s9.7)."""

    NAME = "FS-PDE"
    FIELDS = (*_FS_TABLE, BitField("PS", 7, 7, "Page size: 0 here"))


class FsPde2M(VtdStruct):
    """FS-PDE with PS=1, maps a 2 MiB page (s9.7). Bits 20:13 reserved."""

    NAME = "FS-PDE(2M)"
    FIELDS = (*_FS_LEAF_LOW, BitField("PS", 7, 7, "Page size: 1 here"),
              BitField("PAT", 12, 12, "Page attribute"),
              BitField("ADDR", 21, 51, "2 MiB page frame (bits 51:21)"), *_FS_HIGH)


class FsPte(VtdStruct):
    """FS-PTE, maps a 4 KiB page (s9.7)."""

    NAME = "FS-PTE"
    FIELDS = (*_FS_LEAF_LOW, BitField("PAT", 7, 7, "Page attribute"),
              BitField("ADDR", 12, 51, "4 KiB page frame (bits 51:12)"), *_FS_HIGH)


#: Paging-entry formats by level: (table entry, large-page leaf or None), level 5..1.
SS_FORMATS: Mapping[int, tuple[type[VtdStruct], type[VtdStruct] | None]] = {
    5: (SsPml5e, None), 4: (SsPml4e, None), 3: (SsPdpe, SsPdpe1G), 2: (SsPde, SsPde2M),
    1: (SsPte, None),
}
FS_FORMATS: Mapping[int, tuple[type[VtdStruct], type[VtdStruct] | None]] = {
    5: (FsPml5e, None), 4: (FsPml4e, None), 3: (FsPdpe, FsPdpe1G), 2: (FsPde, FsPde2M),
    1: (FsPte, None),
}

#: Every structure this module declares, for tests and dumps.
ALL_STRUCTS: tuple[type[VtdStruct], ...] = (
    RtaddrReg, GcmdReg, GstsReg, FstsReg, FaultRecord, RootEntry, ScalableRootEntry,
    ContextEntry, ScalableContextEntry, PasidDirEntry, PasidTableEntry,
    SsPml5e, SsPml4e, SsPdpe, SsPdpe1G, SsPde, SsPde2M, SsPte,
    FsPml5e, FsPml4e, FsPdpe, FsPdpe1G, FsPde, FsPde2M, FsPte,
)


def address_width_levels(aw: int) -> int | None:
    """Paging levels for a context/PASID-entry AW code (1->3, 2->4, 3->5), else None (s9.3)."""
    return {1: 3, 2: 4, 3: 5}.get(aw)


def agaw_bits(aw: int) -> int | None:
    """Adjusted guest address width in bits for an AW code (1->39, 2->48, 3->57) (s9.3)."""
    levels = address_width_levels(aw)
    return None if levels is None else 12 + 9 * levels
