"""Pure batching helpers of the transport, and the JSON form of a remote region."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvtools.errors import TransportError
from hvtools.transport.api import RemoteRegion
from hvtools.transport.ops import coalesce, split


def test_coalesce_merges_runs_contiguous_on_both_sides() -> None:
    runs = [(0, 100, 4096), (4096, 4196, 4096), (8192, 8292, 4096)]
    assert coalesce(runs) == [(0, 100, 12288)]


def test_coalesce_keeps_runs_contiguous_on_one_side_only() -> None:
    runs = [(0, 0, 4096), (4096, 8192, 4096), (12288, 12288, 4096)]
    assert coalesce(runs) == runs


def test_coalesce_then_split() -> None:
    runs = [(0, 0, 3 << 20), (3 << 20, 3 << 20, 1 << 20)]
    assert coalesce(runs, max_len=1 << 20) == [(i << 20, i << 20, 1 << 20) for i in range(4)]


def test_split_last_piece_is_short() -> None:
    assert list(split((10, 20, 2500), 1000)) == [(10, 20, 1000), (1010, 1020, 1000),
                                                 (2010, 2020, 500)]


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_lengths_refused(bad: int) -> None:
    with pytest.raises(ValueError):
        coalesce([(0, 0, bad)])
    with pytest.raises(ValueError):
        list(split((0, 0, 10), bad))


@given(st.lists(st.tuples(st.integers(0, 63), st.integers(1, 4)), min_size=1, max_size=40),
       st.integers(1, 9))
def test_coalesce_covers_the_same_bytes(pages: list[tuple[int, int]], max_len: int) -> None:
    # Each page maps local page p to remote page p + 7 (so contiguous runs may merge).
    runs = [(p, p + 7, n) for p, n in pages]
    out = coalesce(runs, max_len=max_len)
    want = [(lo + i, ro + i) for lo, ro, n in runs for i in range(n)]
    got = [(lo + i, ro + i) for lo, ro, n in out for i in range(n)]
    assert got == want
    assert all(n <= max_len for _, _, n in out)


def test_remote_region_json_round_trip() -> None:
    r = RemoteRegion(0x7F00_0000_1000, 1 << 30, 0xDEAD_BEEF_0001)
    assert RemoteRegion.from_json(r.to_json()) == r
    with pytest.raises(TransportError):
        RemoteRegion.from_json({"addr": 1})
