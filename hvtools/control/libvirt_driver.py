"""The libvirt driver: hvtools VMs as persistent libvirt domains (``qemu:///system``).

libvirt owns the QEMU process, its monitor and its logs; hvtools keeps only what the guest needs
on the host side in ``$HVTOOLS_HOME/libvirt/<name>/`` (the agent socket and the console log,
both named in the domain XML). The VmSpec lives in the domain's ``<metadata>``, so
``virsh dumpxml`` shows everything and a domain without that element is not hvtools'.

State comes from libvirt's ``virDomainGetState`` (state, reason), never from files:

=====================================  ==========================================
libvirt state (reason)                 VmState
=====================================  ==========================================
running, blocked                       RUNNING
paused, pmsuspended                    PAUSED
crashed; shut off (crashed, daemon)    CRASHED: QEMU died (e.g. SIGKILL)
shut off (shutdown) + kernel panic     CRASHED: the guest panicked (panic=-1 and
                                       ``on_reboot=destroy`` end the domain)
any other shut off                     DEFINED
=====================================  ==========================================

A crashed domain stays "shut off (crashed)" in libvirt until it is started again; ``vm kill``
(:meth:`LibvirtDriver._force_off`) acknowledges the crash by redefining the domain from its own
inactive XML, which resets the reason to "unknown", i.e. DEFINED.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from hvtools import paths
from hvtools.control.accel import resolve_accel
from hvtools.control.driver import (
    Driver,
    Progress,
    VmInfo,
    VmState,
    check_socket_path,
    locked,
    preflight,
    tail_lines,
)
from hvtools.errors import (
    NameInUseError,
    QmpError,
    StateError,
    UnknownVmError,
    UsageError,
    VmLaunchFailure,
)
from hvtools.libvirt.daemon import SYSTEM_URI, connect, ensure_libvirtd, libvirt_error
from hvtools.libvirt.domxml import (
    HVTOOLS_NS,
    domain_accel,
    domain_paths,
    render_domain_xml,
    spec_from_metadata,
)
from hvtools.qemu.binary import find_qemu
from hvtools.spec import Accel, LaunchPlan, VmSpec

#: Where libvirt's QEMU driver keeps each domain's log and pid file (qemu.conf defaults).
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
QEMU_RUN_DIR = Path("/run/libvirt/qemu")
#: qemu.conf ``memory_backing_dir``: libvirt's file-backed RAM lives under it, per domain.
MEMORY_BACKING_DIR = Path("/var/lib/libvirt/qemu/ram")
_INACTIVE_XML = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


def state_dir(name: str) -> Path:
    """hvtools' host-side directory for one libvirt VM."""
    return paths.home() / "libvirt" / name


def qemu_log(name: str) -> Path:
    """libvirt's log of the domain's QEMU: command lines, QEMU's stderr, stop reasons."""
    return QEMU_LOG_DIR / f"{name}.log"


def log_size(name: str) -> int:
    """The QEMU log's current size: pass it as ``since`` to read one start's lines only."""
    try:
        return qemu_log(name).stat().st_size
    except OSError:
        return 0


