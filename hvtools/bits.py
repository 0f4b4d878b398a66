"""Declarative bit fields for bit-exact hardware structures.

A structure lists one :class:`BitField` per architected field (name, bit range, meaning);
decode and encode are derived from that list, so a field exists in exactly one place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class BitField:
    """Bits ``lo..hi`` (inclusive) of a register or table entry."""

    name: str
    lo: int
    hi: int
    doc: str

    def __post_init__(self) -> None:
        if not 0 <= self.lo <= self.hi:
            raise ValueError(f"bad bit range {self.lo}..{self.hi} for {self.name}")

    @property
    def width(self) -> int:
        return self.hi - self.lo + 1

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lo

    def get(self, value: int) -> int:
        return (value & self.mask) >> self.lo

    def put(self, value: int, field_value: int) -> int:
        if not 0 <= field_value < (1 << self.width):
            raise ValueError(f"{self.name}={field_value:#x} does not fit in {self.width} bits")
        return (value & ~self.mask) | (field_value << self.lo)


class BitStruct:
    """Base for declarative structures: subclasses set ``WIDTH`` and ``FIELDS``."""

    WIDTH: ClassVar[int] = 64
    FIELDS: ClassVar[tuple[BitField, ...]] = ()

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for f in cls.FIELDS:
            if f.hi >= cls.WIDTH:
                raise ValueError(f"{cls.__name__}.{f.name}: bit {f.hi} beyond WIDTH {cls.WIDTH}")

    @classmethod
    def field(cls, name: str) -> BitField:
        for f in cls.FIELDS:
            if f.name == name:
                return f
        raise KeyError(f"{cls.__name__} has no field {name!r}")

    @classmethod
    def decode(cls, value: int) -> dict[str, int]:
        """Every declared field of ``value``."""
        if not 0 <= value < (1 << cls.WIDTH):
            raise ValueError(f"{value:#x} does not fit in {cls.WIDTH} bits")
        return {f.name: f.get(value) for f in cls.FIELDS}

    @classmethod
    def encode(cls, fields: Mapping[str, int]) -> int:
        """Build a value from named fields; unknown names are an error, missing ones are 0."""
        value = 0
        for name, v in fields.items():
            value = cls.field(name).put(value, v)
        return value

    @classmethod
    def reserved_mask(cls) -> int:
        """Bits no declared field covers."""
        covered = 0
        for f in cls.FIELDS:
            covered |= f.mask
        return ((1 << cls.WIDTH) - 1) & ~covered
