"""``hvtools dirty watch VM``: live dirty rates, vCPUs (QEMU) beside each device's own log."""

from __future__ import annotations

import json

import click
from rich.live import Live
from rich.table import Table

from hvtools.cli.main import _driver_for, driver_option, err, json_option, out

MiB = 1 << 20


def _table(name: str, rows: list[tuple[str, str, str]]) -> Table:
    t = Table(title=f"{name}: dirty rates (last {len(rows)} samples)")
    t.add_column("time")
    t.add_column("vCPUs+all (calc-dirty-rate)", justify="right")
    t.add_column("device log", justify="right")
    for r in rows:
        t.add_row(*r)
    return t


def register(main: click.Group) -> None:
    @main.group("dirty")
    def dirty() -> None:
        """Dirty-page tracking: QEMU's and the devices' own logs."""

    @dirty.command("watch")
    @click.argument("name")
    @click.option("--interval", type=click.FloatRange(1, 60), default=1.0, show_default=True,
                  help="Seconds per sample.")
    @click.option("--count", type=click.IntRange(1), default=None,
                  help="Stop after this many samples (default: until Ctrl-C).")
    @driver_option
    @json_option
    def dirty_watch(name: str, interval: float, count: int | None, driver: str | None,
                    as_json: bool) -> None:
        """Show VM NAME's dirty rates live: QEMU's calc-dirty-rate beside each vhost-user
        device's own dirty log (--json: one sample per line)."""
        import time

        from hvtools.control.dirty_watch import watch

        drv = _driver_for(name, driver)
        samples = watch(drv, name, interval=interval, count=count)
        if as_json:
            for s in samples:
                click.echo(json.dumps(s.to_json(), sort_keys=True))
            return
        rows: list[tuple[str, str, str]] = []
        live = Live(_table(name, rows), console=out if out.is_terminal else err,
                    refresh_per_second=4, transient=False)
        with live:
            for s in samples:
                cpu = "-" if s.cpu_bytes_s is None else f"{s.cpu_bytes_s / MiB:,.1f} MiB/s"
                dev = ", ".join(f"{d}: {v['bytes_s'] / MiB:,.2f} MiB/s ({int(v['pages'])} pages)"
                                for d, v in s.devices.items()) or "no vhost-user device"
                rows = ([*rows, (time.strftime("%H:%M:%S", time.localtime(s.t)), cpu, dev)])[-15:]
                live.update(_table(name, rows))
