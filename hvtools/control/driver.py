"""The driver interface: one VM lifecycle, two backends (the embedded qemu driver and libvirt).

A driver owns where VMs are defined and how their hypervisor runs. What every driver shares, the
guest agent, boot timing, the clean-stop ladder, lives here once; a backend supplies the
primitives (``_launch``, ``_process_alive``, ``_qmp``, ...).
"""

from __future__ import annotations

import abc
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from hvtools.control.accel import resolve_accel
from hvtools.errors import (
    AgentError,
    HvError,
    HvTimeout,
    StateError,
    UsageError,
    VmCrashed,
    VmLaunchFailure,
)
from hvtools.guest.agent import AgentClient, ExecResult, wait_for_agent
from hvtools.spec import VmSpec

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


class VmState(StrEnum):
    """Lifecycle states. ``running``/``paused``/``shutdown`` are QEMU's own RunState strings."""

    DEFINED = "defined"  # created, never started or cleanly stopped
    RUNNING = "running"
    PAUSED = "paused"
    CRASHED = "crashed"  # the hypervisor process died without a clean stop

    @property
    def active(self) -> bool:
        return self in (VmState.RUNNING, VmState.PAUSED)


@dataclass(frozen=True)
class VmInfo:
    """What ``vm list``/``vm show`` report about one VM."""

    name: str
    driver: str
    state: VmState
    spec: VmSpec
    pid: int | None = None
    accel: str | None = None
    state_dir: Path | None = None
    console_log: Path | None = None
    agent_socket: Path | None = None
    detail: str = ""  # e.g. why it is crashed
    log_tail: tuple[str, ...] = ()
    host: str | None = None  # the lab host it runs on (``vm start --host``), else None
    lab: str | None = None  # that host's lab

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "driver": self.driver, "state": str(self.state),
            "pid": self.pid, "accel": self.accel,
            "memory": self.spec.memory, "vcpus": self.spec.vcpus,
            "iommu": self.spec.iommu.shorthand if self.spec.iommu else "none",
            "state_dir": str(self.state_dir) if self.state_dir else None,
            "console_log": str(self.console_log) if self.console_log else None,
            "detail": self.detail, "log_tail": list(self.log_tail),
            "host": self.host, "lab": self.lab,
            "spec": self.spec.to_mapping(),
        }


@dataclass
class StartTimings:
    """Wall-clock phases of one start, in seconds from the launch of the hypervisor."""

    launched_s: float = 0.0  # hypervisor process running (QMP answers)
    agent_ready_s: float = 0.0  # guest agent answered its first ping (boot-to-agent-ready)
    # Before the clock starts: e.g. accel_probe_s, the one-time KVM probe.
    phases: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, float]:
        return {"launched_s": round(self.launched_s, 3),
                "agent_ready_s": round(self.agent_ready_s, 3),
                **{k: round(v, 3) for k, v in self.phases.items()}}


#: sizeof(sockaddr_un.sun_path) - 1 on Linux (unix(7)).
SUN_PATH_MAX = 107


def check_socket_path(path: Path) -> None:
    """Refuse a unix socket path the kernel cannot bind, before anything is created."""
    if len(str(path)) > SUN_PATH_MAX:
        raise UsageError(f"socket path {path} is longer than {SUN_PATH_MAX} bytes: "
                         "use a shorter HVTOOLS_HOME or VM name")


def tail_lines(path: Path | None, lines: int = 10) -> list[str]:
    """The last non-blank lines of a log file (its last 16 KiB), or [] if it cannot be read."""
    if path is None:
        return []
    try:
        text = path.read_bytes()[-16384:].decode("utf-8", "replace")
    except OSError:
        return []
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()][-lines:]


