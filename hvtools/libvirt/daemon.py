"""The libvirt daemon hvtools runs its domains under, started without systemd.

Debian 12's ``libvirt-daemon-system`` is the monolithic ``libvirtd``; with no systemd there is no
socket activation, so :func:`ensure_libvirtd` starts ``virtlogd -d`` (QEMU's stderr and file
chardevs go through it, qemu.conf ``stdio_handler = "logd"``) and ``libvirtd -d`` itself, as
root, and waits until ``qemu:///system`` answers (https://libvirt.org/daemons.html, "Monolithic
driver daemon"). It never starts a virtual network: libvirtd only autostarts networks linked in
``/etc/libvirt/qemu/networks/autostart``. Without udev, ``/dev/kvm`` also needs the
permissions udev would give it, or libvirtd re-probes QEMU on every call (:func:`_fix_kvm_device`).

Every ``libvirt.libvirtError`` that leaves this package is translated by :func:`libvirt_error`
into an :class:`~hvtools.errors.HvError` subclass carrying libvirt's message.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from hvtools.errors import (
    DependencyError,
    HvError,
    HvTimeout,
    StateError,
    UnknownVmError,
    VmError,
)

Progress = Callable[[str], None]

#: The local system instance of the QEMU driver (https://libvirt.org/drvqemu.html).
SYSTEM_URI = "qemu:///system"
SBIN = Path("/usr/sbin")
RUN_DIR = Path("/run/libvirt")
LIBVIRTD_SOCKET = RUN_DIR / "libvirt-sock"
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
VIRTLOGD_SOCKET = RUN_DIR / "virtlogd-sock"
VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")
KVM_DEVICE = Path("/dev/kvm")
#: libvirtd probes every installed QEMU binary before it answers: ~12 s on these hosts.
START_TIMEOUT = 90.0
#: A clean environment for the daemons: they outlive us and must not inherit a venv's PATH.
_DAEMON_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def _quiet(_msg: str) -> None:
    pass


def _ignore_error(_ctx: object, _err: object) -> None:
    """libvirt's default handler prints every error to stderr; hvtools raises them instead."""


libvirt.registerErrorHandler(_ignore_error, None)


def libvirt_error(err: libvirt.libvirtError, what: str) -> HvError:
    """Translate a ``libvirtError`` into the matching HvError; ``what`` says what was tried.

    The mapping follows libvirt's ``virErrorNumber`` (virterror.h): no such domain is
    UnknownVmError, an operation invalid for the domain's state is StateError, a daemon that
    cannot be reached is DependencyError, a libvirt timeout is HvTimeout; anything else VmError.
    """
    code = err.get_error_code()
    message = f"{what}: {err.get_error_message() or err}"
    if code == libvirt.VIR_ERR_NO_DOMAIN:
        return UnknownVmError(message)
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return StateError(message)
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return HvTimeout(message)
    if code in (libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_AUTH_FAILED) or (
        code == libvirt.VIR_ERR_SYSTEM_ERROR
        and err.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)
    ):
        return DependencyError(message)
    return VmError(message)


