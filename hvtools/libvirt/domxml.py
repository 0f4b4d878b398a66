"""Render a :class:`~hvtools.spec.VmSpec` to libvirt domain XML, the libvirt driver's form.

The guest is the one :func:`hvtools.qemu.cmdline.render_argv` builds, spelled in libvirt's domain
XML format (https://libvirt.org/formatdomain.html; section names are cited below). Where libvirt
9.0 has no element for a QEMU property (``intel-iommu``'s ``x-scalable-mode``, ``x-pasid-mode``,
``x-flts``), the QEMU namespace's ``<qemu:override>`` sets it on the device's frontend
(https://libvirt.org/kbase/qemu-passthrough-security.html, "Overriding properties of QEMU
devices"; libvirt >= 8.2).

This module is pure: no libvirt import, and the same spec and plan always give the same text, so
golden files in ``tests/data`` can hold it.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from hvtools.errors import UsageError
from hvtools.spec import (
    AGENT_PORT,
    Accel,
    DeviceSpec,
    DeviceType,
    LaunchPlan,
    MiB,
    VmSpec,
    spec_from_mapping,
)

#: libvirt's QEMU namespace for ``<qemu:commandline>``/``<qemu:override>`` (formatdomain,
#: "QEMU command-line passthrough").
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
#: hvtools' own namespace for the ``<metadata>`` element (formatdomain, "Meta-data").
HVTOOLS_NS = "urn:hvtools:libvirt:domain:1"
#: Prefix the metadata element is stored under (``virDomainSetMetadata``'s ``key``).
HVTOOLS_PREFIX = "hvtools"
#: The alias libvirt gives the one ``<iommu>`` device, i.e. the QEMU device id ``<qemu:override>``
#: addresses (libvirt's qemuAssignDeviceIOMMUAlias).
IOMMU_ALIAS = "iommu0"
#: Metadata format version, bumped if the element's layout changes.
METADATA_VERSION = "1"

ET.register_namespace("qemu", QEMU_NS)
ET.register_namespace(HVTOOLS_PREFIX, HVTOOLS_NS)


def _q(tag: str) -> str:
    return f"{{{QEMU_NS}}}{tag}"


def _h(tag: str) -> str:
    return f"{{{HVTOOLS_NS}}}{tag}"


def _onoff(value: bool) -> str:
    return "on" if value else "off"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _user_alias(dev_id: str) -> str:
    """User aliases must start with ``ua-`` (formatdomain, "Devices": alias); it becomes the id."""
    return f"ua-{dev_id}"


def _virtio_model(platform: bool) -> str:
    """``virtio-non-transitional`` is modern-only, QEMU's ``disable-legacy=on``, which
    ``iommu_platform`` needs (formatdomain, "Virtio transitional devices"; virtio 1.0
    VIRTIO_F_ACCESS_PLATFORM is a modern-only feature)."""
    return "virtio-non-transitional" if platform else "virtio"


def _driver_iommu(parent: ET.Element, platform: bool, **attrs: str) -> None:
    """``<driver iommu='on'/>`` is QEMU's ``iommu_platform=on`` (formatdomain, "Virtio-related
    options"). Other driver attributes, if any, share the element."""
    if platform:
        attrs["iommu"] = "on"
    if attrs:
        _sub(parent, "driver", **attrs)


def _metadata(root: ET.Element, spec: VmSpec) -> None:
    """The spec as JSON under hvtools' namespace (formatdomain, "Meta-data")."""
    meta = _sub(root, "metadata")
    vm = _sub(meta, _h("vm"), version=METADATA_VERSION)
    _sub(vm, _h("spec"), json.dumps(spec.to_mapping(), sort_keys=True), format="json")


def _os(root: ET.Element, spec: VmSpec, plan: LaunchPlan) -> None:
    """Direct kernel boot (formatdomain, "Direct kernel boot")."""
    os_el = _sub(root, "os")
    _sub(os_el, "type", "hvm", arch="x86_64", machine=spec.machine)
    _sub(os_el, "kernel", str(plan.kernel))
    _sub(os_el, "initrd", str(plan.initrd))
    _sub(os_el, "cmdline", " ".join(spec.guest_kernel_args))


def _cpu(root: ET.Element, spec: VmSpec, plan: LaunchPlan) -> None:
    """``-cpu max`` is ``mode='maximum'``, ``-cpu host`` is ``host-passthrough``, a named model
    is ``custom`` (formatdomain, "CPU model and topology")."""
    if spec.cpu:
        cpu = _sub(root, "cpu", mode="custom", match="exact", check="none")
        _sub(cpu, "model", spec.cpu, fallback="forbid")
    else:
        mode = "host-passthrough" if plan.accel is Accel.KVM else "maximum"
        # migratable='on' keeps QEMU's default for max/host (the qemu driver's -cpu max/host).
        _sub(root, "cpu", mode=mode, check="none", migratable="on")


