"""``hvtools migrate``, ``hvtools host fail|revive`` and ``hvtools recover``.

Long work shows a progress bar on stderr (plain lines when stderr is not a terminal); the final
report goes to stdout, as a table or, with ``--json``, as one JSON object.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hvtools.cli.main import _emit_json, err, json_option, out
from hvtools.migration.live import parse_rate

MiB = 1 << 20


def _mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.1f} MiB"


@contextmanager
def _bar(title: str, quiet: bool) -> Iterator[Callable[[int, int, str], None]]:
    """update(done, total, detail): a rich bar on a terminal, a line a second otherwise."""
    if quiet:
        yield lambda _d, _t, _s: None
        return
    if err.is_terminal:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                      TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                      console=err, transient=True) as prog:
            task = prog.add_task(title, total=None, detail="")

            def update(done: int, total: int, detail: str) -> None:
                prog.update(task, completed=done, total=total or None, detail=detail)

            yield update
        return
    last = [0.0]

    def line(done: int, total: int, detail: str) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            err.print(f"{title}: {_mib(done)} / {_mib(total)} {detail}")

    yield line


def _say(quiet: bool) -> Callable[[str], None]:
    """Step messages, dimmed on stderr (none with --json)."""
    if quiet:
        return lambda _m: None
    return lambda m: err.print(f"[dim]{m}[/dim]")


def register(main: click.Group) -> None:
    @main.command("migrate")
    @click.argument("name")
    @click.option("--to", "to", required=True, help="Destination lab host (HOST).")
    @click.option("--transport", type=click.Choice(["tcp", "rdma"]), default="tcp",
                  show_default=True, help="QEMU's migration transport.")
    @click.option("--postcopy", is_flag=True, help="Switch to post-copy after the first pass.")
    @click.option("--max-downtime", type=click.IntRange(1, 60_000), default=None,
                  metavar="MS", help="QEMU downtime-limit in milliseconds.")
    @click.option("--bandwidth", default=None, metavar="RATE",
                  help="QEMU max-bandwidth, bytes/s with K/M/G (e.g. 500M).")
    @click.option("--stall-timeout", type=float, default=10.0, show_default=True,
                  help="Cancel when no byte moves for this many seconds.")
    @click.option("--verify", is_flag=True,
                  help="Hold the destination paused at completion and compare every guest "
                  "page of both sides before it runs (qemu driver).")
    @json_option
    def migrate_cmd(name: str, to: str, transport: str, postcopy: bool,
                    max_downtime: int | None, bandwidth: str | None, stall_timeout: float,
                    verify: bool, as_json: bool) -> None:
        """Live-migrate VM NAME to lab host --to with QEMU's own migration."""
        from hvtools.migration import live
        from hvtools.migration.orchestrate import migrate_live

        opts = live.Options(postcopy=postcopy, max_downtime_ms=max_downtime,
                            bandwidth=parse_rate(bandwidth), stall_timeout=stall_timeout)
        with _bar(f"migrating {name} to {to}", as_json) as update:
            def on_progress(p: live.Progress) -> None:
                dd = f"{p.expected_downtime_ms} ms" if p.expected_downtime_ms is not None \
                    else "-"
                update(p.transferred, p.transferred + p.remaining,
                       f"{p.status} | remaining {_mib(p.remaining)} | dirty "
                       f"{_mib(p.dirty_rate)}/s | expected downtime {dd}")

            res = migrate_live(name, to, transport=transport, opts=opts,
                               on_progress=on_progress, verify=verify,
                               say=_say(as_json))
        if as_json:
            _emit_json(res.to_json())
            return
        r = res.report
        t = Table(title=f"{name}: {r.source} → {r.destination} ({r.uri})", show_header=False)
        t.add_row("status", r.status)
        t.add_row("total time", f"{r.total_time_ms} ms")
        t.add_row("downtime (QEMU query-migrate)",
                  f"{r.qemu_downtime_ms} ms" if r.qemu_downtime_ms is not None else "-")
        t.add_row("downtime (STOP→RESUME events)" if "://" not in r.uri
                  else "downtime (libvirt: source stop → destination resume)",
                  f"{r.measured_downtime_ms} ms" if r.measured_downtime_ms is not None else "-")
        t.add_row("transferred", _mib(r.transferred_bytes))
        t.add_row("guest RAM", _mib(r.ram_total_bytes))
        t.add_row("pages sent / re-sent", f"{r.pages_sent} / {r.pages_resent}")
        t.add_row("dirty-sync iterations", str(r.iterations))
        t.add_row("dirty rate before", f"{_mib(res.dirty_rate)}/s")
        t.add_row("destination start", f"{res.destination_start_ms} ms")
        if r.device_log is not None:
            t.add_row("device-written pages per iteration (own log)",
                      " ".join(map(str, r.device_log["pages_per_iteration"]))
                      + f" ({r.device_log['distinct_pages']} distinct)")
        if res.verified is not None:
            t.add_row("verified", f"all {res.verified['pages']} guest pages identical")
        out.print(t)

    @main.group("host")
    def host() -> None:
        """Lab host lifecycle for recovery: fail, revive."""

    @host.command("fail")
    @click.argument("host_name", metavar="HOST")
    @click.option("--lab", "lab_name", default=None, help="Lab name (default: the one lab up).")
    @json_option
    def host_fail(host_name: str, lab_name: str | None, as_json: bool) -> None:
        """Fail HOST: freeze its VMs into its memory, then its CPUs are gone (QEMU killed)."""
        from hvtools.migration.orchestrate import fail_host

        res = fail_host(host_name, lab_name,
                        say=_say(as_json))
        if as_json:
            _emit_json(res)
            return
        for m in res.get("frozen", []):
            out.print(f"froze {m['vm']}: {m['pages']} pages with data "
                      f"({_mib(m['populated_bytes'])}) of {m['populated_pages']} populated, "
                      f"device state {m['dev_len']} bytes, page table {m['table_len']} bytes, "
                      f"in {m['total_ms']} ms")
        for e in res.get("errors", []):
            err.print(f"[red]could not freeze[/red] {e}")
        if not res.get("frozen") and not res.get("errors"):
            out.print(f"{host_name} failed; it ran no VM")
        out.print(f"{host_name} has failed: its memory and NIC stay for `hvtools recover`")

    @host.command("revive")
    @click.argument("host_name", metavar="HOST")
    @click.option("--lab", "lab_name", default=None)
    def host_revive(host_name: str, lab_name: str | None) -> None:
        """Bring a failed HOST back (once its frozen VMs are recovered)."""
        from hvtools.migration.orchestrate import revive_host

        res = revive_host(host_name, lab_name)
        out.print(f"{host_name} is back" if res.get("was_failed")
                  else f"{host_name} had not failed")

    @main.command("recover")
    @click.argument("name")
    @click.option("--to", "to", required=True, help="Host to recover onto.")
    @click.option("--lab", "lab_name", default=None)
    @click.option("--abort", is_flag=True,
                  help="Throw away a partial pull on --to instead (the frozen copy stays).")
    @json_option
    def recover_cmd(name: str, to: str, lab_name: str | None, abort: bool,
                    as_json: bool) -> None:
        """Recover frozen VM NAME onto host --to by one-sided READs of the failed host's memory."""
        from hvtools.migration.orchestrate import abort_recovery, recover

        if abort:
            res: Any = abort_recovery(name, to, lab_name)
            if as_json:
                _emit_json(res)
            else:
                out.print(f"dropped the partial pull of {name} on {to}")
            return
        with _bar(f"pulling {name}", as_json) as update:
            rr = recover(name, to, lab_name=lab_name,
                         on_progress=lambda d, t: update(d, t, "verified"),
                         say=_say(as_json))
        if as_json:
            _emit_json(rr.to_json())
            return
        p = rr.pull
        t = Table(title=f"{name}: recovered {rr.source} → {rr.destination}", show_header=False)
        t.add_row("pages pulled (verified)", f"{p['pages']} ({_mib(p['bytes'])})")
        t.add_row("READ ops (coalesced runs)", f"{p['runs']}"
                  + (f", {p['resumed_runs']} resumed" if p.get("resumed_runs") else ""))
        t.add_row("page table READ", f"{p['table_ms']} ms")
        t.add_row("page READs", f"{p['pages_ms']} ms ({p['gib_per_s']} GiB/s)")
        t.add_row("hash checks", f"{p['verify_ms']} ms")
        t.add_row("QEMU start", f"{rr.start_ms} ms")
        t.add_row("device state load + cont", f"{rr.restore_ms} ms")
        t.add_row("guest answering", f"{rr.answer_ms} ms")
        t.add_row("total", f"{rr.total_ms} ms")
        out.print(t)
