"""Migration between lab hosts on real namespaces, QEMU (TCG) and the fabric transport.

Live: QEMU's own migration between two hosts' QEMUs (qemu driver), with a guest that keeps
writing memory and counting; refusals and a link cut mid-way leave the source running and
intact. Recovery: `host fail` freezes a host's VM into its memory, `recover` pulls it by
one-sided READs onto another host; the pulled RAM file is compared byte for byte with the
frozen one, the guest's own data and counter are checked after it resumes, and a pull broken by
a cut link resumes where it stopped.

One lab per module (its own name and subnet), torn down at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from hvtools.control.qemu_driver import QemuDriver, host_ram_path
from hvtools.errors import HvError, MigrationRefused
from hvtools.guest.image import GuestImage
from hvtools.lab import build
from hvtools.lab.hosts import Lab, load_lab, netns_inode
from hvtools.lab.spec import parse_lab_toml
from hvtools.migration import incoming, recovery
from hvtools.migration import pagetable as pt
from hvtools.migration.orchestrate import check_capacity
from tests.integration.conftest import RUN, hvtools_cli, qemu_pids_for

LAB = f"m{RUN}"
NET = "10.214.9"

WORKLOAD = ("i=0; while :; do i=$((i+1)); echo $i >> /tmp/counter.log; "
            "dd if=/dev/urandom of=/dev/shm/buf bs=64k count=1 seek=$((i % 256)) conv=notrunc "
            "2>/dev/null; done")
CHECK = ('awk "\\$1 != NR { print \\"BROKEN at line \\" NR \\": \\" \\$1; bad=1; exit } '
         'END { if (!bad) print NR }" /tmp/counter.log')


@pytest.fixture(scope="module")
def lab(image: GuestImage) -> Iterator[Lab]:
    spec = parse_lab_toml(
        f'name = "{LAB}"\nlink = "veth"\nsubnet = "{NET}.0/24"\n'
        + "".join(f'[[host]]\nname = "h{i}"\naddress = "{NET}.{i}"\n' for i in (1, 2, 3)),
        "test lab")
    with contextlib.suppress(HvError):
        build.lab_down(LAB)
    build.lab_up(spec)
    try:
        yield load_lab(LAB)
    finally:
        build.lab_down(LAB)


class Guests:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.driver = QemuDriver()
        self.names: list[str] = []

    def start(self, suffix: str, host: str = "h1", memory: str = "512M") -> str:
        name = f"{RUN}-mg-{suffix}"
        self.names.append(name)
        r = hvtools_cli("vm", "start", name, "--host", f"{LAB}/{host}", "--memory", memory,
                        "--vcpus", "1")
        assert r.returncode == 0, r.stderr
        return name

    def sh(self, name: str, cmd: str, timeout: float = 120) -> str:
        res = self.driver.exec(name, ["sh", "-c", cmd], timeout=timeout)
        assert res.status == 0, res
        return res.stdout.decode().strip()

    def fill(self, name: str, mib: int) -> str:
        """Random data in guest RAM (tmpfs); returns its md5."""
        return self.sh(name, f"dd if=/dev/urandom of=/dev/shm/data bs=1M count={mib} "
                             "2>/dev/null; md5sum /dev/shm/data")

    def start_workload(self, name: str) -> None:
        self.sh(name, f"({WORKLOAD}) >/dev/null 2>&1 &")
        time.sleep(0.5)

    def counter(self, name: str) -> int:
        out = self.sh(name, CHECK)
        assert "BROKEN" not in out, f"the counter log has a gap or a repeat: {out}"
        return int(out)

    def cleanup(self) -> None:
        for h in self.lab.hosts:
            for meta in recovery.frozen_vms(h.memory_dir):
                with contextlib.suppress(HvError):
                    h.call("recovery_release", vm=meta["vm"], delete=True)
            for n in self.names:
                with contextlib.suppress(HvError):
                    h.call("recovery_abort", vm=n)
            with contextlib.suppress(HvError):
                h.call("host_revive")
        for n in self.names:
            for rec in (n, *incoming.records(self.driver, n)):
                with contextlib.suppress(HvError):
                    self.driver.kill(rec)
                with contextlib.suppress(HvError):
                    self.driver.undefine(rec)


@pytest.fixture
def guests(lab: Lab) -> Iterator[Guests]:
    g = Guests(lab)
    yield g
    g.cleanup()


def _json(r: subprocess.CompletedProcess[str]) -> Any:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _one_line_error(r: subprocess.CompletedProcess[str], status: int, needle: str) -> None:
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert needle in lines[0], lines[0]


def _show(name: str) -> dict[str, Any]:
    out: dict[str, Any] = _json(hvtools_cli("vm", "show", name, "--json"))
    return out


def _file_hash(path: Path) -> int:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.intdigest()


# -- live -----------------------------------------------------------------------------------------
def test_live_migration_moves_the_running_guest(lab: Lab, guests: Guests) -> None:
    name = guests.start("live")
    md5 = guests.fill(name, 64)
    guests.start_workload(name)
    c0 = guests.counter(name)
    rep = _json(hvtools_cli("migrate", name, "--to", "h2", "--json"))
    assert rep["status"] == "completed" and rep["source"] == "h1" and rep["destination"] == "h2"
    assert rep["statuses"][0] in ("setup", "active") and rep["statuses"][-1] == "completed"
    assert rep["qemu_downtime_ms"] is not None and rep["measured_downtime_ms"] > 0
    assert rep["transferred_bytes"] > 64 << 20 and rep["pages_sent"] >= (512 << 20) // 4096
    assert rep["dirty_rate_before"] is not None and rep["iterations"] >= 1
    shown = _show(name)
    assert shown["state"] == "running" and shown["host"] == "h2"
    assert os.stat(f"/proc/{shown['pid']}/ns/net").st_ino == netns_inode(lab.host("h2").netns)
    assert guests.sh(name, "md5sum /dev/shm/data") == md5
    assert guests.counter(name) > c0
    # The intel-iommu (scalable mode) came along: the guest's view and the MMIO still agree.
    caps = _json(hvtools_cli("iommu", "caps", name, "--json"))
    assert caps["agree"], caps
    # One QEMU, one record, one RAM file: on h2.
    # (The migrated QEMU keeps the -name of the record it started under, NAME.mXXXXX.)
    assert qemu_pids_for(fr"{name}(\.m[0-9a-f]+)?") == [shown["pid"]]
    assert incoming.records(guests.driver, name) == []
    assert not host_ram_path(lab.host("h1").memory_dir, name).exists()
    assert host_ram_path(lab.host("h2").memory_dir, name).exists()
    # And back, in post-copy.
    back = _json(hvtools_cli("migrate", name, "--to", "h1", "--postcopy", "--json"))
    assert back["status"] == "completed" and back["postcopy"] is True
    assert "postcopy-active" in back["statuses"], back["statuses"]
    assert _show(name)["host"] == "h1"
    assert guests.sh(name, "md5sum /dev/shm/data") == md5
    guests.counter(name)


def test_live_migration_refusals_change_nothing(lab: Lab, guests: Guests) -> None:
    name = guests.start("refuse")
    pid = _show(name)["pid"]
    idle = f"{RUN}-mg-idle"
    guests.names.append(idle)
    assert hvtools_cli("vm", "create", idle, "--memory", "256M").returncode == 0
    _one_line_error(hvtools_cli("migrate", f"{RUN}-nosuch", "--to", "h2"), 2, "no VM named")
    _one_line_error(hvtools_cli("migrate", name, "--to", "h9"), 2, "no host 'h9'")
    _one_line_error(hvtools_cli("migrate", name, "--to", "h1"), 2, "already runs on h1")
    _one_line_error(hvtools_cli("migrate", idle, "--to", "h2"), 2, "not running")
    _one_line_error(hvtools_cli("migrate", name, "--to", "h2", "--transport", "rdma"), 2,
                    "RDMA device")
    _one_line_error(hvtools_cli("migrate", name, "--to", "h2", "--bandwidth", "fast"), 2,
                    "--bandwidth")
    # Not enough memory on the destination for the spec.
    spec = guests.driver.info(name).spec
    with pytest.raises(MigrationRefused, match="lacks memory"):
        check_capacity(lab.host("h2"), dataclasses.replace(spec, memory=64 << 40))
    # A destination host that is down.
    h3 = lab.host("h3")
    agent = h3.agent_pid
    assert agent is not None
    os.kill(agent, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while h3.agent_pid is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    _one_line_error(hvtools_cli("migrate", name, "--to", "h3"), 2, "down")
    # Nothing changed: the same QEMU runs on h1, no destination record was left.
    shown = _show(name)
    assert shown["state"] == "running" and shown["host"] == "h1" and shown["pid"] == pid
    assert incoming.records(guests.driver, name) == []
    assert guests.sh(name, "echo ok") == "ok"


def test_cut_link_during_live_migration_leaves_the_source_running(lab: Lab,
                                                                 guests: Guests) -> None:
    name = guests.start("cut")
    md5 = guests.fill(name, 96)
    guests.start_workload(name)
    pid = _show(name)["pid"]
    exe = Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "hvtools"
    proc = subprocess.Popen([str(exe) if exe.exists() else "hvtools", "migrate", name,
                             "--to", "h2", "--bandwidth", "8M", "--stall-timeout", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    h2 = lab.host("h2")
    try:
        # Cut once the destination exists and bytes are moving.
        deadline = time.monotonic() + 60
        while not incoming.records(guests.driver, name) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)
        assert proc.poll() is None, proc.communicate()
        h2.run(["ip", "link", "set", "eth0", "down"], check=True)
        out, err = proc.communicate(timeout=120)
    finally:
        h2.run(["ip", "link", "set", "eth0", "up"])
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, (out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and "stalled" in last, err
    shown = _show(name)
    assert shown["state"] == "running" and shown["host"] == "h1" and shown["pid"] == pid
    assert guests.sh(name, "md5sum /dev/shm/data") == md5
    c = guests.counter(name)
    time.sleep(0.5)
    assert guests.counter(name) > c
    assert incoming.records(guests.driver, name) == []
    assert not list(h2.memory_dir.glob(f"{name}.m*"))
    assert qemu_pids_for(name) == [pid] and not qemu_pids_for(fr"{name}\.m[0-9a-f]+")


# -- recovery -------------------------------------------------------------------------------------
def test_recovery_restores_every_page_and_the_running_guest(lab: Lab, guests: Guests) -> None:
    name = guests.start("rec")
    md5 = guests.fill(name, 64)
    guests.start_workload(name)
    c0 = guests.counter(name)
    failed = _json(hvtools_cli("host", "fail", "h1", "--lab", LAB, "--json"))
    frozen = {m["vm"]: m for m in failed["frozen"]}
    assert name in frozen and not failed["errors"]
    meta = frozen[name]
    assert meta["ram_size"] == 512 << 20 and meta["pages"] > (64 << 20) // 4096
    assert meta["dev_len"] > 0 and meta["populated_pages"] >= meta["pages"]
    assert not qemu_pids_for(name)
    assert _show(name)["state"] != "running"
    h1, h2 = lab.host("h1"), lab.host("h2")
    files = recovery.VmFiles(recovery.frozen_dir(h1.memory_dir), name)
    table = pt.parse(files.table.read_bytes())
    assert len(table.entries) == meta["pages"]

    # Differential: a pull into h2's memory holds exactly the frozen RAM, every byte.
    pulled = h2.call("recovery_pull", vm=name, source=h1.address, timeout=300)
    assert pulled["pages"] == meta["pages"] and pulled["bytes"] == meta["pages"] * 4096
    with open(files.ram, "rb") as a, open(pulled["ram_path"], "rb") as b:
        ma = mmap.mmap(a.fileno(), 0, prot=mmap.PROT_READ)
        mb = mmap.mmap(b.fileno(), 0, prot=mmap.PROT_READ)
        try:
            assert len(ma) == len(mb) == 512 << 20
            assert np.array_equal(np.frombuffer(ma, np.uint64), np.frombuffer(mb, np.uint64))
        finally:
            ma.close()
            mb.close()
    assert Path(pulled["devstate_path"]).read_bytes() == files.devstate.read_bytes()
    # --abort drops that copy; the frozen one stays.
    r = hvtools_cli("recover", name, "--to", "h2", "--lab", LAB, "--abort")
    assert r.returncode == 0, r.stderr
    assert not Path(pulled["ram_path"]).exists() and files.ram.exists()

    rec = _json(hvtools_cli("recover", name, "--to", "h2", "--lab", LAB, "--json"))
    assert rec["source"] == "h1" and rec["destination"] == "h2"
    assert rec["pull"]["pages"] == meta["pages"] and rec["pull"]["resumed_runs"] == 0
    shown = _show(name)
    assert shown["state"] == "running" and shown["host"] == "h2"
    assert guests.sh(name, "md5sum /dev/shm/data") == md5
    c1 = guests.counter(name)
    time.sleep(0.5)
    assert c0 <= c1 < guests.counter(name)
    assert _json(hvtools_cli("iommu", "caps", name, "--json"))["agree"]
    # The table rebuilt on h2, stored beside its RAM file; h1's frozen copy is released.
    rebuilt = pt.parse(host_ram_path(h2.memory_dir, name).with_suffix(".pgtbl").read_bytes())
    assert np.array_equal(rebuilt.entries["hash"], table.entries["hash"])
    assert not files.ram.exists() and not files.meta.exists()
    assert hvtools_cli("host", "revive", "h1", "--lab", LAB).returncode == 0


def test_recovery_resumes_after_a_cut_link(lab: Lab, guests: Guests) -> None:
    name = guests.start("resume")
    md5 = guests.fill(name, 160)
    guests.start_workload(name)
    _json(hvtools_cli("host", "fail", "h1", "--lab", LAB, "--json"))
    h1, h2 = lab.host("h1"), lab.host("h2")
    files = recovery.VmFiles(recovery.frozen_dir(h1.memory_dir), name)
    before = _file_hash(files.ram)
    # Slow h1's link so the pull is still running when the link is cut.
    h1.run(["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "100mbit",
            "burst", "64kb", "latency", "100ms"], check=True)
    exe = Path(os.environ.get("VIRTUAL_ENV", ".venv")) / "bin" / "hvtools"
    try:
        proc = subprocess.Popen([str(exe) if exe.exists() else "hvtools", "recover", name,
                                 "--to", "h2", "--lab", LAB],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            prog = h2.call("recovery_progress", vm=name)
            if prog["done"] > (32 << 20):
                break
            time.sleep(0.1)
        h1.run(["ip", "link", "set", "eth0", "down"], check=True)
        out, err = proc.communicate(timeout=120)
    finally:
        h1.run(["ip", "link", "set", "eth0", "up"])
        h1.run(["tc", "qdisc", "del", "dev", "eth0", "root"])
    assert proc.returncode != 0, (out, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:"), err
    # Nothing half-started; the failed host's memory is intact; the partial pull is kept.
    assert not qemu_pids_for(name)
    assert _show(name)["state"] != "running"
    assert _file_hash(files.ram) == before and files.meta.exists()
    partial = h2.call("recovery_progress", vm=name)["partial"]
    assert partial is not None and partial["runs_done"] > 0
    deadline = time.monotonic() + 30
    while not h2.call("probe_peer", address=h1.address)["ok"] and time.monotonic() < deadline:
        time.sleep(0.2)
    rec = _json(hvtools_cli("recover", name, "--to", "h2", "--lab", LAB, "--json"))
    assert rec["pull"]["resumed_runs"] == partial["runs_done"]
    assert _show(name)["host"] == "h2"
    assert guests.sh(name, "md5sum /dev/shm/data") == md5
    guests.counter(name)


def test_recovery_refusals_change_nothing(lab: Lab, guests: Guests) -> None:
    name = guests.start("rref", memory="256M")
    running = guests.start("rrun", host="h2", memory="256M")
    _one_line_error(hvtools_cli("host", "fail", "h9", "--lab", LAB), 2, "no host 'h9'")
    _one_line_error(hvtools_cli("recover", f"{RUN}-nosuch", "--to", "h2", "--lab", LAB), 2,
                    "no VM named")
    _one_line_error(hvtools_cli("recover", name, "--to", "h2", "--lab", LAB), 2,
                    "frozen copy")
    _json(hvtools_cli("host", "fail", "h1", "--lab", LAB, "--json"))
    h1 = lab.host("h1")
    files = recovery.VmFiles(recovery.frozen_dir(h1.memory_dir), name)
    before = _file_hash(files.ram)
    _one_line_error(hvtools_cli("host", "fail", "h1", "--lab", LAB), 2, "already failed")
    _one_line_error(hvtools_cli("host", "revive", "h1", "--lab", LAB), 2, "frozen")
    _one_line_error(hvtools_cli("recover", name, "--to", "h1", "--lab", LAB), 2,
                    "failed host")
    _one_line_error(hvtools_cli("vm", "start", f"{RUN}-mg-late", "--host", f"{LAB}/h1"), 2,
                    "failed")
    # A spec that does not match the frozen copy.
    spec_file = guests.driver.root / name / "spec.json"
    original = spec_file.read_text()
    spec_file.write_text(json.dumps({**json.loads(original), "memory": "512M"}))
    try:
        _one_line_error(hvtools_cli("recover", name, "--to", "h2", "--lab", LAB), 2,
                        "mismatched spec")
    finally:
        spec_file.write_text(original)
    assert _file_hash(files.ram) == before and files.meta.exists()
    assert not host_ram_path(lab.host("h2").memory_dir, name).exists()
    assert _show(running)["state"] == "running"
    rec = _json(hvtools_cli("recover", name, "--to", "h2", "--lab", LAB, "--json"))
    assert rec["destination"] == "h2"


def test_a_failed_freeze_leaves_the_vm_running(lab: Lab, guests: Guests) -> None:
    name = guests.start("ffail", memory="256M")
    guests.start_workload(name)
    pid = _show(name)["pid"]
    h1 = lab.host("h1")
    # Fault injection: the device state cannot be written (a directory sits where QEMU's
    # migration to a file must create it), after the vCPUs were stopped.
    blocker = recovery.VmFiles(recovery.frozen_dir(h1.memory_dir), name).devstate \
        .with_suffix(".devstate.tmp")
    blocker.mkdir(parents=True)
    try:
        r = hvtools_cli("host", "fail", "h1", "--lab", LAB)
    finally:
        blocker.rmdir()
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.strip().splitlines()[-1].startswith("error:") and "did not fail" in r.stderr
    shown = _show(name)
    assert shown["state"] == "running" and shown["pid"] == pid
    c = guests.counter(name)
    time.sleep(0.5)
    assert guests.counter(name) > c
    assert not h1.failed and recovery.frozen_vms(h1.memory_dir) == []


def test_a_failed_restore_kills_the_destination_and_keeps_the_frozen_copy(
        lab: Lab, guests: Guests) -> None:
    name = guests.start("rfail", memory="256M")
    md5 = guests.fill(name, 32)
    _json(hvtools_cli("host", "fail", "h1", "--lab", LAB, "--json"))
    files = recovery.VmFiles(recovery.frozen_dir(lab.host("h1").memory_dir), name)
    before = _file_hash(files.ram)
    # Fault injection: the destination's QEMU cannot start.
    r = hvtools_cli("recover", name, "--to", "h2", "--lab", LAB,
                    env={"HVTOOLS_QEMU": "/bin/false"})
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error:"), r
    assert not qemu_pids_for(name) and _show(name)["state"] != "running"
    assert _file_hash(files.ram) == before and files.meta.exists()
    assert not host_ram_path(lab.host("h2").memory_dir, name).exists()
    rec = _json(hvtools_cli("recover", name, "--to", "h2", "--lab", LAB, "--json"))
    assert rec["destination"] == "h2"
    assert guests.sh(name, "md5sum /dev/shm/data") == md5
