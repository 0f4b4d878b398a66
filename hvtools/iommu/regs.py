"""VT-d capability registers, decoded field by field.

Intel Virtualization Technology for Directed I/O, Architecture Specification rev. 4.x:
section 11.4.2 (Capability Register, CAP_REG at offset 0x08) and section 11.4.3 (Extended
Capability Register, ECAP_REG at offset 0x10).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hvtools.bits import BitField, BitStruct

#: MMIO offsets of the registers in the remapping unit's register page (VT-d 4.x s10.4).
CAP_REG_OFFSET = 0x08
ECAP_REG_OFFSET = 0x10
#: Where QEMU's q35 maps intel-iommu's registers (Q35_HOST_BRIDGE_IOMMU_ADDR).
Q35_DMAR_BASE = 0xFED90000


class CapReg(BitStruct):
    """CAP_REG, VT-d 4.x s11.4.2."""

    WIDTH = 64
    FIELDS = (
        BitField("ND", 0, 2, "Number of domains supported: 2^(4+2*ND)"),
        BitField("AFL", 3, 3, "Advanced fault logging"),
        BitField("RWBF", 4, 4, "Required write-buffer flushing"),
        BitField("PLMR", 5, 5, "Protected low-memory region"),
        BitField("PHMR", 6, 6, "Protected high-memory region"),
        BitField("CM", 7, 7, "Caching mode: not-present entries may be cached"),
        BitField("SAGAW", 8, 12, "Supported adjusted guest address widths "
                 "(bit1=39b/3-level, bit2=48b/4-level, bit3=57b/5-level)"),
        BitField("MGAW", 16, 21, "Maximum guest address width, minus one"),
        BitField("ZLR", 22, 22, "Zero-length read"),
        BitField("DEP", 23, 23, "Deprecated (formerly ISOCH)"),
        BitField("FRO", 24, 33, "Fault-recording register offset, in 16-byte units"),
        BitField("SLLPS", 34, 37, "Second-level large page sizes (bit0=2M, bit1=1G)"),
        BitField("PSI", 39, 39, "Page-selective invalidation"),
        BitField("NFR", 40, 47, "Number of fault-recording registers, minus one"),
        BitField("MAMV", 48, 53, "Maximum address mask value"),
        BitField("DWD", 54, 54, "Write draining"),
        BitField("DRD", 55, 55, "Read draining"),
        BitField("FS1GP", 56, 56, "First-stage 1-GByte page support"),
        BitField("PI", 59, 59, "Posted interrupts"),
        BitField("FS5LP", 60, 60, "First-stage 5-level paging"),
        BitField("ESIRTPS", 62, 62, "Enhanced set interrupt root table pointer support"),
        BitField("ESRTPS", 63, 63, "Enhanced set root table pointer support"),
    )


class EcapReg(BitStruct):
    """ECAP_REG, VT-d 4.x s11.4.3."""

    WIDTH = 64
    FIELDS = (
        BitField("C", 0, 0, "Page-walk coherency"),
        BitField("QI", 1, 1, "Queued invalidation"),
        BitField("DT", 2, 2, "Device-TLB (ATS)"),
        BitField("IR", 3, 3, "Interrupt remapping"),
        BitField("EIM", 4, 4, "Extended interrupt mode (x2APIC)"),
        BitField("PT", 6, 6, "Pass-through"),
        BitField("SC", 7, 7, "Snoop control"),
        BitField("IRO", 8, 17, "IOTLB register offset, in 16-byte units"),
        BitField("MHMV", 20, 23, "Maximum handle mask value"),
        BitField("MTS", 25, 25, "Memory type support"),
        BitField("NEST", 26, 26, "Nested translation"),
        BitField("PRS", 29, 29, "Page request support"),
        BitField("ERS", 30, 30, "Execute request support"),
        BitField("SRS", 31, 31, "Supervisor request support"),
        BitField("NWFS", 33, 33, "No write flag support"),
        BitField("EAFS", 34, 34, "Extended accessed flag support"),
        BitField("PSS", 35, 39, "PASID size supported: PASIDs are PSS+1 bits wide"),
        BitField("PASID", 40, 40, "Process address space ID support"),
        BitField("DIT", 41, 41, "Device-TLB invalidation throttle"),
        BitField("PDS", 42, 42, "Page-request drain support"),
        BitField("SMTS", 43, 43, "Scalable-mode translation support"),
        BitField("VCS", 44, 44, "Virtual command support"),
        BitField("SSADS", 45, 45, "Second-stage accessed/dirty support"),
        BitField("SSTS", 46, 46, "Second-stage translation support"),
        BitField("FSTS", 47, 47, "First-stage translation support"),
        BitField("SMPWCS", 48, 48, "Scalable-mode page-walk coherency support"),
        BitField("RPS", 49, 49, "RID_PASID support"),
        BitField("PMS", 51, 51, "Performance monitoring support"),
        BitField("ADMS", 52, 52, "Abort DMA mode support"),
        BitField("RPRIVS", 53, 53, "RID_PRIV support"),
    )


#: Names the Linux driver and older spec revisions use, mapped to VT-d 4.x names.
ALIASES = {"FLTS": "FSTS", "SLTS": "SSTS", "SLADS": "SSADS", "FL1GP": "FS1GP",
           "FL5LP": "FS5LP"}


@dataclass(frozen=True)
class IommuCaps:
    """A remapping unit's CAP/ECAP pair with derived, human-sized facts."""

    cap: int
    ecap: int

    @property
    def cap_fields(self) -> dict[str, int]:
        return CapReg.decode(self.cap)

    @property
    def ecap_fields(self) -> dict[str, int]:
        return EcapReg.decode(self.ecap)

    def get(self, name: str) -> int:
        """A field by its 4.x name or its older/Linux alias (``FLTS`` = ``FSTS``)."""
        name = ALIASES.get(name, name)
        for reg, value in ((CapReg, self.cap), (EcapReg, self.ecap)):
            try:
                return reg.field(name).get(value)
            except KeyError:
                continue
        raise KeyError(f"no CAP/ECAP field {name!r}")

    @property
    def address_widths(self) -> list[int]:
        """Guest address widths from SAGAW: bit1=39, bit2=48, bit3=57 (s11.4.2)."""
        sagaw = self.get("SAGAW")
        return [w for bit, w in ((1, 39), (2, 48), (3, 57)) if sagaw >> bit & 1]

    @property
    def pasid_bits(self) -> int:
        """PASID width in bits (PSS+1), or 0 without PASID support."""
        return self.get("PSS") + 1 if self.get("PASID") else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "cap": f"{self.cap:#018x}", "ecap": f"{self.ecap:#018x}",
            "CAP": self.cap_fields, "ECAP": self.ecap_fields,
            "derived": {
                "domains": 1 << (4 + 2 * self.get("ND")),
                "mgaw_bits": self.get("MGAW") + 1,
                "address_widths": self.address_widths,
                "pasid_bits": self.pasid_bits,
                "fault_recording_regs": self.get("NFR") + 1,
            },
        }


_DMAR_LINE = re.compile(
    r"(?P<unit>dmar\d+): reg_base_addr (?P<base>[0-9a-f]+) ver (?P<ver>\d+:\d+) "
    r"cap (?P<cap>[0-9a-f]+) ecap (?P<ecap>[0-9a-f]+)")


def parse_kernel_dmar_line(text: str) -> dict[str, IommuCaps]:
    """Find Linux's ``dmarN: reg_base_addr … cap … ecap …`` lines (drivers/iommu/intel/dmar.c)."""
    return {m.group("unit"): IommuCaps(int(m.group("cap"), 16), int(m.group("ecap"), 16))
            for m in _DMAR_LINE.finditer(text)}


_XP_WORD = re.compile(r"^[0-9a-f]+:\s+((?:0x[0-9a-f]+\s*)+)$", re.IGNORECASE | re.MULTILINE)


def parse_xp_quadwords(text: str) -> list[int]:
    """Parse the monitor's ``xp /Ngx ADDR`` output into N 64-bit words."""
    words: list[int] = []
    for m in _XP_WORD.finditer(text):
        words += [int(w, 16) for w in m.group(1).split()]
    return words
