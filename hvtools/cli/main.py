"""The ``hvtools`` command line: parse, call the library, print. The only layer that prints.

Every :class:`~hvtools.errors.HvError` becomes one red line on stderr and the error's exit status
(2 for bad input and wrong state); commands that read state take ``--json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from hvtools import __version__
from hvtools.errors import HvError, UnknownVmError, UsageError

F = TypeVar("F", bound=Callable[..., Any])

# Wide when piped, so tables are not truncated in logs.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DRIVERS = ("qemu", "libvirt")  # hvtools.control.drivers.DRIVERS, without importing it at start


class HvGroup(click.Group):
    """The command group; errors are turned into one line by :func:`run`."""


def _fail(message: str, status: int) -> NoReturn:
    err.print(f"[red]error:[/red] {_one_line(message)}", markup=True)
    sys.exit(status)


def run(argv: list[str] | None = None) -> None:
    """Console entry point: the one error boundary. Every failure is one red line on stderr.

    HvError → its exit status (2 for bad input); click usage errors → 2; OS errors → 1.
    """
    try:
        status = main.main(args=argv, prog_name="hvtools", standalone_mode=False)
    except HvError as e:
        if os.environ.get("HVTOOLS_DEBUG"):
            raise
        _fail(str(e), e.exit_status)
    except click.UsageError as e:
        hint = f" (see hvtools {e.ctx.command_path.partition(' ')[2]} --help)".replace(
            "hvtools  --help", "hvtools --help") if e.ctx else ""
        _fail(e.format_message() + hint, 2)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except OSError as e:
        if os.environ.get("HVTOOLS_DEBUG"):
            raise
        _fail(f"{e.strerror or e}" + (f": {e.filename}" if e.filename else ""), 1)
    sys.exit(status if isinstance(status, int) else 0)


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown error"


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@contextmanager
def _status(message: str, *, enabled: bool = True) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr for long waits; yields a function that updates its text."""
    if not enabled or not err.is_terminal:
        yield lambda msg: None
        return
    with err.status(message) as st:
        yield lambda msg: st.update(msg)


# -- drivers ------------------------------------------------------------------------------------
def _driver(kind: str) -> Any:
    from hvtools.control.drivers import make_driver

    return make_driver(kind)


def _driver_for(name: str, explicit: str | None) -> Any:
    from hvtools.control.drivers import find_driver

    return find_driver(name, explicit)


