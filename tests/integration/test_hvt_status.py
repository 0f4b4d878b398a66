"""``hvtools hvt status``: a confidential VM's hvt-pci counters, read by the host over QMP,
agree with what the guest's own program saw; the refusals change nothing.

Real parts: the patched QEMU (make test builds it), the default guest image with ``hvtdma``,
whose ``vfio-check`` drives the device through vfio-pci and prints its view of the counters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from hvtools.control.drivers import make_driver
from hvtools.guest.image import GuestImage
from tests.integration.conftest import RUN, hvtools_cli


@pytest.fixture(scope="module")
def confidential_vm(image: GuestImage) -> Iterator[str]:
    name = f"{RUN}-hvtst"
    res = hvtools_cli("vm", "start", name, "--device", "hvt-pci", "--security-level",
                      "confidential", "--boot-timeout", "400")
    try:
        assert res.returncode == 0, res.stderr
        yield name
    finally:
        hvtools_cli("vm", "kill", name)
        hvtools_cli("vm", "rm", name)


def status(name: str) -> dict[str, object]:
    res = hvtools_cli("hvt", "status", name, "--json")
    assert res.returncode == 0, res.stderr
    devices = json.loads(res.stdout)
    assert isinstance(devices, list) and len(devices) == 1
    dev = devices[0]
    assert isinstance(dev, dict)
    return dev


def test_status_follows_the_guest(confidential_vm: str) -> None:
    before = status(confidential_vm)
    assert before["security_level"] == "confidential" and before["pasid_width"] == 20
    assert before["completed"] == 0 and before["blocked"] == 0
    assert before["window"] == {"enabled": False, "base": 0, "size": 0, "pasid": 0}

    run = hvtools_cli("vm", "exec", confidential_vm, "--", "hvtdma", "vfio-check")
    assert run.returncode == 0, run.stdout + run.stderr
    seen = re.search(r"^blocked=(\d+) completed=(\d+)$", run.stdout, re.M)
    assert seen, run.stdout
    base = re.search(r"confidential-window-locked ok base=(0x[0-9a-f]+) size=(0x[0-9a-f]+)",
                     run.stdout)
    assert base, run.stdout

    after = status(confidential_vm)
    assert after["blocked"] == int(seen.group(1)) > 0
    assert after["completed"] == int(seen.group(2)) > 0
    assert after["window"] == {"enabled": True, "base": int(base.group(1), 16),
                               "size": int(base.group(2), 16), "pasid": 0}
    st = after["status"]
    assert isinstance(st, dict) and st["code_name"] == "BLOCKED" and st["error"] is True

    text = hvtools_cli("hvt", "status", confidential_vm)
    assert text.returncode == 0, text.stderr
    assert f"blocked {seen.group(1)}" in text.stdout and "locked until reset" in text.stdout


def test_refusals_are_one_line_and_change_nothing(confidential_vm: str) -> None:
    plain = f"{RUN}-hvtplain"
    assert hvtools_cli("vm", "create", plain).returncode == 0
    try:
        for args, needle in ((("hvt", "status", plain), "has no hvt-pci device"),
                             (("hvt", "status", f"{RUN}-nosuchvm"), "no VM named")):
            res = hvtools_cli(*args)
            assert res.returncode != 0
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and needle in lines[0], res.stderr
        stopped = f"{RUN}-hvtstopped"
        assert hvtools_cli("vm", "create", stopped, "--device", "hvt-pci").returncode == 0
        try:
            res = hvtools_cli("hvt", "status", stopped)
            assert res.returncode != 0 and "must be running" in res.stderr, res.stderr
            assert str(make_driver("qemu").info(stopped).state) != "running"
        finally:
            hvtools_cli("vm", "rm", stopped)
    finally:
        hvtools_cli("vm", "rm", plain)
    assert status(confidential_vm)["security_level"] == "confidential"


def test_pasid_dma_through_the_readme_commands(image: GuestImage) -> None:
    """The guest-side PASID demo as the README gives it: the pasid image variant, the guest
    kernel's own intel-iommu in scalable mode attaching a domain to a PASID (hvtpasid), one
    PASID-tagged DMA each way, and the host's view of the device's counters."""
    from hvtools.guest.image import build_image

    build_image(variant="pasid")  # cached after the first build (make test builds it here)
    name = f"{RUN}-hvtpv"
    try:
        res = hvtools_cli("vm", "start", name, "--image-variant", "pasid", "--device",
                          "hvt-pci", "--boot-timeout", "400")
        assert res.returncode == 0, res.stderr
        assert hvtools_cli("vm", "exec", name, "--", "modprobe", "hvtpasid").returncode == 0
        run = hvtools_cli("vm", "exec", name, "--", "hvtdma", "pasid")
        assert run.returncode == 0, run.stdout + run.stderr
        for check in ("pasid-enabled", "mem2dev-pasid", "dev2mem-pasid", "mem2mem-pasid",
                      "dev2mem-no-pasid-faults"):
            assert re.search(rf"^check {check} ok", run.stdout, re.M), run.stdout
        pasid = re.search(r"^pasid=(\d+) ", run.stdout, re.M)
        assert pasid and int(pasid.group(1)) > 0, run.stdout
        dev = status(name)
        assert dev["security_level"] == "trusted" and dev["completed"] == 3
        assert dev["blocked"] == 0
    finally:
        hvtools_cli("vm", "kill", name)
        hvtools_cli("vm", "rm", name)
    bad = hvtools_cli("vm", "create", f"{RUN}-hvtbad", "--image-variant", "nope")
    assert bad.returncode != 0 and "unknown image variant 'nope'" in bad.stderr
    assert f"{RUN}-hvtbad" not in [vm.name for vm in make_driver("qemu").list()]
