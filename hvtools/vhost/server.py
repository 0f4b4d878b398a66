"""The vhost-user-blk backend: a disk file served to QEMU over vhost-user (issue 6).

One process serves one disk. The main thread owns the sockets (the vhost-user listener and its
one front-end connection, the control listener and its clients) and handles every message; one
worker thread per started virtqueue waits on the kick eventfd and serves requests. A device
lock serialises the two wherever they share state (memory table, ring addresses, the logs).

Every guest-memory write the device makes (data of reads, status bytes, used-ring entries and
``used->idx``) goes through :meth:`BlkBackend._wrote`, which records it in the own bitmap and,
while VHOST_F_LOG_ALL is on, in QEMU's shared log.
"""

from __future__ import annotations

import array
import contextlib
import json
import logging
import mmap
import os
import select
import selectors
import socket
import stat
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvtools.errors import VhostError
from hvtools.vhost import protocol as P
from hvtools.vhost.dirty import DirtyLog
from hvtools.vhost.virtq import (
    DESC_SIZE,
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VRING_AVAIL_F_NO_INTERRUPT,
    Chain,
    ChainFault,
    GuestMemory,
    Region,
    bad_chain_status,
    parse_blk,
    walk_chain,
)

log = logging.getLogger("hvtools.vhost.blk")

NUM_QUEUES = 1
SEG_MAX = 126
#: Largest segment the driver may send (VIRTIO_BLK_F_SIZE_MAX): with SEG_MAX segments a
#: request stays inside MAX_REQUEST_BYTES, so the driver never builds one we must refuse.
SIZE_MAX = 64 << 10
#: Largest request accepted (data bytes + header + status); larger ones fail with IOERR.
MAX_REQUEST_BYTES = 8 << 20
assert SIZE_MAX * SEG_MAX + 4096 <= MAX_REQUEST_BYTES
IOV_MAX = 1024
DEVICE_ID = b"hvtools-vub"

FEATURES = ((1 << P.VIRTIO_F_VERSION_1) | (1 << P.VHOST_USER_F_PROTOCOL_FEATURES)
            | (1 << P.VHOST_F_LOG_ALL) | (1 << P.VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << P.VIRTIO_BLK_F_SIZE_MAX) | (1 << P.VIRTIO_BLK_F_SEG_MAX)
            | (1 << P.VIRTIO_BLK_F_BLK_SIZE)
            | (1 << P.VIRTIO_BLK_F_FLUSH))
PROTOCOL_FEATURES = ((1 << P.ProtocolFeature.MQ) | (1 << P.ProtocolFeature.LOG_SHMFD)
                     | (1 << P.ProtocolFeature.REPLY_ACK) | (1 << P.ProtocolFeature.CONFIG))
#: Requests whose reply is their own payload (no REPLY_ACK after them).
_OWN_REPLY = frozenset({P.Request.GET_FEATURES, P.Request.GET_PROTOCOL_FEATURES,
                        P.Request.GET_VRING_BASE, P.Request.GET_QUEUE_NUM, P.Request.GET_CONFIG,
                        P.Request.SET_LOG_BASE})


def blk_config(capacity_sectors: int) -> bytes:
    """``struct virtio_blk_config`` (virtio 1.2 s5.2.4), padded to 96 bytes."""
    cfg = struct.pack("<QIIHBBIBBHIBBH", capacity_sectors, SIZE_MAX, SEG_MAX, 0, 0, 0,
                      SECTOR_SIZE,
                      0, 0, 0, 0, 0, 0, NUM_QUEUES)
    return cfg.ljust(96, b"\0")


@dataclass
class Counters:
    requests: int = 0
    reads: int = 0
    writes: int = 0
    flushes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    chain_faults: int = 0
    unsupported: int = 0
    notifications: int = 0


