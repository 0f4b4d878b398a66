"""QEMU's own live migration, driven over QMP on both sides, with a watchdog and a report.

The engine holds one QMP session per QEMU for the whole migration (QEMU's monitor takes one client
at a time), so it sees both sides' events: the source's ``STOP`` and the destination's ``RESUME``
timestamps give a downtime measured from outside QEMU, reported beside QEMU's own
``query-migrate`` ``downtime`` figure (qapi/migration.json, ``MigrationInfo``).

Statuses mirror QEMU's ``MigrationStatus`` (qapi/migration.json). The engine never leaves a half
state behind: on any failure it cancels the source's migration, makes sure the source runs again,
and the caller removes the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from qemu.qmp import ExecuteError, QMPClient, QMPError

from hvtools.errors import MigrationError, QmpError, UsageError


class SplitMigration(MigrationError):
    """A migration that failed after the source may have stopped for good (post-copy, or after
    completion): neither side is resumed or removed."""


class MigrationStatus(StrEnum):
    """QEMU 10.0 ``MigrationStatus`` (qapi/migration.json)."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"

    @property
    def finished(self) -> bool:
        return self in (MigrationStatus.COMPLETED, MigrationStatus.FAILED,
                        MigrationStatus.CANCELLED)


@dataclass(frozen=True)
class Options:
    """What the user asked for; QEMU's own parameter names in comments."""

    postcopy: bool = False            # capability postcopy-ram + migrate-start-postcopy
    max_downtime_ms: int | None = None  # parameter downtime-limit
    bandwidth: int | None = None      # parameter max-bandwidth, bytes/s
    stall_timeout: float = 10.0       # cancel when no byte moves for this long (a cut link)
    timeout: float = 600.0            # whole-migration bound
    postcopy_after_s: float = 0.0     # switch to postcopy this long after the first pass starts
    hold_destination: bool = False    # the destination runs -S: it stays paused at completion


@dataclass
class Progress:
    """One ``query-migrate`` sample, as the progress bar shows it."""

    status: str
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    dirty_rate: int = 0   # bytes/s, ram.dirty-pages-rate x page size
    expected_downtime_ms: int | None = None
    mbps: float = 0.0
    iteration: int = 0    # ram.dirty-sync-count


@dataclass
class Report:
    """The end-of-migration summary (``hvtools migrate`` prints it; ``--json`` emits it)."""

    vm: str
    source: str
    destination: str
    uri: str
    status: str
    total_time_ms: int
    qemu_downtime_ms: int | None
    measured_downtime_ms: float | None
    setup_time_ms: int | None
    transferred_bytes: int
    ram_total_bytes: int
    pages_sent: int
    pages_resent: int
    iterations: int
    dirty_rate_before: int | None = None  # bytes/s from calc-dirty-rate
    postcopy: bool = False
    statuses: list[str] = field(default_factory=list)
    #: the devices' own dirty logs, transferred at each iteration (hvtools.migration.device_log)
    device_log: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_rate(text: str | None) -> int | None:
    """``--bandwidth``: bytes/s with binary K/M/G suffixes, e.g. ``500M`` (QEMU max-bandwidth)."""
    if text is None:
        return None
    t = text.strip().upper().removesuffix("/S").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if t[-1:] in "KMG" else t) * mult)
    except ValueError:
        raise UsageError(f"--bandwidth {text!r} is not a rate (e.g. 500M for 500 MiB/s)") \
            from None
    if value <= 0:
        raise UsageError(f"--bandwidth {text!r} must be positive")
    return value


def _progress(info: dict[str, Any]) -> Progress:
    ram = info.get("ram", {})
    page = int(ram.get("page-size", 4096)) or 4096
    return Progress(status=str(info.get("status", "none")),
                    transferred=int(ram.get("transferred", 0)),
                    remaining=int(ram.get("remaining", 0)), total=int(ram.get("total", 0)),
                    dirty_rate=int(ram.get("dirty-pages-rate", 0)) * page,
                    expected_downtime_ms=info.get("expected-downtime"),
                    mbps=float(ram.get("mbps", 0.0)),
                    iteration=int(ram.get("dirty-sync-count", 0)))


