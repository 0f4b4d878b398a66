"""DirtySet / DirtySets: transitions at the thresholds worked out by hand, with exact stats."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hvtools.addr import Gpa
from hvtools.errors import UsageError
from hvtools.tracking import DirtySet, DirtySets, DirtySetStats, Region, Representation
from hvtools.tracking.dirtyset import runs

SPARSE, BITMAP, FULL = Representation.SPARSE, Representation.BITMAP, Representation.FULL


def stats(marks: int = 0, promotions: int = 0, demotions: int = 0, harvests: int = 0,
          harvested_pages: int = 0) -> DirtySetStats:
    return DirtySetStats(marks, promotions, demotions, harvests, harvested_pages)


def test_limits_follow_the_region_size() -> None:
    # 4096 pages: bitmap 512 bytes; sparse limit 4096/64 = 64 pages; write buffer 64 entries.
    s = DirtySet(4096)
    assert (s.sparse_limit, s.representation, s.memory_bytes, len(s)) == (64, SPARSE, 0, 0)
    assert DirtySet(1024).sparse_limit == 16  # the smallest region that uses SPARSE
    small = DirtySet(1023)  # 1023 // 64 = 15 < 16: a bitmap of 128 bytes from the start
    assert (small.sparse_limit, small.representation, small.memory_bytes) == (0, BITMAP, 128)


def test_sparse_to_bitmap_to_full_and_back_at_the_thresholds() -> None:
    s = DirtySet(4096)
    s.mark_many(np.arange(64) * 2)  # 64 pages: exactly the sparse limit, fills the buffer
    assert (s.representation, len(s)) == (SPARSE, 64)
    assert s.memory_bytes == 64 * 4 + 64 * 4  # sorted array + write buffer = the bitmap's 512
    assert s.stats == stats(marks=64)
    s.mark(1)  # 65 > 64: promotes when the buffer is merged (any read merges it)
    assert (s.representation, len(s), s.memory_bytes) == (BITMAP, 65, 512)
    assert s.stats == stats(marks=65, promotions=1)
    s.mark(1)  # already dirty: counted as a mark, not as a page
    s.mark_range(0, 4095)  # every page but the last
    assert (s.representation, len(s)) == (BITMAP, 4095)
    s.mark(4095)
    assert (s.representation, len(s), s.memory_bytes) == (FULL, 4096, 0)
    assert s.stats == stats(marks=65 + 1 + 4095 + 1, promotions=2)

    got = s.harvest()  # FULL -> BITMAP: a round that dense predicts a dense next round
    assert got.dtype == np.int64 and np.array_equal(got, np.arange(4096))
    assert (s.representation, len(s), s.memory_bytes) == (BITMAP, 0, 512)
    assert s.stats == stats(marks=4162, promotions=2, demotions=1, harvests=1,
                            harvested_pages=4096)

    s.mark_many(np.arange(33))  # 33 > 4096/128: stays BITMAP after the harvest (hysteresis)
    assert s.harvest_runs() == [(0, 33)]
    assert s.representation is BITMAP
    s.mark_many(np.arange(100, 132))  # 32 = 4096/128: the harvest demotes to SPARSE
    assert s.harvest_runs() == [(100, 32)]
    assert (s.representation, s.memory_bytes) == (SPARSE, 0)
    assert s.stats == stats(marks=4162 + 33 + 32, promotions=2, demotions=2, harvests=3,
                            harvested_pages=4096 + 33 + 32)


def test_sparse_harvest_stays_sparse_and_frees_its_arrays() -> None:
    s = DirtySet(4096)
    s.mark(7)
    s.mark_many(np.array([9, 7, 3]))
    assert 7 in s and 3 in s and 8 not in s and len(s) == 3
    assert s.harvest().tolist() == [3, 7, 9]
    assert (s.representation, s.memory_bytes, len(s)) == (SPARSE, 0, 0)
    assert s.stats == stats(marks=4, harvests=1, harvested_pages=3)


def test_big_batch_promotes_at_once_and_keeps_the_buffered_marks() -> None:
    s = DirtySet(4096)
    s.mark(4000)  # sits in the write buffer
    s.mark_many(np.arange(65))  # 65 > 64: straight to BITMAP
    assert (s.representation, len(s)) == (BITMAP, 66)
    assert 4000 in s and 64 in s and 65 not in s
    assert s.stats == stats(marks=66, promotions=1)


def test_range_over_the_whole_region_goes_straight_to_full() -> None:
    s = DirtySet(4096)
    s.mark(3)
    s.mark_range(0, 4096)
    assert (s.representation, len(s)) == (FULL, 4096)
    assert s.stats == stats(marks=4097, promotions=1)  # SPARSE -> FULL is one promotion
    s.mark(5)
    s.mark_many(np.array([1, 2]))
    assert s.stats.marks == 4100 and len(s) == 4096


def test_small_region_is_bitmap_then_full_then_bitmap() -> None:
    s = DirtySet(100)
    for page in range(100):
        s.mark(page)
    assert (s.representation, s.stats) == (FULL, stats(marks=100, promotions=1))
    assert s.harvest_runs() == [(0, 100)]
    assert (s.representation, s.memory_bytes) == (BITMAP, 16)
    s.mark(99)
    assert s.harvest().tolist() == [99]
    assert s.representation is BITMAP  # sparse is never used here: no demotion below BITMAP
    assert s.stats == stats(marks=101, promotions=1, demotions=1, harvests=2,
                            harvested_pages=101)


def test_sparse_patterns_use_under_a_quarter_of_the_bitmap() -> None:
    pages = 262144  # 1 GiB
    rng = np.random.default_rng(1)
    s = DirtySet(pages)
    s.mark_many(rng.choice(pages, pages // 1000, replace=False))
    assert s.representation is SPARSE
    assert s.memory_bytes == 4 * (pages // 1000) <= pages // 8 // 4


def test_memory_never_exceeds_the_bitmap_while_sparse() -> None:
    s = DirtySet(8192)  # limit 128, buffer 128, bitmap 1024 bytes
    for page in range(0, 8192, 61):
        s.mark(page)
        if s.representation is SPARSE:
            assert s.memory_bytes <= 1024
    assert s.representation is BITMAP and len(s) == len(range(0, 8192, 61))


def test_bitmap_harvest_paths_agree() -> None:
    pages = 64 * 1024
    clustered = DirtySet(pages)  # few non-zero words: only those are unpacked
    clustered.mark_range(5000, 3000)
    assert clustered.representation is BITMAP
    assert np.array_equal(clustered.harvest(), np.arange(5000, 8000))
    dense = DirtySet(pages)  # every word non-zero: the whole bitmap is unpacked
    dense.mark_many(np.arange(0, pages, 3))
    assert np.array_equal(dense.harvest(), np.arange(0, pages, 3))


def test_runs() -> None:
    assert runs(np.array([], dtype=np.int64)) == []
    assert runs(np.array([0, 1, 2, 5, 7, 8])) == [(0, 3), (5, 1), (7, 2)]


@pytest.mark.parametrize("call", [
    lambda s: s.mark(-1), lambda s: s.mark(4096), lambda s: s.mark_range(4000, 97),
    lambda s: s.mark_range(0, -1), lambda s: s.mark_many(np.array([0, 4096])),
    lambda s: s.mark_many(np.array([-1])), lambda s: s.mark_many(np.array([1.0])),
])
def test_misuse_raises_usage_error_and_changes_nothing(call: object) -> None:
    s = DirtySet(4096)
    s.mark(5)
    with pytest.raises(UsageError):
        call(s)  # type: ignore[operator]
    assert s.harvest().tolist() == [5] and s.stats.marks == 1


@pytest.mark.parametrize("pages", [0, -3, (1 << 32) + 1])
def test_region_size_bounds(pages: int) -> None:
    with pytest.raises(UsageError):
        DirtySet(pages)


def test_contains_ignores_non_pages() -> None:
    s = DirtySet(4096)
    s.mark(0)
    assert 0 in s and np.int64(0) in s and -1 not in s and 4096 not in s and "0" not in s


def test_harvest_is_atomic_against_concurrent_marks() -> None:
    pages, threads = 1 << 16, 4
    s = DirtySet(pages)
    chunks = np.array_split(np.random.default_rng(7).permutation(pages), threads * 50)
    done = threading.Event()

    def writer(k: int) -> None:
        for i, chunk in enumerate(chunks[k::threads]):
            if i % 2:
                s.mark_many(chunk)
            else:
                for page in chunk[:20].tolist():
                    s.mark(page)
                s.mark_many(chunk[20:])

    workers = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    seen: list[np.ndarray] = []
    while any(w.is_alive() for w in workers):
        seen.append(s.harvest())
    done.set()
    for w in workers:
        w.join()
    seen.append(s.harvest())
    every = np.concatenate(seen)
    assert len(every) == pages and np.array_equal(np.sort(every), np.arange(pages))


# ------------------------------------------------------------------------------ DirtySets
MiB = 1 << 20


def test_dirty_sets_map_gpas_to_their_region() -> None:
    low, high = Region(Gpa(0), 640 * 1024), Region(Gpa(4096 * MiB), 16 * MiB)
    sets = DirtySets([(4096 * MiB, 16 * MiB), (0, 640 * 1024)])
    assert sets.regions == (low, high) and high.pages == 4096
    assert sets.region_of(Gpa(0x1234)) == low
    assert sets.region_of(Gpa(640 * 1024)) is None and sets.region_of(Gpa(4096 * MiB - 1)) is None
    assert sets.set_for(Gpa(4096 * MiB + 5)) is sets[high]
    with pytest.raises(UsageError):
        sets.set_for(Gpa(MiB))

    sets.mark(Gpa(0x1FFF), 2)  # bytes 0x1fff..0x2000 touch pages 1 and 2
    sets.mark(Gpa(4096 * MiB + 0x3000))
    sets.mark_many(np.array([4096 * MiB + 16 * MiB - 1, 0x5000, 0x5008], dtype=np.uint64))
    assert len(sets) == 5
    assert sets.memory_bytes == sets[low].memory_bytes + sets[high].memory_bytes
    got = sets.harvest()
    assert got[low].tolist() == [1, 2, 5] and got[high].tolist() == [3, 4095]
    assert len(sets) == 0 and [len(s) for _, s in sets] == [0, 0]


@pytest.mark.parametrize("call", [
    lambda d: d.mark(Gpa(640 * 1024 - 1), 2), lambda d: d.mark(Gpa(MiB)),
    lambda d: d.mark(Gpa(0), 0), lambda d: d.mark_many(np.array([0, MiB])),
    lambda d: d.mark_many(np.array([-4096])), lambda d: d.mark_many(np.array([0.5])),
])
def test_dirty_sets_refuse_gpas_outside_the_regions(call: object) -> None:
    sets = DirtySets([(0, 640 * 1024), (4096 * MiB, 16 * MiB)])
    with pytest.raises(UsageError):
        call(sets)  # type: ignore[operator]
    assert len(sets) == 0


@pytest.mark.parametrize("regions", [[(0, 8192), (4096, 8192)], [(0, 100)], [(10, 4096)],
                                     [(0, 0)]])
def test_dirty_sets_refuse_bad_regions(regions: list[tuple[int, int]]) -> None:
    with pytest.raises(UsageError):
        DirtySets(regions)
