"""Transport benchmark: READ/WRITE throughput and latency beside a raw TCP stream, one run.

For each op size the initiator moves ``total`` bytes between its buffer and a target's
registered /dev/shm file with ``depth`` ops outstanding (throughput, MiB/s), and times single
ops one at a time (latency, median us). The anchor is a plain TCP socket stream between the
same two endpoints over the same link, measured in the same run: the target process sends
(READ direction) or receives (WRITE direction) ``total`` bytes in ``size``-byte requests' worth
of stream, and answers ``size``-byte request/response round trips for latency. Every figure is
the median of ``reps`` repetitions. By default the target runs in one network namespace and
the initiator in another, joined by a veth pair made and removed here (``local`` uses
loopback).
"""

from __future__ import annotations

import os
import random
import socket
import statistics
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hvtools.transport import Endpoint, MemoryRegion, Peer, RemoteRegion, open_endpoint
from hvtools.transport.link import inside, veth_link
from hvtools.transport.ops import split
from hvtools.transport.target import TargetProcess, spawn_target

KiB = 1 << 10
MiB = 1 << 20
DEFAULT_SIZES = (4 * KiB, 64 * KiB, MiB, 4 * MiB)
#: The goal of issue 4: READ at >= 1 MiB ops at >= 70% of a raw TCP stream.
TARGET_RATIO = 0.70


@dataclass
class SizeResult:
    size: int
    read_mib_s: float
    write_mib_s: float
    tcp_read_mib_s: float
    tcp_write_mib_s: float
    read_lat_us: float
    write_lat_us: float
    tcp_lat_us: float

    @property
    def read_ratio(self) -> float:
        return self.read_mib_s / self.tcp_read_mib_s if self.tcp_read_mib_s else 0.0

    @property
    def write_ratio(self) -> float:
        return self.write_mib_s / self.tcp_write_mib_s if self.tcp_write_mib_s else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(read_ratio=round(self.read_ratio, 3), write_ratio=round(self.write_ratio, 3))
        return d


@dataclass
class BenchReport:
    provider: str
    link: str
    reps: int
    depth: int
    chunk: int
    total: int
    results: list[SizeResult] = field(default_factory=list)

    def meets_target(self) -> bool:
        big = [r for r in self.results if r.size >= MiB]
        return bool(big) and all(r.read_ratio >= TARGET_RATIO for r in big)

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "link": self.link, "reps": self.reps,
                "depth": self.depth, "chunk": self.chunk, "total": self.total,
                "target_read_ratio_at_1MiB": TARGET_RATIO, "meets_target": self.meets_target(),
                "results": [r.to_json() for r in self.results]}


def parse_size(text: str) -> int:
    """``4K``, ``64k``, ``1M``, ``4MiB``, ``512`` → bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KiB, "M": MiB, "G": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMG" else t
    value = int(num) * mult
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


class _Tcp:
    """Client of the target's raw TCP stream server (see hvtools.transport.target)."""

    def __init__(self, host: str, port: int, buf: bytearray) -> None:
        self.s = socket.create_connection((host, port), timeout=60)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = memoryview(buf)

    def read(self, n: int) -> None:
        self.s.sendall(b"R" + struct.pack("!Q", n))
        got = 0
        while got < n:
            k = self.s.recv_into(self.buf[got % len(self.buf):][: min(n - got, MiB)])
            if k == 0:
                raise ConnectionError("raw TCP stream closed")
            got += k

    def write(self, n: int) -> None:
        self.s.sendall(b"W" + struct.pack("!Q", n))
        sent = 0
        while sent < n:
            k = min(n - sent, MiB, len(self.buf))
            self.s.sendall(self.buf[:k])
            sent += k
        if self.s.recv(1) != b"\1":
            raise ConnectionError("raw TCP stream: no ack")

    def close(self) -> None:
        self.s.close()


