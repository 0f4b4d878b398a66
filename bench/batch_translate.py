"""Batch x86-64 paging throughput (hvtools.mmu.batch) beside the scalar walker, in one run.

Workload ``4level-4k`` (the one the target applies to): a process-like 4-level table set in a
BufferMemory, 1 GiB of 4-KByte pages in four areas (heap, mmap area, stack, kernel direct map)
on randomly scattered frames, and a trace of addresses drawn uniformly from the mapped pages
(fixed seed; no locality, the least cache-friendly case). Both walkers translate the same
addresses with the same access (a user-mode read); the scalar walker is ``walk()`` in a Python
loop, the batch path one ``translate_batch`` call. Each is timed ``--reps`` times and the
median taken; every lane of the batch is checked against the scalar outcome. Workload
``5level-mixed`` (reported, no target): 5-level tables with 4K, 2M and 1G pages, and a trace
with unmapped and non-canonical addresses. Target: batch >= 2 M translations/s on 4level-4k.

    python bench/batch_translate.py [--lanes 131072] [--reps 3] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable

import numpy as np

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K, Gva
from hvtools.memory.buffer import BufferMemory
from hvtools.mmu.batch import translate_batch
from hvtools.mmu.paging import Access, AccessKind, EntryFlag, PagingMode, TableBuilder, walk
from hvtools.translation import Fault, Translation

TARGET_PER_S = 2_000_000
SEED = 20240601
ACCESS = Access(AccessKind.READ, user=True)
URW = int(EntryFlag.P | EntryFlag.RW | EntryFlag.US)
MiB = 1 << 20

#: (first linear address, bytes) of the 4-KByte-mapped areas: 1 GiB in all.
AREAS_4K = ((0x0000_5555_5000_0000, 512 * MiB),  # heap
            (0x0000_7F00_0000_0000, 384 * MiB),  # mmap area
            (0x0000_7FFF_F000_0000, 64 * MiB),  # stack
            (0xFFFF_8880_0000_0000, 64 * MiB))  # kernel direct map (4K-mapped part)


@dataclasses.dataclass
class Workload:
    name: str
    memory: BufferMemory
    cr3: int
    mode: PagingMode
    trace: np.ndarray  # uint64 linear addresses
    mapped_bytes: int


def _fill_4k(mem: BufferMemory, tb: TableBuilder, areas: tuple[tuple[int, int], ...],
             rng: np.random.Generator, flags: int) -> int:
    """Map ``areas`` with 4-KByte pages on a random permutation of frames; returns bytes."""
    pages = sum(size for _, size in areas) // PAGE_4K
    frames = (rng.permutation(pages).astype(np.uint64) + np.uint64(1 << 20)) << np.uint64(12)
    done = 0
    for start, size in areas:
        for va in range(start, start + size, PAGE_2M):  # one page table per 2 MiB
            pt = tb.entry_address(va, 1) & ~(PAGE_4K - 1)
            ptes = np.frombuffer(mem.view(pt, PAGE_4K), dtype="<u8")
            ptes[:] = frames[done:done + 512] | np.uint64(flags)
            done += 512
    return done * PAGE_4K


def _trace(rng: np.random.Generator, areas: tuple[tuple[int, int], ...], n: int,
           weights: tuple[float, ...] | None = None) -> np.ndarray:
    """``n`` addresses uniform within each area; areas drawn by ``weights`` (else by size)."""
    w = np.array(weights or [s for _, s in areas], dtype=np.float64)
    which = rng.choice(len(areas), size=n, p=w / w.sum())
    starts = np.array([a for a, _ in areas], dtype=np.uint64)
    limits = np.array([s for _, s in areas], dtype=np.uint64)
    offs = (rng.random(n) * limits[which]).astype(np.uint64)
    out: np.ndarray = starts[which] + offs
    return out


def four_level_4k(lanes: int) -> Workload:
    rng = np.random.default_rng(SEED)
    mem = BufferMemory(4 * MiB)
    tb = TableBuilder(mem, first_table=PAGE_4K, table_limit=4 * MiB)
    mapped = _fill_4k(mem, tb, AREAS_4K, rng, URW)
    return Workload("4level-4k", mem, tb.cr3, PagingMode(maxphyaddr=40),
                    _trace(rng, AREAS_4K, lanes), mapped)


def five_level_mixed(lanes: int) -> Workload:
    rng = np.random.default_rng(SEED + 1)
    mem = BufferMemory(4 * MiB)
    tb = TableBuilder(mem, la57=True, first_table=PAGE_4K, table_limit=4 * MiB)
    areas_4k = ((0x0000_5555_5000_0000, 256 * MiB), (0xFF11_0000_0000_0000, 128 * MiB))
    mapped = _fill_4k(mem, tb, areas_4k, rng, URW)
    base_2m, base_1g = 0x0000_7F00_0000_0000, 0xFF22_0000_0000_0000
    for i in range(256):
        tb.map(base_2m + i * PAGE_2M, (1 << 32) + i * PAGE_2M, PAGE_2M, flags=URW)
    for i in range(4):
        tb.map(base_1g + i * PAGE_1G, (1 << 34) + i * PAGE_1G, PAGE_1G, flags=URW)
    mapped += 256 * PAGE_2M + 4 * PAGE_1G
    areas = (*areas_4k, (base_2m, 256 * PAGE_2M), (base_1g, 4 * PAGE_1G),
             (0x0000_1000_0000_0000, 1 << 40))  # unmapped
    trace = _trace(rng, areas, lanes, weights=(0.3, 0.2, 0.2, 0.2, 0.1))
    bad = rng.random(lanes) < 0.05  # non-canonical under LA57
    trace[bad] ^= np.uint64(1 << 60)
    return Workload("5level-mixed", mem, tb.cr3, PagingMode(maxphyaddr=46, la57=True),
                    trace, mapped)


def _median_time(fn: Callable[[], object], reps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


@dataclasses.dataclass(frozen=True)
class Row:
    """One workload's figures (medians of the timed repetitions)."""

    workload: str
    levels: int
    mapped_bytes: int
    table_bytes: int
    scalar_lanes: int
    batch_lanes: int
    translated: int  # of the scalar lanes
    agree: int  # scalar lanes whose batch outcome equals walk()'s
    scalar_per_s: float
    batch_per_s: float
    ratio: float
    scalar_s: list[float]
    batch_s: list[float]


