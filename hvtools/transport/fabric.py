"""The libfabric backend: one FI_EP_RDM endpoint with FI_RMA, through the cffi layer.

Providers: ``tcp`` (libfabric picks ``tcp;ofi_rxm``, RDM over TCP connections) between hosts or
network namespaces, ``shm`` (shared memory + CMA) inside one host, ``verbs`` on RDMA hosts. The
code follows what fi_getinfo(3) reports instead of assuming: the mr_mode bits (fi_mr(3)):

- FI_MR_VIRT_ADDR: peers address a region by its virtual address, else by offset from 0;
- FI_MR_PROV_KEY: the provider picks the key, else we request a fresh one per registration;
- FI_MR_LOCAL: local buffers need their descriptor (``fi_mr_desc``) on every op;
- FI_MR_ENDPOINT: a region is bound to the endpoint and enabled (done in the C layer);
- FI_MR_ALLOCATED: the buffer must be backed, which a registered mmap or bytearray is.

Data progress is FI_PROGRESS_MANUAL for tcp and shm: nothing moves, on either side, unless
someone reads the CQ. Initiators progress inside :meth:`poll`; a target runs
:meth:`start_progress` (a thread blocked in ``fi_cq_sread``; cffi drops the GIL in C calls).
"""

from __future__ import annotations

import collections
import ipaddress
import secrets
import struct
import threading
from typing import Any

from hvtools.errors import DependencyError, StateError, TransportError
from hvtools.transport import _fabric_build
from hvtools.transport.api import Buffer, Completion, Endpoint, MemoryRegion, Peer, RemoteRegion

#: Providers whose blocking CQ read does not progress; we poll them with short naps instead.
_NO_WAIT_PROVIDERS = frozenset({"shm"})
_AF_INET = 2
_AF_INET6 = 10


