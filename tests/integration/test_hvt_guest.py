"""The hvt-pci device driven from inside booted Linux guests (issue 5, the guest side).

Guests run on the qemu driver under TCG with the full scalable-mode vIOMMU, the guest kernel's
own intel-iommu in scalable mode (``intel_iommu=on,sm_on``), and ``hvtdma``, a static helper of
the image, doing the device's DMA:

- PASID: the ``pasid`` image variant (bookworm's 6.12 cloud kernel and the ``hvtpasid`` module)
  attaches a paging domain to a PASID of the device; ``hvtdma pasid`` maps user buffers there
  and moves bytes with PASID-tagged DMA. The host side sees the request was PASID-tagged: QEMU
  created the device's per-PASID address space (``info mtree``) and recorded the fault of the
  deliberately unmapped request with PP=1 and that PASID (``vtd_frr_new`` trace, VT-d
  s11.4.7.6), the untagged control with PP=0.
- The secure interface: a confidential VM's device (vfio-pci in the default image) cannot write
  outside its registered window; a trusted VM's can.
- The same plumbing (pinned user pages mapped for a device, BAR0 mmapped) against stock QEMU's
  ``edu`` device, so the module and the vfio path are covered where no patched QEMU is built.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hvtools.control.iommu_live import tables_live, translate_live
from hvtools.control.mmu_live import open_ram
from hvtools.control.qemu_driver import QemuDriver
from hvtools.errors import DependencyError, HvError
from hvtools.guest import image as image_mod
from hvtools.guest.image import GuestImage, build_image
from hvtools.iommu.structures import FaultRecord
from hvtools.qemu.binary import find_qemu
from hvtools.spec import spec_from_mapping
from hvtools.translation import Fault, Translation

from .conftest import RUN

pytestmark = pytest.mark.integration

#: hvtdma's verdict lines and QEMU's trace of each fault record it writes (FRCD_REG, 128 bits).
_CHECK = re.compile(r"^check (\S+) (ok|FAIL) (.*)$", re.M)
_FRR = re.compile(r"vtd_frr_new index (\d+) high 0x([0-9a-f]+) low 0x([0-9a-f]+)")


@pytest.fixture(scope="session")
def pasid_image() -> GuestImage:
    return build_image(variant="pasid")


@pytest.fixture(scope="session")
def patched_qemu() -> Path:
    try:
        return find_qemu(devices=["hvt-pci"]).path
    except DependencyError as err:
        pytest.fail(f"no QEMU with hvt-pci (make test builds it: hvtools qemu build): {err}")


@dataclass
class Guest:
    drv: QemuDriver
    name: str
    trace: Path

    def sh(self, cmd: str, timeout: float = 300, ok: bool = True) -> tuple[int, str]:
        r = self.drv.exec(self.name, ["sh", "-c", cmd], timeout=timeout)
        out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
        if ok:
            assert r.status == 0, f"{cmd}: exit {r.status}\n{out}"
        return r.status, out


class Guests:
    """Starts VMs on the qemu driver and always removes them, dumping logs on failure."""

    def __init__(self, request: pytest.FixtureRequest, tmp: Path) -> None:
        self.drv = QemuDriver()
        self.request = request
        self.tmp = tmp
        self.names: list[str] = []

    def start(self, suffix: str, spec: dict[str, Any], *extra: str) -> Guest:
        name = f"{RUN}-hvt-{suffix}"
        self.names.append(name)
        trace = self.tmp / f"{name}.trace"
        self.drv.create(spec_from_mapping({"memory": "1G", "vcpus": 2, **spec}, name=name))
        self.drv.start(name, extra_args=("-trace", f"enable=vtd_frr_new,file={trace}", *extra))
        return Guest(self.drv, name, trace)

    def cleanup(self) -> None:
        failed = getattr(self.request.node, "rep_call", None)
        for n in self.names:
            try:
                vm = self.drv.info(n)
            except HvError:
                continue
            if failed is not None and failed.failed and vm.console_log and vm.console_log.exists():
                sys.stderr.write(f"--- console of {n} ---\n"
                                 + vm.console_log.read_text(errors="replace")[-4000:])
            with contextlib.suppress(HvError):
                self.drv.kill(n)
            with contextlib.suppress(HvError):
                self.drv.undefine(n)


@pytest.fixture
def guests(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Guests]:
    g = Guests(request, tmp_path)
    yield g
    g.cleanup()


def checks(out: str) -> dict[str, str]:
    """``check NAME ok|FAIL ...`` lines of hvtdma, as {name: "ok"|"FAIL"}; fails on any FAIL."""
    found = {m.group(1): m.group(2) for m in _CHECK.finditer(out)}
    assert found and all(v == "ok" for v in found.values()), out
    return found


def fault_records(trace: Path) -> list[dict[str, int]]:
    """Every fault record QEMU's intel-iommu wrote, decoded (VT-d s11.4.7.6)."""
    text = trace.read_text(errors="replace") if trace.exists() else ""
    records = []
    for m in _FRR.finditer(text):
        value = int(m.group(2), 16) << 64 | int(m.group(3), 16)
        records.append({f: FaultRecord.get(value, f)
                        for f in ("SID", "PP", "PV", "FR", "T1", "T2", "FI")})
    return records