def _iommu(devices: ET.Element, spec: VmSpec) -> None:
    """``intel-iommu`` (formatdomain, "IOMMU devices"): intremap, caching_mode, iotlb
    (device-iotlb) and aw_bits have attributes; the x- properties go in ``<qemu:override>``."""
    io = spec.iommu
    if io is None:
        return
    iommu = _sub(devices, "iommu", model="intel")
    _sub(iommu, "driver", intremap=_onoff(io.intremap), caching_mode=_onoff(io.caching_mode),
         iotlb=_onoff(io.device_iotlb), aw_bits=str(io.aw_bits))


def _override(root: ET.Element, spec: VmSpec) -> None:
    """``x-scalable-mode``, ``x-pasid-mode``, ``x-flts`` on the iommu's QEMU frontend, every
    one spelled out as in :func:`hvtools.qemu.cmdline.iommu_device_arg`."""
    io = spec.iommu
    if io is None:
        return
    override = _sub(root, _q("override"))
    device = _sub(override, _q("device"), alias=IOMMU_ALIAS)
    frontend = _sub(device, _q("frontend"))
    for prop, value in (("x-scalable-mode", io.scalable_mode), ("x-pasid-mode", io.pasid),
                        ("x-flts", io.flts)):
        _sub(frontend, _q("property"), name=prop, type="bool", value=str(value).lower())


def _device(devices: ET.Element, spec: VmSpec, plan: LaunchPlan, dev: DeviceSpec) -> None:
    """One virtio device (formatdomain: "Random number generator device", "Hard drives,
    floppy disks, CDROMs", "Network interfaces": userspace connection)."""
    platform = spec.device_iommu_platform(dev)
    model = _virtio_model(platform)
    if dev.type is DeviceType.RNG:
        el = _sub(devices, "rng", model=model)
        _sub(el, "backend", "/dev/urandom", model="random")
        _driver_iommu(el, platform)
    elif dev.type is DeviceType.VHOST_USER_BLK:
        # formatdomain "Hard drives": type='vhostuser'; QEMU is the client and reconnects.
        el = _sub(devices, "disk", type="vhostuser", device="disk", model=model)
        _sub(el, "driver", name="qemu", type="raw")
        src = _sub(el, "source", type="unix", path=str(plan.vhost_sockets[dev.id]))
        _sub(src, "reconnect", enabled="yes", timeout="1")
        _sub(el, "target", dev=_disk_name(spec, dev), bus="virtio")
    elif dev.type is DeviceType.BLK:
        assert dev.path is not None
        el = _sub(devices, "disk", type="file", device="disk", model=model)
        _driver_iommu(el, platform, name="qemu", type="raw")
        _sub(el, "source", file=dev.path)
        _sub(el, "target", dev=_disk_name(spec, dev), bus="virtio")
    else:
        el = _sub(devices, "interface", type="user")
        # QEMU's own default MACs, 52:54:00:12:34:56 upwards, as the qemu driver gets them.
        nics = [d.id for d in spec.devices if d.type is DeviceType.NET]
        _sub(el, "mac", address=f"52:54:00:12:34:{0x56 + nics.index(dev.id):02x}")
        _sub(el, "model", type=model)
        _driver_iommu(el, platform)
    _sub(el, "alias", name=_user_alias(dev.id))


def _disk_name(spec: VmSpec, dev: DeviceSpec) -> str:
    blks = [d.id for d in spec.devices if d.type.takes_path]
    return "vd" + "abcdefghijklmnopqrstuvwxyz"[blks.index(dev.id)]


