"""Host client of the guest agent: run commands in a guest over its virtio-serial port.

QEMU exposes the port as a UNIX socket (``-chardev socket,id=agent0,path=SOCK,server=on,wait=off``
plus ``-device virtserialport,chardev=agent0,name=org.hvtools.agent.0``). The wire format is in
:mod:`hvtools.guest.protocol`. Plain blocking sockets with timeouts; one request at a time.
"""

from __future__ import annotations

import math
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from hvtools.errors import AgentError, HvTimeout, UsageError
from hvtools.guest.protocol import (
    ExecRequest,
    ExitKind,
    Frame,
    FrameDecoder,
    FrameType,
    ProtocolError,
    Rejected,
    decode_error,
    decode_exit,
    decode_pong,
    encode_exec,
    encode_frame,
)

#: Extra time the host waits past an EXEC's own timeout before it gives up on the EXIT frame.
EXEC_GRACE_S = 10.0
#: How often an unanswered PING is repeated while syncing.
PING_RESEND_S = 1.0
_INT_KEYS = ("proto", "pid", "mem_total_kb")
_T = TypeVar("_T")


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one command run by the agent.

    ``status`` is the exit code, 128+N for a command killed by signal N, 127/126 when it could
    not be executed (the reason is then in ``stderr``). ``duration_s`` is the run time the guest
    measured (the host's round-trip time when the command did not start). ``timed_out`` says the
    agent killed the command because its timeout ran out.
    """

    argv: tuple[str, ...]
    status: int
    stdout: bytes
    stderr: bytes
    duration_s: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.status == 0 and not self.timed_out

    def check(self) -> ExecResult:
        """Return self, or raise AgentError naming the command, status and stderr tail."""
        if not self.ok:
            why = "timed out" if self.timed_out else f"exited with status {self.status}"
            tail = self.stderr.decode(errors="replace").strip().splitlines()[-3:]
            raise AgentError(f"guest command {list(self.argv)} {why}: {' | '.join(tail)}")
        return self


class _Disconnected(AgentError):
    """The socket closed under us (QEMU went away, or another client holds the port)."""


class AgentClient:
    """A connection to one guest agent.

    QEMU's chardev serves one connection at a time: a second client to the same VM gets no
    answer until the first one closes.
    """

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = Path(socket_path)
        self._sock: socket.socket | None = None
        self._decoder = FrameDecoder()
        self._pending: deque[Frame | Rejected] = deque()
        self._next_id = secrets.randbits(32)

    # -- connection -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the socket is open."""
        return self._sock is not None

    def connect(self, timeout: float = 5.0) -> None:
        """Connect to the socket and PING until the agent answers (dropping stale frames)."""
        deadline = time.monotonic() + timeout
        self._open(timeout)
        try:
            self._sync(deadline, None, 0.25)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the socket. The guest kills commands still running for this connection."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._decoder.reset()
        self._pending.clear()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open(self, timeout: float) -> None:
        self.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(timeout, 0.001))
        try:
            sock.connect(str(self.socket_path))
        except OSError as err:
            sock.close()
            raise _Disconnected(
                f"cannot connect to the agent socket {self.socket_path}: {err}"
            ) from err
        self._sock = sock

    # -- requests -------------------------------------------------------------------------------

    def ping(self, timeout: float = 5.0) -> dict[str, object]:
        """Round-trip a PING; return the guest's facts (release, uptime_s, ...) and rtt_s."""
        start = time.monotonic()
        req_id = self._send(FrameType.PING)
        deadline = start + timeout
        while True:
            item = self._recv(deadline)
            if item is None:
                raise HvTimeout(f"guest agent on {self.socket_path} did not answer a PING "
                                f"within {timeout:.1f} s")
            if item.req_id != req_id:
                continue
            if isinstance(item, Frame) and item.type is FrameType.PONG:
                return _pong_info(item.payload, time.monotonic() - start)
            raise AgentError(f"guest agent answered PING with {_describe(item)}")

    def exec(
        self, argv: Sequence[str], *, timeout: float = 60.0, stdin: bytes = b""
    ) -> ExecResult:
        """Run ``argv`` in the guest; return its status and output.

        The agent kills the command after ``timeout`` seconds (``timed_out`` is then set). Raises
        AgentError when the agent refuses the request or the connection drops, HvTimeout when no
        EXIT arrives within ``timeout`` plus a grace period.
        """
        args = _check_argv(argv)
        if not timeout > 0:
            raise UsageError(f"exec timeout must be positive, got {timeout}")
        try:
            payload = encode_exec(ExecRequest(args, stdin, math.ceil(timeout * 1000)))
        except ProtocolError as err:
            raise UsageError(f"cannot send {list(args)} to the guest: {err}") from err
        start = time.monotonic()
        req_id = self._send(FrameType.EXEC, payload)
        deadline = start + timeout + EXEC_GRACE_S
        out, err_out = bytearray(), bytearray()
        while True:
            item = self._recv(deadline)
            if item is None:
                raise HvTimeout(
                    f"guest command {list(args)} sent no exit status within "
                    f"{timeout + EXEC_GRACE_S:.1f} s"
                )
            if item.req_id != req_id:
                continue  # stale frame of an earlier request or connection
            if isinstance(item, Rejected):
                raise AgentError(f"bad frame from the guest agent for {list(args)}: {item.reason}")
            if item.type is FrameType.STDOUT:
                out += item.payload
            elif item.type is FrameType.STDERR:
                err_out += item.payload
            elif item.type is FrameType.EXIT:
                st = _decode(decode_exit, item)
                return ExecResult(
                    args,
                    st.status,
                    bytes(out),
                    bytes(err_out),
                    st.duration_ns / 1e9,
                    st.kind is ExitKind.TIMEOUT,
                )
            elif item.type is FrameType.ERROR:
                er = _decode(decode_error, item)
                if er.status < 0:
                    raise AgentError(f"guest agent refused {list(args)}: {er.message}")
                err_out += er.message.encode() + b"\n"
                return ExecResult(
                    args, er.status, bytes(out), bytes(err_out), time.monotonic() - start, False
                )
            else:
                raise AgentError(f"guest agent answered EXEC with {_describe(item)}")

    def poweroff(self, timeout: float = 30.0) -> None:
        """Run ``poweroff -f`` in the guest and wait until QEMU exits (closing the socket).

        With ``-no-shutdown`` QEMU stays up after the guest powers off, and this times out.
        """
        req_id = self._send(FrameType.EXEC, encode_exec(ExecRequest(("poweroff", "-f"), b"", 0)))
        deadline = time.monotonic() + timeout
        try:
            while (item := self._recv(deadline)) is not None:
                if item.req_id == req_id and (
                    isinstance(item, Rejected) or item.type in (FrameType.EXIT, FrameType.ERROR)
                ):
                    raise AgentError(f"`poweroff -f` failed in the guest: {_describe(item)}")
        except _Disconnected:
            self.close()
            return
        raise HvTimeout(f"the guest did not power off within {timeout:.1f} s")

    # -- plumbing -------------------------------------------------------------------------------

    def _send(self, ftype: FrameType, payload: bytes = b"") -> int:
        if self._sock is None:
            raise AgentError(f"not connected to the guest agent on {self.socket_path}")
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        req_id = self._next_id
        try:
            self._sock.settimeout(30.0)
            self._sock.sendall(encode_frame(ftype, req_id, payload))
        except OSError as err:
            self.close()
            raise _Disconnected(
                f"lost the guest agent connection {self.socket_path}: {err}"
            ) from err
        return req_id

    def _recv(self, until: float) -> Frame | Rejected | None:
        """Next frame, or None once ``until`` (monotonic) passes."""
        while not self._pending:
            if self._sock is None:
                raise AgentError(f"not connected to the guest agent on {self.socket_path}")
            remaining = until - time.monotonic()
            if remaining <= 0:
                return None
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(1 << 16)
            except TimeoutError:
                return None
            except OSError as err:
                self.close()
                raise _Disconnected(
                    f"lost the guest agent connection {self.socket_path}: {err}"
                ) from err
            if not data:
                self.close()
                raise _Disconnected(
                    f"guest agent connection {self.socket_path} closed (did the VM stop?)"
                )
            self._pending.extend(self._decoder.feed(data))
        return self._pending.popleft()

    def _sync(
        self, deadline: float, alive: Callable[[], bool] | None, poll: float
    ) -> dict[str, object]:
        """PING until one of our PINGs is answered; drop everything else."""
        sent: dict[int, float] = {}
        next_ping = 0.0
        while True:
            now = time.monotonic()
            if alive is not None and not alive():
                raise AgentError(
                    f"the VM stopped before its guest agent answered on {self.socket_path}"
                )
            if now >= deadline:
                raise HvTimeout(
                    f"guest agent on {self.socket_path} did not answer a PING in time"
                )
            if now >= next_ping:
                sent[self._send(FrameType.PING)] = now
                next_ping = now + PING_RESEND_S
            item = self._recv(min(deadline, next_ping, now + poll))
            if (
                isinstance(item, Frame)
                and item.type is FrameType.PONG
                and item.req_id in sent
            ):
                return _pong_info(item.payload, time.monotonic() - sent[item.req_id])


