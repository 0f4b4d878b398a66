"""vhost-user messages as values (QEMU docs/interop/vhost-user.rst, "Message specification").

PURE: bytes in, values out. The socket layer (``hvtools.vhost.server``) reads a 12-byte header
and ``size`` payload bytes with the SCM_RIGHTS fds that came with them and hands all three to
:func:`decode`. Every malformed input raises :class:`~hvtools.errors.VhostError` and nothing
else, which the fuzz test in ``tests/unit/test_vhost_protocol.py`` holds it to.

Header (all little-endian)::

    u32 request | u32 flags (bits 0-1 version = 1, bit 2 reply, bit 3 need_reply) | u32 size
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from enum import IntEnum

from hvtools.errors import VhostError

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
#: The largest payload we accept: SET_MEM_TABLE with VHOST_MEMORY_BASELINE_NREGIONS (8)
#: regions is 8 + 8*32 bytes; GET/SET_CONFIG carries at most 256 config bytes.
MAX_PAYLOAD = 4096
#: vhost-user.rst: "VHOST_MEMORY_BASELINE_NREGIONS 8" (the front-end sends at most this many
#: fds in one message without VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS).
MAX_REGIONS = 8
MAX_FDS = MAX_REGIONS
CONFIG_MAX = 256


class Request(IntEnum):
    """Front-end message types (vhost-user.rst "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers (vhost-user.rst "Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CONFIG = 9
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# Feature bits (virtio 1.2 s6 "Reserved Feature Bits"; linux/vhost_types.h; vhost-user.rst).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12
VHOST_F_LOG_ALL = 26
VIRTIO_RING_F_INDIRECT_DESC = 28
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_F_VERSION_1 = 32

#: SET_VRING_ADDR flags bit 0: log used-ring writes at log_guest_addr (linux/vhost_types.h).
VHOST_VRING_F_LOG = 1
#: SET_VRING_KICK/CALL/ERR u64: bits 0-7 the index, bit 8 "no fd" (vhost-user.rst).
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


@dataclass(frozen=True)
class MemRegion:
    """``VhostUserMemoryRegion``: u64 guest_phys_addr, memory_size, userspace_addr, mmap_offset."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass(frozen=True)
class VringState:
    """``struct vhost_vring_state``: u32 index, u32 num."""

    index: int
    num: int


@dataclass(frozen=True)
class VringAddr:
    """``struct vhost_vring_addr``: u32 index, u32 flags, u64 desc/used/avail user addresses
    (front-end virtual addresses), u64 log_guest_addr (guest-physical address of the used ring)."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


@dataclass(frozen=True)
class LogBase:
    """``VhostUserLog``: u64 mmap_size, u64 mmap_offset (+ the shm fd)."""

    mmap_size: int
    mmap_offset: int


@dataclass(frozen=True)
class ConfigSpace:
    """``VhostUserConfig``: u32 offset, u32 size, u32 flags, u8 payload[size]."""

    offset: int
    size: int
    flags: int
    payload: bytes


Payload = (int | VringState | VringAddr | LogBase | ConfigSpace | tuple[MemRegion, ...] | None)


@dataclass(frozen=True)
class Message:
    header: Header
    payload: Payload
    fds: tuple[int, ...] = ()

    @property
    def request(self) -> int:
        return self.header.request


_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")
_ADDR = struct.Struct("<IIQQQQ")
_LOG = struct.Struct("<QQ")
_MEMHDR = struct.Struct("<II")
_REGION = struct.Struct("<QQQQ")
_CONFIGHDR = struct.Struct("<III")

_U64_REQUESTS = frozenset({
    Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES, Request.SET_VRING_KICK,
    Request.SET_VRING_CALL, Request.SET_VRING_ERR, Request.SET_STATUS,
})
_STATE_REQUESTS = frozenset({
    Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE,
    Request.SET_VRING_ENABLE,
})
_EMPTY_REQUESTS = frozenset({
    Request.GET_FEATURES, Request.SET_OWNER, Request.RESET_OWNER,
    Request.GET_PROTOCOL_FEATURES, Request.GET_QUEUE_NUM, Request.RESET_DEVICE,
    Request.GET_STATUS, Request.GET_MAX_MEM_SLOTS,
})


def decode_header(data: bytes) -> Header:
    """The 12-byte header. Refuses a wrong version, a reply flag (front-ends send requests)
    and a payload larger than :data:`MAX_PAYLOAD`."""
    if len(data) != HEADER_SIZE:
        raise VhostError(f"truncated vhost-user header: {len(data)} of {HEADER_SIZE} bytes")
    request, flags, size = HEADER.unpack(data)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise VhostError(f"vhost-user version {flags & FLAG_VERSION_MASK}, expected {VERSION}")
    if flags & FLAG_REPLY:
        raise VhostError(f"request {request} carries the reply flag")
    if size > MAX_PAYLOAD:
        raise VhostError(f"request {request}: payload of {size} bytes (max {MAX_PAYLOAD})")
    return Header(request, flags, size)


def _exact(req: Request, payload: bytes, need: int) -> None:
    if len(payload) != need:
        raise VhostError(f"{req.name}: payload of {len(payload)} bytes, expected {need}")


def _fds(req: Request, fds: tuple[int, ...], need: int) -> None:
    if len(fds) != need:
        raise VhostError(f"{req.name}: {len(fds)} fds attached, expected {need}")


def decode(header: Header, payload: bytes, fds: tuple[int, ...] = ()) -> Message:
    """A whole message, with the fds that came with it checked against the request.

    The caller still owns (and on error must close) the fds.
    """
    if len(payload) != header.size:
        raise VhostError(f"payload of {len(payload)} bytes, header says {header.size}")
    if len(fds) > MAX_FDS:
        raise VhostError(f"{len(fds)} fds attached (max {MAX_FDS})")
    try:
        req = Request(header.request)
    except ValueError:
        raise VhostError(f"unknown vhost-user request {header.request}") from None
    body: Payload
    if req in _EMPTY_REQUESTS:
        # QEMU sends GET_* with size 0; tolerate a u64 body (some front-ends send one).
        if len(payload) not in (0, 8):
            raise VhostError(f"{req.name}: payload of {len(payload)} bytes, expected 0")
        _fds(req, fds, 0)
        body = None
    elif req in _U64_REQUESTS:
        _exact(req, payload, 8)
        (value,) = _U64.unpack(payload)
        if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            _fds(req, fds, 0 if value & VRING_NOFD_MASK else 1)
        else:
            _fds(req, fds, 0)
        body = value
    elif req in _STATE_REQUESTS:
        _exact(req, payload, _STATE.size)
        _fds(req, fds, 0)
        body = VringState(*_STATE.unpack(payload))
    elif req is Request.SET_VRING_ADDR:
        _exact(req, payload, _ADDR.size)
        _fds(req, fds, 0)
        body = VringAddr(*_ADDR.unpack(payload))
    elif req is Request.SET_LOG_BASE:
        _exact(req, payload, _LOG.size)
        _fds(req, fds, 1)
        body = LogBase(*_LOG.unpack(payload))
    elif req is Request.SET_LOG_FD:
        if len(payload) not in (0, 8):
            raise VhostError(f"{req.name}: payload of {len(payload)} bytes")
        _fds(req, fds, 1)
        body = None
    elif req is Request.SET_MEM_TABLE:
        body = _decode_mem_table(payload, fds)
    elif req in (Request.GET_CONFIG, Request.SET_CONFIG):
        body = _decode_config(req, payload)
        _fds(req, fds, 0)
    else:
        raise VhostError(f"unsupported vhost-user request {req.name}")
    return Message(header, body, fds)


def _decode_mem_table(payload: bytes, fds: tuple[int, ...]) -> tuple[MemRegion, ...]:
    req = Request.SET_MEM_TABLE
    if len(payload) < _MEMHDR.size:
        raise VhostError(f"{req.name}: payload of {len(payload)} bytes")
    nregions, _padding = _MEMHDR.unpack_from(payload)
    if not 1 <= nregions <= MAX_REGIONS:
        raise VhostError(f"{req.name}: {nregions} regions (1..{MAX_REGIONS})")
    # QEMU sends the full VhostUserMemory (8 region slots) or just nregions of them.
    if len(payload) not in (_MEMHDR.size + nregions * _REGION.size,
                            _MEMHDR.size + MAX_REGIONS * _REGION.size):
        raise VhostError(f"{req.name}: payload of {len(payload)} bytes for {nregions} regions")
    _fds(req, fds, nregions)
    regions = []
    for i in range(nregions):
        r = MemRegion(*_REGION.unpack_from(payload, _MEMHDR.size + i * _REGION.size))
        if r.memory_size == 0:
            raise VhostError(f"{req.name}: region {i} is empty")
        if r.guest_phys_addr + r.memory_size > 1 << 64 or r.mmap_offset + r.memory_size > 1 << 63:
            raise VhostError(f"{req.name}: region {i} wraps the address space")
        regions.append(r)
    spans = sorted((r.guest_phys_addr, r.guest_phys_addr + r.memory_size) for r in regions)
    for (_, end), (start, _) in itertools.pairwise(spans):
        if start < end:
            raise VhostError(f"{req.name}: regions overlap in guest-physical space")
    return tuple(regions)


def _decode_config(req: Request, payload: bytes) -> ConfigSpace:
    if len(payload) < _CONFIGHDR.size:
        raise VhostError(f"{req.name}: payload of {len(payload)} bytes")
    offset, size, flags = _CONFIGHDR.unpack_from(payload)
    body = payload[_CONFIGHDR.size:]
    if size > CONFIG_MAX or offset > CONFIG_MAX or offset + size > CONFIG_MAX:
        raise VhostError(f"{req.name}: config range {offset}+{size} beyond {CONFIG_MAX}")
    if len(body) != size:
        raise VhostError(f"{req.name}: {len(body)} config bytes, header says {size}")
    return ConfigSpace(offset, size, flags, bytes(body))


def encode_reply(request: int, body: bytes = b"") -> bytes:
    """A back-end reply: the request's own number, version 1 with the reply flag."""
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(body)) + body


def u64(value: int) -> bytes:
    return _U64.pack(value)


def vring_state(index: int, num: int) -> bytes:
    return _STATE.pack(index, num)


def config_reply(cfg: ConfigSpace, data: bytes) -> bytes:
    return _CONFIGHDR.pack(cfg.offset, cfg.size, cfg.flags) + data


def encode_request(request: int, body: bytes = b"", *, need_reply: bool = False,
                   flags: int | None = None) -> bytes:
    """A front-end message (tests and tools that play QEMU's part)."""
    if flags is None:
        flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(body)) + body


def mem_table(regions: list[MemRegion]) -> bytes:
    out = _MEMHDR.pack(len(regions), 0)
    for r in regions:
        out += _REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
    return out


def vring_addr(a: VringAddr) -> bytes:
    return _ADDR.pack(a.index, a.flags, a.desc_user_addr, a.used_user_addr, a.avail_user_addr,
                      a.log_guest_addr)
