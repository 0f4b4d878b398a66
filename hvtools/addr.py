"""Address spaces as distinct types (vm-memory's GuestAddress habit).

Mixing a guest-virtual with a guest-physical address is a type error mypy reports. Values are
plain ints at run time; wrap with the constructor, e.g. ``Gpa(0x1000)``.
"""

from __future__ import annotations

from typing import NewType

Gva = NewType("Gva", int)  #: guest-virtual address (input of guest paging)
Gpa = NewType("Gpa", int)  #: guest-physical address (output of guest paging, input of EPT/NPT)
Hpa = NewType("Hpa", int)  #: host-physical address (output of the second stage)
Iova = NewType("Iova", int)  #: I/O virtual address a device puts on the bus (input of VT-d)
Hva = NewType("Hva", int)  #: host-virtual address in the hypervisor process

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30
