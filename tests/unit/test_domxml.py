"""Rendering specs to libvirt domain XML, against golden files and the semantics they must carry.

The cases mirror tests/unit/test_qemu_cmdline.py so that the two renderings of one spec can be
read side by side (tests/data/qemu-<case>.args, tests/data/libvirt-<case>.xml).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hvtools.libvirt.domxml import (
    HVTOOLS_NS,
    IOMMU_ALIAS,
    QEMU_NS,
    domain_accel,
    domain_paths,
    render_domain_xml,
    spec_from_domain_xml,
    spec_from_metadata,
)
from hvtools.spec import AGENT_PORT, Accel, LaunchPlan, VmSpec, spec_from_mapping

STATE = Path("/var/lib/hvtools/libvirt/t")
PLAN = LaunchPlan(accel=Accel.TCG, kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd"),
                  ram_path=Path("/var/lib/libvirt/qemu/ram/t"),
                  agent_socket=STATE / "agent.sock", console_log=STATE / "console.log",
                  vhost_sockets={"vub0": STATE / "vub-vub0.sock"})
KVM_PLAN = LaunchPlan(accel=Accel.KVM, kernel=PLAN.kernel, initrd=PLAN.initrd,
                      ram_path=PLAN.ram_path, agent_socket=PLAN.agent_socket,
                      console_log=PLAN.console_log)

CASES: dict[str, dict[str, object]] = {
    "default": {"name": "t1"},
    "legacy": {"name": "t2", "iommu": "legacy", "memory": "512M", "vcpus": 1},
    "none": {"name": "t3", "iommu": "none"},
    "devices": {"name": "t4", "iommu": {"mode": "scalable,pasid", "caching_mode": True},
                "kernel_args": ["loglevel=7", "quiet"],
                "devices": [{"type": "virtio-rng"}, {"type": "virtio-blk", "path": "/d.img"},
                            {"type": "virtio-net", "iommu_platform": False}],
                "ivshmem": [{"name": "shm0", "size": "4M"}]},
    "kvm": {"name": "t5", "accel": "kvm", "iommu": "scalable,device-iotlb,no-intremap",
            "cpu": "EPYC", "devices": [{"type": "virtio-net"}, {"type": "virtio-net"}]},
    "vhost": {"name": "t6", "memory": "512M",
              "devices": [{"type": "vhost-user-blk", "path": "/disk.img"}]},
}
Q = f"{{{QEMU_NS}}}"


def _spec(case: str) -> VmSpec:
    return spec_from_mapping(CASES[case])


def _render(case: str) -> str:
    spec = _spec(case)
    if spec.accel is Accel.KVM:
        return render_domain_xml(spec, KVM_PLAN, emulator="/usr/bin/qemu-system-x86_64",
                                 uuid="8f0b4f6e-2d0c-4b8e-9a55-0c3f1d2e4a10")
    return render_domain_xml(spec, PLAN)


def _root(case: str) -> ET.Element:
    return ET.fromstring(_render(case))


def _override_props(root: ET.Element) -> dict[str, str]:
    device = root.find(f"{Q}override/{Q}device")
    if device is None:
        return {}
    assert device.get("alias") == IOMMU_ALIAS
    return {p.get("name", ""): p.get("value", "")
            for p in device.iterfind(f"{Q}frontend/{Q}property")}


def _virtio_elements(root: ET.Element) -> list[ET.Element]:
    """Every virtio device of the domain: the virtio-serial controller, rng, disks, NICs."""
    devs = root.find("devices")
    assert devs is not None
    out = [c for c in devs.iterfind("controller") if c.get("type") == "virtio-serial"]
    out += devs.findall("rng") + devs.findall("disk") + devs.findall("interface")
    return out


def _iommu_on(el: ET.Element) -> bool:
    driver = el.find("driver")
    return driver is not None and driver.get("iommu") == "on"


def _model(el: ET.Element) -> str | None:
    if el.tag == "interface":
        model = el.find("model")
        return None if model is None else model.get("type")
    return el.get("model")


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str, golden: object) -> None:
    golden.check(f"libvirt-{case}.xml", _render(case))  # type: ignore[attr-defined]


@pytest.mark.parametrize("case", sorted(CASES))
def test_deterministic_and_metadata_round_trip(case: str) -> None:
    xml = _render(case)
    assert xml == _render(case)
    assert spec_from_domain_xml(xml) == _spec(case)
    # libvirt's virDomainGetMetadata returns the element without its namespace.
    meta = ET.fromstring(xml).find(f"metadata/{{{HVTOOLS_NS}}}vm")
    assert meta is not None
    bare = ET.tostring(meta, encoding="unicode").replace("hvtools:", "").replace(
        f' xmlns:hvtools="{HVTOOLS_NS}"', "")
    assert spec_from_metadata(bare) == _spec(case)


def test_iommu_properties_default() -> None:
    root = _root("default")
    iommu = root.find("devices/iommu")
    assert iommu is not None and iommu.get("model") == "intel"
    assert iommu.find("driver").attrib == {  # type: ignore[union-attr]
        "intremap": "on", "caching_mode": "off", "iotlb": "off", "aw_bits": "48"}
    assert _override_props(root) == {"x-scalable-mode": "true", "x-pasid-mode": "true",
                                     "x-flts": "true"}
    assert all(p.get("type") == "bool"
               for p in root.iterfind(f"{Q}override/{Q}device/{Q}frontend/{Q}property"))
    # intremap needs the IOAPIC in QEMU: kernel-irqchip=split.
    assert root.find("features/ioapic").get("driver") == "qemu"  # type: ignore[union-attr]


def test_iommu_properties_legacy_and_flags() -> None:
    assert _override_props(_root("legacy")) == {"x-scalable-mode": "false",
                                                "x-pasid-mode": "false", "x-flts": "false"}
    root = _root("devices")
    assert root.find("devices/iommu/driver").get("caching_mode") == "on"  # type: ignore[union-attr]
    assert _override_props(root)["x-flts"] == "false"
    kvm = _root("kvm")
    driver = kvm.find("devices/iommu/driver")
    assert driver is not None and driver.get("iotlb") == "on" and driver.get("intremap") == "off"
    assert kvm.find("features/ioapic") is None


@pytest.mark.parametrize("case", sorted(CASES))
def test_virtio_devices_behind_iommu(case: str) -> None:
    spec, root = _spec(case), _root(case)
    elements = _virtio_elements(root)
    assert len(elements) == 1 + len(spec.devices)
    by_alias = {el.find("alias").get("name"): el  # type: ignore[union-attr]
                for el in elements if el.find("alias") is not None}
    expected = {f"ua-{d.id}": spec.device_iommu_platform(d) for d in spec.devices}
    assert {a: _iommu_on(el) for a, el in by_alias.items()} == expected
    vser = elements[0]
    assert _iommu_on(vser) == (spec.iommu is not None)
    for el in elements:
        # iommu_platform needs a modern-only device (QEMU: disable-legacy=on).
        assert _model(el) == ("virtio-non-transitional" if _iommu_on(el) else "virtio"), el.tag


def test_no_iommu() -> None:
    root = _root("none")
    assert root.find("devices/iommu") is None
    assert root.find(f"{Q}override") is None
    assert root.find("features/ioapic") is None
    assert "intel_iommu" not in (root.findtext("os/cmdline") or "")


@pytest.mark.parametrize("case", sorted(CASES))
def test_guest_wiring(case: str) -> None:
    spec, root = _spec(case), _root(case)
    plan = KVM_PLAN if spec.accel is Accel.KVM else PLAN
    assert root.get("type") == ("kvm" if spec.accel is Accel.KVM else "qemu")
    assert domain_accel(_render(case)) is plan.accel
    backing = root.find("memoryBacking")
    assert backing is not None
    assert backing.find("source").get("type") == "file"  # type: ignore[union-attr]
    assert backing.find("access").get("mode") == "shared"  # type: ignore[union-attr]
    assert int(root.findtext("memory") or 0) * (1 << 20) == spec.memory
    assert root.find("memory").get("unit") == "MiB"  # type: ignore[union-attr]
    assert root.findtext("os/kernel") == str(plan.kernel)
    assert root.findtext("os/initrd") == str(plan.initrd)
    assert root.findtext("os/cmdline") == " ".join(spec.guest_kernel_args)
    assert [root.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3
    paths = domain_paths(_render(case))
    assert (paths.agent_socket, paths.console_log) == (plan.agent_socket, plan.console_log)
    channel = root.find("devices/channel")
    assert channel is not None and channel.get("type") == "unix"
    assert channel.find("source").attrib == {  # type: ignore[union-attr]
        "mode": "bind", "path": str(plan.agent_socket)}
    assert channel.find("target").attrib == {  # type: ignore[union-attr]
        "type": "virtio", "name": AGENT_PORT}
    seclabel = root.find("seclabel")
    assert seclabel is not None and seclabel.attrib == {"type": "static", "model": "dac",
                                                        "relabel": "no"}
    assert seclabel.findtext("label") == "+0:+0"


def test_cpu_models() -> None:
    assert _root("default").find("cpu").get("mode") == "maximum"  # type: ignore[union-attr]
    cpu = _root("kvm").find("cpu")
    assert cpu is not None and cpu.get("mode") == "custom" and cpu.findtext("model") == "EPYC"
    spec = _spec("default")
    host = ET.fromstring(render_domain_xml(spec, KVM_PLAN)).find("cpu")
    assert host is not None and host.get("mode") == "host-passthrough"


def test_devices_case() -> None:
    root = _root("devices")
    disk = root.find("devices/disk")
    assert disk is not None
    assert disk.find("source").get("file") == "/d.img"  # type: ignore[union-attr]
    assert disk.find("driver").attrib == {  # type: ignore[union-attr]
        "name": "qemu", "type": "raw", "iommu": "on"}
    assert root.find("devices/interface").get("type") == "user"  # type: ignore[union-attr]
    assert root.find("devices/rng/backend").text == "/dev/urandom"  # type: ignore[union-attr]
    shmem = root.find("devices/shmem")
    assert shmem is not None and shmem.get("name") == "shm0"
    assert shmem.find("model").get("type") == "ivshmem-plain"  # type: ignore[union-attr]
    assert (shmem.findtext("size"), shmem.find("size").get("unit")) == (  # type: ignore[union-attr]
        "4", "M")
    # Two NICs get QEMU's consecutive default MACs.
    macs = [m.get("address") for m in _root("kvm").iterfind("devices/interface/mac")]
    assert macs == ["52:54:00:12:34:56", "52:54:00:12:34:57"]


def test_metadata_is_the_spec_mapping() -> None:
    spec = _spec("devices")
    el = _root("devices").find(f"metadata/{{{HVTOOLS_NS}}}vm/{{{HVTOOLS_NS}}}spec")
    assert el is not None and el.get("format") == "json"
    assert json.loads(el.text or "") == spec.to_mapping()


def test_vhost_user_blk_disk_names_the_backend_socket() -> None:
    root = ET.fromstring(_render("vhost"))
    disk = root.find("devices/disk[@type='vhostuser']")
    assert disk is not None
    src = disk.find("source")
    assert src is not None and src.get("type") == "unix"
    assert src.get("path") == str(STATE / "vub-vub0.sock")
    target = disk.find("target")
    assert target is not None and target.get("dev") == "vda" and target.get("bus") == "virtio"
    # vhost-user needs guest RAM the backend can map: shared memory backing.
    access = root.find("memoryBacking/access")
    assert access is not None and access.get("mode") == "shared"
