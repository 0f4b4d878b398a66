"""DirtySet against a plain Python set and bitmap, on random operation sequences; the QEMU-style
bitmap exchange format."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvtools.errors import UsageError
from hvtools.tracking import DirtySet, Representation

# Region sizes around the limits: no SPARSE (1000), the smallest SPARSE (1024), a partial last
# word (4100), and one where a few ranges promote (8192).
PAGES = st.sampled_from([1, 64, 1000, 1024, 4100, 8192])


def reference_words(pages: set[int], n: int) -> np.ndarray:
    words = [0] * (-(-n // 64))
    for p in pages:
        words[p // 64] |= 1 << (p % 64)
    return np.array(words, dtype=np.uint64)


def check(s: DirtySet, ref: set[int]) -> None:
    assert len(s) == len(ref)
    rep = s.representation
    assert (rep is Representation.FULL) == (len(ref) == s.pages)
    if rep is Representation.SPARSE:
        assert len(ref) <= s.sparse_limit and s.memory_bytes <= 8 * (-(-s.pages // 64))
    if not s.sparse_limit:
        assert rep is not Representation.SPARSE


@settings(max_examples=300, deadline=None)
@given(st.data(), PAGES)
def test_matches_a_python_set(data: st.DataObject, pages: int) -> None:
    s, ref = DirtySet(pages), set()
    page = st.integers(0, pages - 1)
    marks = 0
    for _ in range(data.draw(st.integers(1, 40), label="ops")):
        op = data.draw(st.sampled_from(["mark", "range", "many", "fill", "harvest", "probe",
                                        "bitmap"]))
        if op == "mark":
            p = data.draw(page)
            s.mark(p)
            ref.add(p)
            marks += 1
        elif op == "range":
            first = data.draw(page)
            count = data.draw(st.one_of(st.integers(0, pages - first),
                                        st.integers(0, min(40, pages - first))))
            s.mark_range(first, count)
            ref.update(range(first, first + count))
            marks += count
        elif op == "many":
            idx = data.draw(st.lists(page, max_size=200))
            dtype = data.draw(st.sampled_from([np.int64, np.uint32, np.uint64, np.int32]))
            s.mark_many(np.array(idx, dtype=dtype))
            ref.update(idx)
            marks += len(idx)
        elif op == "fill":  # every clean page but up to two: reaches FULL through mark_many
            rest = sorted(set(range(pages)) - ref)
            idx = rest[data.draw(st.integers(0, min(2, len(rest)))):]
            s.mark_many(np.array(idx[::-1], dtype=np.int64))
            ref.update(idx)
            marks += len(idx)
        elif op == "harvest":
            if data.draw(st.booleans()):
                assert s.harvest().tolist() == sorted(ref)
            else:
                got = s.harvest_runs()
                assert [p for f, c in got for p in range(f, f + c)] == sorted(ref)
            ref = set()
        elif op == "probe":
            p = data.draw(page)
            assert (p in s) == (p in ref)
        else:
            assert np.array_equal(s.to_bitmap(), reference_words(ref, pages))
        check(s, ref)
    assert s.stats.marks == marks
    assert s.harvest().tolist() == sorted(ref)


@settings(max_examples=200, deadline=None)
@given(st.data(), PAGES)
def test_bitmap_round_trip(data: st.DataObject, pages: int) -> None:
    dirty = set(data.draw(st.one_of(
        st.lists(st.integers(0, pages - 1), max_size=300),
        st.just(list(range(pages))),
        st.builds(lambda f, c: list(range(f, min(pages, f + c))),
                  st.integers(0, pages - 1), st.integers(0, pages)))))
    words = reference_words(dirty, pages)
    s = DirtySet.from_bitmap(words, pages)
    assert s.stats.marks == 0 and s.stats.promotions == 0
    check(s, dirty)
    assert np.array_equal(s.to_bitmap(), words)
    wire = words.astype("<u8").tobytes()  # the bytes QEMU / vhost-user put in shared memory
    assert np.array_equal(DirtySet.from_bitmap(wire, pages).to_bitmap(), words)
    assert s.harvest().tolist() == sorted(dirty)


def test_bitmap_layout_is_qemus() -> None:
    # vhost-user log: log[page / 8] |= 1 << (page % 8); KVM: bit page % 64 of u64 word page / 64.
    log = bytearray(16)
    for page in (0, 9, 127):
        log[page // 8] |= 1 << (page % 8)
    s = DirtySet.from_bitmap(bytes(log))
    assert s.pages == 128 and s.harvest().tolist() == [0, 9, 127]
    t = DirtySet(128)
    t.mark_many(np.array([0, 9, 127]))
    assert t.to_bitmap().astype("<u8").tobytes() == bytes(log)
    assert t.to_bitmap().tolist() == [1 | 1 << 9, 1 << 63]


def test_full_set_exports_only_the_region_bits() -> None:
    s = DirtySet(70)
    s.mark_range(0, 70)
    assert s.to_bitmap().tolist() == [2**64 - 1, 0b111111]


@pytest.mark.parametrize(("log", "pages"), [
    (np.array([1 << 6], dtype=np.uint64), 6),  # a bit beyond the region
    (np.zeros(2, dtype=np.uint64), 64),  # one word too many
    (b"\x00" * 7, None),  # not whole words
    ("not a buffer", None),
])
def test_from_bitmap_refuses_bad_logs(log: object, pages: int | None) -> None:
    with pytest.raises(UsageError):
        DirtySet.from_bitmap(log, pages)


def test_from_bitmap_picks_the_representation_by_density() -> None:
    words = np.zeros(4096 // 64, dtype=np.uint64)
    words[:1] = np.uint64(2**64 - 1)  # 64 pages: the sparse limit
    assert DirtySet.from_bitmap(words).representation is Representation.SPARSE
    words[1] = np.uint64(1)  # 65
    assert DirtySet.from_bitmap(words).representation is Representation.BITMAP
    words[:] = np.uint64(2**64 - 1)
    full = DirtySet.from_bitmap(words)
    assert full.representation is Representation.FULL and full.stats.promotions == 0
