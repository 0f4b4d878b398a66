"""The libvirt driver: hvtools VMs as persistent libvirt domains.

A domain lives in the machine's ``qemu:///system``, or, once started with ``vm start NAME
--host H``, in lab host H's own libvirtd (:mod:`hvtools.lab.libvirtd`, ``H.libvirt_uri``). The
second case is recorded in ``$HVTOOLS_HOME/libvirt/<name>/placement.json`` (:class:`Placement`),
so every later call reaches the daemon that holds the domain; migration
(:mod:`hvtools.migration.libvirt_live`) rewrites it when the domain moves.

libvirt owns the QEMU process, its monitor and its logs; hvtools keeps only what the guest needs
on the host side (the agent socket and the console log, both named in the domain XML): in
``$HVTOOLS_HOME/libvirt/<name>/`` for ``qemu:///system``, in ``<host state dir>/vms/<name>/`` on
a lab host, so that two hosts sharing this machine's filesystem never bind the same socket. The
VmSpec lives in the domain's ``<metadata>``, so ``virsh dumpxml`` shows everything and a domain
without that element is not hvtools'.

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
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import libvirt
import libvirt_qemu

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
    HostDownError,
    HvError,
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
from hvtools.spec import AGENT_PORT, Accel, LaunchPlan, VmSpec

if TYPE_CHECKING:
    from hvtools.lab.hosts import HostHandle

#: Where libvirt's QEMU driver keeps each domain's log and pid file (qemu.conf defaults).
QEMU_LOG_DIR = Path("/var/log/libvirt/qemu")
QEMU_RUN_DIR = Path("/run/libvirt/qemu")
#: qemu.conf ``memory_backing_dir``: libvirt's file-backed RAM lives under it, per domain.
MEMORY_BACKING_DIR = Path("/var/lib/libvirt/qemu/ram")
_INACTIVE_XML = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


def state_dir(name: str) -> Path:
    """hvtools' host-side directory for one libvirt VM (lock, placement record; for a domain in
    ``qemu:///system`` also its agent socket and console log)."""
    return paths.home() / "libvirt" / name


_SLASH = Path("/")


@dataclass(frozen=True)
class Placement:
    """Which libvirtd holds a VM's domain: ``qemu:///system`` (``host`` None) or the daemon of
    lab host ``lab/host``. ``root`` is where that daemon's ``/run/libvirt`` and
    ``/var/log/libvirt`` are seen from here (its private trees are bind mounts of the host's
    state dir, :mod:`hvtools.lab.libvirtd`)."""

    uri: str
    root: Path = _SLASH
    lab: str | None = None
    host: str | None = None

    @classmethod
    def of_host(cls, host: HostHandle) -> Placement:
        return cls(uri=host.libvirt_uri, root=host.state_dir, lab=host.lab, host=host.name)

    def files_dir(self, name: str) -> Path:
        """Where the VM's agent socket and console log live for a run under this daemon."""
        return state_dir(name) if self.host is None else self.root / "vms" / name

    def to_json(self) -> dict[str, str | None]:
        return {"uri": self.uri, "root": str(self.root), "lab": self.lab, "host": self.host}


def _placement_file(name: str) -> Path:
    return state_dir(name) / "placement.json"


