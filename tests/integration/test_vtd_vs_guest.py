"""Issue 3, proof 3: the VT-d model against the tables the guest kernel's own driver built.

A Linux guest boots with a vIOMMU, a virtio-blk disk and a virtio-rng (both, like the agent's
virtio-serial, with ``iommu_platform=on``) in three configurations: the default scalable mode
with PASID and first-stage tables (``x-flts=on``: Linux puts its DMA domains on first-stage
tables), scalable mode without ``x-flts`` (second-stage tables) and legacy mode. It reads the
whole disk with ``dd`` and some bytes of ``/dev/hwrng`` while QEMU's trace events record every
DMA translation the vIOMMU made (``vtd_dmar_translate``: source-id, IOVA page, GPA page, page
size), the leaf entry it used (``vtd_iotlb_page_update``/``_hit``) and every invalidation the
guest issued (``vtd_inv_desc*``). Debian's QEMU is built with the ``log`` trace backend, so
HMP ``trace-event NAME on`` prints to QEMU's stderr: the qemu driver's ``qemu.log``.

Linux unmaps a streaming DMA buffer as soon as its request completes, so the tables can only
be compared while the mapping still exists. The disk is throttled far below one request per
second (QMP ``block_set_io_throttle``, its bucket filled by one read first): a request's buffers
are translated when the device pops it, and the request then waits in QEMU, mapped, until the
VM is stopped (a stop drains it; the guest sees the completion only when it runs again). The
test follows the log and stops the VM (QMP ``stop``) as soon as new translations appear; with
the guest stopped, every translation not invalidated since is walked by the model through the
live tables, and the model's GPA, page size, leaf entry (bit for bit), read/write rights and
domain id must equal what QEMU used. The disk is read through the page cache, so its 2048
pages land in as many distinct guest pages. The guest runs with
``iommu.strict=1`` so that an unmap is followed at once by its IOTLB invalidation: a
translation the guest invalidated before the stop is accounted as such (its mapping is gone
and the IOVA may already map something else); one whose entry the model finds not present
must be invalidated right after the VM resumes (a stop between clearing a PTE and flushing
it); anything else is a disagreement.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hvtools.addr import Iova
from hvtools.control import iommu_live
from hvtools.control.driver import Driver
from hvtools.control.drivers import make_driver
from hvtools.control.qemu_driver import QemuDriver
from hvtools.guest.agent import ExecResult
from hvtools.guest.image import GuestImage
from hvtools.iommu.walk import Access, DmaRequest, FaultReason, format_source_id, translate
from hvtools.spec import spec_from_mapping
from hvtools.translation import Fault, Stage, Translation
from tests.integration.conftest import VmFactory

pytestmark = pytest.mark.integration

MiB = 1 << 20
DISK_SIZE = 8 * MiB
BLOCK = 256 * 1024  # one dd read = one virtio-blk request
#: The disk's throttle, far below one request per second: once the bucket holds a request, each
#: new one waits in QEMU, translated and mapped, until the VM is stopped (a stop drains it).
BPS = 64 * 1024
RNG_READS = 16

#: QEMU 10.0.2 trace events (hw/i386/trace-events) the proof follows.
TRACE_EVENTS = (
    "vtd_dmar_translate", "vtd_iotlb_page_update", "vtd_iotlb_page_hit", "vtd_dmar_fault",
    "vtd_inv_desc", "vtd_inv_desc_iotlb_pages", "vtd_inv_desc_iotlb_domain",
    "vtd_inv_desc_iotlb_global", "vtd_inv_desc_cc_device", "vtd_inv_desc_cc_devices",
    "vtd_inv_desc_cc_domain", "vtd_inv_desc_cc_global", "vtd_iotlb_reset",
    "vtd_context_cache_reset",
)

_HEX = "([0-9a-fA-F]+)"
_TRANSLATE = re.compile(rf"vtd_dmar_translate dev {_HEX}:{_HEX}\.{_HEX} iova 0x{_HEX} -> "
                        rf"gpa 0x{_HEX} mask 0x{_HEX}")
_PTE = re.compile(rf"vtd_iotlb_page_(?:hit|update) IOTLB page (?:hit|update) sid 0x{_HEX} "
                  rf"iova 0x{_HEX} slpte 0x{_HEX} domain 0x{_HEX}")
_FAULT = re.compile(rf"vtd_dmar_fault sid 0x{_HEX} fault (\d+) addr 0x{_HEX} write (\d)")
_INV_PAGES = re.compile(rf"vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x{_HEX} "
                        rf"addr 0x{_HEX} mask 0x{_HEX}")
_INV_DOMAIN = re.compile(rf"vtd_inv_desc_iotlb_domain iotlb invalidate whole domain 0x{_HEX}")
_INV_DESC = re.compile(rf"vtd_inv_desc invalidate desc type (\S+) high 0x{_HEX} low 0x{_HEX}")
_INV_ALL = re.compile(r"vtd_(?:inv_desc_iotlb_global|inv_desc_cc_\w+|iotlb_reset|"
                      r"context_cache_reset)\b")

#: Variants: the --iommu shorthand, the PGTT Linux must pick, the walk's paging stage.
VARIANTS = {
    "scalable-flts": ("scalable,pasid,flts", "first-stage", Stage.VTD_FIRST),
    "scalable-ss": ("scalable", "second-stage", Stage.VTD_SECOND),
    "legacy": ("legacy", None, Stage.VTD_SECOND),
}
#: Accessed/dirty bits of a leaf (first-stage 5/6, second-stage 8/9): hardware may set them.
AD_BITS = {Stage.VTD_FIRST: 0b11 << 5, Stage.VTD_SECOND: 0b11 << 8}
_READ_DENIED = {FaultReason.READ_DENIED, FaultReason.SM_READ_DENIED}

_RUN_CLI = "import sys; from hvtools.cli.main import run; run(sys.argv[1:])"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI through its real error boundary, with the iommu commands registered."""
    return subprocess.run([sys.executable, "-c", _RUN_CLI, *args], text=True,
                          capture_output=True, timeout=120)


