"""The embedded qemu driver: hvtools supervises QEMU processes itself, no daemon.

Each VM has a state dir ``$HVTOOLS_HOME/vms/<name>/``::

    spec.json     the VmSpec (to_mapping form)
    argv.json     the QEMU command line of the current/last run
    launch.json   resolved accelerator, QEMU, kernel/initrd, start time; the lab host, its
                  netns and the RAM file path when started with ``--host``; extra QEMU args
    supervisor.pid, qemu.pid
    qmp.sock, agent.sock
    console.log   the guest's serial console
    qemu.log      QEMU's own stdout/stderr
    exit.json     written by the supervisor when QEMU exits (return code)
    lock          flock'd while a command changes the VM

State is derived from these files and the live process, never stored as a word that can go stale.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hvtools import paths
from hvtools.control import vhost_backends
from hvtools.control.accel import resolve_accel
from hvtools.control.driver import (
    Driver,
    LaunchOptions,
    Progress,
    VmInfo,
    VmState,
    check_socket_path,
    locked,
    preflight,
    tail_lines,
)
from hvtools.errors import (
    HvError,
    NameInUseError,
    StateError,
    UnknownVmError,
    UsageError,
    VmError,
    VmLaunchFailure,
)
from hvtools.qemu.binary import find_qemu
from hvtools.qemu.cmdline import render_argv
from hvtools.qemu.qmp import hmp_call, qmp_call
from hvtools.spec import LaunchPlan, VmSpec, spec_from_mapping

_RUNTIME_FILES = ("qemu.pid", "supervisor.pid", "exit.json", "qmp.sock", "agent.sock")
_QMP_READY_TIMEOUT = 30.0


def default_ram_path(name: str) -> Path:
    """The RAM file of a VM started without ``--host`` (tmpfs, so a page touched by the guest
    never hits disk)."""
    return Path("/dev/shm/hvtools") / f"{paths.home().as_posix().strip('/').replace('/', '-')}" \
        / f"{name}.ram"


def host_ram_path(memory_dir: Path, name: str) -> Path:
    """The RAM file of VM ``name`` on a lab host whose memory dir is ``memory_dir``."""
    return memory_dir / f"{name}.ram"


def _launch_record(d: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((d / "launch.json").read_text())
        if isinstance(data, dict):
            return data
    return {}


def _recorded_ram_path(d: Path, name: str) -> Path:
    recorded = _launch_record(d).get("ram_path")
    return Path(recorded) if recorded else default_ram_path(name)


def ram_path(name: str) -> Path:
    """The RAM file of the VM's current (or last) run: in its host's memory dir when it was
    started with ``--host``, else :func:`default_ram_path`."""
    return _recorded_ram_path(paths.vms_dir() / name, name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cwd_is(pid: int, d: Path) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(d)
    except OSError:
        return False


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"QEMU killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"QEMU killed by signal {-code}"
    return f"QEMU exited with status {code}"


class QemuDriver(Driver):
    """VMs as QEMU processes under a detached per-VM supervisor."""

    name = "qemu"

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or paths.vms_dir()
        #: VMs whose state dir could not be read by the last list(), with the reason.
        self.damaged: dict[str, str] = {}

    # -- state dir helpers ------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        return self.root / name

    def _require_dir(self, name: str) -> Path:
        d = self._dir(name)
        if not (d / "spec.json").exists():
            raise UnknownVmError(f"no VM named {name!r} (hvtools vm list)")
        return d

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[Path]:
        d = self._require_dir(name)
        with locked(d / "lock"):
            yield d

    def _spec(self, d: Path) -> VmSpec:
        try:
            return spec_from_mapping(json.loads((d / "spec.json").read_text()))
        except (OSError, ValueError, HvError) as err:
            raise VmError(f"state dir {d} is damaged: spec.json: {err}") from err

    def _qemu_pid(self, d: Path) -> int | None:
        """QEMU's pid if that process is alive and really is this VM's QEMU."""
        pid = _read_int(d / "qemu.pid")
        if pid is None or not _pid_alive(pid):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        # Its QMP socket path names the state dir, or its working directory is the state dir
        # (the supervisor starts it there): a state dir renamed since (migration's switch-over,
        # hvtools.migration.incoming) still finds its QEMU.
        return pid if str(d / "qmp.sock").encode() in cmdline or _cwd_is(pid, d) else None

    def _supervisor_pid(self, d: Path) -> int | None:
        """The supervisor's pid if that process is alive and supervises this state dir."""
        pid = _read_int(d / "supervisor.pid")
        if pid is None or not _pid_alive(pid):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        return pid if b"hvtools.qemu.supervisor" in cmdline and (
            str(d).encode() in cmdline or _cwd_is(pid, d)) else None

    def _plan_paths(self, d: Path, name: str, ram: Path | None = None) -> dict[str, Path]:
        plan = {"agent_socket": d / "agent.sock", "qmp_socket": d / "qmp.sock",
                "console_log": d / "console.log", "ram_path": ram or default_ram_path(name)}
        for key in ("agent_socket", "qmp_socket"):
            check_socket_path(plan[key])
        return plan

    # -- Driver primitives ------------------------------------------------------------------
    def create(self, spec: VmSpec) -> VmInfo:
        d = self._dir(spec.name)
        self._plan_paths(d, spec.name)  # reject over-long socket paths before creating anything
        if (d / "spec.json").exists():
            raise NameInUseError(f"a VM named {spec.name!r} already exists")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{spec.name}.creating.{os.getpid()}"
        tmp.mkdir()
        (tmp / "spec.json").write_text(json.dumps(spec.to_mapping(), indent=2) + "\n")
        try:
            tmp.rename(d)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise NameInUseError(f"a VM named {spec.name!r} already exists") from err
        return self.info(spec.name)

    def undefine(self, name: str) -> None:
        with self._locked(name) as d:
            vm = self.info(name)
            if vm.state.active:
                raise UsageError(f"VM {name!r} is {vm.state}: stop it first")
            self._clean_runtime(d, name)
            self._remove_ivshmem(d)
        shutil.rmtree(d)

    def info(self, name: str) -> VmInfo:
        d = self._require_dir(name)
        spec = self._spec(d)
        launch = _launch_record(d)
        common: dict[str, Any] = {
            "name": name, "driver": self.name, "spec": spec, "state_dir": d,
            "console_log": d / "console.log", "agent_socket": d / "agent.sock",
            "accel": launch.get("accel"),
        }
        # Where it runs (or ran, for a crashed VM); a VM that is merely defined runs nowhere.
        placed: dict[str, Any] = {"host": launch.get("host"), "lab": launch.get("lab")}
        pid = self._qemu_pid(d)
        if pid is not None:
            state = VmState.RUNNING
            with contextlib.suppress(HvError, OSError):
                status = qmp_call(d / "qmp.sock", "query-status", timeout=2.0)
                if status.get("status") in ("paused", "prelaunch", "inmigrate",
                                            "postmigrate", "suspended"):
                    state = VmState.PAUSED
            return VmInfo(state=state, pid=pid, **placed, **common)
        if not (d / "qemu.pid").exists():
            return VmInfo(state=VmState.DEFINED, **common)
        if self._supervisor_pid(d) is not None:
            # QEMU is gone (or a zombie) and its supervisor is recording the exit: stopping.
            return VmInfo(state=VmState.RUNNING, detail="stopping", **placed, **common)
        code: int | None = None
        with contextlib.suppress(OSError, ValueError, KeyError):
            code = int(json.loads((d / "exit.json").read_text())["returncode"])
        console = tail_lines(d / "console.log", 40)
        panicked = any("Kernel panic" in ln for ln in console)
        if code == 0 and not panicked:
            # The guest powered off (or QMP quit): a clean stop. Tidy its runtime files now.
            self._clean_runtime(d, name)
            return VmInfo(state=VmState.DEFINED, detail="guest powered off", **common)
        detail = ("guest kernel panicked" if panicked else
                  _describe_exit(code) if code is not None else
                  "QEMU and its supervisor are gone (killed?)")
        log_tail = tuple(tail_lines(d / "qemu.log") + (console[-5:] if panicked else []))
        return VmInfo(state=VmState.CRASHED, detail=detail,
                      log_tail=log_tail or (detail,), **placed, **common)

    def list(self) -> list[VmInfo]:
        if not self.root.exists():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if not (d / "spec.json").exists():
                continue
            try:
                out.append(self.info(d.name))
            except VmError as err:
                self.damaged[d.name] = str(err)
        return out

    def _launch(self, name: str, progress: Progress) -> VmInfo:
        return self._launch_with(name, progress, LaunchOptions())

    def _launch_with(self, name: str, progress: Progress, options: LaunchOptions) -> VmInfo:
        with self._locked(name) as d:
            # Re-check under the lock: another start may have won the race since start() looked.
            if self._qemu_pid(d) is not None or self._supervisor_pid(d) is not None:
                raise StateError(f"VM {name!r} is already running")
            spec = self._spec(d)
            host = None
            if options.host is not None:
                from hvtools.lab.hosts import resolve_host

                host = resolve_host(options.host)  # unknown host / lab down: nothing changed
                if host.failed:
                    raise StateError(f"host {host.name} has failed; it runs no VM until "
                                     f"`hvtools host revive {host.name}`")
            # A spec with a device of the patch series (hvt-pci) runs on the newest patched
            # build that has it (hvtools qemu build), any other on the stock QEMU.
            qemu = find_qemu(devices=spec.patched_devices)
            accel = resolve_accel(spec.accel, qemu=qemu, progress=progress)
            kernel, initrd = preflight(spec)
            ram = host_ram_path(host.memory_dir, name) if host else default_ram_path(name)
            paths = self._plan_paths(d, name, ram)
            plan = LaunchPlan(accel=accel, kernel=kernel, initrd=initrd,
                              agent_socket=paths["agent_socket"],
                              qmp_socket=paths["qmp_socket"],
                              console_log=paths["console_log"], ram_path=paths["ram_path"],
                              vhost_sockets=vhost_backends.sockets(d, spec, relative=True))
            for sock in vhost_backends.sockets(d, spec).values():
                check_socket_path(sock)
            self._clean_runtime(d, name, keep_ram=options.keep_ram)
            for region in spec.ivshmem:
                if region.path.exists() and not os.access(region.path, os.W_OK):
                    raise UsageError(f"ivshmem {region.path} exists and is not writable")
            plan.ram_path.parent.mkdir(parents=True, exist_ok=True)
            self._claim_ivshmem(spec, d)
            argv = render_argv(spec, plan, qemu=str(qemu.path)) + list(options.extra_args)
            (d / "argv.json").write_text(json.dumps(argv, indent=1) + "\n")
            (d / "launch.json").write_text(json.dumps({
                "accel": str(accel), "qemu": str(qemu.path), "qemu_version": qemu.version_str,
                "kernel": str(kernel), "initrd": str(initrd), "ram_path": str(plan.ram_path),
                "host": host.name if host else None, "lab": host.lab if host else None,
                "netns": host.netns if host else None,
                "extra_args": list(options.extra_args),
                "started_at": time.time()}) + "\n")
            for logname in ("console.log", "qemu.log"):
                (d / logname).write_bytes(b"")
            where = f" on {host.name}" if host else ""
            progress(f"{name}: launching QEMU {qemu.version_str} ({accel}){where}")
            sup_argv = [sys.executable, "-m", "hvtools.qemu.supervisor", str(d)]
            try:
                if plan.vhost_sockets:
                    progress(f"{name}: starting {len(plan.vhost_sockets)} vhost-user "
                             "backend(s)")
                    vhost_backends.start(d, spec)
                with open(d / "qemu.log", "ab") as log:
                    if host is not None:
                        # Supervisor and QEMU both live in the host's network namespace.
                        sup = host.popen(sup_argv, detach=True, stdout=log, stderr=log)
                    else:
                        sup = subprocess.Popen(
                            sup_argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True, close_fds=True)
            except BaseException:
                vhost_backends.stop(d)
                raise
            (d / "supervisor.pid").write_text(f"{sup.pid}\n")
            try:
                self._wait_qmp(d, sup)
            except VmLaunchFailure as err:
                err.command = argv
                self._kill_processes(d)
                self._clean_runtime(d, name, keep_ram=options.keep_ram)
                raise
            except BaseException:
                self._kill_processes(d)
                self._clean_runtime(d, name, keep_ram=options.keep_ram)
                raise
        return self.info(name)

    def _wait_qmp(self, d: Path, sup: subprocess.Popen[bytes]) -> None:
        """Wait until QEMU's QMP socket answers; fail fast if QEMU exits first."""
        deadline = time.monotonic() + _QMP_READY_TIMEOUT
        while time.monotonic() < deadline:
            if (d / "exit.json").exists() or sup.poll() is not None:
                sup.wait(timeout=5)
                exit_info = {}
                if (d / "exit.json").exists():
                    exit_info = json.loads((d / "exit.json").read_text())
                tail = tail_lines(d / "qemu.log")
                code = exit_info.get("returncode")
                first = tail[-1] if tail else (_describe_exit(code) if code is not None
                                               else "no output")
                raise VmLaunchFailure(f"QEMU failed to start: {first}", exit_code=code,
                                      log_tail=tail)
            if (d / "qmp.sock").exists() and self._qemu_pid(d) is not None:
                try:
                    qmp_call(d / "qmp.sock", "query-status", timeout=5.0)
                    return
                except HvError:
                    pass
            time.sleep(0.02)
        raise VmLaunchFailure(f"QEMU's QMP socket did not answer within {_QMP_READY_TIMEOUT:.0f}s",
                              log_tail=tail_lines(d / "qemu.log"))

    def _kill_processes(self, d: Path) -> None:
        pid = self._qemu_pid(d)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        sup = self._supervisor_pid(d)
        if sup is not None:
            # The supervisor exits by itself once QEMU is gone; give it a moment, then insist.
            deadline = time.monotonic() + 5
            while self._supervisor_pid(d) is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            if self._supervisor_pid(d) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sup, signal.SIGKILL)

    def _clean_runtime(self, d: Path, name: str, *, keep_ram: bool = False) -> None:
        """Remove pid files, sockets and (unless ``keep_ram``) the RAM file of a run that is
        over."""
        for f in _RUNTIME_FILES:
            with contextlib.suppress(FileNotFoundError):
                (d / f).unlink()
        vhost_backends.stop(d)
        if not keep_ram:
            with contextlib.suppress(FileNotFoundError):
                _recorded_ram_path(d, name).unlink()

    def _process_alive(self, name: str) -> bool:
        return self._qemu_pid(self._dir(name)) is not None

    def _force_off(self, name: str, *, keep_ram: bool = False) -> None:
        with self._locked(name) as d:
            self._kill_processes(d)
            self._clean_runtime(d, name, keep_ram=keep_ram)

    def kill(self, name: str, *, keep_ram: bool = False) -> None:
        """Stop at once; ``keep_ram`` leaves the RAM file in place (e.g. a failed host's
        memory that is still to be read)."""
        vm = self.info(name)
        if not vm.state.active and vm.state is not VmState.CRASHED:
            raise StateError(f"VM {name!r} is not running (state: {vm.state})")
        self._force_off(name, keep_ram=keep_ram)

    def ram_path(self, name: str) -> Path:
        """The RAM file of the VM's current (or last) run."""
        return _recorded_ram_path(self._dir(name), name)

    def _wait_exit(self, name: str, timeout: float) -> bool:
        d = self._dir(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._qemu_pid(d) is None:
                self._force_off(name)  # reaps the supervisor, removes sockets and RAM file
                return True
            time.sleep(0.05)
        return False

    def _qmp_socket(self, name: str) -> Path:
        vm = self._require_active(name)
        assert vm.state_dir is not None
        return vm.state_dir / "qmp.sock"

    def qmp(self, name: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return qmp_call(self._qmp_socket(name), command, arguments)

    def hmp(self, name: str, command_line: str) -> str:
        return hmp_call(self._qmp_socket(name), command_line)