def driver_option(f: F) -> F:
    return click.option("--driver", type=click.Choice(DRIVERS), default=None,
                        envvar="HVTOOLS_DRIVER",
                        help="qemu (embedded, default) or libvirt (qemu:///system).")(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


# -- root ---------------------------------------------------------------------------------------
@click.group(cls=HvGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hvtools")
def main() -> None:
    """hvtools: boot, inspect and migrate QEMU/KVM lab guests."""


# -- vm -----------------------------------------------------------------------------------------
@main.group(cls=HvGroup)
def vm() -> None:
    """Create, start, inspect and stop VMs."""


def spec_options(f: F) -> F:
    opts = [
        click.option("--spec", "spec_file", type=click.Path(path_type=Path),
                     help="A TOML VM spec; flags override its values."),
        click.option("--memory", help="Guest RAM, e.g. 512M or 1G (default 1G)."),
        click.option("--vcpus", type=int, help="Number of vCPUs (default 2)."),
        click.option("--iommu", help="none | legacy | scalable[,pasid][,flts][,caching-mode]"
                     "[,device-iotlb][,no-intremap] (default scalable,pasid,flts)."),
        click.option("--accel", help="auto | tcg | kvm (default auto: KVM only if a probe "
                     "guest runs under it)."),
        click.option("--kernel-args", help="Extra guest kernel arguments, space separated."),
        click.option("--device", "devices", multiple=True,
                     help="virtio-rng | virtio-net | virtio-blk:PATH | vhost-user-blk:PATH | "
                     "hvt-pci (the patched QEMU's device: hvtools qemu build) (repeatable)."),
        click.option("--security-level", type=click.Choice(["trusted", "confidential"]),
                     help="The VM's security level, set on its hvt-pci devices "
                     "(default trusted)."),
        click.option("--ivshmem", "ivshmem", multiple=True,
                     help="NAME:SIZE shared-memory region at /dev/shm/NAME (repeatable)."),
        click.option("--image-variant", "image_variant", metavar="VARIANT",
                     help="Boot a guest image variant (hvtools image build --variant), e.g. "
                     "pasid: its kernel and initrd are written into the spec."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _parse_device(text: str) -> dict[str, Any]:
    kind, _, path = text.partition(":")
    d: dict[str, Any] = {"type": kind}
    if path:
        d["path"] = path
    return d


def _build_spec(name: str, spec_file: Path | None, flags: dict[str, Any]) -> Any:
    from hvtools.spec import absolutize_paths, apply_overrides, read_spec_file, spec_from_mapping

    data = read_spec_file(spec_file) if spec_file is not None else {}
    over: dict[str, Any] = {
        "memory": flags.get("memory"), "vcpus": flags.get("vcpus"),
        "iommu": flags.get("iommu"), "accel": flags.get("accel"),
        "kernel_args": flags.get("kernel_args"),
        "security_level": flags.get("security_level"),
        "devices": [_parse_device(d) for d in flags.get("devices") or ()] or None,
        "ivshmem": [dict(zip(("name", "size"), r.split(":", 1), strict=False))
                    for r in flags.get("ivshmem") or ()] or None,
    }
    if flags.get("image_variant"):
        from hvtools.guest.image import find_image

        img = find_image(flags["image_variant"])
        over["kernel"], over["initrd"] = str(img.kernel), str(img.initrd)
    over = absolutize_paths({k: v for k, v in over.items() if v is not None}, Path.cwd())
    return spec_from_mapping(apply_overrides(data, over), name=name)


def _spec_flags_given(spec_file: Path | None, flags: dict[str, Any]) -> bool:
    return spec_file is not None or any(v not in (None, ()) for v in flags.values())


def _print_vm(info: Any) -> None:
    t = Table.grid(padding=(0, 2))
    j = info.to_json()
    for key in ("name", "driver", "state", "pid", "host", "lab", "accel", "memory", "vcpus",
                "iommu", "state_dir", "console_log", "detail"):
        if j.get(key) not in (None, ""):
            t.add_row(f"[bold]{key}[/bold]", str(j[key]))
    out.print(t)
    if info.log_tail:
        out.print("[bold]last log lines:[/bold]")
        for ln in info.log_tail:
            out.print(f"  {ln}", markup=False)


@vm.command("create")
@click.argument("name")
@spec_options
@driver_option
@json_option
def vm_create(name: str, spec_file: Path | None, driver: str | None, as_json: bool,
              **flags: Any) -> None:
    """Define a VM without starting it."""
    from hvtools.control.drivers import ensure_name_free

    spec = _build_spec(name, spec_file, flags)
    ensure_name_free(name)
    info = _driver(driver or "qemu").create(spec)
    if as_json:
        _emit_json(info.to_json())
    else:
        out.print(f"created {name} ({info.driver})")


@vm.command("start")
@click.argument("name")
@spec_options
@driver_option
@json_option
@click.option("--timings", is_flag=True, help="Print boot-to-agent-ready timings.")
@click.option("--boot-timeout", type=float, default=120.0, show_default=True,
              help="Seconds to wait for the guest agent.")
@click.option("--host", "host", default=None, metavar="[LAB/]HOST",
              help="Run it on a lab host (hvtools lab up): in that host's network namespace, "
              "RAM in its memory dir (libvirt: in that host's own libvirtd).")
def vm_start(name: str, spec_file: Path | None, driver: str | None, as_json: bool,
             timings: bool, boot_timeout: float, host: str | None, **flags: Any) -> None:
    """Start a VM, creating it first when NAME is new; waits until its guest agent answers."""
    from hvtools.control.drivers import ensure_name_free

    if host is not None:
        from hvtools.lab.hosts import resolve_host

        resolve_host(host)  # an unknown host or a lab that is down: nothing is created
    created = False
    try:
        drv = _driver_for(name, driver)
        if _spec_flags_given(spec_file, flags):
            raise UsageError(f"VM {name!r} already exists; its spec is fixed "
                             f"(hvtools vm rm {name} to redefine it)")
    except UnknownVmError:
        spec = _build_spec(name, spec_file, flags)
        ensure_name_free(name)
        drv = _driver(driver or "qemu")
        drv.create(spec)
        created = True
    try:
        with _status(f"starting {name}", enabled=not as_json) as update:
            info, tm = drv.start(name, progress=update, boot_timeout=boot_timeout,
                                 **({"host": host} if host else {}))
    except BaseException:
        if created:  # a failed first start leaves nothing behind, not even the definition
            drv.undefine(name)
        raise
    if as_json:
        _emit_json({**info.to_json(), "timings": tm.to_json()})
        return
    where = f", on {info.host}" if info.host else ""
    out.print(f"started {name} ({info.driver}, {info.accel}, pid {info.pid}{where})")
    if timings:
        probe = tm.phases.get("accel_probe_s", 0.0)
        note = f"   (before that: accelerator probe {probe:.2f}s)" if probe > 0.5 else ""
        out.print(f"  QEMU up: {tm.launched_s:.2f}s   boot-to-agent-ready: "
                  f"{tm.agent_ready_s:.2f}s{note}")


@vm.command("stop")
@click.argument("name")
@driver_option
@json_option
@click.option("--timeout", type=float, default=30.0, show_default=True)
def vm_stop(name: str, driver: str | None, as_json: bool, timeout: float) -> None:
    """Stop a VM cleanly (guest poweroff, then ACPI, then kill)."""
    drv = _driver_for(name, driver)
    with _status(f"stopping {name}", enabled=not as_json) as update:
        how = drv.stop(name, timeout=timeout, progress=update)
    if as_json:
        _emit_json({"name": name, "stopped_by": how})
    else:
        out.print(f"stopped {name} ({how})")


@vm.command("kill")
@click.argument("name")
@driver_option
def vm_kill(name: str, driver: str | None) -> None:
    """Kill a VM's QEMU at once; also cleans up after a crashed VM."""
    _driver_for(name, driver).kill(name)
    out.print(f"killed {name}")


@vm.command("rm")
@click.argument("name")
@driver_option
def vm_rm(name: str, driver: str | None) -> None:
    """Forget a stopped VM (its definition and state dir)."""
    _driver_for(name, driver).undefine(name)
    out.print(f"removed {name}")


@vm.command("list")
@driver_option
@json_option
def vm_list(driver: str | None, as_json: bool) -> None:
    """List VMs (both drivers unless --driver is given; libvirt only if libvirtd runs)."""
    from hvtools.control.drivers import list_all

    infos: list[Any] = []
    for drv, vms in list_all(driver):
        infos += vms
        for broken, why in getattr(drv, "damaged", {}).items():
            err.print(f"[yellow]warning:[/yellow] {broken}: {why}")
    if as_json:
        _emit_json([i.to_json() for i in infos])
        return
    t = Table("NAME", "DRIVER", "STATE", "PID", "HOST", "ACCEL", "MEMORY", "VCPUS", "IOMMU",
              "DETAIL")
    from hvtools.spec import format_size

    for i in infos:
        color = {"running": "green", "crashed": "red"}.get(str(i.state), "")
        state = f"[{color}]{i.state}[/{color}]" if color else str(i.state)
        t.add_row(i.name, i.driver, state, str(i.pid or "-"), i.host or "-", i.accel or "-",
                  format_size(i.spec.memory), str(i.spec.vcpus),
                  i.spec.iommu.shorthand if i.spec.iommu else "none", i.detail)
    out.print(t)


@vm.command("show")
@click.argument("name")
@driver_option
@json_option
def vm_show(name: str, driver: str | None, as_json: bool) -> None:
    """Show one VM's state, spec and, if it crashed, its last log lines."""
    info = _driver_for(name, driver).info(name)
    if as_json:
        _emit_json(info.to_json())
    else:
        _print_vm(info)


@vm.command("console")
@click.argument("name")
@driver_option
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output (Ctrl-C to stop).")
@click.option("-n", "--lines", type=int, default=0, help="Only the last N lines.")
def vm_console(name: str, driver: str | None, follow: bool, lines: int) -> None:
    """Print the guest's serial console log."""
    info = _driver_for(name, driver).info(name)
    if info.console_log is None or not info.console_log.exists():
        raise UsageError(f"VM {name!r} has no console log yet")
    with open(info.console_log, "rb") as fh:
        data = fh.read()
        if lines:
            data = b"\n".join(data.splitlines()[-lines:]) + b"\n"
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        while follow:
            chunk = fh.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.2)


@vm.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@driver_option
@json_option
@click.option("--timeout", type=float, default=60.0, show_default=True)
@click.option("-i", "--stdin", "pass_stdin", is_flag=True,
              help="Send this command's standard input to the guest command.")
def vm_exec(name: str, command: tuple[str, ...], driver: str | None, as_json: bool,
            timeout: float, pass_stdin: bool) -> None:
    """Run COMMAND in the guest (after --); exit with its status."""
    stdin = sys.stdin.buffer.read() if pass_stdin else b""
    res = _driver_for(name, driver).exec(name, list(command), timeout=timeout, stdin=stdin)
    if as_json:
        _emit_json({"argv": list(res.argv), "status": res.status, "timed_out": res.timed_out,
                    "duration_s": round(res.duration_s, 4),
                    "stdout": res.stdout.decode(errors="replace"),
                    "stderr": res.stderr.decode(errors="replace")})
    else:
        sys.stdout.buffer.write(res.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(res.stderr)
        sys.stderr.flush()
        if res.timed_out:
            err.print(f"[red]error:[/red] command timed out after {timeout:.0f}s")
    sys.exit(res.status)


@vm.command("qmp")
@click.argument("name")
@click.argument("command")
@click.argument("arguments", required=False)
@driver_option
def vm_qmp(name: str, command: str, arguments: str | None, driver: str | None) -> None:
    """Send one raw QMP COMMAND (ARGUMENTS as a JSON object) and print the reply."""
    args = None
    if arguments:
        try:
            args = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise UsageError(f"QMP arguments are not JSON: {e}") from e
        if not isinstance(args, dict):
            raise UsageError("QMP arguments must be a JSON object")
    click.echo(_driver_for(name, driver).qmp_text(name, command, args))


# -- image --------------------------------------------------------------------------------------
@main.group(cls=HvGroup)
def image() -> None:
    """Build and inspect the guest image (Debian cloud kernel + busybox initramfs)."""


@image.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if the cached image matches.")
@click.option("--variant", default=None, metavar="VARIANT",
              help="A variant of the recipe (pasid: bookworm's 6.12 cloud kernel and the "
              "hvtpasid module); default $HVTOOLS_IMAGE_VARIANT, else the plain image.")
@json_option
def image_build(force: bool, variant: str | None, as_json: bool) -> None:
    """Build the guest image (cached by its inputs under $HVTOOLS_HOME/images)."""
    from hvtools.guest.image import build_image

    with _status("building guest image", enabled=not as_json) as update:
        img = build_image(force=force, progress=update, variant=variant)
    if as_json:
        _emit_json(img.to_json())
    else:
        out.print(f"image {img.key}: kernel {img.kernel_version}, initrd {img.initrd}")


@image.command("show")
@click.option("--variant", default=None, metavar="VARIANT", help="Show that variant's image.")
@json_option
def image_show(variant: str | None, as_json: bool) -> None:
    """Show the current guest image."""
    from hvtools.guest.image import find_image

    img = find_image(variant)
    if as_json:
        _emit_json(img.to_json())
        return
    t = Table.grid(padding=(0, 2))
    for k, v in img.to_json().items():
        t.add_row(f"[bold]{k}[/bold]", json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    out.print(t)


# -- iommu --------------------------------------------------------------------------------------
@main.group(cls=HvGroup)
def iommu() -> None:
    """Inspect a guest's vIOMMU."""


@iommu.command("caps")
@click.argument("name")
@driver_option
@json_option
def iommu_caps(name: str, driver: str | None, as_json: bool) -> None:
    """Decode VT-d CAP/ECAP (VT-d 4.x s11.4.2-3) from the guest kernel and from MMIO."""
    from hvtools.control.iommu_caps import read_caps
    from hvtools.iommu.regs import CapReg, EcapReg

    rep = read_caps(_driver_for(name, driver), name)
    if as_json:
        _emit_json(rep.to_json())
        return
    for src, c in rep.sources.items():
        out.print(f"{src:12} cap {c.cap:#018x}  ecap {c.ecap:#018x}")
    verdict = "[green]agree[/green]" if rep.agree else "[red]DISAGREE[/red]"
    out.print(f"sources {verdict}")
    for note in rep.notes:
        out.print(f"[yellow]note:[/yellow] {note}")
    caps = rep.caps
    for reg, value in ((CapReg, caps.cap), (EcapReg, caps.ecap)):
        t = Table(title=f"{reg.__name__} = {value:#018x}", title_justify="left")
        t.add_column("field")
        t.add_column("bits", justify="right")
        t.add_column("value", justify="right")
        t.add_column("meaning")
        for f in reg.FIELDS:
            v = f.get(value)
            bits = f"{f.lo}" if f.lo == f.hi else f"{f.hi}:{f.lo}"
            t.add_row(f.name, bits, f"{v:#x}" if f.width > 1 else str(v), f.doc,
                      style="bold" if v else "dim")
        out.print(t)
    d = caps.to_json()["derived"]
    out.print(f"address widths {d['address_widths']}, MGAW {d['mgaw_bits']} bits, "
              f"PASID {d['pasid_bits']} bits, {d['domains']} domains")


# -- doctor -------------------------------------------------------------------------------------
@main.command("doctor")
@json_option
def doctor(as_json: bool) -> None:
    """Check what this host can do, with the reason for each verdict."""
    from hvtools.control.doctor import run_checks

    with _status("checking host", enabled=not as_json):
        checks = run_checks()
    if as_json:
        _emit_json([c.to_json() for c in checks])
        return
    t = Table("CHECK", "", "VERDICT", "REASON")
    for c in checks:
        mark = {True: "[green]ok[/green]", False: "[red]no[/red]", None: "[blue]--[/blue]"}[c.ok]
        t.add_row(c.name, mark, c.summary, c.reason)
    out.print(t)


# Command groups kept in their own modules; they import the helpers above.
from hvtools.cli.mmu import mmu  # noqa: E402

main.add_command(mmu)

from hvtools.cli.iommu_cmds import register as register_iommu_cmds  # noqa: E402

register_iommu_cmds(iommu)

from hvtools.cli.lab_cmds import register as register_lab_cmds  # noqa: E402

register_lab_cmds(main)

from hvtools.cli.migrate_cmds import register as register_migrate_cmds  # noqa: E402

register_migrate_cmds(main)

from hvtools.cli.dirty_cmds import register as register_dirty_cmds  # noqa: E402

register_dirty_cmds(main)

from hvtools.cli.bench_cmds import register as register_bench_cmds  # noqa: E402

register_bench_cmds(main)

from hvtools.cli.qemu_cmds import register as register_qemu_cmds  # noqa: E402

register_qemu_cmds(main)

from hvtools.cli.hvt_cmds import register as register_hvt_cmds  # noqa: E402

register_hvt_cmds(main)

if __name__ == "__main__":
    run()
