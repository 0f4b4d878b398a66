"""Pure helpers for batches of one-sided ops: coalesce contiguous runs, split long ones.

A run is ``(local_off, remote_off, length)``. Runs that continue each other on BOTH sides merge
into one op (fewer ops, bigger transfers); runs longer than ``max_len`` split into pieces so
that several can be in flight at once (a single huge op serialises on one connection).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

Run = tuple[int, int, int]


def coalesce(runs: Iterable[Run], max_len: int | None = None) -> list[Run]:
    """Merge consecutive runs contiguous on both sides (in the given order), then split."""
    out: list[Run] = []
    for lo, ro, n in runs:
        if n <= 0:
            raise ValueError(f"run length must be positive, got {n}")
        if out:
            plo, pro, pn = out[-1]
            if plo + pn == lo and pro + pn == ro:
                out[-1] = (plo, pro, pn + n)
                continue
        out.append((lo, ro, n))
    if max_len is None:
        return out
    return [piece for run in out for piece in split(run, max_len)]


def split(run: Run, max_len: int) -> Iterator[Run]:
    """``run`` cut into pieces of at most ``max_len`` bytes, in order."""
    if max_len <= 0:
        raise ValueError(f"max_len must be positive, got {max_len}")
    lo, ro, n = run
    done = 0
    while done < n:
        k = min(max_len, n - done)
        yield (lo + done, ro + done, k)
        done += k
