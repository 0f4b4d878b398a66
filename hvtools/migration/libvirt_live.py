"""Live migration of a libvirt-driver VM between two lab hosts' own libvirtds.

libvirt's "managed direct" migration (https://libvirt.org/migration.html): this client holds a
connection to both daemons and drives Begin/Prepare/Perform/Finish/Confirm through
``virDomainMigrate3``; the guest's RAM goes QEMU to QEMU over ``tcp://<destination>:<port>`` on
the lab link. Before it starts, libvirt's dirty-rate calculation (``virDomainStartDirtyRateCalc``,
read back from ``virConnectGetAllDomainStats`` ``dirtyrate.*``) measures the guest; while it runs,
``virDomainGetJobStats`` feeds the progress callback and a watchdog that aborts the job
(``virDomainAbortJob``) when no byte moves for ``stall_timeout``; at the end the completed job's
statistics (``VIR_DOMAIN_JOB_STATS_COMPLETED``) fill the same
:class:`~hvtools.migration.live.Report` the qemu driver's engine fills.

Flags: ``VIR_MIGRATE_LIVE | VIR_MIGRATE_PERSIST_DEST | VIR_MIGRATE_UNDEFINE_SOURCE`` (plus
``VIR_MIGRATE_POSTCOPY`` and ``virDomainMigrateStartPostCopy`` for ``--postcopy``). The two
hosts share this machine's filesystem, so the domain XML (live: ``VIR_MIGRATE_PARAM_DEST_XML``;
persistent: ``VIR_MIGRATE_PARAM_PERSIST_XML``) moves the agent socket and console log into the
destination host's directory. The RAM file needs no rewrite: libvirt 9.0's domain XML has no
path for it; each host's qemu.conf ``memory_backing_dir`` puts it in that host's memory dir
(:mod:`hvtools.lab.libvirtd`).

On failure before post-copy, libvirt's Finish (cancelled) kills the destination's QEMU and
Confirm resumes the source; this module then checks both: the source domain runs on the source
daemon, the destination daemon has no domain of that name, and raises one MigrationError line.
A failure after the switch to post-copy cannot leave the source intact (the destination already
ran the guest); libvirt keeps both paused for ``virDomainMigrateRecover``, which hvtools does
not drive.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import libvirt

from hvtools.control.driver import VmState
from hvtools.control.libvirt_driver import LibvirtDriver, Placement, relocate_xml
from hvtools.errors import (
    HostDownError,
    HvError,
    MigrationError,
    MigrationRefused,
    StateError,
    UsageError,
)
from hvtools.lab.hosts import load_lab
from hvtools.libvirt.daemon import connect
from hvtools.migration import live
from hvtools.migration.orchestrate import MIGRATION_PORT, LiveResult, check_capacity, require_host

#: The destination QEMU listens here on its host's lab address (one above the qemu driver's
#: port, so the two drivers' migrations into one host never collide).
LIBVIRT_MIGRATION_PORT = MIGRATION_PORT + 1
_POLL_S = 0.1
_MiB = 1 << 20
_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
          | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
_INACTIVE_XML = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


def _quiet(_msg: str) -> None:
    pass


def _message(err: libvirt.libvirtError) -> str:
    return str(err.get_error_message() or err).splitlines()[0]


def measure_dirty_rate(conn: libvirt.virConnect, dom: libvirt.virDomain,
                       calc_time_s: int = 1) -> int:
    """libvirt's ``virDomainStartDirtyRateCalc`` (QEMU ``calc-dirty-rate``, page sampling) on
    a running domain; bytes/s from the ``dirtyrate.megabytes_per_second`` domain stat."""
    try:
        dom.startDirtyRateCalc(calc_time_s, 0)
        deadline = time.monotonic() + calc_time_s + 10
        while time.monotonic() < deadline:
            stats = conn.domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_DIRTYRATE)[0][1]
            if stats.get("dirtyrate.calc_status") == libvirt.VIR_DOMAIN_DIRTYRATE_MEASURED:
                return int(stats.get("dirtyrate.megabytes_per_second", 0)) * _MiB
            time.sleep(0.1)
    except libvirt.libvirtError as err:
        raise MigrationError(f"measuring {dom.name()}'s dirty rate: {_message(err)}") from err
    raise MigrationError(f"the dirty-rate calculation of {dom.name()} did not finish")


def _progress(stats: dict[str, Any], status: str) -> live.Progress:
    """One ``virDomainGetJobStats`` sample as the progress bar shows it. While the job runs,
    libvirt's ``downtime`` is the expected downtime; ``memory_dirty_rate`` is in pages/s."""
    page = int(stats.get("memory_page_size", 4096)) or 4096
    downtime = stats.get("downtime")
    return live.Progress(status=status, transferred=int(stats.get("memory_processed", 0)),
                         remaining=int(stats.get("memory_remaining", 0)),
                         total=int(stats.get("memory_total", 0)),
                         dirty_rate=int(stats.get("memory_dirty_rate", 0)) * page,
                         expected_downtime_ms=int(downtime) if downtime is not None else None,
                         mbps=int(stats.get("memory_bps", 0)) * 8 / 1e6,
                         iteration=int(stats.get("memory_iteration", 0)))