def _last_run(name: str, since: int = 0) -> tuple[list[str], list[str]]:
    """The domain's last start in its QEMU log, from byte ``since`` on: the command-line block
    libvirt logs after its "starting up" banner, and the lines that follow it."""
    try:
        with qemu_log(name).open("rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(max(since, size - 65536))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return [], []
    lines = [ln.rstrip() for ln in text.splitlines()]
    starts = [i for i, ln in enumerate(lines) if ": starting up " in ln]
    if not starts:
        return [], [ln for ln in lines if ln.strip()]
    command: list[str] = []
    rest = lines[starts[-1] + 1:]
    while rest:
        line = rest.pop(0)
        command.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            break
    return command, [ln for ln in rest if ln.strip()]


def log_tail(name: str, lines: int = 10, *, since: int = 0) -> list[str]:
    """The last lines libvirt and QEMU logged for the domain's last start (without its
    command line): QEMU's stderr, "shutting down, reason=..."."""
    return _last_run(name, since)[1][-lines:]


def logged_command(name: str, *, since: int = 0) -> list[str]:
    """The QEMU argv libvirt logged for the domain's last start, without the environment."""
    try:
        words = shlex.split(" ".join(_last_run(name, since)[0]))
    except ValueError:
        return []
    while words and "=" in words[0] and not words[0].startswith("/"):
        words.pop(0)  # LC_ALL=C PATH=... HOME=... before the binary
    return words


class LibvirtDriver(Driver):
    """VMs as libvirt domains, rendered by :func:`hvtools.libvirt.domxml.render_domain_xml`."""

    name = "libvirt"

    def __init__(self, uri: str = SYSTEM_URI, *, progress: Progress | None = None) -> None:
        self.uri = uri
        self._progress = progress
        self._conn: libvirt.virConnect | None = None

    # -- connection ---------------------------------------------------------------------------
    @property
    def conn(self) -> libvirt.virConnect:
        """The connection, opened (and libvirtd started) on first use, reopened if it died."""
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if self._conn.isAlive():
                    return self._conn
            self.close()
        ensure_libvirtd(self.uri, progress=self._progress or (lambda _m: None))
        self._conn = connect(self.uri)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def _domain(self, name: str) -> libvirt.virDomain:
        """The hvtools domain ``name``; UnknownVmError if absent or not hvtools'."""
        try:
            dom = self.conn.lookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise UnknownVmError(f"no VM named {name!r} (hvtools vm list)") from None
            raise libvirt_error(err, f"looking up domain {name!r}") from err
        if self._spec(dom) is None:
            raise UnknownVmError(f"libvirt domain {name!r} is not an hvtools VM "
                                 "(it has no hvtools metadata)")
        return dom

    @staticmethod
    def _spec(dom: libvirt.virDomain) -> VmSpec | None:
        """The spec in the domain's hvtools metadata (formatdomain, "Meta-data"), or None."""
        try:
            element = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, HVTOOLS_NS,
                                   libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise libvirt_error(err, f"reading metadata of {dom.name()!r}") from err
        return spec_from_metadata(element)

    @staticmethod
    def _plan(spec: VmSpec, accel: Accel, kernel: Path, initrd: Path) -> LaunchPlan:
        d = state_dir(spec.name)
        agent = d / "agent.sock"
        check_socket_path(agent)
        # ram_path is informational: libvirt names the file itself under memory_backing_dir.
        return LaunchPlan(accel=accel, kernel=kernel, initrd=initrd,
                          ram_path=MEMORY_BACKING_DIR / spec.name, agent_socket=agent,
                          console_log=d / "console.log")

    # -- Driver primitives --------------------------------------------------------------------
    def create(self, spec: VmSpec) -> VmInfo:
        """``virDomainDefineXML`` a persistent domain. The accelerator and the image are
        placeholders until :meth:`_launch` resolves them and redefines it."""
        accel = Accel.TCG
        kernel = Path(spec.kernel) if spec.kernel else paths.images_dir() / "current" / "vmlinuz"
        initrd = (Path(spec.initrd) if spec.initrd
                  else paths.images_dir() / "current" / "initrd.img")
        plan = self._plan(spec, accel, kernel, initrd)
        if spec.name in self._domain_names():
            raise NameInUseError(f"a VM (libvirt domain) named {spec.name!r} already exists")
        try:
            self.conn.defineXMLFlags(render_domain_xml(spec, plan),
                                     libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        except libvirt.libvirtError as err:
            if "already exists" in (err.get_error_message() or ""):
                raise NameInUseError(f"a VM (libvirt domain) named {spec.name!r} "
                                     "already exists") from err
            raise libvirt_error(err, f"defining domain {spec.name!r}") from err
        state_dir(spec.name).mkdir(parents=True, exist_ok=True)
        return self.info(spec.name)

    def _domain_names(self) -> set[str]:
        try:
            return {d.name() for d in self.conn.listAllDomains(0)}
        except libvirt.libvirtError as err:
            raise libvirt_error(err, "listing domains") from err

    def undefine(self, name: str) -> None:
        dom = self._domain(name)
        vm = self._info(dom)
        if vm.state.active:
            raise UsageError(f"VM {name!r} is {vm.state}: stop it first")
        try:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except libvirt.libvirtError as err:
            raise libvirt_error(err, f"undefining domain {name!r}") from err
        self._remove_ivshmem(state_dir(name))
        if vm.state_dir is not None and vm.state_dir.name == name:
            shutil.rmtree(vm.state_dir, ignore_errors=True)

    def info(self, name: str) -> VmInfo:
        return self._info(self._domain(name))

    def list(self) -> list[VmInfo]:
        try:
            domains = self.conn.listAllDomains(0)
        except libvirt.libvirtError as err:
            raise libvirt_error(err, "listing domains") from err
        out = []
        for dom in sorted(domains, key=lambda d: d.name()):
            with contextlib.suppress(UnknownVmError):  # undefined while we looked
                if self._spec(dom) is not None:
                    out.append(self._info(dom))
        return out

    def _info(self, dom: libvirt.virDomain) -> VmInfo:
        name = dom.name()
        try:
            spec = self._spec(dom)
            state, reason = dom.state()
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise UnknownVmError(f"no VM named {name!r} (hvtools vm list)") from None
            raise libvirt_error(err, f"reading domain {name!r}") from err
        if spec is None:
            raise UnknownVmError(f"libvirt domain {name!r} is not an hvtools VM")
        where = domain_paths(xml)
        common: dict[str, Any] = {
            "name": name, "driver": self.name, "spec": spec,
            "state_dir": where.agent_socket.parent if where.agent_socket else state_dir(name),
            "console_log": where.console_log, "agent_socket": where.agent_socket,
        }
        if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED,
                     libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED,
                     libvirt.VIR_DOMAIN_SHUTDOWN):
            paused = state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED)
            return VmInfo(state=VmState.PAUSED if paused else VmState.RUNNING,
                          pid=self._qemu_pid(name), accel=str(domain_accel(xml)), **common)
        crash = self._crash_detail(state, reason, where.console_log)
        if crash is not None:
            tail = log_tail(name)
            if crash.startswith("guest kernel") and where.console_log is not None:
                console = tail_lines(where.console_log, 200)
                panic = [ln for ln in console if "Kernel panic" in ln]
                tail += panic[-1:] + console[-2:]
            return VmInfo(state=VmState.CRASHED, detail=crash, log_tail=tuple(tail or [crash]),
                          **common)
        detail = {libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "guest powered off",
                  libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "killed",
                  libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "the last start failed"}.get(reason, "")
        return VmInfo(state=VmState.DEFINED, detail=detail, **common)

    @staticmethod
    def _crash_detail(state: int, reason: int, console: Path | None) -> str | None:
        """Why an inactive domain counts as crashed, or None if it does not."""
        if state == libvirt.VIR_DOMAIN_CRASHED:
            return "the guest crashed (libvirt state: crashed)"
        if state != libvirt.VIR_DOMAIN_SHUTOFF:
            return None
        if reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
            return "QEMU died unexpectedly (libvirt: shut off, reason crashed)"
        if reason == libvirt.VIR_DOMAIN_SHUTOFF_DAEMON:
            return "libvirtd lost QEMU while reconnecting (libvirt: shut off, reason daemon)"
        if reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN and console is not None:
            with contextlib.suppress(OSError):
                if b"Kernel panic" in console.read_bytes()[-65536:]:
                    return "guest kernel panicked"
        return None

    @staticmethod
    def _qemu_pid(name: str) -> int | None:
        """The domain's QEMU pid from libvirt's pid file, checked against /proc."""
        try:
            pid = int((QEMU_RUN_DIR / f"{name}.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if f"guest={name},".encode() in cmdline else None

    def _launch(self, name: str, progress: Progress) -> VmInfo:
        """Resolve accelerator and image now, redefine the domain with them, ``virDomainCreate``.

        On failure no QEMU and no agent socket remain; the domain stays defined.
        """
        with locked(state_dir(name) / "lock"):
            dom = self._domain(name)
            spec = self._spec(dom)
            assert spec is not None
            if dom.isActive():
                raise StateError(f"VM {name!r} is already running")
            qemu = find_qemu()
            accel = resolve_accel(spec.accel, qemu=qemu, progress=progress)
            kernel, initrd = preflight(spec)
            plan = self._plan(spec, accel, kernel, initrd)
            plan.agent_socket.parent.mkdir(parents=True, exist_ok=True)
            plan.agent_socket.unlink(missing_ok=True)
            self._claim_ivshmem(spec, state_dir(name))
            xml = render_domain_xml(spec, plan, emulator=str(qemu.path), uuid=dom.UUIDString())
            try:
                dom = self.conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            except libvirt.libvirtError as err:
                raise libvirt_error(err, f"redefining domain {name!r} for launch") from err
            progress(f"{name}: starting libvirt domain on QEMU {qemu.version_str} ({accel})")
            since = log_size(name)
            try:
                dom.create()
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and dom.isActive():
                    # Someone else started it meanwhile: theirs is running, leave it alone.
                    raise StateError(f"VM {name!r} is already running") from err
                self._cleanup(dom, plan.agent_socket)
                raise VmLaunchFailure(
                    f"libvirt could not start VM {name!r}: {err.get_error_message() or err}",
                    command=logged_command(name, since=since),
                    log_tail=log_tail(name, since=since)) from err
            except BaseException:
                self._cleanup(dom, plan.agent_socket)
                raise
            return self._info(dom)

    @staticmethod
    def _cleanup(dom: libvirt.virDomain, agent_socket: Path | None) -> None:
        """Destroy the domain if it runs and remove the agent socket."""
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        if agent_socket is not None:
            agent_socket.unlink(missing_ok=True)

    def _process_alive(self, name: str) -> bool:
        try:
            return bool(self.conn.lookupByName(name).isActive())
        except libvirt.libvirtError:
            return False

    def _force_off(self, name: str) -> None:
        """``virDomainDestroy`` (SIGTERM, then SIGKILL) and remove the agent socket; for a
        crashed domain, redefine it so libvirt forgets the crash."""
        dom = self._domain(name)
        vm = self._info(dom)
        self._cleanup(dom, vm.agent_socket)
        if vm.state is VmState.CRASHED:
            self._reset_state(dom)

    def _reset_state(self, dom: libvirt.virDomain) -> None:
        """Undefine and define the domain from its own inactive XML (same UUID): libvirt then
        reports "shut off (unknown)" instead of the crash it remembered."""
        name = dom.name()
        try:
            xml = dom.XMLDesc(_INACTIVE_XML)
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            self.conn.defineXML(xml)
        except libvirt.libvirtError as err:
            raise libvirt_error(err, f"clearing the crashed state of {name!r}") from err

    def _wait_exit(self, name: str, timeout: float) -> bool:
        dom = self._domain(name)
        deadline = time.monotonic() + timeout
        while True:
            try:
                active = dom.isActive()
            except libvirt.libvirtError as err:
                raise libvirt_error(err, f"watching domain {name!r}") from err
            if not active:
                self._cleanup(dom, domain_paths(dom.XMLDesc(0)).agent_socket)
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def _active_domain(self, name: str) -> libvirt.virDomain:
        self._require_active(name)
        return self._domain(name)

    def qmp(self, name: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """One QMP command through ``virDomainQemuMonitorCommand`` (libvirt-qemu.h); libvirt
        taints the domain "custom-monitor"."""
        dom = self._active_domain(name)
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        try:
            text = libvirt_qemu.qemuMonitorCommand(
                dom, json.dumps(request), libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_DEFAULT)
        except libvirt.libvirtError as err:
            raise QmpError(command, err.get_error_message(),
                           f"QMP {command} failed: {err.get_error_message()}") from err
        reply = json.loads(text)
        if "error" in reply:
            info = reply["error"]
            raise QmpError(command, reply, f"QMP {command} failed: "
                           f"{info.get('class')}: {info.get('desc')}")
        return reply.get("return")

    def hmp(self, name: str, command_line: str) -> str:
        """A human-monitor command (``VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP``: libvirt wraps it in
        QMP's ``human-monitor-command``)."""
        dom = self._active_domain(name)
        try:
            return str(libvirt_qemu.qemuMonitorCommand(
                dom, command_line, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP))
        except libvirt.libvirtError as err:
            raise QmpError("human-monitor-command", err.get_error_message(),
                           f"HMP {command_line!r} failed: {err.get_error_message()}") from err

    # -- libvirt-only helpers -----------------------------------------------------------------
    def ram_path(self, name: str) -> Path:
        """The running guest's RAM file, which libvirt names under ``memory_backing_dir``."""
        path = self.qmp(name, "qom-get", {"path": "/objects/pc.ram", "property": "mem-path"})
        return Path(str(path))

    def domain_xml(self, name: str, *, inactive: bool = False) -> str:
        """The domain XML as libvirt holds it (``virsh dumpxml``)."""
        try:
            return str(self._domain(name).XMLDesc(_INACTIVE_XML if inactive else 0))
        except libvirt.libvirtError as err:
            raise libvirt_error(err, f"reading domain {name!r}") from err

