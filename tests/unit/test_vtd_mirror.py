"""DMAR units mirroring each other's RTADDR (the seed design): sync, lag, stale behaviour."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvtools.addr import Iova
from hvtools.errors import UsageError
from hvtools.iommu.build import VtdTables
from hvtools.iommu.mirror import (
    MIRROR_FAULT_KIND,
    MIRROR_STALE,
    MirrorEvent,
    MirrorSet,
    MirrorStats,
    StalePolicy,
)
from hvtools.iommu.walk import Access, DmaRequest, is_recorded, source_id
from hvtools.translation import Fault, Translation
from tests.unit.test_vtd_walk import CAPS

DEV_A = source_id(0, 2, 0)  # behind unit A
DEV_B = source_id(0, 4, 0)  # behind unit B; its context entries live in B's root table


class World:
    """Units A and B over one memory. B's root table maps DEV_A's requester ID (the device
    that DMAs into B's space through A's mirror); it can be swapped for a second table."""

    def __init__(self, lag: int | None = 2, policy: StalePolicy = StalePolicy.FAULT) -> None:
        self.t = VtdTables.in_buffer()
        self.root_a = self._root(0x1000, 0xA000)  # A's own space: 0x1000 -> 0xA000
        self.root_b1 = self._root(0x1000, 0xB000)  # B's space, generation 1
        self.root_b2 = self._root(0x1000, 0xC000)  # B's space after re-programming
        self.set = MirrorSet(self.t.mem, lag=lag, policy=policy)
        self.set.add_unit("A", CAPS)
        self.set.add_unit("B", CAPS)
        self.set.attach(DEV_A, "A")
        self.set.attach(DEV_B, "B")
        self.set.program_root("A", self.root_a)
        self.set.program_root("B", self.root_b1)
        self.set.mirror("A", "B")

    def _root(self, iova: int, hpa: int) -> int:
        rtaddr = self.t.legacy()
        for sid in (DEV_A, DEV_B):
            ss = self.t.alloc()
            self.t.legacy_device(rtaddr, sid, SSPTPTR=ss >> 12)
            self.t.ss_map(ss, 4, iova, hpa)
        return rtaddr

    def dma(self, target: str | None = "B", sid: int = DEV_A) -> Translation | Fault:
        return self.set.dma(DmaRequest(sid, Iova(0x1234), Access.WRITE), target).outcome


def out(outcome: Translation | Fault) -> int:
    assert isinstance(outcome, Translation), outcome
    return outcome.output


def test_synced_mirror_reaches_the_other_units_space() -> None:
    w = World()
    assert out(w.dma(None)) == 0xA234  # own unit
    assert out(w.dma("B")) == 0xB234  # B's space through A's mirror
    assert out(w.dma(None, sid=DEV_B)) == 0xB234  # B's own device, same tables
    result = w.set.dma(DmaRequest(DEV_A, Iova(0x1234)), "B")
    assert (result.walker, result.owner, result.stale) == ("A", "B", False)
    assert result.rtaddr == w.root_b1 and result.copy_generation == 1
    assert not result.hazard


def test_stale_mirror_faults_until_the_copy_arrives() -> None:
    w = World(lag=2)
    w.set.program_root("B", w.root_b2)
    assert w.set.is_stale("A", "B")
    f = w.dma("B")
    assert isinstance(f, Fault)
    assert (f.kind, f.code, f.stage.value) == (MIRROR_FAULT_KIND, MIRROR_STALE, "vtd-root")
    assert "generation 1, owner at 2" in f.reason
    assert is_recorded(f)  # not an architected reason: never suppressed by FPD
    assert out(w.dma(None, sid=DEV_B)) == 0xC234  # B itself already uses the new table
    w.set.tick()
    assert isinstance(w.dma("B"), Fault)
    w.set.tick()
    assert not w.set.is_stale("A", "B")
    assert out(w.dma("B")) == 0xC234
    assert w.set.stats == MirrorStats(dmas=4, via_mirror=3, stale=2, stale_faults=2,
                                      propagations=1)


def test_use_stale_walks_the_old_tables_and_flags_the_hazard() -> None:
    w = World(lag=5, policy=StalePolicy.USE_STALE)
    w.set.program_root("B", w.root_b2)
    result = w.set.dma(DmaRequest(DEV_A, Iova(0x1234), Access.WRITE), "B")
    assert result.stale and result.rtaddr == w.root_b1
    assert out(result.outcome) == 0xB234  # the DMA lands where B no longer maps it
    assert result.fresh is not None and out(result.fresh) == 0xC234
    assert result.hazard
    assert w.set.stats.hazards == 1 and w.set.stats.stale_walks == 1
    # If the old and new tables agree, a stale walk is harmless.
    w2 = World(lag=5, policy=StalePolicy.USE_STALE)
    w2.set.program_root("B", w2.root_b1)  # re-latch the same table: generation 2
    result = w2.set.dma(DmaRequest(DEV_A, Iova(0x1234)), "B")
    assert result.stale and not result.hazard


def test_sync_on_demand_pulls_the_current_pointer() -> None:
    w = World(lag=None, policy=StalePolicy.SYNC_ON_DEMAND)
    w.set.program_root("B", w.root_b2)
    result = w.set.dma(DmaRequest(DEV_A, Iova(0x1234)), "B")
    assert result.stale and result.copy_generation == 2 and out(result.outcome) == 0xC234
    assert not w.set.is_stale("A", "B")
    assert w.set.stats.demand_syncs == 1
    assert w.set.events[-1] == MirrorEvent(0, "demand-sync", "A", "B", 2)


def test_explicit_sync_only() -> None:
    w = World(lag=None)
    w.set.program_root("B", w.root_b2)
    w.set.tick(100)
    assert w.set.is_stale("A", "B")
    assert w.set.sync(owner="A") == 0  # nobody mirrors A
    assert w.set.sync() == 1
    assert w.set.sync() == 0
    assert out(w.dma("B")) == 0xC234
    assert w.set.stats.syncs == 1 and w.set.stats.propagations == 0


def test_event_sequence_and_no_regression() -> None:
    """Two quick re-programmings, an explicit sync, then the late in-order copies: the mirror
    never goes back to an older generation."""
    w = World(lag=3)
    w.set.events.clear()
    w.set.program_root("B", w.root_b2)  # t=0, generation 2, due t=3
    w.set.tick()
    w.set.program_root("B", w.root_b1)  # t=1, generation 3, due t=4
    w.set.sync("A", "B")  # t=1: A copies generation 3 now
    w.set.tick(5)
    assert w.set.events == [
        MirrorEvent(0, "program", "B", "B", 2),
        MirrorEvent(1, "program", "B", "B", 3),
        MirrorEvent(1, "sync", "A", "B", 3),
    ]
    assert w.set.units["A"].mirrors["B"].generation == 3
    assert out(w.dma("B")) == 0xB234
    assert w.set.stats.propagations == 0


def test_lag_zero_is_immediate() -> None:
    w = World(lag=0)
    w.set.program_root("B", w.root_b2)
    assert not w.set.is_stale("A", "B")
    assert out(w.dma("B")) == 0xC234
    assert w.set.events[-3:-1] == [MirrorEvent(0, "program", "B", "B", 2),
                                   MirrorEvent(0, "propagate", "A", "B", 2)]


def test_faults_inside_the_other_space_are_vtd_faults() -> None:
    w = World()
    f = w.set.dma(DmaRequest(DEV_A, Iova(0x5000)), "B").outcome
    assert isinstance(f, Fault) and f.kind == "vtd" and f.code == 0x06


def test_misuse() -> None:
    w = World()
    with pytest.raises(UsageError):
        w.set.add_unit("A", CAPS)
    with pytest.raises(UsageError):
        w.set.attach(DEV_A, "B")
    with pytest.raises(UsageError):
        w.set.mirror("A", "A")
    with pytest.raises(UsageError):
        w.set.mirror("A", "Z")
    with pytest.raises(UsageError):
        w.dma("B", sid=source_id(0, 9, 0))  # behind no unit
    with pytest.raises(UsageError):
        w.dma("A", sid=DEV_B)  # B keeps no mirror of A
    with pytest.raises(UsageError):
        w.set.tick(-1)
    with pytest.raises(UsageError):
        MirrorSet(w.t.mem, lag=-1)


_ops = st.lists(st.one_of(
    st.tuples(st.just("program"), st.sampled_from([1, 2])),
    st.tuples(st.just("tick"), st.integers(0, 3)),
    st.tuples(st.just("sync"), st.just(0)),
    st.tuples(st.just("dma"), st.just(0)),
), max_size=30)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, lag=st.none() | st.integers(0, 4), policy=st.sampled_from(list(StalePolicy)))
def test_mirror_properties(ops: list[tuple[str, int]], lag: int | None,
                           policy: StalePolicy) -> None:
    """Over any sequence: a DMA that is not flagged stale equals the owner's current walk;
    only USE_STALE ever produces a hazard; FAULT never returns a stale translation."""
    w = World(lag=lag, policy=policy)
    roots = {1: w.root_b1, 2: w.root_b2}
    for op, arg in ops:
        if op == "program":
            w.set.program_root("B", roots[arg])
        elif op == "tick":
            w.set.tick(arg)
        elif op == "sync":
            w.set.sync()
        else:
            result = w.set.dma(DmaRequest(DEV_A, Iova(0x1234)), "B")
            current = w.set.dma(DmaRequest(DEV_B, Iova(0x1234)), None).outcome
            if not result.stale or policy is StalePolicy.SYNC_ON_DEMAND:
                assert out(result.outcome) == out(current)
            if policy is StalePolicy.FAULT and result.stale:
                assert isinstance(result.outcome, Fault) and result.outcome.code == MIRROR_STALE
            assert result.hazard == (policy is StalePolicy.USE_STALE and result.stale
                                     and out(result.outcome) != out(current))
    stats = w.set.stats
    assert stats.stale == stats.stale_faults + stats.stale_walks + stats.demand_syncs
    assert stats.hazards <= stats.stale_walks