class FabricEndpoint(Endpoint):
    """An RDM endpoint of one libfabric provider."""

    backend = "fabric"

    def __init__(self, provider: str = "tcp", address: str | None = None,
                 port: int | None = None, *, tx_size: int = 0, cq_size: int = 0) -> None:
        mod = _fabric_build.load()
        self._ffi: Any = mod.ffi
        self._lib: Any = mod.lib
        ffi, lib = self._ffi, self._lib
        err = ffi.new("struct hvt_err *")
        out = ffi.new("hvt_ep **")
        node = address.encode() if address else ffi.NULL
        service = str(port).encode() if port else ffi.NULL
        # shm's fi_cq_sread does not drive progress while it waits: it would block forever.
        use_wait = int(provider not in _NO_WAIT_PROVIDERS)
        rc = lib.hvt_open(provider.encode(), node, service, tx_size, cq_size, use_wait, out, err)
        if rc:
            msg = ffi.string(err.msg).decode(errors="replace")
            where = f" on {address}" if address else ""
            raise DependencyError(f"libfabric provider {provider!r}{where} with FI_RMA is not "
                                  f"available: {msg}")
        self._h: Any = out[0]
        self.provider = ffi.string(lib.hvt_prov_name(self._h)).decode()
        self.mr_mode = int(lib.hvt_mr_mode(self._h))
        self._addr_format = int(lib.hvt_addr_format(self._h))
        self._tx_size = int(lib.hvt_tx_size(self._h))
        self.address = self._own_address()
        self._lock = threading.Lock()
        self._pending: dict[int, tuple[int, Peer]] = {}  # context -> (length, peer)
        self._mrs: dict[int, MemoryRegion] = {}  # id(mr) -> mr
        self._next_key = secrets.randbits(32) << 16
        self._done: collections.deque[Completion] = collections.deque()
        self._cond = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closed = False

    # -- addresses ------------------------------------------------------------------------
    def _own_address(self) -> str:
        ffi, lib = self._ffi, self._lib
        buf = ffi.new("char[256]")
        size = ffi.new("size_t *", 256)
        rc = lib.hvt_getname(self._h, buf, size)
        if rc:
            raise TransportError(f"fi_getname: {ffi.string(lib.hvt_strerror(-rc)).decode()}")
        return _name_to_text(bytes(ffi.buffer(buf, size[0])), self._addr_format, lib)

    def connect(self, peer: str) -> Peer:
        self._check_open()
        raw = _text_to_name(peer, self._addr_format, self._lib)
        fi_addr = self._ffi.new("uint64_t *")
        rc = self._lib.hvt_av_insert(self._h, raw, fi_addr)
        if rc:
            raise TransportError(f"cannot resolve peer {peer!r}: {self._strerror(rc)}")
        return Peer(peer, int(fi_addr[0]))

    # -- memory registration --------------------------------------------------------------
    def register(self, buf: Buffer, *, remote_read: bool = True,
                 remote_write: bool = False) -> MemoryRegion:
        self._check_open()
        ffi, lib = self._ffi, self._lib
        try:
            ptr = ffi.from_buffer(buf, require_writable=True)
        except (TypeError, BufferError) as err:
            raise TransportError(f"cannot register: the buffer must be writable ({err})") from err
        length = len(ptr)
        if length == 0:
            ffi.release(ptr)
            raise TransportError("cannot register an empty buffer")
        access = lib.FI_READ | lib.FI_WRITE
        access |= lib.FI_REMOTE_READ if remote_read else 0
        access |= lib.FI_REMOTE_WRITE if remote_write else 0
        mr_p = ffi.new("void **")
        key_p = ffi.new("uint64_t *")
        desc_p = ffi.new("void **")
        with self._lock:
            requested = self._next_key
            self._next_key += 1
        rc = lib.hvt_mr_reg(self._h, ptr, length, access, requested, mr_p, key_p, desc_p)
        if rc:
            ffi.release(ptr)
            raise TransportError(f"fi_mr_reg of {length} bytes: {self._strerror(rc)}")
        base = int(ffi.cast("uintptr_t", ptr))
        addr = base if self.mr_mode & lib.FI_MR_VIRT_ADDR else 0
        mr = MemoryRegion(buf, addr, length, int(key_p[0]), remote_read=remote_read,
                          remote_write=remote_write,
                          handle=_MrHandle(ptr, mr_p[0], desc_p[0], base))
        with self._lock:
            self._mrs[id(mr)] = mr
        return mr

    def deregister(self, mr: MemoryRegion) -> None:
        with self._lock:
            known = self._mrs.pop(id(mr), None)
        if known is None:
            raise StateError(f"{mr!r} is not registered with this endpoint")
        self._close_mr(mr)

    def _close_mr(self, mr: MemoryRegion) -> None:
        h = mr.handle
        assert isinstance(h, _MrHandle)
        rc = self._lib.hvt_mr_close(h.mr)
        self._ffi.release(h.ptr)  # the buffer may be resized / closed again
        if rc:
            raise TransportError(f"fi_close(mr): {self._strerror(rc)}")

    # -- data path ------------------------------------------------------------------------
    def post_read(self, peer: Peer, local: MemoryRegion, local_off: int, remote: RemoteRegion,
                  remote_off: int, length: int, context: int) -> bool:
        return self._post(0, peer, local, local_off, remote, remote_off, length, context)

    def post_write(self, peer: Peer, local: MemoryRegion, local_off: int, remote: RemoteRegion,
                   remote_off: int, length: int, context: int) -> bool:
        return self._post(1, peer, local, local_off, remote, remote_off, length, context)

    def _post(self, write: int, peer: Peer, local: MemoryRegion, local_off: int,
              remote: RemoteRegion, remote_off: int, length: int, context: int) -> bool:
        self._check_open()
        h = local.handle
        if not isinstance(h, _MrHandle) or id(local) not in self._mrs:
            raise StateError(f"{local!r} is not registered with this endpoint")
        # The local side is ours to protect; the remote range is the TARGET's to check.
        if length <= 0 or local_off < 0 or local_off + length > local.length:
            raise TransportError(f"local range [{local_off}, +{length}) outside {local!r}")
        if peer.failed is not None:
            raise TransportError(f"connection to {peer.address} is broken by an earlier error "
                                 f"({peer.failed}); open a new endpoint")
        with self._lock:
            self._pending[context] = (length, peer)
        rc = self._lib.hvt_post(self._h, write, self._ffi.cast("void *", h.base + local_off),
                                length, h.desc, peer.handle, remote.addr + remote_off,
                                remote.key, context)
        if rc == 0:
            return True
        with self._lock:
            self._pending.pop(context, None)
        if rc == -self._lib.FI_EAGAIN:
            return False
        kind = "fi_write" if write else "fi_read"
        raise TransportError(f"{kind} to {peer.address}: {self._strerror(rc)}")

    def poll(self, max_entries: int = 64, timeout: float = 0.0) -> list[Completion]:
        self._check_open()
        if self._thread is not None:
            with self._cond:
                if not self._done and timeout > 0:
                    self._cond.wait(timeout)
                out: list[Completion] = []
                while self._done and len(out) < max_entries:
                    out.append(self._done.popleft())
                return out
        return self._read_cq(max_entries, int(timeout * 1000))

    def _read_cq(self, max_entries: int, timeout_ms: int) -> list[Completion]:
        ffi, lib = self._ffi, self._lib
        ctxs = ffi.new("uint64_t[64]")
        n = lib.hvt_cq_read(self._h, ctxs, min(max_entries, 64), timeout_ms)
        out: list[Completion] = []
        if n > 0:
            with self._lock:
                for i in range(n):
                    c = int(ctxs[i])
                    length = self._pending.pop(c, (0, None))[0]
                    out.append(Completion(c, True, None, length))
        elif n == -lib.FI_EAVAIL:
            ctx = ffi.new("uint64_t *")
            errno = ffi.new("int *")
            msg = ffi.new("struct hvt_err *")
            if lib.hvt_cq_readerr(self._h, ctx, errno, msg) > 0:
                c = int(ctx[0])
                with self._lock:
                    _, peer = self._pending.pop(c, (0, None))
                text = ffi.string(msg.msg).decode(errors="replace")
                if peer is not None and peer.failed is None:
                    # Like an RC QP that a remote access error moves to the Error state (IBTA
                    # vol. 1 s10.7.3.1), the tcp target drops the connection and ofi_rxm does
                    # not re-establish it: the peer stays failed for this endpoint.
                    peer.failed = text
                out.append(Completion(c, False, text))
        elif n != -lib.FI_EAGAIN:
            raise TransportError(f"fi_cq_read: {self._strerror(int(n))}")
        return out

    # -- progress -------------------------------------------------------------------------
    def start_progress(self) -> None:
        self._check_open()
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._progress_loop, daemon=True,
                                        name=f"hvt-progress-{self.address}")
        self._thread.start()

    def _progress_loop(self) -> None:
        while not self._stop:
            try:
                got = self._read_cq(64, 100)
            except TransportError:
                continue
            if got:
                with self._cond:
                    self._done.extend(got)
                    self._cond.notify_all()

    def stop_progress(self) -> None:
        t = self._thread
        if t is None:
            return
        self._stop = True
        self._lib.hvt_cq_signal(self._h)
        t.join()
        self._thread = None

    @property
    def max_outstanding(self) -> int:
        return self._tx_size

    def close(self) -> None:
        if self._closed:
            return
        self.stop_progress()
        self._closed = True
        with self._lock:
            mrs = list(self._mrs.values())
            self._mrs.clear()
        for mr in mrs:
            self._close_mr(mr)
        self._lib.hvt_close(self._h)
        self._h = self._ffi.NULL

    def _abandon(self) -> None:
        """After a timeout with ops in flight: stop using the endpoint, but leave it (and every
        registration) in place. A READ still in flight may land later, and tearing down an
        endpoint with ops outstanding can crash inside libfabric 1.17's tcp provider. The
        owner should exit soon; hvtools.migration.puller runs each pull in its own process.
        """
        self.stop_progress()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise StateError(f"transport endpoint {self.address} is closed")

    def _strerror(self, rc: int) -> str:
        return f"{self._ffi.string(self._lib.hvt_strerror(-rc)).decode()} ({rc})"

    def __repr__(self) -> str:
        return f"FabricEndpoint({self.provider}, {self.address})"


