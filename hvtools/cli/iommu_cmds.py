"""``hvtools iommu translate`` and ``hvtools iommu tables``: the VT-d model on a live guest.

Both read RTADDR_REG, GSTS_REG, CAP/ECAP and the fault registers through the monitor (VT-d 4.x
s11.4) and walk the structures the guest programmed in its RAM (ch. 9). ``translate`` prints
one line (or one JSON object): the GPA, or the fault with its VT-d reason code (s7.1.3) and
name; it exits 0 when the request translated, 1 when it faulted, 2 on bad usage.
:func:`register` adds the commands to the ``iommu`` group.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click
from rich.table import Table

from hvtools.addr import PAGE_1G, PAGE_2M, PAGE_4K
from hvtools.cli.main import driver_option, json_option, out
from hvtools.errors import UsageError
from hvtools.iommu.walk import format_source_id, parse_source_id
from hvtools.translation import Fault, Permissions, Stage, Translation, WalkStep

if TYPE_CHECKING:
    from hvtools.control.iommu_live import LiveTranslation, VtdRegisters

_SIZE_NAMES = {PAGE_4K: "4K", PAGE_2M: "2M", PAGE_1G: "1G"}


def parse_number(text: str, what: str, *, hex_default: bool) -> int:
    """A non-negative integer: ``0x`` hex, else hex (addresses) or decimal (``hex_default``)."""
    t = text.strip().lower().replace("_", "")
    try:
        value = int(t[2:], 16) if t.startswith("0x") else int(t, 16 if hex_default else 10)
    except ValueError:
        raise UsageError(f"{what} {text.strip()!r} is not a number") from None
    if value < 0:
        raise UsageError(f"{what} {text.strip()!r} is negative")
    return value


def _perm_text(p: Permissions) -> str:
    return ("r" if p.read else "-") + ("w" if p.write else "-") + ("x" if p.execute else "-")


def _walk_kind(steps: tuple[WalkStep, ...]) -> str:
    stages = {s.stage for s in steps}
    if Stage.VTD_FIRST in stages:
        return "nested" if Stage.VTD_SECOND in stages else "first-stage"
    return "second-stage" if Stage.VTD_SECOND in stages else "pass-through"


def _step_text(s: WalkStep) -> str:
    level = f" L{s.level}" if s.level else ""
    return f"{s.table}{level} @{s.address:#x} = {s.entry:#x}"


def translation_text(res: LiveTranslation, verbose: bool) -> str:
    """The result line of a translation (and its steps, one per line, with ``verbose``)."""
    req, o = res.request, res.outcome
    who = format_source_id(req.sid) + (f" pasid {req.pasid:#x}" if req.pasid is not None else "")
    head = f"{who} {req.access} {req.address:#x} -> "
    if isinstance(o, Translation):
        size = _SIZE_NAMES.get(o.page_size, str(o.page_size))
        kind = (_walk_kind(o.steps) if res.translation_enabled
                else "not remapped: GSTS.TES=0")
        line = head + f"{o.output:#x} {size} {_perm_text(o.permissions)} ({kind})"
    else:
        assert isinstance(o, Fault)
        where = f", level {o.level}" if o.level else ""
        line = head + f"fault {o.code:#04x} {res.fault_name}: {o.reason} [{o.stage}{where}]"
    if verbose:
        line += "".join(f"\n  {_step_text(s)}" for s in o.steps)
    return line


@click.command("translate")
@click.option("--vm", "vm_name", metavar="NAME", required=True, help="The VM.")
@driver_option
@click.option("--sid", required=True, metavar="BB:DD.F",
              help="Source-id of the requester (PCI bus:dev.fn).")
@click.option("--pasid", "pasid_text", metavar="N",
              help="Request with PASID N (decimal or 0x hex); without it, a request "
                   "without PASID (scalable mode uses the context entry's RID_PASID).")
@click.option("--iova", "iova_text", required=True, metavar="ADDR", help="The IOVA (hex).")
@click.option("--write", is_flag=True, help="A DMA write (default: a read).")
@click.option("--pause", is_flag=True, help="Stop the VM while reading (QMP stop/cont).")
@click.option("-v", "--verbose", is_flag=True, help="Show every structure the walk read.")
@json_option
def translate_cmd(vm_name: str, driver: str | None, sid: str, pasid_text: str | None,
                  iova_text: str, write: bool, pause: bool, verbose: bool,
                  as_json: bool) -> None:
    """Translate one DMA request through the tables the guest programmed (VT-d 4.x ch. 3)."""
    from hvtools.control.drivers import find_driver
    from hvtools.control.iommu_live import translate_live

    source = parse_source_id(sid)
    pasid = None if pasid_text is None else parse_number(pasid_text, "PASID", hex_default=False)
    if pasid is not None and pasid >= 1 << 20:
        raise UsageError(f"PASID {pasid:#x} is not 20 bits")
    iova = parse_number(iova_text, "IOVA", hex_default=True)
    if iova >= 1 << 64:
        raise UsageError(f"IOVA {iova_text.strip()!r} is not a 64-bit address")
    drv = find_driver(vm_name, driver)
    res = translate_live(drv, vm_name, source, pasid, iova, write, pause=pause)
    if as_json:
        click.echo(json.dumps(res.to_json(steps=verbose)))
    else:
        click.echo(translation_text(res, verbose))
    sys.exit(1 if isinstance(res.outcome, Fault) else 0)


def _registers_line(regs: VtdRegisters) -> str:
    state = "translation enabled" if regs.translation_enabled else "translation DISABLED"
    return (f"DMAR at {regs.base:#x}: {regs.mode} mode, root table {regs.root_table:#x}, "
            f"{state} (GSTS {regs.gsts:#010x}: TES={int(regs.translation_enabled)} "
            f"RTPS={int(regs.root_table_set)}), FSTS {regs.fsts:#x}")


@click.command("tables")
@click.option("--vm", "vm_name", metavar="NAME", required=True, help="The VM.")
@driver_option
@click.option("--pause", is_flag=True, help="Stop the VM while reading (QMP stop/cont).")
@json_option
def tables_cmd(vm_name: str, driver: str | None, pause: bool, as_json: bool) -> None:
    """Every device's context entry and PASID-table entries as the guest programmed them."""
    from hvtools.control.drivers import find_driver
    from hvtools.control.iommu_live import tables_live

    drv = find_driver(vm_name, driver)
    tables = tables_live(drv, vm_name, pause=pause)
    if as_json:
        click.echo(json.dumps(tables.to_json(), indent=2))
        return
    regs = tables.registers
    out.print(f"[bold]{vm_name}[/bold] {_registers_line(regs)}", markup=True)
    for rec in regs.pending_faults:
        j = rec.to_json()
        out.print(f"[yellow]fault record {rec.index}:[/yellow] {j['sid']} {j['access']} "
                  f"{j['page']} reason {j['reason']:#04x} {j['name']}", markup=True)
    if not tables.devices:
        out.print("no present context entries" + ("" if regs.root_table_set
                                                  else " (no root table latched: RTPS=0)"))
        return
    t = Table("SID", "CONTEXT", "PASID", "TYPE", "DID", "AW", "TABLE", "FLAGS")
    for dev in tables.devices:
        f = dev.tables.context_fields
        sid = format_source_id(dev.sid)
        ctx = f"{dev.tables.context_address:#x}"
        if not dev.tables.scalable:
            t.add_row(sid, ctx, "-", dev.to_json()["translation_type"], str(f["DID"]),
                      str(f["AW"]), f"{f['SSPTPTR'] << 12:#x}", f"FPD={f['FPD']}")
            continue
        flags = f"RID_PASID={f['RID_PASID']} PASIDE={f['PASIDE']} PDTS={f['PDTS']}"
        if not dev.pasid_entries:
            t.add_row(sid, ctx, "none", "-", "-", "-", "-", flags)
        for i, pe in enumerate(dev.pasid_entries):
            p = pe.fields
            ptr = p["FSPTPTR"] if pe.pgtt == "first-stage" else p["SSPTPTR"]
            extra = " ".join(f"{k}={p[k]}" for k in ("SRE", "FSPM", "NXE", "WPE", "SSADE",
                                                     "PWSNP") if p[k])
            t.add_row(sid if i == 0 else "", ctx if i == 0 else "", str(pe.pasid), pe.pgtt,
                      str(p["DID"]), str(p["AW"]), f"{ptr << 12:#x}",
                      (flags + " " if i == 0 else "") + extra)
        for e in dev.tables.errors:
            t.add_row("", "", "", "[red]error[/red]", "", "", "", e)
    out.print(t)


def register(group: click.Group) -> None:
    """Add ``translate`` and ``tables`` to the ``iommu`` group (idempotent)."""
    group.add_command(translate_cmd, "translate")
    group.add_command(tables_cmd, "tables")
