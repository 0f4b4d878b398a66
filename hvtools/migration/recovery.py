"""Recovery from a failed host by one-sided READs (issue 4, the seed design).

1. Freeze (:func:`freeze_vm`, the failed host's last act): stop the vCPUs, save the device state
   with QEMU's own migration and ``x-ignore-shared`` (RAM stays in the shared file), list the
   populated pages of the RAM file (SEEK_DATA/SEEK_HOLE, lseek(2)), hash each page, write the
   page table (:mod:`hvtools.migration.pagetable`), kill QEMU. The RAM file, the table and the
   device state move to the host's ``frozen/`` directory, where nothing else deletes them, and
   are registered for remote READ (:class:`Exports`).
   Populated pages that hold only zeros are left out: the destination's fresh file reads as
   zeros there.
2. Pull (:func:`pull_vm`, on the destination): one READ for the table, then batched READs of the
   coalesced page runs straight into the destination's own RAM file, each page checked against
   its hash, then the device state. Progress is journalled per run, so a broken transfer resumes
   where it stopped; :func:`abort_pull` throws the partial copy away. The source is only read.
3. The table is rebuilt for the destination and stored beside its RAM file. The destination
   QEMU gets the same spec, hence the same q35 layout of its RAM region, so each page lands at
   the offset it had and the rebuilt table lists the same offsets, now in the destination's
   file. QEMU then starts from that RAM file with ``-incoming defer``,
   ``x-ignore-shared`` and the saved device state (:func:`restore_vm`), and is resumed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from hvtools.errors import HvError, MigrationError, StateError, UsageError
from hvtools.migration import pagetable as pt
from hvtools.qemu.qmp import qmp_call
from hvtools.transport.api import Endpoint, MemoryRegion, RemoteRegion

#: The fabric endpoint of a lab host's agent listens here (the agent's RPC is on 7470).
FABRIC_PORT = 7471
#: Largest READ the puller posts; contiguous pages are merged up to this.
RUN_BYTES = 1 << 20
#: READs kept in flight.
DEPTH = 32


def frozen_dir(memory_dir: Path) -> Path:
    return memory_dir / "frozen"


def recovering_dir(memory_dir: Path) -> Path:
    return memory_dir / "recovering"


@dataclass(frozen=True)
class VmFiles:
    """A VM's recovery pieces in one directory: a failed host's ``frozen/`` (RAM, table,
    device state, meta) or a destination's ``recovering/`` (the same, plus the journal)."""

    root: Path
    vm: str

    @property
    def ram(self) -> Path:
        return self.root / f"{self.vm}.ram"

    @property
    def table(self) -> Path:
        return self.root / f"{self.vm}.pgtbl"

    @property
    def devstate(self) -> Path:
        return self.root / f"{self.vm}.devstate"

    @property
    def meta(self) -> Path:
        return self.root / f"{self.vm}.json"

    @property
    def journal(self) -> Path:
        return self.root / f"{self.vm}.journal.json"

    def pulled(self) -> tuple[Path, ...]:
        """What a pull writes (and an abort removes)."""
        return (self.ram, self.table, self.devstate, self.journal)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each data extent of a file (lseek(2) SEEK_DATA/SEEK_HOLE)."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # no data past off
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, min(end, size)
        off = end


