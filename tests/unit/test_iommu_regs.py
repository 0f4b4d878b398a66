"""VT-d CAP/ECAP decoding (VT-d 4.x s11.4.2, s11.4.3) and the declarative bit fields."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvtools.bits import BitField, BitStruct
from hvtools.iommu.regs import (
    CapReg,
    EcapReg,
    IommuCaps,
    parse_kernel_dmar_line,
    parse_xp_quadwords,
)


@pytest.mark.parametrize("reg", [CapReg, EcapReg])
def test_every_field_round_trips_alone(reg: type[BitStruct]) -> None:
    """Each declared field decodes exactly the bits it encodes, and no two fields overlap."""
    seen = 0
    for f in reg.FIELDS:
        assert seen & f.mask == 0, f"{f.name} overlaps another field"
        seen |= f.mask
        ones = (1 << f.width) - 1
        value = reg.encode({f.name: ones})
        assert value == f.mask
        decoded = reg.decode(value)
        assert decoded[f.name] == ones
        assert all(v == 0 for k, v in decoded.items() if k != f.name)


@pytest.mark.parametrize("reg", [CapReg, EcapReg])
@given(value=st.integers(0, (1 << 64) - 1))
def test_decode_encode_identity_on_declared_bits(reg: type[BitStruct], value: int) -> None:
    assert reg.encode(reg.decode(value)) == value & ~reg.reserved_mask()


def test_hand_worked_cap() -> None:
    # SAGAW=0b00100 (48-bit, 4-level) at bits 12:8 and MGAW=47 at bits 21:16: 0x2f0400.
    caps = IommuCaps(cap=0x2F0400, ecap=0)
    assert caps.get("SAGAW") == 0b100 and caps.address_widths == [48]
    assert caps.get("MGAW") + 1 == 48


def test_hand_worked_ecap_scalable_pasid() -> None:
    # SMTS bit 43, PASID bit 40, PSS=19 at bits 39:35, FSTS bit 47, IR bit 3.
    ecap = (1 << 43) | (1 << 40) | (19 << 35) | (1 << 47) | (1 << 3)
    caps = IommuCaps(cap=0, ecap=ecap)
    assert caps.get("SMTS") == 1 and caps.get("PASID") == 1 and caps.get("PSS") == 19
    assert caps.get("FLTS") == caps.get("FSTS") == 1  # the older name is an alias
    assert caps.pasid_bits == 20
    assert caps.get("SLTS") == 0 and caps.get("NEST") == 0 and caps.get("IR") == 1
    with pytest.raises(KeyError):
        caps.get("NOPE")


def test_bitfield_rejects_overflow() -> None:
    f = BitField("X", 4, 5, "two bits")
    assert f.put(0, 3) == 0x30
    with pytest.raises(ValueError, match="does not fit"):
        f.put(0, 4)
    with pytest.raises(ValueError, match="does not fit"):
        CapReg.decode(1 << 64)


def test_parse_kernel_line() -> None:
    log = ("[    0.312] DMAR: dmar0: reg_base_addr fed90000 ver 1:0 cap 12008c22260286 "
           "ecap f00f5e\n[    0.4] other\n")
    units = parse_kernel_dmar_line(log)
    assert units == {"dmar0": IommuCaps(0x12008C22260286, 0xF00F5E)}


def test_parse_xp_output() -> None:
    text = ("00000000fed90008: 0x00d2008c22260286 0x00f00f1ed6\r\n")
    assert parse_xp_quadwords(text) == [0x00D2008C22260286, 0x00F00F1ED6]
    assert parse_xp_quadwords("garbage") == []
