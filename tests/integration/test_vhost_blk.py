"""The vhost-user-blk backend (hvtools.vhost.blk) against real QEMU and a scripted front-end.

Part 1 boots a real TCG guest whose stock virtio_blk driver talks to the backend through QEMU's
vhost-user-blk-pci (QEMU is launched here from render_argv plus the -chardev/-device pair until
the spec wiring is used by these tests). Part 2 plays QEMU's part itself over the socket with a
memfd as guest RAM, to drive cases a well-behaved QEMU never sends: malformed messages, looping
and out-of-memory descriptor chains, oversized requests, and the shared vhost log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hvtools.guest.agent import AgentClient, wait_for_agent
from hvtools.guest.image import GuestImage
from hvtools.qemu.cmdline import render_argv
from hvtools.spec import Accel, LaunchPlan, VmSpec
from hvtools.vhost import protocol as P
from hvtools.vhost.virtq import (
    BLK_REQ_HDR,
    DESC,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)

DISK_SIZE = 16 << 20


class Backend:
    def __init__(self, d: Path, disk: Path, *extra: str) -> None:
        self.sock, self.ctl, self.log = d / "vub.sock", d / "vub.ctl", d / "vub.log"
        for p in (self.sock, self.ctl):
            p.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hvtools.vhost.blk", "--socket", str(self.sock), "--disk",
             str(disk), "--control", str(self.ctl), *extra],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))  # noqa: SIM115
        deadline = time.monotonic() + 20
        while not (self.sock.exists() and self.ctl.exists()):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "backend did not start"
            time.sleep(0.05)

    def call(self, method: str, **params: Any) -> Any:
        with socket.socket(socket.AF_UNIX) as c:
            c.settimeout(10)
            c.connect(str(self.ctl))
            c.sendall(json.dumps({"id": 7, "method": method, "params": params}).encode() + b"\n")
            f = c.makefile("rb")
            reply = json.loads(f.readline())
        assert reply["id"] == 7, reply
        assert "error" not in reply, reply
        return reply["result"]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


def _vhost_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(path))
    return s


def _request(s: socket.socket, req: int, body: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> None:
    data = P.encode_request(req, body, need_reply=need_reply)
    if fds:
        socket.send_fds(s, [data], fds)
    else:
        s.sendall(data)


def _reply(s: socket.socket) -> tuple[int, bytes]:
    hdr = s.recv(P.HEADER_SIZE, socket.MSG_WAITALL)
    assert len(hdr) == P.HEADER_SIZE, f"no reply header ({hdr!r})"
    req, flags, size = P.HEADER.unpack(hdr)
    assert flags & P.FLAG_REPLY
    return req, s.recv(size, socket.MSG_WAITALL) if size else b""


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(64) == b""
    except (ConnectionResetError, TimeoutError):
        return False


def _features_answered(path: Path) -> int:
    """A fresh connection gets GET_FEATURES answered (the backend is serving)."""
    with _vhost_connect(path) as s:
        _request(s, P.Request.GET_FEATURES)
        req, body = _reply(s)
        assert req == P.Request.GET_FEATURES
        return int(struct.unpack("<Q", body)[0])


# ---------------------------------------------------------------------------------------------
# Part 1: real QEMU, stock Linux virtio_blk
# ---------------------------------------------------------------------------------------------
@dataclass
class Rig:
    dir: Path
    disk: Path
    backend: Backend
    qemu: subprocess.Popen[bytes]
    agent: AgentClient

    def sh(self, cmd: str, timeout: float = 120) -> str:
        r = self.agent.exec(["sh", "-c", cmd], timeout=timeout)
        assert r.status == 0, (cmd, r)
        return r.stdout.decode()


@pytest.fixture(scope="module")
def rig(image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    d = Path(f"/tmp/hvt-vub-{os.getpid()}")  # short: unix socket paths are limited to 108 bytes
    d.mkdir(exist_ok=True)
    disk = d / "disk.img"
    disk.write_bytes(os.urandom(DISK_SIZE))
    backend = Backend(d, disk)
    spec = VmSpec(name=f"vub{os.getpid() % 100000}", memory=512 << 20, iommu=None)
    plan = LaunchPlan(accel=Accel.TCG, kernel=image.kernel, initrd=image.initrd,
                      ram_path=d / "ram", agent_socket=d / "agent.sock",
                      console_log=d / "console.log")
    argv = [*render_argv(spec, plan),
            "-chardev", f"socket,id=vub0,path={backend.sock},reconnect-ms=1000",
            "-device", "vhost-user-blk-pci,chardev=vub0,num-queues=1,id=vubdev0"]
    qlog = open(d / "qemu.log", "wb")  # noqa: SIM115
    qemu = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog)
    r: Rig | None = None
    try:
        agent = wait_for_agent(plan.agent_socket, timeout=180, alive=lambda: qemu.poll() is None)
        r = Rig(d, disk, backend, qemu, agent)
        r.sh("modprobe virtio_blk; for i in $(seq 100); do [ -b /dev/vda ] && break; "
             "sleep 0.1; done; [ -b /dev/vda ]")
        yield r
    except BaseException:
        for f in ("console.log", "qemu.log", "vub.log"):
            with contextlib.suppress(OSError):
                sys.stderr.write(f"--- {f} ---\n" + (d / f).read_text(errors="replace")[-3000:])
        raise
    finally:
        qemu.kill()
        qemu.wait()
        backend.stop()
        if r is not None:  # a test may have replaced the backend (reconnect)
            r.backend.stop()
        qlog.close()
        shutil.rmtree(d, ignore_errors=True)


def test_guest_sees_the_disk_with_its_size_and_content(rig: Rig) -> None:
    assert int(rig.sh("cat /sys/block/vda/size")) == DISK_SIZE // 512
    guest = rig.sh("md5sum /dev/vda").split()[0]
    assert guest == hashlib.md5(rig.disk.read_bytes()).hexdigest()
    st = rig.backend.call("status")
    assert st["features"] & (1 << P.VIRTIO_F_VERSION_1)
    assert st["protocol_features"] & (1 << P.ProtocolFeature.LOG_SHMFD)
    assert st["queues"][0]["enabled"] and st["counters"]["bytes_read"] >= DISK_SIZE
    assert st["regions"] and st["counters"]["errors"] == 0


def test_guest_writes_land_in_the_host_file(rig: Rig) -> None:
    out = rig.sh("head -c 8192 /dev/urandom > /tmp/p && md5sum /tmp/p && "
                 "dd if=/tmp/p of=/dev/vda bs=4096 seek=100 conv=fsync 2>/dev/null && sync")
    with open(rig.disk, "rb") as f:
        f.seek(100 * 4096)
        assert hashlib.md5(f.read(8192)).hexdigest() == out.split()[0]
    st = rig.backend.call("status")["counters"]
    assert st["writes"] >= 1 and st["bytes_written"] >= 8192 and st["flushes"] >= 1


def test_harvest_lists_the_pages_the_device_wrote_then_is_empty(rig: Rig) -> None:
    rig.backend.call("harvest")  # clear what earlier tests left
    # One 1 MiB O_DIRECT read: the device writes dd's 1 MiB buffer (256 pages), status bytes
    # and the used ring. (Smaller blocks would reuse one buffer: fewer distinct pages.)
    rig.sh("dd if=/dev/vda of=/dev/null bs=1048576 count=1 skip=3 iflag=direct 2>/dev/null")
    h = rig.backend.call("harvest")
    assert 256 <= h["total"] < 400, h
    mem = rig.backend.call("status")["regions"]
    for reg in h["regions"]:
        assert any(m["gpa"] == reg["gpa"] for m in mem)
        for first, n in reg["runs"]:
            assert first >= 0 and (first + n) * 4096 <= reg["size"]
    assert rig.backend.call("harvest")["total"] == 0


def test_reconnect_after_the_backend_is_killed(rig: Rig) -> None:
    rig.backend.stop(signal.SIGKILL)
    rig.backend = Backend(rig.dir, rig.disk)
    deadline = time.monotonic() + 30
    while rig.backend.call("status")["queues"][0]["started"] is False:
        assert time.monotonic() < deadline, "QEMU did not reconnect"
        time.sleep(0.2)
    out = rig.sh("dd if=/dev/vda bs=4096 count=4 skip=1000 iflag=direct 2>/dev/null | md5sum")
    with open(rig.disk, "rb") as f:
        f.seek(1000 * 4096)
        assert out.split()[0] == hashlib.md5(f.read(4 * 4096)).hexdigest()
    assert rig.backend.call("status")["counters"]["reads"] >= 1


def test_qemu_killed_mid_request_leaves_the_backend_listening(rig: Rig) -> None:
    rig.sh("(while :; do dd if=/dev/vda of=/dev/null bs=65536 iflag=direct; done) "
           ">/dev/null 2>&1 </dev/null &")
    before = rig.backend.call("status")["counters"]["requests"]
    time.sleep(0.5)
    rig.qemu.send_signal(signal.SIGKILL)
    rig.qemu.wait()
    assert rig.backend.alive()
    deadline = time.monotonic() + 10
    while rig.backend.call("status")["regions"]:
        assert time.monotonic() < deadline, "backend did not notice the disconnect"
        time.sleep(0.1)
    assert rig.backend.call("status")["counters"]["requests"] > before
    assert _features_answered(rig.backend.sock) & (1 << P.VHOST_F_LOG_ALL)


# ---------------------------------------------------------------------------------------------
# Part 2: a scripted front-end (memfd guest RAM), bad input
# ---------------------------------------------------------------------------------------------
MEM = 1 << 20
QVA = 0x7F00_0000_0000
DESC_A, AVAIL_A, USED_A, HDR_A, STATUS_A, DATA_A = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x10000
QSIZE = 8
FEATURES = ((1 << P.VIRTIO_F_VERSION_1) | (1 << P.VHOST_USER_F_PROTOCOL_FEATURES)
            | (1 << P.VHOST_F_LOG_ALL))
PROTO = ((1 << P.ProtocolFeature.LOG_SHMFD) | (1 << P.ProtocolFeature.REPLY_ACK)
         | (1 << P.ProtocolFeature.CONFIG))


@pytest.fixture
def lone(tmp_path: Path) -> Iterator[Backend]:
    d = Path(f"/tmp/hvt-vubl-{os.getpid()}")
    d.mkdir(exist_ok=True)
    disk = d / "disk.img"
    disk.write_bytes(bytes(range(256)) * (DISK_SIZE // 256))
    b = Backend(d, disk)
    yield b
    alive = b.alive()
    b.stop()
    log = (d / "vub.log").read_text(errors="replace")[-2000:]
    shutil.rmtree(d, ignore_errors=True)
    assert alive, "the backend died: " + log


@dataclass
class FrontEnd:
    sock: socket.socket
    ram: mmap.mmap
    log: mmap.mmap
    kick: int
    call: int
    avail_idx: int = 0

    def submit(self, descs: list[tuple[int, int, int, int]]) -> tuple[int, int]:
        """Put a chain at head 0 and kick; return (used len, status byte)."""
        for i, d in enumerate(descs):
            DESC.pack_into(self.ram, DESC_A + 16 * i, *d)
        struct.pack_into("<H", self.ram, AVAIL_A + 4 + 2 * (self.avail_idx % QSIZE), 0)
        self.avail_idx += 1
        self.ram[STATUS_A] = 0xFF
        struct.pack_into("<H", self.ram, AVAIL_A + 2, self.avail_idx)
        os.eventfd_write(self.kick, 1)
        assert select.select([self.call], [], [], 10)[0], "no used notification"
        os.eventfd_read(self.call)
        (used_idx,) = struct.unpack_from("<H", self.ram, USED_A + 2)
        assert used_idx == self.avail_idx
        _, ln = struct.unpack_from("<II", self.ram, USED_A + 4 + 8 * ((used_idx - 1) % QSIZE))
        return ln, self.ram[STATUS_A]


@pytest.fixture
def fe(lone: Backend) -> Iterator[FrontEnd]:
    s = _vhost_connect(lone.sock)
    ramfd = os.memfd_create("ram")
    os.ftruncate(ramfd, MEM)
    logfd = os.memfd_create("log")
    os.ftruncate(logfd, 4096)
    kick, call = os.eventfd(0), os.eventfd(0, os.EFD_NONBLOCK)
    _request(s, P.Request.GET_FEATURES)
    assert struct.unpack("<Q", _reply(s)[1])[0] & FEATURES == FEATURES
    _request(s, P.Request.SET_FEATURES, P.u64(FEATURES))
    _request(s, P.Request.SET_PROTOCOL_FEATURES, P.u64(PROTO))
    _request(s, P.Request.SET_OWNER)
    _request(s, P.Request.SET_MEM_TABLE, P.mem_table([P.MemRegion(0, MEM, QVA, 0)]), [ramfd],
             need_reply=True)
    assert _reply(s) == (P.Request.SET_MEM_TABLE, P.u64(0))
    _request(s, P.Request.SET_LOG_BASE, struct.pack("<QQ", 4096, 0), [logfd])
    assert _reply(s) == (P.Request.SET_LOG_BASE, b"")
    _request(s, P.Request.SET_VRING_NUM, P.vring_state(0, QSIZE))
    _request(s, P.Request.SET_VRING_ADDR, P.vring_addr(P.VringAddr(
        0, P.VHOST_VRING_F_LOG, QVA + DESC_A, QVA + USED_A, QVA + AVAIL_A, USED_A)))
    _request(s, P.Request.SET_VRING_BASE, P.vring_state(0, 0))
    _request(s, P.Request.SET_VRING_CALL, P.u64(0), [call])
    _request(s, P.Request.SET_VRING_KICK, P.u64(0), [kick])
    _request(s, P.Request.SET_VRING_ENABLE, P.vring_state(0, 1), need_reply=True)
    assert _reply(s) == (P.Request.SET_VRING_ENABLE, P.u64(0))
    f = FrontEnd(s, mmap.mmap(ramfd, MEM), mmap.mmap(logfd, 4096), kick, call)
    yield f
    s.close()
    for fd in (ramfd, logfd, kick, call):
        os.close(fd)


def _read_chain(length: int, data: int = DATA_A) -> list[tuple[int, int, int, int]]:
    return [(HDR_A, 16, VIRTQ_DESC_F_NEXT, 1),
            (data, length, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2),
            (STATUS_A, 1, VIRTQ_DESC_F_WRITE, 0)]


def _log_pages(log: mmap.mmap) -> set[int]:
    bits = int.from_bytes(log[:], "little")
    return {i for i in range(len(log) * 8) if bits >> i & 1}


def test_read_logs_data_status_and_used_ring(fe: FrontEnd, lone: Backend) -> None:
    BLK_REQ_HDR.pack_into(fe.ram, HDR_A, VIRTIO_BLK_T_IN, 0, 8)
    assert fe.submit(_read_chain(8192)) == (8193, VIRTIO_BLK_S_OK)
    assert fe.ram[DATA_A:DATA_A + 8192] == (bytes(range(256)) * 32)
    # data pages 0x10, 0x11; status page 0x5; used ring page 0x3 (logged at log_guest_addr)
    assert _log_pages(fe.log) == {0x3, 0x5, 0x10, 0x11}
    h = lone.call("harvest")
    assert h["regions"][0]["runs"] == [[3, 1], [5, 1], [16, 2]]
    st = lone.call("status")
    assert st["dirty_log"] == {"enabled": True, "log_all": True, "active": True}
    # The debug switch: the own bitmap still records, the shared log does not.
    fe.log[:] = bytes(4096)
    lone.call("set_dirty_log", enabled=False)
    assert fe.submit(_read_chain(4096, DATA_A + 0x8000)) == (4097, VIRTIO_BLK_S_OK)
    assert _log_pages(fe.log) == set()
    assert lone.call("harvest")["total"] == 3


@pytest.mark.parametrize(("sector", "chain", "status", "used_len"), [
    (0, [(HDR_A, 16, VIRTQ_DESC_F_NEXT, 1), (HDR_A, 16, VIRTQ_DESC_F_NEXT, 0)], None, 0),  # loop
    (0, _read_chain(4096, MEM - 2048), VIRTIO_BLK_S_IOERR, 1),  # data past guest memory
    (0, _read_chain(16 << 20), VIRTIO_BLK_S_IOERR, 1),  # oversized
    (DISK_SIZE // 512 - 4, _read_chain(4096), VIRTIO_BLK_S_IOERR, 1),  # past the disk's end
    (0, [(HDR_A, 16, 0, 0)], None, 0),  # no status byte: nothing to write
], ids=["loop", "outside-memory", "oversized", "past-disk-end", "no-status"])
def test_bad_chains_fail_the_request_not_the_device(
        fe: FrontEnd, lone: Backend, sector: int, chain: list[tuple[int, int, int, int]],
        status: int | None, used_len: int) -> None:
    BLK_REQ_HDR.pack_into(fe.ram, HDR_A, VIRTIO_BLK_T_IN, 0, sector)
    before = bytes(fe.ram)
    ln, st = fe.submit(chain)
    assert ln == used_len
    assert st == (0xFF if status is None else status)
    changed = [i for i in range(MEM) if fe.ram[i] != before[i]]
    # Besides what submit() itself wrote (descriptors, avail ring, status 0xff), only the used
    # ring and the status byte change: no data lands anywhere.
    assert all(USED_A <= i < USED_A + 4 + 8 * QSIZE or DESC_A <= i < DESC_A + 16 * QSIZE
               or AVAIL_A <= i < AVAIL_A + 4 + 2 * QSIZE or i == STATUS_A
               for i in changed), changed[:10]
    assert lone.alive()
    BLK_REQ_HDR.pack_into(fe.ram, HDR_A, VIRTIO_BLK_T_IN, 0, 1)
    assert fe.submit(_read_chain(512)) == (513, VIRTIO_BLK_S_OK)  # and it still serves


@pytest.mark.parametrize("bad", [
    "truncated-header", "wrong-size", "unknown-request", "fd-count-mismatch", "bad-version",
    "mem-table-beyond-fd", "ring-outside-memory", "eof-mid-payload"])
def test_malformed_messages_are_refused_and_the_backend_keeps_serving(
        lone: Backend, bad: str) -> None:
    s = _vhost_connect(lone.sock)
    _request(s, P.Request.SET_PROTOCOL_FEATURES, P.u64(PROTO))
    if bad == "truncated-header":
        s.sendall(struct.pack("<II", 1, 1))
        s.shutdown(socket.SHUT_WR)
    elif bad == "wrong-size":
        s.sendall(struct.pack("<III", P.Request.SET_FEATURES, P.VERSION, 4) + b"\0" * 4)
    elif bad == "unknown-request":
        s.sendall(struct.pack("<III", 77, P.VERSION | P.FLAG_NEED_REPLY, 0))
        assert _reply(s) == (77, P.u64(1))  # REPLY_ACK negotiated: an error status
    elif bad == "fd-count-mismatch":
        _request(s, P.Request.SET_VRING_CALL, P.u64(0), need_reply=True)
        assert _reply(s) == (P.Request.SET_VRING_CALL, P.u64(1))
    elif bad == "bad-version":
        s.sendall(struct.pack("<III", P.Request.GET_FEATURES, 2, 0))
    elif bad == "mem-table-beyond-fd":
        fd = os.memfd_create("small")
        os.ftruncate(fd, 4096)
        _request(s, P.Request.SET_MEM_TABLE, P.mem_table([P.MemRegion(0, MEM, QVA, 0)]), [fd],
                 need_reply=True)
        os.close(fd)
        assert _reply(s) == (P.Request.SET_MEM_TABLE, P.u64(1))
    elif bad == "ring-outside-memory":
        fd = os.memfd_create("ram")
        os.ftruncate(fd, MEM)
        _request(s, P.Request.SET_MEM_TABLE, P.mem_table([P.MemRegion(0, MEM, QVA, 0)]), [fd])
        os.close(fd)
        _request(s, P.Request.SET_VRING_NUM, P.vring_state(0, QSIZE))
        _request(s, P.Request.SET_VRING_ADDR, P.vring_addr(P.VringAddr(
            0, 0, QVA + MEM - 16, QVA + USED_A, QVA + AVAIL_A, USED_A)))
    elif bad == "eof-mid-payload":
        s.sendall(struct.pack("<III", P.Request.SET_FEATURES, P.VERSION, 8) + b"\0" * 3)
        s.shutdown(socket.SHUT_WR)
    assert _closed_by_peer(s), "the backend kept a connection that broke the protocol"
    s.close()
    assert lone.alive()
    assert _features_answered(lone.sock) & (1 << P.VHOST_F_LOG_ALL)
    assert lone.call("status")["counters"]["errors"] >= (0 if bad == "truncated-header" else 1)
