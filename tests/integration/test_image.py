"""The guest image and its agent on real QEMU 10.0.2 under TCG.

Two machine variants boot the same image: ``plain`` (q35, virtio-serial) and ``scalable-iommu``
(intel-iommu in scalable mode with PASID and first-stage tables, interrupt remapping, the
virtio-serial device behind the vIOMMU). QEMU is started directly here, not through a driver, so
these tests pin down the image contract the drivers build on.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hvtools import paths
from hvtools.errors import DependencyError, HvError, ImageError
from hvtools.guest.agent import AgentClient, wait_for_agent
from hvtools.guest.image import GuestImage, build_image, find_image, resolve_kernel_package
from hvtools.guest.protocol import (
    MAGIC,
    MAX_PAYLOAD,
    ExecRequest,
    Frame,
    FrameDecoder,
    FrameType,
    decode_error,
    encode_exec,
    encode_frame,
)

pytestmark = pytest.mark.integration

QEMU = "qemu-system-x86_64"
AGENT_PORT = "org.hvtools.agent.0"


@dataclass(frozen=True)
class Variant:
    name: str
    machine: str
    devices: tuple[str, ...] = ()
    vser_opts: str = ""
    append: str = ""


PLAIN = Variant("plain", "q35")
SCALABLE = Variant(
    "scalable-iommu",
    "q35,kernel-irqchip=split",
    ("-device", "intel-iommu,intremap=on,x-scalable-mode=on,x-pasid-mode=on,x-flts=on"),
    ",disable-legacy=on,iommu_platform=on",
    "intel_iommu=on,sm_on",
)
VARIANTS = [pytest.param(PLAIN, id="plain"), pytest.param(SCALABLE, id="scalable-iommu")]


@dataclass
class Guest:
    """One QEMU process booting the image, with its console log and agent socket."""

    image: GuestImage
    variant: Variant
    workdir: Path
    probe: bool = False
    qmp: bool = False
    proc: subprocess.Popen[bytes] | None = None
    client: AgentClient | None = None
    started: float = 0.0
    ready_s: float = 0.0
    extra_append: list[str] = field(default_factory=list)

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    @property
    def agent_sock(self) -> Path:
        return self.workdir / "agent.sock"

    @property
    def qmp_sock(self) -> Path:
        return self.workdir / "qmp.sock"

    @property
    def append(self) -> str:
        parts = ["console=ttyS0", self.variant.append, *self.extra_append]
        if self.probe:
            parts.append("hvtools.probe=1")
        return " ".join(p for p in parts if p)

    def command(self) -> list[str]:
        cmd = [
            QEMU, "-accel", "tcg", "-cpu", "max", "-machine", self.variant.machine,
            "-m", "512", "-smp", "2",
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            "-append", self.append,
            "-serial", f"file:{self.console}", "-display", "none", "-monitor", "none",
            "-no-reboot", *self.variant.devices,
            "-device", f"virtio-serial-pci,id=vser0{self.variant.vser_opts}",
            "-chardev", f"socket,id=agent0,path={self.agent_sock},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT}",
        ]
        if self.qmp:
            cmd += ["-qmp", f"unix:{self.qmp_sock},server=on,wait=off"]
        return cmd

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / "qemu.stderr").open("wb") as err:
            self.started = time.monotonic()
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connect(self, timeout: float = 60.0) -> AgentClient:
        self.client = wait_for_agent(self.agent_sock, timeout=timeout, alive=self.alive)
        return self.client

    def boot(self) -> AgentClient:
        self.start()
        client = self.connect()
        self.ready_s = time.monotonic() - self.started
        return client

    def wait_exit(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def dump(self) -> None:
        """Print the console and QEMU's stderr (pytest shows it when the test failed)."""
        print(f"--- console of {self.variant.name} ({self.append}) ---")
        print(self.console_text()[-6000:])
        stderr = self.workdir / "qemu.stderr"
        if stderr.exists() and stderr.stat().st_size:
            print("--- qemu stderr ---\n" + stderr.read_text(errors="replace")[-2000:])

    def kill(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return build_image()


@pytest.fixture(scope="module", params=VARIANTS)
def booted(
    request: pytest.FixtureRequest,
    guest_image: GuestImage,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Guest]:
    variant: Variant = request.param
    guest = Guest(guest_image, variant, tmp_path_factory.mktemp(variant.name))
    try:
        guest.boot()
        yield guest
    finally:
        guest.kill()


@pytest.fixture
def vm(booted: Guest) -> Iterator[Guest]:
    """The module's booted guest, connected; its console is printed when the test fails."""
    if booted.client is None or not booted.client.connected:
        booted.connect(timeout=30)
    yield booted
    booted.dump()


@pytest.fixture
def fresh(request: pytest.FixtureRequest, guest_image: GuestImage, tmp_path: Path) -> Iterator[
    Guest
]:
    """A guest of its own for tests that end it; ``request.param`` is the variant."""
    guest = Guest(guest_image, request.param, tmp_path)
    try:
        yield guest
    finally:
        guest.dump()
        guest.kill()


def run(vm: Guest, *argv: str, timeout: float = 60.0, stdin: bytes = b"") -> str:
    assert vm.client is not None
    res = vm.client.exec(list(argv), timeout=timeout, stdin=stdin)
    assert res.status == 0, res
    return res.stdout.decode()


# -- the image ----------------------------------------------------------------------------------


def read_newc(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, data, rdev) of an uncompressed newc archive (an independent reader)."""
    out: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    off = 0
    while True:
        assert data[off:off + 6] == b"070701", f"bad cpio magic at {off}"
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = f[1], f[6], (f[9], f[10]), f[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off = (off + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, data[off: off + size], rdev)
        off = (off + size + 3) & ~3


def test_build_is_cached_and_findable(guest_image: GuestImage) -> None:
    before = guest_image.initrd.stat()
    again = build_image()
    assert again == guest_image
    after = guest_image.initrd.stat()  # served from the cache: the very same file, untouched
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert find_image() == guest_image
    assert os.readlink(guest_image.root.parent / "current") == guest_image.key

    manifest = json.loads((guest_image.root / "manifest.json").read_text())
    assert manifest["key"] == guest_image.key
    name, _, version = guest_image.kernel_package.partition("=")
    assert name == f"linux-image-{guest_image.kernel_version}" and version
    assert "bpo" not in version  # bookworm's kernel, not the backports one
    deb = paths.cache_dir() / "debs" / manifest["inputs"]["deb"]
    assert manifest["inputs"]["deb_sha256"] == hashlib.sha256(deb.read_bytes()).hexdigest()
    assert guest_image.modules == guest_image.root / "lib/modules" / guest_image.kernel_version
    assert (guest_image.modules / "modules.dep").is_file()
    assert list(guest_image.modules.rglob("kvm-amd.ko*"))
    assert list(guest_image.modules.rglob("vfio-pci.ko*"))
    assert guest_image.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # x86 boot protocol header
    assert set(guest_image.helpers) == {"hvagent", "hvpid1", "hvblkbench", "hvtdma"}
    for path in guest_image.helpers.values():
        elf = path.read_bytes()
        assert elf[:4] == b"\x7fELF"
        assert b"/lib64/ld-linux-x86-64.so.2" not in elf, f"{path} is not static"
    print(json.dumps(guest_image.to_json(), indent=1))


def test_initramfs_contents(guest_image: GuestImage) -> None:
    files = read_newc(guest_image.initrd.read_bytes())
    kver = guest_image.kernel_version
    mode, init, _ = files["init"]
    assert mode & 0o170000 == 0o100000 and mode & 0o111
    assert init.startswith(b"#!/bin/sh")
    assert files["dev/console"][0] & 0o170000 == 0o020000 and files["dev/console"][2] == (5, 1)
    assert files["bin/sh"][1] == b"/bin/busybox"
    assert files["sbin/modprobe"][1] == b"/bin/busybox"
    for helper, path in guest_image.helpers.items():
        assert files[f"bin/{helper}"][1] == path.read_bytes()
    dep = files[f"lib/modules/{kver}/modules.dep"][1].decode()
    deps = {line.split(":")[0]: line.split(":")[1].split() for line in dep.splitlines()}
    for mod in ("virtio_console.ko", "kvm-amd.ko", "vfio-pci.ko", "vfio_iommu_type1.ko"):
        assert any(p.endswith("/" + mod) for p in deps), mod
    for mod, needs in deps.items():  # every dependency is shipped, uncompressed
        for rel in [mod, *needs]:
            assert f"lib/modules/{kver}/{rel}" in files, rel
            assert rel.endswith(".ko")


# -- a booted guest -----------------------------------------------------------------------------


def test_agent_identifies_the_guest(vm: Guest, guest_image: GuestImage,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The agent's ping names the image's kernel. Boot time is printed, not asserted: speed
    is measured by bench/boot_time.py against its anchor, not by a timed test."""
    assert vm.client is not None
    info = vm.client.ping()
    with capsys.disabled():
        print(f"\n[{vm.variant.name}] boot-to-agent-ready {vm.ready_s:.2f} s "
              f"(guest uptime at first ping {info['uptime_s']} s)")
    assert info["release"] == guest_image.kernel_version
    assert info["hostname"] == "hvguest"
    assert "HVTOOLS-READY" in vm.console_text().splitlines()


def test_exec_cmdline(vm: Guest) -> None:
    assert run(vm, "cat", "/proc/cmdline").strip() == vm.append


def test_exec_streams_and_status(vm: Guest) -> None:
    assert vm.client is not None
    res = vm.client.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (res.status, res.stdout, res.stderr, res.timed_out) == (3, b"out\n", b"err\n", False)
    killed = vm.client.exec(["sh", "-c", "kill -TERM $$"])
    assert killed.status == 128 + 15 and not killed.timed_out


def test_exec_missing_command(vm: Guest) -> None:
    assert vm.client is not None
    res = vm.client.exec(["no-such-command", "x"])
    assert res.status == 127
    assert b"no-such-command: command not found" in res.stderr
    assert vm.client.exec(["/proc/cmdline"]).status == 126  # exists, not executable


def test_exec_timeout(vm: Guest) -> None:
    assert vm.client is not None
    res = vm.client.exec(["sh", "-c", "echo started; sleep 30"], timeout=1.0)
    assert res.timed_out and res.status == 128 + 9
    assert res.stdout == b"started\n"
    assert 1.0 <= res.duration_s < 10
    assert "sleep 30" not in run(vm, "ps", "-o", "args")


def test_exec_stdin_and_bulk_output(vm: Guest) -> None:
    data = os.urandom(700_000)
    assert run(vm, "md5sum", stdin=data).split()[0] == hashlib.md5(data).hexdigest()
    out = run(vm, "sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' x")
    assert out == "x" * 3_000_000


def test_reconnect(vm: Guest) -> None:
    assert vm.client is not None
    vm.client.close()
    # a connection that goes away mid-command (and stays away long enough for the agent to
    # see the hang-up), then one that dies mid-frame and is replaced at once
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(vm.agent_sock))
        raw.sendall(encode_frame(FrameType.EXEC, 99,
                                 encode_exec(ExecRequest(("sleep", "1234"), b"", 0))))
        time.sleep(0.5)
    time.sleep(0.5)
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(vm.agent_sock))
        raw.sendall(encode_frame(FrameType.EXEC, 100,
                                 encode_exec(ExecRequest(("echo", "x" * 100)))[:50]))
    client = vm.connect(timeout=30)
    assert run(vm, "echo", "again") == "again\n"
    # the agent killed the command of the connection that went away
    assert "sleep 1234" not in run(vm, "ps", "-o", "args")
    client.close()
    with vm.connect(timeout=30) as third:
        assert third.exec(["true"]).status == 0


