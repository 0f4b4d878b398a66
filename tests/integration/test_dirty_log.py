"""A live migration that is correct only because the vhost-user device logs its own writes.

The guest reads its vhost-user-blk disk the whole time (page cache dropped between passes, so
every pass makes the device write guest memory) while it is migrated, bandwidth-limited so the
pre-copy lasts. `migrate --verify` holds the destination at completion and compares every guest
page of both RAM files; the guest's checksums of what it read must match the host file.
Negative control: with the backend's shared-log writes switched off (its debug switch), the
same run leaves pages that differ, and the comparison catches them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hvtools.control import vhost_backends
from hvtools.control.dirty_watch import control_call
from hvtools.control.qemu_driver import QemuDriver
from hvtools.errors import HvError
from hvtools.guest.image import GuestImage
from hvtools.lab import build
from hvtools.lab.hosts import Lab, load_lab
from hvtools.lab.spec import parse_lab_toml
from hvtools.migration import incoming
from tests.integration.conftest import RUN, hvtools_cli

LAB = f"d{RUN}"
NET = "10.215.9"
DISK_MIB = 96
READER = ("while :; do echo 3 > /proc/sys/vm/drop_caches; "
          "dd if=/dev/vda bs=1M 2>/dev/null | md5sum | cut -d' ' -f1 >> /tmp/sums; done")


@pytest.fixture(scope="module")
def lab(image: GuestImage) -> Iterator[Lab]:
    spec = parse_lab_toml(
        f'name = "{LAB}"\nlink = "veth"\nsubnet = "{NET}.0/24"\n'
        f'[[host]]\nname = "h1"\naddress = "{NET}.1"\n'
        f'[[host]]\nname = "h2"\naddress = "{NET}.2"\n', "test lab")
    with contextlib.suppress(HvError):
        build.lab_down(LAB)
    build.lab_up(spec)
    try:
        yield load_lab(LAB)
    finally:
        build.lab_down(LAB)


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("vub") / "disk.img"
    data = os.urandom(DISK_MIB << 20)
    path.write_bytes(data)
    return path, hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def vm(lab: Lab, disk: tuple[Path, str]) -> Iterator[str]:
    name = f"{RUN}-dl"
    # init_on_alloc=0: Debian's kernel zeroes every page it allocates (page cache too), and
    # that CPU write would get the page re-sent anyway, hiding a missing device log.
    r = hvtools_cli("vm", "start", name, "--host", f"{LAB}/h1", "--memory", "512M",
                    "--vcpus", "1", "--device", f"vhost-user-blk:{disk[0]}",
                    "--kernel-args", "init_on_alloc=0")
    assert r.returncode == 0, r.stderr
    drv = QemuDriver()
    try:
        res = drv.exec(name, ["sh", "-c", f"({READER}) >/dev/null 2>&1 &"])
        assert res.status == 0, res
        yield name
    finally:
        for rec in (name, *incoming.records(drv, name)):
            with contextlib.suppress(HvError):
                drv.kill(rec)
            with contextlib.suppress(HvError):
                drv.undefine(rec)


def _sums(name: str) -> list[str]:
    """The guest's checksums so far (none before its first pass over the disk ends)."""
    res = QemuDriver().exec(name, ["sh", "-c", "cat /tmp/sums 2>/dev/null || true"])
    assert res.status == 0, res
    return res.stdout.decode().split()


def _ctl(name: str) -> Path:
    vm = QemuDriver().info(name)
    assert vm.state_dir is not None
    return vhost_backends.BackendFiles(vm.state_dir, "vub0").control


def _wait_for_reads(name: str, n: int) -> None:
    deadline = time.monotonic() + 120
    while len(_sums(name)) < n and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(_sums(name)) >= n, f"the guest finished fewer than {n} passes over its disk"


def test_the_guest_reads_the_host_file_through_the_backend(vm: str,
                                                          disk: tuple[Path, str]) -> None:
    _wait_for_reads(vm, 1)
    sums = _sums(vm)
    assert sums and set(sums) == {disk[1]}
    # The device wrote guest memory (the reads): its own bitmap has pages, then none.
    got = control_call(_ctl(vm), "harvest")
    assert got["total"] > 0
    assert sum(r["dirty"] for r in got["regions"]) == got["total"]


def test_migration_under_device_writes_is_page_exact(vm: str, disk: tuple[Path, str]) -> None:
    before = len(_sums(vm))
    r = hvtools_cli("migrate", vm, "--to", "h2", "--verify", "--bandwidth", "48M", "--json")
    assert r.returncode == 0, r.stderr
    rep: dict[str, Any] = json.loads(r.stdout)
    assert rep["verified"]["differing"] == 0 and rep["verified"]["pages"] == 512 * 256
    assert rep["iterations"] >= 2  # the device kept dirtying pages across passes
    # Its own log was transferred at each iteration and after completion.
    per = rep["device_log"]["pages_per_iteration"]
    assert len(per) >= 2 and sum(per) > 0 and rep["device_log"]["distinct_pages"] > 0
    _wait_for_reads(vm, before + 2)
    sums = _sums(vm)
    assert len(sums) > before and set(sums) == {disk[1]}, sums[-5:]


def test_negative_control_without_the_device_log_loses_writes(vm: str,
                                                              disk: tuple[Path, str]) -> None:
    shown = json.loads(hvtools_cli("vm", "show", vm, "--json").stdout)
    pid = shown["pid"]
    control_call(_ctl(vm), "set_dirty_log", {"enabled": False})
    try:
        r = hvtools_cli("migrate", vm, "--to", "h1", "--verify", "--bandwidth", "48M")
    finally:
        control_call(_ctl(vm), "set_dirty_log", {"enabled": True})
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "guest pages differ" in last, r.stderr
    # The failed check left the source running where it was, with its reads still correct.
    now = json.loads(hvtools_cli("vm", "show", vm, "--json").stdout)
    assert now["state"] == "running" and now["host"] == "h2" and now["pid"] == pid
    n = len(_sums(vm))
    _wait_for_reads(vm, n + 1)
    assert set(_sums(vm)) == {disk[1]}
    assert incoming.records(QemuDriver(), vm) == []


def test_dirty_watch_splits_cpu_and_device(vm: str) -> None:
    r = hvtools_cli("dirty", "watch", vm, "--count", "2", "--json")
    assert r.returncode == 0, r.stderr
    samples = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(samples) == 2
    for s in samples:
        assert s["cpu_bytes_s"] is not None and s["cpu_bytes_s"] >= 0
        assert s["devices"]["vub0"]["pages"] > 0  # the reader keeps the device writing