def _status(dom: libvirt.virDomain, stats: dict[str, Any]) -> str:
    """A QEMU ``MigrationStatus`` word for a running job: libvirt's job stats carry none, the
    source's state reason tells post-copy apart."""
    with contextlib.suppress(libvirt.libvirtError):
        state, reason = dom.state()
        if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY:
            return str(live.MigrationStatus.POSTCOPY_ACTIVE)
    if not stats.get("memory_total"):
        return str(live.MigrationStatus.SETUP)
    return str(live.MigrationStatus.ACTIVE)


def _has_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


#: What :func:`_restore` returns when the migration finished after all.
MOVED = "moved"


def _restore(name: str, src: libvirt.virConnect, dst: libvirt.virConnect,
             source: str, destination: str) -> str:
    """After a failed migration: the source runs, the destination holds nothing. Returns what
    was still wrong and had to be put right ("" when libvirt had done it all).

    The source is inspected first: the destination is touched only while the source still
    holds the guest, so the one running copy is never destroyed. Returns ``MOVED`` when the
    source is gone and the destination runs (the migration finished despite the error).
    """
    dom = _has_domain(src, name)
    if dom is None or not dom.isActive():
        there = _has_domain(dst, name)
        if there is not None and there.isActive():
            return MOVED
        raise MigrationError(f"migration of {name} failed and the source domain on {source} is "
                             f"gone; {destination} holds no running copy")
    state, reason = dom.state()
    if state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED:
        raise live.SplitMigration(
            f"post-copy migration of {name} failed: the guest is split between {source} and "
            f"{destination}; both are kept (virsh migrate --postcopy-resume can recover it)")
    notes = []
    with contextlib.suppress(libvirt.libvirtError):
        left = _has_domain(dst, name)
        if left is not None:
            notes.append(f"removed a leftover domain on {destination}")
            with contextlib.suppress(libvirt.libvirtError):
                if left.isActive():
                    left.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                left.undefine()
    if state == libvirt.VIR_DOMAIN_PAUSED:
        dom.resume()
        notes.append(f"resumed the source on {source}")
    return "; ".join(notes)


