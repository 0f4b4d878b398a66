"""The vhost-user-blk backend from inside the guest, beside QEMU's built-in virtio-blk, in one run.

Two guests on the same host file (256 MiB of random data): one with hvtools' vhost-user-blk
backend (Python, hvtools.vhost), one with QEMU's own virtio-blk. In each, hvblkbench (a static
helper of the guest image) does O_DIRECT 4 KiB random reads and 1 MiB sequential reads at
queue depth 1. Then the cost of the dirty log: while a (throttled) live migration keeps
VHOST_F_LOG_ALL on, the backend's random-read IOPS with its shared-log writes on versus off
(its debug switch). Medians of --runs; ratios printed beside each figure.

    python bench/vhost_blk.py [--runs 3] [--seconds 4] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import tempfile
import threading
from pathlib import Path
from typing import Any

from hvtools.control import vhost_backends
from hvtools.control.dirty_watch import control_call
from hvtools.control.qemu_driver import QemuDriver
from hvtools.errors import HvError
from hvtools.lab.build import lab_down, lab_up
from hvtools.lab.spec import parse_lab_toml
from hvtools.migration import incoming, live
from hvtools.migration.orchestrate import migrate_live
from hvtools.spec import spec_from_mapping

LAB = """\
name = "vbench"
link = "veth"
subnet = "10.79.0.0/24"

[[host]]
name = "h1"
address = "10.79.0.1"

[[host]]
name = "h2"
address = "10.79.0.2"
"""
_LINE = re.compile(r"iops=([\d.]+) mibps=([\d.]+)")


def guest_bench(drv: QemuDriver, name: str, mode: str, seconds: float) -> tuple[float, float]:
    res = drv.exec(name, ["hvblkbench", "/dev/vda", mode, str(seconds)],
                   timeout=seconds + 60)
    m = _LINE.search(res.stdout.decode())
    if res.status != 0 or m is None:
        raise SystemExit(f"hvblkbench failed in {name}: {res.stdout!r} {res.stderr!r}")
    return float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    drv = QemuDriver()
    names = {"vhost": "vbench-vub", "builtin": "vbench-blk"}
    spec_lab = parse_lab_toml(LAB, "bench lab")

    def clean() -> None:
        for n in names.values():
            for rec in (n, *incoming.records(drv, n)):
                for step in (lambda r=rec: drv.kill(r), lambda r=rec: drv.undefine(r)):
                    with contextlib.suppress(HvError):
                        step()
        with contextlib.suppress(HvError):
            lab_down(spec_lab.name)

    clean()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hvtools-vbench-", dir="/var/tmp") as tmp:
        disk = Path(tmp) / "disk.img"
        disk.write_bytes(os.urandom(256 << 20))
        try:
            lab_up(spec_lab)
            for kind, dev in (("vhost", "vhost-user-blk"), ("builtin", "virtio-blk")):
                drv.create(spec_from_mapping({
                    "name": names[kind], "memory": "512M", "vcpus": 1,
                    "devices": [{"type": dev, "path": str(disk)}]}))
                drv.start(names[kind], host=f"{spec_lab.name}/h1")
                for mode in ("randread", "seqread"):
                    runs = [guest_bench(drv, names[kind], mode, args.seconds)
                            for _ in range(args.runs)]
                    results[f"{kind}_{mode}"] = {
                        "iops": statistics.median(r[0] for r in runs),
                        "mibps": statistics.median(r[1] for r in runs)}
                if kind == "builtin":
                    drv.kill(names[kind])
            results["dirty_log"] = log_cost(drv, names["vhost"], args)
        finally:
            clean()
    v, b = results, results
    summary = {
        "randread_iops": {"vhost_user": v["vhost_randread"]["iops"],
                          "qemu_virtio_blk": b["builtin_randread"]["iops"],
                          "ratio": round(v["vhost_randread"]["iops"]
                                         / b["builtin_randread"]["iops"], 3)},
        "seqread_mibps": {"vhost_user": v["vhost_seqread"]["mibps"],
                          "qemu_virtio_blk": b["builtin_seqread"]["mibps"],
                          "ratio": round(v["vhost_seqread"]["mibps"]
                                         / b["builtin_seqread"]["mibps"], 3)},
        "dirty_log": results["dirty_log"]}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    r, s, d = summary["randread_iops"], summary["seqread_mibps"], summary["dirty_log"]
    print(f"4 KiB random read, QD1, median of {args.runs}: vhost-user-blk {r['vhost_user']:.0f} "
          f"IOPS | QEMU virtio-blk {r['qemu_virtio_blk']:.0f} IOPS | ratio {r['ratio']:.2f}")
    print(f"1 MiB sequential read: vhost-user-blk {s['vhost_user']:.1f} MiB/s | QEMU "
          f"virtio-blk {s['qemu_virtio_blk']:.1f} MiB/s | ratio {s['ratio']:.2f}")
    print(f"dirty log during a migration (LOG_ALL on): random-read IOPS with shared-log "
          f"writes {d['on_iops']:.0f} | off {d['off_iops']:.0f} | on/off {d['ratio']:.3f}")


def log_cost(drv: QemuDriver, name: str, args: argparse.Namespace) -> dict[str, float]:
    """Random-read IOPS while a throttled migration holds LOG_ALL on: shared log on vs off."""
    vm = drv.info(name)
    assert vm.state_dir is not None
    ctl = vhost_backends.BackendFiles(vm.state_dir, "vub0").control
    failure: list[BaseException] = []

    def run() -> None:
        try:
            migrate_live(name, "h2", driver=drv,
                         opts=live.Options(bandwidth=1 << 20, stall_timeout=600))
        except BaseException as err:  # the cancel below ends it with an error: expected
            failure.append(err)

    th = threading.Thread(target=run)
    th.start()
    try:
        for _ in range(600):  # wait until QEMU's migration is active (log on)
            if control_call(ctl, "status")["dirty_log"].get("log_all"):
                break
            threading.Event().wait(0.1)
        on, off = [], []
        for _ in range(args.runs):
            control_call(ctl, "set_dirty_log", {"enabled": True})
            on.append(guest_bench(drv, name, "randread", args.seconds)[0])
            control_call(ctl, "set_dirty_log", {"enabled": False})
            off.append(guest_bench(drv, name, "randread", args.seconds)[0])
        control_call(ctl, "set_dirty_log", {"enabled": True})
    finally:
        with contextlib.suppress(HvError):
            drv.qmp(name, "migrate-cancel")
        th.join()
    on_m, off_m = statistics.median(on), statistics.median(off)
    return {"on_iops": on_m, "off_iops": off_m, "ratio": round(on_m / off_m, 3)}


if __name__ == "__main__":
    main()
