"""``hvtools qemu build`` and ``hvtools qemu list``: the patched QEMU and what each binary can do.

The build's progress goes to stderr (a bar on a terminal, a line per step and per 10 % of the
compile otherwise); the result goes to stdout, as a line or, with ``--json``, one JSON object.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hvtools.cli.main import _emit_json, err, json_option, out


@contextmanager
def _build_display(quiet: bool) -> Iterator[Callable[[Any, str, int | None, int | None], None]]:
    """The build's progress callback: a rich bar on a terminal, plain lines otherwise."""
    if quiet:
        yield lambda *_: None
        return
    if err.is_terminal:
        with Progress(TextColumn("[bold]{task.fields[step]:9}"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("[dim]{task.description}"), console=err,
                      transient=True) as prog:
            task = prog.add_task("", total=None, step="")

            def bar(step: Any, message: str, done: int | None, total: int | None) -> None:
                if done is None:
                    prog.console.print(f"[dim]{step}: {message}[/dim]")
                    prog.update(task, description=message, step=str(step), total=None,
                                completed=0)
                else:
                    prog.update(task, description=message[-60:], step=str(step),
                                total=total, completed=done)

            yield bar
        return
    shown = [-1]
    started = time.monotonic()

    def lines(step: Any, message: str, done: int | None, total: int | None) -> None:
        elapsed = time.monotonic() - started
        if done is None or not total:
            err.print(f"qemu build: {step}: {message} [{elapsed:.0f}s]", markup=False)
            return
        tenth = done * 10 // total
        if tenth > shown[0]:
            shown[0] = tenth
            err.print(f"qemu build: {step}: [{done}/{total}] {tenth * 10}% [{elapsed:.0f}s]",
                      markup=False)

    yield lines


def _yes(flag: bool) -> str:
    return "[green]yes[/green]" if flag else "[dim]no[/dim]"


def register(main: click.Group) -> None:
    @main.group("qemu")
    def qemu() -> None:
        """The patched QEMU (qemu-patches/ on QEMU 10.0.2) and the binaries on this host."""

    @qemu.command("build")
    @click.option("--jobs", "-j", type=click.IntRange(1), default=None,
                  help="Parallel compile jobs (default: one per core).")
    @click.option("--force", is_flag=True, help="Rebuild even if this series is installed.")
    @click.option("--patches", "patches_dir", type=click.Path(path_type=Path), default=None,
                  help="The series directory (default: qemu-patches/ of this checkout, or "
                  "$HVTOOLS_QEMU_PATCHES).")
    @json_option
    def qemu_build(jobs: int | None, force: bool, patches_dir: Path | None,
                   as_json: bool) -> None:
        """Fetch QEMU 10.0.2's source, apply the series, build x86_64-softmmu and install it
        under $HVTOOLS_HOME/qemu/<key>/ (cached by the base tarball and the series)."""
        from hvtools.qemu.build import build

        with _build_display(as_json) as progress:
            res = build(patches_dir=patches_dir, jobs=jobs, force=force, progress=progress)
        if as_json:
            _emit_json(res.to_json())
            return
        inst = res.install
        n = len(inst.patches)
        if res.cached:
            out.print(f"patched QEMU {inst.key} ({n} patch(es)) is already built: {inst.binary}",
                      soft_wrap=True)
        else:
            steps = ", ".join(f"{k} {v:.0f}s" for k, v in res.steps.items() if v >= 1)
            out.print(f"built patched QEMU {inst.key} ({n} patch(es)) in {res.seconds:.0f}s "
                      f"({steps}): {inst.binary}", soft_wrap=True)

    @qemu.command("list")
    @json_option
    def qemu_list(as_json: bool) -> None:
        """The stock QEMU and each patched install, with what each supports."""
        from hvtools.errors import HvError
        from hvtools.qemu.binary import capabilities, patched_installs, qemu_path
        from hvtools.qemu.build import current_key

        rows: list[dict[str, Any]] = []
        try:
            stock_path = qemu_path()
            stock: dict[str, Any] = {"kind": "stock", **capabilities(stock_path).to_json()}
        except HvError as e:
            stock = {"kind": "stock", "path": None, "error": str(e)}
        rows.append(stock)
        try:
            current: str | None = current_key()
        except HvError:
            current = None
        for inst in patched_installs():
            row: dict[str, Any] = {"kind": "patched", "key": inst.key,
                                   "current_series": inst.key == current,
                                   "patches": inst.patches, "built_at": inst.built_at}
            try:
                row.update(capabilities(inst.binary).to_json())
            except HvError as e:
                row.update(path=str(inst.binary), error=str(e))
            rows.append(row)
        if as_json:
            _emit_json(rows)
            return
        t = Table("KIND", "KEY", "VERSION", "HVT-PCI", "X-NESTED", "QTEST", "PATCHES", "PATH")
        for r in rows:
            if "error" in r:
                t.add_row(r["kind"], r.get("key", "-"), "[red]error[/red]", "", "", "", "",
                          r["error"])
                continue
            key = r.get("key", "-") + (" (current)" if r.get("current_series") else "")
            t.add_row(r["kind"], key, r["version"], _yes(r["hvt_pci"]), _yes(r["x_nested"]),
                      _yes(r["qtest"]), str(len(r.get("patches", []))) if "key" in r else "-",
                      r["path"])
        out.print(t)
        if not any(r["kind"] == "patched" for r in rows):
            out.print("no patched QEMU built yet: hvtools qemu build")
