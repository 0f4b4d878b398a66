"""The declarative VM spec: one typed model that renders to QEMU arguments and to libvirt XML.

A spec comes from a TOML file and/or CLI flags (:func:`spec_from_mapping`, :func:`apply_overrides`)
and is validated on construction: every problem is a :class:`~hvtools.errors.SpecError` naming
the offending key, raised before anything is started.

TOML form::

    name = "t1"
    memory = "1G"
    vcpus = 2
    accel = "auto"                 # auto | tcg | kvm
    kernel_args = ["loglevel=7"]
    [iommu]
    mode = "scalable,pasid,flts"   # shorthand, or the individual keys below
    caching_mode = false
    security_level = "trusted"     # trusted | confidential: the hvt-pci devices' security level
    [[devices]]
    type = "virtio-rng"
    [[devices]]
    type = "hvt-pci"               # the patched QEMU's PASID DMA device (hvtools qemu build)
    pasid_width = 20               # optional, 1..20
    [[ivshmem]]
    name = "shm0"
    size = "4M"
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from hvtools.errors import SpecError

MiB = 1 << 20
GiB = 1 << 30

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": MiB, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def parse_size(text: str | int, *, key: str = "memory") -> int:
    """Parse ``"1G"``, ``"512M"``, ``"512MiB"`` or a bare number of MiB into bytes."""
    if isinstance(text, bool):
        raise SpecError(key, f"{text!r} is not a size (use e.g. 512M or 1G)")
    if isinstance(text, int):
        return text * MiB
    m = _SIZE_RE.match(text)
    if not m:
        raise SpecError(key, f"{text!r} is not a size (use e.g. 512M or 1G)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def format_size(nbytes: int) -> str:
    """The shortest exact ``NG``/``NM``/``NK`` spelling of a size."""
    for unit, mult in (("G", GiB), ("M", MiB), ("K", 1 << 10)):
        if nbytes % mult == 0:
            return f"{nbytes // mult}{unit}"
    return str(nbytes)


class Accel(StrEnum):
    """Accelerator choice. ``auto`` resolves to KVM only if a probe guest really runs under it."""

    AUTO = "auto"
    TCG = "tcg"
    KVM = "kvm"


@dataclass(frozen=True)
class IommuSpec:
    """QEMU's ``intel-iommu`` device (VT-d), one field per QEMU property.

    ``x-pasid-mode`` and ``x-flts`` need ``x-scalable-mode`` (QEMU's own check, mirrored here so
    the error comes before any process starts); ``intremap`` needs ``kernel-irqchip=split``, which
    the renderers add.
    """

    scalable_mode: bool = False  # x-scalable-mode: VT-d 4.x scalable-mode translation (ECAP.SMTS)
    pasid: bool = False  # x-pasid-mode: PASID support (ECAP.PASID, PSS)
    flts: bool = False  # x-flts: first-stage translation (ECAP.FLTS)
    caching_mode: bool = False  # caching-mode: CAP.CM, needed for vfio assignment in the guest
    intremap: bool = True  # intremap: interrupt remapping (ECAP.IR)
    device_iotlb: bool = False  # device-iotlb: ATS (ECAP.DT)
    aw_bits: int = 48  # aw-bits: guest address width (CAP.SAGAW/MGAW)

    def __post_init__(self) -> None:
        if self.pasid and not self.scalable_mode:
            raise SpecError("iommu.pasid", "PASID needs scalable mode (add 'scalable')")
        if self.flts and not self.scalable_mode:
            raise SpecError("iommu.flts", "first-stage translation needs scalable mode")
        if self.aw_bits not in (39, 48):
            raise SpecError("iommu.aw_bits", f"{self.aw_bits} is not 39 or 48")
        if self.device_iotlb and self.pasid:
            # QEMU 10.0 intel-iommu refuses it: "PASID based device IOTLB is not supported".
            raise SpecError("iommu.device_iotlb", "QEMU 10.0 does not support device-iotlb "
                            "together with pasid")
        if self.flts and self.aw_bits != 48:
            raise SpecError("iommu.aw_bits", "first-stage translation needs aw_bits = 48")

    @property
    def shorthand(self) -> str:
        """The ``--iommu`` spelling of this configuration."""
        words = ["scalable" if self.scalable_mode else "legacy"]
        words += [w for w, on in (("pasid", self.pasid), ("flts", self.flts),
                                  ("caching-mode", self.caching_mode),
                                  ("device-iotlb", self.device_iotlb)) if on]
        if not self.intremap:
            words.append("no-intremap")
        return ",".join(words)


_SHORTHAND_WORDS: dict[str, tuple[str, bool]] = {
    "scalable": ("scalable_mode", True),
    "legacy": ("scalable_mode", False),
    "pasid": ("pasid", True),
    "flts": ("flts", True),
    "caching-mode": ("caching_mode", True),
    "cm": ("caching_mode", True),
    "intremap": ("intremap", True),
    "no-intremap": ("intremap", False),
    "device-iotlb": ("device_iotlb", True),
}


def parse_iommu(text: str) -> IommuSpec | None:
    """Parse the ``--iommu`` shorthand: ``none``, ``legacy``, or words like ``scalable,pasid,flts``.

    ``none`` means no vIOMMU at all. Unknown words are a :class:`SpecError`.
    """
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if words == ["none"]:
        return None
    if not words:
        raise SpecError("iommu", "empty; use none, legacy or e.g. scalable,pasid,flts")
    kwargs: dict[str, Any] = {}
    for w in words:
        if w not in _SHORTHAND_WORDS:
            known = ", ".join(["none", *_SHORTHAND_WORDS])
            raise SpecError("iommu", f"unknown word {w!r} (known: {known})")
        attr, value = _SHORTHAND_WORDS[w]
        kwargs[attr] = value
    return IommuSpec(**kwargs)


#: The vIOMMU a spec gets unless it says otherwise: the full scalable-mode configuration.
_DEFAULT_IOMMU = IommuSpec(scalable_mode=True, pasid=True, flts=True)


class DeviceType(StrEnum):
    """Devices a spec can add. Virtio ones get ``iommu_platform`` behind a vIOMMU."""

    RNG = "virtio-rng"
    BLK = "virtio-blk"
    NET = "virtio-net"
    #: virtio-blk served by hvtools' own vhost-user backend (hvtools.vhost.blk), which logs
    #: the guest memory it writes (issue 6).
    VHOST_USER_BLK = "vhost-user-blk"
    #: The patch series' PCIe endpoint with a PASID DMA engine and a secure interface
    #: (qemu-patches/README.md): only a patched QEMU has it (issue 5).
    HVT_PCI = "hvt-pci"

    @property
    def takes_path(self) -> bool:
        return self in (DeviceType.BLK, DeviceType.VHOST_USER_BLK)

    @property
    def is_virtio(self) -> bool:
        return self is not DeviceType.HVT_PCI

    @property
    def needs_patched_qemu(self) -> bool:
        """Only ``hvtools qemu build``'s QEMU has this device (stock 10.0.2 does not)."""
        return self is DeviceType.HVT_PCI


