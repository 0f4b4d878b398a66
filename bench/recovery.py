"""Recovery from a failed host by one-sided READs, beside QEMU's own live migration, in one run.

A 1 GiB guest with 256 MiB of its RAM populated runs on h1 of a two-host lab. Each round:
  anchor:   QEMU's own live migration h1 -> h2 over the lab link (qemu driver, RAM in a shared
            file): its ``query-migrate`` total-time, and the wall time of ``hvtools migrate``;
  measured: ``host fail h2`` then ``recover --to h1``, timed from the failure until the guest
            agent answers on h1 (freeze + page-table READ + page READs + QEMU start + device
            state + cont + ping).
Prints medians and the ratio measured / anchor (goal <= 0.5), plus the live migration's downtime
beside QEMU's own figure.

    python bench/recovery.py [--rounds 3] [--populated 256] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from hvtools.control.qemu_driver import QemuDriver, ram_path
from hvtools.errors import HvError
from hvtools.lab.build import lab_down, lab_up
from hvtools.lab.spec import parse_lab_toml
from hvtools.migration import recovery
from hvtools.migration.orchestrate import fail_host, migrate_live, recover, revive_host
from hvtools.spec import spec_from_mapping

LAB = """\
name = "rbench"
link = "veth"
subnet = "10.78.0.0/24"

[[host]]
name = "h1"
address = "10.78.0.1"

[[host]]
name = "h2"
address = "10.78.0.2"
"""
GOAL = 0.5
MiB = 1 << 20


def populated_bytes(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return sum(e - s for s, e in recovery.data_extents(fd, size))
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--populated", type=int, default=256, help="MiB of guest RAM populated")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    spec = parse_lab_toml(LAB, "bench lab")
    name = "rbench-vm"
    drv = QemuDriver()

    def clean() -> None:
        for step in (lambda: drv.kill(name), lambda: drv.undefine(name),
                     lambda: lab_down(spec.name)):
            with contextlib.suppress(HvError):
                step()

    clean()
    lab_up(spec)
    rows: list[dict[str, Any]] = []
    try:
        drv.create(spec_from_mapping({"name": name, "memory": "1G", "vcpus": 1}))
        drv.start(name, host=f"{spec.name}/h1")
        # Fill guest RAM (tmpfs files of random data) until the RAM file has the populated
        # size asked for: the guest reuses some pages it had already touched, so measure.
        populated = populated_bytes(ram_path(name))
        for part in range(64):
            missing = (args.populated * MiB - populated) // MiB
            if missing <= 0:
                break
            drv.exec(name, ["sh", "-c", f"dd if=/dev/urandom of=/dev/shm/fill{part} bs=1M "
                                        f"count={missing} 2>/dev/null"], timeout=120)
            populated = populated_bytes(ram_path(name))
        for i in range(args.rounds):
            t0 = time.monotonic()
            live = migrate_live(name, "h2", driver=drv)
            live_wall = time.monotonic() - t0
            t1 = time.monotonic()
            failed = fail_host("h2", spec.name)
            rec = recover(name, "h1", lab_name=spec.name, driver=drv)
            measured = time.monotonic() - t1
            revive_host("h2", spec.name)
            r = live.report
            rows.append({
                "round": i + 1, "qemu_total_ms": r.total_time_ms,
                "qemu_wall_ms": round(live_wall * 1000, 1),
                "qemu_downtime_ms": r.qemu_downtime_ms,
                "measured_downtime_ms": r.measured_downtime_ms,
                "recovery_ms": round(measured * 1000, 1),
                "freeze_ms": failed["frozen"][0]["total_ms"] if failed["frozen"] else None,
                "pages": rec.pull["pages"], "pull_ms": rec.pull["total_ms"],
                "pull_gib_s": rec.pull["gib_per_s"], "start_ms": rec.start_ms,
                "restore_ms": rec.restore_ms, "answer_ms": rec.answer_ms})
            if not args.json:
                print(f"round {i + 1}: QEMU live migration {r.total_time_ms} ms "
                      f"(wall {live_wall * 1000:.0f} ms, downtime {r.qemu_downtime_ms} ms QEMU / "
                      f"{r.measured_downtime_ms} ms STOP->RESUME) | recovery "
                      f"{measured * 1000:.0f} ms (freeze {rows[-1]['freeze_ms']} ms, pull "
                      f"{rec.pull['total_ms']} ms of {rec.pull['pages']} pages at "
                      f"{rec.pull['gib_per_s']} GiB/s, start {rec.start_ms} ms, restore "
                      f"{rec.restore_ms} ms, answer {rec.answer_ms} ms)", flush=True)
    finally:
        clean()
    med = {k: statistics.median(float(r[k]) for r in rows)
           for k in ("qemu_total_ms", "qemu_wall_ms", "recovery_ms", "qemu_downtime_ms",
                     "measured_downtime_ms")}
    ratio = med["recovery_ms"] / med["qemu_total_ms"]
    summary = {"guest_ram_mib": 1024, "populated_mib": round(populated / MiB, 1),
               "rounds": rows, "median": med, "ratio_vs_qemu_total": round(ratio, 3),
               "goal": GOAL, "met": ratio <= GOAL}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"guest 1 GiB, {populated / MiB:.0f} MiB populated, {len(rows)} rounds, medians:")
    print(f"  recovery, failure -> guest answering : {med['recovery_ms']:.0f} ms")
    print(f"  anchor: QEMU live migration total-time: {med['qemu_total_ms']:.0f} ms "
          f"(hvtools migrate wall {med['qemu_wall_ms']:.0f} ms)")
    print(f"  ratio {ratio:.2f} | goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'}")
    print(f"  live migration downtime: QEMU query-migrate {med['qemu_downtime_ms']:.0f} ms | "
          f"STOP->RESUME events {med['measured_downtime_ms']:.1f} ms")


if __name__ == "__main__":
    main()
