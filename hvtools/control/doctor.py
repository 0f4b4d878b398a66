"""``hvtools doctor``: what this host can do, each verdict with the reason for it."""

from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hvtools.control.accel import probe_kvm
from hvtools.errors import HvError
from hvtools.qemu.binary import capabilities, device_properties, find_qemu, patched_installs
from hvtools.qemu.qmp import qmp_call

#: intel-iommu properties hvtools drives (QEMU 10.0 hw/i386/intel_iommu.c).
IOMMU_PROPS = ("x-scalable-mode", "x-pasid-mode", "x-flts", "caching-mode", "intremap",
               "device-iotlb", "aw-bits")


@dataclass(frozen=True)
class Check:
    """One verdict: ``ok`` is True/False, or None for information only."""

    name: str
    ok: bool | None
    summary: str
    reason: str
    data: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "summary": self.summary,
                "reason": self.reason, "data": self.data or {}}


def _check_qemu() -> Check:
    qemu = find_qemu()
    props = device_properties(qemu.path, "intel-iommu")
    have = {p: props.get(p, "") for p in IOMMU_PROPS}
    missing = [p for p, v in have.items() if not v]
    return Check("qemu", not missing, f"QEMU {qemu.version_str} at {qemu.path}",
                 ("intel-iommu has " + ", ".join(IOMMU_PROPS)) if not missing else
                 f"intel-iommu lacks {', '.join(missing)}",
                 {"version": qemu.version_str, "path": str(qemu.path),
                  "intel_iommu_properties": props})


def _check_qemu_patched() -> Check:
    """The patched QEMU (``hvtools qemu build``): built for the current series or not, and
    what its binary offers (hvt-pci, intel-iommu x-nested, -accel qtest)."""
    from hvtools.qemu.build import current_key

    installs = patched_installs()
    if not installs:
        return Check("qemu-patched", None, "not built",
                     "specs with hvt-pci need it: hvtools qemu build (make test builds it)")
    key = current_key()
    current = next((i for i in installs if i.key == key), None)
    inst = current or installs[0]
    caps = capabilities(inst.binary)
    offers = ", ".join(f"{name}={'yes' if have else 'no'}" for name, have in (
        ("hvt-pci", caps.hvt_pci), ("x-nested", caps.x_nested), ("qtest", caps.qtest)))
    return Check("qemu-patched", True if current else None,
                 f"QEMU {caps.version} {inst.key}, {len(inst.patches)} patch(es): {offers}",
                 f"built from the current series, at {inst.binary}" if current else
                 f"the current series ({key}) is not built; VMs use {inst.key}: "
                 "hvtools qemu build",
                 {**caps.to_json(), **inst.to_json(), "current_key": key,
                  "installs": [i.key for i in installs]})


def _check_seabios() -> Check:
    try:
        ver = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "seabios"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        return Check("seabios", None, "unknown", f"dpkg-query failed: {err}")
    ok = ver.startswith("1.16.3")
    return Check("seabios", ok, ver or "not installed",
                 "1.16.3 from bookworm-backports" if ok else
                 "bookworm's 1.16.2 stalls every boot ~30 s: install 1.16.3 from backports")


def _check_kvm() -> Check:
    verdict = probe_kvm()
    return Check("kvm", verdict.usable,
                 "KVM runs stock guests" if verdict.usable else "KVM unusable: TCG will be used",
                 verdict.reason + (" (cached)" if verdict.cached else ""), verdict.to_json())