def wait_for_agent(
    socket_path: Path,
    *,
    timeout: float,
    alive: Callable[[], bool] | None = None,
    poll: float = 0.05,
) -> AgentClient:
    """Connect to the agent as soon as it answers, retrying until ``timeout`` runs out.

    ``alive`` is called between attempts; when it returns False (the VM died) this stops with
    AgentError. Raises HvTimeout when the agent has not answered in time.
    """
    deadline = time.monotonic() + timeout
    client = AgentClient(socket_path)
    last: Exception | None = None
    while True:
        if alive is not None and not alive():
            raise AgentError(f"the VM stopped before its guest agent answered on {socket_path}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HvTimeout(
                f"guest agent on {socket_path} did not answer within {timeout:.1f} s"
                + (f" (last error: {last})" if last else "")
            )
        try:
            client._open(min(remaining, 1.0))
            client._sync(deadline, alive, poll)
            return client
        except _Disconnected as err:
            last = err
            client.close()
            time.sleep(min(poll, max(deadline - time.monotonic(), 0)))
        except BaseException:
            client.close()
            raise


def _check_argv(argv: Sequence[str]) -> tuple[str, ...]:
    if isinstance(argv, str | bytes):
        raise UsageError(f"argv must be a sequence of strings, not {argv!r}")
    args = tuple(argv)
    if not args or not all(isinstance(a, str) for a in args):
        raise UsageError(f"argv must be a non-empty sequence of strings, got {argv!r}")
    return args