@dataclass
class Queue:
    index: int
    num: int = 0
    addr: P.VringAddr | None = None
    last_avail: int = 0
    used_idx: int = 0
    enabled: bool = False
    kick: int = -1
    call: int = -1
    err: int = -1
    broken: str = ""
    desc: memoryview | None = None
    avail: memoryview | None = None
    used: memoryview | None = None
    used_gpa: int = 0
    worker: threading.Thread | None = None
    wake: int = field(default_factory=lambda: os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
    stop: bool = False


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def _check_fd_size(fd: int, need: int, what: str) -> None:
    """Refuse a mapping longer than its file: touching past EOF would SIGBUS the backend."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size < need:
        raise VhostError(f"{what}: fd holds {st.st_size} bytes, {need} needed")


class BlkBackend:
    def __init__(self, disk: Path, *, dirty_log: bool = True) -> None:
        self.disk_path = disk
        self.disk_fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
        self.disk_size = os.fstat(self.disk_fd).st_size
        self.config = bytearray(blk_config(self.disk_size // SECTOR_SIZE))
        self.lock = threading.Lock()
        self.dirty = DirtyLog(shared_enabled=dirty_log)
        self.counters = Counters()
        self.connections = 0
        self._maps: list[mmap.mmap] = []
        self.mem = GuestMemory()
        self._reset_state()

    # -- connection state ---------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.features = 0
        self.protocol_features = 0
        self.queues = [Queue(i) for i in range(NUM_QUEUES)]

    def disconnect(self) -> None:
        """The front-end went away: stop the rings, unmap its memory, keep the disk."""
        for q in self.queues:
            self._stop_queue(q)
            _close(q.kick)
            _close(q.call)
            _close(q.err)
            _close(q.wake)
        with self.lock:
            self._unmap()
            self.dirty.log_all = False
        self.dirty.set_log(None)
        self._reset_state()

    def _unmap(self) -> None:
        for q in self.queues:
            q.desc = q.avail = q.used = None
        for r in self.mem.regions:
            r.buf.release()
        self.mem = GuestMemory()
        for m in self._maps:
            with contextlib.suppress(BufferError):  # a stale view: the GC unmaps it later
                m.close()
        self._maps = []

    # -- messages -----------------------------------------------------------------------------
    def handle(self, msg: P.Message) -> bytes | None:
        """Apply one decoded message; return the reply payload for requests that have one.
        Raises VhostError to refuse it."""
        req = P.Request(msg.request)
        body = msg.payload
        if req is P.Request.GET_FEATURES:
            return P.u64(FEATURES)
        if req is P.Request.SET_FEATURES:
            assert isinstance(body, int)
            if body & ~FEATURES:
                raise VhostError(f"SET_FEATURES {body:#x}: bits {body & ~FEATURES:#x} not offered")
            with self.lock:
                self.features = body
                self.dirty.log_all = bool(body & (1 << P.VHOST_F_LOG_ALL))
                if not body & (1 << P.VHOST_USER_F_PROTOCOL_FEATURES):
                    for q in self.queues:  # without it rings are enabled when started
                        q.enabled = True
            return None
        if req is P.Request.GET_PROTOCOL_FEATURES:
            return P.u64(PROTOCOL_FEATURES)
        if req is P.Request.SET_PROTOCOL_FEATURES:
            assert isinstance(body, int)
            if body & ~PROTOCOL_FEATURES:
                raise VhostError(f"SET_PROTOCOL_FEATURES {body:#x}: bits not offered")
            self.protocol_features = body
            return None
        if req is P.Request.GET_QUEUE_NUM:
            return P.u64(NUM_QUEUES)
        if req in (P.Request.SET_OWNER, P.Request.RESET_OWNER, P.Request.RESET_DEVICE):
            if req is not P.Request.SET_OWNER:
                for q in self.queues:
                    self._stop_queue(q)
                    q.last_avail = q.used_idx = 0
                    q.enabled = False
            return None
        if req is P.Request.SET_MEM_TABLE:
            assert isinstance(body, tuple)
            self._set_mem_table(body, msg.fds)
            return None
        if req is P.Request.SET_LOG_BASE:
            assert isinstance(body, P.LogBase)
            self._set_log_base(body, msg.fds[0])
            return b""
        if req is P.Request.SET_LOG_FD:
            _close(msg.fds[0])  # we never ask QEMU to sync the log through it
            return None
        if req in (P.Request.GET_CONFIG, P.Request.SET_CONFIG):
            assert isinstance(body, P.ConfigSpace)
            if req is P.Request.SET_CONFIG:
                return None  # nothing writable is offered (no CONFIG_WCE); ignore
            data = bytes(self.config[body.offset:body.offset + body.size]).ljust(body.size, b"\0")
            return P.config_reply(body, data)
        return self._vring(req, msg)

    def _queue(self, index: int) -> Queue:
        if not 0 <= index < len(self.queues):
            raise VhostError(f"vring index {index}: the device has {len(self.queues)} queue(s)")
        return self.queues[index]

    def _vring(self, req: P.Request, msg: P.Message) -> bytes | None:
        body = msg.payload
        if isinstance(body, P.VringState):
            q = self._queue(body.index)
            if req is P.Request.SET_VRING_NUM:
                if not 0 < body.num <= 32768 or body.num & (body.num - 1):
                    raise VhostError(f"SET_VRING_NUM {body.num}: not a power of 2 <= 32768")
                with self.lock:
                    q.num = body.num
                    self._map_ring(q)
            elif req is P.Request.SET_VRING_BASE:
                if body.num > 0xFFFF:
                    raise VhostError(f"SET_VRING_BASE {body.num}: beyond 16 bits")
                with self.lock:
                    q.last_avail = body.num
            elif req is P.Request.GET_VRING_BASE:
                self._stop_queue(q)
                _close(q.kick)
                q.kick = -1
                return P.vring_state(q.index, q.last_avail)
            elif req is P.Request.SET_VRING_ENABLE:
                q.enabled = bool(body.num)
                os.eventfd_write(q.wake, 1)
            return None
        if isinstance(body, P.VringAddr):
            q = self._queue(body.index)
            with self.lock:
                q.addr = body
                self._map_ring(q)
            return None
        if not isinstance(body, int):
            raise VhostError(f"{req.name} is not supported by this backend")
        fd = msg.fds[0] if msg.fds else -1
        try:
            q = self._queue(body & P.VRING_IDX_MASK)
        except VhostError:
            _close(fd)  # refused: the fd was ours to close
            raise
        if req is P.Request.SET_VRING_KICK:
            self._stop_queue(q)
            _close(q.kick)
            q.kick = fd
            self._start_queue(q)
        elif req is P.Request.SET_VRING_CALL:
            with self.lock:
                old, q.call = q.call, fd
            _close(old)
        elif req is P.Request.SET_VRING_ERR:
            old, q.err = q.err, fd
            _close(old)
        return None

    def _set_mem_table(self, regions: tuple[P.MemRegion, ...], fds: tuple[int, ...]) -> None:
        maps: list[mmap.mmap] = []
        out: list[Region] = []
        try:
            for r, fd in zip(regions, fds, strict=True):
                _check_fd_size(fd, r.mmap_offset + r.memory_size, "SET_MEM_TABLE")
                base = r.mmap_offset - r.mmap_offset % mmap.ALLOCATIONGRANULARITY
                lead = r.mmap_offset - base
                try:
                    m = mmap.mmap(fd, lead + r.memory_size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
                except (OSError, ValueError, OverflowError) as err:
                    raise VhostError(f"SET_MEM_TABLE: cannot map region "
                                     f"{r.guest_phys_addr:#x}: {err}") from err
                maps.append(m)
                out.append(Region(r.guest_phys_addr, r.memory_size, r.userspace_addr,
                                  memoryview(m)[lead:lead + r.memory_size]))
        except BaseException:
            for reg in out:
                reg.buf.release()
            for m in maps:
                m.close()
            raise
        finally:
            for fd in fds:
                _close(fd)
        mem = GuestMemory(out)
        with self.lock:
            self._unmap()
            self.mem = mem
            self._maps = maps
            for q in self.queues:
                self._map_ring(q)
        self.dirty.set_regions(mem)
        log.info("memory table: %s", ", ".join(
            f"gpa {r.gpa:#x}+{r.size:#x} qva {r.qva:#x}" for r in mem.regions))

    def _set_log_base(self, lb: P.LogBase, fd: int) -> None:
        try:
            if lb.mmap_offset % 8 or lb.mmap_size == 0 or lb.mmap_size + lb.mmap_offset > 1 << 40:
                raise VhostError(f"SET_LOG_BASE: size {lb.mmap_size:#x} offset "
                                 f"{lb.mmap_offset:#x} unusable")
            _check_fd_size(fd, lb.mmap_size + lb.mmap_offset, "SET_LOG_BASE")
            try:
                m = mmap.mmap(fd, lb.mmap_size + lb.mmap_offset, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError, OverflowError) as err:
                raise VhostError(f"SET_LOG_BASE: cannot map the log: {err}") from err
        finally:
            _close(fd)
        self.dirty.set_log(m, lb.mmap_offset)
        log.info("dirty log: %d bytes (covers %d GiB of guest-physical space)", lb.mmap_size,
                 lb.mmap_size * 8 * 4096 >> 30)

    def _map_ring(self, q: Queue) -> None:
        """(Re)build the views of a ring; caller holds the lock."""
        q.desc = q.avail = q.used = None
        a = q.addr
        if a is None or q.num == 0 or not self.mem.regions:
            return
        q.desc = self.mem.qva_view(a.desc_user_addr, q.num * DESC_SIZE)
        q.avail = self.mem.qva_view(a.avail_user_addr, 4 + 2 * q.num)
        q.used = self.mem.qva_view(a.used_user_addr, 4 + 8 * q.num)
        if q.desc is None or q.avail is None or q.used is None:
            q.desc = q.avail = q.used = None
            raise VhostError(f"SET_VRING_ADDR: ring {q.index} is not inside the memory table")
        gpa = self.mem.qva_to_gpa(a.used_user_addr)
        q.used_gpa = a.log_guest_addr if a.flags & P.VHOST_VRING_F_LOG or gpa is None else gpa
        (q.used_idx,) = struct.unpack_from("<H", q.used, 2)

    # -- rings --------------------------------------------------------------------------------
    def _start_queue(self, q: Queue) -> None:
        q.stop = False
        q.broken = ""
        with self.lock:
            if q.used is not None:
                (q.used_idx,) = struct.unpack_from("<H", q.used, 2)
        t = threading.Thread(target=self._worker, args=(q,), name=f"vq{q.index}", daemon=True)
        q.worker = t
        t.start()

    def _stop_queue(self, q: Queue) -> None:
        t = q.worker
        if t is None:
            return
        q.stop = True
        with contextlib.suppress(OSError):
            os.eventfd_write(q.wake, 1)
        t.join()
        q.worker = None

    def _worker(self, q: Queue) -> None:
        poller = select.poll()
        if q.kick >= 0:
            poller.register(q.kick, select.POLLIN)
        poller.register(q.wake, select.POLLIN)
        timeout = None if q.kick >= 0 else 10  # no kick fd: poll the ring (vhost-user.rst)
        while not q.stop:
            for fd, _ev in poller.poll(timeout):
                with contextlib.suppress(BlockingIOError, OSError):
                    os.read(fd, 8)
            if q.stop:
                break
            try:
                with self.lock:
                    self._process(q)
            except Exception:  # never let a guest kill the worker silently
                log.exception("queue %d: internal error", q.index)
                self.counters.errors += 1

    def _process(self, q: Queue) -> None:
        if not q.enabled or q.broken or q.desc is None or q.avail is None or q.used is None:
            return
        desc, avail, used, num = q.desc, q.avail, q.used, q.num
        notify = False
        while True:
            (avail_idx,) = struct.unpack_from("<H", avail, 2)
            pending = (avail_idx - q.last_avail) & 0xFFFF
            if pending == 0:
                break
            if pending > num:
                # virtio 1.2 s2.7.6: the driver may not get ahead by more than the queue size.
                q.broken = f"avail idx {avail_idx} is {pending} ahead of {q.last_avail}"
                log.error("queue %d broken: %s", q.index, q.broken)
                self.counters.errors += 1
                break
            for _ in range(pending):
                (head,) = struct.unpack_from("<H", avail, 4 + 2 * (q.last_avail % num))
                written = self._request(desc, num, head)
                slot = q.used_idx % num
                struct.pack_into("<II", used, 4 + 8 * slot, head, written)
                self._wrote(q.used_gpa + 4 + 8 * slot, 8)
                q.used_idx = (q.used_idx + 1) & 0xFFFF
                q.last_avail = (q.last_avail + 1) & 0xFFFF
            struct.pack_into("<H", used, 2, q.used_idx)
            self._wrote(q.used_gpa + 2, 2)
            notify = True
        (aflags,) = struct.unpack_from("<H", avail, 0)
        if notify and q.call >= 0 and not aflags & VRING_AVAIL_F_NO_INTERRUPT:
            os.eventfd_write(q.call, 1)
            self.counters.notifications += 1

    def _wrote(self, gpa: int, length: int) -> None:
        self.dirty.mark(gpa, length)

    def _request(self, desc: memoryview, num: int, head: int) -> int:
        """Serve one chain; return the bytes written into device-writable buffers."""
        c = self.counters
        c.requests += 1
        mem = self.mem
        chain = walk_chain(mem, desc, num, head, max_bytes=MAX_REQUEST_BYTES,
                           indirect=bool(self.features & (1 << P.VIRTIO_RING_F_INDIRECT_DESC)))
        req = parse_blk(mem, chain) if isinstance(chain, Chain) else chain
        if isinstance(req, ChainFault):
            c.chain_faults += 1
            c.errors += 1
            log.warning("request at head %d refused: %s %s", head, req.reason.value, req.detail)
            status_gpa = bad_chain_status(mem, desc, num, head)
            if status_gpa is not None:
                self._status(status_gpa, VIRTIO_BLK_S_IOERR)
                return 1
            return 0
        data_len = sum(s.length for s in req.data)
        status = VIRTIO_BLK_S_OK
        written = 0
        rtype = req.type
        if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
            offset = req.sector * SECTOR_SIZE
            views: list[memoryview] = []
            for s in req.data:
                part = mem.slices(s.gpa, s.length)
                assert part is not None  # the walker checked every segment
                views += part
            want_write = rtype == VIRTIO_BLK_T_IN
            if (any(s.write != want_write for s in req.data) or offset + data_len > self.disk_size
                    or len(views) > IOV_MAX):
                status = VIRTIO_BLK_S_IOERR
            else:
                try:
                    if want_write:
                        n = os.preadv(self.disk_fd, views, offset)
                        written = n
                        for s in req.data:
                            self._wrote(s.gpa, s.length)
                        c.reads += 1
                        c.bytes_read += n
                    else:
                        n = os.pwritev(self.disk_fd, views, offset)
                        c.writes += 1
                        c.bytes_written += n
                    if n != data_len:
                        status = VIRTIO_BLK_S_IOERR
                except OSError as err:
                    log.warning("disk I/O at %d+%d: %s", offset, data_len, err)
                    status = VIRTIO_BLK_S_IOERR
        elif rtype == VIRTIO_BLK_T_FLUSH:
            try:
                os.fdatasync(self.disk_fd)
                c.flushes += 1
            except OSError:
                status = VIRTIO_BLK_S_IOERR
        elif rtype == VIRTIO_BLK_T_GET_ID:
            ident = DEVICE_ID.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
            for s in req.data:
                if not s.write or written >= len(ident):
                    continue
                n = min(s.length, len(ident) - written)
                dst = mem.slices(s.gpa, n)
                assert dst is not None
                pos = written
                for v in dst:
                    v[:] = ident[pos:pos + len(v)]
                    pos += len(v)
                self._wrote(s.gpa, n)
                written += n
        else:
            c.unsupported += 1
            status = VIRTIO_BLK_S_UNSUPP
        if status != VIRTIO_BLK_S_OK:
            c.errors += 1
        self._status(req.status_gpa, status)
        return written + 1

    def _status(self, gpa: int, status: int) -> None:
        view = self.mem.slices(gpa, 1)
        if view:
            view[0][0] = status
            self._wrote(gpa, 1)

    # -- control channel ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self.lock:
            queues = [{"index": q.index, "num": q.num, "enabled": q.enabled,
                       "started": q.worker is not None, "last_avail_idx": q.last_avail,
                       "used_idx": q.used_idx, "broken": q.broken} for q in self.queues]
            regions = [{"gpa": r.gpa, "size": r.size, "user_addr": r.qva}
                       for r in self.mem.regions]
        return {
            "disk": str(self.disk_path), "disk_size": self.disk_size,
            "connections": self.connections,
            "features": self.features, "protocol_features": self.protocol_features,
            "regions": regions, "queues": queues,
            "counters": {**self.counters.__dict__, "log_writes": self.dirty.log_writes,
                         "log_overflows": self.dirty.log_overflows},
            "dirty_log": {"enabled": self.dirty.shared_enabled, "log_all": self.dirty.log_all,
                          "active": self.dirty.shared_active},
        }

    def control(self, method: str, params: dict[str, Any]) -> Any:
        if method == "status":
            return self.status()
        if method == "harvest":
            return self.dirty.harvest()
        if method == "set_dirty_log":
            enabled = params.get("enabled")
            if not isinstance(enabled, bool):
                raise ValueError("set_dirty_log needs {\"enabled\": true|false}")
            self.dirty.shared_enabled = enabled
            return {"enabled": enabled}
        raise ValueError(f"unknown method {method!r} (status, harvest, set_dirty_log)")


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes:
    """``n`` bytes (and any SCM_RIGHTS fds that come with them); b"" on EOF at a boundary."""
    buf = bytearray()
    while len(buf) < n:
        data, anc, flags, _ = sock.recvmsg(n - len(buf), socket.CMSG_SPACE(P.MAX_FDS * 4))
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
                fds.extend(a)
        if flags & socket.MSG_CTRUNC:
            raise VhostError("too many fds attached to a message")
        if not data:
            if buf:
                raise VhostError(f"connection closed inside a message ({len(buf)} of {n} bytes)")
            return b""
        buf += data
    return bytes(buf)


class Server:
    """The listening sockets and the select loop."""

    def __init__(self, backend: BlkBackend, sock_path: Path, ctl_path: Path) -> None:
        self.backend = backend
        self.sel = selectors.DefaultSelector()
        self.conn: socket.socket | None = None
        self.running = True
        self.listener = self._listen(sock_path)
        self.ctl = self._listen(ctl_path)
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        self.sel.register(self.ctl, selectors.EVENT_READ, "ctl-accept")
        self._ctl_bufs: dict[socket.socket, bytes] = {}

    @staticmethod
    def _listen(path: Path) -> socket.socket:
        path.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(4)
        return s

    def serve(self) -> None:
        while self.running:
            for key, _ in self.sel.select(timeout=0.5):
                what = key.data
                if what == "accept":
                    self._accept()
                elif what == "vhost":
                    self._vhost_readable()
                elif what == "ctl-accept":
                    try:
                        c, _ = self.ctl.accept()
                    except OSError as err:
                        log.error("control accept failed: %s", err)
                        continue
                    self._ctl_bufs[c] = b""
                    self.sel.register(c, selectors.EVENT_READ, "ctl")
                else:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    self._ctl_readable(sock)

    def close(self) -> None:
        self._drop_conn("shutting down")
        for s in [self.listener, self.ctl, *self._ctl_bufs]:
            s.close()
        self.backend.dirty.close()

    def _accept(self) -> None:
        try:
            c, _ = self.listener.accept()
        except OSError as err:  # EMFILE and the like: keep serving what we have
            log.error("accept failed: %s", err)
            return
        if self.conn is not None:
            log.warning("refusing a second front-end connection while one is active")
            c.close()
            return
        self.conn = c
        self.backend.connections += 1
        self.sel.register(c, selectors.EVENT_READ, "vhost")
        log.info("front-end connected")

    def _drop_conn(self, why: str) -> None:
        if self.conn is None:
            return
        log.info("front-end connection closed: %s; listening again", why)
        self.sel.unregister(self.conn)
        self.conn.close()
        self.conn = None
        self.backend.disconnect()

    def _vhost_readable(self) -> None:
        assert self.conn is not None
        conn = self.conn
        fds: list[int] = []
        header: P.Header | None = None
        try:
            raw = _recv_exact(conn, P.HEADER_SIZE, fds)
            if not raw:
                self._drop_conn("EOF")
                return
            header = P.decode_header(raw)
            payload = _recv_exact(conn, header.size, fds) if header.size else b""
            if header.size and not payload:
                raise VhostError("connection closed before the payload")
            msg = P.decode(header, payload, tuple(fds))
            fds = []  # handle() owns them now
            reply = self.backend.handle(msg)
            req = P.Request(header.request)
            if reply is not None and req in _OWN_REPLY:
                if req is not P.Request.SET_LOG_BASE or (
                        self.backend.protocol_features & (1 << P.ProtocolFeature.LOG_SHMFD)):
                    conn.sendall(P.encode_reply(header.request, reply))
            elif header.need_reply and self._reply_ack:
                conn.sendall(P.encode_reply(header.request, P.u64(0)))
        except VhostError as err:
            self.backend.counters.errors += 1
            log.error("refused vhost-user message: %s", err)
            if header is not None and header.need_reply and self._reply_ack:
                with contextlib.suppress(OSError):
                    conn.sendall(P.encode_reply(header.request, P.u64(1)))
            for fd in fds:
                _close(fd)
            self._drop_conn(f"protocol error: {err}")
        except OSError as err:
            for fd in fds:
                _close(fd)
            self._drop_conn(f"socket error: {err}")
        except Exception as err:  # a message the backend cannot serve must not end it
            self.backend.counters.errors += 1
            log.exception("vhost-user message broke the handler; dropping the connection")
            for fd in fds:
                _close(fd)
            self._drop_conn(f"internal error: {type(err).__name__}: {err}")

    @property
    def _reply_ack(self) -> bool:
        return bool(self.backend.protocol_features & (1 << P.ProtocolFeature.REPLY_ACK))

    def _ctl_readable(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(sock)
            self._ctl_bufs.pop(sock, None)
            sock.close()
            return
        buf = self._ctl_bufs[sock] + data
        if len(buf) > 1 << 20:
            buf = b""
        *lines, rest = buf.split(b"\n")
        self._ctl_bufs[sock] = rest
        for line in lines:
            if not line.strip():
                continue
            rid: Any = None
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("a request is a JSON object")
                rid = req.get("id")
                params = req.get("params") or {}
                if not isinstance(params, dict):
                    raise ValueError("params must be an object")
                out: dict[str, Any] = {"id": rid,
                                       "result": self.backend.control(str(req.get("method")),
                                                                      params)}
            except ValueError as err:
                out = {"id": rid, "error": str(err)}
            with contextlib.suppress(OSError):
                sock.sendall(json.dumps(out).encode() + b"\n")
