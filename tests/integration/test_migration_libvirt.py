"""Live migration of libvirt-driver VMs between two lab hosts' own libvirtds.

A real lab (network namespaces, a libvirtd + virtlogd per host in its own mount namespace), a real
guest started with ``vm start --driver libvirt --host h1``, libvirt's own migration API between
the two daemons. The lab is this module's own (named after the run's pid, on its own subnet) and
is always taken down.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from hvtools.control.libvirt_driver import LibvirtDriver, Placement
from hvtools.errors import HvError, MigrationError
from hvtools.guest.image import GuestImage
from hvtools.lab import build
from hvtools.lab.hosts import HostHandle, Lab, load_lab
from hvtools.migration import live
from hvtools.migration.libvirt_live import migrate_libvirt
from tests.integration.conftest import RUN, hvtools_cli

LAB = f"{RUN}-lv"
SUBNET = f"10.81.{os.getpid() % 200 + 20}"
BLOB = "/dev/shm/blob"
MiB = 1 << 20


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    spec = tmp_path_factory.mktemp("lab") / "lab.toml"
    spec.write_text(f'name = "{LAB}"\nlink = "veth"\nsubnet = "{SUBNET}.0/24"\nlibvirt = true\n'
                    f'[[host]]\nname = "h1"\naddress = "{SUBNET}.1"\n'
                    f'[[host]]\nname = "h2"\naddress = "{SUBNET}.2"\n')
    try:
        up = hvtools_cli("lab", "up", str(spec), "--json")
        assert up.returncode == 0, up.stderr
        yield load_lab(LAB)
    finally:
        build.lab_down(LAB)


@pytest.fixture
def guest(lab: Lab, image: GuestImage, request: pytest.FixtureRequest) -> Iterator[str]:
    """A 512M guest started on h1 through the CLI, as a user would; md5 of 64 MiB of random
    data in its /dev/shm in ``guest_md5``."""
    name = f"{RUN}-lv-{request.node.name[5:15]}"
    res = hvtools_cli("vm", "start", name, "--driver", "libvirt", "--host", f"{LAB}/h1",
                      "--memory", "512M", "--vcpus", "1", "--json")
    driver = LibvirtDriver()
    try:
        assert res.returncode == 0, res.stderr
        started = json.loads(res.stdout)
        assert (started["host"], started["lab"], started["driver"]) == ("h1", LAB, "libvirt")
        yield name
    finally:
        with contextlib.suppress(HvError):
            vm = driver.info(name)
            if vm.console_log is not None and vm.console_log.exists() and \
                    getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
                print(vm.console_log.read_text(errors="replace")[-3000:])
        with contextlib.suppress(HvError):
            driver.kill(name)
        with contextlib.suppress(HvError):
            driver.undefine(name)
        driver.close()


def _md5(driver: LibvirtDriver, name: str) -> str:
    res = driver.exec(name, ["md5sum", BLOB])
    assert res.status == 0, res.stderr
    return res.stdout.decode().split()[0]


def _fill(driver: LibvirtDriver, name: str) -> str:
    res = driver.exec(name, ["dd", "if=/dev/urandom", f"of={BLOB}", "bs=1M", "count=64"],
                      timeout=120)
    assert res.status == 0, res.stderr
    return _md5(driver, name)


def _domains(driver: LibvirtDriver, host: HostHandle) -> dict[str, bool]:
    """Domain name -> active, as the host's own libvirtd sees them."""
    conn = driver.connection(Placement.of_host(host))
    return {d.name(): bool(d.isActive()) for d in conn.listAllDomains(0)}


def test_libvirt_live_migration_moves_the_guest_between_daemons(lab: Lab, guest: str) -> None:
    h1, h2 = lab.host("h1"), lab.host("h2")
    driver = LibvirtDriver()
    md5 = _fill(driver, guest)
    assert str(driver.ram_path(guest)).startswith(str(h1.memory_dir) + "/")
    samples: list[live.Progress] = []
    said: list[str] = []

    res = migrate_libvirt(guest, "h2", opts=live.Options(max_downtime_ms=300),
                          on_progress=samples.append, say=said.append)

    assert _domains(driver, h1).get(guest) is None  # undefined on the source
    assert _domains(driver, h2).get(guest) is True
    dom = driver.connection(Placement.of_host(h2)).lookupByName(guest)
    assert dom.isPersistent()
    vm = driver.info(guest)
    assert (vm.host, vm.lab, vm.state.value) == ("h2", LAB, "running")
    assert vm.agent_socket is not None and h2.state_dir in vm.agent_socket.parents
    assert str(driver.ram_path(guest)).startswith(str(h2.memory_dir) + "/")
    assert _md5(driver, guest) == md5  # the guest answers through its agent, data intact
    listed = json.loads(hvtools_cli("vm", "list", "--driver", "libvirt", "--json").stdout)
    assert [(v["host"], v["lab"]) for v in listed if v["name"] == guest] == [("h2", LAB)]

    r = res.report
    assert (r.vm, r.source, r.destination, r.status) == (guest, "h1", "h2", "completed")
    assert r.uri.startswith(f"tcp://{h2.address}:")
    assert r.measured_downtime_ms is not None and r.measured_downtime_ms >= 0
    assert r.total_time_ms > 0 and r.iterations >= 1
    assert r.ram_total_bytes >= 512 * MiB  # guest RAM plus ROMs
    assert r.transferred_bytes >= 64 * MiB  # the random data had to travel
    assert r.pages_sent >= r.ram_total_bytes // 4096
    assert r.statuses[-1] == "completed" and "active" in r.statuses
    assert res.dirty_rate >= 0 and r.dirty_rate_before == res.dirty_rate
    assert any(p.transferred > 0 and p.total >= 512 * MiB for p in samples)
    assert any("dirty rate" in m for m in said)
    # The persistent definition on h2 names h2's paths: a later start there stays there.
    inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert str(h1.state_dir) not in inactive and str(h2.state_dir) in inactive


def test_cut_link_leaves_the_source_running_and_nothing_on_the_destination(
        lab: Lab, guest: str) -> None:
    h1, h2 = lab.host("h1"), lab.host("h2")
    driver = LibvirtDriver()
    md5 = _fill(driver, guest)
    cut: list[int] = []

    def on_progress(p: live.Progress) -> None:
        if not cut and p.transferred > 8 * MiB:
            subprocess.run(["ip", "-n", h2.netns, "link", "set", "eth0", "down"], check=True)
            cut.append(p.transferred)

    try:
        with pytest.raises(MigrationError) as info:
            migrate_libvirt(guest, "h2", opts=live.Options(bandwidth=4 * MiB, stall_timeout=2),
                            on_progress=on_progress, dirty_rate_probe=False)
    finally:
        subprocess.run(["ip", "-n", h2.netns, "link", "set", "eth0", "up"], check=True)
    assert cut, "the link was never cut: the migration ended before 8 MiB moved"
    message = str(info.value)
    assert "\n" not in message and "no byte moved" in message and "runs on h1" in message

    assert _domains(driver, h2) == {}  # nothing left on the destination daemon
    assert _domains(driver, h1).get(guest) is True
    vm = driver.info(guest)
    assert (vm.host, vm.state.value) == ("h1", "running")
    assert _md5(driver, guest) == md5
    assert not (h2.state_dir / "vms" / guest).exists()
    ram_dirs = list(Path(h2.memory_dir).rglob(f"*-{guest}"))
    assert ram_dirs == []
