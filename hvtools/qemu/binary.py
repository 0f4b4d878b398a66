"""Finding the QEMU binary and asking it what it supports.

Two kinds of binary exist on a host: the stock ``qemu-system-x86_64`` (bookworm-backports, or
``$HVTOOLS_QEMU``) and patched builds made by ``hvtools qemu build`` (:mod:`hvtools.qemu.build`),
each installed under ``$HVTOOLS_HOME/qemu/<key>/``::

    bin/qemu-system-x86_64
    manifest.json     base tarball, patches (name, sha256), configure arguments, build time
    build.log         the build's quiet log
    .complete         written last: an install without it is ignored (and replaced)

A VM whose spec names a device only the patched series provides (``hvt-pci``) runs on the
newest complete install whose binary lists that device (:func:`find_qemu`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvtools import paths
from hvtools.errors import DependencyError, HvError

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


def find_qemu(*, devices: Collection[str] = ()) -> QemuBinary:
    """The QEMU binary hvtools will use, checked.

    ``devices`` are QEMU device types a VM needs that only the patched series provides
    (:attr:`hvtools.spec.VmSpec.patched_devices`). Without them: ``$HVTOOLS_QEMU``, else the
    stock binary on PATH. With them: ``$HVTOOLS_QEMU`` if set (it must list them), else the
    install of the current series (qemu-patches/), else -- no series to read -- the newest
    complete patched install that lists them all.
    """
    if not devices:
        return probe_binary(qemu_path())
    wanted = sorted(set(devices))
    explicit = os.environ.get("HVTOOLS_QEMU")
    if explicit:
        qemu = probe_binary(Path(explicit))
        lacking = [d for d in wanted if d not in device_types(qemu.path)]
        if lacking:
            raise DependencyError(f"HVTOOLS_QEMU={explicit} has no {', '.join(lacking)} device: "
                                  "unset HVTOOLS_QEMU to use the patched QEMU "
                                  "(hvtools qemu build)")
        return qemu
    installs = patched_installs()
    key = _series_key()
    if key is not None:
        # This checkout's series, never an older build of another one (it may lack fixes).
        current = [i for i in installs if i.key == key]
        if current and all(d in device_types(current[0].binary) for d in wanted):
            return probe_binary(current[0].binary)
        what = ("lacks " + ", ".join(wanted)) if current else "is not built"
        older = f" ({len(installs)} build(s) of other series exist)" if installs else ""
        raise DependencyError(f"this spec needs the patched QEMU ({', '.join(wanted)}); this "
                              f"checkout's series (key {key}) {what}{older}: run "
                              "`hvtools qemu build`")
    for inst in installs:
        if all(d in device_types(inst.binary) for d in wanted):
            return probe_binary(inst.binary)
    have = f" ({len(installs)} patched build(s) exist, none with it)" if installs else ""
    raise DependencyError(f"this spec needs the patched QEMU ({', '.join(wanted)}){have}: "
                          "run `hvtools qemu build`")


def _series_key() -> str | None:
    """The key of the series hvtools would build (qemu-patches/ of this checkout, or
    ``$HVTOOLS_QEMU_PATCHES``), or None when there is no series to read."""
    from hvtools.qemu.build import current_key  # build imports this module

    try:
        return current_key()
    except (HvError, OSError):
        return None


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


def _stat_key(path: Path) -> tuple[str, int]:
    """Cache key for a probe of ``path``: a rebuilt binary is probed again."""
    try:
        return str(path), path.stat().st_mtime_ns
    except OSError:
        return str(path), 0


def device_types(path: Path) -> frozenset[str]:
    """Every device type ``-device help`` lists (``name "hvt-pci", bus PCI, ...``)."""
    return _device_types(*_stat_key(path))


@functools.lru_cache(maxsize=16)
def _device_types(path: str, _mtime: int) -> frozenset[str]:
    try:
        out = subprocess.run([path, "-device", "help"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise DependencyError(f"cannot list the devices of {path}: {err}") from err
    return frozenset(re.findall(r'^name "([^"]+)"', out, re.MULTILINE))


def accel_available(path: Path, accel: str) -> bool:
    """Whether ``path`` starts a machine-less QEMU under ``-accel ACCEL`` (``-accel help``
    never lists qtest, so the probe starts one and quits through the monitor)."""
    return _accel_available(*_stat_key(path), accel)


@functools.lru_cache(maxsize=16)
def _accel_available(path: str, _mtime: int, accel: str) -> bool:
    try:
        res = subprocess.run([path, "-machine", "none", "-accel", accel, "-nodefaults",
                              "-display", "none", "-monitor", "stdio"], input="quit\n",
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


@dataclass(frozen=True)
class QemuCapabilities:
    """What one binary offers of what hvtools and the patch series care about."""

    path: Path
    version: str
    hvt_pci: bool  # the series' PASID DMA device (qemu-patches/README.md)
    x_nested: bool  # intel-iommu x-nested=on (the series' nested translation)
    qtest: bool  # -accel qtest (Debian's build lacks it)

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "version": self.version, "hvt_pci": self.hvt_pci,
                "x_nested": self.x_nested, "qtest": self.qtest}


def capabilities(path: Path) -> QemuCapabilities:
    """Run ``path`` a few times (version, ``-device help``, ``-device intel-iommu,help``,
    ``-accel qtest``) and report what it supports."""
    qemu = probe_binary(path)
    return QemuCapabilities(path=path, version=qemu.version_str,
                            hvt_pci="hvt-pci" in device_types(path),
                            x_nested="x-nested" in device_properties(path, "intel-iommu"),
                            qtest=accel_available(path, "qtest"))


# -- patched installs (hvtools.qemu.build writes them) ----------------------------------------
#: The file written last into an install: without it the directory is a leftover.
COMPLETE_STAMP = ".complete"
MANIFEST = "manifest.json"
_KEY_RE = re.compile(r"^[0-9a-f]{16}$")


def qemu_root() -> Path:
    """``$HVTOOLS_HOME/qemu``: patched installs, the source tarball, the build venv, logs."""
    return paths.home() / "qemu"


@dataclass(frozen=True)
class PatchedInstall:
    """One complete ``hvtools qemu build`` install."""

    key: str  # short sha256 of the base tarball and the series (hvtools.qemu.build.series_key)
    root: Path
    manifest: dict[str, Any] = field(compare=False, hash=False)

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "qemu-system-x86_64"

    @property
    def built_at(self) -> float:
        return float(self.manifest.get("built_at", 0.0))

    @property
    def patches(self) -> list[str]:
        return [str(p["name"]) for p in self.manifest.get("patches", [])]

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "root": str(self.root), "binary": str(self.binary),
                "built_at": self.built_at, "patches": self.patches,
                "base": self.manifest.get("base", {}),
                "build_seconds": self.manifest.get("build_seconds")}


def read_install(root: Path) -> PatchedInstall | None:
    """The install at ``root`` if it is complete (stamp, manifest, binary), else None."""
    if not _KEY_RE.match(root.name) or not (root / COMPLETE_STAMP).is_file():
        return None
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads((root / MANIFEST).read_text())
        inst = PatchedInstall(key=root.name, root=root, manifest=manifest)
        if isinstance(manifest, dict) and os.access(inst.binary, os.X_OK):
            return inst
    return None


def patched_installs() -> list[PatchedInstall]:
    """Every complete patched install, newest build first."""
    root = qemu_root()
    if not root.is_dir():
        return []
    found = [inst for d in root.iterdir() if (inst := read_install(d)) is not None]
    return sorted(found, key=lambda i: (i.built_at, i.key), reverse=True)
