"""Rendering specs to QEMU argv, against golden files and QEMU's own rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from hvtools.qemu.cmdline import render_argv
from hvtools.spec import Accel, LaunchPlan, VmSpec, spec_from_mapping

PLAN = LaunchPlan(accel=Accel.TCG, kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd"),
                  ram_path=Path("/dev/shm/hvtools/t.ram"), agent_socket=Path("/s/agent.sock"),
                  console_log=Path("/s/console.log"), qmp_socket=Path("/s/qmp.sock"),
                  vhost_sockets={"vub0": Path("/s/vub-vub0.sock")})

CASES: dict[str, dict[str, object]] = {
    "default": {"name": "t1"},
    "legacy": {"name": "t2", "iommu": "legacy", "memory": "512M", "vcpus": 1},
    "none": {"name": "t3", "iommu": "none"},
    "devices": {"name": "t4", "iommu": {"mode": "scalable,pasid", "caching_mode": True},
                "kernel_args": ["loglevel=7", "quiet"],
                "devices": [{"type": "virtio-rng"}, {"type": "virtio-blk", "path": "/d.img"},
                            {"type": "virtio-net", "iommu_platform": False}],
                "ivshmem": [{"name": "shm0", "size": "4M"}]},
    "vhost": {"name": "t5", "memory": "512M",
              "devices": [{"type": "vhost-user-blk", "path": "/disk.img"}]},
    "hvt": {"name": "t7", "security_level": "confidential",
            "devices": [{"type": "virtio-rng"}, {"type": "hvt-pci", "pasid_width": 16}]},
}


def _spec(case: str) -> VmSpec:
    return spec_from_mapping(CASES[case])


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str, golden: object) -> None:
    argv = render_argv(_spec(case), PLAN)
    golden.check(f"qemu-{case}.args", "\n".join(argv) + "\n")  # type: ignore[attr-defined]


def _device(argv: list[str], driver: str) -> dict[str, str]:
    for i, a in enumerate(argv):
        if a == "-device" and argv[i + 1].split(",")[0] == driver:
            return dict(p.partition("=")[::2] for p in argv[i + 1].split(",")[1:])
    raise AssertionError(f"no -device {driver}")


def test_iommu_properties_and_order() -> None:
    argv = render_argv(_spec("default"), PLAN)
    iommu = _device(argv, "intel-iommu")
    assert iommu["x-scalable-mode"] == "on" and iommu["x-pasid-mode"] == "on"
    assert iommu["x-flts"] == "on" and iommu["intremap"] == "on"
    assert "kernel-irqchip=split" in argv[argv.index("-machine") + 1]
    # The vIOMMU must come before every PCI device it translates.
    devs = [argv[i + 1].split(",")[0] for i, a in enumerate(argv) if a == "-device"]
    assert devs[0] == "intel-iommu"


def test_virtio_behind_iommu_is_modern_only() -> None:
    argv = render_argv(_spec("devices"), PLAN)
    for drv in ("virtio-serial-pci", "virtio-rng-pci", "virtio-blk-pci"):
        d = _device(argv, drv)
        assert d["iommu_platform"] == "on" and d["disable-legacy"] == "on", drv
    assert "iommu_platform" not in _device(argv, "virtio-net-pci")


def test_no_iommu_no_split_irqchip() -> None:
    argv = render_argv(_spec("none"), PLAN)
    assert "kernel-irqchip=split" not in " ".join(argv)
    assert "intel-iommu" not in " ".join(argv)
    assert "intel_iommu=on" not in argv[argv.index("-append") + 1]


def test_shared_ram_backend() -> None:
    argv = render_argv(_spec("default"), PLAN)
    obj = next(argv[i + 1] for i, a in enumerate(argv)
               if a == "-object" and argv[i + 1].startswith("memory-backend-file,id=ram0"))
    assert "share=on" in obj and f"mem-path={PLAN.ram_path}" in obj
    assert "memory-backend=ram0" in argv[argv.index("-machine") + 1]


def test_commas_in_paths_are_escaped() -> None:
    spec = spec_from_mapping({"name": "c", "devices": [{"type": "virtio-blk", "path": "/a,b.img"}]})
    argv = render_argv(spec, PLAN)
    assert "driver=file,node-name=blk0-file,filename=/a,,b.img" in argv


def test_vhost_user_blk_reaches_its_backend_by_guest_physical_address() -> None:
    argv = render_argv(_spec("vhost"), PLAN)
    d = _device(argv, "vhost-user-blk-pci")
    assert d["chardev"] == "vub0-vu" and d["num-queues"] == "1"
    assert "iommu_platform" not in d  # no IOTLB in the backend: DMA by GPA
    assert "socket,id=vub0-vu,path=/s/vub-vub0.sock,reconnect-ms=1000" in argv


def test_vhost_user_blk_behind_the_viommu_is_refused() -> None:
    from hvtools.errors import SpecError

    with pytest.raises(SpecError, match="no IOTLB"):
        spec_from_mapping({"name": "t6", "devices": [
            {"type": "vhost-user-blk", "path": "/d", "iommu_platform": True}]})


def test_hvt_pci_after_the_viommu_with_the_vm_security_level() -> None:
    argv = render_argv(_spec("hvt"), PLAN)
    devs = [argv[i + 1].split(",")[0] for i, a in enumerate(argv) if a == "-device"]
    assert devs.index("intel-iommu") < devs.index("hvt-pci")
    assert _device(argv, "hvt-pci") == {"id": "hvt1", "security-level": "confidential",
                                        "pasid-width": "16"}
    trusted = spec_from_mapping({"name": "t8", "iommu": "none",
                                 "devices": [{"type": "hvt-pci"}]})
    assert _device(render_argv(trusted, PLAN), "hvt-pci") == {"id": "hvt0",
                                                               "security-level": "trusted"}
