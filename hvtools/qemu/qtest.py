"""QEMU driven through the qtest protocol: a device-level test bench with no guest software.

QEMU's qtest server (QEMU docs/devel/testing/qtest.rst, "QTest Protocol"; system/qtest.c)
reads one command per line on the ``-qtest`` character device and answers each with a line
``OK [VALUE...]``, ``FAIL ...`` or ``ERR ...``; asynchronous ``IRQ raise|lower N`` lines may
come before an answer. The chardev ``unix:PATH`` makes QEMU *connect* to PATH (a client
socket, as libqtest sets it up), so :class:`QtestQemu` listens first, starts QEMU and accepts
its connection; the socket file is removed as soon as QEMU is connected.

Clock. Under ``-accel qtest`` nothing runs on its own: the virtual clock moves only on
``clock_step``. Distribution builds may leave the qtest accelerator out (Debian's 10.0.2 does:
``-accel qtest`` -> "invalid accelerator qtest"); :func:`qtest_accel_available` probes for it
and :attr:`QtestAccel.TCG_IDLE` is the stand-in: TCG with a firmware image that is nothing but
``HLT`` (so no guest code ever runs), ``-icount shift=0,sleep=off`` (an idle machine's virtual
clock jumps straight to the next timer deadline, QEMU docs/devel/tcg-icount.rst) and the PIT off
(its free-running channel would otherwise keep the clock warping, a busy loop). Timers then fire
as soon as they are armed, and :meth:`QtestQemu.clock_step` is a no-op there.

Lifetime: :meth:`QtestQemu.close` closes the protocol socket, stops QEMU with SIGTERM (SIGKILL
after a grace period) and removes its temporary directory; QEMU also gets SIGKILL through
``PR_SET_PDEATHSIG`` if this process dies first, so no QEMU outlives its test.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import functools
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from types import TracebackType

from hvtools.errors import HvTimeout, StateError, UsageError, VmCrashed, VmError, VmLaunchFailure
from hvtools.qemu.binary import qemu_path

#: Largest payload sent or fetched in one ``b64write``/``b64read`` command.
CHUNK = 64 << 10
#: One x86 ``HLT`` instruction, repeated to fill a 64 KiB BIOS image (legacy ``-bios`` images
#: must be a multiple of 64 KiB); the reset vector at 0xFFFFFFF0 lands on one.
_HLT = b"\xf4"
_PR_SET_PDEATHSIG = 1


class QtestError(VmError):
    """QEMU answered a qtest command with ``FAIL``/``ERR`` or outside the protocol. Carries the
    command line sent and the reply."""

    def __init__(self, command: str, reply: str) -> None:
        super().__init__(f"qtest {command!r} failed: {reply!r}")
        self.command = command
        self.reply = reply


class QtestState(StrEnum):
    """Where a :class:`QtestQemu` is in its life."""

    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


class QtestAccel(StrEnum):
    """How time is kept (see the module docstring)."""

    QTEST = "qtest"  # -accel qtest: the virtual clock moves on clock_step only
    TCG_IDLE = "tcg-idle"  # -accel tcg on a halted CPU with icount sleep=off, PIT off


@functools.lru_cache(maxsize=8)
def qtest_accel_available(binary: Path) -> bool:
    """Whether ``binary`` has the qtest accelerator (``-accel help`` never lists it, so the
    probe starts a machine-less QEMU with it and quits through the monitor)."""
    try:
        res = subprocess.run(
            [str(binary), "-machine", "none", "-accel", "qtest", "-nodefaults", "-display",
             "none", "-monitor", "stdio"], input="quit\n", capture_output=True, text=True,
            timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def _reap(proc: subprocess.Popen[bytes], workdir: Path) -> None:
    """Last resort for a QtestQemu dropped without close(): kill QEMU, remove its files."""
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    shutil.rmtree(workdir, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the process that started QEMU dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class QtestQemu:
    """One ``qemu-system-x86_64`` under qtest: a typed client for the protocol's commands.

    ``args`` are extra QEMU arguments (devices); the machine, RAM size, accelerator and qtest
    chardev are added here. Use as a context manager, or :meth:`start` / :meth:`close`.
    """

    def __init__(self, args: Sequence[str] = (), *, machine: str = "q35",
                 memory_mib: int = 256, binary: Path | None = None,
                 accel: QtestAccel | None = None, timeout: float = 10.0,
                 name: str = "qtest") -> None:
        if memory_mib <= 0:
            raise UsageError(f"memory_mib={memory_mib} is not positive")
        self.args = list(args)
        self.machine = machine
        self.memory_mib = memory_mib
        self.binary = binary or qemu_path()
        self.timeout = timeout
        self.name = name
        self._accel = accel
        self._state = QtestState.NEW
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._rfile: _LineReader | None = None
        self._finalizer: (weakref.finalize[[subprocess.Popen[bytes], Path], QtestQemu]
                          | None) = None
        self.command_line: list[str] = []
        #: Asynchronous ``IRQ ...`` lines received so far, in order.
        self.irqs: list[str] = []

    # -- life cycle -------------------------------------------------------------------------

    @property
    def state(self) -> QtestState:
        return self._state

    @property
    def accel(self) -> QtestAccel:
        """The accelerator in use (probed on first use when not given)."""
        if self._accel is None:
            self._accel = (QtestAccel.QTEST if qtest_accel_available(self.binary)
                           else QtestAccel.TCG_IDLE)
        return self._accel

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def ram_size(self) -> int:
        return self.memory_mib << 20

    def _argv(self, sock_path: Path, workdir: Path) -> list[str]:
        machine = self.machine
        accel: list[str]
        if self.accel is QtestAccel.QTEST:
            accel = ["-accel", "qtest"]
        else:
            firmware = workdir / "halt.bin"
            firmware.write_bytes(_HLT * 0x10000)
            machine += ",pit=off"
            accel = ["-accel", "tcg", "-icount", "shift=0,sleep=off", "-bios", str(firmware)]
        return [str(self.binary), "-machine", machine, *accel, "-m", f"{self.memory_mib}M",
                "-nodefaults", "-display", "none", "-qtest", f"unix:{sock_path}",
                "-qtest-log", "none", *self.args]

    def start(self) -> QtestQemu:
        """Start QEMU and wait for its qtest connection.

        Raises :class:`VmLaunchFailure` (with the command line, exit code and log) when QEMU
        exits or does not connect within ``timeout``.
        """
        if self._state is not QtestState.NEW:
            raise StateError(f"qtest QEMU is {self._state}; start() needs {QtestState.NEW}")
        self._dir = Path(tempfile.mkdtemp(prefix="hvtools-qtest-"))
        sock_path = self._dir / "qtest.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(sock_path))
            listener.listen(1)
            listener.settimeout(0.05)
            self.command_line = self._argv(sock_path, self._dir)
            with open(self._dir / "qemu.log", "wb") as log:
                self._proc = subprocess.Popen(
                    self.command_line, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    cwd=self._dir, preexec_fn=_die_with_parent)
            self._finalizer = weakref.finalize(self, _reap, self._proc, self._dir)
            conn = self._accept(listener)
        except BaseException:
            listener.close()
            self._teardown()
            self._state = QtestState.CLOSED
            raise
        listener.close()
        sock_path.unlink(missing_ok=True)
        conn.settimeout(self.timeout)
        self._sock = conn
        self._rfile = _LineReader(conn)
        self._state = QtestState.RUNNING
        # QEMU connects before it creates the machine's devices and serves commands only
        # from its main loop: the first answer says the machine is complete.
        try:
            self.command("endianness")
        except (VmCrashed, HvTimeout) as err:
            code = None if self._proc is None else self._proc.poll()
            tail = err.log_tail if isinstance(err, VmCrashed) else []
            self.close()
            raise VmLaunchFailure(f"QEMU exited during start-up: {tail[-1] if tail else err}",
                                  command=self.command_line, exit_code=code,
                                  log_tail=tail) from err
        return self

    def _accept(self, listener: socket.socket) -> socket.socket:
        assert self._proc is not None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                conn, _ = listener.accept()
                return conn
            except TimeoutError:
                pass
            code = self._proc.poll()
            if code is not None:
                raise VmLaunchFailure(f"QEMU exited with status {code} before connecting to "
                                      f"qtest: {self._last_line()}", command=self.command_line,
                                      exit_code=code, log_tail=self.log_tail())
            if time.monotonic() > deadline:
                raise VmLaunchFailure(f"QEMU did not connect to qtest within "
                                      f"{self.timeout:.0f}s", command=self.command_line,
                                      log_tail=self.log_tail())

    def close(self) -> int | None:
        """Stop QEMU (SIGTERM, then SIGKILL after 5 s) and remove its files. Returns QEMU's
        exit status (None if it never started). Safe to call more than once."""
        if self._state is QtestState.CLOSED:
            return None if self._proc is None else self._proc.returncode
        code = self._teardown()
        self._state = QtestState.CLOSED
        return code

    def _teardown(self) -> int | None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        code = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            code = self._proc.returncode
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        if self._finalizer is not None:
            self._finalizer.detach()
        return code

    def __enter__(self) -> QtestQemu:
        if self._state is QtestState.NEW:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def log_tail(self, lines: int = 20) -> list[str]:
        """The last lines QEMU printed (stdout and stderr)."""
        if self._dir is None:
            return []
        try:
            text = (self._dir / "qemu.log").read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-lines:]

    def _last_line(self) -> str:
        tail = self.log_tail(1)
        return tail[0] if tail else "no output"

    # -- the protocol -----------------------------------------------------------------------

    def command(self, line: str) -> list[str]:
        """Send one command line; return the words after ``OK``. IRQ lines that arrive first
        are kept in :attr:`irqs`."""
        return self.batch([line])[0]

    def batch(self, lines: Sequence[str]) -> list[list[str]]:
        """Send ``lines`` in one socket write and return the words after each ``OK``, in order.

        QEMU's qtest server handles every complete line it has received before it returns to
        its main loop (system/qtest.c ``qtest_process_inbuf``), so no bottom half or timer runs
        between the commands of one batch: what a device sees is back-to-back accesses (two
        doorbell writes while the first DMA is still pending, say). A ``FAIL``/``ERR`` reply
        raises :class:`QtestError` after every reply of the batch has been read.
        """
        if self._state is not QtestState.RUNNING:
            raise StateError(f"qtest QEMU is {self._state}; commands need "
                             f"{QtestState.RUNNING}")
        if not lines or any("\n" in line for line in lines):
            raise UsageError("a qtest batch needs one or more single-line commands")
        assert self._sock is not None and self._rfile is not None
        replies: list[str] = []
        try:
            self._sock.sendall("".join(f"{line}\n" for line in lines).encode())
            while len(replies) < len(lines):
                reply = self._rfile.readline()
                if reply is None:
                    raise self._crashed()
                if reply.startswith("IRQ "):
                    self.irqs.append(reply)
                    continue
                replies.append(reply)
        except TimeoutError as err:
            # A late answer would pair with the next command: this session is over.
            tail = self.log_tail()
            self._state = QtestState.CLOSED
            self._teardown()
            what = (f"qtest {lines[0].partition(' ')[0]!r} got no answer" if len(lines) == 1 else
                    f"qtest batch of {len(lines)} commands got {len(replies)} answers")
            raise HvTimeout(f"{what} within {self.timeout:.0f}s; QEMU is closed: "
                            f"{tail[-1] if tail else 'no output'}") from err
        except OSError as err:
            raise self._crashed() from err
        out: list[list[str]] = []
        for line, reply in zip(lines, replies, strict=True):
            words = reply.split()
            if not words or words[0] != "OK":
                raise QtestError(line if len(line) < 200 else line[:200] + "...", reply)
            out.append(words[1:])
        return out

    def _crashed(self) -> VmCrashed:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(2)
        self._state = QtestState.CLOSED
        err = VmCrashed(self.name, self.log_tail())
        self._teardown()
        return err

    def _value(self, line: str) -> int:
        words = self.command(line)
        if not words:
            raise QtestError(line, "OK without a value")
        return int(words[0], 0)

    def readb(self, addr: int) -> int:
        return self._value(f"readb {addr:#x}")

    def readw(self, addr: int) -> int:
        return self._value(f"readw {addr:#x}")

    def readl(self, addr: int) -> int:
        return self._value(f"readl {addr:#x}")

    def readq(self, addr: int) -> int:
        return self._value(f"readq {addr:#x}")

    def writeb(self, addr: int, value: int) -> None:
        self.command(f"writeb {addr:#x} {value & 0xFF:#x}")

    def writew(self, addr: int, value: int) -> None:
        self.command(f"writew {addr:#x} {value & 0xFFFF:#x}")

    def writel(self, addr: int, value: int) -> None:
        self.command(f"writel {addr:#x} {value & 0xFFFF_FFFF:#x}")

    def writeq(self, addr: int, value: int) -> None:
        self.command(f"writeq {addr:#x} {value & (1 << 64) - 1:#x}")

    def inb(self, port: int) -> int:
        return self._value(f"inb {port:#x}")

    def inw(self, port: int) -> int:
        return self._value(f"inw {port:#x}")

    def inl(self, port: int) -> int:
        return self._value(f"inl {port:#x}")

    def outb(self, port: int, value: int) -> None:
        self.command(f"outb {port:#x} {value & 0xFF:#x}")

    def outw(self, port: int, value: int) -> None:
        self.command(f"outw {port:#x} {value & 0xFFFF:#x}")

    def outl(self, port: int, value: int) -> None:
        self.command(f"outl {port:#x} {value & 0xFFFF_FFFF:#x}")

    def memread(self, addr: int, size: int) -> bytes:
        """``size`` bytes of guest-physical memory (``b64read``, in chunks)."""
        out = bytearray()
        while len(out) < size:
            n = min(CHUNK, size - len(out))
            words = self.command(f"b64read {addr + len(out):#x} {n:#x}")
            data = base64.b64decode(words[0]) if words else b""
            if len(data) != n:
                raise QtestError(f"b64read {addr + len(out):#x} {n:#x}",
                                 f"{len(data)} bytes instead of {n}")
            out += data
        return bytes(out)

    def memwrite(self, addr: int, data: bytes) -> None:
        """Write ``data`` to guest-physical memory (``b64write``, or ``memset`` for a run of
        one byte value), in chunks."""
        for off in range(0, len(data), CHUNK):
            chunk = data[off:off + CHUNK]
            if chunk.count(chunk[0]) == len(chunk):
                self.memset(addr + off, len(chunk), chunk[0])
            else:
                self.command(f"b64write {addr + off:#x} {len(chunk):#x} "
                             f"{base64.b64encode(chunk).decode()}")

    def memset(self, addr: int, size: int, value: int = 0) -> None:
        self.command(f"memset {addr:#x} {size:#x} {value & 0xFF:#x}")

    def clock_step(self, ns: int | None = None) -> int | None:
        """Advance the virtual clock by ``ns`` (or to the next deadline) under
        :attr:`QtestAccel.QTEST`; returns the new clock. Under :attr:`QtestAccel.TCG_IDLE`
        the clock already jumps to every deadline by itself: nothing to do, returns None."""
        if self.accel is not QtestAccel.QTEST:
            return None
        return self._value("clock_step" if ns is None else f"clock_step {ns}")


class _LineReader:
    """Lines from a socket, without the buffering surprises of ``makefile`` on timeouts."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def readline(self) -> str | None:
        """The next line without its newline, or None at end of stream."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 1]
                return line.decode(errors="replace").rstrip("\r")
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self.buf += data


class QtestMemory:
    """Guest-physical RAM of a :class:`QtestQemu`, as a
    :class:`~hvtools.memory.protocol.WritablePhysMemory`: a walker reading through it reads
    exactly the bytes QEMU's own DMA sees.

    ``regions`` are the ``(gpa, size)`` ranges that are RAM; accesses outside them raise
    :class:`UsageError` (the protocol's "outside the backing"), never reach QEMU.
    """

    def __init__(self, qemu: QtestQemu, regions: Sequence[tuple[int, int]]) -> None:
        if not regions:
            raise UsageError("QtestMemory needs at least one RAM region")
        self.qemu = qemu
        self.regions = tuple(sorted(regions))

    def contains(self, addr: int, size: int = 1) -> bool:
        return size >= 0 and any(gpa <= addr and addr + size <= gpa + n
                                 for gpa, n in self.regions)

    def _check(self, addr: int, size: int) -> None:
        if not self.contains(addr, size):
            raise UsageError(f"[{addr:#x}, +{size:#x}) is not guest RAM")

    def read(self, addr: int, size: int) -> bytes:
        self._check(addr, size)
        return self.qemu.memread(addr, size) if size else b""

    def read_u64(self, addr: int) -> int:
        self._check(addr, 8)
        return self.qemu.readq(addr)

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, len(data))
        if data:
            self.qemu.memwrite(addr, data)

    def write_u64(self, addr: int, value: int) -> None:
        if not 0 <= value < (1 << 64):
            raise UsageError(f"{value:#x} is not a 64-bit value")
        self._check(addr, 8)
        self.qemu.writeq(addr, value)

    def fill(self, addr: int, size: int, value: int = 0) -> None:
        """Set ``size`` bytes to ``value`` with one ``memset``."""
        self._check(addr, size)
        if size:
            self.qemu.memset(addr, size, value)
