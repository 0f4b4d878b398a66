"""Choosing the accelerator by a real probe.

``/dev/kvm`` existing proves nothing: on these hosts it is a software-nesting KVM that cannot run
stock guests. ``auto`` picks KVM only if the guest image's kernel, booted with ``hvtools.probe=1``,
reaches its init and prints ``HVTOOLS-PROBE-OK`` under ``-accel kvm``. The verdict is cached per
(QEMU version, host kernel, guest image) under ``$HVTOOLS_HOME/cache``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hvtools import paths
from hvtools.errors import DependencyError, ImageError
from hvtools.qemu.binary import QemuBinary, find_qemu
from hvtools.spec import Accel

PROBE_MARKER = "HVTOOLS-PROBE-OK"
PROBE_TIMEOUT_S = 12.0  # TCG reaches init in ~2.2 s here; a working KVM is faster


@dataclass(frozen=True)
class KvmVerdict:
    """Whether KVM runs a stock guest here, and why we believe so."""

    usable: bool
    reason: str
    cached: bool = False

    def to_json(self) -> dict[str, object]:
        return {"usable": self.usable, "reason": self.reason, "cached": self.cached}


def _cache_file(qemu: QemuBinary, image_key: str) -> Path:
    return paths.cache_dir() / f"kvm-probe-{qemu.version_str}-{platform.release()}-{image_key}.json"


def probe_kvm(qemu: QemuBinary | None = None, *, use_cache: bool = True,
              progress: Callable[[str], None] | None = None) -> KvmVerdict:
    """Boot the guest image's kernel under ``-accel kvm`` and see whether its init runs."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return KvmVerdict(False, "/dev/kvm is missing or not accessible")
    from hvtools.guest.image import find_image  # the probe needs the image, nothing else does

    qemu = qemu or find_qemu()
    try:
        image = find_image()
    except ImageError as err:
        return KvmVerdict(False, f"cannot probe without a guest image ({err})")
    cache = _cache_file(qemu, image.key)
    if use_cache and cache.exists():
        data = json.loads(cache.read_text())
        return KvmVerdict(bool(data["usable"]), str(data["reason"]), cached=True)
    if progress:
        progress(f"probing whether KVM runs a guest here (up to {PROBE_TIMEOUT_S:.0f}s, "
                 "cached afterwards)")
    with tempfile.TemporaryDirectory(prefix="hvtools-probe-") as tmp:
        log = Path(tmp) / "console.log"
        argv = [str(qemu.path), "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "256",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(image.kernel), "-initrd", str(image.initrd),
                "-append", "console=ttyS0 panic=-1 hvtools.probe=1",
                "-serial", f"file:{log}"]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
            code: int | None = proc.returncode
            err_text = proc.stderr.strip().splitlines()
        except subprocess.TimeoutExpired:
            code, err_text = None, ["timed out"]
        console = log.read_text(errors="replace") if log.exists() else ""
    took = time.monotonic() - t0
    if PROBE_MARKER in console:
        verdict = KvmVerdict(True, f"probe guest reached init under KVM in {took:.1f}s")
    else:
        last = err_text[-1] if err_text else f"exit {code}, no {PROBE_MARKER} on the console"
        verdict = KvmVerdict(False, f"probe guest did not run under KVM: {last[:160]}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"usable": verdict.usable, "reason": verdict.reason}))
    return verdict


def resolve_accel(requested: Accel, *, qemu: QemuBinary | None = None,
                  progress: Callable[[str], None] | None = None) -> Accel:
    """``auto`` → KVM if the probe passes, else TCG. An explicit ``kvm`` must pass the probe."""
    if requested is Accel.TCG:
        return Accel.TCG
    verdict = probe_kvm(qemu, progress=progress)
    if verdict.usable:
        return Accel.KVM
    if requested is Accel.KVM:
        raise DependencyError(f"accel kvm requested but KVM cannot run guests here: "
                              f"{verdict.reason}")
    return Accel.TCG