@pytest.fixture
def driver(image: GuestImage) -> Driver:
    """Only the qemu driver: its qemu.log is QEMU's stderr, where the trace goes."""
    return QemuDriver()


# --------------------------------------------------------------------------------------------
# Following QEMU's trace
# --------------------------------------------------------------------------------------------


class LogFollower:
    """New complete lines of a growing log file."""

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "rb")  # noqa: SIM115 (closed in close())
        self.fh.seek(0, 2)
        self.partial = b""

    def poll(self) -> list[str]:
        data = self.partial + self.fh.read()
        lines = data.split(b"\n")
        self.partial = lines.pop()
        return [ln.decode(errors="replace") for ln in lines]

    def settle(self, quiet: float = 0.05) -> list[str]:
        """Lines until none arrived for ``quiet`` seconds (a logger may lag behind QEMU)."""
        lines = self.poll()
        while True:
            time.sleep(quiet)
            more = self.poll()
            if not more:
                return lines
            lines += more

    def close(self) -> None:
        self.fh.close()


@dataclass
class Seen:
    """One translation QEMU's vIOMMU made (``vtd_dmar_translate``) and the leaf it used."""

    seq: int
    sid: int
    iova: int  # page-aligned
    gpa: int
    size: int
    pte: int | None  # the leaf entry from vtd_iotlb_page_update/_hit, if paired
    domain: int | None


