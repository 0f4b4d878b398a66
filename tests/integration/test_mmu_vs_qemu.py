"""Issue 3, proof 1: the x86 paging model against QEMU's own CPU translation (HMP gva2gpa).

A Linux guest boots under TCG (3 GiB, so its RAM is split around the q35 PCI hole; ``pti=off``
so a process's CR3 maps the kernel too; ``gbpages`` for 1-GByte pages in the direct map), once
with 4-level paging (``no5lvl``) and once with 5-level paging (``-cpu max`` has LA57). vCPU 0
runs a user-mode busy loop and vCPU 1 a ``dd`` that lives in the kernel; the VM is stopped
while each vCPU is in its process, and for every address of every kind below the model's
lookup must equal ``gva2gpa`` on that vCPU, Unmapped included:

kernel text and data (kallsyms), the direct map (page_offset_base, over RAM, the hole and
beyond), vmemmap, vmalloc areas and their guard pages (/proc/vmallocinfo), modules, the
cpu_entry_area, the process's own mappings and the gaps around them (/proc/PID/maps), leaves
the model itself enumerates (every 1-GByte page, first and last byte), non-canonical and
random addresses.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K, Gva
from hvtools.control import mmu_live
from hvtools.control.driver import Driver
from hvtools.control.drivers import make_driver
from hvtools.control.qemu_driver import QemuDriver
from hvtools.guest.image import GuestImage
from hvtools.memory.ramfile import RamFile, q35_ram_layout
from hvtools.mmu.paging import (
    LOOKUP,
    Access,
    AccessKind,
    EntryFlag,
    TableBuilder,
    canonical,
    iter_mappings,
    walk,
)
from hvtools.spec import spec_from_mapping
from hvtools.translation import Fault, Translation
from tests.integration.conftest import VmFactory

pytestmark = pytest.mark.integration

MiB, GiB = 1 << 20, 1 << 30
RAM = 3 * GiB


@pytest.fixture
def driver(image: GuestImage) -> Driver:
    """Only the qemu driver: gva2gpa and the RAM file are the same under libvirt."""
    return QemuDriver()


def sh(driver: Driver, name: str, script: str, timeout: float = 60.0) -> str:
    res = driver.exec(name, ["sh", "-c", script], timeout=timeout)
    assert res.status == 0, (script, res.stderr)
    return res.stdout.decode(errors="replace")


@dataclass
class GuestFacts:
    kallsyms: list[tuple[int, str, str]]  # (address, type, name [module])
    modules: list[tuple[int, int]]  # (base, size)
    vmalloc: list[tuple[int, int]]  # [start, end)
    ram: list[tuple[int, int]]  # System RAM [start, end] from /proc/iomem


def guest_facts(driver: Driver, name: str) -> GuestFacts:
    sh(driver, name, "echo 1 > /proc/sys/kernel/kptr_restrict")  # real addresses for root
    syms = []
    for line in sh(driver, name, "cat /proc/kallsyms").splitlines():
        parts = line.split()
        if len(parts) >= 3:
            syms.append((int(parts[0], 16), parts[1], " ".join(parts[2:])))
    mods = []
    for line in sh(driver, name, "cat /proc/modules").splitlines():
        p = line.split()
        mods.append((int(p[5], 16), int(p[1])))
    vmalloc = []
    for line in sh(driver, name, "cat /proc/vmallocinfo").splitlines():
        m = re.match(r"0x([0-9a-f]+)-0x([0-9a-f]+)\s", line)
        if m:
            vmalloc.append((int(m.group(1), 16), int(m.group(2), 16)))
    ram = []
    for line in sh(driver, name, "cat /proc/iomem").splitlines():
        m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) : System RAM", line)
        if m:
            ram.append((int(m.group(1), 16), int(m.group(2), 16)))
    return GuestFacts(syms, mods, vmalloc, ram)


def parse_maps(text: str) -> list[tuple[int, int, str]]:
    out = []
    for line in text.splitlines():
        rng, *rest = line.split(None, 5)
        lo, hi = (int(x, 16) for x in rng.split("-"))
        out.append((lo, hi, rest[-1] if len(rest) >= 5 else ""))
    return out


def read_u64_gva(target: mmu_live.LiveTarget, gva: int) -> int:
    r = walk(target.memory, target.cr3, target.mode, Gva(gva), LOOKUP)
    assert isinstance(r, Translation), f"{gva:#x} unmapped: {r}"
    return target.memory.read_u64(r.output)


def addresses(facts: GuestFacts, target: mmu_live.LiveTarget, maps: list[tuple[int, int, str]],
              rng: random.Random) -> dict[str, set[int]]:
    """The GVAs to compare, by kind."""
    la57 = target.mode.la57
    kinds: dict[str, set[int]] = defaultdict(set)
    sym = {n: a for a, _, n in facts.kallsyms}
    text_lo, text_hi, end = sym["_text"], sym["_etext"], sym["_end"]
    core = [(a, t) for a, t, n in facts.kallsyms if "[" not in n and text_lo <= a < end]
    text = [a for a, t in core if t in "Tt" and a < text_hi]
    data = [a for a, t in core if t in "DdBbRr"]
    kinds["kernel text"] |= {text_lo, text_hi - 1, *rng.sample(text, min(300, len(text)))}
    kinds["kernel data"] |= {end - 1, *rng.sample(data, min(200, len(data)))}
    kinds["modules"] |= {a for a, _, n in facts.kallsyms if "[" in n and a >= 1 << 63}
    for base, size in facts.modules:
        kinds["modules"] |= {base, base + size - 1, base + size}
    # The direct map, vmemmap and vmalloc bases are KASLR-randomized variables: read them.
    pob = read_u64_gva(target, sym["page_offset_base"])
    vmemmap = read_u64_gva(target, sym["vmemmap_base"])
    for lo, hi in facts.ram:
        kinds["direct map"] |= {pob + lo, pob + hi, pob + hi + 1, pob + (lo + hi) // 2 // 8 * 8}
    kinds["direct map"] |= {pob + g for g in range(0, 6 * GiB, 64 * MiB)}
    kinds["direct map"] |= {pob + rng.randrange(0, 8 * GiB) for _ in range(100)}
    span = (5 * GiB >> 12) * 64  # struct page per 4 KiB up to the top of RAM
    kinds["vmemmap"] |= {vmemmap + o for o in range(0, span + 8 * MiB, 1 * MiB)}
    for lo, hi in rng.sample(facts.vmalloc, min(120, len(facts.vmalloc))):
        kinds["vmalloc"] |= {lo, (lo + hi) // 2, hi - PAGE_4K, hi - 1, hi}
    kinds["cpu_entry_area"] |= {0xFFFF_FE00_0000_0000 + o for o in range(0, 0x80000, 0x1000)}
    for lo, hi, _ in maps:
        kinds["user mappings"] |= {lo, lo + 0x10, (lo + hi) // 2, hi - PAGE_4K, hi - 1}
        kinds["user holes"] |= {a for a in (lo - PAGE_4K, hi, hi + 0x10_0000)
                                if not any(m_lo <= a < m_hi for m_lo, m_hi, _ in maps)}
    leaves = list(iter_mappings(target.memory, target.cr3, target.mode))
    sample = [m for m in leaves if m.size == PAGE_1G] + rng.sample(leaves, min(300, len(leaves)))
    for m in sample:
        kinds["enumerated leaves"] |= {m.gva, m.gva + m.size - 1}
    va = target.mode.va_bits
    kinds["non-canonical / edges"] |= {
        0, 0x1000, 0x7FFF_FFFF_F000, 0x0000_8000_0000_0000, 0xFFFF_7FFF_FFFF_FFFF,
        0xFFFF_8000_0000_0000, 0x8000_0000_0000_0000, 0x0100_0000_0000_0000,
        0xFF00_0000_0000_0000, 0xFEFF_FFFF_FFFF_FFFF, (1 << 64) - 1, (1 << 64) - PAGE_4K}
    kinds["random"] |= {rng.getrandbits(64) for _ in range(150)}
    kinds["random"] |= {canonical(rng.getrandbits(va), la57) for _ in range(250)}
    return {k: {a & ((1 << 64) - 1) for a in v if a >= 0} for k, v in kinds.items()}


def stop_in_process(driver: Driver, name: str, cpu: int,
                    recognizes: Callable[[mmu_live.VcpuState], bool]) -> mmu_live.VcpuState:
    """Stop the VM at a moment when vCPU ``cpu`` runs the process ``recognizes`` accepts."""
    for _ in range(40):
        driver.qmp(name, "stop")
        vcpu = mmu_live.read_vcpu(driver, name, cpu)
        if recognizes(vcpu):
            return vcpu
        driver.qmp(name, "cont")
        time.sleep(0.1)
    raise AssertionError(f"vCPU {cpu} never stopped inside the process")


def compare(driver: Driver, name: str, target: mmu_live.LiveTarget,
            kinds: dict[str, set[int]], *, linux: bool = True) -> dict[str, Counter[str]]:
    """The model's lookup against gva2gpa for every address; returns counts per kind.

    With ``linux`` (tables the guest kernel built) an architected supervisor read must also
    reach the same GPA: Linux sets no reserved bit, so only SMAP may refuse (a user page).
    """
    cpu = target.vcpu.index
    report: dict[str, Counter[str]] = {}
    mismatches = []
    for kind, gvas in sorted(kinds.items()):
        ordered = sorted(gvas)
        theirs = mmu_live.qemu_gva2gpa(driver, name, [Gva(g) for g in ordered], cpu)
        counts: Counter[str] = Counter()
        for gva, qemu in zip(ordered, theirs, strict=True):
            r = walk(target.memory, target.cr3, target.mode, Gva(gva), LOOKUP)
            ours = r.output if isinstance(r, Translation) else None
            if ours != qemu:
                mismatches.append((kind, hex(gva), r, qemu))
            counts["mapped" if ours is not None else
                   f"unmapped ({r.reason})" if isinstance(r, Fault) else "?"] += 1
            if isinstance(r, Translation):
                counts[f"page {r.page_size >> 10}K"] += 1
            if isinstance(r, Translation) and linux:
                a = walk(target.memory, target.cr3, target.mode, Gva(gva),
                         Access(AccessKind.READ))
                if isinstance(a, Fault):
                    assert a.reason == "smap" and r.permissions.user, (hex(gva), a)
                else:
                    assert a.output == r.output
        report[kind] = counts
    assert not mismatches, f"{len(mismatches)} disagreements, first: {mismatches[:10]}"
    return report


#: Guest RAM the kernel leaves alone (``memmap=4M$0x30000000``): room for crafted tables.
SCRATCH, SCRATCH_SIZE = 0x3000_0000, 4 * MiB


Expect = dict[int, tuple[str | None, int]]  # GVA -> (fault reason of a user read, level)


def crafted(target: mmu_live.LiveTarget, writable: RamFile, used: list[tuple[int, int, str]],
            ) -> tuple[dict[str, set[int]], Expect, Callable[[], None]]:
    """Hook hand-made subtrees into two free top-level slots of the live root table.

    Linux on this machine never uses 1-GByte pages, sets no reserved bit and points no table
    outside RAM, so these entries do: 1-GByte, 2-MByte and 4-KByte pages, reserved bits (in
    leaves, in address bits above MAXPHYADDR, PS in the top-level entry), ignored and key bits,
    non-present entries full of garbage, and tables beyond RAM. Returns the addresses by
    kind, what an architected user-mode read of some of them must give, and the function
    that unhooks them (call it before the guest runs again).
    """
    la57 = target.mode.la57
    shift = 48 if la57 else 39
    root = target.mode.root_table(target.cr3)
    free = [i for i in range(0x10, 0x100) if writable.read_u64(root + 8 * i) == 0
            and not any(lo >> shift <= i <= (hi - 1) >> shift for lo, hi, _ in used)]
    slot, ps_slot = free[0], free[1]
    tb = TableBuilder(writable, la57=la57, first_table=SCRATCH,
                      table_limit=SCRATCH + SCRATCH_SIZE)
    base = slot << shift
    urw = EntryFlag.P | EntryFlag.RW | EntryFlag.US
    kinds: dict[str, set[int]] = defaultdict(set)
    tb.map(base, 0x4000_0000, PAGE_1G, flags=urw)
    e = tb.map(base + PAGE_1G, 0x4000_0000, PAGE_1G, flags=urw)
    writable.write_u64(e, writable.read_u64(e) | 1 << 13 | 1 << 20 | 1 << 12)  # 29:13, PAT
    e = tb.map(base + 2 * PAGE_1G, 0x4000_0000, PAGE_1G, flags=urw | EntryFlag.XD)
    writable.write_u64(e, writable.read_u64(e) | 1 << 45)  # above MAXPHYADDR
    for o in (0, PAGE_1G + 0x1234_5678, 2 * PAGE_1G + PAGE_1G - 1):
        kinds["crafted 1G / reserved"].add(base + o)
    b2 = base + 3 * PAGE_1G
    tb.map(b2, 0x20_0000, PAGE_2M, flags=urw)
    e = tb.map(b2 + PAGE_2M, 0x40_0000, PAGE_2M, flags=urw)
    writable.write_u64(e, writable.read_u64(e) | 1 << 13)  # 20:13 reserved
    for k in range(8):  # 4K leaves with XD, keys, ignored 58:52, G, PAT and PWT/PCD
        e = tb.map(b2 + 2 * PAGE_2M + k * PAGE_4K, 0x1000_0000 + k * PAGE_4K,
                   flags=urw | (EntryFlag.XD if k & 1 else 0) | (0x1F8 if k & 2 else 0),
                   pkey=k)
        writable.write_u64(e, writable.read_u64(e) | (k << 52))
    e = tb.map(b2 + 2 * PAGE_2M + 8 * PAGE_4K, 0, flags=urw)
    writable.write_u64(e, (1 << 64) - 2)  # P = 0, every other bit set
    for pointer in (1 << 39, 6 * GiB):  # page tables beyond RAM (unassigned: reads as 0)
        at = b2 + (3 if pointer == 1 << 39 else 4) * PAGE_2M
        writable.write_u64(tb.entry_address(at, 2), pointer | urw)
        kinds["crafted tables outside RAM"] |= {at, at + PAGE_4K}
    pdpte = tb.entry_address(base + 4 * PAGE_1G, 3)
    pd = tb.new_table()
    writable.write_u64(pdpte, pd | 1 << 45 | urw)  # a PD pointer above MAXPHYADDR
    writable.write_u64(pd, 0x200000 | urw | EntryFlag.PS)
    kinds["crafted tables outside RAM"] |= {base + 4 * PAGE_1G}
    for o in [*range(0, 2 * PAGE_2M, 0x4_1000), *range(2 * PAGE_2M, 2 * PAGE_2M + 10 * PAGE_4K,
                                                       PAGE_4K)]:
        kinds["crafted 2M / 4K"] |= {b2 + o, b2 + o + 0xFFF}
    kinds["crafted 2M / 4K"] |= {b2 + PAGE_2M - 1, b2 + 2 * PAGE_2M - 1}
    # The same subtree again from a top-level entry with PS = 1 (reserved there).
    hook = tb.memory.read_u64(tb.root + 8 * slot)
    for s in (slot, ps_slot):
        writable.write_u64(root + 8 * s, hook | (EntryFlag.PS if s == ps_slot else 0))
    for kind in list(kinds):
        kinds[kind] |= {(a - base) + (ps_slot << shift) for a in kinds[kind]}
    canon = {k: {int(canonical(a, la57)) for a in v} for k, v in kinds.items()}
    top = target.mode.levels
    expect: Expect = {base: (None, 3), base + PAGE_1G: ("reserved-bit", 3),
                      base + 2 * PAGE_1G: ("reserved-bit", 3), b2: (None, 2),
                      b2 + PAGE_2M: ("reserved-bit", 2), b2 + 2 * PAGE_2M: (None, 1),
                      b2 + 2 * PAGE_2M + 8 * PAGE_4K: ("not-present", 1),
                      b2 + 3 * PAGE_2M: ("table-unbacked", 1),
                      b2 + 4 * PAGE_2M: ("table-unbacked", 1),
                      base + 4 * PAGE_1G: ("reserved-bit", 3),
                      (ps_slot << shift) + PAGE_1G: ("reserved-bit", top)}
    expect = {int(canonical(a, la57)): v for a, v in expect.items()}

    def unhook() -> None:
        for s in (slot, ps_slot):
            writable.write_u64(root + 8 * s, 0)

    return canon, expect, unhook


def check_architected(target: mmu_live.LiveTarget, expect: Expect) -> None:
    """Where the model's architected walk must differ from a lookup: reserved bits (RSVD)."""
    for gva, (reason, level) in expect.items():
        r = walk(target.memory, target.cr3, target.mode, Gva(gva),
                 Access(AccessKind.READ, user=True))
        got = (r.reason if isinstance(r, Fault) else None,
               r.level if isinstance(r, Fault) else len(r.steps) and r.steps[-1].level)
        assert got == (reason, level), (hex(gva), r)
        if reason == "reserved-bit":
            assert isinstance(r, Fault) and r.code == 0xD  # P | U/S | RSVD