def _wait_migration(qmp: Path, what: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info: dict[str, Any] = qmp_call(qmp, "query-migrate")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise MigrationError(f"{what}: QEMU migration {status}: "
                                 f"{info.get('error-desc', 'no detail')}")
        time.sleep(0.01)
    raise MigrationError(f"{what}: QEMU migration did not finish within {timeout:.0f}s")


# -- 1. freeze ------------------------------------------------------------------------------------
def freeze_vm(vm: str, qmp: Path, qemu_pid: int, ram_path: Path, memory_dir: Path,
              on_step: Callable[[str], None] = lambda _s: None) -> dict[str, Any]:
    """The failed host's last act for one VM. Returns the frozen VM's metadata.

    Until QEMU is killed nothing is lost: a failure before that removes the partial files and
    resumes the VM.
    """
    files = VmFiles(frozen_dir(memory_dir), vm)
    files.root.mkdir(parents=True, exist_ok=True)
    dev_tmp = files.devstate.with_suffix(".devstate.tmp")
    tbl_tmp = files.table.with_suffix(".pgtbl.tmp")
    t0 = time.monotonic()
    qmp_call(qmp, "stop")
    try:
        t_stop = time.monotonic()
        ram_size = int(qmp_call(qmp, "qom-get", {"path": "/objects/ram0", "property": "size"}))
        on_step(f"{vm}: vCPUs stopped; saving device state")
        qmp_call(qmp, "migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True}]})
        qmp_call(qmp, "migrate", {"uri": f"file:{dev_tmp}"})
        _wait_migration(qmp, f"saving {vm}'s device state")
        t_dev = time.monotonic()
        dev = dev_tmp.read_bytes()
        on_step(f"{vm}: device state {len(dev)} bytes; building the page table")
        fd = os.open(ram_path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != ram_size:
                raise MigrationError(f"{ram_path} is not {vm}'s RAM ({ram_size} bytes)")
            populated = pt.pages_of_extents(data_extents(fd, ram_size), ram_size)
            # MAP_POPULATE: one pass in the kernel instead of a fault per page.
            with mmap.mmap(fd, ram_size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                           mmap.PROT_READ) as m:
                view = memoryview(m)
                try:
                    offsets = populated[pt.nonzero(view, populated, threads=os.cpu_count() or 1)]
                    table = pt.build(vm, ram_size, view, offsets, dev_len=len(dev),
                                     dev_hash=xxhash.xxh3_64_intdigest(dev))
                finally:
                    view.release()
        finally:
            os.close(fd)
        tbl_tmp.write_bytes(table.to_bytes())
        t_table = time.monotonic()
    except (HvError, OSError) as err:
        _unfreeze(qmp, dev_tmp, tbl_tmp)
        raise MigrationError(f"freezing {vm} failed: {err}; it runs on") from err
    meta = {"vm": vm, "ram_size": ram_size, "pages": len(offsets),
            "populated_pages": len(populated), "zero_pages": len(populated) - len(offsets),
            "populated_bytes": table.populated_bytes, "dev_len": len(dev),
            "table_len": pt.table_size(len(offsets)), "created_ns": table.created_ns,
            "source_ram_path": str(ram_path), "frozen_at": time.time(),
            "stop_ms": round((t_stop - t0) * 1000, 1),
            "devstate_ms": round((t_dev - t_stop) * 1000, 1),
            "table_ms": round((t_table - t_dev) * 1000, 1)}
    meta_tmp = files.meta.with_suffix(".json.tmp")
    try:
        meta_tmp.write_text(json.dumps(meta, indent=1) + "\n")
    except OSError as err:
        _unfreeze(qmp, dev_tmp, tbl_tmp, meta_tmp)
        raise MigrationError(f"freezing {vm} failed: {err}; it runs on") from err
    # Everything is written: the host's CPUs go. Only its memory and its NIC stay. From here
    # only renames within one filesystem remain, the meta file last (it makes the copy visible).
    with contextlib.suppress(ProcessLookupError):
        os.kill(qemu_pid, signal.SIGKILL)
    _wait_dead(qemu_pid)
    os.replace(dev_tmp, files.devstate)
    os.replace(ram_path, files.ram)
    os.replace(tbl_tmp, files.table)
    os.replace(meta_tmp, files.meta)
    meta["total_ms"] = round((time.monotonic() - t0) * 1000, 1)
    on_step(f"{vm}: frozen, {len(offsets)} populated pages, QEMU killed")
    return meta


def _unfreeze(qmp: Path, *partial: Path) -> None:
    """Undo a freeze that failed before the kill: the VM runs first, then the files go."""
    with contextlib.suppress(HvError):
        qmp_call(qmp, "migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": False}]})
    with contextlib.suppress(HvError):
        qmp_call(qmp, "cont")
    for p in partial:
        with contextlib.suppress(OSError):
            p.unlink()


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except OSError:
            return
        time.sleep(0.01)
    raise MigrationError(f"QEMU pid {pid} did not die after SIGKILL")


def frozen_vms(memory_dir: Path) -> list[dict[str, Any]]:
    """The frozen VMs of a host; a RAM file whose freeze did not finish shows as incomplete."""
    root = frozen_dir(memory_dir)
    out: list[dict[str, Any]] = []
    if not root.is_dir():
        return out
    for ram in sorted(root.glob("*.ram")):
        meta = VmFiles(root, ram.stem).meta
        try:
            out.append(json.loads(meta.read_text()))
        except (OSError, ValueError):
            out.append({"vm": ram.stem, "incomplete": True})
    return out