def pages_resent(ram: dict[str, Any]) -> tuple[int, int]:
    """(pages sent, pages sent more than once) from ``MigrationStats``.

    Every guest page goes once in the first pass (as a zero page or a normal page); whatever is
    sent beyond ``total / page-size`` was re-sent because the guest dirtied it again.
    """
    page = int(ram.get("page-size", 4096)) or 4096
    zero = int(ram.get("zero-pages", ram.get("duplicate", 0)))
    sent = int(ram.get("normal", 0)) + zero
    return sent, max(0, sent - int(ram.get("total", 0)) // page)


class _Session:
    """A QMP session held open for the migration, recording event timestamps."""

    def __init__(self, label: str, socket: Path) -> None:
        self.label = label
        self.socket = socket
        self.client = QMPClient(f"hvtools-migrate:{label}")
        self.events: list[tuple[str, float, dict[str, Any]]] = []
        self._task: asyncio.Task[None] | None = None

    async def open(self, timeout: float = 10.0) -> None:
        try:
            await asyncio.wait_for(self.client.connect(str(self.socket)), timeout)
        except (QMPError, OSError, TimeoutError) as err:
            raise MigrationError(f"cannot reach the {self.label} QEMU's QMP at {self.socket}: "
                                 f"{err}") from err

        async def listen() -> None:
            with self.client.listener() as listener:
                async for event in listener:
                    ts = cast(dict[str, Any], event.get("timestamp", {}))
                    when = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
                    data = cast(dict[str, Any], event.get("data", {}))
                    self.events.append((str(event["event"]), when, data))

        self._task = asyncio.create_task(listen())

    async def run(self, command: str, args: dict[str, Any] | None = None,
                  timeout: float = 30.0) -> Any:
        try:
            return await asyncio.wait_for(self.client.execute(command, args), timeout)
        except ExecuteError as err:
            info = err.error.error
            raise QmpError(command, dict(err.received),
                           f"{self.label} QMP {command} failed: {info.desc}") from err
        except TimeoutError as err:
            raise MigrationError(f"{self.label} QMP {command} did not answer within "
                                 f"{timeout:.0f}s") from err
        except (QMPError, EOFError, OSError) as err:
            raise MigrationError(f"{self.label} QMP {command} failed: {err}") from err

    def first_event(self, name: str, after: float = 0.0) -> float | None:
        return next((t for n, t, _ in self.events if n == name and t >= after), None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        with contextlib.suppress(Exception):
            await self.client.disconnect()


async def measure_dirty_rate(socket: Path, calc_time_s: int = 1) -> int:
    """``calc-dirty-rate`` (page-sampling) on a running VM; bytes/s."""
    s = _Session("source", socket)
    await s.open()
    try:
        return await _dirty_rate(s, calc_time_s)
    finally:
        await s.close()


async def _dirty_rate(s: _Session, calc_time_s: int) -> int:
    await s.run("calc-dirty-rate", {"calc-time": calc_time_s})
    deadline = time.monotonic() + calc_time_s + 10
    while time.monotonic() < deadline:
        info = await s.run("query-dirty-rate")
        if info.get("status") == "measured":
            return int(info.get("dirty-rate", 0)) * 1024 * 1024
        await asyncio.sleep(0.1)
    raise MigrationError("calc-dirty-rate did not finish")


async def _caps(s: _Session, caps: dict[str, bool]) -> None:
    if caps:
        await s.run("migrate-set-capabilities", {"capabilities": [
            {"capability": k, "state": v} for k, v in caps.items()]})


async def _migrate(vm: str, source: str, destination: str, src_sock: Path, dst_sock: Path,
                   listen_uri: str, opts: Options, on_progress: Callable[[Progress], None],
                   dirty_rate: int | None, on_iteration: Callable[[], Any] | None) -> Report:
    src, dst = _Session("source", src_sock), _Session("destination", dst_sock)
    await src.open()
    # Set once the guest's newest state may live on the destination alone (post-copy started,
    # or QEMU reported completed): from then on the source must never run again.
    point_of_no_return = False
    try:
        await dst.open()
        status = (await src.run("query-status"))["status"]
        if status != "running":
            raise MigrationError(f"VM {vm!r} is {status} on {source}, not running")
        # QEMU migrates forward only: a destination older than the source may not load it.
        sv, dv = (await src.run("query-version"))["qemu"], (await dst.run("query-version"))["qemu"]
        src_ver = (sv["major"], sv["minor"], sv["micro"])
        dst_ver = (dv["major"], dv["minor"], dv["micro"])
        if dst_ver < src_ver:
            raise MigrationError(f"the QEMU on {destination} ({'.'.join(map(str, dst_ver))}) is "
                                 f"older than the source's ({'.'.join(map(str, src_ver))})")
        avail = {c["capability"] for c in await dst.run("query-migrate-capabilities")}
        # Explicit on both sides: a QEMU restored by recovery still has x-ignore-shared on,
        # and a live migration must carry RAM.
        caps = {"events": True, "x-ignore-shared": False, "postcopy-ram": False}
        if opts.postcopy:
            if "postcopy-ram" not in avail:
                raise MigrationError(f"the QEMU on {destination} has no postcopy-ram")
            caps["postcopy-ram"] = True
        await _caps(dst, caps)
        await _caps(src, caps)
        params: dict[str, Any] = {}
        if opts.max_downtime_ms is not None:
            params["downtime-limit"] = opts.max_downtime_ms
        if opts.bandwidth is not None:
            params["max-bandwidth"] = opts.bandwidth
        if params:
            await src.run("migrate-set-parameters", params)
        await dst.run("migrate-incoming", {"uri": listen_uri})
        t0 = time.time()
        await src.run("migrate", {"uri": listen_uri})
        statuses: list[str] = []
        last_moved, last_bytes = time.monotonic(), -1
        iterations_seen = 0
        switched = False
        start = time.monotonic()
        info: dict[str, Any] = {}
        while True:
            info = await src.run("query-migrate")
            p = _progress(info)
            if not statuses or statuses[-1] != p.status:
                statuses.append(p.status)
            if on_iteration is not None and p.iteration > iterations_seen:
                iterations_seen = p.iteration  # QEMU synced its bitmap: transfer the devices'
                await asyncio.to_thread(on_iteration)
            on_progress(p)
            st = MigrationStatus(p.status)
            if st in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_PAUSED,
                      MigrationStatus.POSTCOPY_RECOVER, MigrationStatus.COMPLETED):
                point_of_no_return = True
            if st.finished:
                break
            now = time.monotonic()
            if p.transferred != last_bytes:
                last_moved, last_bytes = now, p.transferred
            elif now - last_moved > opts.stall_timeout:
                raise MigrationError(f"migration stalled: no byte moved for "
                                     f"{opts.stall_timeout:.0f}s (link to {destination} down?)")
            if now - start > opts.timeout:
                raise MigrationError(f"migration did not finish within {opts.timeout:.0f}s")
            if (opts.postcopy and not switched and st is MigrationStatus.ACTIVE
                    and now - start >= opts.postcopy_after_s):
                await src.run("migrate-start-postcopy")
                point_of_no_return = True  # the source stops for good at the switch
                switched = True
            await asyncio.sleep(0.05)
        if MigrationStatus(p.status) is not MigrationStatus.COMPLETED:
            detail = info.get("error-desc", p.status)
            raise MigrationError(f"QEMU migration {p.status}: {detail}")
        # The destination resumes on its own (the source was running), unless it is held
        # (-S) for a check before it runs; wait for it either way.
        want = ("paused", "prelaunch", "postmigrate") if opts.hold_destination else ("running",)
        deadline = time.monotonic() + 30
        while (await dst.run("query-status"))["status"] not in want:
            if time.monotonic() > deadline:
                raise MigrationError(f"the destination on {destination} did not "
                                     + ("finish loading" if opts.hold_destination
                                        else "resume"))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # let the RESUME event arrive
        stop = src.first_event("STOP", t0)
        resume = dst.first_event("RESUME", t0)
        measured = (resume - stop) * 1000 if stop is not None and resume is not None else None
        ram = info.get("ram", {})
        sent, resent = pages_resent(ram)
        if on_iteration is not None:
            await asyncio.to_thread(on_iteration)  # what the last iteration left
        return Report(
            vm=vm, source=source, destination=destination, uri=listen_uri, status=p.status,
            total_time_ms=int(info.get("total-time", 0)),
            qemu_downtime_ms=info.get("downtime"),
            measured_downtime_ms=round(measured, 1) if measured is not None else None,
            setup_time_ms=info.get("setup-time"),
            transferred_bytes=int(ram.get("transferred", 0)),
            ram_total_bytes=int(ram.get("total", 0)), pages_sent=sent, pages_resent=resent,
            iterations=int(ram.get("dirty-sync-count", 0)), dirty_rate_before=dirty_rate,
            postcopy=opts.postcopy, statuses=statuses)
    except BaseException as err:
        if point_of_no_return:
            # Resuming the source now would run a stale copy of the guest; killing the
            # destination would lose the newest. Leave both paused for QEMU's post-copy
            # recovery (migrate-recover / migrate resume=true), and say so.
            raise SplitMigration(
                f"migration of {vm} failed after the switch-over began ({err}); the guest is "
                f"split between {source} and {destination}, both are left paused: recover with "
                "QEMU's migrate-recover on the destination and migrate resume=true on the "
                "source") from err
        await _restore_source(src)
        raise
    finally:
        await dst.close()
        await src.close()


async def _restore_source(src: _Session) -> None:
    """After a failure: cancel the source's migration and make sure the VM runs again."""
    with contextlib.suppress(Exception):
        await src.run("migrate-cancel", timeout=10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            info = await src.run("query-migrate", timeout=5)
            if MigrationStatus(info.get("status", "none")) in (
                    MigrationStatus.ACTIVE, MigrationStatus.CANCELLING, MigrationStatus.SETUP,
                    MigrationStatus.DEVICE):
                await asyncio.sleep(0.05)
                continue
            status = (await src.run("query-status", timeout=5))["status"]
            if status in ("paused", "postmigrate", "finish-migrate"):
                await src.run("cont", timeout=10)
            return
        except Exception:
            await asyncio.sleep(0.1)


def migrate(vm: str, source: str, destination: str, src_sock: Path, dst_sock: Path,
            listen_uri: str, opts: Options,
            on_progress: Callable[[Progress], None] = lambda _p: None,
            dirty_rate: int | None = None,
            on_iteration: Callable[[], Any] | None = None) -> Report:
    """Run one migration to completion; raise MigrationError with the source running on failure.

    ``on_iteration`` runs (in a thread) each time QEMU syncs its dirty bitmap, and once after
    completion: the place to transfer devices' own logs.
    """
    return asyncio.run(_migrate(vm, source, destination, src_sock, dst_sock, listen_uri, opts,
                                on_progress, dirty_rate, on_iteration))


def dirty_rate(socket: Path, calc_time_s: int = 1) -> int:
    return asyncio.run(measure_dirty_rate(socket, calc_time_s))
