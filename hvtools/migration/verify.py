"""Byte-for-byte checks of guest memory across a migration.

With ``hvtools migrate --verify`` the destination QEMU starts with ``-S``, so when QEMU reports
the migration completed both sides are stopped: the source in ``postmigrate`` (its vhost-user
devices stopped by GET_VRING_BASE, so nothing writes its RAM any more) and the destination
still paused. Every page of the two RAM files is compared before the destination runs; a page
that differs was written on the source after its last transfer without being logged (issue 6:
the negative control of the device's dirty log).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvtools.errors import MigrationError
from hvtools.memory.ramfile import q35_ram_layout

PAGE = 4096
_CHUNK = 64 << 20


class VerifyFailed(MigrationError):
    """Guest memory differs between source and destination after a migration."""

    def __init__(self, message: str, pages: list[int]) -> None:
        super().__init__(message)
        self.pages = pages


@dataclass(frozen=True)
class Comparison:
    pages: int
    differing: list[int]  # guest-physical addresses of the pages that differ

    def to_json(self) -> dict[str, object]:
        return {"pages": self.pages, "differing": len(self.differing),
                "first_differing_gpas": [hex(g) for g in self.differing[:16]]}


def _gpa(offset: int, size: int) -> int:
    for region in q35_ram_layout(size):
        if region.offset <= offset < region.offset + region.size:
            return offset - region.offset + region.gpa
    return offset


def compare_ram(a: Path, b: Path) -> Comparison:
    """Compare two RAM files page by page (a hole reads as zeros)."""
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        size = os.fstat(fa).st_size
        if os.fstat(fb).st_size != size:
            raise MigrationError(f"{a} and {b} differ in size")
        ma = mmap.mmap(fa, size, prot=mmap.PROT_READ)
        mb = mmap.mmap(fb, size, prot=mmap.PROT_READ)
        try:
            wa = np.frombuffer(ma, dtype=np.uint64)
            wb = np.frombuffer(mb, dtype=np.uint64)
            differing: list[int] = []
            step = _CHUNK // 8
            for start in range(0, len(wa), step):
                ra = wa[start:start + step].reshape(-1, PAGE // 8)
                rb = wb[start:start + step].reshape(-1, PAGE // 8)
                for i in np.flatnonzero((ra != rb).any(axis=1)).tolist():
                    differing.append(_gpa(start * 8 + i * PAGE, size))
            del wa, wb, ra, rb
        finally:
            ma.close()
            mb.close()
    finally:
        os.close(fa)
        os.close(fb)
    return Comparison(size // PAGE, differing)