def _recorded_placement(name: str) -> Placement | None:
    """The lab host recorded for VM ``name``, or None (its domain is in ``qemu:///system``)."""
    try:
        data = json.loads(_placement_file(name).read_text())
        return Placement(uri=str(data["uri"]), root=Path(data["root"]), lab=str(data["lab"]),
                         host=str(data["host"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _lab_is_up(lab: str | None) -> bool:
    from hvtools.lab.hosts import read_record

    return lab is not None and read_record(lab) is not None


def relocate_xml(xml: str, files_dir: Path) -> str:
    """The domain XML with the agent socket and the console log moved into ``files_dir``: the
    only host-side paths of an hvtools domain (formatdomain, "Channel" and "Consoles, serial,
    parallel & channel devices"). Its RAM file follows the daemon's ``memory_backing_dir``."""
    check_socket_path(files_dir / "agent.sock")
    root = ET.fromstring(xml)
    for channel in root.iterfind("devices/channel"):
        target, source = channel.find("target"), channel.find("source")
        if target is not None and target.get("name") == AGENT_PORT and source is not None:
            source.set("path", str(files_dir / "agent.sock"))
    for tag in ("serial", "console"):
        for dev in root.iterfind(f"devices/{tag}"):
            source = dev.find("source")
            if dev.get("type") == "file" and source is not None:
                source.set("path", str(files_dir / "console.log"))
    return ET.tostring(root, encoding="unicode")


def qemu_log(name: str, root: Path = _SLASH) -> Path:
    """libvirt's log of the domain's QEMU: command lines, QEMU's stderr, stop reasons.
    ``root``: :attr:`Placement.root` of the daemon that runs it."""
    return root / QEMU_LOG_DIR.relative_to("/") / f"{name}.log"


def log_size(name: str, root: Path = _SLASH) -> int:
    """The QEMU log's current size: pass it as ``since`` to read one start's lines only."""
    try:
        return qemu_log(name, root).stat().st_size
    except OSError:
        return 0


def _last_run(name: str, since: int = 0,
              root: Path = _SLASH) -> tuple[list[str], list[str]]:
    """The domain's last start in its QEMU log, from byte ``since`` on: the command-line block
    libvirt logs after its "starting up" banner, and the lines that follow it."""
    try:
        with qemu_log(name, root).open("rb") as fh:
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


def log_tail(name: str, lines: int = 10, *, since: int = 0, root: Path = _SLASH) -> list[str]:
    """The last lines libvirt and QEMU logged for the domain's last start (without its
    command line): QEMU's stderr, "shutting down, reason=..."."""
    return _last_run(name, since, root)[1][-lines:]


def logged_command(name: str, *, since: int = 0, root: Path = _SLASH) -> list[str]:
    """The QEMU argv libvirt logged for the domain's last start, without the environment."""
    try:
        words = shlex.split(" ".join(_last_run(name, since, root)[0]))
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
        #: Connections to lab hosts' daemons, by URI.
        self._hosts: dict[str, libvirt.virConnect] = {}
        #: VMs the last list() could not read (their host's daemon did not answer), with why.
        self.damaged: dict[str, str] = {}

    # -- connections --------------------------------------------------------------------------
    @property
    def conn(self) -> libvirt.virConnect:
        """The connection to ``self.uri``, opened (and libvirtd started) on first use, reopened
        if it died."""
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if self._conn.isAlive():
                    return self._conn
            self.close()
        ensure_libvirtd(self.uri, progress=self._progress or (lambda _m: None))
        self._conn = connect(self.uri)
        return self._conn

    def close(self) -> None:
        for c in [self._conn, *self._hosts.values()]:
            if c is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    c.close()
        self._conn = None
        self._hosts.clear()

    @property
    def system(self) -> Placement:
        return Placement(uri=self.uri)

    def connection(self, where: Placement) -> libvirt.virConnect:
        """The connection to the daemon ``where`` names. A lab host's daemon is never started
        here (``lab up`` does that): HostDownError when it does not answer."""
        if where.host is None:
            return self.conn
        c = self._hosts.get(where.uri)
        if c is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if c.isAlive():
                    return c
            with contextlib.suppress(libvirt.libvirtError):
                c.close()
        try:
            c = connect(where.uri, timeout=15.0)
        except HvError as err:
            raise HostDownError(f"host {where.host} of lab {where.lab!r}: its libvirtd does not "
                                f"answer ({err})") from err
        self._hosts[where.uri] = c
        return c

    # -- placement ----------------------------------------------------------------------------
    def placement(self, name: str) -> Placement:
        """The daemon that holds VM ``name``'s domain (it need not exist there: see
        :meth:`_locate`). A record naming a lab that is down is stale: the domain went down
        with the host's daemon (``lab down`` removes its tree), so the VM is unknown."""
        rec = _recorded_placement(name)
        if rec is None:
            return self.system
        if not _lab_is_up(rec.lab):
            raise UnknownVmError(f"no VM named {name!r}: its domain was on host {rec.host} of "
                                 f"lab {rec.lab!r}, which is down")
        return rec

    def record_placement(self, name: str, where: Placement) -> None:
        """Note that VM ``name``'s domain now lives in ``where``'s daemon (written atomically;
        ``qemu:///system`` is the absence of a record)."""
        path = _placement_file(name)
        if where.host is None:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(where.to_json()) + "\n")
        tmp.replace(path)

    def _forget_stale(self, name: str) -> None:
        """Drop the record (and hvtools' dir) of a VM whose lab went down with its domain."""
        rec = _recorded_placement(name)
        if rec is not None and not _lab_is_up(rec.lab):
            shutil.rmtree(state_dir(name), ignore_errors=True)

    def _locate(self, name: str) -> tuple[libvirt.virDomain, Placement]:
        """The hvtools domain ``name`` and where it lives; UnknownVmError if absent or not
        hvtools'."""
        where = self.placement(name)
        try:
            dom = self.connection(where).lookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                on = f" on host {where.host}" if where.host else ""
                raise UnknownVmError(f"no VM named {name!r}{on} (hvtools vm list)") from None
            raise libvirt_error(err, f"looking up domain {name!r}") from err
        if self._spec(dom) is None:
            raise UnknownVmError(f"libvirt domain {name!r} is not an hvtools VM "
                                 "(it has no hvtools metadata)")
        return dom, where

    def _domain(self, name: str) -> libvirt.virDomain:
        return self._locate(name)[0]

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
    def _plan(spec: VmSpec, accel: Accel, kernel: Path, initrd: Path,
              where: Placement) -> LaunchPlan:
        d = where.files_dir(spec.name)
        agent = d / "agent.sock"
        check_socket_path(agent)
        # ram_path is informational: libvirt names the file itself under memory_backing_dir
        # (a lab host's daemon has it in the host's memory dir, hvtools.lab.libvirtd).
        backing = (MEMORY_BACKING_DIR if where.host is None
                   else where.root / MEMORY_BACKING_DIR.relative_to("/"))
        return LaunchPlan(accel=accel, kernel=kernel, initrd=initrd,
                          ram_path=backing / spec.name, agent_socket=agent,
                          console_log=d / "console.log",
                          vhost_sockets=vhost_backends.sockets(d, spec))

    # -- Driver primitives --------------------------------------------------------------------
    def create(self, spec: VmSpec) -> VmInfo:
        """``virDomainDefineXML`` a persistent domain in ``qemu:///system`` (``vm start --host``
        moves it to the host's daemon). The accelerator and the image are placeholders until
        :meth:`_launch` resolves them and redefines it."""
        accel = Accel.TCG
        kernel = Path(spec.kernel) if spec.kernel else paths.images_dir() / "current" / "vmlinuz"
        initrd = (Path(spec.initrd) if spec.initrd
                  else paths.images_dir() / "current" / "initrd.img")
        plan = self._plan(spec, accel, kernel, initrd, self.system)
        self._forget_stale(spec.name)
        if spec.name in self._domain_names() or _recorded_placement(spec.name) is not None:
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
        dom, where = self._locate(name)
        vm = self._info(dom, where)
        if vm.state.active:
            raise UsageError(f"VM {name!r} is {vm.state}: stop it first")
        try:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                              | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except libvirt.libvirtError as err:
            raise libvirt_error(err, f"undefining domain {name!r}") from err
        self._remove_ivshmem(state_dir(name))
        if vm.agent_socket is not None:
            vhost_backends.stop(vm.agent_socket.parent)
        if vm.state_dir is not None and vm.state_dir.name == name:
            shutil.rmtree(vm.state_dir, ignore_errors=True)
        shutil.rmtree(state_dir(name), ignore_errors=True)

    def info(self, name: str) -> VmInfo:
        return self._info(*self._locate(name))

    def _placed(self) -> dict[str, Placement]:
        """VMs recorded on a lab host whose lab is up."""
        root = paths.home() / "libvirt"
        out = {}
        for f in sorted(root.glob("*/placement.json")) if root.is_dir() else []:
            rec = _recorded_placement(f.parent.name)
            if rec is not None and _lab_is_up(rec.lab):
                out[f.parent.name] = rec
        return out

    def list(self) -> list[VmInfo]:
        self.damaged = {}
        try:
            domains = self.conn.listAllDomains(0)
        except libvirt.libvirtError as err:
            raise libvirt_error(err, "listing domains") from err
        placed = self._placed()
        out = []
        for dom in domains:
            if dom.name() in placed:
                continue  # a copy left behind by an interrupted move; the record wins
            with contextlib.suppress(UnknownVmError):  # undefined while we looked
                if self._spec(dom) is not None:
                    out.append(self._info(dom, self.system))
        for name in placed:
            try:
                out.append(self.info(name))
            except UnknownVmError:
                continue  # migrated or undefined while we looked
            except HvError as err:
                self.damaged[name] = str(err)
        return sorted(out, key=lambda v: v.name)

    def _info(self, dom: libvirt.virDomain, where: Placement) -> VmInfo:
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
        paths_ = domain_paths(xml)
        common: dict[str, Any] = {
            "name": name, "driver": self.name, "spec": spec,
            "state_dir": (paths_.agent_socket.parent if paths_.agent_socket
                          else where.files_dir(name)),
            "console_log": paths_.console_log, "agent_socket": paths_.agent_socket,
            "host": where.host, "lab": where.lab,
        }
        if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED,
                     libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED,
                     libvirt.VIR_DOMAIN_SHUTDOWN):
            paused = state in (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PMSUSPENDED)
            return VmInfo(state=VmState.PAUSED if paused else VmState.RUNNING,
                          pid=self._qemu_pid(name, where.root), accel=str(domain_accel(xml)),
                          **common)
        crash = self._crash_detail(state, reason, paths_.console_log)
        if crash is not None:
            tail = log_tail(name, root=where.root)
            if crash.startswith("guest kernel") and paths_.console_log is not None:
                console = tail_lines(paths_.console_log, 200)
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
    def _qemu_pid(name: str, root: Path = _SLASH) -> int | None:
        """The domain's QEMU pid from libvirt's pid file, checked against /proc."""
        try:
            pid = int((root / QEMU_RUN_DIR.relative_to("/") / f"{name}.pid").read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if f"guest={name},".encode() in cmdline else None

    def _launch(self, name: str, progress: Progress) -> VmInfo:
        """Resolve accelerator and image now, redefine the domain with them, ``virDomainCreate``.

        On failure no QEMU and no agent socket remain; the domain stays defined.
        """
        with locked(state_dir(name) / "lock"):
            dom, where = self._locate(name)
            spec = self._spec(dom)
            assert spec is not None
            if dom.isActive():
                raise StateError(f"VM {name!r} is already running")
            qemu = find_qemu()
            accel = resolve_accel(spec.accel, qemu=qemu, progress=progress)
            kernel, initrd = preflight(spec)
            plan = self._plan(spec, accel, kernel, initrd, where)
            plan.agent_socket.parent.mkdir(parents=True, exist_ok=True)
            plan.agent_socket.unlink(missing_ok=True)
            self._claim_ivshmem(spec, state_dir(name))
            xml = render_domain_xml(spec, plan, emulator=str(qemu.path), uuid=dom.UUIDString())
            try:
                dom = dom.connect().defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            except libvirt.libvirtError as err:
                raise libvirt_error(err, f"redefining domain {name!r} for launch") from err
            on = f" on {where.host}" if where.host else ""
            if plan.vhost_sockets:
                # libvirt connects QEMU to vhost-user backends; starting them is ours.
                progress(f"{name}: starting {len(plan.vhost_sockets)} vhost-user backend(s)")
                vhost_backends.start(plan.agent_socket.parent, spec)
            progress(f"{name}: starting libvirt domain on QEMU {qemu.version_str} ({accel}){on}")
            root = where.root
            since = log_size(name, root)
            try:
                dom.create()
            except libvirt.libvirtError as err:
                if err.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID and dom.isActive():
                    # Someone else started it meanwhile: theirs is running, leave it alone.
                    raise StateError(f"VM {name!r} is already running") from err
                self._cleanup(dom, plan.agent_socket)
                raise VmLaunchFailure(
                    f"libvirt could not start VM {name!r}: {err.get_error_message() or err}",
                    command=logged_command(name, since=since, root=root),
                    log_tail=log_tail(name, since=since, root=root)) from err
            except BaseException:
                self._cleanup(dom, plan.agent_socket)
                raise
            return self._info(dom, where)

    def _launch_with(self, name: str, progress: Progress, options: LaunchOptions) -> VmInfo:
        """``--host H``: move the (inactive) domain into H's own libvirtd first, then start it
        there. Without it the domain starts in the daemon that holds it."""
        if options.extra_args or options.keep_ram:
            raise UsageError("the libvirt driver cannot add QEMU arguments or launch on a kept "
                             "RAM file (use --driver qemu)")
        if options.host is not None:
            from hvtools.lab.hosts import load_lab, resolve_host

            host = resolve_host(options.host)  # unknown host / lab down: nothing changed
            if not load_lab(host.lab).spec.libvirt:
                raise UsageError(f"lab {host.lab!r} runs no libvirtd on its hosts: build it "
                                 "with `libvirt = true` in its spec (hvtools lab up SPEC)")
            self.move(name, Placement.of_host(host), progress=progress)
        return self._launch(name, progress)

    def move(self, name: str, target: Placement, *, progress: Progress = lambda _m: None,
             ) -> None:
        """Move VM ``name``'s inactive definition into ``target``'s daemon (same UUID, its
        host-side paths in ``target``'s files dir). On failure the definition stays where it
        was."""
        with locked(state_dir(name) / "lock"):
            dom, where = self._locate(name)
            if where == target:
                return
            if dom.isActive():
                raise StateError(f"VM {name!r} runs on {where.host or 'this machine'}: stop it "
                                 "before starting it elsewhere (or migrate it)")
            dest = self.connection(target)
            try:
                dest.lookupByName(name)
                raise NameInUseError(f"host {target.host}'s libvirtd already has a domain "
                                     f"named {name!r}")
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise libvirt_error(err, f"looking up {name!r} on {target.host}") from err
            files = target.files_dir(name)
            try:
                xml = relocate_xml(dom.XMLDesc(_INACTIVE_XML), files)
                moved = dest.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
            except libvirt.libvirtError as err:
                raise libvirt_error(err, f"defining {name!r} on {target.host}") from err
            progress(f"{name}: defined on {target.host or target.uri}")
            try:
                self.record_placement(name, target)
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                                  | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
            except BaseException as err:
                with contextlib.suppress(libvirt.libvirtError):
                    moved.undefine()
                self.record_placement(name, where)
                if isinstance(err, libvirt.libvirtError):
                    raise libvirt_error(err, f"undefining {name!r} where it was") from err
                raise
            files.mkdir(parents=True, exist_ok=True)
            if where.host is not None:
                shutil.rmtree(where.files_dir(name), ignore_errors=True)

    @staticmethod
    def _cleanup(dom: libvirt.virDomain, agent_socket: Path | None) -> None:
        """Destroy the domain if it runs and remove the agent socket."""
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isActive():
                dom.destroy()
        if agent_socket is not None:
            agent_socket.unlink(missing_ok=True)
            vhost_backends.stop(agent_socket.parent)

    def _process_alive(self, name: str) -> bool:
        try:
            return bool(self._domain(name).isActive())
        except (libvirt.libvirtError, HvError):
            return False

    def _force_off(self, name: str) -> None:
        """``virDomainDestroy`` (SIGTERM, then SIGKILL) and remove the agent socket; for a
        crashed domain, redefine it so libvirt forgets the crash."""
        dom, where = self._locate(name)
        vm = self._info(dom, where)
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
            dom.connect().defineXML(xml)
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

