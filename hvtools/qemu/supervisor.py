"""The per-VM supervisor: ``python -m hvtools.qemu.supervisor STATE_DIR``.

It runs detached from the CLI (its own session), starts QEMU from ``argv.json``, records
``qemu.pid``, forwards SIGTERM/SIGINT, and when QEMU exits writes ``exit.json`` with the return
code, so the qemu driver can tell a guest poweroff (0) from a crash (signal, or error exit).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from hvtools.vhost import running


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _stop_backends() -> None:
    """QEMU is gone: so is the reason for its vhost-user backends (the ones working in this
    state dir, hvtools.vhost.running). The driver removes their files."""
    for pidfile in running.pidfiles(Path(".")):
        pid = running.alive(pidfile)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def main(state_dir: Path) -> int:
    # Work inside the state dir by relative paths: a state dir renamed while QEMU runs (a live
    # migration's switch-over) keeps its supervisor writing to the right place, and the driver
    # recognises both processes by their working directory.
    os.chdir(state_dir)
    state_dir = Path(".")
    argv = json.loads((state_dir / "argv.json").read_text())
    forwarded = (signal.SIGTERM, signal.SIGINT)
    # Hold the signals until QEMU exists to receive them, so none is lost in between.
    signal.pthread_sigmask(signal.SIG_BLOCK, forwarded)
    with open(state_dir / "qemu.log", "ab", buffering=0) as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=state_dir,
                                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK,
                                                                          forwarded))

        def forward(signum: int, _frame: FrameType | None) -> None:
            proc.send_signal(signum)

        for sig in forwarded:
            signal.signal(sig, forward)
        _write_atomic(state_dir / "qemu.pid", f"{proc.pid}\n")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)
        code = proc.wait()
    _stop_backends()
    _write_atomic(state_dir / "exit.json",
                  json.dumps({"returncode": code, "pid": proc.pid, "time": time.time()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
