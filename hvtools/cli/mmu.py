"""``hvtools mmu``: translate guest-virtual addresses with the x86 paging model, dump a tree.

``translate`` prints one line (or one JSON object) per GVA, in input order, and exits 0 when
every address translated, 1 when any faulted, 2 on bad usage.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K, Gva
from hvtools.cli.main import HvGroup, driver_option, json_option, out
from hvtools.errors import UsageError
from hvtools.mmu.paging import (
    ENTRY_NAMES,
    Access,
    AccessKind,
    PagingMode,
    TreeSummary,
    summarize,
    walk,
)
from hvtools.translation import Fault, Permissions, Translation, WalkStep

_SIZE_NAMES = {PAGE_4K: "4K", PAGE_2M: "2M", PAGE_1G: "1G"}
_ACCESS_KINDS = ("lookup", "read", "write", "fetch")
#: Offline MAXPHYADDR when none is given: what QEMU's TCG CPUs report (``phys-bits``).
OFFLINE_MAXPHYADDR = 40


@click.group(cls=HvGroup)
def mmu() -> None:
    """Translate guest-virtual addresses with the x86 paging model (SDM Vol. 3A ch. 4)."""


def parse_gva(text: str) -> Gva:
    """A GVA in hexadecimal, with or without ``0x`` (as /proc/kallsyms and maps print them)."""
    t = text.strip().lower().replace("_", "")
    if t.startswith("0x"):
        t = t[2:]
    try:
        value = int(t, 16)
    except ValueError:
        raise UsageError(f"{text.strip()!r} is not a hexadecimal address") from None
    if not 0 <= value < (1 << 64):
        raise UsageError(f"{text.strip()!r} is not a 64-bit address")
    return Gva(value)


def _read_gvas(args: tuple[str, ...]) -> list[Gva]:
    if args:
        return [parse_gva(a) for a in args]
    gvas = []
    for raw in sys.stdin.read().splitlines():
        text = raw.split("#", 1)[0].strip()
        if text:
            gvas.append(parse_gva(text))
    return gvas


def _perm_text(p: Permissions) -> str:
    rwx = ("r" if p.read else "-") + ("w" if p.write else "-") + ("x" if p.execute else "-")
    key = f" pkey={p.protection_key}" if p.protection_key is not None else ""
    return f"{rwx} {'user' if p.user else 'supervisor'}{key}"


def _step_json(s: WalkStep) -> dict[str, Any]:
    d: dict[str, Any] = {"level": s.level, "table": s.table, "address": f"{s.address:#x}",
                         "entry": f"{s.entry:#018x}"}
    if s.write_back is not None:
        d["write_back"] = f"{s.write_back:#018x}"
    return d


def _step_text(s: WalkStep) -> str:
    return f"{s.table}@{s.address:#x}={s.entry:#018x}"


def result_json(gva: int, r: Translation | Fault, verbose: bool) -> dict[str, Any]:
    """The JSON object of one result: gva, gpa, fault, page_size (and steps with -v)."""
    d: dict[str, Any] = {
        "gva": f"{gva:#x}",
        "gpa": f"{r.output:#x}" if isinstance(r, Translation) else None,
        "fault": r.reason if isinstance(r, Fault) else None,
        "page_size": r.page_size if isinstance(r, Translation) else None,
    }
    if verbose:
        d["steps"] = [_step_json(s) for s in r.steps]
    return d


def result_text(gva: int, r: Translation | Fault, verbose: bool) -> str:
    """One line: ``GVA -> GPA SIZE PERMS`` or ``GVA -> fault REASON (...)``."""
    if isinstance(r, Translation):
        line = (f"{gva:#018x} -> {r.output:#x} {_SIZE_NAMES.get(r.page_size, r.page_size)} "
                f"{_perm_text(r.permissions)}")
    else:
        where = {"page-fault": f"#PF error code {r.code:#x}",
                 "general-protection": "#GP(0)"}.get(r.kind, r.kind)
        if r.level:
            where += f" at level {r.level}"
        if r.kind == "unbacked" and r.address is not None:
            where += f", entry at {r.address:#x} outside guest memory"
        line = f"{gva:#018x} -> fault {r.reason} ({where})"
    if verbose:
        line += "  " + " ".join(_step_text(s) for s in r.steps)
    return line


@contextlib.contextmanager
def _paused(driver: Any, name: str, enabled: bool) -> Iterator[None]:
    """Stop the VM for the duration (QMP stop/cont) if asked and it is running."""
    if not enabled or driver.qmp(name, "query-status").get("status") != "running":
        yield
        return
    driver.qmp(name, "stop")
    try:
        yield
    finally:
        driver.qmp(name, "cont")


@mmu.command("translate")
@click.argument("gvas", nargs=-1)
@click.option("--vm", "vm_name", metavar="NAME", help="Read CR3/CR4/EFER from a live vCPU.")
@driver_option
@click.option("--cpu", type=click.IntRange(min=0), default=0, show_default=True,
              help="vCPU index (with --vm).")
@click.option("--pause", is_flag=True, help="Stop the VM while translating (with --vm).")
@click.option("--memory", "memory_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Offline: a pmemsave dump (file offset = guest-physical address).")
@click.option("--cr3", "cr3_text", metavar="X", help="Offline: the CR3 value (hex).")
@click.option("--la57", is_flag=True, help="Offline: 5-level paging (CR4.LA57).")
@click.option("--maxphyaddr", type=click.IntRange(32, 52), default=None,
              help=f"Offline: MAXPHYADDR (default {OFFLINE_MAXPHYADDR}, QEMU TCG's).")
@click.option("--access", type=click.Choice(_ACCESS_KINDS), default="lookup",
              show_default=True,
              help="lookup: what the tables map (as QEMU's gva2gpa); read/write/fetch: an "
                   "architected access with rights, reserved bits and #PF error code.")
@click.option("--user", is_flag=True, help="A user-mode (CPL 3) access (with --access).")
@click.option("-v", "--verbose", is_flag=True, help="Show every table read.")
@json_option
def translate(gvas: tuple[str, ...], vm_name: str | None, driver: str | None, cpu: int,
              pause: bool, memory_file: Path | None, cr3_text: str | None, la57: bool,
              maxphyaddr: int | None, access: str, user: bool, verbose: bool,
              as_json: bool) -> None:
    """Translate each GVA (hex; args, or one per line on stdin) to a GPA or a fault.

    Offline (--memory), an architected --access assumes EFER.NXE=1, CR0.WP=1 and no
    SMEP/SMAP/protection keys; with --vm the vCPU's own CR0/CR4/EFER decide.
    """
    if (vm_name is None) == (memory_file is None):
        raise click.UsageError("give either --vm NAME or --memory FILE --cr3 X")
    if vm_name is not None and (cr3_text or la57 or maxphyaddr is not None):
        raise click.UsageError("--cr3, --la57 and --maxphyaddr go with --memory, not --vm")
    if memory_file is not None and cr3_text is None:
        raise click.UsageError("--memory needs --cr3")
    if memory_file is not None and pause:
        raise click.UsageError("--pause goes with --vm")
    if user and access == "lookup":
        raise click.UsageError("--user needs --access read|write|fetch")
    acc = Access(AccessKind(access), user=user)
    addrs = _read_gvas(gvas)

    results: list[Translation | Fault] = []
    if memory_file is not None:
        from hvtools.memory.ramfile import PmemDump

        assert cr3_text is not None
        cr3 = int(parse_gva(cr3_text))
        mode = PagingMode(maxphyaddr=maxphyaddr or OFFLINE_MAXPHYADDR, la57=la57)
        with PmemDump(memory_file) as mem:
            results = [walk(mem, cr3, mode, g, acc) for g in addrs]
    else:
        from hvtools.control.drivers import find_driver
        from hvtools.control.mmu_live import attach

        assert vm_name is not None
        drv = find_driver(vm_name, driver)
        with _paused(drv, vm_name, pause):
            target = attach(drv, vm_name, cpu)
            try:
                results = [walk(target.memory, target.cr3, target.mode, g, acc) for g in addrs]
            finally:
                target.close()

    for g, r in zip(addrs, results, strict=True):
        if as_json:
            click.echo(json.dumps(result_json(g, r, verbose)))
        else:
            click.echo(result_text(g, r, verbose))
    sys.exit(1 if any(isinstance(r, Fault) for r in results) else 0)


def _size_key(size: int) -> str:
    return _SIZE_NAMES.get(size, str(size))


def dump_json(summary: TreeSummary, cpu: int) -> dict[str, Any]:
    """The JSON form of ``mmu dump``."""
    st = summary.stats

    def by_level(counter: dict[int, int]) -> dict[str, int]:
        return {ENTRY_NAMES[lv]: n for lv, n in sorted(counter.items(), reverse=True)}

    return {
        "cpu": cpu, "cr3": f"{summary.cr3:#x}", "levels": summary.mode.levels,
        "maxphyaddr": summary.mode.maxphyaddr,
        "tables": by_level(st.tables), "present": by_level(st.present),
        "reserved": by_level(st.reserved), "unbacked_tables": st.unbacked,
        "pages": {_size_key(s): n for s, n in sorted(st.pages.items())},
        "mapped_bytes": summary.mapped_bytes,
        "ranges": [{"gva": f"{r.gva:#x}", "gva_end": f"{r.gva_end:#x}", "gpa": f"{r.gpa:#x}",
                    "length": r.length, "write": r.permissions.write,
                    "execute": r.permissions.execute, "user": r.permissions.user,
                    "protection_key": r.permissions.protection_key,
                    "pages": {_size_key(s): n for s, n in r.pages}} for r in summary.ranges],
    }


@mmu.command("dump")
@click.option("--vm", "vm_name", metavar="NAME", required=True, help="The VM.")
@driver_option
@click.option("--cpu", type=click.IntRange(min=0), default=0, show_default=True,
              help="vCPU whose CR3 roots the tree.")
@click.option("--pause", is_flag=True, help="Stop the VM while walking.")
@json_option
def dump(vm_name: str, driver: str | None, cpu: int, pause: bool, as_json: bool) -> None:
    """Summarize a live vCPU's page-table tree: counts per level and page size, mapped ranges."""
    from hvtools.control.drivers import find_driver
    from hvtools.control.mmu_live import attach

    drv = find_driver(vm_name, driver)
    with _paused(drv, vm_name, pause):
        target = attach(drv, vm_name, cpu)
        try:
            summary = summarize(target.memory, target.cr3, target.mode)
        finally:
            target.close()
    if as_json:
        click.echo(json.dumps(dump_json(summary, cpu), indent=2))
        return
    mode, stats, ranges = summary.mode, summary.stats, summary.ranges
    out.print(f"[bold]{vm_name}[/bold] vCPU {cpu}: CR3 {summary.cr3:#x}, {mode.levels}-level "
              f"paging, MAXPHYADDR {mode.maxphyaddr}, NXE={int(mode.nxe)} WP={int(mode.wp)} "
              f"SMEP={int(mode.smep)} SMAP={int(mode.smap)} PKE={int(mode.pke)}")
    levels = Table("LEVEL", "TABLES", "PRESENT", "RESERVED-BIT")
    for lv in range(mode.levels, 0, -1):
        levels.add_row(ENTRY_NAMES[lv], str(stats.tables.get(lv, 0)),
                       str(stats.present.get(lv, 0)), str(stats.reserved.get(lv, 0)))
    out.print(levels)
    pages = ", ".join(f"{_size_key(s)}: {n}" for s, n in sorted(stats.pages.items()))
    mapped = summary.mapped_bytes
    out.print(f"leaf pages {pages or 'none'}; {len(ranges)} ranges, {mapped:#x} bytes mapped"
              + (f"; {stats.unbacked} tables outside guest memory" if stats.unbacked else ""))
    t = Table("GVA", "GVA END", "GPA", "SIZE", "PERMS", "PAGES")
    for r in ranges:
        t.add_row(f"{r.gva:#018x}", f"{r.gva_end:#018x}", f"{r.gpa:#x}", f"{r.length:#x}",
                  _perm_text(r.permissions),
                  " ".join(f"{n}x{_size_key(s)}" for s, n in r.pages))
    out.print(t)
