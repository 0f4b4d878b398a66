"""Several DMAR units that mirror each other's translation-pointer registers (seed design).

A platform has several remapping units, each with its own MMIO register file (VT-d 4.x s11.4).
In the seed design a unit also keeps *mirrors*: synchronized copies of other units'
translation-pointer register (RTADDR_REG, s11.4.5, as latched by GCMD.SRTP, s6.6). A device
behind unit A may then DMA into an address space that belongs to unit B: A walks B's tables,
reached through its mirror of B's RTADDR, in the shared physical memory.

Synchronization, as modelled here:

* ``program_root(owner, value)`` is software writing RTADDR_REG and issuing SRTP: the owner
  latches the value at once and its *generation* goes up by one.
* Each holder's copy is refreshed by a propagation message that arrives ``lag`` ticks later
  (``lag=None``: only explicit :meth:`MirrorSet.sync` refreshes). Messages between a pair
  arrive in order and a copy never goes back to an older generation.
* The generation number itself travels on an undelayed doorbell, so a holder *can* tell that
  its copy is stale. Whether it looks is the :class:`StalePolicy`.

What a stale mirror causes, and the fault behaviour (the choice this model makes):

* :attr:`StalePolicy.FAULT` (default, fail-closed): a DMA through a stale mirror is blocked
  and reported as a :class:`~hvtools.translation.Fault` with ``kind="vtd-mirror"`` and
  ``code=MIRROR_STALE`` (0x100). The code is deliberately outside VT-d's 8-bit fault-reason
  space: no architected reason describes this condition, and reusing one (e.g. 0x30, invalid
  RTADDR) would make software misdiagnose it.
* :attr:`StalePolicy.USE_STALE` (hardware without the doorbell check): the walk uses the old
  pointer. The outcome is flagged ``stale`` and carries what the current pointer would have
  given; ``hazard`` is True when the two differ - the DMA reached (or was refused by) an
  address space the owner has already left, the isolation breach this design must avoid.
* :attr:`StalePolicy.SYNC_ON_DEMAND`: the holder stalls the request, pulls the owner's current
  value (counted as a demand sync) and walks that.

Everything here is PURE: it reads tables through the :class:`PhysMemory` protocol and walks
them with :func:`hvtools.iommu.walk.translate`, using the *walking* unit's CAP/ECAP.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from hvtools.errors import UsageError
from hvtools.iommu.regs import IommuCaps
from hvtools.iommu.walk import DmaRequest, WalkOptions, translate
from hvtools.memory.protocol import PhysMemory
from hvtools.translation import Fault, Outcome, Stage

#: Fault code of a DMA refused because the walking unit's mirror is stale. Not architected:
#: it lies outside the 8-bit FRCD_REG.FR field on purpose.
MIRROR_STALE = 0x100
MIRROR_FAULT_KIND = "vtd-mirror"


class StalePolicy(StrEnum):
    """What a unit does with a DMA that needs a mirror known to be stale."""

    FAULT = "fault"
    USE_STALE = "use-stale"
    SYNC_ON_DEMAND = "sync-on-demand"


@dataclass
class RegisterFile:
    """The part of a unit's MMIO register file the mirrors care about (s11.4.4, s11.4.5)."""

    rtaddr: int = 0  # RTADDR_REG as last written
    active_rtaddr: int = 0  # the value latched by the last SRTP
    generation: int = 0  # SRTP count


@dataclass(frozen=True)
class MirrorCopy:
    """A holder's copy of an owner's latched RTADDR."""

    value: int
    generation: int
    synced_at: int


@dataclass
class DmarUnit:
    """One remapping unit: capabilities, register file, devices, mirrors of other units."""

    name: str
    caps: IommuCaps
    regs: RegisterFile = field(default_factory=RegisterFile)
    devices: set[int] = field(default_factory=set)
    mirrors: dict[str, MirrorCopy] = field(default_factory=dict)


@dataclass(frozen=True)
class MirrorEvent:
    """One entry of the event log: ``kind`` is program, propagate, sync, demand-sync or dma."""

    time: int
    kind: str
    holder: str
    owner: str
    generation: int


@dataclass
class MirrorStats:
    """Counters (STYLE 8): every DMA, those through a mirror, and what staleness did."""

    dmas: int = 0
    via_mirror: int = 0
    stale: int = 0  # DMAs that found their mirror stale
    stale_faults: int = 0
    stale_walks: int = 0  # walks through a stale pointer (USE_STALE)
    hazards: int = 0  # stale walks whose outcome differs from the current pointer's
    demand_syncs: int = 0
    propagations: int = 0  # lagged copies delivered
    syncs: int = 0  # copies refreshed by explicit sync()