class SecurityLevel(StrEnum):
    """hvt-pci's ``security-level`` property (qemu-patches/README.md, "The secure interface
    and security levels"): ``trusted`` DMA reaches whatever the IOMMU maps; ``confidential``
    DMA only inside the bounce window the guest registered, with its PASID tag."""

    TRUSTED = "trusted"
    CONFIDENTIAL = "confidential"


#: hvt-pci's ``pasid-width`` range (the PASID capability's Max PASID Width, PCIe 6.0 s7.8.8.2).
PASID_WIDTH_RANGE = range(1, 21)


#: Guest kernel modules the cloud kernel needs for a device (virtio-rng and virtio-net are
#: built in or not needed for hvtools' own use).
_GUEST_MODULE = {DeviceType.BLK: "virtio_blk", DeviceType.VHOST_USER_BLK: "virtio_blk"}


@dataclass(frozen=True)
class DeviceSpec:
    """One device. ``iommu_platform=None`` follows the VM: on whenever a vIOMMU exists (virtio
    devices only; hvt-pci always does its DMA through the vIOMMU when there is one)."""

    type: DeviceType
    id: str
    path: str | None = None  # virtio-blk: the backing file (raw)
    iommu_platform: bool | None = None
    pasid_width: int | None = None  # hvt-pci only: None is the device's default (20)

    def __post_init__(self) -> None:
        if not self.type.is_virtio and self.iommu_platform is not None:
            raise SpecError(f"devices.{self.id}.iommu_platform",
                            f"{self.type} is not a virtio device")
        if self.pasid_width is not None:
            if self.type is not DeviceType.HVT_PCI:
                raise SpecError(f"devices.{self.id}.pasid_width", f"{self.type} has no PASID")
            if self.pasid_width not in PASID_WIDTH_RANGE:
                raise SpecError(f"devices.{self.id}.pasid_width",
                                f"{self.pasid_width} is not in 1..20")
        if self.type.takes_path and not self.path:
            raise SpecError(f"devices.{self.id}.path", f"{self.type} needs a backing file path")
        if not self.type.takes_path and self.path:
            raise SpecError(f"devices.{self.id}.path", f"{self.type} takes no path")
        if self.type is DeviceType.VHOST_USER_BLK and self.iommu_platform:
            # Behind a vIOMMU a vhost-user backend must translate IOVAs itself
            # (VHOST_USER_PROTOCOL_F_IOTLB, vhost-user.rst "IOMMU support"): not implemented.
            raise SpecError(f"devices.{self.id}.iommu_platform",
                            "vhost-user-blk does its DMA by guest-physical address "
                            "(the backend has no IOTLB support)")
        if not _NAME_RE.match(self.id):
            raise SpecError("devices.id", f"{self.id!r} is not a valid device id")