def _decode(fn: Callable[[bytes], _T], frame: Frame) -> _T:
    try:
        return fn(frame.payload)
    except ProtocolError as err:
        raise AgentError(f"malformed {frame.type.name} frame from the guest agent: {err}") from err


def _describe(item: Frame | Rejected) -> str:
    if isinstance(item, Rejected):
        return f"a rejected frame ({item.reason})"
    try:
        if item.type is FrameType.ERROR:
            return f"ERROR: {decode_error(item.payload).message}"
        if item.type is FrameType.EXIT:
            return f"EXIT status {decode_exit(item.payload).status}"
    except ProtocolError:
        pass
    return f"an unexpected {item.type.name} frame"


def _pong_info(payload: bytes, rtt: float) -> dict[str, object]:
    try:
        raw = decode_pong(payload)
    except ProtocolError as err:
        raise AgentError(f"malformed PONG from the guest agent: {err}") from err
    info: dict[str, object] = dict(raw)
    for key in _INT_KEYS:
        if key in raw and raw[key].isdigit():
            info[key] = int(raw[key])
    if raw.get("uptime_ms", "").isdigit():
        info["uptime_s"] = int(raw["uptime_ms"]) / 1000
        del info["uptime_ms"]
    info["rtt_s"] = rtt
    return info