class Exports:
    """The frozen VMs of a host, registered for remote READ on its fabric endpoint."""

    def __init__(self, endpoint: Endpoint, memory_dir: Path) -> None:
        self.endpoint = endpoint
        self.memory_dir = memory_dir
        self._lock = threading.Lock()
        self._maps: dict[str, list[tuple[mmap.mmap, MemoryRegion]]] = {}

    def export(self, vm: str) -> dict[str, Any]:
        """Register the VM's table, device state and RAM; their regions, for ``rpc``."""
        with self._lock:
            files = VmFiles(frozen_dir(self.memory_dir), vm)
            if not files.meta.exists():
                raise UsageError(f"no frozen VM {vm!r} on this host")
            if vm not in self._maps:
                regs = []
                try:
                    for path in (files.table, files.devstate, files.ram):
                        regs.append(self._register(path))
                except BaseException:
                    for m, mr in regs:
                        self._unregister(m, mr)
                    raise
                self._maps[vm] = regs
            (_, table), (_, dev), (_, ram) = self._maps[vm]
            meta = json.loads(files.meta.read_text())
            return {"vm": vm, "fabric": self.endpoint.address, "meta": meta,
                    "table": table.remote().to_json(), "devstate": dev.remote().to_json(),
                    "ram": ram.remote().to_json()}

    def _register(self, path: Path) -> tuple[mmap.mmap, MemoryRegion]:
        fd = os.open(path, os.O_RDWR)
        try:
            m = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        try:
            return m, self.endpoint.register(m, remote_read=True, remote_write=False)
        except BaseException:
            m.close()
            raise

    def _unregister(self, m: mmap.mmap, mr: MemoryRegion) -> None:
        with contextlib.suppress(HvError):
            self.endpoint.deregister(mr)
        with contextlib.suppress(BufferError):
            m.close()

    def release(self, vm: str, *, delete: bool) -> None:
        """Deregister the VM's regions; with ``delete``, free its frozen memory too."""
        with self._lock:
            for m, mr in self._maps.pop(vm, []):
                self._unregister(m, mr)
            if delete:
                files = VmFiles(frozen_dir(self.memory_dir), vm)
                for p in (files.table, files.devstate, files.ram, files.meta):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()

    def close(self) -> None:
        for vm in list(self._maps):
            self.release(vm, delete=False)


# -- 2. pull --------------------------------------------------------------------------------------
@dataclass
class PullStats:
    vm: str
    pages: int
    bytes: int
    runs: int
    resumed_runs: int
    table_ms: float
    pages_ms: float
    verify_ms: float
    devstate_ms: float
    total_ms: float
    gib_per_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read_into(ep: Endpoint, peer: Any, buf: bytearray | mmap.mmap, remote: RemoteRegion,
               length: int) -> None:
    mr = ep.register(buf, remote_read=False, remote_write=False)
    try:
        ep.read_many(peer, [(mr, 0, remote, 0, length)], depth=1)
    finally:
        with contextlib.suppress(HvError):  # an abandoned endpoint keeps it
            ep.deregister(mr)