_RUN_CLI = "import sys; from hvtools.cli.main import run; run(sys.argv[1:])"


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _RUN_CLI, *args], input=stdin, text=True,
                          capture_output=True, timeout=300)


def check_ram_layout(driver: Driver, name: str) -> None:
    """q35_ram_layout agrees with QEMU's flattened memory map (``info mtree -f``)."""
    layout = q35_ram_layout(RAM)
    seen = set()
    for m in re.finditer(r"([0-9a-f]{16})-([0-9a-f]{16}) \(prio \d+, (?:ram|rom)\): ram0"
                         r"(?: @([0-9a-f]{16}))?", driver.hmp(name, "info mtree -f")):
        lo, hi = int(m.group(1), 16), int(m.group(2), 16)
        off = int(m.group(3), 16) if m.group(3) else 0
        region = next(r for r in layout if r.gpa <= lo and hi < r.end)
        assert off == region.offset + (lo - region.gpa), m.group(0)
        seen.add((lo, hi))
    merged: list[list[int]] = []
    for lo, hi in sorted(seen):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    assert [(lo, hi + 1) for lo, hi in merged] == [(r.gpa, r.end) for r in layout]


@pytest.mark.parametrize("levels", [4, 5])
def test_model_agrees_with_gva2gpa(levels: int, driver: Driver, vms: VmFactory) -> None:
    name = vms.name(f"mmu{levels}")
    args = ["pti=off", f"memmap={SCRATCH_SIZE >> 20}M${SCRATCH:#x}"] + (
        ["no5lvl"] if levels == 4 else [])
    driver.create(spec_from_mapping({"name": name, "memory": "3G", "vcpus": 2,
                                     "iommu": "none", "kernel_args": args}))
    driver.start(name)
    check_ram_layout(driver, name)
    facts = guest_facts(driver, name)
    pids = sh(driver, name,
              "taskset -c 0 sh -c 'while :; do :; done' </dev/null >/dev/null 2>&1 & echo $!; "
              "taskset -c 1 dd if=/dev/zero of=/dev/null bs=16M </dev/null >/dev/null 2>&1 & "
              "echo $!").split()
    maps = {cpu: parse_maps(sh(driver, name, f"cat /proc/{pid}/maps"))
            for cpu, pid in enumerate(pids)}
    stack = {cpu: next((lo, hi) for lo, hi, what in m if what == "[stack]")
             for cpu, m in maps.items()}

    def in_loop(v: mmu_live.VcpuState) -> bool:  # user mode, on the loop's own stack
        return v.cpl == 3 and stack[0][0] <= v.rsp < stack[0][1]

    def in_dd(v: mmu_live.VcpuState) -> bool:  # any mode, with dd's address space loaded
        t = mmu_live.attach(driver, name, 1)
        try:
            r = walk(t.memory, t.cr3, t.mode, Gva(stack[1][1] - 8), LOOKUP)
            return isinstance(r, Translation)
        finally:
            t.close()

    rng = random.Random(levels)
    totals: Counter[str] = Counter()
    for cpu, recognizes in ((0, in_loop), (1, in_dd)):
        stop_in_process(driver, name, cpu, recognizes)
        target = mmu_live.attach(driver, name, cpu)
        try:
            if target.mode.levels != levels:
                pytest.skip(f"the guest did not enable {levels}-level paging "
                            f"(CR4={target.vcpu.cr4:#x}): no LA57 in this CPU or kernel")
            assert target.features.maxphyaddr == 40  # QEMU TCG's phys-bits
            kinds = addresses(facts, target, maps[cpu], rng)
            report = compare(driver, name, target, kinds)
            if cpu == 0:
                with mmu_live.open_ram(driver, name, writable=True) as ram:
                    assert isinstance(ram, RamFile)
                    extra, expect, unhook = crafted(target, ram, maps[cpu])
                    try:
                        report |= compare(driver, name, target, extra, linux=False)
                        check_architected(target, expect)
                    finally:
                        unhook()
        finally:
            target.close()
        print(f"\n{levels}-level, vCPU {cpu} (CR3 {target.cr3:#x}, "
              f"{'user loop' if cpu == 0 else 'dd'}):")
        for kind, counts in report.items():
            print(f"  {kind:22} {sum(v for k, v in counts.items() if 'page' not in k):5} "
                  + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
            totals.update({f"{kind}: {k}": v for k, v in counts.items()})
        # Coverage the proof relies on: every kind present and, where expected, mapped.
        for kind in ("kernel text", "kernel data", "direct map", "vmalloc", "modules",
                     "user mappings", "enumerated leaves"):
            assert report[kind]["mapped"] > 0, (kind, report[kind])
        for kind in ("user holes", "non-canonical / edges", "random", "vmalloc"):
            assert sum(v for k, v in report[kind].items() if k.startswith("unmapped")), kind
        pages = sum((Counter({k: v for k, v in c.items() if "page" in k})
                     for c in report.values()), Counter())
        assert pages["page 4K"] and pages["page 2048K"], pages
        if cpu == 0:
            assert pages["page 1048576K"], pages
        driver.qmp(name, "cont")

    # The CLI on the same VM, stopped: one JSON line per GVA in order, exit 1 (some faulted).
    driver.qmp(name, "stop")
    sym = {n: a for a, _, n in facts.kallsyms}
    gvas = [sym["_text"], 0x1000, sym["_etext"] - 1, 0xFFFF_8000_0000_0000 - PAGE_4K,
            maps[0][0][0]]
    res = cli("mmu", "translate", "--vm", name, "--cpu", "0", "--json", "-v",
              stdin="\n".join(f"{g:x}" for g in gvas) + "\n")
    assert res.returncode == 1, res.stderr
    objs = [json.loads(line) for line in res.stdout.splitlines()]
    qemu = mmu_live.qemu_gva2gpa(driver, name, [Gva(g) for g in gvas], 0)
    assert [o["gva"] for o in objs] == [hex(g) for g in gvas]
    assert [None if o["gpa"] is None else int(o["gpa"], 16) for o in objs] == qemu
    assert all(len(o["steps"]) >= 1 for o in objs[:3])
    res = cli("mmu", "dump", "--vm", name, "--cpu", "1", "--json")
    assert res.returncode == 0, res.stderr
    tree = json.loads(res.stdout)
    assert tree["levels"] == levels and tree["ranges"] and tree["pages"]["4K"] > 0
    assert tree["mapped_bytes"] == sum(r["length"] for r in tree["ranges"])
    driver.qmp(name, "cont")
    compared = sum(v for k, v in totals.items() if "page" not in k)
    mapped = sum(v for k, v in totals.items() if k.endswith(": mapped"))
    print(f"{levels}-level: {compared} addresses compared on 2 vCPUs, {mapped} mapped, "
          f"{compared - mapped} unmapped, 0 disagreements")


@pytest.fixture(params=["qemu", "libvirt"])
def each_driver(request: pytest.FixtureRequest, image: GuestImage) -> Driver:
    return make_driver(request.param)


def test_live_attach_and_cli_on_each_driver(each_driver: Driver,
                                            request: pytest.FixtureRequest) -> None:
    """The RAM file, QOM phys-bits and monitor reads work the same under both drivers."""
    vms = VmFactory(each_driver, request)
    try:
        name = vms.name("mmuatt")
        each_driver.create(spec_from_mapping({"name": name, "memory": "512M",
                                              "iommu": "none"}))
        each_driver.start(name)
        sym = dict((p[2], int(p[0], 16)) for p in (
            line.split() for line in sh(each_driver, name,
                                        "grep -E ' (_text|_etext|_end)$' /proc/kallsyms")
            .splitlines()))
        each_driver.qmp(name, "stop")
        target = mmu_live.attach(each_driver, name, 0)
        try:
            assert target.memory.path == mmu_live.ram_path(each_driver, name)
            assert target.features.source == "qom" and target.features.maxphyaddr == 40
            leaves = list(iter_mappings(target.memory, target.cr3, target.mode))
            kinds = {"kernel": {sym["_text"], sym["_etext"] - 1, sym["_end"] - 1},
                     "holes": {0, 0x1000, (1 << 64) - 1},
                     "enumerated leaves": {m.gva for m in leaves[:: max(1, len(leaves) // 50)]}}
            report = compare(each_driver, name, target, kinds)
            assert report["kernel"]["mapped"] == 3 and report["enumerated leaves"]["mapped"]
        finally:
            target.close()
        res = cli("mmu", "translate", "--vm", name, "--driver", each_driver.name,
                  f"{sym['_text']:x}")
        assert res.returncode == 0, res.stderr
        gpa = mmu_live.qemu_gva2gpa(each_driver, name, [Gva(sym["_text"])], 0)[0]
        assert res.stdout.split()[2] == f"{gpa:#x}"
        each_driver.qmp(name, "cont")
    finally:
        vms.cleanup()
