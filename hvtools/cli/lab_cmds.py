"""``hvtools lab up|status|down``: lab hosts as network namespaces, each with its agent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from hvtools.cli.main import HvGroup, _emit_json, _status, err, json_option, out

lab_option = click.option("--lab", "lab_name", default=None, envvar="HVTOOLS_LAB",
                          help="Which lab (default: \"lab\", or the only one up).")


@click.group(cls=HvGroup)
def lab() -> None:
    """Build, inspect and remove a lab of hosts (network namespaces with host agents)."""


def _print_status(st: Any) -> None:
    if not st.up:
        out.print(f"lab {st.name}: down")
        return
    link = st.link if st.link == st.requested_link else f"{st.link} (asked for {st.requested_link})"
    out.print(f"lab {st.name}: up, link {link}, subnet {st.subnet}")
    if st.link_fallback:
        out.print(f"  [yellow]fallback:[/yellow] {st.link_fallback}")
    t = Table("HOST", "ADDRESS", "NETNS", "AGENT", "PID", "VMS", *(
        ["LIBVIRT"] if any(h.libvirt_uri for h in st.hosts) else []))
    for h in st.hosts:
        agent = "[green]up[/green]" if h.agent_up else f"[red]down[/red] {h.detail}".rstrip()
        row = [h.name, h.address, h.netns if h.netns_exists else f"{h.netns} (missing)", agent,
               str(h.agent_pid or "-"), ", ".join(h.vms) or "-"]
        if h.libvirt_uri:
            row.append("up" if h.libvirt_up else "down")
        t.add_row(*row)
    out.print(t)
    for r in st.reachability:
        mark = "[green]ok[/green]" if r.get("ok") else f"[red]FAILED[/red] {r.get('error', '')}"
        rtt = f" {r['rtt_ms']:.2f} ms" if r.get("rtt_ms") is not None else ""
        out.print(f"  {r['from']} -> {r['to']} ({r['address']}:7470) {mark}{rtt}")


@lab.command("up")
@click.argument("spec_file", required=False, type=click.Path(path_type=Path))
@json_option
def lab_up(spec_file: Path | None, as_json: bool) -> None:
    """Build the lab in SPEC_FILE (TOML; default: two hosts h1, h2 on 10.77.0.0/24)."""
    from hvtools.lab.build import lab_up as build_up
    from hvtools.lab.spec import read_lab_spec

    spec = read_lab_spec(spec_file)
    notes: list[str] = []

    def progress(msg: str) -> None:
        if msg.startswith("rxe:"):
            notes.append(msg)
            err.print(f"[yellow]note:[/yellow] {msg}")
        update(msg)

    with _status(f"building lab {spec.name}", enabled=not as_json) as update:
        st = build_up(spec, progress=progress)
    if as_json:
        _emit_json(st.to_json())
        return
    if st.already_up:
        out.print(f"lab {st.name} is already up")
    _print_status(st)


@lab.command("status")
@lab_option
@json_option
def lab_status(lab_name: str | None, as_json: bool) -> None:
    """Show each host: namespace, address, agent, VMs; the link and any fallback."""
    from hvtools.lab.build import lab_status as get_status

    st = get_status(lab_name)
    if as_json:
        _emit_json(st.to_json())
    else:
        _print_status(st)


@lab.command("down")
@lab_option
@json_option
def lab_down(lab_name: str | None, as_json: bool) -> None:
    """Remove the lab: VMs on its hosts, agents, namespaces, links, sockets and files."""
    from hvtools.lab.build import lab_down as tear_down

    with _status("removing lab", enabled=not as_json) as update:
        removed = tear_down(lab_name, progress=update)
    if as_json:
        _emit_json(removed)
        return
    if not (removed["netns"] or removed["dirs"] or removed["agents"]):
        out.print(f"lab {removed['lab']} was not up")
        return
    out.print(f"lab {removed['lab']} down: {len(removed['vms'])} VM(s) killed, "
              f"{len(removed['agents'])} agent(s) stopped, {len(removed['netns'])} namespace(s) "
              "removed")


def register(main: click.Group) -> None:
    main.add_command(lab)