@dataclass
class Checker:
    """Classifies every traced translation against the model's walk of the live tables."""

    leaf_stage: Stage
    seq: int = 0
    pending: list[Seen] = field(default_factory=list)  # not yet walked
    awaiting: list[Seen] = field(default_factory=list)  # walked, not present: must be flushed
    last_pte: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # sid -> last
    counts: Counter[str] = field(default_factory=Counter)
    per_device: dict[int, Counter[str]] = field(default_factory=dict)
    compared_pages: set[tuple[int, int, int]] = field(default_factory=set)
    domains: dict[int, set[int]] = field(default_factory=dict)  # sid -> traced domains
    current: dict[tuple[int, int], Seen] = field(default_factory=dict)  # compared, not flushed
    disagreements: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    unknown: Counter[str] = field(default_factory=Counter)
    inv_kinds: Counter[str] = field(default_factory=Counter)

    def _count(self, what: str, s: Seen) -> None:
        self.counts[what] += 1
        self.per_device.setdefault(s.sid, Counter())[what] += 1

    # -- the trace ------------------------------------------------------------------------
    def feed(self, lines: list[str]) -> None:
        for line in lines:
            if "vtd_" not in line:
                continue
            self.seq += 1
            if m := _TRANSLATE.search(line):
                bus, dev, fn = (int(m.group(i), 16) for i in (1, 2, 3))
                sid = bus << 8 | dev << 3 | fn
                iova, gpa, mask = (int(m.group(i), 16) for i in (4, 5, 6))
                pte = domain = None
                last = self.last_pte.get(sid)
                if last is not None and last[0] & ~mask == iova:
                    pte, domain = last[1], last[2]
                    self.domains.setdefault(sid, set()).add(domain)
                self.pending.append(Seen(self.seq, sid, iova, gpa, mask + 1, pte, domain))
                self.counts["translations traced"] += 1
            elif m := _PTE.search(line):
                self.last_pte[int(m.group(1), 16)] = (int(m.group(2), 16),
                                                      int(m.group(3), 16), int(m.group(4), 16))
            elif m := _FAULT.search(line):
                self.faults.append(line.strip())
            elif m := _INV_PAGES.search(line):
                lo = int(m.group(2), 16)
                self.invalidate(int(m.group(1), 16), lo, lo + (4096 << int(m.group(3), 16)))
                self.inv_kinds["iotlb page-selective"] += 1
            elif m := _INV_DOMAIN.search(line):
                self.invalidate(int(m.group(1), 16), 0, 1 << 64)
                self.inv_kinds["iotlb domain"] += 1
            elif m := _INV_DESC.search(line):
                self.descriptor(m.group(1), int(m.group(2), 16), int(m.group(3), 16))
            elif _INV_ALL.search(line):
                self.invalidate(None, 0, 1 << 64)
                self.inv_kinds["global / context-cache"] += 1
            else:
                self.unknown[line.split()[0]] += 1

    def descriptor(self, kind: str, hi: int, lo: int) -> None:
        """A raw invalidation descriptor QEMU traced (VT-d 4.x s6.5.2). The IOTLB ones it
        also traces decoded (vtd_inv_desc_iotlb_*); the PASID-based IOTLB one (s6.5.2.4:
        type 6, G bits 5:4, DID 31:16; ADDR 63:12 and AM 5:0 in the high half) only raw.
        Anything else that could drop a cached translation counts as global."""
        if kind in ("wait", "iec", "iotlb"):
            return
        if kind == "p-iotlb" and lo & 0xF == 6:
            did, gran = lo >> 16 & 0xFFFF, lo >> 4 & 3
            if gran == 0b11:  # page-selective-within-PASID
                base = hi & ~0xFFF
                self.invalidate(did, base, base + (4096 << (hi & 0x3F)))
                self.inv_kinds["p-iotlb page-selective"] += 1
            else:
                self.invalidate(did, 0, 1 << 64)
                self.inv_kinds["p-iotlb pasid/domain"] += 1
            return
        self.invalidate(None, 0, 1 << 64)
        self.inv_kinds[f"{kind} (as global)"] += 1

    def invalidate(self, domain: int | None, lo: int, hi: int) -> None:
        def covered(s: Seen) -> bool:
            return ((domain is None or s.domain is None or s.domain == domain)
                    and s.iova < hi and lo < s.iova + s.size)

        for s in [s for s in self.pending if covered(s)]:
            self.pending.remove(s)
            self._count("invalidated before the stop", s)
        for s in [s for s in self.awaiting if covered(s)]:
            self.awaiting.remove(s)
            self._count("unmapped at the stop, invalidated after", s)
        for key in [k for k, s in self.current.items() if covered(s)]:
            del self.current[key]

    # -- the model, with the VM stopped ---------------------------------------------------
    def check(self, iommu: iommu_live.LiveIommu) -> None:
        regs = iommu.registers
        memo: dict[tuple[int, int], Translation | Fault] = {}
        for s in self.pending:
            key = (s.sid, s.iova)
            if key not in memo:
                r = translate(DmaRequest(s.sid, Iova(s.iova)), iommu.memory, regs.rtaddr,
                              regs.caps)
                if isinstance(r, Fault) and r.code in _READ_DENIED:
                    # A mapping without read permission (Linux maps DMA_FROM_DEVICE buffers
                    # write-only in second-stage tables): QEMU's access was a write.
                    r = translate(DmaRequest(s.sid, Iova(s.iova), Access.WRITE), iommu.memory,
                                  regs.rtaddr, regs.caps)
                    if isinstance(r, Translation):
                        self._count("write-only mapping", s)
                memo[key] = r
            self.judge(s, memo[key])
        self.pending.clear()

    def judge(self, s: Seen, r: Translation | Fault) -> None:
        what = f"{format_source_id(s.sid)} iova {s.iova:#x} (QEMU: gpa {s.gpa:#x}, " \
               f"size {s.size:#x}, pte {s.pte if s.pte is None else hex(s.pte)}, " \
               f"domain {s.domain})"
        if isinstance(r, Fault):
            last = r.steps[-1] if r.steps else None
            present = 1 if r.stage is Stage.VTD_FIRST else 0b11
            if last is not None and last.stage is r.stage and r.stage in AD_BITS \
                    and not last.entry & present:
                self.awaiting.append(s)  # resolved by the invalidation that must follow
                return
            self.disagreements.append(f"{what}: model faults {r.code:#x} {r.reason}")
            return
        problems = []
        if (r.output, r.page_size) != (s.gpa, s.size):
            problems.append(f"model gpa {r.output:#x} size {r.page_size:#x}")
        leaf = r.steps[-1]
        if leaf.stage is not self.leaf_stage:
            problems.append(f"leaf from {leaf.stage}")
        if s.pte is not None:
            if leaf.entry != s.pte and (leaf.entry ^ s.pte) & ~AD_BITS[self.leaf_stage]:
                problems.append(f"model leaf {leaf.entry:#x}")
            rights = (bool(s.pte & 1), bool(s.pte & 2))
            if (r.permissions.read, r.permissions.write) != rights:
                problems.append(f"model rights r={r.permissions.read} w={r.permissions.write}")
            table = "PasidTableEntry" if any(st.table == "PasidTableEntry"
                                             for st in r.steps) else "ContextEntry"
            entry = next(st.entry for st in r.steps if st.table == table)
            did = entry >> 64 & 0xFFFF if table == "PasidTableEntry" else entry >> 72 & 0xFFFF
            if did != s.domain:
                problems.append(f"model DID {did}")
            self._count("leaf entry compared" if leaf.entry == s.pte
                        else "leaf entry compared (A/D differ)", s)
        if problems:
            self.disagreements.append(f"{what}: {', '.join(problems)}")
            return
        self._count("compared, agree", s)
        self.compared_pages.add((s.sid, s.iova, s.gpa))
        self.current[(s.sid, s.iova)] = s