def _check_tcg_svm() -> Check:
    """Ask QEMU itself what TCG's ``-cpu max`` offers (query-cpu-model-expansion)."""
    qemu = find_qemu()
    with tempfile.TemporaryDirectory(prefix="hvtools-doctor-") as tmp:
        sock = Path(tmp) / "qmp.sock"
        proc = subprocess.Popen(
            [str(qemu.path), "-machine", "none", "-accel", "tcg", "-nodefaults",
             "-display", "none", "-S", "-qmp", f"unix:{sock},server=on,wait=off"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 15
            while not sock.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            out = qmp_call(sock, "query-cpu-model-expansion",
                           {"type": "full", "model": {"name": "max"}})
        finally:
            proc.kill()
            proc.wait()
    props = out["model"]["props"]
    svm, npt = bool(props.get("svm")), bool(props.get("npt"))
    vmx = bool(props.get("vmx"))
    return Check("tcg-nested", svm and npt, f"TCG -cpu max: svm={svm} npt={npt} vmx={vmx}",
                 "nested KVM (kvm_amd with NPT) can run inside a TCG guest" if svm and npt else
                 "TCG's max CPU lacks svm/npt: nested-VM suites cannot run",
                 {"svm": svm, "npt": npt, "vmx": vmx})


def _check_libvirt() -> Check:
    from hvtools.libvirt.daemon import libvirtd_status

    st = libvirtd_status()
    ok = bool(st.get("reachable") or st.get("startable"))
    summary = ("libvirtd reachable" if st.get("reachable") else
               "libvirtd startable" if st.get("startable") else "libvirtd unavailable")
    return Check("libvirt", ok, summary, str(st.get("reason", "")), st)


def _check_rdma() -> Check:
    ib = Path("/sys/class/infiniband")
    devs = sorted(p.name for p in ib.iterdir()) if ib.exists() else []
    listed = f": {', '.join(devs)}" if devs else ""
    return Check("rdma", None, f"{len(devs)} RDMA device(s){listed}",
                 "no kernel RDMA devices (no rxe/siw): one-sided transport uses libfabric "
                 "tcp/shm" if not devs else "verbs transport possible", {"devices": devs})


def _check_libfabric() -> Check:
    lib = ctypes.util.find_library("fabric")
    fi_info = shutil.which("fi_info")
    if fi_info:
        out = subprocess.run([fi_info, "-l"], capture_output=True, text=True, timeout=20).stdout
        provs = sorted({ln.strip().rstrip(":") for ln in out.splitlines()
                        if ln.strip().endswith(":")})
        return Check("libfabric", bool(provs), f"providers: {', '.join(provs) or 'none'}",
                     f"fi_info -l via {fi_info}", {"providers": provs, "library": lib})
    return Check("libfabric", None, "library present" if lib else "not installed",
                 "fi_info (libfabric-bin) not installed; providers unknown" if lib else
                 "install libfabric1 libfabric-dev (needed by the migration issue)",
                 {"library": lib})


def _check_migration() -> Check:
    """Live migration with the guest's intel-iommu active.

    QEMU 7.2 failed on the destination unless the guest booted with ``iommu=pt``; 10.0.2
    migrates such guests (scalable mode, PASID, first-stage) both ways, pre- and post-copy:
    tests/integration/test_migration.py checks the guest's DMA (its agent sits behind the
    IOMMU) and CAP/ECAP after each migration. Older QEMUs are reported as a constraint.
    """
    qemu = find_qemu()
    ok = qemu.version >= (10, 0)
    return Check("migration", ok,
                 "live migration with an active intel-iommu: supported" if ok else
                 f"QEMU {qemu.version_str}: live migration with an active intel-iommu "
                 "is not supported",
                 "verified on QEMU 10.0.2 (pre- and post-copy, scalable mode)" if ok else
                 "guests must boot with iommu=pt to migrate on QEMU < 10.0; use 10.0.2",
                 {"qemu": qemu.version_str})


def _check_netns() -> Check:
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or not unshare:
        return Check("netns", False, "cannot test", "needs root and util-linux unshare")
    r = subprocess.run([unshare, "--net", "--", "true"], capture_output=True, text=True,
                       timeout=10)
    ok = r.returncode == 0
    return Check("netns", ok, "network namespaces work" if ok else "unshare --net failed",
                 r.stderr.strip() or "created and left a private network namespace")


def _check_image() -> Check:
    from hvtools.guest.image import find_image

    img = find_image()
    return Check("image", True, f"guest image {img.key} ({img.kernel_version})",
                 str(img.root), img.to_json())


CHECKS: tuple[Callable[[], Check], ...] = (
    _check_qemu, _check_qemu_patched, _check_seabios, _check_kvm, _check_tcg_svm,
    _check_libvirt, _check_rdma, _check_libfabric, _check_migration, _check_netns, _check_image)


def run_checks() -> list[Check]:
    """Every check; one that raises becomes a failed verdict carrying the error."""
    results = []
    for fn in CHECKS:
        name = fn.__name__.removeprefix("_check_").replace("_", "-")
        try:
            results.append(fn())
        except HvError as err:
            results.append(Check(name, False, "error", str(err)))
        except (OSError, subprocess.SubprocessError, KeyError) as err:
            results.append(Check(name, False, "error", f"{type(err).__name__}: {err}"))
    return results