def _image_files(img: GuestImage) -> dict[str, str]:
    return {"kernel": str(img.kernel), "initrd": str(img.initrd)}


# -- the image variant ------------------------------------------------------------------------

def test_variant_leaves_the_default_key_material_alone(tmp_path: Path) -> None:
    deb = tmp_path / "h.deb"
    deb.write_bytes(b"headers")
    def inputs(**variant: Any) -> image_mod._Inputs:
        return image_mod._Inputs("linux-image-x", "1", deb, "d", deb, "b", {"init": "i"},
                                 **variant)

    default = inputs()
    assert set(default.key_material()) == {
        "format", "kernel_package", "kernel_version", "deb_sha256", "busybox_version",
        "sources", "boot_modules", "extra_modules", "compression"}
    variant = inputs(variant=image_mod.VARIANTS["pasid"], headers=(deb,),
                     kmod_sources={"hvtpasid/Kbuild": "k"})
    extra = {k: v for k, v in variant.key_material().items() if k not in default.key_material()}
    assert set(extra) == {"variant", "headers", "kmods"} and variant.key != default.key


def test_pasid_image_ships_the_module(pasid_image: GuestImage) -> None:
    ko = pasid_image.modules / "extra" / "hvtpasid.ko"
    assert ko.is_file() and b"vermagic=" + pasid_image.kernel_version.encode() in ko.read_bytes()
    dep = (pasid_image.modules / "modules.dep").read_text()
    assert "extra/hvtpasid.ko:" in dep
    assert pasid_image.root.parent.joinpath("current-pasid").resolve() == pasid_image.root
    assert "hvtdma" in pasid_image.helpers


# -- stock QEMU: the plumbing, with the edu device -------------------------------------------

def test_hvtpasid_maps_pinned_user_pages_for_a_device(guests: Guests,
                                                      pasid_image: GuestImage) -> None:
    g = guests.start("edu-k", {**_image_files(pasid_image), "iommu": "scalable,pasid,flts"},
                     "-device", "edu,addr=0x10")
    _, kver = g.sh("uname -r")
    assert kver.strip() == pasid_image.kernel_version
    g.sh("modprobe hvtpasid && echo 1234 11e8 > /sys/bus/pci/drivers/hvtpasid/new_id")
    _, out = g.sh("hvtdma edu kmod")
    assert checks(out) == {"edu-roundtrip": "ok"}
    assert "flags=0" in out  # edu has no PASID capability: the domain is on its requester ID
    _, dmesg = g.sh("dmesg")
    assert "hvtpasid 0000:00:10.0: hvtpasid: domain attached to RID" in dmesg


def test_vfio_maps_user_pages_for_a_device(guests: Guests, image: GuestImage) -> None:
    g = guests.start("edu-v", {"iommu": "scalable,pasid,flts"}, "-device", "edu,addr=0x10")
    _, out = g.sh("hvtdma edu vfio 0000:00:10.0")
    assert checks(out) == {"edu-roundtrip": "ok"}


# -- patched QEMU: PASID-tagged DMA through the guest kernel's scalable-mode IOMMU ----------

@pytest.mark.parametrize("iommu", ["scalable,pasid,flts", "scalable,pasid"],
                         ids=["first-stage", "second-stage"])
