"""Migrations between lab hosts, end to end: checks, the destination, the engine, the switch-over.

``migrate_live``: QEMU's own live migration (qemu driver: QMP on both sides, see
:mod:`hvtools.migration.live`). ``fail_host`` / ``recover``: the seed design of
:mod:`hvtools.migration.recovery`, driven through the hosts' agents.

Every refusal happens before anything changes. A failure after that removes what was started on
the destination, and leaves the source VM running (live) or the failed host's memory intact
(recovery), so the same command can simply be run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvtools.control import vhost_backends
from hvtools.control.driver import VmInfo, VmState
from hvtools.control.drivers import find_driver
from hvtools.control.qemu_driver import QemuDriver, host_ram_path, ram_path
from hvtools.errors import (
    HostDownError,
    HvError,
    MigrationRefused,
    StateError,
    UsageError,
)
from hvtools.lab.hosts import HostHandle, Lab, load_lab
from hvtools.migration import incoming, live, recovery
from hvtools.migration.device_log import DeviceLog
from hvtools.migration.verify import VerifyFailed, compare_ram
from hvtools.spec import VmSpec

Say = Callable[[str], None]

#: Port QEMU's incoming migration listens on, on the destination's lab address.
MIGRATION_PORT = 49152


def _quiet(_msg: str) -> None:
    pass


@dataclass(frozen=True)
class Placement:
    vm: VmInfo
    lab: Lab
    source: HostHandle


def _rdma_devices() -> list[str]:
    root = Path("/sys/class/infiniband")
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def require_host(lab: Lab, name: str, role: str) -> HostHandle:
    host = lab.host(name)
    if not host.up:
        raise HostDownError(f"{role} host {name} is down (its agent does not answer)")
    if host.failed:
        raise MigrationRefused(f"{role} host {name} has failed (hvtools host revive {name})")
    return host


def check_capacity(host: HostHandle, spec: VmSpec) -> None:
    """The destination must hold the VM's RAM in its memory (tmpfs) and in host RAM; the
    host's agent measures it (agent RPC ``capacity``)."""
    cap = host.call("capacity")
    have = min(int(cap["memory_dir_free"]), int(cap["mem_available"]))
    if have < spec.memory:
        raise MigrationRefused(
            f"host {host.name} lacks memory for {spec.name}: needs {spec.memory >> 20} MiB, "
            f"has {have >> 20} MiB free")


def place(driver: QemuDriver, name: str) -> Placement:
    vm = driver.info(name)
    if vm.host is None or vm.lab is None:
        raise UsageError(f"VM {name!r} does not run on a lab host (start it with "
                         f"`hvtools vm start {name} --host H`)")
    lab = load_lab(vm.lab)
    return Placement(vm, lab, lab.host(vm.host))


# -- live -----------------------------------------------------------------------------------------
@dataclass
class LiveResult:
    report: live.Report
    dirty_rate: int
    destination_start_ms: float
    switchover_ms: float
    verified: dict[str, Any] | None = None  # the page comparison of --verify

    def to_json(self) -> dict[str, Any]:
        out = self.report.to_json()
        out.update(destination_start_ms=self.destination_start_ms,
                   switchover_ms=self.switchover_ms, verified=self.verified)
        return out