# --------------------------------------------------------------------------------------------
# The guest
# --------------------------------------------------------------------------------------------


def sh(driver: Driver, name: str, script: str, timeout: float = 60.0) -> str:
    res = driver.exec(name, ["sh", "-c", script], timeout=timeout)
    assert res.status == 0, (script, res.stderr)
    return res.stdout.decode(errors="replace")


def virtio_devices(driver: Driver, name: str) -> dict[int, str]:
    """The guest's virtio PCI functions: source-id -> kind (virtio 1.x device ids 0x104N)."""
    kinds = {0x1042: "virtio-blk", 0x1043: "virtio-serial", 0x1044: "virtio-rng"}
    out = {}
    text = sh(driver, name, "cd /sys/bus/pci/devices && for d in *; do "
                            "echo $d $(cat $d/vendor) $(cat $d/device); done")
    for line in text.splitlines():
        bdf, vendor, device = line.split()
        if int(vendor, 16) == 0x1AF4:
            out[_sid(bdf)] = kinds.get(int(device, 16), f"virtio {device}")
    return out


def _sid(bdf: str) -> int:
    _, bus, devfn = bdf.split(":")
    dev, fn = devfn.split(".")
    return int(bus, 16) << 8 | int(dev, 16) << 3 | int(fn, 16)