@dataclass(frozen=True)
class IvshmemSpec:
    """An ivshmem-plain region backed by ``/dev/shm/<name>`` (the path libvirt uses too)."""

    name: str
    size: int

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise SpecError("ivshmem.name", f"{self.name!r} is not a valid shared-memory name")
        # ivshmem's BAR2 must be a power of two (QEMU ivshmem.c).
        if self.size < MiB or self.size & (self.size - 1):
            raise SpecError(f"ivshmem.{self.name}.size", "must be a power of two, at least 1M")

    @property
    def path(self) -> Path:
        return Path("/dev/shm") / self.name


@dataclass(frozen=True)
class VmSpec:
    """Everything needed to boot one guest; validated on construction."""

    name: str
    memory: int = GiB  # bytes
    vcpus: int = 2
    accel: Accel = Accel.AUTO
    machine: str = "q35"
    cpu: str | None = None  # None: "max" under TCG, "host" under KVM
    iommu: IommuSpec | None = field(default_factory=lambda: _DEFAULT_IOMMU)
    devices: tuple[DeviceSpec, ...] = ()
    ivshmem: tuple[IvshmemSpec, ...] = ()
    kernel_args: tuple[str, ...] = ()
    kernel: str | None = None  # None: the current guest image
    initrd: str | None = None
    #: The VM's security level, set on each of its hvt-pci devices (``security-level``).
    security_level: SecurityLevel = SecurityLevel.TRUSTED

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise SpecError("name", f"{self.name!r} is not a valid VM name "
                            "(letters, digits, '_', '.', '-'; at most 63)")
        if self.vcpus < 1:
            raise SpecError("vcpus", f"{self.vcpus} vcpus: need at least 1")
        if self.vcpus > 64:
            raise SpecError("vcpus", f"{self.vcpus} vcpus: at most 64 are supported")
        if self.memory < 128 * MiB:
            raise SpecError("memory", f"{format_size(self.memory)} is too small (at least 128M)")
        if self.memory % MiB:
            raise SpecError("memory", "must be a whole number of MiB")
        if self.machine != "q35":
            raise SpecError("machine", f"{self.machine!r}: only q35 is supported (VT-d needs it)")
        ids = [d.id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise SpecError("devices", "device ids must be unique")
        shm = [r.name for r in self.ivshmem]
        if len(set(shm)) != len(shm):
            raise SpecError("ivshmem", "ivshmem names must be unique")
        for arg in self.kernel_args:
            if not arg or any(c.isspace() for c in arg):
                raise SpecError("kernel_args", f"{arg!r}: one argument per entry, no spaces")
        if (self.security_level is not SecurityLevel.TRUSTED
                and not any(d.type is DeviceType.HVT_PCI for d in self.devices)):
            # The device enforces the level; without one the setting would be a silent no-op.
            raise SpecError("security_level", f"{self.security_level} needs an hvt-pci device "
                            "(it is that device's property)")

    @property
    def patched_devices(self) -> tuple[str, ...]:
        """QEMU device types this VM needs that only the patched QEMU has (sorted, unique)."""
        return tuple(sorted({str(d.type) for d in self.devices if d.type.needs_patched_qemu}))

    @property
    def split_irqchip(self) -> bool:
        """Interrupt remapping needs the IOAPIC in QEMU: ``kernel-irqchip=split``."""
        return self.iommu is not None and self.iommu.intremap

    def device_iommu_platform(self, dev: DeviceSpec) -> bool:
        """Whether a virtio device does its DMA through the vIOMMU."""
        if dev.iommu_platform is None:
            return (self.iommu is not None and dev.type.is_virtio
                    and dev.type is not DeviceType.VHOST_USER_BLK)
        if dev.iommu_platform and self.iommu is None:
            raise SpecError(f"devices.{dev.id}.iommu_platform", "needs a vIOMMU (iommu = none)")
        return dev.iommu_platform

    @property
    def guest_kernel_args(self) -> tuple[str, ...]:
        """The kernel command line: console, vIOMMU switches, then the user's additions."""
        # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check
        # (arch/x86/kernel/apic/io_apic.c, check_timer) can miss its ticks and panic at boot.
        args = ["console=ttyS0", "panic=-1", "reboot=t", "no_timer_check"]
        if self.iommu is not None:
            # Linux intel-iommu: "on" enables DMA remapping, "sm_on" scalable mode
            # (Documentation/admin-guide/kernel-parameters.txt, intel_iommu=).
            args.append("intel_iommu=on,sm_on" if self.iommu.scalable_mode else "intel_iommu=on")
        # The guest's drivers for the spec's devices (the image's init modprobes them).
        mods = sorted({_GUEST_MODULE[d.type] for d in self.devices if d.type in _GUEST_MODULE})
        if mods and not any(a.startswith("hvtools.modules=") for a in self.kernel_args):
            args.append("hvtools.modules=" + ",".join(mods))
        return (*args, *self.kernel_args)

    def to_mapping(self) -> dict[str, Any]:
        """The TOML/JSON form; :func:`spec_from_mapping` reads it back to an equal spec."""
        out: dict[str, Any] = {
            "name": self.name, "memory": format_size(self.memory), "vcpus": self.vcpus,
            "accel": str(self.accel), "machine": self.machine,
            "iommu": ({"mode": "none"} if self.iommu is None else
                      {f.name: getattr(self.iommu, f.name) for f in fields(IommuSpec)}),
            "devices": [
                {k: v for k, v in (("type", str(d.type)), ("id", d.id), ("path", d.path),
                                   ("iommu_platform", d.iommu_platform),
                                   ("pasid_width", d.pasid_width)) if v is not None}
                for d in self.devices],
            "ivshmem": [{"name": r.name, "size": format_size(r.size)} for r in self.ivshmem],
            "kernel_args": list(self.kernel_args),
        }
        for key in ("cpu", "kernel", "initrd"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.security_level is not SecurityLevel.TRUSTED:
            out["security_level"] = str(self.security_level)
        return out


def _expect(value: object, typ: type | tuple[type, ...], key: str) -> Any:
    if isinstance(value, bool) and typ is int:
        raise SpecError(key, f"expected an integer, got {value!r}")
    if not isinstance(value, typ):
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise SpecError(key, f"expected {name}, got {type(value).__name__} {value!r}")
    return value


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise SpecError(f"{prefix}{key}", f"unknown option (known: {', '.join(allowed)})")


def _iommu_from(value: Any) -> IommuSpec | None:
    if isinstance(value, str):
        return parse_iommu(value)
    data = _expect(value, dict, "iommu")
    keys = [f.name for f in fields(IommuSpec)]
    _check_keys(data, ["mode", *keys], "iommu")
    base: IommuSpec | None = _DEFAULT_IOMMU
    if "mode" in data:
        base = parse_iommu(_expect(data["mode"], str, "iommu.mode"))
        if base is None:
            if len(data) > 1:
                raise SpecError("iommu", "mode = 'none' takes no other iommu options")
            return None
    assert base is not None
    over = {k: _expect(data[k], int if k == "aw_bits" else bool, f"iommu.{k}")
            for k in keys if k in data}
    return replace(base, **over)


def _device_from(value: Any, index: int) -> DeviceSpec:
    data = _expect(value, dict, f"devices[{index}]")
    _check_keys(data, ["type", "id", "path", "iommu_platform", "pasid_width"],
                f"devices[{index}]")
    kind = _expect(data.get("type"), str, f"devices[{index}].type")
    try:
        dtype = DeviceType(kind)
    except ValueError:
        known = ", ".join(t.value for t in DeviceType)
        raise SpecError(f"devices[{index}].type",
                        f"unknown device {kind!r} (known: {known})") from None
    short = {DeviceType.VHOST_USER_BLK: "vub", DeviceType.HVT_PCI: "hvt"}.get(
        dtype, dtype.value.split("-")[-1])
    dev_id = _expect(data.get("id", f"{short}{index}"), str, f"devices[{index}].id")
    path = data.get("path")
    iop = data.get("iommu_platform")
    width = data.get("pasid_width")
    return DeviceSpec(
        type=dtype, id=dev_id,
        path=None if path is None else _expect(path, str, f"devices[{index}].path"),
        iommu_platform=(None if iop is None else
                        _expect(iop, bool, f"devices[{index}].iommu_platform")),
        pasid_width=None if width is None else _expect(width, int, f"devices[{index}].pasid_width"),
    )


def _ivshmem_from(value: Any, index: int) -> IvshmemSpec:
    data = _expect(value, dict, f"ivshmem[{index}]")
    _check_keys(data, ["name", "size"], f"ivshmem[{index}]")
    name = _expect(data.get("name"), str, f"ivshmem[{index}].name")
    size = parse_size(data.get("size", "4M"), key=f"ivshmem.{name}.size")
    return IvshmemSpec(name=name, size=size)


_TOP_KEYS = ["name", "memory", "vcpus", "accel", "machine", "cpu", "iommu", "devices",
             "ivshmem", "kernel_args", "kernel", "initrd", "security_level"]


def spec_from_mapping(data: Mapping[str, Any], *, name: str | None = None) -> VmSpec:
    """Build a validated spec from a parsed TOML/JSON mapping; ``name`` overrides the file's."""
    _check_keys(data, _TOP_KEYS, "")
    vm_name = name or data.get("name")
    if vm_name is None:
        raise SpecError("name", "the spec has no name")
    kwargs: dict[str, Any] = {"name": _expect(vm_name, str, "name")}
    if "memory" in data:
        kwargs["memory"] = parse_size(_expect(data["memory"], (str, int), "memory"))
    if "vcpus" in data:
        kwargs["vcpus"] = _expect(data["vcpus"], int, "vcpus")
    if "accel" in data:
        kwargs["accel"] = parse_accel(_expect(data["accel"], str, "accel"))
    for key in ("machine", "cpu", "kernel", "initrd"):
        if key in data:
            kwargs[key] = _expect(data[key], str, key)
    if "iommu" in data:
        kwargs["iommu"] = _iommu_from(data["iommu"])
    if "devices" in data:
        devs = _expect(data["devices"], list, "devices")
        kwargs["devices"] = tuple(_device_from(d, i) for i, d in enumerate(devs))
    if "ivshmem" in data:
        regions = _expect(data["ivshmem"], list, "ivshmem")
        kwargs["ivshmem"] = tuple(_ivshmem_from(r, i) for i, r in enumerate(regions))
    if "security_level" in data:
        kwargs["security_level"] = parse_security_level(
            _expect(data["security_level"], str, "security_level"))
    if "kernel_args" in data:
        raw = data["kernel_args"]
        items = raw.split() if isinstance(raw, str) else _expect(raw, list, "kernel_args")
        kwargs["kernel_args"] = tuple(_expect(a, str, "kernel_args") for a in items)
    return VmSpec(**kwargs)


def parse_security_level(text: str) -> SecurityLevel:
    try:
        return SecurityLevel(text.lower())
    except ValueError:
        known = ", ".join(lv.value for lv in SecurityLevel)
        raise SpecError("security_level",
                        f"unknown security level {text!r} (known: {known})") from None


def parse_accel(text: str) -> Accel:
    try:
        return Accel(text.lower())
    except ValueError:
        raise SpecError("accel", f"unknown accelerator {text!r} (known: auto, tcg, kvm)") from None


def read_spec_file(path: Path) -> dict[str, Any]:
    """Parse a TOML spec file into a mapping, with its relative paths made absolute
    against the file's own directory."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError("spec", f"no such file: {path}") from None
    except OSError as err:
        raise SpecError("spec", f"cannot read {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise SpecError("spec", f"{path}: not valid TOML: {err}") from err
    return absolutize_paths(data, path.resolve().parent)


def absolutize_paths(data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """The mapping with relative kernel/initrd/device paths joined to ``base``.

    QEMU runs in its own directory, so a relative path must never reach it.
    """
    out = dict(data)
    for key in ("kernel", "initrd"):
        if isinstance(out.get(key), str):
            out[key] = str(base / out[key])
    if isinstance(out.get("devices"), list):
        out["devices"] = [
            {**d, "path": str(base / d["path"])}
            if isinstance(d, dict) and isinstance(d.get("path"), str) else d
            for d in out["devices"]]
    return out


def load_spec_file(path: Path, *, name: str | None = None) -> VmSpec:
    """Read a TOML spec file."""
    return spec_from_mapping(read_spec_file(path), name=name)


def apply_overrides(spec_data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge CLI flags (already keyed like the TOML, ``None`` meaning not given) over a mapping."""
    merged = dict(spec_data)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return merged


#: Name of the virtio-serial port the guest agent listens on (hvtools/guest/src).
AGENT_PORT = "org.hvtools.agent.0"


@dataclass(frozen=True)
class LaunchPlan:
    """What a driver resolved around a spec before rendering: accelerator, image, host paths."""

    accel: Accel  # never AUTO here
    kernel: Path
    initrd: Path
    ram_path: Path  # the shared RAM file (memory-backend-file,share=on)
    agent_socket: Path
    console_log: Path
    qmp_socket: Path | None = None  # qemu driver only; libvirt owns the monitor
    #: vhost-user sockets by device id (the backends hvtools starts listen there)
    vhost_sockets: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.accel is Accel.AUTO:
            raise ValueError("LaunchPlan needs a resolved accelerator, not auto")

    def cpu_model(self, spec: VmSpec) -> str:
        """The CPU model: the spec's, else ``max`` (TCG: svm and npt) or ``host`` (KVM)."""
        if spec.cpu:
            return spec.cpu
        return "host" if self.accel is Accel.KVM else "max"
