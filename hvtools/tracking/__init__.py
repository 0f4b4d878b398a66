"""Dirty-page tracking structures (PURE: standard library and numpy only).

:class:`DirtySet` is one memory region's set of dirty 4-KByte pages; it changes representation
(sparse sorted array, bitmap, "all dirty") as the write pattern changes, in the manner of
HotSpot G1's adaptive card-set containers. :class:`DirtySets` keys sets by guest-physical
region. The migration engine and the dirty-logging device both use them.
"""

from __future__ import annotations

from hvtools.tracking.dirtyset import (
    DirtySet,
    DirtySets,
    DirtySetStats,
    Region,
    Representation,
)

__all__ = ["DirtySet", "DirtySetStats", "DirtySets", "Region", "Representation"]