def run_io(driver: Driver, name: str, script: str, follower: LogFollower, checker: Checker,
           iommu: iommu_live.LiveIommu) -> tuple[ExecResult, int]:
    """Run ``script`` in the guest; stop the VM whenever QEMU translated something new and
    check it. Returns the command's result and the number of stops; the VM ends stopped."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["res"] = driver.exec(name, ["sh", "-c", script], timeout=120)
        except BaseException as err:  # reported below
            box["err"] = err

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    stops = retries = 0
    while True:
        done = not worker.is_alive()
        checker.feed(follower.poll())
        if checker.pending or done:
            driver.qmp(name, "stop")
            stops += 1
            # What the stop's drain completed (and, at the end, whatever a logger still holds).
            checker.feed(follower.settle() if done else follower.poll())
            checker.check(iommu)
            if done and checker.awaiting and retries < 20:
                retries += 1
                # Stopped between clearing an entry and flushing it: let the flush happen.
                driver.qmp(name, "cont")
                time.sleep(0.05)
                continue
            if done:
                break
            driver.qmp(name, "cont")
            checker.feed(follower.poll())
        else:
            time.sleep(0.002)
    worker.join()
    if "err" in box:
        raise box["err"]
    return box["res"], stops


# --------------------------------------------------------------------------------------------
# The proof
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_model_walks_linux_tables_like_qemu(variant: str, driver: Driver, vms: VmFactory,
                                            tmp_path: Path) -> None:
    mode, pgtt, leaf_stage = VARIANTS[variant]
    disk = tmp_path / "disk.img"
    disk.write_bytes(random.Random(variant).randbytes(DISK_SIZE))
    name = vms.name(f"vtd-{variant.split('-')[-1]}")
    driver.create(spec_from_mapping({
        "name": name, "memory": "3G", "vcpus": 1, "iommu": mode,
        "kernel_args": ["iommu.strict=1"],
        "devices": [{"type": "virtio-blk", "id": "blk0", "path": str(disk)},
                    {"type": "virtio-rng", "id": "rng0"}]}))
    vm, _ = driver.start(name)
    assert vm.state_dir is not None
    sh(driver, name, "modprobe virtio_blk && modprobe virtio_rng && "
                     "for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.1; done; "
                     "[ -b /dev/vda ] && [ -c /dev/hwrng ]")
    assert set(sh(driver, name, "cat /sys/kernel/iommu_groups/*/type").split()) == {"DMA"}
    devices = virtio_devices(driver, name)
    assert sorted(devices.values()) == ["virtio-blk", "virtio-rng", "virtio-serial"], devices
    blk = next(s for s, k in devices.items() if k == "virtio-blk")

    driver.qmp(name, "block_set_io_throttle", {
        "id": "/machine/peripheral/blk0/virtio-backend", "bps": 0, "bps_rd": BPS, "bps_wr": 0,
        "iops": 0, "iops_rd": 0, "iops_wr": 0})
    sh(driver, name, f"dd if=/dev/vda of=/dev/null bs={BLOCK} count=1 iflag=direct")  # fill it
    for event in TRACE_EVENTS:
        reply = driver.hmp(name, f"trace-event {event} on")
        assert not reply.strip(), (event, reply)
    follower = LogFollower(vm.state_dir / "qemu.log")
    checker = Checker(leaf_stage)
    iommu = iommu_live.attach(driver, name)
    try:
        regs = iommu.registers
        assert regs.mode == ("legacy" if mode == "legacy" else "scalable")
        assert regs.translation_enabled and regs.root_table_set
        assert regs.caps.get("FSTS") == int("flts" in mode)
        t0 = time.monotonic()
        res, stops = run_io(driver, name,
                            f"dd if=/dev/vda bs={BLOCK} 2>/dev/null | md5sum; "
                            f"dd if=/dev/hwrng of=/dev/null bs=64 count={RNG_READS} 2>&1",
                            follower, checker, iommu)
        io_s = time.monotonic() - t0
        assert res.status == 0, res.stderr
        assert res.stdout.decode().split()[0] == hashlib.md5(disk.read_bytes()).hexdigest()
        assert f"{RNG_READS}+0 records in" in res.stdout.decode()

        report(variant, devices, checker, stops, io_s)
        assert not checker.faults, checker.faults[:5]
        assert not checker.disagreements, (f"{len(checker.disagreements)} disagreements, first: "
                                           f"{checker.disagreements[:8]}")
        assert not checker.awaiting, [f"{format_source_id(s.sid)} {s.iova:#x}"
                                      for s in checker.awaiting[:8]]
        assert not checker.unknown, checker.unknown
        c = checker.counts
        accounted = (c["compared, agree"] + c["invalidated before the stop"]
                     + c["unmapped at the stop, invalidated after"])
        assert accounted == c["translations traced"], c
        # Coverage the proof relies on: every page-cache page the disk was read into (distinct
        # GPAs), and DMA of the other devices.
        data = {gpa for sid, _, gpa in checker.compared_pages if sid == blk}
        assert len(data) >= DISK_SIZE // 4096, (len(data), checker.per_device[blk])
        for sid, kind in devices.items():
            if kind != "virtio-rng":  # hwrng reads are unthrottled: often done before a stop
                assert checker.per_device.get(sid, Counter())["compared, agree"], (kind, c)
        assert c["leaf entry compared"] + c["leaf entry compared (A/D differ)"] > 0

        # The VM is stopped: the tables, the registers and the CLI on the same state.
        after = iommu_live.read_registers(driver, name)
        assert (after.rtaddr, after.gsts) == (regs.rtaddr, regs.gsts)
        assert not after.pending_faults and not after.fsts & 0b10, after.to_json()
        check_tables(name, devices, checker, pgtt)
        check_translate_cli(name, checker, blk, leaf_stage, mode)
    finally:
        iommu.close()
        follower.close()
        if driver.info(name).state.active:
            driver.qmp(name, "cont")



def check_tables(name: str, devices: dict[int, str], checker: Checker,
                 pgtt: str | None) -> None:
    """``iommu tables`` lists every virtio device with the entry Linux programmed for it."""
    res = cli("iommu", "tables", "--vm", name, "--json")
    assert res.returncode == 0, res.stderr
    tables = json.loads(res.stdout)
    listed = {d["sid"]: d for d in tables["devices"]}
    for sid in devices:
        dev = listed[format_source_id(sid)]
        fields = dev["fields"]
        assert fields["P"] == 1
        traced = checker.domains.get(sid, set())
        if pgtt is None:
            assert dev["format"] == "ContextEntry" and dev["translation_type"] == "untranslated"
            assert not traced or traced == {fields["DID"]}, (dev, traced)
            continue
        assert dev["format"] == "ScalableContextEntry"
        rid = [p for p in dev["pasid_entries"] if p["pasid"] == fields["RID_PASID"]]
        assert rid and rid[0]["pgtt"] == pgtt, dev
        assert not traced or traced == {rid[0]["fields"]["DID"]}, (dev, traced)
    text = cli("iommu", "tables", "--vm", name)
    assert text.returncode == 0 and all(format_source_id(s) in text.stdout for s in devices)


def check_translate_cli(name: str, checker: Checker, blk: int, stage: Stage,
                        mode: str) -> None:
    """``iommu translate`` on the stopped VM: a live IOVA gives QEMU's GPA, IOVA 0 faults."""
    latest: dict[int, Seen] = {}  # each device's last compared translation still mapped
    for seen in sorted(checker.current.values(), key=lambda s: s.seq):
        latest[seen.sid] = seen
    assert latest
    for sid, seen in sorted(latest.items()):
        args = ("iommu", "translate", "--vm", name, "--sid", format_source_id(sid),
                "--iova", f"{seen.iova:#x}", "--json", "-v")
        res = cli(*args)
        if res.returncode == 1 and json.loads(res.stdout)["fault"]["code"] in _READ_DENIED:
            res = cli(*args, "--write")  # a write-only mapping
        assert res.returncode == 0, (res.stdout, res.stderr)
        out = json.loads(res.stdout)
        assert int(out["gpa"], 16) == seen.gpa and out["page_size"] == seen.size
        assert out["steps"][-1]["stage"] == str(stage)
    # IOVA 0 is never mapped (Linux reserves it).
    res = cli("iommu", "translate", "--vm", name, "--sid", format_source_id(blk),
              "--iova", "0", "--json")
    assert res.returncode == 1, (res.stdout, res.stderr)
    fault = json.loads(res.stdout)["fault"]
    expected = {"scalable,pasid,flts": FaultReason.SM_FS_NOT_PRESENT,
                "scalable": FaultReason.SM_SS_NOT_PRESENT,
                "legacy": FaultReason.READ_DENIED}[mode]
    assert (fault["code"], fault["name"]) == (expected, expected.name), fault
    text = cli("iommu", "translate", "--vm", name, "--sid", format_source_id(blk),
               "--iova", "0", "--write")
    assert text.returncode == 1 and " -> fault 0x" in text.stdout, text.stdout


