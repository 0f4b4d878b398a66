"""The destination half of a live migration with the qemu driver.

While both QEMUs run, the destination is a second VM record, ``<name>.m<5 hex>``, with the
same spec, started on the destination host with ``-incoming defer``. When QEMU reports the migration
completed, the source QEMU quits (its RAM file goes with it) and the records are switched: the
destination's state dir becomes ``<name>``'s. The qemu driver identifies a VM's QEMU and
supervisor by their working directory (the state dir), so the rename leaves them recognised.

The record's name is fresh for every migration: a QEMU unlinks its socket paths when it exits,
and those paths still name the record it started under, so they must never be reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from hvtools.control.qemu_driver import QemuDriver
from hvtools.errors import HvError, MigrationError, MigrationRefused


@dataclass(frozen=True)
class Incoming:
    name: str
    record: str
    qmp_socket: Path


def records(driver: QemuDriver, name: str) -> list[str]:
    """Destination records of ``name`` (normally none: one exists during a migration)."""
    pat = re.compile(re.escape(name) + r"\.m[0-9a-f]{5}")
    return sorted(d.name for d in driver.root.glob(f"{name}.m*") if pat.fullmatch(d.name))


def discard_record(driver: QemuDriver, rec: str) -> None:
    """Remove a destination record and its QEMU (after a failed migration)."""
    with contextlib.suppress(HvError):
        driver.kill(rec)
    with contextlib.suppress(HvError):
        driver.undefine(rec)


def start(driver: QemuDriver, name: str, host: str, *, hold: bool = False) -> Incoming:
    """The destination record on ``host``, waiting for the stream; ``hold`` keeps it paused
    after the migration completes (``-S``), for a check before it runs."""
    vm = driver.info(name)
    for old in records(driver, name):  # leftovers of an interrupted run
        discard_record(driver, old)
    rec = f"{name}.m{secrets.token_hex(3)[:5]}"
    try:
        spec = dataclasses.replace(vm.spec, name=rec)
    except HvError as err:
        raise MigrationRefused(f"VM name {name!r} is too long to migrate (the destination "
                               f"record is {rec!r}): {err}") from err
    driver.create(spec)
    try:
        info, _ = driver.start(rec, host=host,
                               extra_args=("-incoming", "defer", *(("-S",) if hold else ())),
                               wait_agent=False)
    except BaseException:
        discard_record(driver, rec)
        raise
    assert info.state_dir is not None
    return Incoming(name, rec, info.state_dir / "qmp.sock")


def adopt(driver: QemuDriver, incoming: Incoming) -> None:
    """After a completed migration: stop the source and make the destination ``name``."""
    name, rec = incoming.name, incoming.record
    src_dir, dst_dir = driver.root / name, driver.root / rec
    with contextlib.suppress(HvError):
        driver.qmp(name, "quit")
    deadline = time.monotonic() + 10
    while driver.info(name).state.active and time.monotonic() < deadline:
        time.sleep(0.02)
    if driver.info(name).state.active:  # it did not quit: insist
        driver.kill(name)  # reaps the supervisor; removes the source's runtime files and RAM
    launch_path = dst_dir / "launch.json"
    launch = json.loads(launch_path.read_text())
    old_ram = Path(launch["ram_path"]) if launch.get("ram_path") else None
    if old_ram is not None and old_ram.name == f"{rec}.ram":
        new_ram = old_ram.with_name(f"{name}.ram")
        os.replace(old_ram, new_ram)  # QEMU keeps its mapping; only the name changes
        launch["ram_path"] = str(new_ram)
    launch["migrated_from"] = json.loads((src_dir / "launch.json").read_text()).get("host") \
        if (src_dir / "launch.json").exists() else None
    tmp = launch_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(launch) + "\n")
    os.replace(tmp, launch_path)
    spec = json.loads((dst_dir / "spec.json").read_text())
    spec["name"] = name
    (dst_dir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
    old = driver.root / f".{name}.old.{os.getpid()}"
    os.rename(src_dir, old)
    try:
        os.rename(dst_dir, src_dir)
    except OSError as err:
        os.rename(old, src_dir)
        raise MigrationError(f"switching {name}'s record to the destination failed: {err}") \
            from err
    shutil.rmtree(old, ignore_errors=True)
    if not driver.info(name).state.active:
        raise MigrationError(f"{name}'s destination QEMU is not recognised after the switch")
