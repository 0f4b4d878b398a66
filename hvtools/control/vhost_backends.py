"""The vhost-user backends a VM's spec names, started and stopped with its QEMU.

For each ``vhost-user-blk`` device the qemu driver starts ``python -m hvtools.vhost.blk`` before
QEMU, in the VM's state dir::

    vub-<id>.sock   the vhost-user socket (the backend listens; QEMU connects, reconnect-ms)
    vub-<id>.ctl    the backend's control channel (status, harvest, set_dirty_log)
    vub-<id>.pid    its pid;  vub-<id>.log  its output

They outlive a QEMU that disconnects (the backend waits for a reconnect) and go when the run's
runtime files are cleaned.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hvtools.control.driver import tail_lines
from hvtools.errors import VmLaunchFailure
from hvtools.spec import DeviceType, VmSpec
from hvtools.vhost import running

_READY_TIMEOUT = 15.0


@dataclass(frozen=True)
class BackendFiles:
    state_dir: Path
    dev_id: str

    def _p(self, ext: str) -> Path:
        return self.state_dir / f"vub-{self.dev_id}.{ext}"

    @property
    def socket(self) -> Path:
        return self._p("sock")

    @property
    def control(self) -> Path:
        return self._p("ctl")

    @property
    def pidfile(self) -> Path:
        return self._p("pid")

    @property
    def log(self) -> Path:
        return self._p("log")


def vhost_devices(spec: VmSpec) -> list[str]:
    return [d.id for d in spec.devices if d.type is DeviceType.VHOST_USER_BLK]


def sockets(state_dir: Path, spec: VmSpec, *, relative: bool = False) -> dict[str, Path]:
    """The sockets QEMU connects to. ``relative``: named from the state dir, which is QEMU's
    working directory under the qemu driver, so a state dir renamed by a migration's
    switch-over still leads QEMU back to its backend when it reconnects."""
    out = {i: BackendFiles(state_dir, i).socket for i in vhost_devices(spec)}
    return {i: Path(p.name) for i, p in out.items()} if relative else out


def start(state_dir: Path, spec: VmSpec, *, dirty_log: bool = True) -> list[int]:
    """Start one backend per vhost-user device; return once each listens."""
    stop(state_dir)  # a backend a powered-off guest left
    pids: list[int] = []
    try:
        for dev in spec.devices:
            if dev.type is not DeviceType.VHOST_USER_BLK:
                continue
            assert dev.path is not None
            f = BackendFiles(state_dir, dev.id)
            for p in (f.socket, f.control):
                p.unlink(missing_ok=True)
            # Relative names from the state dir (its working directory): the sockets follow
            # the dir when a migration's switch-over renames it.
            argv = [sys.executable, "-m", "hvtools.vhost.blk", "--socket", f.socket.name,
                    "--disk", str(Path(dev.path).resolve()), "--control", f.control.name]
            if not dirty_log:
                argv.append("--no-dirty-log")
            with open(f.log, "ab") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        cwd=state_dir, start_new_session=True, close_fds=True)
            f.pidfile.write_text(f"{proc.pid}\n")
            pids.append(proc.pid)
            deadline = time.monotonic() + _READY_TIMEOUT
            while not (f.socket.exists() and f.control.exists()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = tail_lines(f.log)
                    raise VmLaunchFailure(
                        f"the vhost-user-blk backend of {dev.id} did not start: "
                        f"{tail[-1] if tail else 'no output'}", log_tail=tail)
                time.sleep(0.02)
    except BaseException:
        stop(state_dir)
        raise
    return pids


def stop(state_dir: Path) -> None:
    """Stop every backend of this state dir and remove its sockets."""
    for pidfile in running.pidfiles(state_dir):
        pid = running.alive(pidfile)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 3
            while running.alive(pidfile) is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            if running.alive(pidfile) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        dev = pidfile.name.removeprefix("vub-").removesuffix(".pid")
        f = BackendFiles(state_dir, dev)
        for p in (pidfile, f.socket, f.control):
            p.unlink(missing_ok=True)