def report(variant: str, devices: dict[int, str], checker: Checker, stops: int,
           io_s: float) -> None:
    c = checker.counts
    print(f"\n{variant}: {c['translations traced']} translations traced in {io_s:.1f}s, "
          f"{stops} stops; {c['compared, agree']} compared against the model "
          f"({len(checker.compared_pages)} distinct (sid, iova, gpa)), "
          f"{len(checker.disagreements)} disagreements")
    for sid, counts in sorted(checker.per_device.items()):
        pages = {(i, g) for s, i, g in checker.compared_pages if s == sid}
        print(f"  {format_source_id(sid)} {devices.get(sid, '?'):14} "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
              + f"; {len({i for i, _ in pages})} IOVAs, {len({g for _, g in pages})} GPAs")
    print("  invalidations: " + ", ".join(f"{k} {v}" for k, v in
                                          sorted(checker.inv_kinds.items())))


def qemu_stderr(driver: Driver, name: str) -> Path:
    """Where the VM's QEMU writes its stderr (the ``log`` trace backend's output)."""
    if isinstance(driver, QemuDriver):
        state_dir = driver.info(name).state_dir
        assert state_dir is not None
        return state_dir / "qemu.log"
    from hvtools.control.libvirt_driver import qemu_log

    return qemu_log(name)


