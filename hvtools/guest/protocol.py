"""Wire format between the host and the guest agent (``src/hvagent.c``). Pure: bytes in, values out.

The agent listens on the virtio-serial port ``org.hvtools.agent.0``; the host reaches it through
QEMU's chardev socket. Both directions carry the same frames, all integers little-endian::

    offset size  field
    0      4     magic  b"HVAG"
    4      1     version (1)
    5      1     type (FrameType)
    6      2     reserved, 0
    8      4     request id (u32), chosen by the host, echoed on every reply frame
    12     4     payload length (u32), at most MAX_PAYLOAD
    16     4     CRC-32 (zlib) of bytes 0..15
    20     len   payload

Payloads by type (host -> guest: PING, EXEC; guest -> host: the rest):

- PING: empty. PONG: ``key=value`` strings, each NUL-terminated (``proto``, ``release``,
  ``machine``, ``hostname``, ``uptime_ms``, ``pid``, ``mem_total_kb``).
- EXEC: ``u32 timeout_ms`` (0: none), ``u32 flags`` (0), ``u32 argc``, ``u32 stdin_len``, then argc
  NUL-terminated argv strings, then stdin_len bytes of stdin. The guest runs it with fork/execvp
  and ``PATH=/bin:/sbin:/usr/bin:/usr/sbin`` in a new session; when the timeout runs out it
  SIGKILLs the session and reports ExitKind.TIMEOUT. Up to 8 commands run at once.
- STDOUT, STDERR: a chunk of the command's output; any number, in order, before its EXIT.
- EXIT: ``i32 status`` (exit code, or 128+signal), ``u8 kind`` (ExitKind), ``u8 signal``,
  ``u16`` 0, ``u64`` run time in ns (guest clock). Ends an EXEC.
- ERROR: ``i32 status``, ``i32 errno``, UTF-8 message. Ends the request. ``status`` is 127
  (command not found) or 126 (not executable) when exec failed, -1 when the request was refused
  (malformed, oversized, agent busy).

Resynchronisation: a reader skips bytes until a magic whose header CRC checks, so fragments left
in the port from an earlier connection are dropped; a frame with a valid header whose length
exceeds MAX_PAYLOAD is rejected and its payload skipped. Request ids let the host drop whole
frames that belong to an earlier connection: after connecting it sends a PING with a fresh id and
ignores everything until that PONG arrives.

Hang-ups: when the host side of the port closes, the agent kills the commands it was running and
drops unsent output. It learns of the hang-up from the port's POLLHUP; a host that reconnects
before the agent has run again can find an earlier connection's commands still running (each
EXEC from :class:`~hvtools.guest.agent.AgentClient` carries a timeout, so they end anyway).
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

MAGIC = b"HVAG"
VERSION = 1
HEADER_SIZE = 20
MAX_PAYLOAD = 1 << 20
MAX_ARGS = 4096
_HEADER = struct.Struct("<4sBBHII")  # bytes 0..15; the CRC follows
_CRC = struct.Struct("<I")
_EXEC = struct.Struct("<IIII")
_EXIT = struct.Struct("<iBBHQ")
_ERROR = struct.Struct("<ii")


class ProtocolError(ValueError):
    """A payload that does not follow the format above, or a value that cannot be encoded."""


class FrameType(enum.IntEnum):
    """The ``type`` byte of a frame."""

    PING = 1
    PONG = 2
    EXEC = 3
    STDOUT = 4
    STDERR = 5
    EXIT = 6
    ERROR = 7


class ExitKind(enum.IntEnum):
    """How an EXEC'd command ended."""

    EXITED = 0
    SIGNALED = 1
    TIMEOUT = 2  # the agent killed it when its timeout ran out


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    type: FrameType
    req_id: int
    payload: bytes = b""


@dataclass(frozen=True)
class Rejected:
    """A frame with a valid header that the decoder refused; its payload was skipped."""

    req_id: int
    type: int
    length: int
    reason: str


