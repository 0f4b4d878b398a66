"""A lab host's own libvirtd and virtlogd (``libvirt = true`` in the lab spec).

Each host's daemons run in the host's network namespace and in a mount namespace of their own
(unshare(1) ``--mount --propagation slave``: the host's mounts still reach it, its own never
leave it), where the host's state dir is bind-mounted over libvirt's fixed paths::

    <state_dir>/etc/libvirt      -> /etc/libvirt      a copy of the machine's, plus host_uuid
    <state_dir>/var/lib/libvirt  -> /var/lib/libvirt  domains, channel sockets, RAM backing
    <state_dir>/var/cache/libvirt -> /var/cache/libvirt  seeded with the machine's QEMU
                                                      capability cache (skips a ~12 s probe)
    <state_dir>/var/log/libvirt  -> /var/log/libvirt
    <state_dir>/run/libvirt      -> /run/libvirt      sockets and both pid files

and the host's qemu.conf sets ``memory_backing_dir`` to the host's memory dir: its domains'
file-backed RAM lives in the host's memory (tmpfs), like the qemu driver's RAM files, instead of
under the private /var/lib/libvirt on disk (qemu.conf, "memory_backing_dir"; libvirt 9.0 names
the file ``<dir>/libvirt/qemu/<id>-<domain>/pc.ram``).

So the daemon's socket is ``<state_dir>/run/libvirt/libvirt-sock`` from anywhere, and
:attr:`hvtools.lab.hosts.HostHandle.libvirt_uri` points a client at it. Distinct hosts get
distinct ``host_uuid`` values (libvirtd.conf), as real machines have. Started without systemd,
like the machine's own instance (:mod:`hvtools.libvirt.daemon`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from hvtools.errors import DependencyError, HvError
from hvtools.lab.hosts import HostHandle, host_dir, pid_alive

Progress = Callable[[str], None]
#: libvirtd answers once its drivers are up; with a warm capability cache ~1-2 s here.
START_TIMEOUT = 90.0
#: (inside the namespace, under the state dir)
_BINDS = ("/etc/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt",
          "/run/libvirt")
_MARKER = "libvirt.host_uuid"


def _quiet(_msg: str) -> None:
    pass


def _under(state_dir: Path, path: str) -> Path:
    return state_dir / path.lstrip("/")


def socket_path(state_dir: Path) -> Path:
    return _under(state_dir, "/run/libvirt") / "libvirt-sock"


def _pidfiles(state_dir: Path) -> dict[str, Path]:
    run = _under(state_dir, "/run/libvirt")
    return {"libvirtd": run / "libvirtd.pid", "virtlogd": run / "virtlogd.pid"}


def _prepare(state_dir: Path, host_uuid: str, memory_dir: Path) -> None:
    """Lay out the private libvirt tree. /etc/libvirt is the machine's, minus autostarted
    networks (a lab host has no libvirt network), with this host's UUID and RAM in the host's
    memory dir."""
    etc = _under(state_dir, "/etc/libvirt")
    if etc.exists():
        shutil.rmtree(etc)
    shutil.copytree("/etc/libvirt", etc, symlinks=True)
    autostart = etc / "qemu" / "networks" / "autostart"
    if autostart.exists():
        shutil.rmtree(autostart)
    conf = etc / "libvirtd.conf"
    conf.write_text(conf.read_text() + f'\n# hvtools lab host\nhost_uuid = "{host_uuid}"\n')
    memory_dir.mkdir(parents=True, exist_ok=True)
    qemu_conf = etc / "qemu.conf"
    qemu_conf.write_text(qemu_conf.read_text()
                         + f'\n# hvtools lab host\nmemory_backing_dir = "{memory_dir}"\n')
    for path in _BINDS[1:]:
        _under(state_dir, path).mkdir(parents=True, exist_ok=True)
    caps = Path("/var/cache/libvirt/qemu/capabilities")
    if caps.is_dir():
        dest = _under(state_dir, "/var/cache/libvirt") / "qemu" / "capabilities"
        shutil.copytree(caps, dest, dirs_exist_ok=True)
    (state_dir / _MARKER).write_text(host_uuid + "\n")


def _script(state_dir: Path) -> str:
    mounts = "".join(f"mkdir -p {p} && mount --bind {_under(state_dir, p)} {p} && "
                     for p in _BINDS)
    pids = _pidfiles(state_dir)
    # Inside the namespace the pid files are under the bind-mounted /run/libvirt.
    return (f"set -e; {mounts}"
            f"/usr/sbin/virtlogd -d -p /run/libvirt/{pids['virtlogd'].name} && "
            f"exec /usr/sbin/libvirtd -d -p /run/libvirt/{pids['libvirtd'].name}")


def start_host_libvirt(host: HostHandle, *, progress: Progress = _quiet,
                       timeout: float = START_TIMEOUT) -> str:
    """Start the host's virtlogd + libvirtd and wait until its URI answers; return the URI."""
    from hvtools.libvirt.daemon import connect

    for tool in ("/usr/sbin/libvirtd", "/usr/sbin/virtlogd", "/usr/bin/unshare"):
        if not Path(tool).exists():
            raise DependencyError(f"{tool} not found: install libvirt-daemon-system (make host)")
    sd = host.state_dir
    marker = sd / _MARKER
    host_uuid = marker.read_text().strip() if marker.exists() else str(uuid.uuid4())
    stop_host_libvirt(host.lab, host.name)  # a dead instance's pid files and sockets
    _prepare(sd, host_uuid, host.memory_dir)
    progress(f"{host.name}: starting virtlogd and libvirtd (host UUID {host_uuid})")
    with open(_under(sd, "/var/log/libvirt") / "start.log", "ab") as logf:
        proc = host.popen(["/usr/bin/unshare", "--mount", "--propagation", "slave",
                           "/bin/sh", "-c", _script(sd)], detach=True, stdout=logf,
                          stderr=logf, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                            "LC_ALL": "C"})
        code = proc.wait(timeout=60)
    if code != 0:
        log = (_under(sd, "/var/log/libvirt") / "start.log").read_text(errors="replace")
        raise DependencyError(f"{host.name}: libvirtd did not start (status {code}): "
                              f"{(log.strip().splitlines() or ['no output'])[-1]}")
    uri = host.libvirt_uri
    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(uri, timeout=max(1.0, deadline - time.monotonic())).close()
            return uri
        except HvError as err:
            if time.monotonic() > deadline or _pid("libvirtd", sd) is None:
                raise DependencyError(f"{host.name}: libvirtd at {uri} did not answer: {err} "
                                      f"(see {_under(sd, '/var/log/libvirt')})") from err
            time.sleep(0.2)


def _pid(program: str, state_dir: Path) -> int | None:
    try:
        pid = int(_pidfiles(state_dir)[program].read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm == program and pid_alive(pid) else None


def host_libvirt_up(host: HostHandle) -> bool:
    """Whether the host's libvirtd runs and accepts connections on its socket."""
    import socket

    if _pid("libvirtd", host.state_dir) is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(str(socket_path(host.state_dir)))
        except OSError:
            return False
    return True


def stop_host_libvirt(lab: str, host: str, *, progress: Progress = _quiet) -> None:
    """Stop the host's libvirtd then virtlogd (SIGTERM, then SIGKILL) and remove their pid
    files and sockets. Their mount namespace goes with its last process."""
    sd = host_dir(lab, host)
    for program in ("libvirtd", "virtlogd"):
        pid = _pid(program, sd)
        if pid is None:
            continue
        progress(f"{host}: stopping {program} (pid {pid})")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    run = _under(sd, "/run/libvirt")
    if run.exists():
        for p in run.iterdir():
            if p.is_socket() or p.suffix == ".pid":
                p.unlink(missing_ok=True)