def _open(uri: str, timeout: float) -> libvirt.virConnect:
    """``libvirt.open`` with a bound: a libvirtd still probing QEMU accepts the socket connection
    but does not answer until its drivers are up, and the call itself has no timeout."""
    result: list[libvirt.virConnect | BaseException] = []

    def attempt() -> None:
        try:
            result.append(libvirt.open(uri))
        except BaseException as err:  # handed to the caller's thread below
            result.append(err)

    worker = threading.Thread(target=attempt, name="libvirt-open", daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        raise HvTimeout(f"libvirt at {uri} did not answer within {timeout:.0f}s")
    outcome = result[0]
    if isinstance(outcome, libvirt.libvirtError):
        raise libvirt_error(outcome, f"cannot connect to {uri}") from outcome
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def connect(uri: str = SYSTEM_URI, *, timeout: float = 30.0) -> libvirt.virConnect:
    """A connection to ``uri``; DependencyError (or HvTimeout) if the daemon does not answer."""
    return _open(uri, timeout)


def _pid_of(pidfile: Path, program: str) -> int | None:
    """The pid in ``pidfile`` if that process is alive (not a zombie) and is ``program``."""
    try:
        pid = int(pidfile.read_text().strip())
        # /proc/PID/stat: "pid (comm) state ..." (proc(5)); comm may hold spaces.
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    comm, _, rest = stat.partition("(")[2].rpartition(")")
    state = rest.split()[0] if rest.split() else "?"
    return pid if comm == program and state not in ("Z", "X") else None


def _listening(path: Path) -> bool:
    """Whether something accepts connections on the unix socket ``path`` (a stale socket file
    left by a killed daemon refuses them)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def libvirtd_reachable() -> bool:
    """Cheap check that a local libvirtd accepts connections; starts nothing."""
    return _listening(LIBVIRTD_SOCKET)


def _running(pidfile: Path, program: str, sock: Path) -> bool:
    """A daemon runs if its pid file names a live ``program`` or its socket accepts."""
    return _pid_of(pidfile, program) is not None or _listening(sock)


def _clear_stale(pidfile: Path, sockets: tuple[Path, ...]) -> list[Path]:
    """Remove the pid file and sockets a dead daemon left behind; return what was removed.
    Only called once :func:`_running` said no daemon owns them."""
    removed = []
    for path in (pidfile, *sockets):
        if path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _spawn(program: str, pidfile: Path, sockets: tuple[Path, ...], progress: Progress) -> None:
    """Start ``program -d`` after clearing a dead instance's leftovers; wait for its socket."""
    binary = SBIN / program
    if not binary.exists():
        raise DependencyError(f"{binary} not found: install libvirt-daemon-system (make host)")
    removed = _clear_stale(pidfile, sockets)
    if removed:
        progress(f"removed stale {', '.join(map(str, removed))}")
    progress(f"starting {program} -d")
    # The daemon keeps no handle on our pipes (it forks, setsid()s and reopens /dev/null), but
    # its early errors go to stderr before that: a file collects them without blocking us.
    with tempfile.TemporaryFile() as errfile:
        try:
            proc = subprocess.run([str(binary), "-d"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=errfile, env=_DAEMON_ENV,
                                  cwd="/", timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as err:
            raise DependencyError(f"cannot run {binary} -d: {err}") from err
        errfile.seek(0)
        stderr = errfile.read().decode(errors="replace").strip()
    if proc.returncode != 0:
        raise DependencyError(f"{binary} -d exited with status {proc.returncode}: "
                              f"{stderr or 'no output'} (see /var/log/libvirt/)")
    deadline = time.monotonic() + 10.0
    while not sockets[0].exists():
        if time.monotonic() > deadline:
            raise DependencyError(f"{program} started but {sockets[0]} did not appear "
                                  "(see /var/log/libvirt/)")
        time.sleep(0.05)


def _ensure_virtlogd(progress: Progress) -> None:
    if _running(VIRTLOGD_PIDFILE, "virtlogd", VIRTLOGD_SOCKET):
        return
    _spawn("virtlogd", VIRTLOGD_PIDFILE, (VIRTLOGD_SOCKET, RUN_DIR / "virtlogd-admin-sock"),
           progress)


def kvm_device_ok() -> bool:
    """Whether ``/dev/kvm`` has Debian's udev permissions (group ``kvm``, mode 0660), or is
    absent. See :func:`_fix_kvm_device` for why libvirt needs them even for TCG domains."""
    try:
        st = KVM_DEVICE.stat()
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except (FileNotFoundError, KeyError):
        return True
    return st.st_gid == kvm_gid and st.st_mode & 0o060 == 0o060


def _fix_kvm_device(progress: Progress) -> None:
    """Give ``/dev/kvm`` the permissions udev's 50-udev-default.rules sets on Debian
    (``KERNEL=="kvm", GROUP="kvm", MODE="0660"``); with no udev here it stays root 0600.

    libvirt 9.0 probes QEMU's capabilities in a process that sees KVM, then judges the cached
    result stale whenever ``/dev/kvm`` is not accessible to the ``libvirt-qemu`` user
    (virQEMUCapsIsValid: "KVM was enabled when probing ..., but it is not available now"), so
    it re-probes QEMU on every lookup: a define took ~100 s here instead of ~10 ms.
    """
    if kvm_device_ok():
        return
    progress(f"giving {KVM_DEVICE} Debian's udev permissions (root:kvm 0660)")
    try:
        os.chown(KVM_DEVICE, 0, grp.getgrnam("kvm").gr_gid)
        KVM_DEVICE.chmod(0o660)
    except OSError as err:
        raise DependencyError(f"cannot set {KVM_DEVICE} to root:kvm 0660 ({err}); without it "
                              "libvirtd re-probes QEMU on every call") from err


def _is_local(uri: str) -> bool:
    return uri == SYSTEM_URI


def ensure_libvirtd(uri: str = SYSTEM_URI, *, progress: Progress = _quiet,
                    timeout: float = START_TIMEOUT) -> str:
    """Make sure libvirtd answers at ``uri`` (starting it if it is the local system instance
    and not running) and return the URI. Idempotent.

    Raises DependencyError naming the cause when the daemon cannot be started or reached.
    """
    if not _is_local(uri):
        connect(uri).close()
        return uri
    if os.geteuid() != 0:
        raise DependencyError("libvirtd runs as root here (QEMU must run as root): "
                              "run hvtools as root")
    _fix_kvm_device(progress)
    _ensure_virtlogd(progress)
    if not _running(LIBVIRTD_PIDFILE, "libvirtd", LIBVIRTD_SOCKET):
        _spawn("libvirtd", LIBVIRTD_PIDFILE,
               (LIBVIRTD_SOCKET, RUN_DIR / "libvirt-sock-ro", RUN_DIR / "libvirt-admin-sock"),
               progress)
        progress("waiting for libvirtd to probe QEMU")
    deadline = time.monotonic() + timeout
    last: HvError | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            running = _pid_of(LIBVIRTD_PIDFILE, "libvirtd")
            state = f"libvirtd (pid {running}) is running" if running else "libvirtd exited"
            raise DependencyError(f"{uri} did not answer within {timeout:.0f}s: {state}; "
                                  f"last error: {last} (see /var/log/libvirt/libvirtd.log)")
        try:
            connect(uri, timeout=remaining).close()
            return uri
        except (DependencyError, HvTimeout) as err:
            last = err
        if not _running(LIBVIRTD_PIDFILE, "libvirtd", LIBVIRTD_SOCKET):
            raise DependencyError(f"libvirtd exited before {uri} answered: {last} "
                                  "(see /var/log/libvirt/libvirtd.log)")
        time.sleep(0.2)


def libvirtd_status(uri: str = SYSTEM_URI) -> dict[str, Any]:
    """What ``hvtools doctor`` reports: is libvirtd reachable, could hvtools start it, versions,
    pids, and ``reason``, one line saying why (or what answers)."""
    local = _is_local(uri)
    status: dict[str, Any] = {
        "uri": uri,
        "reachable": False,
        "startable": False,
        "pid": _pid_of(LIBVIRTD_PIDFILE, "libvirtd") if local else None,
        "virtlogd_pid": _pid_of(VIRTLOGD_PIDFILE, "virtlogd") if local else None,
        "library_version": _version_str(libvirt.getVersion()),
        "version": None,
        "hypervisor_version": None,
        "kvm_device_ok": kvm_device_ok(),
        "reason": "",
    }
    missing = [p for p in ("libvirtd", "virtlogd") if not (SBIN / p).exists()]
    problem = ""
    if not local:
        problem = f"{uri} is not the local system instance: hvtools does not start it"
    elif missing:
        names = ", ".join(str(SBIN / p) for p in missing)
        problem = f"missing {names}: install libvirt-daemon-system"
    elif os.geteuid() != 0:
        problem = "not root: hvtools starts libvirtd as root"
    else:
        status["startable"] = True
    try:
        conn = connect(uri, timeout=5.0)
    except HvError as err:
        status["reason"] = problem or f"not running ({err}); hvtools starts it when needed"
        return status
    try:
        status["version"] = _version_str(conn.getLibVersion())
        status["hypervisor_version"] = _version_str(conn.getVersion())
        status["reachable"] = True
        status["reason"] = (f"libvirtd {status['version']} answers at {uri} "
                            f"(QEMU {status['hypervisor_version']})")
        if not status["kvm_device_ok"]:
            status["reason"] += (f"; {KVM_DEVICE} is not root:kvm 0660, so libvirtd re-probes "
                                 "QEMU on every call (ensure_libvirtd fixes it)")
    except libvirt.libvirtError as err:
        status["reason"] = str(libvirt_error(err, f"querying {uri}"))
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()
    return status


def _version_str(number: int) -> str:
    """libvirt's packed ``major * 1_000_000 + minor * 1000 + release``."""
    return f"{number // 1_000_000}.{number // 1000 % 1000}.{number % 1000}"