@contextmanager
def locked(lockfile: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lockfile`` (created if missing) for the block.

    Commands that change one VM take it, so two concurrent starts cannot both launch.
    """
    lockfile.parent.mkdir(parents=True, exist_ok=True)
    with open(lockfile, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def preflight(spec: VmSpec) -> tuple[Path, Path]:
    """Check what the host must provide before anything starts; return (kernel, initrd).

    The kernel and initrd are the spec's own, else the current guest image's. A missing file
    is bad input (UsageError), found before QEMU runs.
    """
    from hvtools.guest.image import find_image

    if spec.kernel and spec.initrd:
        kernel, initrd = Path(spec.kernel), Path(spec.initrd)
    else:
        image = find_image()
        kernel = Path(spec.kernel) if spec.kernel else image.kernel
        initrd = Path(spec.initrd) if spec.initrd else image.initrd
    files = [("kernel", kernel), ("initrd", initrd)]
    files += [(f"device {d.id}", Path(d.path)) for d in spec.devices if d.path]
    for what, p in files:
        if not p.is_file():
            raise UsageError(f"{what}: {p} does not exist or is not a file")
        if not os.access(p, os.R_OK):
            raise UsageError(f"{what}: {p} is not readable")
    return kernel, initrd


@dataclass(frozen=True)
class LaunchOptions:
    """Per-launch choices beyond the spec (they are not part of the VM's definition).

    ``host``: ``HOST`` or ``LAB/HOST``, a lab host that is up (hvtools.lab): the hypervisor
    runs in its network namespace and the RAM file lives in its memory dir.
    ``extra_args``: appended to the QEMU command line for this launch only, e.g.
    ``("-incoming", "defer")`` for a migration destination.
    ``keep_ram``: launch on the RAM file already at the VM's RAM path instead of discarding it
    (a destination whose memory was filled beforehand).
    """

    host: str | None = None
    extra_args: tuple[str, ...] = ()
    keep_ram: bool = False


#: How long a guest may take from launch to a live agent. TCG boots in ~3-5 s here.
DEFAULT_BOOT_TIMEOUT = 120.0


class Driver(abc.ABC):
    """Backend-independent VM lifecycle. Subclasses implement the abstract primitives."""

    name: str = "abstract"

    # -- primitives -------------------------------------------------------------------------
    @abc.abstractmethod
    def create(self, spec: VmSpec) -> VmInfo:
        """Define a VM. Raises NameInUseError if the name exists. Starts nothing."""

    @abc.abstractmethod
    def undefine(self, name: str) -> None:
        """Forget a VM that is not running."""

    @abc.abstractmethod
    def info(self, name: str) -> VmInfo:
        """Current state of one VM. Raises UnknownVmError."""

    @abc.abstractmethod
    def list(self) -> list[VmInfo]:
        """All VMs of this driver."""

    @abc.abstractmethod
    def _launch(self, name: str, progress: Progress) -> VmInfo:
        """Start the hypervisor for a defined VM; return once it runs (not yet booted).

        On failure it must leave nothing behind (no process, socket or domain) and raise
        VmLaunchFailure carrying the command and the log tail.
        """

    def _launch_with(self, name: str, progress: Progress, options: LaunchOptions) -> VmInfo:
        """``_launch`` with per-launch options; a driver that supports them overrides this."""
        if options != LaunchOptions():
            raise UsageError(f"the {self.name} driver cannot start a VM on a lab host or with "
                             "extra QEMU arguments (use --driver qemu)")
        return self._launch(name, progress)

    @abc.abstractmethod
    def _process_alive(self, name: str) -> bool:
        """Whether the VM's hypervisor process still runs."""

    @abc.abstractmethod
    def _force_off(self, name: str) -> None:
        """Kill the hypervisor at once and clean its runtime state (sockets, pid, domain)."""

    @abc.abstractmethod
    def _wait_exit(self, name: str, timeout: float) -> bool:
        """Wait for the hypervisor to exit by itself; True if it did, cleaning up after it."""

    @abc.abstractmethod
    def qmp(self, name: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Send one QMP command; return its ``return`` value or raise QmpError."""

    @abc.abstractmethod
    def hmp(self, name: str, command_line: str) -> str:
        """Run one human-monitor command (through QMP) and return its text."""

    # -- shared behaviour -------------------------------------------------------------------
    def _require_active(self, name: str) -> VmInfo:
        vm = self.info(name)
        if vm.state is VmState.CRASHED:
            raise VmCrashed(name, vm.log_tail)
        if not vm.state.active:
            raise StateError(f"VM {name!r} is {vm.state}; it must be running "
                             f"(hvtools vm start {name})")
        return vm

    def start(self, name: str, *, progress: Progress = _quiet,
              boot_timeout: float = DEFAULT_BOOT_TIMEOUT, host: str | None = None,
              extra_args: Sequence[str] = (), wait_agent: bool = True,
              keep_ram: bool = False) -> tuple[VmInfo, StartTimings]:
        """Start a defined VM and wait until its guest agent answers.

        ``host``, ``extra_args`` and ``keep_ram``: see :class:`LaunchOptions`. With
        ``wait_agent=False`` it returns once QMP answers (a ``-incoming defer`` destination
        never boots by itself). A start that fails at any point kills what it started and
        raises; the VM stays defined.
        """
        options = LaunchOptions(host=host, extra_args=tuple(extra_args), keep_ram=keep_ram)
        vm = self.info(name)
        if vm.state.active:
            raise StateError(f"VM {name!r} is already {vm.state}")
        if vm.state is VmState.CRASHED:
            why = f" ({vm.detail})" if vm.detail else ""
            raise StateError(f"VM {name!r} has stale state from a hypervisor that died{why}; "
                             f"run `hvtools vm kill {name}` to clean it up first")
        timings = StartTimings()
        t_probe = time.monotonic()
        resolve_accel(vm.spec.accel, progress=progress)  # probes once; cached for _launch
        timings.phases["accel_probe_s"] = time.monotonic() - t_probe
        t0 = time.monotonic()
        vm = self._launch_with(name, progress, options)
        timings.launched_s = time.monotonic() - t0
        if not wait_agent:
            progress(f"{name}: QEMU running after {timings.launched_s:.2f}s")
            return vm, timings
        progress(f"{name}: QEMU running after {timings.launched_s:.2f}s, waiting for the guest")
        assert vm.agent_socket is not None
        try:
            client = wait_for_agent(vm.agent_socket, timeout=boot_timeout,
                                    alive=lambda: self._process_alive(name))
            client.close()
        except (HvError, OSError) as err:
            tail = tail_lines(vm.console_log, 12)
            self._force_off(name)
            what = "died while booting" if isinstance(err, AgentError) else "did not boot"
            raise VmLaunchFailure(f"VM {name!r} {what}: {err}", log_tail=tail) from err
        except BaseException:
            self._force_off(name)
            raise
        timings.agent_ready_s = time.monotonic() - t0
        progress(f"{name}: guest agent ready after {timings.agent_ready_s:.2f}s")
        return self.info(name), timings

    @staticmethod
    def _claim_ivshmem(spec: VmSpec, state_dir: Path) -> None:
        """Before launch: note which ivshmem files this VM's QEMU will create, so that only
        those are deleted with the VM (a file that already existed may be shared)."""
        record = state_dir / "ivshmem-created"
        owned = set(record.read_text().split()) if record.exists() else set()
        owned |= {str(r.path) for r in spec.ivshmem if not r.path.exists()}
        state_dir.mkdir(parents=True, exist_ok=True)
        record.write_text("".join(f"{p}\n" for p in sorted(owned)))

    @staticmethod
    def _remove_ivshmem(state_dir: Path) -> None:
        """When a VM is undefined: delete the ivshmem files its QEMU created."""
        record = state_dir / "ivshmem-created"
        if record.exists():
            for p in record.read_text().split():
                Path(p).unlink(missing_ok=True)
            record.unlink()

    @contextmanager
    def agent(self, name: str, timeout: float = 10.0) -> Iterator[AgentClient]:
        """A connected client to the VM's guest agent."""
        vm = self._require_active(name)
        assert vm.agent_socket is not None
        client = AgentClient(vm.agent_socket)
        try:
            client.connect(timeout=timeout)
            yield client
        finally:
            client.close()

    def exec(self, name: str, argv: Sequence[str], *, timeout: float = 60.0,
             stdin: bytes = b"") -> ExecResult:
        """Run a command in the guest through the agent."""
        with self.agent(name) as client:
            return client.exec(argv, timeout=timeout, stdin=stdin)

    def stop(self, name: str, *, timeout: float = 30.0, progress: Progress = _quiet) -> str:
        """Stop cleanly: guest poweroff through the agent, then ACPI powerdown, then kill.

        Returns which step stopped it (``agent``, ``powerdown`` or ``killed``).
        """
        vm = self.info(name)
        if vm.state is VmState.CRASHED:
            self._force_off(name)
            return "cleaned"
        if not vm.state.active:
            raise StateError(f"VM {name!r} is not running (state: {vm.state})")
        try:
            with self.agent(name, timeout=min(5.0, timeout)) as client:
                # Detach the poweroff so the agent can answer before the guest goes down.
                client.exec(["sh", "-c", "sync; (sleep 0.2; poweroff -f) "
                             "</dev/null >/dev/null 2>&1 & exit 0"], timeout=10.0)
            progress(f"{name}: guest powering off")
            if self._wait_exit(name, timeout):
                return "agent"
        except (AgentError, HvTimeout, OSError) as err:
            progress(f"{name}: agent unavailable ({err}); trying ACPI powerdown")
        try:
            self.qmp(name, "system_powerdown")
            if self._wait_exit(name, min(timeout, 10.0)):
                return "powerdown"
        except HvError as err:
            progress(f"{name}: powerdown failed ({err})")
        progress(f"{name}: killing QEMU")
        self._force_off(name)
        return "killed"

    def kill(self, name: str) -> None:
        """Stop at once (like ``virsh destroy``); also cleans a crashed VM's stale state."""
        vm = self.info(name)
        if not vm.state.active and vm.state is not VmState.CRASHED:
            raise StateError(f"VM {name!r} is not running (state: {vm.state})")
        self._force_off(name)

    def qmp_text(self, name: str, command: str, arguments: dict[str, Any] | None = None) -> str:
        """QMP reply as indented JSON, for the CLI's ``vm qmp``."""
        return json.dumps(self.qmp(name, command, arguments), indent=2, sort_keys=True)
