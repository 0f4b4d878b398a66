"""The devices' own dirty logs during a migration: transferred at each iteration.

At every dirty-bitmap sync of QEMU's migration (a new ``dirty-sync-count``) the engine asks
each vhost-user backend for an atomic snapshot-and-clear of its own bitmap (``harvest``,
hvtools.vhost) and accumulates it in adaptive dirty sets (hvtools.tracking), so the report
says how many pages the device wrote in each iteration, and how many distinct pages in all.
This is the seed's "transfer the bitmap contents to the CPU"; QEMU's copy of the same writes
arrives through the shared vhost log (VHOST_F_LOG_ALL, SET_LOG_BASE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvtools.addr import Gpa
from hvtools.control.dirty_watch import control_call
from hvtools.tracking import DirtySets

PAGE = 4096


@dataclass
class DeviceLog:
    controls: dict[str, Path]  # device id -> its backend's control channel
    per_iteration: list[int] = field(default_factory=list)
    _sets: dict[str, DirtySets] = field(default_factory=dict)

    def harvest(self) -> int:
        """Transfer every device's bitmap now; returns the pages written since the last one."""
        n = 0
        for dev, path in self.controls.items():
            got: dict[str, Any] = control_call(path, "harvest")
            regions = [(int(r["gpa"]), int(r["size"])) for r in got.get("regions", [])]
            sets = self._sets.get(dev)
            if sets is None or [(r.base, r.size) for r in sets.regions] != regions:
                sets = self._sets[dev] = DirtySets(regions)
            for r in got.get("regions", []):
                base = int(r["gpa"])
                for first, count in r["runs"]:
                    sets.mark(Gpa(base + int(first) * PAGE), int(count) * PAGE)
            n += int(got.get("total", 0))
        self.per_iteration.append(n)
        return n

    def summary(self) -> dict[str, Any]:
        return {"devices": sorted(self.controls),
                "pages_per_iteration": self.per_iteration,
                "distinct_pages": sum(len(s) for s in self._sets.values()),
                "dirty_set_bytes": sum(s.memory_bytes for s in self._sets.values()),
                "representations": {d: sorted({str(ds.representation) for _, ds in s})
                                    for d, s in self._sets.items()}}