@dataclass(frozen=True)
class ExecRequest:
    """The payload of an EXEC frame."""

    argv: tuple[str, ...]
    stdin: bytes = b""
    timeout_ms: int = 0


@dataclass(frozen=True)
class ExitStatus:
    """The payload of an EXIT frame."""

    status: int
    kind: ExitKind
    signal: int = 0
    duration_ns: int = 0


@dataclass(frozen=True)
class ErrorReply:
    """The payload of an ERROR frame."""

    status: int
    errno: int
    message: str


def encode_frame(ftype: FrameType, req_id: int, payload: bytes = b"") -> bytes:
    """Serialise one frame."""
    if not 0 <= req_id <= 0xFFFFFFFF:
        raise ProtocolError(f"request id {req_id} does not fit in u32")
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD})")
    head = _HEADER.pack(MAGIC, VERSION, int(ftype), 0, req_id, len(payload))
    return head + _CRC.pack(zlib.crc32(head)) + payload


class FrameDecoder:
    """Incremental decoder: feed it bytes in any split, get whole frames back.

    Never raises on input: garbage is skipped (counted in ``skipped``) and refused frames come
    back as :class:`Rejected` values.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.skipped = 0
        self._buf = bytearray()
        self._discard = 0

    @property
    def buffered(self) -> int:
        """Bytes held back waiting for the rest of a frame."""
        return len(self._buf)

    def reset(self) -> None:
        """Forget partial input (after a reconnect)."""
        self._buf.clear()
        self._discard = 0

    def feed(self, data: bytes) -> list[Frame | Rejected]:
        """Add ``data``; return every frame it completes, in order."""
        self._buf += data
        out: list[Frame | Rejected] = []
        buf = self._buf
        while True:
            if self._discard:
                n = min(self._discard, len(buf))
                del buf[:n]
                self._discard -= n
                if self._discard:
                    break
            start = buf.find(MAGIC)
            if start < 0:
                # keep a tail that may be the start of a magic
                keep = next(
                    (k for k in range(min(len(MAGIC) - 1, len(buf)), 0, -1)
                     if buf.endswith(MAGIC[:k])),
                    0,
                )
                self.skipped += len(buf) - keep
                del buf[: len(buf) - keep]
                break
            if start:
                self.skipped += start
                del buf[:start]
            if len(buf) < HEADER_SIZE:
                break
            _, version, ftype, _, req_id, length = _HEADER.unpack_from(buf)
            (crc,) = _CRC.unpack_from(buf, 16)
            if crc != zlib.crc32(buf[:16]):
                self.skipped += 1
                del buf[:1]
                continue
            reason = None
            if version != VERSION:
                reason = f"protocol version {version}, expected {VERSION}"
            elif length > self.max_payload:
                reason = f"payload of {length} bytes exceeds the limit of {self.max_payload}"
            elif ftype not in FrameType._value2member_map_:
                reason = f"unknown frame type {ftype}"
            if reason is not None:
                out.append(Rejected(req_id, ftype, length, reason))
                del buf[:HEADER_SIZE]
                self._discard = length
                continue
            if len(buf) < HEADER_SIZE + length:
                break
            payload = bytes(buf[HEADER_SIZE : HEADER_SIZE + length])
            out.append(Frame(FrameType(ftype), req_id, payload))
            del buf[: HEADER_SIZE + length]
        return out


# -- payloads -----------------------------------------------------------------------------------


def encode_exec(req: ExecRequest) -> bytes:
    """EXEC payload."""
    if not req.argv:
        raise ProtocolError("argv is empty")
    if len(req.argv) > MAX_ARGS:
        raise ProtocolError(f"{len(req.argv)} arguments exceed the limit of {MAX_ARGS}")
    if not 0 <= req.timeout_ms <= 0xFFFFFFFF:
        raise ProtocolError(f"timeout of {req.timeout_ms} ms does not fit in u32")
    args = []
    for a in req.argv:
        try:
            raw = a.encode(errors="surrogateescape")  # os.fsdecode()'d bytes round-trip
        except UnicodeEncodeError as err:
            raise ProtocolError(f"argument {a!r} cannot be encoded: {err}") from None
        if b"\0" in raw:
            raise ProtocolError(f"argument {a!r} contains a NUL byte")
        args.append(raw + b"\0")
    payload = (
        _EXEC.pack(req.timeout_ms, 0, len(req.argv), len(req.stdin)) + b"".join(args) + req.stdin
    )
    if len(payload) > MAX_PAYLOAD:
        raise ProtocolError(
            f"EXEC of {len(payload)} bytes (argv + stdin) exceeds MAX_PAYLOAD ({MAX_PAYLOAD})"
        )
    return payload


def decode_exec(payload: bytes) -> ExecRequest:
    """Parse an EXEC payload (what the agent does in C)."""
    if len(payload) < _EXEC.size:
        raise ProtocolError(f"EXEC payload of {len(payload)} bytes is shorter than its header")
    timeout_ms, _flags, argc, stdin_len = _EXEC.unpack_from(payload)
    if not 1 <= argc <= MAX_ARGS:
        raise ProtocolError(f"bad argc {argc}")
    if stdin_len > len(payload) - _EXEC.size:
        raise ProtocolError(f"stdin length {stdin_len} exceeds the payload")
    body = payload[_EXEC.size : len(payload) - stdin_len]
    parts = body.split(b"\0")
    if len(parts) != argc + 1 or parts[-1]:
        raise ProtocolError(f"argv does not hold exactly {argc} NUL-terminated strings")
    argv = tuple(p.decode(errors="surrogateescape") for p in parts[:-1])
    return ExecRequest(argv, payload[len(payload) - stdin_len :], timeout_ms)


def encode_exit(st: ExitStatus) -> bytes:
    """EXIT payload."""
    return _EXIT.pack(st.status, int(st.kind), st.signal, 0, st.duration_ns)


def decode_exit(payload: bytes) -> ExitStatus:
    """Parse an EXIT payload."""
    if len(payload) != _EXIT.size:
        raise ProtocolError(f"EXIT payload is {len(payload)} bytes, expected {_EXIT.size}")
    status, kind, sig, _, duration = _EXIT.unpack(payload)
    try:
        exit_kind = ExitKind(kind)
    except ValueError:
        raise ProtocolError(f"unknown exit kind {kind}") from None
    return ExitStatus(status, exit_kind, sig, duration)


def encode_error(err: ErrorReply) -> bytes:
    """ERROR payload."""
    return _ERROR.pack(err.status, err.errno) + err.message.encode()


def decode_error(payload: bytes) -> ErrorReply:
    """Parse an ERROR payload."""
    if len(payload) < _ERROR.size:
        raise ProtocolError(f"ERROR payload of {len(payload)} bytes is shorter than its header")
    status, errno = _ERROR.unpack_from(payload)
    return ErrorReply(status, errno, payload[_ERROR.size :].decode(errors="replace"))


def encode_pong(info: Mapping[str, str]) -> bytes:
    """PONG payload."""
    out = []
    for k, v in info.items():
        item = f"{k}={v}".encode()
        if "=" in k or b"\0" in item:
            raise ProtocolError(f"cannot encode PONG item {k!r}={v!r}")
        out.append(item + b"\0")
    return b"".join(out)


def decode_pong(payload: bytes) -> dict[str, str]:
    """Parse a PONG payload into its ``key=value`` strings."""
    if payload and not payload.endswith(b"\0"):
        raise ProtocolError("PONG payload is not NUL-terminated")
    info: dict[str, str] = {}
    for item in payload.split(b"\0")[:-1]:
        key, sep, value = item.decode(errors="replace").partition("=")
        if not sep:
            raise ProtocolError(f"PONG item {item!r} has no '='")
        info[key] = value
    return info