def _median_time(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextmanager
def _endpoints(provider: str, local: bool,
               target_bytes: int) -> Iterator[tuple[TargetProcess, Endpoint, Peer, RemoteRegion,
                                                    str, str]]:
    with ExitStack() as stack:
        if local:
            addr_t = addr_i = "127.0.0.1" if provider == "tcp" else None
            ns_t = ns_i = None
            link = "loopback" if provider == "tcp" else provider
        else:
            lk = stack.enter_context(veth_link(f"b{os.getpid()}"))
            ns_t, ns_i, addr_t, addr_i = lk.ns_a, lk.ns_b, lk.addr_a, lk.addr_b
            link = f"veth {lk.ns_a} <-> {lk.ns_b}"
        src = Path(f"/dev/shm/hvt-bench-{os.getpid()}")
        with open(src, "wb") as f:
            f.write(random.Random(1).randbytes(target_bytes))
        stack.callback(src.unlink)
        target = spawn_target("fabric", provider, addr_t, netns=ns_t)
        stack.callback(target.close)
        _, region = target.register(src, remote_write=True)
        stack.enter_context(inside(ns_i))
        ep = stack.enter_context(open_endpoint("fabric", provider, addr_i))
        yield target, ep, ep.connect(target.address), region, addr_t or "127.0.0.1", link


def run_bench(provider: str = "tcp", sizes: Sequence[int] = DEFAULT_SIZES, *,
              local: bool = False, reps: int = 5, depth: int = 64, chunk: int = 0,
              total: int = 64 * MiB, lat_ops: int = 50,
              progress: Callable[[str], None] | None = None) -> BenchReport:
    """Measure every size; see the module docstring. ``chunk`` splits big ops (0: never)."""
    say = progress or (lambda _m: None)
    span = max(total, *sizes)
    with _endpoints(provider, local, span) as (target, ep, peer, region, host, link):
        buf = bytearray(span)
        mr = ep.register(buf)
        report = BenchReport(ep.provider, link, reps, depth, chunk, total)
        tcp = _Tcp(host, target.tcp_port(), buf) if provider == "tcp" else None
        try:
            for size in sizes:
                say(f"{size // KiB} KiB ops")
                report.results.append(
                    _measure(ep, peer, mr, region, tcp, size, reps, depth, chunk, total,
                             lat_ops))
        finally:
            if tcp is not None:
                tcp.close()
            ep.deregister(mr)
    return report


def _measure(ep: Endpoint, peer: Peer, mr: MemoryRegion, region: RemoteRegion,
             tcp: _Tcp | None, size: int, reps: int, depth: int, chunk: int, total: int,
             lat_ops: int) -> SizeResult:
    count = max(1, total // size)
    moved = count * size
    runs = [(i * size, i * size, size) for i in range(count)]
    if chunk:
        runs = [p for r in runs for p in split(r, chunk)]
    ops = [(mr, lo, region, ro, n) for lo, ro, n in runs]

    def rd() -> None:
        ep.read_many(peer, ops, depth=depth)

    def wr() -> None:
        ep.write_many(peer, ops, depth=depth)

    rd()  # warm: connection set up, pages of both buffers touched
    read_s = _median_time(rd, reps)
    write_s = _median_time(wr, reps)
    one = [(mr, 0, region, 0, size)]
    lat_r = _median_time(lambda: ep.read_many(peer, one, depth=1), lat_ops)
    lat_w = _median_time(lambda: ep.write_many(peer, one, depth=1), lat_ops)
    tcp_r = tcp_w = tcp_lat = 0.0
    if tcp is not None:
        t = tcp
        t.read(moved)
        tcp_r = moved / _median_time(lambda: t.read(moved), reps) / MiB
        tcp_w = moved / _median_time(lambda: t.write(moved), reps) / MiB
        tcp_lat = _median_time(lambda: t.read(size), lat_ops) * 1e6
    return SizeResult(size, moved / read_s / MiB, moved / write_s / MiB, tcp_r, tcp_w,
                      lat_r * 1e6, lat_w * 1e6, tcp_lat)