def test_pasid_tagged_dma_end_to_end(guests: Guests, pasid_image: GuestImage,
                                     patched_qemu: Path, iommu: str) -> None:
    g = guests.start("pasid", {**_image_files(pasid_image), "iommu": iommu,
                               "devices": [{"type": "hvt-pci", "id": "hvt0"}]})
    _, bdf = g.sh("hvtdma list")
    bdf = bdf.strip()
    g.sh("modprobe hvtpasid")
    # In the background, so that its source buffer stays mapped while the host looks.
    g.sh("hvtdma pasid --len 65536 --fault --hold 600 </dev/null >/tmp/pasid.out 2>&1 &")
    deadline = time.monotonic() + 120
    while "holding" not in (out := g.sh("cat /tmp/pasid.out")[1]):
        assert time.monotonic() < deadline and "hvtdma:" not in out, out
        time.sleep(0.5)
    assert checks(out) == {
        "pasid-enabled": "ok", "mem2dev-pasid": "ok", "dev2mem-pasid": "ok",
        "mem2mem-pasid": "ok", "completed-count": "ok", "dev2mem-no-pasid-faults": "ok",
        "dev2mem-pasid-after-unmap-faults": "ok"}
    m = re.search(r"device=(\S+) pasid=(\d+) flags=(0x[0-9a-f]+|0)", out)
    assert m and m.group(1) == bdf, out
    pasid = int(m.group(2))
    assert pasid > 0
    slot, fn = int(bdf.split(":")[2].split(".")[0], 16), int(bdf.split(".")[1])
    sid = int(bdf.split(":")[1], 16) << 8 | slot << 3 | fn

    # Host side 0: the tables the guest kernel wrote, walked by hvtools' VT-d model. The
    # device has a PASID-table entry for that PASID, of the type the vIOMMU offers, that maps
    # the source IOVA to guest memory holding the source's bytes; the same IOVA without a
    # PASID (the requester ID's RID_PASID entry) maps nothing.
    held = re.search(r"holding \d+s: iova (0x[0-9a-f]+) maps the source, whose first 16 bytes "
                     r"are ([0-9a-f]{32})", out)
    assert held, out
    iova, head = int(held.group(1), 16), bytes.fromhex(held.group(2))
    dev = tables_live(g.drv, g.name, pause=True).device(sid)
    assert dev is not None
    entry = {e.pasid: e for e in dev.pasid_entries}.get(pasid)
    assert entry is not None and entry.pgtt == ("first-stage" if "flts" in iommu
                                                else "second-stage"), dev.to_json()
    tagged = translate_live(g.drv, g.name, sid, pasid, iova, write=False, pause=True).outcome
    assert isinstance(tagged, Translation), tagged
    with open_ram(g.drv, g.name) as ram:
        assert ram.read(tagged.output, 16) == head
    untagged = translate_live(g.drv, g.name, sid, None, iova, write=False, pause=True).outcome
    assert isinstance(untagged, Fault), untagged
    g.sh("kill $(pidof hvtdma)")

    # Host side 1: QEMU created the device's address space for requests with that PASID.
    mtree = g.drv.hmp(g.name, "info mtree")
    assert f"vtd-{slot:02x}.{fn}-pasid-{pasid:x}" in mtree, mtree[:3000]

    # Host side 2: the fault records, both writes (T1=T2=0) at the destination IOVA
    # 0x80000000 from the device's source ID. The untagged control (nothing mapped there in the
    # requester ID's domain) is recorded as the RID_PASID's request, PV=0 (QEMU reports every
    # scalable-mode fault with PP=1); the PASID-tagged write after HVTP_UNMAP has PV=pasid.
    recs = [r for r in fault_records(g.trace) if r["SID"] == sid]
    assert all(r["T1"] == 0 and r["T2"] == 0 and r["FI"] << 12 == 0x80000000 for r in recs)
    assert sorted((r["PP"], r["PV"]) for r in recs) == [(1, 0), (1, pasid)], recs
    # ... and the guest's own fault handler reported it with the PASID (drivers/iommu/intel).
    _, dmesg = g.sh("dmesg")
    assert re.search(rf"\[DMA Write PASID 0x{pasid:x}\] Request device \[{bdf[5:]}\]"
                     r" fault addr 0x80000000", dmesg), dmesg[-3000:]


# -- patched QEMU: the secure interface from a guest (vfio-pci, default image) ---------------

@pytest.mark.parametrize("level", ["confidential", "trusted"])
def test_secure_interface_from_the_guest(guests: Guests, image: GuestImage,
                                         patched_qemu: Path, level: str) -> None:
    g = guests.start(level[:4], {"iommu": "scalable,pasid,flts", "security_level": level,
                                 "devices": [{"type": "hvt-pci", "id": "hvt0"}]})
    _, out = g.sh("hvtdma vfio-check")
    found = checks(out)
    assert f"level={level}" in out
    if level == "confidential":
        assert set(found) == {
            "confidential-no-window-blocked", "confidential-window-locked",
            "confidential-writes-inside-window", "confidential-write-outside-blocked",
            "confidential-straddling-end-blocked", "confidential-reads-from-window",
            "confidential-read-outside-blocked"}
        assert "blocked=4 completed=2" in out  # 4 refused, 2 allowed, as the checks expect
    else:
        assert set(found) == {"trusted-writes-without-window", "trusted-writes-outside-window",
                              "trusted-unmapped-iova-faults"}
        assert "blocked=0 completed=2" in out


def test_confidential_window_admits_only_its_pasid(guests: Guests, pasid_image: GuestImage,
                                                   patched_qemu: Path) -> None:
    g = guests.start("cpasid", {**_image_files(pasid_image), "iommu": "scalable,pasid,flts",
                                "security_level": "confidential",
                                "devices": [{"type": "hvt-pci", "id": "hvt0"}]})
    g.sh("modprobe hvtpasid")
    _, out = g.sh("hvtdma pasid --len 16384")
    assert checks(out) == {
        "pasid-enabled": "ok", "confidential-pasid-window-writes": "ok",
        "confidential-untagged-blocked": "ok", "confidential-other-pasid-blocked": "ok",
        "confidential-tagged-outside-blocked": "ok", "confidential-pasid-window-reads": "ok",
        "confidential-blocked-count": "ok"}
    assert not fault_records(g.trace)  # refused by the device before any request reached the IOMMU
