"""The recovery pull over the real fabric transport (libfabric tcp on loopback), without VMs.

A frozen VM is made by hand (a RAM file with data pages, zero pages and holes, its page table,
a device state), exported on one endpoint and pulled through another: the result must equal the
source byte for byte, stale bytes of an older pull must not survive, a pull broken half-way must
resume from its journal, and a page corrupted after the freeze must be caught by its hash.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from hvtools.errors import MigrationError, TransportError
from hvtools.migration import pagetable as pt
from hvtools.migration import recovery
from hvtools.transport import open_endpoint
from hvtools.transport.api import Endpoint

RAM = 64 << 20
VM = "pullvm"


class _Stop(Exception):
    pass


def _frozen(root: Path, seed: int = 7) -> tuple[Path, np.ndarray[Any, np.dtype[np.uint8]]]:
    """A frozen VM in ``root``: 3000 random pages, 500 written-but-zero pages, holes."""
    mem = root / "mem"
    files = recovery.VmFiles(recovery.frozen_dir(mem), VM)
    files.root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    image = np.zeros(RAM, dtype=np.uint8)
    data_pages = rng.choice(RAM // pt.PAGE, 3500, replace=False)
    for i in data_pages[:3000]:
        image[i * pt.PAGE:(i + 1) * pt.PAGE] = rng.integers(0, 256, pt.PAGE, dtype=np.uint8)
    fd = os.open(files.ram, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, RAM)
        for i in sorted(data_pages.tolist()):  # populate only these (the rest stay holes)
            os.pwrite(fd, image[i * pt.PAGE:(i + 1) * pt.PAGE].tobytes(), i * pt.PAGE)
        populated = pt.pages_of_extents(recovery.data_extents(fd, RAM), RAM)
    finally:
        os.close(fd)
    dev = rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    view = memoryview(image)
    offsets = populated[pt.nonzero(view, populated)]
    table = pt.build(VM, RAM, view, offsets, dev_len=len(dev),
                     dev_hash=xxhash.xxh3_64_intdigest(dev))
    files.table.write_bytes(table.to_bytes())
    files.devstate.write_bytes(dev)
    files.meta.write_text(json.dumps({"vm": VM, "ram_size": RAM, "pages": len(offsets),
                                      "populated_pages": len(populated)}))
    return mem, image


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[dict[str, Any], Path, np.ndarray[Any, Any]]]:
    mem, image = _frozen(tmp_path)
    target = open_endpoint("fabric", "tcp", address="127.0.0.1")
    target.start_progress()
    exports = recovery.Exports(target, mem)
    try:
        yield exports.export(VM), mem, image
    finally:
        exports.close()
        target.close()


def _initiator() -> Endpoint:
    return open_endpoint("fabric", "tcp", address="127.0.0.1")


def _read(path: Path) -> np.ndarray[Any, np.dtype[np.uint8]]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        return np.frombuffer(m, dtype=np.uint8).copy()


def test_pull_equals_the_frozen_ram_and_leaves_no_stale_byte(
        served: tuple[dict[str, Any], Path, np.ndarray[Any, Any]], tmp_path: Path) -> None:
    exports, mem, image = served
    meta = exports["meta"]
    assert meta["pages"] == 3000 and meta["populated_pages"] == 3500
    dest = tmp_path / "dest"
    dest.mkdir()
    ram = dest / f"{VM}.ram"
    ram.write_bytes(b"\xff" * RAM)  # an older, unrelated pull's leftovers
    stats = recovery.pull_vm(_initiator(), exports, dest, ram_path=ram)
    assert stats.pages == 3000 and stats.resumed_runs == 0
    assert stats.runs == len(pt.coalesce(pt.parse(
        recovery.VmFiles(recovery.frozen_dir(mem), VM).table.read_bytes())
        .entries["offset"], max_bytes=recovery.RUN_BYTES))
    assert np.array_equal(_read(ram), image)
    files = recovery.VmFiles(dest, VM)
    assert files.devstate.read_bytes() == \
        recovery.VmFiles(recovery.frozen_dir(mem), VM).devstate.read_bytes()
    assert not files.journal.exists()
    rebuilt = pt.parse(files.table.read_bytes())
    assert len(rebuilt.entries) == 3000 and rebuilt.ram_size == RAM


def test_a_broken_pull_resumes_from_its_journal(
        served: tuple[dict[str, Any], Path, np.ndarray[Any, Any]], tmp_path: Path) -> None:
    exports, _mem, image = served
    dest = tmp_path / "dest"

    def stop_half_way(done: int, total: int) -> None:
        if done > total // 2:
            raise _Stop

    with pytest.raises(_Stop):
        recovery.pull_vm(_initiator(), exports, dest, stop_half_way)
    partial = recovery.pull_state(dest, VM)
    assert partial is not None and 0 < partial["runs_done"] < partial["runs"]
    stats = recovery.pull_vm(_initiator(), exports, dest)
    assert stats.resumed_runs == partial["runs_done"]
    assert np.array_equal(_read(recovery.VmFiles(dest, VM).ram), image)
    recovery.abort_pull(dest, VM)
    assert not any(p.exists() for p in recovery.VmFiles(dest, VM).pulled())


def test_a_page_changed_after_the_freeze_fails_its_hash(
        served: tuple[dict[str, Any], Path, np.ndarray[Any, Any]], tmp_path: Path) -> None:
    exports, mem, _image = served
    files = recovery.VmFiles(recovery.frozen_dir(mem), VM)
    victim = int(pt.parse(files.table.read_bytes()).entries["offset"][1234])
    with open(files.ram, "r+b") as f:
        f.seek(victim + 100)
        byte = f.read(1)
        f.seek(victim + 100)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(MigrationError, match="arrived corrupted"):
        recovery.pull_vm(_initiator(), exports, tmp_path / "dest")
    partial = recovery.pull_state(tmp_path / "dest", VM)
    assert partial is None or partial["runs_done"] < partial["runs"]


def test_a_wrong_key_is_refused_by_the_target(
        served: tuple[dict[str, Any], Path, np.ndarray[Any, Any]], tmp_path: Path) -> None:
    exports, _mem, _image = served
    bad = {**exports, "ram": {**exports["ram"], "key": exports["ram"]["key"] ^ 0x5A5A}}
    with pytest.raises(TransportError, match="remote READ"):
        recovery.pull_vm(_initiator(), bad, tmp_path / "dest")
    # Nothing landed: the destination RAM file holds no data.
    assert not _read(recovery.VmFiles(tmp_path / "dest", VM).ram).any()