@pytest.fixture(params=["qemu", "libvirt"])
def each_driver(request: pytest.FixtureRequest, image: GuestImage) -> Driver:
    return make_driver(request.param)


def test_live_iommu_on_each_driver(each_driver: Driver, request: pytest.FixtureRequest) -> None:
    """Registers through the monitor, tables in the RAM file, the trace and the CLI work the
    same under both drivers (the agent's virtio-serial is the device doing DMA here)."""
    vms = VmFactory(each_driver, request)
    try:
        name = vms.name("vtdatt")
        each_driver.create(spec_from_mapping({"name": name, "memory": "512M", "vcpus": 1,
                                              "kernel_args": ["iommu.strict=1"]}))
        each_driver.start(name)
        serial = next(s for s, k in virtio_devices(each_driver, name).items()
                      if k == "virtio-serial")
        follower = LogFollower(qemu_stderr(each_driver, name))
        for event in TRACE_EVENTS:
            each_driver.hmp(name, f"trace-event {event} on")
        checker = Checker(Stage.VTD_FIRST)
        try:
            with iommu_live.attach(each_driver, name) as iommu:
                res, _ = run_io(each_driver, name, "cat /proc/iomem /proc/cpuinfo | wc -c",
                                follower, checker, iommu)
            assert res.status == 0
            assert checker.per_device[serial]["compared, agree"], checker.counts
            assert not checker.disagreements and not checker.awaiting, checker.disagreements
            seen = max((s for s in checker.current.values() if s.sid == serial),
                       key=lambda s: s.seq)
            out = cli("iommu", "translate", "--vm", name, "--driver", each_driver.name,
                      "--sid", format_source_id(serial), "--iova", f"{seen.iova:x}")
            assert out.returncode == 0, out.stderr
            assert out.stdout.split()[4] == f"{seen.gpa:#x}", out.stdout
            tables = cli("iommu", "tables", "--vm", name, "--driver", each_driver.name,
                         "--json")
            assert tables.returncode == 0, tables.stderr
            dev = {d["sid"]: d for d in json.loads(tables.stdout)["devices"]}[
                format_source_id(serial)]
            assert [p["pgtt"] for p in dev["pasid_entries"]] == ["first-stage"]
        finally:
            follower.close()
            if each_driver.info(name).state.active:
                each_driver.qmp(name, "cont")
    finally:
        vms.cleanup()


def test_cli_usage_errors() -> None:
    """Bad input is exit status 2 with one line on stderr, before any VM is looked up."""
    for args in (["--sid", "00:02", "--iova", "0"], ["--sid", "00:02.0", "--iova", "xyz"],
                 ["--sid", "00:02.0", "--iova", "0", "--pasid", "0x100000"],
                 ["--sid", "00:02.0"]):
        res = cli("iommu", "translate", "--vm", "no-such-vm", *args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = cli("iommu", "tables", "--vm", f"no-such-vm-{time.time_ns()}")
    assert res.returncode == 2 and "no VM named" in res.stderr
