"""``hvtools hvt status VM``: the patched QEMU's hvt-pci devices of a running VM."""

from __future__ import annotations

import json

import click

from hvtools.cli.main import _driver_for, driver_option, json_option, out


def register(main: click.Group) -> None:
    @main.group("hvt")
    def hvt() -> None:
        """The hvt-pci PASID DMA device (patched QEMU): inspect it in a running VM."""

    @hvt.command("status")
    @click.argument("name")
    @driver_option
    @json_option
    def hvt_status_cmd(name: str, driver: str | None, as_json: bool) -> None:
        """Show VM NAME's hvt-pci devices: security level, DMAs completed and blocked by the
        secure interface, the engine's last status, the registered bounce window."""
        from hvtools.control.hvt_status import hvt_status

        devices = hvt_status(_driver_for(name, driver), name)
        if as_json:
            click.echo(json.dumps([d.to_json() for d in devices], indent=2, sort_keys=True))
            return
        for d in devices:
            state = "busy" if d.status & 2 else ("error " + d.code_name if d.status & 4
                                                 else ("done" if d.status & 1 else "idle"))
            out.print(f"[bold]{d.id}[/bold]: hvt-pci, {d.security_level}, "
                      f"PASID width {d.pasid_width}")
            out.print(f"  DMAs completed {d.completed}, blocked {d.blocked}; last: {state}")
            out.print(f"  bounce window: {d.window_text()}")