class _MrHandle:
    """The C-side state of a registration: the pinned pointer, fid_mr and descriptor."""

    __slots__ = ("base", "desc", "mr", "ptr")

    def __init__(self, ptr: Any, mr: Any, desc: Any, base: int) -> None:
        self.ptr = ptr
        self.mr = mr
        self.desc = desc
        self.base = base


def _name_to_text(raw: bytes, fmt: int, lib: Any) -> str:
    """An fi_getname() address as text: ``ip:port``, ``[ip6]:port``, or the FI_ADDR_STR name."""
    if fmt == lib.FI_SOCKADDR_IN:
        port = struct.unpack_from("!H", raw, 2)[0]
        return f"{ipaddress.IPv4Address(raw[4:8])}:{port}"
    if fmt == lib.FI_SOCKADDR_IN6:
        port = struct.unpack_from("!H", raw, 2)[0]
        return f"[{ipaddress.IPv6Address(raw[8:24])}]:{port}"
    if fmt == lib.FI_ADDR_STR:
        return raw.split(b"\0", 1)[0].decode()
    return "hex:" + raw.hex()


def _text_to_name(text: str, fmt: int, lib: Any) -> bytes:
    """The inverse of :func:`_name_to_text` (what fi_av_insert takes)."""
    try:
        if fmt in (lib.FI_SOCKADDR_IN, lib.FI_SOCKADDR_IN6):
            host, _, port_s = text.rpartition(":")
            ip = ipaddress.ip_address(host.strip("[]"))
            port = int(port_s)
            if isinstance(ip, ipaddress.IPv4Address):
                return struct.pack("=H", _AF_INET) + struct.pack("!H", port) + ip.packed + bytes(8)
            return (struct.pack("=H", _AF_INET6) + struct.pack("!HI", port, 0) + ip.packed
                    + bytes(4))
        if fmt == lib.FI_ADDR_STR:
            return text.encode() + b"\0"
        if text.startswith("hex:"):
            return bytes.fromhex(text[4:])
    except ValueError as err:
        raise TransportError(f"bad peer address {text!r}: {err}") from err
    raise TransportError(f"bad peer address {text!r} for this provider")