def test_agent_idles_while_disconnected(vm: Guest) -> None:
    assert vm.client is not None
    pid = vm.client.ping()["pid"]

    def cpu_ticks() -> int:
        fields = run(vm, "cat", f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime

    before = cpu_ticks()
    vm.client.close()
    time.sleep(3)
    vm.connect(timeout=30)
    used = cpu_ticks() - before
    assert used < 50, f"agent used {used} ticks in 3 s while the host was away"


def test_agent_rejects_oversized_and_unexpected_frames(vm: Guest) -> None:
    assert vm.client is not None
    vm.client.close()
    time.sleep(0.3)
    big = MAX_PAYLOAD + 1
    head = MAGIC + bytes([1, FrameType.EXEC]) + b"\0\0" + struct.pack("<II", 5, big)
    stream = (
        head + struct.pack("<I", zlib.crc32(head)) + b"\xff" * big
        + encode_frame(FrameType.PONG, 6)  # a guest-to-host type
        + encode_frame(FrameType.PING, 7)
    )
    replies: dict[int, Frame] = {}
    dec = FrameDecoder()
    with socket.socket(socket.AF_UNIX) as raw:
        raw.settimeout(30)
        raw.connect(str(vm.agent_sock))
        raw.sendall(stream)
        while 7 not in replies:
            for item in dec.feed(raw.recv(65536)):
                assert isinstance(item, Frame)
                replies[item.req_id] = item
    too_big = decode_error(replies[5].payload)
    assert too_big.status == -1 and f"exceeds the limit of {MAX_PAYLOAD}" in too_big.message
    unexpected = decode_error(replies[6].payload)
    assert unexpected.status == -1 and "unexpected frame type 2" in unexpected.message
    assert replies[7].type is FrameType.PONG
    time.sleep(0.3)
    vm.connect(timeout=30)


def test_agent_is_respawned(vm: Guest) -> None:
    assert vm.client is not None
    old_pid = vm.client.ping()["pid"]
    # A detached killer, so the agent's own hang-up handling cannot cancel it: the agent
    # answers this exec, then dies a second later.
    run(vm, "sh", "-c", 'a=$PPID; setsid sh -c "sleep 1; kill -KILL $a" '
        "</dev/null >/dev/null 2>&1 &")
    vm.client.close()
    deadline = time.monotonic() + 60
    pid = old_pid
    while pid == old_pid and time.monotonic() < deadline:
        try:  # a ping may reach the agent just as it dies: ask again
            client = vm.connect(timeout=30)
            pid = client.ping()["pid"]
        except HvError:
            pass
        if pid == old_pid:
            if vm.client is not None:
                vm.client.close()
            time.sleep(0.5)
    assert pid != old_pid, "hvpid1 did not start a new agent"
    assert run(vm, "echo", "back") == "back\n"


def test_modules(vm: Guest, guest_image: GuestImage) -> None:
    manifest = json.loads((guest_image.root / "manifest.json").read_text())
    loaded = {line.split()[0] for line in run(vm, "cat", "/proc/modules").splitlines()}
    for mod, kind in manifest["boot_modules"].items():
        assert (mod in loaded) == (kind == "module"), (mod, kind)
    run(vm, "modprobe", "-a", "kvm_amd", "vfio_pci", "vfio_iommu_type1")
    loaded = {line.split()[0] for line in run(vm, "cat", "/proc/modules").splitlines()}
    assert {"kvm", "kvm_amd", "vfio", "vfio_pci", "vfio_iommu_type1"} <= loaded
    assert run(vm, "sh", "-c", "test -c /dev/kvm && cat /sys/module/kvm_amd/parameters/npt") in (
        "1\n", "Y\n"
    )


DMAR_LINE = re.compile(r"DMAR: dmar0: reg_base_addr (\w+) ver (\S+) cap (\w+) ecap (\w+)")


def test_dmar(vm: Guest, capsys: pytest.CaptureFixture[str]) -> None:
    dmesg = run(vm, "dmesg")
    iommus = run(vm, "ls", "/sys/class/iommu").split()
    if vm.variant is PLAIN:
        assert iommus == []
        assert "DMAR: IOMMU enabled" not in dmesg
        return
    assert iommus == ["dmar0"]
    assert "DMAR: IOMMU enabled" in dmesg
    assert "DMAR-IR: Enabled IRQ remapping" in dmesg
    m = DMAR_LINE.search(dmesg)
    assert m is not None, "no reg_base_addr line in dmesg"
    cap = run(vm, "cat", "/sys/class/iommu/dmar0/intel-iommu/cap").strip()
    ecap = run(vm, "cat", "/sys/class/iommu/dmar0/intel-iommu/ecap").strip()
    assert int(cap, 16) == int(m.group(3), 16) and int(ecap, 16) == int(m.group(4), 16)
    assert int(ecap, 16) >> 43 & 1, "ECAP.SMTS (scalable mode) is clear"
    assert int(ecap, 16) >> 40 & 1, "ECAP.PASID is clear"
    on_console = DMAR_LINE.search(vm.console_text()) is not None
    with capsys.disabled():
        print(f"\n[{vm.variant.name}] {m.group(0)}; cap={cap} ecap={ecap}; "
              f"reg_base_addr line on the console at default loglevel: {on_console}")
        for line in dmesg.splitlines():
            if "DMAR" in line:
                print("   " + line)


# -- guests that end ----------------------------------------------------------------------------


@pytest.mark.parametrize("fresh", VARIANTS, indirect=True)
def test_poweroff_via_agent(fresh: Guest) -> None:
    client = fresh.boot()
    client.poweroff(timeout=30)
    assert fresh.wait_exit(30) == 0
    assert "reboot: Power down" in fresh.console_text()


@pytest.mark.parametrize("fresh", [pytest.param(PLAIN, id="plain")], indirect=True)
def test_acpi_powerdown(fresh: Guest) -> None:
    fresh.qmp = True
    fresh.boot()
    with socket.socket(socket.AF_UNIX) as qmp:
        qmp.connect(str(fresh.qmp_sock))
        rfile = qmp.makefile("rb")
        assert b"QMP" in rfile.readline()
        for cmd in ("qmp_capabilities", "system_powerdown"):
            qmp.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
            while b'"return"' not in (line := rfile.readline()):
                assert b'"error"' not in line, line
        assert fresh.wait_exit(30) == 0


@pytest.mark.parametrize("fresh", VARIANTS, indirect=True)
def test_probe(fresh: Guest) -> None:
    fresh.probe = True
    fresh.start()
    assert fresh.wait_exit(60) == 0
    lines = fresh.console_text().splitlines()
    assert "HVTOOLS-PROBE-OK" in lines
    assert "HVTOOLS-READY" not in lines


# -- failures -----------------------------------------------------------------------------------


def test_missing_tool_names_the_debian_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HVTOOLS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(DependencyError, match="install the Debian package gcc"):
        build_image()


def test_failed_build_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HVTOOLS_HOME", str(tmp_path))
    package, version = resolve_kernel_package()
    debs = paths.cache_dir() / "debs"
    debs.mkdir(parents=True)
    (debs / f"{package}_{version.replace(':', '%3a')}_amd64.deb").write_bytes(b"not a deb")
    with pytest.raises(ImageError, match=r"dpkg-deb -x failed \(exit 2\): dpkg-deb: error"):
        build_image()
    assert sorted(p.name for p in paths.images_dir().iterdir()) == [".build.lock"]
    with pytest.raises(ImageError, match="run `hvtools image build`"):
        find_image()


def test_kernel_package_override(monkeypatch: pytest.MonkeyPatch) -> None:
    default = resolve_kernel_package()
    assert default[0].endswith("-cloud-amd64") and "bpo" not in default[1]
    monkeypatch.setenv("HVTOOLS_KERNEL_PACKAGE", f"{default[0]}={default[1]}")
    assert resolve_kernel_package() == default
    monkeypatch.setenv("HVTOOLS_KERNEL_PACKAGE", default[0])
    assert resolve_kernel_package()[0] == default[0]
    monkeypatch.setenv("HVTOOLS_KERNEL_PACKAGE", "bash")
    with pytest.raises(ImageError, match="not a linux-image package"):
        resolve_kernel_package()