def pull_vm(ep: Endpoint, exports: dict[str, Any], dest_root: Path,
            on_progress: Callable[[int, int], None] = lambda _d, _t: None,
            ram_path: Path | None = None) -> PullStats:
    """Pull a frozen VM into ``dest_root`` (the destination host's memory); resumable.

    The pages go into ``ram_path`` when given (the RAM file the destination QEMU maps, which
    may already be running with ``-incoming defer``), else into ``dest_root/<vm>.ram``.
    """
    t0 = time.monotonic()
    vm = str(exports["vm"])
    files = VmFiles(dest_root, vm)
    target = ram_path or files.ram
    dest_root.mkdir(parents=True, exist_ok=True)
    peer = ep.connect(str(exports["fabric"]))
    # The first READ: the page table.
    t_remote = RemoteRegion.from_json(exports["table"])
    tbuf = bytearray(t_remote.length)
    _read_into(ep, peer, tbuf, t_remote, t_remote.length)
    table = pt.parse(tbuf)
    if table.vm != vm:
        raise MigrationError(f"the table READ from {exports['fabric']} is for {table.vm!r}, "
                             f"not {vm!r}")
    t_table = time.monotonic()
    runs = pt.coalesce(table.entries["offset"], max_bytes=RUN_BYTES)
    done = _load_journal(files, table, target, len(runs))
    ram = RemoteRegion.from_json(exports["ram"])
    if ram.length < table.ram_size:
        raise MigrationError(f"the exported RAM region is {ram.length} bytes, the table says "
                             f"{table.ram_size}")
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not done.any() and next(data_extents(fd, os.fstat(fd).st_size), None) is not None:
            # Nothing to resume but old bytes: start from zeros, since pages the table leaves
            # out are zero on the source. (recover() clears the file before a QEMU maps it,
            # so this never shrinks a mapped file.)
            os.ftruncate(fd, 0)
        if os.fstat(fd).st_size != table.ram_size:
            os.ftruncate(fd, table.ram_size)
        # Allocate the pages about to arrive in one pass per extent: the provider's copies then
        # land in memory that exists, instead of faulting it in page by page (on tmpfs ~4x
        # faster overall; ARCHITECTURE.md "first touch").
        for ext in pt.coalesce(table.entries["offset"], max_bytes=1 << 62):
            os.posix_fallocate(fd, ext.offset, ext.length)
        m = mmap.mmap(fd, table.ram_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    verify_s = 0.0
    try:
        mr = ep.register(m, remote_read=False, remote_write=False)
        try:
            todo = [i for i in range(len(runs)) if not done[i]]
            total = sum(runs[i].length for i in todo)
            batch = 32  # runs per journal checkpoint (<= 32 MiB), one pipeline of DEPTH
            moved = 0
            for a in range(0, len(todo), batch):
                chunk = todo[a:a + batch]
                base = moved

                def report(n: int, base: int = base) -> None:
                    on_progress(base + n, total)

                moved += ep.read_many(
                    peer, [(mr, runs[i].offset, ram, runs[i].offset, runs[i].length)
                           for i in chunk], depth=DEPTH, progress=report)
                tv = time.monotonic()
                view = memoryview(m)
                try:
                    bad = [j for i in chunk
                           for j in pt.verify_pages(view, table, runs[i].first, runs[i].last)]
                finally:
                    view.release()
                verify_s += time.monotonic() - tv
                if bad:
                    gpa = int(table.entries["gpa"][bad[0]])
                    raise MigrationError(f"{len(bad)} page(s) of {vm} arrived corrupted "
                                         f"(first at GPA {gpa:#x}); the source is intact, retry")
                done[chunk] = True
                _save_journal(files, table, done, target)
        finally:
            with contextlib.suppress(HvError):  # an abandoned endpoint keeps it
                ep.deregister(mr)
    finally:
        with contextlib.suppress(BufferError):
            m.close()
    t_pages = time.monotonic()
    d_remote = RemoteRegion.from_json(exports["devstate"])
    dbuf = bytearray(max(1, table.dev_len))
    _read_into(ep, peer, dbuf, d_remote, table.dev_len)
    dev = bytes(dbuf[:table.dev_len])
    if xxhash.xxh3_64_intdigest(dev) != table.dev_hash:
        raise MigrationError(f"{vm}'s device state arrived corrupted; the source is intact, retry")
    files.devstate.write_bytes(dev)
    # The table rebuilt for this host: the same pages, at their places in its own RAM file.
    # Same spec, same RAM layout: every page sits at its source offset in this host's file.
    files.table.write_bytes(table.relocated(table.entries["offset"].copy()).to_bytes())
    files.journal.unlink()
    t_end = time.monotonic()
    nbytes = table.populated_bytes
    pages_s = (t_pages - t_table) - verify_s
    return PullStats(vm=vm, pages=len(table.entries), bytes=nbytes, runs=len(runs),
                     resumed_runs=len(runs) - len(todo),
                     table_ms=round((t_table - t0) * 1000, 1),
                     pages_ms=round(pages_s * 1000, 1), verify_ms=round(verify_s * 1000, 1),
                     devstate_ms=round((t_end - t_pages) * 1000, 1),
                     total_ms=round((t_end - t0) * 1000, 1),
                     gib_per_s=round(nbytes / max(pages_s, 1e-9) / (1 << 30), 3))


def _load_journal(files: VmFiles, table: pt.PageTable, target: Path,
                  runs: int) -> np.ndarray[Any, np.dtype[np.bool_]]:
    done = np.zeros(runs, dtype=bool)
    try:
        j = json.loads(files.journal.read_text())
    except (OSError, ValueError):
        return done
    if (j.get("created_ns") == table.created_ns and j.get("runs") == runs
            and j.get("ram_path") == str(target) and target.exists()):
        done[[int(i) for i in j.get("done", [])]] = True
    return done


def _save_journal(files: VmFiles, table: pt.PageTable,
                  done: np.ndarray[Any, np.dtype[np.bool_]], target: Path) -> None:
    tmp = files.journal.with_suffix(".tmp")
    tmp.write_text(json.dumps({"created_ns": table.created_ns, "runs": len(done),
                               "ram_path": str(target),
                               "done": np.flatnonzero(done).tolist()}))
    os.replace(tmp, files.journal)


def pull_state(dest_root: Path, vm: str) -> dict[str, Any] | None:
    """What a broken pull left behind (for resume), or None."""
    files = VmFiles(dest_root, vm)
    if not files.journal.exists():
        return None
    try:
        j = json.loads(files.journal.read_text())
    except (OSError, ValueError):
        return {"vm": vm, "runs_done": 0}
    return {"vm": vm, "runs_done": len(j.get("done", [])), "runs": j.get("runs"),
            "created_ns": j.get("created_ns")}


def prepare_pull(dest_root: Path, vm: str, ram_path: Path, created_ns: int) -> bool:
    """Before a destination QEMU maps ``ram_path``: put a resumable partial pull of this very
    freeze (``created_ns``) in place and return True, or clear anything else and return False.

    Clearing here, before QEMU starts, is what lets the pull begin from zeros without ever
    shrinking a file QEMU has mapped.
    """
    files = VmFiles(dest_root, vm)
    state = pull_state(dest_root, vm)
    if state is not None and state.get("created_ns") == created_ns and files.ram.exists():
        os.replace(files.ram, ram_path)
        return True
    if ram_path.exists():
        raise UsageError(f"{ram_path} exists: another VM's RAM file is in the way")
    abort_pull(dest_root, vm)
    return False


def park_pull(dest_root: Path, vm: str, ram_path: Path) -> None:
    """After a failed recovery: keep the pulled RAM beside its journal for a resume."""
    dest_root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.replace(ram_path, VmFiles(dest_root, vm).ram)


def finish_pull(dest_root: Path, vm: str, ram_path: Path) -> None:
    """After a recovery: the rebuilt table beside its RAM file; the device state file goes."""
    files = VmFiles(dest_root, vm)
    with contextlib.suppress(FileNotFoundError):
        os.replace(files.table, ram_path.with_suffix(".pgtbl"))
    with contextlib.suppress(FileNotFoundError):
        files.devstate.unlink()
    with contextlib.suppress(OSError):
        dest_root.rmdir()


def capacity(memory_dir: Path) -> dict[str, int]:
    """Bytes free for VM RAM on this host: in its memory (tmpfs) and in host RAM."""
    memory_dir.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(memory_dir)
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    return {"memory_dir_free": st.f_bavail * st.f_frsize, "mem_available": avail}


def abort_pull(dest_root: Path, vm: str) -> None:
    """Throw away a partial (or finished but unused) pull of ``vm``."""
    for p in VmFiles(dest_root, vm).pulled():
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    with contextlib.suppress(OSError):
        dest_root.rmdir()


# -- 3. restore -----------------------------------------------------------------------------------
def restore_vm(qmp: Path, devstate: Path, timeout: float = 60.0) -> float:
    """Load the device state into a QEMU started with ``-incoming defer`` and resume it.

    The RAM file already holds the pages (``x-ignore-shared`` skips RAM in the stream).
    Returns the milliseconds spent.
    """
    t0 = time.monotonic()
    status = qmp_call(qmp, "query-status")["status"]
    if status != "inmigrate":
        raise StateError(f"the destination QEMU is {status}, not waiting for an incoming "
                         "migration")
    qmp_call(qmp, "migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": True}]})
    qmp_call(qmp, "migrate-incoming", {"uri": f"file:{devstate}"})
    deadline = time.monotonic() + timeout
    while True:
        st = qmp_call(qmp, "query-status")["status"]
        if st in ("paused", "postmigrate", "running"):
            info = qmp_call(qmp, "query-migrate")
            if info.get("status") in ("failed", "cancelled"):
                raise MigrationError(f"loading the device state failed: "
                                     f"{info.get('error-desc', info.get('status'))}")
            # Leave no capability behind for this QEMU's next migration.
            qmp_call(qmp, "migrate-set-capabilities", {"capabilities": [
                {"capability": "x-ignore-shared", "state": False}]})
            if st in ("paused", "postmigrate"):
                qmp_call(qmp, "cont")
            return (time.monotonic() - t0) * 1000
        if st not in ("inmigrate", "restore-vm", "prelaunch"):
            info = qmp_call(qmp, "query-migrate")
            raise MigrationError(f"loading the device state left QEMU {st}: "
                                 f"{info.get('error-desc', '')}".rstrip(": "))
        if time.monotonic() > deadline:
            raise MigrationError("loading the device state did not finish")
        time.sleep(0.005)

