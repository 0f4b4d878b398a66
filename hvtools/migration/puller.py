"""One pull, in a process of its own: ``python -m hvtools.migration.puller ADDRESS``.

A host agent keeps one of these ready (imports done, fabric endpoint open on ``ADDRESS``) and
hands it a job as one JSON line on stdin: ``{"exports": ..., "dest": DIR, "ram_path": PATH}``.
It answers with JSON lines on stdout: ``{"progress": [done, total]}`` while pages arrive, then
``{"result": PullStats}`` or ``{"error": {"type": ..., "message": ...}}``, and exits.

Why a process: when a link dies with READs in flight, those READs may still land later, and
tearing down a libfabric endpoint with ops outstanding can crash inside the provider. Here the
process simply exits after a failure; the kernel reclaims its sockets and mappings, and the
agent (the host's NIC) is never taken down by a broken transfer.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from hvtools.errors import HvError
from hvtools.migration import recovery
from hvtools.transport import open_endpoint


def _send(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main(address: str) -> int:
    try:
        ep = open_endpoint("fabric", "tcp", address=address)
    except HvError as err:
        _send({"error": {"type": type(err).__name__, "message": str(err)}})
        return 1
    _send({"ready": ep.address})
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the agent stopped without a job for us
    try:
        job = json.loads(line)
        ram = job.get("ram_path")
        stats = recovery.pull_vm(ep, job["exports"], Path(job["dest"]),
                                 lambda d, t: _send({"progress": [d, t]}),
                                 Path(ram) if ram else None)
        _send({"result": stats.to_json()})
    except (HvError, OSError, ValueError, KeyError) as err:
        _send({"error": {"type": type(err).__name__, "message": str(err)}})
    # Never close an endpoint that may have READs in flight: exit and let the kernel clean up.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
