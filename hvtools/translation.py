"""Outcomes of address translation, shared by every walker (x86 paging, EPT/NPT, VT-d).

Hardware outcomes are values: a walk returns :class:`Translation` or :class:`Fault`, never
raises for anything the architecture defines. Exceptions are for misuse only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Stage(StrEnum):
    """Which translation structure a step or a fault belongs to."""

    GUEST = "guest"  # x86 paging of the (innermost) guest: GVA -> GPA
    EPT = "ept"  # Intel EPT: GPA -> HPA
    NPT = "npt"  # AMD nested page tables: GPA -> HPA
    SHADOW = "shadow"  # a shadow table maintained by a hypervisor
    VTD_ROOT = "vtd-root"  # VT-d root/context/PASID structures
    VTD_FIRST = "vtd-first"  # VT-d first-stage (first-level) tables
    VTD_SECOND = "vtd-second"  # VT-d second-stage (second-level) tables


@dataclass(frozen=True)
class WalkStep:
    """One memory reference made by a walk: which structure, where, and what it held."""

    stage: Stage
    level: int  # 5..1 for paging levels (PML5E=5 .. PTE=1); 0 for non-paging structures
    table: str  # the structure's spec name, e.g. "PML4E", "EPT PDPTE", "PasidTableEntry"
    address: int  # physical address the entry was read from (in the stage's output space)
    entry: int  # the raw entry value read (after any A/D update is NOT applied)
    write_back: int | None = None  # the value written back when the walk set A/D bits


@dataclass(frozen=True)
class Permissions:
    """Effective access rights of a translation (the AND/OR across levels per the spec)."""

    read: bool = True
    write: bool = False
    execute: bool = False
    user: bool = False
    execute_user: bool | None = None  # EPT mode-based execute control: user-mode execute
    protection_key: int | None = None


@dataclass(frozen=True)
class Encryption:
    """Memory-encryption state of an access, as decided by the entry bits along the walk."""

    encrypted: bool = False
    key_id: int | None = None  # MKTME/TDX KeyID, or None
    shared: bool | None = None  # TDX shared bit (None when not applicable)
    decided_by: Stage | None = None  # which stage's bit decided the outcome
    detail: str = ""


@dataclass(frozen=True)
class Translation:
    """A successful walk: ``output`` is the translated address of ``input``."""

    input: int
    output: int
    page_size: int
    permissions: Permissions
    steps: tuple[WalkStep, ...] = ()
    encryption: Encryption = field(default_factory=Encryption)

    @property
    def ok(self) -> bool:
        return True


@dataclass(frozen=True)
class Fault:
    """A walk the architecture refuses: where it stopped and the architected reason.

    ``code`` is the architected value: the #PF error code (SDM Vol. 3A s4.7), the EPT-violation
    exit qualification (SDM Vol. 3C s28.3.3.2 / table 28-7), an NPT #NPF EXITINFO1, or a VT-d
    fault reason (VT-d 4.x Appendix A). ``kind`` names which of those it is.
    """

    input: int
    kind: str  # "page-fault" | "ept-violation" | "ept-misconfig" | "npf" | "vtd"
    reason: str  # short name, e.g. "not-present", "reserved-bit", "SM: PASID entry not present"
    code: int
    level: int
    stage: Stage
    address: int | None = None  # the faulting address in its own space (e.g. the GPA for EPT)
    steps: tuple[WalkStep, ...] = ()

    @property
    def ok(self) -> bool:
        return False


Outcome = Translation | Fault
