"""Render a :class:`~hvtools.spec.VmSpec` to a QEMU command line (the qemu driver's form).

The order of arguments is fixed so that golden files in ``tests/data`` can hold them.
"""

from __future__ import annotations

from hvtools.spec import AGENT_PORT, DeviceSpec, DeviceType, LaunchPlan, VmSpec, format_size


def opt(value: object) -> str:
    """A value inside a QEMU ``key=value,...`` option string: commas are doubled
    (QEMU docs, "Options and arguments": a literal comma is written ``,,``)."""
    return str(value).replace(",", ",,")


def _onoff(value: bool) -> str:
    return "on" if value else "off"


def iommu_device_arg(spec: VmSpec) -> str | None:
    """``intel-iommu,...`` with every property spelled out, or None without a vIOMMU."""
    io = spec.iommu
    if io is None:
        return None
    return ",".join([
        "intel-iommu", "id=iommu0",
        f"intremap={_onoff(io.intremap)}",
        f"caching-mode={_onoff(io.caching_mode)}",
        f"device-iotlb={_onoff(io.device_iotlb)}",
        f"x-scalable-mode={_onoff(io.scalable_mode)}",
        f"x-pasid-mode={_onoff(io.pasid)}",
        f"x-flts={_onoff(io.flts)}",
        f"aw-bits={io.aw_bits}",
    ])


def _virtio(driver: str, dev_id: str, platform: bool, extra: str = "") -> str:
    # iommu_platform (VIRTIO_F_ACCESS_PLATFORM, virtio 1.1 s6) needs a modern-only device.
    parts = [driver, f"id={dev_id}"]
    if platform:
        parts += ["disable-legacy=on", "iommu_platform=on"]
    if extra:
        parts.append(extra)
    return ",".join(parts)


def _device_args(spec: VmSpec, plan: LaunchPlan, dev: DeviceSpec) -> list[str]:
    platform = spec.device_iommu_platform(dev)
    if dev.type is DeviceType.RNG:
        return ["-object", f"rng-random,id={dev.id}-rng,filename=/dev/urandom",
                "-device", _virtio("virtio-rng-pci", dev.id, platform, f"rng={dev.id}-rng")]
    if dev.type is DeviceType.BLK:
        return ["-blockdev", f"driver=file,node-name={dev.id}-file,filename={opt(dev.path)}",
                "-blockdev", f"driver=raw,node-name={dev.id}-fmt,file={dev.id}-file",
                "-device", _virtio("virtio-blk-pci", dev.id, platform, f"drive={dev.id}-fmt")]
    if dev.type is DeviceType.HVT_PCI:
        # The patched QEMU's device (qemu-patches/README.md); the argv puts it after the
        # intel-iommu, whose DMA address spaces it asks for (per PASID).
        parts = ["hvt-pci", f"id={dev.id}", f"security-level={spec.security_level}"]
        if dev.pasid_width is not None:
            parts.append(f"pasid-width={dev.pasid_width}")
        return ["-device", ",".join(parts)]
    if dev.type is DeviceType.VHOST_USER_BLK:
        # QEMU connects to the backend as a client and reconnects when it restarts
        # (docs/interop/vhost-user.rst; chardev socket reconnect-ms).
        sock = plan.vhost_sockets[dev.id]
        return ["-chardev", f"socket,id={dev.id}-vu,path={opt(sock)},reconnect-ms=1000",
                "-device", _virtio("vhost-user-blk-pci", dev.id, platform,
                                   f"chardev={dev.id}-vu,num-queues=1")]
    # virtio-net with no backend traffic leaving the VM: a user-mode netdev with restrict=on.
    return ["-netdev", f"user,id={dev.id}-net,restrict=on",
            "-device", _virtio("virtio-net-pci", dev.id, platform, f"netdev={dev.id}-net")]


def render_argv(spec: VmSpec, plan: LaunchPlan, *, qemu: str = "qemu-system-x86_64") -> list[str]:
    """The full argv for ``spec`` under ``plan``."""
    machine = f"{spec.machine},memory-backend=ram0"
    if spec.split_irqchip:
        machine += ",kernel-irqchip=split"
    argv = [
        qemu, "-name", f"{spec.name},debug-threads=on",
        "-machine", machine,
        "-accel", str(plan.accel),
        "-cpu", plan.cpu_model(spec),
        "-smp", str(spec.vcpus),
        "-m", format_size(spec.memory),
        "-object", (f"memory-backend-file,id=ram0,size={format_size(spec.memory)},"
                    f"mem-path={opt(plan.ram_path)},share=on"),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(plan.kernel), "-initrd", str(plan.initrd),
        "-append", " ".join(spec.guest_kernel_args),
        "-chardev", f"file,id=console0,path={opt(plan.console_log)}",
        "-serial", "chardev:console0",
    ]
    if plan.qmp_socket is not None:
        argv += ["-chardev", f"socket,id=qmp0,path={opt(plan.qmp_socket)},server=on,wait=off",
                 "-mon", "chardev=qmp0,mode=control"]
    iommu = iommu_device_arg(spec)
    if iommu:
        # The vIOMMU must precede the PCI devices it translates (QEMU docs/devel, intel-iommu).
        argv += ["-device", iommu]
    argv += [
        "-device", _virtio("virtio-serial-pci", "vser0", spec.iommu is not None),
        "-chardev", f"socket,id=agent0,path={opt(plan.agent_socket)},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT}",
    ]
    for dev in spec.devices:
        argv += _device_args(spec, plan, dev)
    for region in spec.ivshmem:
        argv += ["-object", (f"memory-backend-file,id=shm-{region.name},"
                             f"size={format_size(region.size)},mem-path={opt(region.path)},share=on"),
                 "-device", f"ivshmem-plain,id={region.name},memdev=shm-{region.name}"]
    return argv
