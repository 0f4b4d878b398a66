"""QMP through QEMU's own library, ``qemu.qmp``, as short synchronous calls.

Each call opens the VM's QMP socket, negotiates, runs its commands and disconnects; QEMU's
monitor chardev accepts one client at a time, so nothing holds it open between commands.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient, QMPError

from hvtools.errors import HvTimeout, QmpError, VmError


async def _run(socket: Path, calls: Sequence[tuple[str, dict[str, Any] | None]],
               timeout: float) -> list[Any]:
    client = QMPClient(f"hvtools:{socket.parent.name}")
    name = calls[0][0] if calls else "qmp_capabilities"
    try:
        await asyncio.wait_for(client.connect(str(socket)), timeout)
        out = []
        for name, args in calls:
            out.append(await asyncio.wait_for(client.execute(name, args), timeout))
        return out
    except ExecuteError as err:
        info = err.error.error
        raise QmpError(name, dict(err.received),
                       f"QMP {name} failed: {info.class_}: {info.desc}") from err
    except ConnectError as err:
        raise VmError(f"cannot reach QMP at {socket}: {err}") from err
    except TimeoutError as err:
        raise HvTimeout(f"QMP {name} did not answer within {timeout:.0f}s") from err
    except (QMPError, EOFError, OSError) as err:
        raise VmError(f"QMP {name} failed: {type(err).__name__}: {err}") from err
    finally:
        # A command that ends QEMU (quit) closes the socket under us: nothing to report.
        with contextlib.suppress(QMPError, EOFError, OSError):
            await client.disconnect()


def qmp_call(socket: Path, command: str, arguments: dict[str, Any] | None = None,
             *, timeout: float = 10.0) -> Any:
    """Run one QMP command; return its ``return`` value, or raise QmpError with the reply."""
    return asyncio.run(_run(socket, [(command, arguments)], timeout))[0]


def hmp_call(socket: Path, command_line: str, *, timeout: float = 10.0) -> str:
    """A human-monitor command through QMP's ``human-monitor-command``."""
    out = qmp_call(socket, "human-monitor-command", {"command-line": command_line},
                   timeout=timeout)
    return str(out)
