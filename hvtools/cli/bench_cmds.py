"""``hvtools bench transport``: the one-sided transport beside a raw TCP stream, in one run.

:func:`register` adds the ``bench`` group to the root command. The measurement itself is
:func:`hvtools.transport.bench.run_bench` (also behind ``bench/transport.py``).
"""

from __future__ import annotations

import click
from rich.table import Table

from hvtools.cli.main import _emit_json, _status, json_option, out
from hvtools.errors import UsageError


def _sizes(text: str) -> list[int]:
    from hvtools.transport.bench import parse_size

    try:
        return [parse_size(s) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise UsageError(f"--sizes {text!r}: {err}") from None


def _fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n >> 10} KiB" \
        if n >= 1024 and not n % 1024 else f"{n} B"


@click.group("bench")
def bench() -> None:
    """Benchmarks, each against an anchor measured in the same run."""


@bench.command("transport")
@click.option("--provider", type=click.Choice(["tcp", "shm"]), default="tcp", show_default=True,
              help="libfabric provider.")
@click.option("--sizes", default="4K,64K,1M,4M", show_default=True, help="Op sizes.")
@click.option("--local", is_flag=True,
              help="Loopback in this namespace instead of a veth link between two namespaces.")
@click.option("--across-netns/--no-across-netns", default=True, show_default=True,
              help="Target and initiator in two namespaces joined by a veth pair (made and "
                   "removed here). --local implies --no-across-netns.")
@click.option("--reps", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Repetitions; medians are reported.")
@click.option("--depth", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="Ops outstanding.")
@click.option("--total", default="64M", show_default=True, help="Bytes per throughput run.")
@click.option("--chunk", default="0", show_default=True,
              help="Split ops larger than this into pieces in flight together (0: never).")
@json_option
def transport(provider: str, sizes: str, local: bool, across_netns: bool, reps: int,
              depth: int, total: str, chunk: str, as_json: bool) -> None:
    """READ/WRITE throughput and latency per op size next to a raw TCP stream."""
    from hvtools.transport.bench import TARGET_RATIO, run_bench

    size_list = _sizes(sizes)
    (total_b,) = _sizes(total)
    chunk_b = 0 if chunk.strip() == "0" else _sizes(chunk)[0]
    with _status("benchmarking the transport", enabled=not as_json) as say:
        report = run_bench(provider, size_list, local=local or not across_netns or
                           provider == "shm", reps=reps, depth=depth, chunk=chunk_b,
                           total=total_b, progress=say)
    if as_json:
        _emit_json(report.to_json())
        return
    t = Table("SIZE", "READ MiB/s", "WRITE MiB/s", "TCP MiB/s (r/w)", "READ/TCP", "WRITE/TCP",
              "READ µs", "WRITE µs", "TCP RTT µs",
              title=f"{report.provider} over {report.link}: medians of {reps}, depth {depth}")
    for r in report.results:
        ok = r.size < 1 << 20 or r.read_ratio >= TARGET_RATIO
        t.add_row(_fmt_size(r.size), f"{r.read_mib_s:.0f}", f"{r.write_mib_s:.0f}",
                  f"{r.tcp_read_mib_s:.0f}/{r.tcp_write_mib_s:.0f}",
                  f"[{'green' if ok else 'red'}]{r.read_ratio:.2f}[/]", f"{r.write_ratio:.2f}",
                  f"{r.read_lat_us:.0f}", f"{r.write_lat_us:.0f}", f"{r.tcp_lat_us:.0f}")
    out.print(t)
    verdict = "meets" if report.meets_target() else "MISSES"
    out.print(f"READ at >= 1 MiB ops {verdict} the target of {TARGET_RATIO:.0%} of raw TCP")


def register(main: click.Group) -> None:
    main.add_command(bench)
