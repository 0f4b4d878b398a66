"""The libvirt backend against a real libvirtd: starting the daemon, and one full boot.

libvirtd is started by :func:`ensure_libvirtd` when it does not run (no systemd here) and left
running afterwards, like any other host daemon. Every domain a test defines is destroyed and
undefined in the fixture's teardown, through libvirt directly, whatever the driver did.
"""

from __future__ import annotations

import contextlib
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from hvtools.control.driver import VmState
from hvtools.control.libvirt_driver import LibvirtDriver, log_tail, qemu_log
from hvtools.errors import NameInUseError
from hvtools.guest.image import GuestImage
from hvtools.libvirt.daemon import (
    LIBVIRTD_PIDFILE,
    SYSTEM_URI,
    connect,
    ensure_libvirtd,
    libvirtd_status,
)
from hvtools.libvirt.domxml import render_domain_xml
from hvtools.spec import Accel, LaunchPlan, VmSpec, spec_from_mapping
from tests.integration.conftest import RUN, qemu_pids_for
from tests.unit.test_domxml import CASES

pytestmark = pytest.mark.integration


def test_ensure_libvirtd_is_reachable_and_idempotent() -> None:
    uri = ensure_libvirtd()
    assert uri == SYSTEM_URI
    first = libvirtd_status()
    assert first["reachable"] and first["startable"], first
    assert first["version"] == "9.0.0" and first["hypervisor_version"].startswith("10.0")
    assert first["kvm_device_ok"]
    assert ensure_libvirtd() == uri
    second = libvirtd_status()
    assert first["pid"] is not None
    assert second["reachable"] and second["pid"] == first["pid"], "no second daemon"
    assert int(LIBVIRTD_PIDFILE.read_text()) == first["pid"]


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = connect(ensure_libvirtd())
    yield c
    c.close()


class _Domains:
    """Names handed to a test; on teardown each is destroyed and undefined, logs dumped if the
    test failed."""

    def __init__(self, conn: libvirt.virConnect) -> None:
        self.conn = conn
        self.names: list[str] = []

    def name(self, suffix: str) -> str:
        n = f"{RUN}-lv-{suffix}"
        self.names.append(n)
        return n

    def teardown(self, failed: bool) -> None:
        for n in self.names:
            try:
                dom = self.conn.lookupByName(n)
            except libvirt.libvirtError:
                continue
            if failed:
                console = Path(f"/var/lib/hvtools/libvirt/{n}/console.log")
                with contextlib.suppress(libvirt.libvirtError, OSError):
                    console = Path(ET.fromstring(dom.XMLDesc(0)).find(
                        "devices/serial/source").get("path", ""))  # type: ignore[union-attr]
                if console.exists():
                    sys.stderr.write(f"--- console of {n} ---\n"
                                     + console.read_text(errors="replace")[-4000:] + "\n")
                sys.stderr.write(f"--- {qemu_log(n)} ---\n" + "\n".join(log_tail(n, 20)) + "\n")
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)


@pytest.fixture
def domains(conn: libvirt.virConnect, request: pytest.FixtureRequest) -> Iterator[_Domains]:
    d = _Domains(conn)
    yield d
    rep = getattr(request.node, "rep_call", None)
    d.teardown(failed=rep is not None and rep.failed)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_cases_accepted_by_libvirtd(case: str, conn: libvirt.virConnect,
                                           domains: _Domains) -> None:
    """libvirtd 9.0 validates every rendered case against its schema, and its QEMU command line
    (``virConnectDomainXMLToNative``) carries the vIOMMU's x- properties from the override."""
    spec = spec_from_mapping({**CASES[case], "name": domains.name(f"xml-{case}")})
    plan = LaunchPlan(accel=Accel.TCG, kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd"),
                      ram_path=Path("/unused"), agent_socket=Path("/tmp/hvtools-x/agent.sock"),
                      console_log=Path("/tmp/hvtools-x/console.log"),
                      vhost_sockets={d.id: Path(f"/tmp/hvtools-x/vub-{d.id}.sock")
                                     for d in spec.devices})
    xml = render_domain_xml(spec, plan)
    dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    assert dom.name() == spec.name
    argv = conn.domainXMLToNative("qemu-argv", dom.XMLDesc(0), 0)
    if spec.iommu is None:
        assert "intel-iommu" not in argv
        return
    iommu = next(json.loads(w.strip("'")) for w in argv.split()
                 if w.startswith("'{") and '"intel-iommu"' in w)
    assert (iommu["x-scalable-mode"], iommu["x-pasid-mode"], iommu["x-flts"]) == (
        spec.iommu.scalable_mode, spec.iommu.pasid, spec.iommu.flts)
    assert iommu["intremap"] == ("on" if spec.iommu.intremap else "off")
    assert iommu["caching-mode"] is spec.iommu.caching_mode
    assert iommu["aw-bits"] == spec.iommu.aw_bits


def _qemu_argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _device_json(argv: list[str]) -> list[dict[str, object]]:
    """The ``-device`` arguments, which libvirt 9.0 passes to QEMU 10 as JSON."""
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv[:-1])
            if a == "-device" and argv[i + 1].startswith("{")]


def _on(value: object) -> bool:
    return value is True or value in ("on", "true")


def test_full_boot_default_spec(image: GuestImage, domains: _Domains) -> None:
    driver = LibvirtDriver()
    name = domains.name("boot")
    spec = VmSpec(name=name, memory=512 << 20)
    created = driver.create(spec)
    assert created.state is VmState.DEFINED and created.spec == spec
    with pytest.raises(NameInUseError):
        driver.create(spec)

    info, timings = driver.start(name)
    assert info.state is VmState.RUNNING and info.accel == "tcg"
    print(f"libvirt: boot-to-agent-ready {timings.agent_ready_s:.2f}s")
    assert info.pid is not None and qemu_pids_for(name) == [info.pid]

    res = driver.exec(name, ["cat", "/proc/cmdline"])
    assert res.status == 0
    assert res.stdout.decode().split() == list(spec.guest_kernel_args)

    # QEMU's real command line: the override set the x- properties on intel-iommu, and every
    # virtio device is behind the vIOMMU.
    devices = _device_json(_qemu_argv(info.pid))
    iommu = next(d for d in devices if d["driver"] == "intel-iommu")
    for prop in ("x-scalable-mode", "x-pasid-mode", "x-flts", "intremap"):
        assert _on(iommu[prop]), (prop, iommu)
    virtio = [d for d in devices if str(d["driver"]).startswith("virtio-")]
    assert virtio, devices
    for dev in virtio:
        assert _on(dev.get("iommu_platform")), dev
        assert str(dev["driver"]).endswith("-non-transitional"), dev  # modern-only
    # QEMU runs as root (seclabel static +0:+0) on shared file-backed RAM.
    assert Path(f"/proc/{info.pid}").stat().st_uid == 0
    assert str(driver.ram_path(name)).startswith("/var/lib/libvirt/qemu/ram/")
    assert driver.qmp(name, "query-status")["status"] == "running"

    assert driver.stop(name) == "agent"
    assert driver.info(name).state is VmState.DEFINED
    assert not Path(f"/proc/{info.pid}").exists()
    assert qemu_pids_for(name) == []
    assert not driver.conn.lookupByName(name).isActive()
    assert info.agent_socket is not None and not info.agent_socket.exists()

    driver.undefine(name)
    assert name not in {vm.name for vm in driver.list()}
    with pytest.raises(libvirt.libvirtError):
        driver.conn.lookupByName(name)