def migrate_live(name: str, to: str, *, transport: str = "tcp",
                 opts: live.Options | None = None,
                 on_progress: Callable[[live.Progress], None] = lambda _p: None,
                 say: Say = _quiet, driver: QemuDriver | None = None,
                 verify: bool = False) -> LiveResult:
    """Live-migrate ``name`` to host ``to``. ``verify`` (qemu driver): hold the destination
    paused at completion, compare every guest page of both RAM files, and run it only if they
    are identical; otherwise resume the source and remove the destination (VerifyFailed)."""
    opts = opts or live.Options()
    if driver is None and (holder := find_driver(name)).name == "libvirt":
        if vhost_backends.vhost_devices(holder.info(name).spec):
            raise MigrationRefused(
                f"{name} has a vhost-user-blk device: libvirt's migration would need hvtools "
                "to start the destination's backend, which it does not do; use the qemu driver")
        if verify:
            raise UsageError("--verify needs the qemu driver (libvirt resumes the destination "
                             "itself)")
        # libvirt's own migration API between the two hosts' daemons.
        from hvtools.migration.libvirt_live import migrate_libvirt

        return migrate_libvirt(name, to, opts=opts, on_progress=on_progress, say=say,
                               transport=transport)
    driver = driver or QemuDriver()
    state = driver.info(name).state
    if state is not VmState.RUNNING:
        raise StateError(f"VM {name!r} is {state}, not running")
    p = place(driver, name)
    if p.source.name == to:
        raise UsageError(f"VM {name!r} already runs on {to}")
    if not p.source.up:
        raise HostDownError(f"source host {p.source.name} is down")
    dst = require_host(p.lab, to, "destination")
    check_capacity(dst, p.vm.spec)
    if transport not in ("tcp", "rdma"):
        raise UsageError(f"unknown transport {transport!r} (tcp or rdma)")
    if transport == "rdma" and not _rdma_devices():
        raise MigrationRefused(
            "--transport rdma needs an RDMA device on both hosts for QEMU's rdma: "
            "migration; this machine has none (/sys/class/infiniband is empty, no rxe/siw "
            "in the kernel). Use --transport tcp")
    status = driver.qmp(name, "query-status")["status"]
    if status != "running":
        raise StateError(f"VM {name!r} is {status}, not running")
    assert p.vm.state_dir is not None
    src_qmp = p.vm.state_dir / "qmp.sock"
    say(f"measuring {name}'s dirty rate (calc-dirty-rate, 1 s)")
    rate = live.dirty_rate(src_qmp)
    scheme = "rdma" if transport == "rdma" else "tcp"
    uri = f"{scheme}:{dst.address}:{MIGRATION_PORT}"
    say(f"starting the destination on {to}")
    t0 = time.monotonic()
    dest = incoming.start(driver, name, host=f"{p.lab.name}/{to}", hold=verify)
    t_dst = (time.monotonic() - t0) * 1000
    if verify:
        opts = dataclasses.replace(opts, hold_destination=True)
    comparison = None
    devices = vhost_backends.vhost_devices(p.vm.spec)
    dlog = DeviceLog({d: vhost_backends.BackendFiles(p.vm.state_dir, d).control
                      for d in devices}) if devices else None
    try:
        report = live.migrate(name, p.source.name, to, src_qmp, dest.qmp_socket, uri, opts,
                              on_progress, rate, dlog.harvest if dlog else None)
        if dlog is not None:
            report.device_log = dlog.summary()
        if verify:
            say(f"comparing every page of {name}'s RAM on {p.source.name} and {to}")
            comparison = compare_ram(ram_path(name), ram_path(dest.record))
            if comparison.differing:
                driver.qmp(name, "cont")  # the source's memory is the guest's true state
                raise VerifyFailed(
                    f"{len(comparison.differing)} of {comparison.pages} guest pages differ "
                    f"between {p.source.name} and {to} after the migration (first at GPA "
                    f"{comparison.differing[0]:#x}); {name} runs on {p.source.name}",
                    comparison.differing)
            driver.qmp(dest.record, "cont")
    except live.SplitMigration:
        raise  # both sides hold part of the guest: keep both (see live.SplitMigration)
    except BaseException:
        incoming.discard_record(driver, dest.record)
        raise
    t1 = time.monotonic()
    incoming.adopt(driver, dest)
    return LiveResult(report, rate, round(t_dst, 1), round((time.monotonic() - t1) * 1000, 1),
                      comparison.to_json() if comparison is not None else None)


# -- host failure and recovery ------------------------------------------------------------------
def fail_host(host_name: str, lab_name: str | None = None, say: Say = _quiet) -> dict[str, Any]:
    lab = load_lab(lab_name)
    host = lab.host(host_name)
    if not host.up:
        raise HostDownError(f"host {host_name} is down (its agent does not answer)")
    if host.failed:
        raise StateError(f"host {host_name} has already failed")
    say(f"{host_name}: freezing its VMs, saving page tables and device state")
    result: dict[str, Any] = host.call("host_fail", timeout=300.0)
    driver = QemuDriver()
    for meta in result.get("frozen", []):
        # Its QEMU is gone (killed by the freeze); clear the stale runtime. The RAM file has
        # moved to the host's frozen/ directory, so this frees nothing of the guest's.
        with contextlib.suppress(HvError):
            driver.kill(meta["vm"])
    return result


def revive_host(host_name: str, lab_name: str | None = None) -> dict[str, Any]:
    lab = load_lab(lab_name)
    result: dict[str, Any] = lab.host(host_name).call("host_revive")
    return result


def _holder(lab: Lab, vm: str) -> HostHandle | None:
    """The host whose agent holds a frozen copy of ``vm`` (agent RPC ``frozen_list``)."""
    for h in lab.hosts:
        with contextlib.suppress(HostDownError):
            if any(m.get("vm") == vm for m in h.call("frozen_list")):
                return h
    return None


