"""The real patched QEMU: ``make test`` builds it first (``hvtools qemu build``, cached by the
base tarball and the series), so these tests fail, never skip, when it is missing.

Until the series adds them, the binary is checked to run and to be 10.0.2; once a patch
defines ``hvt-pci`` (or intel-iommu's ``x-nested``) the binary must list it, and a VM whose spec
names hvt-pci must run on it and see the device.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from hvtools.control.driver import Driver, VmState
from hvtools.control.drivers import make_driver
from hvtools.guest.image import GuestImage
from hvtools.qemu.binary import PatchedInstall, capabilities
from hvtools.qemu.build import current_install, default_patches_dir, read_series
from hvtools.spec import spec_from_mapping
from tests.integration.conftest import VmFactory, hvtools_cli


def _series_defines(text: str) -> bool:
    """Whether a patch of the current series adds this QEMU name (``"hvt-pci"``)."""
    needle = f'"{text}"'.encode()
    return any(needle in p.data for p in read_series(default_patches_dir()))


@pytest.fixture(scope="module")
def install() -> PatchedInstall:
    inst = current_install()
    if inst is None:
        pytest.fail("the patched QEMU of this series is not built: make test builds it "
                    "(make qemu-patched, or hvtools qemu build)")
    return inst


@pytest.fixture
def driver(image: GuestImage) -> Driver:
    """The qemu driver only: the libvirt driver refuses hvt-pci."""
    return make_driver("qemu")


def test_binary_is_the_base_version_with_the_series(install: PatchedInstall) -> None:
    caps = capabilities(install.binary)
    assert caps.version == "10.0.2"
    assert install.patches == [p.name for p in read_series(default_patches_dir())]
    assert caps.qtest, "the build keeps -accel qtest (Debian's 10.0.2 lacks it)"
    assert caps.hvt_pci == _series_defines("hvt-pci")
    assert caps.x_nested == _series_defines("x-nested")


def test_a_built_series_is_cached(install: PatchedInstall) -> None:
    t0 = time.monotonic()
    res = hvtools_cli("qemu", "build", "--json")
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["cached"] is True and data["binary"] == str(install.binary)
    assert took < 20, f"a cached build took {took:.1f}s"
    listed = json.loads(hvtools_cli("qemu", "list", "--json").stdout)
    row = next(r for r in listed if r.get("key") == install.key)
    assert row["current_series"] and row["version"] == "10.0.2"
    assert listed[0]["kind"] == "stock"


def test_guest_runs_on_the_patched_qemu(install: PatchedInstall, driver: Driver,
                                        vms: VmFactory, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """User networking (slirp), vhost-user-blk and the full vIOMMU on the lean build; with
    hvt-pci in the spec when the series has it (the driver then picks the patched binary by
    itself), else through HVTOOLS_QEMU."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"hvt" * 4096)
    devices: list[dict[str, object]] = [{"type": "virtio-net"},
                                        {"type": "vhost-user-blk", "path": str(disk)}]
    extra: dict[str, object] = {}
    has_device = capabilities(install.binary).hvt_pci
    if has_device:
        devices.append({"type": "hvt-pci"})
        extra["security_level"] = "confidential"
    else:
        monkeypatch.setenv("HVTOOLS_QEMU", str(install.binary))
    name = vms.name("patched")
    driver.create(spec_from_mapping({"name": name, "memory": "512M", "accel": "tcg",
                                     "devices": devices, **extra}))
    info, _ = driver.start(name)
    assert info.state is VmState.RUNNING and info.state_dir is not None
    launch = json.loads((info.state_dir / "launch.json").read_text())
    assert launch["qemu"] == str(install.binary)
    res = driver.exec(name, ["sh", "-c", "cat /sys/block/vda/size; "
                             "cat /sys/bus/pci/devices/*/uevent | grep PCI_ID="])
    assert res.status == 0, res.stderr
    out = res.stdout.decode()
    assert out.splitlines()[0] == str(len(b"hvt" * 4096) // 512)
    assert "PCI_ID=1AF4:1041" in out  # virtio-net (modern) behind the vIOMMU
    if has_device:
        assert "PCI_ID=1234:11F0" in out  # hvt-pci (qemu-patches/README.md)
        argv = json.loads((info.state_dir / "argv.json").read_text())
        assert "hvt-pci,id=hvt2,security-level=confidential" in argv
    assert driver.stop(name) == "agent"


def test_spec_with_hvt_pci_without_a_patched_build_says_what_to_run(
        tmp_path: Path, image: GuestImage) -> None:
    """A home with no patched build (the image is not needed: the binary is chosen first)."""
    res = hvtools_cli("vm", "start", "nopatch", "--device", "hvt-pci",
                      env={"HVTOOLS_HOME": str(tmp_path)})
    assert res.returncode == 2
    from hvtools.qemu.build import current_key

    assert res.stderr.strip() == (
        f"error: this spec needs the patched QEMU (hvt-pci); this checkout's series (key "
        f"{current_key()}) is not built: run `hvtools qemu build`")
    assert not (tmp_path / "vms" / "nopatch").exists()


def test_libvirt_driver_refuses_hvt_pci(image: GuestImage) -> None:
    """Refused before anything is defined: libvirt would neither address nor migrate it."""
    from tests.integration.conftest import RUN

    name = f"{RUN}-li-hvt"
    res = hvtools_cli("vm", "start", name, "--driver", "libvirt", "--device", "hvt-pci")
    assert res.returncode == 2, res.stderr
    assert "a device of the patched QEMU that the libvirt driver does not run: use " \
        "--driver qemu" in res.stderr
    listed = json.loads(hvtools_cli("vm", "list", "--driver", "libvirt", "--json").stdout)
    assert name not in [vm["name"] for vm in listed]
