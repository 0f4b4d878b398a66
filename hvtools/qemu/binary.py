"""Finding the QEMU binary and asking it what it supports."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hvtools.errors import DependencyError

#: The oldest QEMU whose intel-iommu has x-scalable-mode, x-pasid-mode and x-flts together.
MIN_VERSION = (10, 0, 0)
_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)\.(\d+)")


@dataclass(frozen=True)
class QemuBinary:
    """A qemu-system-x86_64 binary and its version."""

    path: Path
    version: tuple[int, int, int]
    version_text: str

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))


def qemu_path() -> Path:
    """``$HVTOOLS_QEMU``, else ``qemu-system-x86_64`` on PATH."""
    explicit = os.environ.get("HVTOOLS_QEMU")
    if explicit:
        return Path(explicit)
    found = shutil.which("qemu-system-x86_64")
    if not found:
        raise DependencyError("qemu-system-x86_64 not found: install qemu-system-x86 10.0.2 from "
                              "bookworm-backports (make host), or set HVTOOLS_QEMU")
    return Path(found)


@functools.lru_cache(maxsize=8)
def probe_binary(path: Path) -> QemuBinary:
    """Run ``--version`` and check the binary is new enough. Cached per path."""
    if not path.exists():
        raise DependencyError(f"QEMU binary {path} does not exist")
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True,
                             timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise DependencyError(f"QEMU binary {path} does not run: {err}") from err
    m = _VERSION_RE.search(out)
    if not m:
        raise DependencyError(f"{path} is not QEMU (--version printed {out.strip()[:80]!r})")
    version = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    if version < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise DependencyError(f"QEMU {'.'.join(map(str, version))} at {path} is too old: "
                              f"hvtools needs >= {need} (bookworm-backports has 10.0.2)")
    return QemuBinary(path=path, version=version, version_text=out.splitlines()[0])


def find_qemu() -> QemuBinary:
    """The QEMU binary hvtools will use, checked."""
    return probe_binary(qemu_path())


@functools.lru_cache(maxsize=8)
def device_properties(path: Path, device: str) -> dict[str, str]:
    """``-device DEVICE,help`` as ``{property: "type - description"}``."""
    try:
        out = subprocess.run([str(path), "-device", f"{device},help"], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise DependencyError(f"cannot list {device} properties of {path}: {err}") from err
    props: dict[str, str] = {}
    for line in out.splitlines():
        m = re.match(r"\s+([\w.-]+)=(.*)$", line)
        if m:
            props[m.group(1)] = m.group(2).strip()
    return props