def render_domain_xml(spec: VmSpec, plan: LaunchPlan, *, emulator: str | None = None,
                      uuid: str | None = None) -> str:
    """The domain XML for ``spec`` under ``plan``: the guest ``render_argv`` builds.

    ``emulator`` pins the QEMU binary (formatdomain, "Devices": emulator); None lets libvirt
    pick its default for the architecture. ``uuid`` is the existing domain's, when redefining
    it (formatdomain, "General metadata"). ``plan.ram_path`` and ``plan.qmp_socket`` do not
    appear: libvirt puts file-backed RAM under qemu.conf's ``memory_backing_dir`` and owns
    the monitor.
    """
    if spec.patched_devices:
        # Refused rather than smuggled in through <qemu:commandline>: libvirt would neither
        # address, label nor migrate a device it cannot see. The qemu driver runs it.
        raise UsageError(f"VM {spec.name!r} has {', '.join(spec.patched_devices)}, a device of "
                         "the patched QEMU that the libvirt driver does not run: use "
                         "--driver qemu")
    root = ET.Element("domain", type="kvm" if plan.accel is Accel.KVM else "qemu")
    _sub(root, "name", spec.name)
    if uuid:
        _sub(root, "uuid", uuid)
    _metadata(root, spec)
    _sub(root, "memory", str(spec.memory // MiB), unit="MiB")
    # Shared file-backed RAM: memory-backend-file,share=on (formatdomain, "Memory Backing").
    backing = _sub(root, "memoryBacking")
    _sub(backing, "source", type="file")
    _sub(backing, "access", mode="shared")
    _sub(root, "vcpu", str(spec.vcpus), placement="static")
    _os(root, spec, plan)
    # kernel-irqchip=split is <ioapic driver='qemu'/>, needed by intremap (formatdomain,
    # "Hypervisor features").
    features = _sub(root, "features")
    _sub(features, "acpi")
    if spec.split_irqchip:
        _sub(features, "ioapic", driver="qemu")
    _cpu(root, spec, plan)
    # QEMU's -no-reboot: every guest exit ends the domain (formatdomain, "Events configuration").
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(root, event, "destroy")

    devices = _sub(root, "devices")
    if emulator:
        _sub(devices, "emulator", emulator)
    # -nodefaults: no USB controller, no balloon (formatdomain, "Controllers", "Memory balloon").
    _sub(devices, "controller", type="usb", model="none")
    vser_platform = spec.iommu is not None
    vser = _sub(devices, "controller", type="virtio-serial", index="0",
                model=_virtio_model(vser_platform))
    _driver_iommu(vser, vser_platform)
    # Serial console to a file (formatdomain, "Consoles, serial, parallel & channel devices").
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(plan.console_log), append="off")
    _sub(serial, "target", port="0")
    # The agent's virtio-serial port on a listening unix socket (formatdomain, "Channel").
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", path=str(plan.agent_socket))
    _sub(channel, "target", type="virtio", name=AGENT_PORT)
    _iommu(devices, spec)
    for dev in spec.devices:
        _device(devices, spec, plan, dev)
    for region in spec.ivshmem:
        # ivshmem-plain over /dev/shm/<name> (formatdomain, "Shared memory device").
        shmem = _sub(devices, "shmem", name=region.name)
        _sub(shmem, "model", type="ivshmem-plain")
        _sub(shmem, "size", str(region.size // MiB), unit="M")
        _sub(shmem, "alias", name=_user_alias(region.name))
    _sub(devices, "memballoon", model="none")

    # QEMU runs as root and nothing is relabelled: hvtools' image files stay as they are
    # (formatdomain, "Security label"; the DAC model's static label user:group).
    seclabel = _sub(root, "seclabel", type="static", model="dac", relabel="no")
    _sub(seclabel, "label", "+0:+0")
    _override(root, spec)

    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


# -- reading back ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainPaths:
    """Host paths hvtools needs from a defined domain's XML."""

    agent_socket: Path | None
    console_log: Path | None


def spec_from_domain_xml(xml: str) -> VmSpec | None:
    """The spec stored in the domain's hvtools metadata, or None for a foreign domain."""
    root = ET.fromstring(xml)
    el = root.find(f"metadata/{_h('vm')}/{_h('spec')}")
    if el is None or not el.text:
        return None
    return spec_from_mapping(json.loads(el.text))


def spec_from_metadata(element_xml: str) -> VmSpec:
    """The spec from the metadata element alone (``virDomainGetMetadata``'s answer, which
    libvirt returns without the namespace)."""
    root = ET.fromstring(element_xml)
    el = root.find(_h("spec"))
    if el is None:
        el = root.find("spec")
    if el is None or not el.text:
        raise ValueError("hvtools metadata without a spec")
    return spec_from_mapping(json.loads(el.text))


def domain_paths(xml: str) -> DomainPaths:
    """The agent socket and console log a domain's XML names."""
    root = ET.fromstring(xml)
    agent = console = None
    for channel in root.iterfind("devices/channel"):
        target = channel.find("target")
        source = channel.find("source")
        if target is not None and target.get("name") == AGENT_PORT and source is not None:
            path = source.get("path")
            agent = Path(path) if path else None
    for serial in root.iterfind("devices/serial"):
        source = serial.find("source")
        if serial.get("type") == "file" and source is not None and source.get("path"):
            console = Path(source.get("path", ""))
            break
    return DomainPaths(agent_socket=agent, console_log=console)


def domain_accel(xml: str) -> Accel:
    """The accelerator a domain's ``type`` attribute names."""
    return Accel.KVM if ET.fromstring(xml).get("type") == "kvm" else Accel.TCG
