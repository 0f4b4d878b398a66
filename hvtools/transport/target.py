"""A transport target in its own process: serves regions of files (e.g. RAM files on /dev/shm).

Run as ``python -m hvtools.transport.target --backend fabric --provider tcp --address IP``,
optionally inside a network namespace (:func:`spawn_target` with ``netns``). It prints one JSON
line ``{"address", "provider", "mr_mode", "pid"}``, then answers JSON-line commands on stdin
while a progress thread serves remote READs and WRITEs:

- ``{"op": "register", "path": P, "offset": 0, "length": N, "remote_write": false}``
  → ``{"id": n, "region": {"addr", "length", "key"}}`` (an mmap of the file range);
- ``{"op": "deregister", "id": n}`` → ``{"ok": true}``;
- ``{"op": "tcp_serve"}`` → ``{"port": p}``: a raw TCP stream server on the same address, the
  benchmark's anchor (``R`` + u64 length: send that many bytes; ``W`` + u64: receive, ack 1 B);
- ``{"op": "quit"}`` or end of input → close everything and exit 0.

Errors answer ``{"error": "..."}``. The process exits when its parent closes stdin, so a test
that dies cannot leave it behind.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from hvtools.errors import HvError, TransportError
from hvtools.transport.api import Endpoint, MemoryRegion, RemoteRegion

_CHUNK = 1 << 20


class _Server:
    def __init__(self, ep: Endpoint, address: str | None) -> None:
        self.ep = ep
        self.address = address
        self.regions: dict[int, tuple[MemoryRegion, mmap.mmap]] = {}
        self.next_id = 1
        self.files: list[IO[bytes]] = []
        self.tcp: socket.socket | None = None

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "register":
            f = open(req["path"], "r+b")  # noqa: SIM115 -- closed in close()
            self.files.append(f)
            length = int(req.get("length") or os.fstat(f.fileno()).st_size)
            mm = mmap.mmap(f.fileno(), length, offset=int(req.get("offset", 0)))
            mr = self.ep.register(mm, remote_read=bool(req.get("remote_read", True)),
                                  remote_write=bool(req.get("remote_write", False)))
            rid = self.next_id
            self.next_id += 1
            self.regions[rid] = (mr, mm)
            return {"id": rid, "region": mr.remote().to_json()}
        if op == "deregister":
            mr, mm = self.regions.pop(int(req["id"]))
            self.ep.deregister(mr)
            mm.close()
            return {"ok": True}
        if op == "tcp_serve":
            return {"port": self._tcp_serve()}
        raise TransportError(f"unknown target command {op!r}")

    def _tcp_serve(self) -> int:
        if self.tcp is None:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.address or "127.0.0.1", 0))
            s.listen(8)
            self.tcp = s
            threading.Thread(target=self._tcp_accept, args=(s,), daemon=True).start()
        return int(self.tcp.getsockname()[1])

    @staticmethod
    def _tcp_accept(s: socket.socket) -> None:
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=_tcp_stream, args=(c,), daemon=True).start()

    def close(self) -> None:
        if self.tcp is not None:
            self.tcp.close()
        self.ep.close()
        for _, mm in self.regions.values():
            mm.close()
        for f in self.files:
            f.close()


def _tcp_stream(c: socket.socket) -> None:
    """The raw TCP anchor: ``R``+len sends len bytes, ``W``+len receives them and acks."""
    buf = bytearray(_CHUNK)
    with c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            hdr = c.recv(9, socket.MSG_WAITALL)
            if len(hdr) < 9:
                return
            kind, n = hdr[:1], struct.unpack("!Q", hdr[1:])[0]
            if kind == b"R":
                view = memoryview(buf)
                while n:
                    k = min(n, _CHUNK)
                    c.sendall(view[:k])
                    n -= k
            else:
                view = memoryview(buf)
                while n:
                    k = c.recv_into(view[: min(n, _CHUNK)])
                    if k == 0:
                        return
                    n -= k
                c.sendall(b"\1")


def main(argv: list[str] | None = None) -> int:
    from hvtools.transport import open_endpoint

    ap = argparse.ArgumentParser(prog="python -m hvtools.transport.target")
    ap.add_argument("--backend", default="fabric")
    ap.add_argument("--provider", default="tcp")
    ap.add_argument("--address")
    ap.add_argument("--port", type=int)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        ep = open_endpoint(args.backend, args.provider, args.address, args.port)
    except HvError as err:
        print(json.dumps({"error": str(err)}), flush=True)
        return 2
    srv = _Server(ep, args.address)
    ep.start_progress()
    print(json.dumps({"address": ep.address, "provider": ep.provider, "pid": os.getpid(),
                      "mr_mode": getattr(ep, "mr_mode", 0)}), flush=True)
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            if req.get("op") == "quit":
                break
            try:
                reply = srv.handle(req)
            except (HvError, OSError, KeyError, ValueError) as err:
                reply = {"error": f"{type(err).__name__}: {err}"}
            print(json.dumps(reply), flush=True)
    finally:
        srv.close()
    return 0


class TargetProcess:
    """Client of a target process (:func:`spawn_target`). Close it to stop the process."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        hello = self._read()
        if "error" in hello:
            self.close()
            raise TransportError(f"transport target did not start: {hello['error']}")
        self.address: str = hello["address"]
        self.provider: str = hello["provider"]
        self.pid: int = hello["pid"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=10)
            err = self.proc.stderr.read().strip().splitlines()[-3:] if self.proc.stderr else []
            raise TransportError(f"transport target exited ({code}): {' | '.join(err)}")
        data: dict[str, Any] = json.loads(line)
        return data

    def call(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise TransportError(f"transport target: {reply['error']}")
        return reply

    def register(self, path: Path | str, *, offset: int = 0, length: int = 0,
                 remote_read: bool = True, remote_write: bool = False) -> tuple[int, RemoteRegion]:
        r = self.call(op="register", path=str(path), offset=offset, length=length,
                      remote_read=remote_read, remote_write=remote_write)
        return int(r["id"]), RemoteRegion.from_json(r["region"])

    def deregister(self, rid: int) -> None:
        self.call(op="deregister", id=rid)

    def tcp_port(self) -> int:
        return int(self.call(op="tcp_serve")["port"])

    def kill(self) -> None:
        """Kill the process outright (a host whose NIC vanished)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                f.close()


def spawn_target(backend: str = "fabric", provider: str = "tcp", address: str | None = None,
                 *, netns: str | None = None, port: int | None = None) -> TargetProcess:
    """Start a target process, inside network namespace ``netns`` when given."""
    cmd = [sys.executable, "-m", "hvtools.transport.target", "--backend", backend,
           "--provider", provider]
    if address:
        cmd += ["--address", address]
    if port:
        cmd += ["--port", str(port)]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return TargetProcess(proc)


if __name__ == "__main__":
    sys.exit(main())