def migrate_libvirt(name: str, to: str, *, opts: live.Options,
                    on_progress: Callable[[live.Progress], None] = lambda _p: None,
                    say: Callable[[str], None] = _quiet, dirty_rate_probe: bool = True,
                    transport: str = "tcp",
                    driver: LibvirtDriver | None = None) -> LiveResult:
    """Live-migrate libvirt-driver VM ``name`` from the lab host it runs on to host ``to``.

    Refusals (UsageError, StateError, HostDownError, MigrationRefused) happen before anything
    changes. A failed migration raises MigrationError with the source running and intact on
    its host and nothing of the VM on ``to``.
    """
    driver = driver or LibvirtDriver()
    where = driver.placement(name)
    if where.host is None or where.lab is None:
        raise UsageError(f"VM {name!r} does not run on a lab host (start it with `hvtools vm "
                         f"start {name} --driver libvirt --host H`)")
    vm = driver.info(name)
    if vm.state is not VmState.RUNNING:
        raise StateError(f"VM {name!r} is {vm.state}, not running")
    if where.host == to:
        raise UsageError(f"VM {name!r} already runs on {to}")
    lab = load_lab(where.lab)
    src_host = lab.host(where.host)
    if not src_host.up:
        raise HostDownError(f"source host {src_host.name} is down")
    dst_host = require_host(lab, to, "destination")
    if not lab.spec.libvirt:
        raise MigrationRefused(f"lab {lab.name!r} runs no libvirtd on its hosts")
    check_capacity(dst_host, vm.spec)
    if transport != "tcp":
        raise MigrationRefused(
            f"--transport {transport} is not available for libvirt-driver VMs here: libvirt's "
            "rdma:// migration needs an RDMA device on both hosts, and this machine has none "
            "(no /sys/class/infiniband); use --transport tcp")
    target = Placement.of_host(dst_host)
    src = driver.connection(where)
    dst = driver.connection(target)
    dom = src.lookupByName(name)
    if _has_domain(dst, name) is not None:
        raise MigrationRefused(f"{to}'s libvirtd already has a domain named {name!r}")
    rate = 0
    if dirty_rate_probe:
        say(f"measuring {name}'s dirty rate (virDomainStartDirtyRateCalc, 1 s)")
        rate = measure_dirty_rate(src, dom)
    files = target.files_dir(name)
    uri = f"tcp://{dst_host.address}:{LIBVIRT_MIGRATION_PORT}"
    try:
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_URI: uri,
            libvirt.VIR_MIGRATE_PARAM_DEST_XML: relocate_xml(
                dom.XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE), files),
            libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: relocate_xml(dom.XMLDesc(_INACTIVE_XML),
                                                                files),
        }
        if opts.bandwidth is not None:  # libvirt's unit is MiB/s
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = max(1, opts.bandwidth // _MiB)
        if opts.max_downtime_ms is not None:
            dom.migrateSetMaxDowntime(opts.max_downtime_ms, 0)
    except libvirt.libvirtError as err:
        raise MigrationError(f"preparing the migration of {name}: {_message(err)}") from err
    flags = _FLAGS | (libvirt.VIR_MIGRATE_POSTCOPY if opts.postcopy else 0)
    files.mkdir(parents=True, exist_ok=True)
    say(f"migrating {name}: {where.host} -> {to} over {uri} (libvirt managed migration)")
    # The job is watched (and aborted) over a connection of its own: a call queued behind
    # virDomainMigrate3 on the same client connection was seen to wait forever once the link
    # was cut, so the watchdog could never fire.
    try:
        watch = connect(where.uri, timeout=15.0)
    except HvError as err:
        shutil.rmtree(files, ignore_errors=True)
        raise HostDownError(f"{where.host}'s libvirtd does not answer: {err}") from err
    try:
        report, t_dest, t_switch = _run(dom, watch.lookupByName(name), dst, params, flags,
                                        opts, on_progress, rate, name, where.host, to, uri)
    except BaseException as err:
        fixed = ""
        with contextlib.suppress(libvirt.libvirtError):
            fixed = _restore(name, src, dst, where.host, to)
        if fixed == MOVED:
            driver.record_placement(name, target)
            raise MigrationError(f"libvirt reported an error ({err}) but {name} now runs on "
                                 f"{to}; its record follows it") from err
        shutil.rmtree(files, ignore_errors=True)
        if isinstance(err, libvirt.libvirtError):
            extra = f" ({fixed})" if fixed else ""
            raise MigrationError(f"libvirt migration of {name} to {to} failed: "
                                 f"{_message(err)}; {name} still runs on {where.host}{extra}"
                                 ) from err
        raise
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            watch.close()
    driver.record_placement(name, target)
    shutil.rmtree(where.files_dir(name), ignore_errors=True)
    return LiveResult(report, rate, t_dest, t_switch)


def _run(dom: libvirt.virDomain, watched: libvirt.virDomain, dst: libvirt.virConnect,
         params: dict[str, Any], flags: int,
         opts: live.Options, on_progress: Callable[[live.Progress], None], rate: int,
         name: str, source: str, destination: str, uri: str,
         ) -> tuple[live.Report, float, float]:
    """``virDomainMigrate3`` of ``dom`` in a worker thread; this thread samples the job through
    ``watched`` (the same domain on another connection), runs the stall watchdog and the switch
    to post-copy. Returns the report, the time until the first byte
    moved (libvirt's Begin/Prepare: the destination QEMU starting) and the time from the last
    sample with nothing remaining to the call's return (switch-over, Finish, Confirm)."""
    result: list[libvirt.virDomain] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            result.append(dom.migrate3(dst, params, flags))
        except BaseException as err:  # re-raised in the caller's thread
            failure.append(err)

    worker = threading.Thread(target=work, name=f"migrate-{name}", daemon=True)
    t0 = time.monotonic()
    worker.start()
    statuses: list[str] = []
    last_moved, last_bytes = time.monotonic(), -1
    first_byte: float | None = None
    drained: float | None = None
    aborted = ""
    switched = False
    while worker.is_alive():
        worker.join(_POLL_S)
        if not worker.is_alive():
            break
        try:
            stats = watched.jobStats()
        except libvirt.libvirtError:
            continue  # the source domain is going away at the very end
        if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) != libvirt.VIR_DOMAIN_JOB_UNBOUNDED:
            continue
        status = _status(watched, stats)
        p = _progress(stats, status)
        if not statuses or statuses[-1] != status:
            statuses.append(status)
        on_progress(p)
        now = time.monotonic()
        if p.total and first_byte is None:
            first_byte = now
        if p.total and p.remaining == 0:
            drained = drained or now
        if p.transferred != last_bytes:
            last_moved, last_bytes = now, p.transferred
        elif now - last_moved > opts.stall_timeout and not aborted:
            aborted = (f"no byte moved for {opts.stall_timeout:g}s (link to {destination} "
                       "down?)")
            with contextlib.suppress(libvirt.libvirtError):
                watched.abortJob()
        if now - t0 > opts.timeout and not aborted:
            aborted = f"it did not finish within {opts.timeout:g}s"
            with contextlib.suppress(libvirt.libvirtError):
                watched.abortJob()
        if (opts.postcopy and not switched and p.total
                and now - (first_byte or now) >= opts.postcopy_after_s):
            try:
                watched.migrateStartPostCopy(0)
                switched = True
            except libvirt.libvirtError:
                pass  # not yet in a phase that allows it; try again next sample
    worker.join()
    t_end = time.monotonic()
    if failure:
        err = failure[0]
        if aborted and isinstance(err, libvirt.libvirtError):
            raise MigrationError(f"migration of {name} to {destination} aborted: {aborted}; "
                                 f"{name} still runs on {source}") from err
        raise err
    new = result[0]
    try:
        done = new.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError as err:
        raise MigrationError(f"reading the completed job of {name} on {destination}: "
                             f"{_message(err)}") from err
    page = int(done.get("memory_page_size", 4096)) or 4096
    sent = int(done.get("memory_normal", 0)) + int(done.get("memory_constant", 0))
    total = int(done.get("memory_total", 0))
    statuses.append(str(live.MigrationStatus.COMPLETED))
    downtime = done.get("downtime")
    report = live.Report(
        vm=name, source=source, destination=destination, uri=uri,
        status=str(live.MigrationStatus.COMPLETED),
        total_time_ms=int(done.get("time_elapsed", 0)),
        # QEMU's own query-migrate figure dies with the source QEMU before libvirt returns
        # (its job stats show the expected downtime until then), so only libvirt's own is
        # reported: source CPUs stopped -> destination resumed, from the migration cookie's
        # timestamps (``downtime_net`` corrects a clock offset the hosts here do not have).
        qemu_downtime_ms=None,
        measured_downtime_ms=float(downtime) if downtime is not None else None,
        setup_time_ms=int(done["setup_time"]) if "setup_time" in done else None,
        transferred_bytes=int(done.get("memory_processed", 0)), ram_total_bytes=total,
        pages_sent=sent, pages_resent=max(0, sent - total // page),
        iterations=int(done.get("memory_iteration", 0)), dirty_rate_before=rate,
        postcopy=opts.postcopy, statuses=statuses)
    t_dest = ((first_byte or t_end) - t0) * 1000
    t_switch = (t_end - (drained or t_end)) * 1000
    return report, round(t_dest, 1), round(t_switch, 1)
