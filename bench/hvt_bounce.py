"""What the secure bounce window costs: device -> guest throughput of hvt-pci, bounce vs direct.

Two guests on the patched QEMU (the qemu driver picks this series' build), each with
the full scalable-mode vIOMMU and one hvt-pci device bound to vfio-pci inside the guest:

- a trusted VM: DEV2MEM straight into the destination buffer (VFIO_IOMMU_MAP_DMA'd), "direct";
- a confidential VM: DEV2MEM into the registered bounce window, then the guest program
  memcpy's each chunk out to the same kind of destination buffer, "bounce".

hvtdma (a static helper of the image) times the loop only (set-up, vfio and the check of every
byte are outside it); runs alternate between the two guests. Medians of --runs, printed as
"bounce X MiB/s | direct Y MiB/s | ratio X/Y" from the same run.

    python bench/hvt_bounce.py [--runs 5] [--total 64] [--chunk 1048576] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
from typing import Any

from hvtools.control.qemu_driver import QemuDriver
from hvtools.errors import HvError
from hvtools.guest.image import build_image
from hvtools.spec import spec_from_mapping

_RUN = re.compile(r"^run \d+ mibps=([\d.]+) seconds=([\d.]+) copy_seconds=([\d.]+)", re.M)


def guest_run(drv: QemuDriver, name: str, mode: str,
              args: argparse.Namespace) -> tuple[float, float]:
    """(MiB/s, share of the time spent in the guest's copy-out) of one run."""
    res = drv.exec(name, ["hvtdma", "vfio-bench", "--mode", mode, "--total", str(args.total),
                          "--chunk", str(args.chunk)], timeout=600)
    out = res.stdout.decode(errors="replace")
    m = _RUN.search(out)
    if res.status != 0 or m is None:
        raise SystemExit(f"hvtdma vfio-bench --mode {mode} failed in {name} "
                         f"(exit {res.status}): {out} {res.stderr.decode(errors='replace')}")
    return float(m.group(1)), float(m.group(3)) / float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--total", type=int, default=64, help="MiB moved per run")
    ap.add_argument("--chunk", type=int, default=1 << 20, help="bytes per DMA (<= 1 MiB)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    build_image()  # cached; the VMs boot the current image, which must carry this hvtdma
    drv = QemuDriver()
    tag = os.getpid() % 100000
    vms = {"direct": (f"hvtb{tag}-trusted", "trusted"),
           "bounce": (f"hvtb{tag}-confidential", "confidential")}

    def clean() -> None:
        for name, _ in vms.values():
            for step in (drv.kill, drv.undefine):
                with contextlib.suppress(HvError):
                    step(name)

    figures: dict[str, list[float]] = {"direct": [], "bounce": []}
    copy_share: list[float] = []
    try:
        for name, level in vms.values():
            drv.create(spec_from_mapping({
                "name": name, "memory": "1G", "vcpus": 1, "iommu": "scalable,pasid,flts",
                "security_level": level, "devices": [{"type": "hvt-pci", "id": "hvt0"}]}))
            drv.start(name)
        for i in range(args.runs):
            order = ("direct", "bounce") if i % 2 == 0 else ("bounce", "direct")
            for mode in order:
                mibps, share = guest_run(drv, vms[mode][0], mode, args)
                figures[mode].append(mibps)
                if mode == "bounce":
                    copy_share.append(share)
    finally:
        clean()
    bounce, direct = statistics.median(figures["bounce"]), statistics.median(figures["direct"])
    summary: dict[str, Any] = {
        "bounce_mibps": round(bounce, 1), "direct_mibps": round(direct, 1),
        "ratio": round(bounce / direct, 3), "runs": figures,
        "bounce_copy_share": round(statistics.median(copy_share), 3), "total_mib": args.total,
        "chunk": args.chunk}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"hvt-pci device -> guest, {args.chunk >> 10} KiB DMAs, {args.total} MiB a run, "
          f"median of {args.runs}: bounce {bounce:.1f} MiB/s | direct {direct:.1f} MiB/s | "
          f"ratio {bounce / direct:.2f}")
    print(f"  the guest's copy out of the window takes {summary['bounce_copy_share']:.0%} of the "
          "bounce time (TCG runs the guest's memcpy; the device's DMA is QEMU's)")


if __name__ == "__main__":
    main()
