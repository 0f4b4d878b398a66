"""Memory encryption through nested translation: AMD SME/SEV, Intel MKTME and TDX.

PURE. A policy tells the nested walk (:mod:`hvtools.mmu.nested`) two things:

- which physical-address bits name a key rather than a location (``guest_key_bits`` in guest
  page tables, ``host_key_bits`` in the second-stage tables): they are never reserved bits and
  are stripped from every table pointer and translated address;
- for each memory reference of the walk (a :class:`Reference`: a second-stage entry read, a guest
  entry read, or the data access itself) whether it is encrypted, with which key, and which
  stage's bit decided it (:meth:`EncryptionPolicy.classify`, a :class:`Classification` that also
  lists every stage's bit and what it did: :class:`StageBit`).

The seed's rule: the first (guest) table says whether the first VM's memory is encrypted, and the
second (nested) table says it for the second VM, i.e. for memory the guest leaves to the host.

**AMD SME/SEV** (:class:`SevPolicy`; AMD64 APM Vol. 2 s7.10 "Secure Memory Encryption" and s15.34
"Secure Encrypted Virtualization"). The C-bit position is CPUID Fn8000_001F EBX[5:0]
(:class:`Cpuid8000001FEbx`). Rules implemented:

1. host tables (SME, s7.10): the C-bit in nCR3 says whether the top nested table is encrypted
   with the host key, and the C-bit of each nested entry says it for the table or page it points
   to; the C-bit is not an address bit (stripped);
2. SEV guest, data (s15.34.5 "SEV Encryption Behavior", s15.34.6 "Page Table Support"): the
   guest's C-bit in its leaf picks private (guest key, selected by the ASID) or shared; the
   C-bit is dropped from the GPA before the nested walk. For a private access the nested C-bit
   is ignored; for a shared access the nested leaf's C-bit picks the host key or no encryption;
3. SEV guest, forced private (s15.34.5): instruction fetches and guest page-table accesses are
   always private (guest key), whatever the guest's C-bits say;
4. a guest without SEV: its C-bit position is an ordinary GPA bit (it is not stripped: KVM
   commit "KVM: SVM: Revert clearing of C-bit on GPA in #NPF handler", quoting the APM); only
   the nested C-bits decide (host key or none).

**Intel MKTME** (:class:`MktmePolicy`; Intel Architecture Memory Encryption Technologies
Specification, "Multi-Key Total Memory Encryption"): the KeyID is the top ``keyid_bits`` bits of
the physical address below MAXPHYADDR (IA32_TME_ACTIVATE.MK_TME_KEYID_BITS). Under EPT every
reference uses the KeyID of the host-physical address it goes to: the EPTP / parent EPT entry for
EPT table reads, the EPT leaf for guest table reads and data. KeyID 0 is the platform TME key
(``tme=True``) or plaintext. Guest tables carry no KeyID (GPA bits are translated, not keys).

**Intel TDX** (:class:`TdxPolicy`; Intel TDX Module Base Architecture Specification, "GPA space:
private and shared"): the shared bit is GPA bit 47 (GPAW 48) or 51 (GPAW 52), set by the TD in
its own page tables. Shared bit 0: private, through the Secure EPT, encrypted with the TD's
private KeyID whatever the Secure-EPT leaf's KeyID bits hold (decided by the guest); shared
bit 1: through the shared EPT, with the KeyID of the shared EPT leaf (decided by the VMM's EPT).
Secure-EPT tables are private to the TD; shared-EPT tables use the KeyID of their pointer. A TD's
page-table walks and instruction fetches must use private GPAs: a shared one is refused with a
#PF whose error code has RSVD set (:meth:`EncryptionPolicy.guest_refusal`). That last rule is
this model's reading of the TDX specification, not checked against its text here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum

from hvtools.bits import BitField, BitStruct
from hvtools.errors import UsageError
from hvtools.translation import Encryption, Stage


class Cpuid8000001FEbx(BitStruct):
    """CPUID Fn8000_001F EBX, AMD64 APM Vol. 3 Appendix E; Vol. 2 s7.10 and s15.34.1."""

    WIDTH = 32
    FIELDS = (
        BitField("CBIT", 0, 5, "Position of the C-bit in a page-table entry"),
        BitField("PHYS_ADDR_REDUCTION", 6, 11, "Reduction of the physical-address width in bits "
                                               "when memory encryption is enabled"),
        BitField("NUM_VMPL", 12, 15, "Number of VM permission levels (SEV-SNP)"),
    )


class Role(StrEnum):
    """What a memory reference of a nested walk is."""

    SECOND_TABLE = "second-stage-table"  # an EPT/NPT entry read
    GUEST_TABLE = "guest-table"  # a guest paging-structure entry read (or its A/D update)
    DATA = "data"  # the access itself, at the final host-physical address


@dataclass(frozen=True)
class Reference:
    """One memory reference, described by the raw values that located it.

    ``gpa`` is the guest-physical address being translated (for a second-stage table read, the
    GPA whose translation reads it; key bits already stripped). ``host_pointer`` is the raw
    second-stage value whose address field gives the reference's HPA: the EPTP / nCR3 or the
    parent entry for a second-stage table read, the second-stage leaf otherwise.
    ``guest_pointer`` is the raw guest value that located it: the guest CR3 or parent entry for a
    guest table read, the guest leaf for data; None for second-stage table reads.
    """

    role: Role
    second_stage: Stage
    gpa: int
    host_pointer: int
    guest_pointer: int | None = None
    fetch: bool = False


@dataclass(frozen=True)
class StageBit:
    """What one stage's bit said about a reference: ``name`` is the architected bit ("C-bit",
    "KeyID", "shared bit"), ``value`` its value, ``effect`` what it did ("guest key", "host
    key", "plaintext", "ignored: ...", "forced private", ...)."""

    stage: Stage
    name: str
    value: int
    effect: str


@dataclass(frozen=True)
class Classification:
    """The outcome for one reference and every stage's contribution, guest first."""

    encryption: Encryption
    stages: tuple[StageBit, ...] = ()


NOT_ENCRYPTED = Classification(Encryption())


def _bit(value: int | None, position: int) -> int:
    return 0 if value is None else (value >> position) & 1


class EncryptionPolicy(ABC):
    """How a platform encrypts memory; see the module docstring for each implementation."""

    @property
    def guest_key_bits(self) -> int:
        """Bits of guest-physical pointers (guest CR3 and entries) that are keys, not address."""
        return 0

    @property
    def host_key_bits(self) -> int:
        """Bits of host-physical pointers (EPTP / nCR3, second-stage entries) that are keys."""
        return 0

    @abstractmethod
    def classify(self, ref: Reference) -> Classification:
        """Whether ``ref`` is encrypted, with which key, and which stage's bit decided it."""

    def guest_refusal(self, ref: Reference) -> str | None:
        """A reason the guest may not make ``ref`` at all (reported as a guest #PF with RSVD),
        or None. Only guest-table and data references are asked."""
        return None


class NoEncryption(EncryptionPolicy):
    """Nothing is encrypted and no address bit is a key: the plain nested walk."""

    def classify(self, ref: Reference) -> Classification:
        return NOT_ENCRYPTED


@dataclass(frozen=True)
class SevPolicy(EncryptionPolicy):
    """AMD SME (host) and SEV (guest) with the C-bit at ``c_bit`` (rules in the module doc).

    ``sev`` is VMCB offset 090h bit 1 (SEV enable) for the guest; ``sme`` is the host's
    SYSCFG.MemEncryptionModEn (the C-bit of host tables is the encryption bit). The guest key is
    reported as ``key_id=asid``, the host (SME) key as ``key_id=0``.
    """

    c_bit: int
    sev: bool = True
    sme: bool = True
    asid: int = 1

    def __post_init__(self) -> None:
        if not 12 <= self.c_bit <= 63:
            raise UsageError(f"C-bit position {self.c_bit} is not in 12..63")
        if self.asid < 1:
            raise UsageError(f"an SEV ASID starts at 1, not {self.asid}")

    @classmethod
    def from_cpuid(cls, ebx: int, *, sev: bool = True, sme: bool = True,
                   asid: int = 1) -> SevPolicy:
        """The policy for a processor whose CPUID Fn8000_001F returns ``ebx``."""
        return cls(c_bit=Cpuid8000001FEbx.decode(ebx & 0xFFFF_FFFF)["CBIT"], sev=sev, sme=sme,
                   asid=asid)

    @property
    def guest_key_bits(self) -> int:
        return 1 << self.c_bit if self.sev else 0

    @property
    def host_key_bits(self) -> int:
        return 1 << self.c_bit if self.sme else 0

    def _host(self, ref: Reference, why: str) -> Classification:
        c = _bit(ref.host_pointer, self.c_bit) if self.sme else 0
        effect = "host key" if c else "plaintext"
        enc = Encryption(encrypted=bool(c), key_id=0 if c else None, decided_by=ref.second_stage,
                         detail=f"{why}: nested C-bit={c}: {effect}")
        return Classification(enc, (StageBit(ref.second_stage, "C-bit", c, effect),))

    def classify(self, ref: Reference) -> Classification:
        if ref.role is Role.SECOND_TABLE:
            return self._host(ref, "nested table (SME)")
        gc = _bit(ref.guest_pointer, self.c_bit)
        hc = _bit(ref.host_pointer, self.c_bit) if self.sme else 0
        if not self.sev:
            host = self._host(ref, "guest without SEV (its C-bit position is an address bit)")
            return Classification(host.encryption, (
                StageBit(Stage.GUEST, "C-bit", gc, "ignored: an address bit without SEV"),
                *host.stages))
        forced = ("guest page-table access" if ref.role is Role.GUEST_TABLE
                  else "instruction fetch" if ref.fetch else None)
        if forced is not None or gc:
            why = f"SEV {forced}: always private" if forced else "SEV guest C-bit=1: private"
            enc = Encryption(encrypted=True, key_id=self.asid, decided_by=Stage.GUEST,
                             detail=f"{why}: guest key (ASID {self.asid}); "
                                    f"nested C-bit={hc} ignored")
            return Classification(enc, (
                StageBit(Stage.GUEST, "C-bit", gc, "forced private: guest key" if forced
                         else "guest key"),
                StageBit(ref.second_stage, "C-bit", hc, "ignored: private access")))
        host = self._host(ref, "SEV guest C-bit=0: shared")
        return Classification(host.encryption, (
            StageBit(Stage.GUEST, "C-bit", 0, "shared: the nested table decides"),
            *host.stages))


def _keyid_mask(maxphyaddr: int, keyid_bits: int) -> tuple[int, int]:
    if not 32 <= maxphyaddr <= 52:
        raise UsageError(f"MAXPHYADDR {maxphyaddr} is not in 32..52")
    if not 0 <= keyid_bits <= 15 or maxphyaddr - keyid_bits < 32:
        raise UsageError(f"{keyid_bits} KeyID bits do not fit below MAXPHYADDR {maxphyaddr}")
    shift = maxphyaddr - keyid_bits
    return ((1 << keyid_bits) - 1) << shift, shift


@dataclass(frozen=True)
class MktmePolicy(EncryptionPolicy):
    """Intel MKTME: the KeyID is bits MAXPHYADDR-1 : MAXPHYADDR-``keyid_bits`` of each HPA.

    ``tme`` says KeyID 0 uses the platform TME key (TME enabled, not bypassed); else it is
    plaintext.
    """

    maxphyaddr: int
    keyid_bits: int
    tme: bool = True

    def __post_init__(self) -> None:
        _keyid_mask(self.maxphyaddr, self.keyid_bits)

    @property
    def host_key_bits(self) -> int:
        return _keyid_mask(self.maxphyaddr, self.keyid_bits)[0]

    def keyid(self, pointer: int) -> int:
        """The KeyID held by a physical address (or an entry's address field)."""
        mask, shift = _keyid_mask(self.maxphyaddr, self.keyid_bits)
        return (pointer & mask) >> shift

    def _by_keyid(self, kid: int, stage: Stage, why: str) -> Classification:
        encrypted = kid != 0 or self.tme
        effect = f"KeyID {kid}" if kid else ("KeyID 0 (TME key)" if self.tme else "plaintext")
        enc = Encryption(encrypted=encrypted, key_id=kid, decided_by=stage,
                         detail=f"{why}: {effect}")
        return Classification(enc, (StageBit(stage, "KeyID", kid, effect),))

    def classify(self, ref: Reference) -> Classification:
        kid = self.keyid(ref.host_pointer)
        if ref.role is Role.SECOND_TABLE:
            return self._by_keyid(kid, ref.second_stage, "second-stage table")
        got = self._by_keyid(kid, ref.second_stage, "the second-stage leaf's HPA")
        return Classification(got.encryption, (
            StageBit(Stage.GUEST, "KeyID", 0, "none: guest-physical bits are translated"),
            *got.stages))


@dataclass(frozen=True)
class TdxPolicy(EncryptionPolicy):
    """Intel TDX: the shared bit is GPA bit ``gpaw - 1``; ``private_keyid`` is the TD's HKID.

    KeyIDs are the top ``keyid_bits`` bits below ``maxphyaddr`` of host-physical addresses, as
    for MKTME; ``tme`` is as in :class:`MktmePolicy` (for shared KeyID 0).
    """

    gpaw: int
    maxphyaddr: int
    keyid_bits: int
    private_keyid: int
    tme: bool = True
    refuse_shared_walks: bool = True

    def __post_init__(self) -> None:
        if self.gpaw not in (48, 52):
            raise UsageError(f"TDX GPAW {self.gpaw} is not 48 or 52")
        _keyid_mask(self.maxphyaddr, self.keyid_bits)
        if not 0 < self.private_keyid < (1 << self.keyid_bits):
            raise UsageError(f"private KeyID {self.private_keyid} does not fit "
                             f"{self.keyid_bits} KeyID bits (and must not be 0)")

    @property
    def shared_bit(self) -> int:
        return self.gpaw - 1

    def is_shared(self, gpa: int) -> bool:
        return bool(_bit(gpa, self.shared_bit))

    @property
    def host_key_bits(self) -> int:
        return _keyid_mask(self.maxphyaddr, self.keyid_bits)[0]

    def keyid(self, pointer: int) -> int:
        mask, shift = _keyid_mask(self.maxphyaddr, self.keyid_bits)
        return (pointer & mask) >> shift

    def _private(self, stage: Stage, why: str, host_kid: int, second: Stage) -> Classification:
        enc = Encryption(encrypted=True, key_id=self.private_keyid, shared=False,
                         decided_by=stage, detail=f"{why}: TD private KeyID "
                                                  f"{self.private_keyid}")
        return Classification(enc, (
            StageBit(second, "KeyID", host_kid, "ignored: Secure EPT, TD private KeyID"),))

    def classify(self, ref: Reference) -> Classification:
        shared = self.is_shared(ref.gpa)
        kid = self.keyid(ref.host_pointer)
        if ref.role is Role.SECOND_TABLE and not shared:
            return self._private(ref.second_stage, "Secure EPT table", kid, ref.second_stage)
        guest_bit = StageBit(Stage.GUEST, "shared bit", int(shared),
                             "shared: the shared EPT decides" if shared
                             else "private: TD private KeyID")
        if not shared:
            got = self._private(Stage.GUEST, "private GPA (shared bit 0)", kid,
                                ref.second_stage)
            return Classification(got.encryption, (guest_bit, *got.stages))
        encrypted = kid != 0 or self.tme
        effect = f"KeyID {kid}" if kid else ("KeyID 0 (TME key)" if self.tme else "plaintext")
        what = "shared EPT table" if ref.role is Role.SECOND_TABLE else "shared GPA"
        enc = Encryption(encrypted=encrypted, key_id=kid, shared=True,
                         decided_by=ref.second_stage, detail=f"{what}: {effect}")
        stage_bit = StageBit(ref.second_stage, "KeyID", kid, effect)
        if ref.role is Role.SECOND_TABLE:
            return Classification(enc, (stage_bit,))
        return Classification(enc, (guest_bit, stage_bit))

    def guest_refusal(self, ref: Reference) -> str | None:
        if not self.refuse_shared_walks or not self.is_shared(ref.gpa):
            return None
        if ref.role is Role.GUEST_TABLE:
            return "tdx-shared-paging-structure"
        if ref.role is Role.DATA and ref.fetch:
            return "tdx-shared-fetch"
        return None
