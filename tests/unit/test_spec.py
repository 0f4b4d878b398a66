"""The VM spec: parsing, validation errors, round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvtools.errors import SpecError
from hvtools.spec import (
    Accel,
    DeviceType,
    GiB,
    IommuSpec,
    MiB,
    SecurityLevel,
    load_spec_file,
    parse_iommu,
    parse_size,
    spec_from_mapping,
)


@pytest.mark.parametrize(("text", "expected"), [
    ("1G", GiB), ("512M", 512 * MiB), ("512MiB", 512 * MiB), ("2g", 2 * GiB), (1024, GiB),
    ("1024", GiB), ("64K", 64 << 10),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "1.5G", "-1G", "", "G", "1Q"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(SpecError, match="is not a size"):
        parse_size(bad)


def test_iommu_shorthand() -> None:
    io = parse_iommu("scalable,pasid,flts")
    assert io == IommuSpec(scalable_mode=True, pasid=True, flts=True)
    assert io is not None and io.shorthand == "scalable,pasid,flts"
    assert parse_iommu("none") is None
    legacy = parse_iommu("legacy")
    assert legacy == IommuSpec() and legacy is not None and not legacy.scalable_mode
    assert parse_iommu("scalable,caching-mode,no-intremap") == IommuSpec(
        scalable_mode=True, caching_mode=True, intremap=False)


@pytest.mark.parametrize(("text", "message"), [
    ("pasid", "PASID needs scalable mode"),
    ("legacy,flts", "first-stage translation needs scalable mode"),
    ("scalable,turbo", "unknown word 'turbo'"),
    ("", "empty"),
])
def test_iommu_shorthand_errors(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_iommu(text)


@pytest.mark.parametrize(("data", "field", "message"), [
    ({"vcpus": 0}, "vcpus", "need at least 1"),
    ({"memory": "lots"}, "memory", "is not a size"),
    ({"memory": "64M"}, "memory", "too small"),
    ({"frobnicate": 1}, "frobnicate", "unknown option"),
    ({"devices": [{"type": "virtio-gpu"}]}, "devices[0].type", "unknown device 'virtio-gpu'"),
    ({"devices": [{"type": "virtio-blk"}]}, "devices.blk0.path", "needs a backing file"),
    ({"devices": [{"type": "virtio-rng", "speed": 3}]}, "devices[0].speed", "unknown option"),
    ({"iommu": {"mode": "scalable", "pasid": "yes"}}, "iommu.pasid", "expected bool"),
    ({"iommu": {"mode": "none", "pasid": True}}, "iommu", "takes no other"),
    ({"ivshmem": [{"name": "s", "size": "3M"}]}, "ivshmem.s.size", "power of two"),
    ({"accel": "hvf"}, "accel", "unknown accelerator"),
    ({"vcpus": True}, "vcpus", "expected an integer"),
    ({"machine": "pc"}, "machine", "only q35"),
    ({"kernel_args": ["a b"]}, "kernel_args", "no spaces"),
    ({"security_level": "secret"}, "security_level", "unknown security level 'secret'"),
    ({"security_level": "confidential"}, "security_level", "needs an hvt-pci device"),
    ({"devices": [{"type": "hvt-pci", "pasid_width": 21}]}, "devices.hvt0.pasid_width",
     "not in 1..20"),
    ({"devices": [{"type": "hvt-pci", "pasid_width": "20"}]}, "devices[0].pasid_width",
     "expected int, got str"),
    ({"devices": [{"type": "virtio-rng", "pasid_width": 8}]}, "devices.rng0.pasid_width",
     "has no PASID"),
    ({"devices": [{"type": "hvt-pci", "iommu_platform": True}]},
     "devices.hvt0.iommu_platform", "not a virtio device"),
    ({"devices": [{"type": "hvt-pci", "path": "/x"}]}, "devices.hvt0.path", "takes no path"),
])
def test_spec_errors_name_the_field(data: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        spec_from_mapping({"name": "t1", **data})
    assert info.value.field == field


def test_bad_names() -> None:
    for bad in ("", "-x", "a/b", "x" * 64, "a b"):
        with pytest.raises(SpecError, match="not a valid VM name"):
            spec_from_mapping({"name": bad})


def test_defaults_are_the_full_viommu() -> None:
    spec = spec_from_mapping({"name": "t1"})
    assert spec.memory == GiB and spec.vcpus == 2 and spec.accel is Accel.AUTO
    assert spec.iommu == IommuSpec(scalable_mode=True, pasid=True, flts=True)
    assert spec.split_irqchip
    assert "intel_iommu=on,sm_on" in spec.guest_kernel_args


def test_toml_file_and_name_override(tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text('name = "a"\nmemory = "2G"\nvcpus = 1\nkernel_args = ["quiet"]\n'
                 '[iommu]\nmode = "legacy"\ncaching_mode = true\n'
                 '[[devices]]\ntype = "virtio-rng"\n'
                 '[[ivshmem]]\nname = "shm0"\nsize = "8M"\n')
    spec = load_spec_file(f, name="b")
    assert spec.name == "b" and spec.memory == 2 * GiB and spec.vcpus == 1
    assert spec.iommu == IommuSpec(caching_mode=True)
    assert spec.devices[0].type is DeviceType.RNG and spec.devices[0].id == "rng0"
    assert spec.ivshmem[0].size == 8 * MiB
    assert spec.guest_kernel_args[-1] == "quiet"


def test_bad_toml(tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text("name = \n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec_file(f)
    with pytest.raises(SpecError, match="no such file"):
        load_spec_file(tmp_path / "missing.toml")


_iommus = st.one_of(st.none(), st.builds(
    lambda sm, pasid, flts, cm, ir: IommuSpec(scalable_mode=sm, pasid=pasid and sm,
                                              flts=flts and sm, caching_mode=cm, intremap=ir),
    st.booleans(), st.booleans(), st.booleans(), st.booleans(), st.booleans()))


@given(memory_mib=st.integers(128, 1 << 16), vcpus=st.integers(1, 64), iommu=_iommus,
       args=st.lists(st.from_regex(r"[a-z_.]{1,8}(=[a-z0-9,]{1,6})?", fullmatch=True),
                     max_size=4))
def test_mapping_round_trip(memory_mib: int, vcpus: int, iommu: IommuSpec | None,
                            args: list[str]) -> None:
    spec = spec_from_mapping({"name": "rt", "memory": f"{memory_mib}M", "vcpus": vcpus,
                              "kernel_args": args,
                              "devices": [{"type": "virtio-rng"}],
                              "iommu": {"mode": "none"} if iommu is None else
                              {"mode": iommu.shorthand}})
    assert spec.iommu == iommu
    assert spec_from_mapping(spec.to_mapping()) == spec


def test_hvt_pci_and_the_vm_security_level() -> None:
    spec = spec_from_mapping({"name": "h", "security_level": "Confidential", "devices": [
        {"type": "virtio-rng"}, {"type": "hvt-pci"}, {"type": "hvt-pci", "id": "dma1",
                                                      "pasid_width": 8}]})
    assert spec.security_level is SecurityLevel.CONFIDENTIAL
    hvt = spec.devices[1]
    assert (hvt.type, hvt.id, hvt.pasid_width) == (DeviceType.HVT_PCI, "hvt1", None)
    assert spec.devices[2].pasid_width == 8
    assert spec.patched_devices == ("hvt-pci",)  # the qemu driver picks a patched build
    assert not spec.device_iommu_platform(hvt)  # not virtio: no iommu_platform property
    assert spec_from_mapping(spec.to_mapping()) == spec
    plain = spec_from_mapping({"name": "p", "devices": [{"type": "virtio-rng"}]})
    assert plain.patched_devices == () and plain.security_level is SecurityLevel.TRUSTED
    assert "security_level" not in plain.to_mapping()  # stored specs stay as they were


def test_security_level_from_a_toml_file(tmp_path: Path) -> None:
    f = tmp_path / "vm.toml"
    f.write_text('name = "c"\nsecurity_level = "confidential"\n'
                 '[[devices]]\ntype = "hvt-pci"\npasid_width = 16\n')
    spec = load_spec_file(f)
    assert spec.security_level is SecurityLevel.CONFIDENTIAL
    assert spec.devices[0].pasid_width == 16


def test_libvirt_driver_refuses_the_patched_device() -> None:
    from hvtools.errors import UsageError
    from hvtools.libvirt.domxml import render_domain_xml
    from hvtools.spec import LaunchPlan

    plan = LaunchPlan(accel=Accel.TCG, kernel=Path("/k"), initrd=Path("/i"),
                      ram_path=Path("/r"), agent_socket=Path("/a"), console_log=Path("/c"))
    spec = spec_from_mapping({"name": "lv", "devices": [{"type": "hvt-pci"}]})
    with pytest.raises(UsageError, match="hvt-pci, a device of the patched QEMU that the "
                       "libvirt driver does not run: use --driver qemu"):
        render_domain_xml(spec, plan)