@dataclass(frozen=True)
class MirrorOutcome:
    """A DMA's result and how it was reached."""

    outcome: Outcome
    walker: str  # the unit the device sits behind, which did the walk
    owner: str  # the unit whose address space was targeted
    rtaddr: int | None  # the RTADDR value walked (None when refused before walking)
    copy_generation: int | None  # generation of the mirror used (None: own registers)
    owner_generation: int
    stale: bool
    fresh: Outcome | None = None  # USE_STALE on a stale mirror: the current pointer's result

    @property
    def hazard(self) -> bool:
        """A stale walk whose result differs from what the owner's current tables give."""
        return self.fresh is not None and not _same(self.outcome, self.fresh)


def _same(a: Outcome, b: Outcome) -> bool:
    if isinstance(a, Fault) or isinstance(b, Fault):
        return isinstance(a, Fault) and isinstance(b, Fault) and a.code == b.code
    return a.output == b.output and a.permissions == b.permissions


@dataclass(frozen=True)
class _InFlight:
    due: int
    holder: str
    owner: str
    value: int
    generation: int


class MirrorSet:
    """A set of DMAR units over one physical memory, with mirrored RTADDR registers."""

    def __init__(self, memory: PhysMemory, *, lag: int | None = 1,
                 policy: StalePolicy = StalePolicy.FAULT,
                 options: WalkOptions | None = None) -> None:
        if lag is not None and lag < 0:
            raise UsageError(f"lag must be >= 0 ticks, not {lag}")
        self.memory = memory
        self.lag = lag
        self.policy = policy
        self.options = options
        self.now = 0
        self.units: dict[str, DmarUnit] = {}
        self.events: list[MirrorEvent] = []
        self.stats = MirrorStats()
        self._in_flight: list[_InFlight] = []

    # -- topology ---------------------------------------------------------------------------

    def add_unit(self, name: str, caps: IommuCaps) -> DmarUnit:
        if name in self.units:
            raise UsageError(f"DMAR unit {name!r} already exists")
        unit = self.units[name] = DmarUnit(name, caps)
        return unit

    def unit(self, name: str) -> DmarUnit:
        try:
            return self.units[name]
        except KeyError:
            raise UsageError(f"no DMAR unit {name!r}") from None

    def attach(self, sid: int, unit: str) -> None:
        """Put the device with requester ID ``sid`` behind ``unit`` (its DRHD scope)."""
        for other in self.units.values():
            if sid in other.devices:
                raise UsageError(f"source id {sid:#06x} is already behind {other.name}")
        self.unit(unit).devices.add(sid)

    def unit_of(self, sid: int) -> DmarUnit:
        for unit in self.units.values():
            if sid in unit.devices:
                return unit
        raise UsageError(f"source id {sid:#06x} is behind no DMAR unit")

    def mirror(self, holder: str, owner: str) -> None:
        """Make ``holder`` keep a copy of ``owner``'s RTADDR, synced now."""
        if holder == owner:
            raise UsageError("a unit does not mirror itself")
        h, o = self.unit(holder), self.unit(owner)
        h.mirrors[owner] = MirrorCopy(o.regs.active_rtaddr, o.regs.generation, self.now)

    # -- register writes and synchronization ------------------------------------------------

    def program_root(self, owner: str, rtaddr: int) -> int:
        """Software writes RTADDR_REG and sets GCMD.SRTP on ``owner``; returns the generation."""
        o = self.unit(owner)
        o.regs.rtaddr = rtaddr
        o.regs.active_rtaddr = rtaddr
        o.regs.generation += 1
        self._log("program", owner, owner, o.regs.generation)
        if self.lag is not None:
            for holder in self.units.values():
                if owner in holder.mirrors:
                    self._in_flight.append(_InFlight(self.now + self.lag, holder.name, owner,
                                                     rtaddr, o.regs.generation))
            self._deliver()
        return o.regs.generation

    def tick(self, n: int = 1) -> None:
        """Advance the clock by ``n`` ticks, delivering the propagations that fall due."""
        if n < 0:
            raise UsageError("time does not run backwards")
        for _ in range(n):
            self.now += 1
            self._deliver()

    def sync(self, holder: str | None = None, owner: str | None = None) -> int:
        """Refresh mirrors now (all, or those of ``holder`` / of ``owner``); returns how many
        copies changed."""
        changed = 0
        for h in list(self.units.values()):
            if holder is not None and h.name != holder:
                continue
            for name in list(h.mirrors):
                if owner is not None and name != owner:
                    continue
                if self._refresh(h, name, "sync"):
                    changed += 1
                    self.stats.syncs += 1
        return changed

    def is_stale(self, holder: str, owner: str) -> bool:
        copy = self._copy(holder, owner)
        return copy.generation != self.unit(owner).regs.generation

    # -- DMA --------------------------------------------------------------------------------

    def dma(self, request: DmaRequest, target: str | None = None) -> MirrorOutcome:
        """Translate ``request`` behind its unit, in ``target``'s address space (default: its
        own unit's)."""
        walker = self.unit_of(request.sid)
        owner = self.unit(target) if target is not None else walker
        self.stats.dmas += 1
        self._log("dma", walker.name, owner.name, owner.regs.generation)
        if owner is walker:
            rtaddr = walker.regs.active_rtaddr
            return MirrorOutcome(self._walk(request, walker, rtaddr), walker.name, owner.name,
                                 rtaddr, None, owner.regs.generation, False)

        self.stats.via_mirror += 1
        copy = self._copy(walker.name, owner.name)
        stale = copy.generation != owner.regs.generation
        if not stale:
            return MirrorOutcome(self._walk(request, walker, copy.value), walker.name,
                                 owner.name, copy.value, copy.generation,
                                 owner.regs.generation, False)
        self.stats.stale += 1
        if self.policy is StalePolicy.FAULT:
            self.stats.stale_faults += 1
            fault = Fault(
                input=request.address, kind=MIRROR_FAULT_KIND,
                reason=(f"stale mirror of {owner.name} RTADDR in {walker.name}: generation "
                        f"{copy.generation}, owner at {owner.regs.generation}"),
                code=MIRROR_STALE, level=0, stage=Stage.VTD_ROOT, address=request.address)
            return MirrorOutcome(fault, walker.name, owner.name, None, copy.generation,
                                 owner.regs.generation, True)
        if self.policy is StalePolicy.SYNC_ON_DEMAND:
            self._refresh(walker, owner.name, "demand-sync")
            self.stats.demand_syncs += 1
            fresh_copy = walker.mirrors[owner.name]
            return MirrorOutcome(self._walk(request, walker, fresh_copy.value), walker.name,
                                 owner.name, fresh_copy.value, fresh_copy.generation,
                                 owner.regs.generation, True)
        self.stats.stale_walks += 1
        outcome = self._walk(request, walker, copy.value)
        fresh = self._walk(request, walker, owner.regs.active_rtaddr)
        result = MirrorOutcome(outcome, walker.name, owner.name, copy.value, copy.generation,
                               owner.regs.generation, True, fresh)
        if result.hazard:
            self.stats.hazards += 1
        return result

    # -- internals --------------------------------------------------------------------------

    def _walk(self, request: DmaRequest, walker: DmarUnit, rtaddr: int) -> Outcome:
        return translate(request, self.memory, rtaddr, walker.caps, self.options)

    def _copy(self, holder: str, owner: str) -> MirrorCopy:
        h = self.unit(holder)
        self.unit(owner)
        try:
            return h.mirrors[owner]
        except KeyError:
            raise UsageError(f"{holder} keeps no mirror of {owner}") from None

    def _refresh(self, holder: DmarUnit, owner: str, kind: str) -> bool:
        regs = self.unit(owner).regs
        old = holder.mirrors[owner]
        if old.generation >= regs.generation:
            return False
        holder.mirrors[owner] = MirrorCopy(regs.active_rtaddr, regs.generation, self.now)
        self._log(kind, holder.name, owner, regs.generation)
        return True

    def _deliver(self) -> None:
        due = [m for m in self._in_flight if m.due <= self.now]
        self._in_flight = [m for m in self._in_flight if m.due > self.now]
        for m in due:
            h = self.units.get(m.holder)
            if h is None or m.owner not in h.mirrors:
                continue
            if h.mirrors[m.owner].generation >= m.generation:
                continue  # an explicit sync already brought something as new
            h.mirrors[m.owner] = MirrorCopy(m.value, m.generation, self.now)
            self.stats.propagations += 1
            self._log("propagate", m.holder, m.owner, m.generation)

    def _log(self, kind: str, holder: str, owner: str, generation: int) -> None:
        self.events.append(MirrorEvent(self.now, kind, holder, owner, generation))
