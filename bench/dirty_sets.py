"""Adaptive dirty sets (hvtools.tracking.DirtySet) beside a plain numpy bitmap, in one run.

For each region size and write pattern, both structures get the same marks, then are
harvested (snapshot-and-clear to sorted page indexes). Reported per cell, as medians of
``--reps`` repetitions: the bytes of page data each holds after the marks, the harvest time,
and (for information) the time to mark.
The anchor is a plain bitmap, one bit per page in uint64 words, harvested with the best
whole-bitmap method found (the one DirtySet's BITMAP uses): ``flatnonzero`` of the unpacked
bits viewed as bool, then a clear; so a ratio near 1 on dense random pages is the expected
result, and the gains come from the representations. The column ``naive`` is the same bitmap
harvested with ``flatnonzero`` on the uint8 unpacked array, the obvious code, for reference
only. The anchor's marks are ``bitwise_or.at`` (arrays) and word fills (runs).

Each repetition runs, per structure, one untimed mark-and-harvest cycle and then a timed one:
the timed round is the second round of a set, as in a migration loop (for the adaptive set, a
BITMAP round after a BITMAP round; a FULL round after FULL -> BITMAP), and the allocator has
the structure's temporaries at hand, as it does round after round; the glibc heap is kept from
returning freed memory to the system (see ``_keep_heap_warm``). Without these, which structure
happened to pay fresh-page faults for its temporaries decided the dense ratios (0.3-3x, in
either direction, for the same harvest code). Every harvest is checked against the pattern's
pages; which structure goes first alternates between repetitions.

Patterns (fixed seed): ``sparse`` 0.1 % of pages at random; ``clustered-1%`` and
``clustered-10%`` eight runs at random offsets, one mark_range each; ``dense-50%`` and
``dense-90%`` random pages in one mark_many; ``dense-100%`` every page in one mark_range.

Goal (issue 6): memory <= 1/4 of the bitmap's on sparse patterns; harvest no slower than the
bitmap's on dense ones (time ratio <= 1.0).

    python bench/dirty_sets.py [--sizes 1,16] [--reps 21] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hvtools.tracking import DirtySet

SEED = 20240601
GiB_PAGES = 262144  # 4-KByte pages per GiB
MEMORY_GOAL = 0.25
HARVEST_GOAL = 1.0


@dataclasses.dataclass(frozen=True)
class Pattern:
    """Marks to apply: ``ranges`` as (first, count), then ``indexes`` in one batch."""

    name: str
    ranges: tuple[tuple[int, int], ...]
    indexes: np.ndarray | None
    dense: bool
    sparse: bool


def patterns(pages: int, rng: np.random.Generator) -> list[Pattern]:
    def clustered(fraction: float) -> tuple[tuple[int, int], ...]:
        run = int(pages * fraction) // 8
        starts = np.sort(rng.choice(pages // run - 1, 8, replace=False)) * run
        return tuple((int(s), run) for s in starts)

    def random_pages(fraction: float) -> np.ndarray:
        return rng.choice(pages, int(pages * fraction), replace=False)

    return [Pattern("sparse-0.1%", (), random_pages(0.001), dense=False, sparse=True),
            Pattern("clustered-1%", clustered(0.01), None, dense=False, sparse=False),
            Pattern("clustered-10%", clustered(0.10), None, dense=False, sparse=False),
            Pattern("dense-50%", (), random_pages(0.5), dense=True, sparse=False),
            Pattern("dense-90%", (), random_pages(0.9), dense=True, sparse=False),
            Pattern("dense-100%", ((0, pages),), None, dense=True, sparse=False)]


class PlainBitmap:
    """The anchor: one bit per page, nothing adaptive."""

    def __init__(self, pages: int) -> None:
        self.words = np.zeros(-(-pages // 64), dtype=np.uint64)

    def mark_range(self, first: int, count: int) -> None:
        last, ones = first + count - 1, 0xFFFF_FFFF_FFFF_FFFF
        w0, w1 = first >> 6, last >> 6
        lo, hi = (ones << (first & 63)) & ones, (1 << ((last & 63) + 1)) - 1
        if w0 == w1:
            self.words[w0] |= np.uint64(lo & hi)
        else:
            self.words[w0] |= np.uint64(lo)
            self.words[w0 + 1:w1] = np.uint64(ones)
            self.words[w1] |= np.uint64(hi)

    def mark_many(self, idx: np.ndarray) -> None:
        np.bitwise_or.at(self.words, idx >> 6,
                         np.left_shift(np.uint64(1), (idx & 63).astype(np.uint64)))

    def harvest(self) -> np.ndarray:
        out = np.flatnonzero(np.unpackbits(self.words.view(np.uint8),
                                           bitorder="little").view(bool))
        self.words.fill(0)
        return out

    def harvest_naive(self) -> np.ndarray:
        out = np.flatnonzero(np.unpackbits(self.words.view(np.uint8), bitorder="little"))
        self.words.fill(0)
        return out


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def _apply(target: DirtySet | PlainBitmap, p: Pattern) -> None:
    for first, count in p.ranges:
        target.mark_range(first, count)
    if p.indexes is not None:
        target.mark_many(p.indexes)


def measure(pages: int, p: Pattern, reps: int) -> dict[str, Any]:
    samples: dict[str, list[float]] = {
        k: [] for k in ("mark_a", "mark_p", "harv_a", "harv_p", "harv_n")}
    mem_a = mem_p = dirty = 0
    rep_name = ""
    expected = np.zeros(pages, dtype=bool)
    for first, count in p.ranges:
        expected[first:first + count] = True
    if p.indexes is not None:
        expected[p.indexes] = True
    want = np.flatnonzero(expected)
    for i in range(reps):
        cycles: list[tuple[str, DirtySet | PlainBitmap, Callable[[], np.ndarray]]] = []
        for key in ("a", "p", "n"):
            target: DirtySet | PlainBitmap = DirtySet(pages) if key == "a" else PlainBitmap(pages)
            harvest = target.harvest_naive if isinstance(target, PlainBitmap) and key == "n" \
                else target.harvest
            cycles.append((key, target, harvest))
        for key, target, harvest in cycles if i % 2 == 0 else cycles[::-1]:
            _apply(target, p)  # warm-up cycle: the allocator reaches this structure's steady
            harvest()  # state (a real user marks and harvests the same set round after round)
            t, _ = _timed(lambda target=target: _apply(target, p))  # type: ignore[misc]
            if key != "n":
                samples[f"mark_{key}"].append(t)
            if isinstance(target, DirtySet):
                mem_a, rep_name, dirty = target.memory_bytes, target.representation.value, \
                    len(target)
            elif key == "p":
                mem_p = int(target.words.nbytes)
            t, got = _timed(harvest)
            samples[f"harv_{key}"].append(t)
            assert np.array_equal(got, want), f"{p.name}: harvest {key} is wrong"
            del got
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {"pages": pages, "pattern": p.name, "dirty": dirty, "representation": rep_name,
            "memory_bytes": mem_a, "bitmap_memory_bytes": mem_p, "memory_ratio": mem_a / mem_p,
            "harvest_ms": med["harv_a"] * 1e3, "bitmap_harvest_ms": med["harv_p"] * 1e3,
            "harvest_ratio": med["harv_a"] / med["harv_p"],
            "naive_bitmap_harvest_ms": med["harv_n"] * 1e3,
            "mark_ms": med["mark_a"] * 1e3, "bitmap_mark_ms": med["mark_p"] * 1e3,
            "mark_ratio": med["mark_a"] / med["mark_p"],
            "goal": ("memory" if p.sparse else "harvest" if p.dense else None)}


def _keep_heap_warm() -> bool:
    """glibc: keep freed memory in the heap (no trim; no mmap below 32 MiB), so a harvest's
    temporaries reuse resident pages whichever structure freed them last. Without it, the
    order of allocations around a harvest decided whether it paid ~1000 fresh-page faults
    (4 MiB of unpacked bits in a 16 GiB region): 3 ms or 6.5 ms for the same work."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)
                    and libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        return False


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.1f}K" if n < 1 << 20 else f"{n / (1 << 20):.2f}M"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,16", help="region sizes in GiB, comma-separated")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    warm = _keep_heap_warm()
    rng = np.random.default_rng(SEED)
    rows: list[dict[str, Any]] = []
    for gib in (int(x) for x in args.sizes.split(",")):
        pages = gib * GiB_PAGES
        for p in patterns(pages, rng):
            rows.append({"gib": gib, **measure(pages, p, args.reps)})
    sparse_ok = all(r["memory_ratio"] <= MEMORY_GOAL for r in rows if r["goal"] == "memory")
    dense_ok = all(r["harvest_ratio"] <= HARVEST_GOAL for r in rows if r["goal"] == "harvest")
    if args.json:
        print(json.dumps({"rows": rows, "reps": args.reps, "warm_heap": warm,
                          "sparse_memory_goal_met": sparse_ok,
                          "dense_harvest_goal_met": dense_ok}, indent=1))
        return
    print(f"medians of {args.reps} reps; ratio = adaptive / plain bitmap "
          "(memory goal <= 0.25 on sparse, harvest goal <= 1.00 on dense); heap "
          + ("kept warm (glibc mallopt)" if warm else "NOT kept warm (no glibc mallopt)"))
    print(f"{'region':>6} {'pattern':<14} {'dirty':>8} {'repr':<7} {'memory':>8} "
          f"{'bitmap':>8} {'ratio':>6}  {'harvest':>9} {'bitmap':>9} {'ratio':>6}  "
          f"{'naive':>9}  {'mark':>8} {'bitmap':>8} {'ratio':>6}")
    for r in rows:
        goal = r["goal"]
        mflag = (" ok" if r["memory_ratio"] <= MEMORY_GOAL else " MISS") if goal == "memory" \
            else ""
        hflag = (" ok" if r["harvest_ratio"] <= HARVEST_GOAL else " MISS") \
            if goal == "harvest" else ""
        print(f"{r['gib']:>4}Gi {r['pattern']:<14} {r['dirty']:>8} {r['representation']:<7} "
              f"{_fmt_bytes(r['memory_bytes']):>8} {_fmt_bytes(r['bitmap_memory_bytes']):>8} "
              f"{r['memory_ratio']:>6.3f}{mflag:<5} {r['harvest_ms']:>7.3f}ms "
              f"{r['bitmap_harvest_ms']:>7.3f}ms {r['harvest_ratio']:>6.2f}{hflag:<5} "
              f"{r['naive_bitmap_harvest_ms']:>7.3f}ms  "
              f"{r['mark_ms']:>6.2f}ms {r['bitmap_mark_ms']:>6.2f}ms {r['mark_ratio']:>6.2f}")
    print(f"goal: sparse memory <= 1/4 of the bitmap: {'met' if sparse_ok else 'NOT met'}; "
          f"dense harvest no slower than the bitmap: {'met' if dense_ok else 'NOT met'}")


if __name__ == "__main__":
    main()
