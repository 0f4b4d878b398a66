"""Which backend processes belong to a state dir: one rule for the driver and the supervisor.

A backend is ``python -m hvtools.vhost.blk`` started in the VM's state dir with its pid in
``vub-<id>.pid`` there. It counts as that dir's only while its working directory is the dir
(so a reused pid, or another VM's backend, never does); the working directory follows the dir
when a migration's switch-over renames it.
"""

from __future__ import annotations

import os
from pathlib import Path


def alive(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process is a backend working in the pidfile's dir."""
    try:
        pid = int(pidfile.read_text().strip())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError):
        return None
    here = os.path.realpath(pidfile.parent)
    return pid if b"hvtools.vhost.blk" in cmd and cwd == here else None


def pidfiles(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob("vub-*.pid"))