def measure(w: Workload, reps: int, scalar_lanes: int) -> Row:
    trace = w.trace
    scalar_trace = [Gva(int(g)) for g in trace[:scalar_lanes]]
    outcomes: list[Translation | Fault] = []

    def scalar() -> None:
        outcomes[:] = [walk(w.memory, w.cr3, w.mode, g, ACCESS) for g in scalar_trace]

    def batched() -> None:
        translate_batch(w.memory, w.cr3, w.mode, trace, ACCESS)

    batched()  # warm-up (page the tables in, numpy's first-call costs)
    s_med, s_times = _median_time(scalar, reps)
    b_med, b_times = _median_time(batched, max(reps, 5))
    res = translate_batch(w.memory, w.cr3, w.mode, trace[:scalar_lanes], ACCESS)
    agree = sum(res.outcome(i) == dataclasses.replace(o, steps=())
                for i, o in enumerate(outcomes))
    s_rate, b_rate = len(scalar_trace) / s_med, len(trace) / b_med
    return Row(workload=w.name, levels=w.mode.levels, mapped_bytes=w.mapped_bytes,
               table_bytes=w.memory.size, scalar_lanes=len(scalar_trace),
               batch_lanes=len(trace), translated=int(res.ok.sum()), agree=agree,
               scalar_per_s=round(s_rate), batch_per_s=round(b_rate),
               ratio=round(b_rate / s_rate, 1), scalar_s=[round(t, 4) for t in s_times],
               batch_s=[round(t, 5) for t in b_times])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--lanes", type=int, default=1 << 17, help="addresses per batch call")
    ap.add_argument("--scalar-lanes", type=int, default=None,
                    help="addresses the scalar walker times (default: all --lanes)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    scalar_lanes = a.lanes if a.scalar_lanes is None else min(a.scalar_lanes, a.lanes)
    rows = [measure(four_level_4k(a.lanes), a.reps, scalar_lanes),
            measure(five_level_mixed(a.lanes // 4), a.reps, scalar_lanes // 4)]
    main_rate = rows[0].batch_per_s
    met = main_rate >= TARGET_PER_S
    if a.json:
        print(json.dumps({"metric": "translations-per-second", "seed": SEED, "reps": a.reps,
                          "target_per_s": TARGET_PER_S, "target_workload": rows[0].workload,
                          "meets_target": met,
                          "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
        return
    for r in rows:
        print(f"{r.workload:>13}: scalar {r.scalar_per_s / 1e3:7.1f} k/s ({r.scalar_lanes} walks)"
              f" | batch {r.batch_per_s / 1e6:6.2f} M/s ({r.batch_lanes} lanes)"
              f" | ratio {r.ratio:.0f}x | {r.translated}/{r.scalar_lanes} translated,"
              f" {r.agree}/{r.scalar_lanes} equal to walk()")
    print(f"target: batch >= {TARGET_PER_S / 1e6:.0f} M/s on {rows[0].workload}: "
          f"{main_rate / 1e6:.2f} M/s, {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
