"""VT-d structures and registers, bit for bit (VT-d 4.x ch. 9, s11.4)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvtools.bits import BitField
from hvtools.iommu import structures as s
from hvtools.iommu.structures import ALL_STRUCTS, VtdStruct


def _names(struct: type[VtdStruct]) -> str:
    return struct.__name__


@pytest.mark.parametrize("struct", ALL_STRUCTS, ids=_names)
def test_every_field_round_trips_alone(struct: type[VtdStruct]) -> None:
    """Each declared field decodes exactly the bits it encodes; no two fields overlap."""
    seen = 0
    assert struct.FIELDS, f"{struct.__name__} declares no field"
    for f in struct.FIELDS:
        assert f.hi < struct.WIDTH, f"{f.name} lies outside {struct.WIDTH} bits"
        assert seen & f.mask == 0, f"{f.name} overlaps another field"
        seen |= f.mask
        ones = (1 << f.width) - 1
        value = struct.encode({f.name: ones})
        assert value == f.mask
        decoded = struct.decode(value)
        assert decoded[f.name] == ones
        assert all(v == 0 for k, v in decoded.items() if k != f.name)
        assert struct.from_bytes(struct.to_bytes(value)) == value


@pytest.mark.parametrize("struct", ALL_STRUCTS, ids=_names)
@settings(deadline=None)
@given(data=st.data())
def test_decode_encode_identity(struct: type[VtdStruct], data: st.DataObject) -> None:
    """Random values: encode(decode(v)) keeps every declared bit and only those."""
    value = data.draw(st.integers(0, (1 << struct.WIDTH) - 1))
    assert struct.encode(struct.decode(value)) == value & ~struct.reserved_mask()
    assert struct.from_bytes(struct.to_bytes(value)) == value
    assert len(struct.to_bytes(value)) == struct.size()


@pytest.mark.parametrize("struct", ALL_STRUCTS, ids=_names)
@settings(deadline=None)
@given(data=st.data())
def test_encode_decode_identity(struct: type[VtdStruct], data: st.DataObject) -> None:
    """Random field values: decode(encode(fields)) gives every field back."""
    fields = {f.name: data.draw(st.integers(0, (1 << f.width) - 1), label=f.name)
              for f in struct.FIELDS}
    assert struct.decode(struct.encode(fields)) == fields


def test_every_structure_is_covered() -> None:
    """The parametrized tests above run over ALL_STRUCTS: every VtdStruct is in it."""
    declared = {obj for obj in vars(s).values()
                if isinstance(obj, type) and issubclass(obj, VtdStruct) and obj.FIELDS}
    assert declared == set(ALL_STRUCTS)


@pytest.mark.parametrize(("struct", "width"), [
    (s.RootEntry, 128), (s.ScalableRootEntry, 128), (s.ContextEntry, 128),
    (s.ScalableContextEntry, 256), (s.PasidDirEntry, 64), (s.PasidTableEntry, 512),
    (s.SsPte, 64), (s.FsPte, 64), (s.RtaddrReg, 64), (s.FaultRecord, 128),
])
def test_sizes(struct: type[VtdStruct], width: int) -> None:
    assert (struct.WIDTH, struct.size()) == (width, width // 8)


def test_hand_worked_linux_dump() -> None:
    """Entries a Linux 6.x host printed for a real scalable-mode unit (dmar fault dump):
    SM root hi 0x102448001 lo 0x101b3e001, context lo 0x101b4d401, PASID entry 0x109."""
    root = 0x0000000102448001 << 64 | 0x0000000101B3E001
    assert s.ScalableRootEntry.decode(root) == {
        "LP": 1, "LCTP": 0x101B3E, "UP": 1, "UCTP": 0x102448}
    ctx = s.ScalableContextEntry.decode(0x101B4D401)
    assert ctx["P"] == 1 and ctx["PDTS"] == 2 and ctx["PASIDDIRPTR"] == 0x101B4D
    assert ctx["PASIDE"] == 0 and ctx["RID_PASID"] == 0
    pe = s.PasidTableEntry.decode(0x109)
    assert pe["P"] == 1 and pe["AW"] == 2 and pe["PGTT"] == s.Pgtt.PASS_THROUGH


def test_reserved_masks_match_qemu_constants() -> None:
    """Reserved bits agree with QEMU 10.0.2's masks (hw/i386/intel_iommu_internal.h), which
    encode the same spec tables: root 0xffe, legacy context lo 0xff0 / hi
    0xffffffffff000080, SM context val0 0x1e0 / val1 0xffffffffffe00000 / val2, val3 all."""
    low = (1 << 64) - 1
    assert s.RootEntry.reserved_mask() & low == 0xFFE
    assert s.RootEntry.reserved_mask() >> 64 == low
    assert s.ContextEntry.reserved_mask() & low == 0xFF0
    assert s.ContextEntry.reserved_mask() >> 64 == 0xFFFFFFFFFF000080
    sm = s.ScalableContextEntry.reserved_mask()
    assert sm & low == 0x1E0
    assert sm >> 64 & low == 0xFFFFFFFFFFE00000
    assert sm >> 128 == (1 << 128) - 1
    assert s.PasidDirEntry.reserved_mask() == 0xFFC
    # Second-stage: bit 62 always; bits 7 and 11 in SS-PML4E; 20:12 in a 2M leaf; 29:12 1G.
    assert s.SsPml4e.reserved_mask() == (1 << 62) | (1 << 11) | (1 << 7) | 0
    assert s.SsPte.reserved_mask() == 1 << 62
    assert s.SsPde2M.reserved_mask() == (1 << 62) | 0x1FF000
    assert s.SsPdpe1G.reserved_mask() == (1 << 62) | 0x3FFFF000
    # First-stage: bit 7 in PML4E/PML5E, 20:13 in a 2M leaf, 29:13 in a 1G leaf.
    assert s.FsPml4e.reserved_mask() == 1 << 7
    assert s.FsPte.reserved_mask() == 0
    assert s.FsPde2M.reserved_mask() == 0x1FE000
    assert s.FsPdpe1G.reserved_mask() == 0x3FFFE000


def test_pasid_entry_layout() -> None:
    """s9.6 positions of the fields the walker relies on."""
    pe = s.PasidTableEntry
    expect = {"P": (0, 0), "FPD": (1, 1), "AW": (2, 4), "SSEE": (5, 5), "PGTT": (6, 8),
              "SSADE": (9, 9), "SSPTPTR": (12, 63), "DID": (64, 79), "PWSNP": (87, 87),
              "PGSNP": (88, 88), "PAT": (96, 127), "SRE": (128, 128), "ERE": (129, 129),
              "FSPM": (130, 131), "WPE": (132, 132), "EAFE": (135, 135),
              "FSPTPTR": (140, 191)}
    for name, (lo, hi) in expect.items():
        f = pe.field(name)
        assert (f.lo, f.hi) == (lo, hi), name
    reserved = pe.reserved_mask()
    for bit in (10, 11, *range(80, 87), *range(136, 140), *range(192, 512)):
        assert reserved >> bit & 1, bit


def test_aliases() -> None:
    """3.x / Linux / QEMU names resolve to the 4.x fields."""
    pe = s.PasidTableEntry
    assert pe.field("SLPTPTR") is pe.field("SSPTPTR")
    assert pe.field("FLPTPTR") is pe.field("FSPTPTR")
    assert pe.field("FLPM") is pe.field("FSPM")
    assert pe.field("SLADE") is pe.field("SSADE")
    assert pe.field("SLEE") is pe.field("SSEE")
    assert pe.encode({"FLPTPTR": 0x1234}) == 0x1234 << 140
    assert s.ContextEntry.get(s.ContextEntry.encode({"SLPTPTR": 5}), "SSPTPTR") == 5
    assert s.FaultRecord.field("T") is s.FaultRecord.field("T1")
    with pytest.raises(KeyError):
        pe.field("NOPE")


def test_rtaddr() -> None:
    v = s.RtaddrReg.value(0x123000, s.Ttm.SCALABLE)
    assert v == 0x123400
    assert s.RtaddrReg.decode(v) == {"TTM": 1, "RTA": 0x123}
    assert s.RtaddrReg.reserved_mask() == 0x3FF
    with pytest.raises(ValueError):
        s.RtaddrReg.value(0x123400)


def test_fault_record_layout() -> None:
    """FRCD_REG (s11.4.7.6): F 127, T1 126, PV 123:104, FR 103:96, PP 95, SID 79:64."""
    rec = s.FaultRecord.encode({"F": 1, "T1": 1, "FR": 0x59, "PP": 1, "PV": 5, "SID": 0x18,
                                "FI": 0x1234})
    assert rec >> 127 == 1 and rec >> 126 & 1 == 1
    assert rec >> 96 & 0xFF == 0x59 and rec >> 95 & 1 == 1
    assert rec >> 104 & 0xFFFFF == 5 and rec >> 64 & 0xFFFF == 0x18
    assert rec & ((1 << 64) - 1) == 0x1234000


def test_registers() -> None:
    assert s.GcmdReg.encode({"TE": 1, "SRTP": 1}) == 0xC000_0000
    assert s.GstsReg.decode(0x4000_0000)["RTPS"] == 1
    assert s.FstsReg.decode(0x302) == {"PFO": 0, "PPF": 1, "IQE": 0, "ICE": 0, "ITE": 0,
                                       "FRI": 3}


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError):
        s.SsPte.to_bytes(1 << 64)
    with pytest.raises(ValueError):
        s.SsPte.from_bytes(b"\0" * 7)
    with pytest.raises(ValueError, match="beyond WIDTH"):
        type("TooWide", (s.VtdStruct,), {"WIDTH": 512,
                                         "FIELDS": (BitField("X", 500, 512, "too wide"),)})
    with pytest.raises(ValueError):
        s.PasidTableEntry.decode(1 << 512)


def test_address_widths() -> None:
    assert [s.address_width_levels(a) for a in range(5)] == [None, 3, 4, 5, None]
    assert [s.agaw_bits(a) for a in range(5)] == [None, 39, 48, 57, None]
    assert set(s.SS_FORMATS) == set(s.FS_FORMATS) == {1, 2, 3, 4, 5}