@dataclass
class RecoveryResult:
    vm: str
    source: str
    destination: str
    pull: dict[str, Any]
    start_ms: float
    restore_ms: float
    answer_ms: float
    total_ms: float
    steps: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def recover(name: str, to: str, *, lab_name: str | None = None,
            on_progress: Callable[[int, int], None] = lambda _d, _t: None,
            say: Say = _quiet, driver: QemuDriver | None = None,
            answer_timeout: float = 60.0) -> RecoveryResult:
    """Pull frozen VM ``name`` onto host ``to`` and resume it there.

    The destination QEMU starts (``-incoming defer``, on the RAM file being filled) while the
    pages travel; it is resumed only once every page and the device state arrived verified.
    On failure it is killed, the partial RAM file is parked for a resume, and the failed
    host's frozen copy is untouched.
    """
    driver = driver or QemuDriver()
    t0 = time.monotonic()
    vm = driver.info(name)  # UnknownVmError for a name hvtools never knew
    lab = load_lab(lab_name or vm.lab)
    source = _holder(lab, name)
    if source is None:
        raise UsageError(f"no host of lab {lab.name} holds a frozen copy of {name!r} "
                         "(only VMs of a host that went through `hvtools host fail` recover)")
    if vm.state.active:
        raise StateError(f"VM {name!r} is {vm.state} on {vm.host}; it is not frozen")
    if source.name == to:
        raise UsageError(f"{to} is the failed host holding {name!r}; recover onto another host")
    if not source.up:
        raise HostDownError(f"{source.name}'s agent (its NIC) does not answer: its memory "
                            "cannot be read")
    dst = require_host(lab, to, "destination")
    exports = source.call("recovery_exports", vm=name)
    frozen_size = int(exports["meta"]["ram_size"])
    if frozen_size != vm.spec.memory:
        raise MigrationRefused(
            f"mismatched spec: {name}'s spec has {vm.spec.memory >> 20} MiB of RAM, the frozen "
            f"copy on {source.name} {frozen_size >> 20} MiB")
    check_capacity(dst, vm.spec)
    ram = host_ram_path(dst.memory_dir, name)
    # Before any QEMU maps the RAM file: resume a partial pull of this freeze, or clear the way.
    prep = dst.call("recovery_prepare", vm=name, ram_path=str(ram),
                    created_ns=int(exports["meta"]["created_ns"]))
    if prep["resume"]:
        say(f"resuming an earlier pull of {name} on {to}")
    say(f"pulling {name} from {source.name} ({source.address}) into {to}'s memory; "
        f"starting QEMU on {to}")
    result: dict[str, Any] = {}
    failure: list[BaseException] = []

    def work() -> None:
        try:
            result.update(dst.request("recovery_pull", {"vm": name, "source": source.address,
                                                        "ram_path": str(ram)}, timeout=900.0))
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)

    th = threading.Thread(target=work, name=f"pull-{name}")
    th.start()
    started = False
    t_start = time.monotonic()
    t_restore = t_answer = t_start
    try:
        info, _ = driver.start(name, host=f"{lab.name}/{to}", keep_ram=True, wait_agent=False,
                               extra_args=("-incoming", "defer"))
        started = True
        t_started = time.monotonic()
        while th.is_alive():
            th.join(0.1)
            with contextlib.suppress(HvError):
                prog = dst.call("recovery_progress", vm=name, timeout=5.0)
                if prog.get("total"):
                    on_progress(int(prog["done"]), int(prog["total"]))
        if failure:
            raise failure[0]
        say(f"{name}: {result['pages']} pages verified; loading its device state")
        t_restore = time.monotonic()
        assert info.state_dir is not None
        recovery.restore_vm(info.state_dir / "qmp.sock", Path(result["devstate_path"]))
        t_answer = time.monotonic()
        with driver.agent(name, timeout=answer_timeout) as agent:
            agent.ping()
    except BaseException:
        if started:  # first, so nothing runs on a half-filled RAM file
            with contextlib.suppress(HvError):
                driver.kill(name, keep_ram=True)
        th.join()
        with contextlib.suppress(HvError):  # kept beside its journal for a resume
            dst.call("recovery_park", vm=name, ram_path=str(ram))
        raise
    t_end = time.monotonic()
    with contextlib.suppress(HvError):  # the rebuilt table goes beside its RAM file
        dst.call("recovery_finish", vm=name, ram_path=str(ram))
    try:
        source.call("recovery_release", vm=name, delete=True)
    except HvError as err:
        say(f"warning: {source.name} did not release its frozen copy of {name} ({err}); "
            f"remove it before `hvtools host revive {source.name}`")
    return RecoveryResult(
        vm=name, source=source.name, destination=to, pull=result,
        start_ms=round((t_started - t_start) * 1000, 1),
        restore_ms=round((t_answer - t_restore) * 1000, 1),
        answer_ms=round((t_end - t_answer) * 1000, 1),
        total_ms=round((t_end - t0) * 1000, 1))


def abort_recovery(name: str, to: str, lab_name: str | None = None) -> dict[str, Any]:
    """Throw away what a broken recovery left on ``to``; the failed host's copy stays."""
    lab = load_lab(lab_name)
    out: dict[str, Any] = lab.host(to).call("recovery_abort", vm=name)
    return out

