"""The migration methods of a lab host's agent (registered through its extension point).

A host's agent is its "NIC" and the last act of its hypervisor: it owns the host's fabric
endpoint (``<address>:7471``), freezes the host's VMs when the host fails, serves their frozen
memory to remote READs, and on a recovery destination pulls a frozen VM into its own memory.

Methods (params → result):
  ``host_fail`` {}                       freeze every running VM here, then refuse new work
  ``host_revive`` {}                     clear the failed state (no frozen VM may be left)
  ``recovery_exports`` {vm}              register a frozen VM's table, device state, RAM
  ``recovery_release`` {vm, delete}      deregister (and free) a frozen VM
  ``recovery_pull`` {vm, source, ram_path?}  pull ``vm`` from the agent at ``source`` (an
                                         address), into ``ram_path`` (in this host's memory)
  ``recovery_prepare`` {vm, ram_path, created_ns}  resume a partial pull of that freeze, or
                                         clear the way (before the destination QEMU starts)
  ``recovery_park`` / ``recovery_finish`` {vm, ram_path}  after a failed / finished recovery
  ``frozen_list`` {}, ``capacity`` {}     frozen VMs here; bytes free for VM RAM here
  ``recovery_progress`` {vm}             bytes done/total of a pull in progress
  ``recovery_abort`` {vm}                throw away a partial pull
  ``fabric_info`` {}                     the endpoint's address and provider
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hvtools.errors import HvError, MigrationError, StateError, UsageError
from hvtools.lab.hosts import remote_error, rpc_tcp
from hvtools.migration import recovery
from hvtools.transport import open_endpoint
from hvtools.transport.api import Endpoint

if TYPE_CHECKING:
    from hvtools.lab.agent import HostAgent

log = logging.getLogger("hvtools.migration.hostops")


class HostOps:
    def __init__(self, agent: HostAgent) -> None:
        self.agent = agent
        self.failed_marker = agent.state_dir / "failed.json"
        self._ep: Endpoint | None = None
        self._ep_lock = threading.Lock()
        self._exports: recovery.Exports | None = None
        self._progress: dict[str, tuple[int, int]] = {}
        self._pulling: set[str] = set()
        self._spare: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()

    # -- the NIC --------------------------------------------------------------------------------
    def endpoint(self) -> Endpoint:
        with self._ep_lock:
            if self._ep is None:
                ep = open_endpoint("fabric", "tcp", address=self.agent.host.address,
                                   port=recovery.FABRIC_PORT)
                ep.start_progress()
                self._ep = ep
                self._exports = recovery.Exports(ep, self.agent.memory_dir)
                log.info("fabric endpoint %s up", ep.address)
            return self._ep

    def exports(self) -> recovery.Exports:
        self.endpoint()
        assert self._exports is not None
        return self._exports

    def close(self) -> None:
        if self._spare is not None and self._spare.poll() is None:
            self._spare.kill()
        if self._exports is not None:
            self._exports.close()
        if self._ep is not None:
            self._ep.stop_progress()
            self._ep.close()

    @property
    def failed(self) -> bool:
        return self.failed_marker.exists()

    # -- methods --------------------------------------------------------------------------------
    def fabric_info(self, _p: dict[str, Any]) -> dict[str, Any]:
        ep = self.endpoint()
        return {"address": ep.address, "backend": ep.backend, "provider": ep.provider,
                "failed": self.failed}

    def host_fail(self, _p: dict[str, Any]) -> dict[str, Any]:
        from hvtools.control.qemu_driver import QemuDriver, ram_path

        if self.failed:
            raise StateError(f"host {self.agent.host.name} has already failed")
        self.endpoint()  # the NIC must be up before the CPUs go
        t0 = time.monotonic()
        driver = QemuDriver()
        mine = [vm for vm in driver.list()
                if vm.host == self.agent.host.name and vm.lab == self.agent.lab.name
                and vm.state.active and vm.pid is not None]
        self.failed_marker.write_text(json.dumps({"at": time.time(),
                                                  "vms": [v.name for v in mine]}) + "\n")
        frozen, errors = [], []
        for vm in mine:
            assert vm.state_dir is not None and vm.pid is not None
            try:
                meta = recovery.freeze_vm(vm.name, vm.state_dir / "qmp.sock", vm.pid,
                                          ram_path(vm.name), self.agent.memory_dir, log.info)
            except (HvError, OSError) as err:
                errors.append(f"{vm.name}: {err}")
                log.error("freezing %s failed: %s", vm.name, err)
                continue
            frozen.append(meta)  # frozen and killed: it counts, whatever happens next
            try:
                self.exports().export(vm.name)  # recovery_exports retries this on demand
            except (HvError, OSError) as err:
                meta["export_error"] = str(err)
                log.error("exporting %s failed: %s", vm.name, err)
        if errors and not frozen:
            # Nothing froze (each VM was resumed): the host has not failed after all.
            self.failed_marker.unlink(missing_ok=True)
            raise MigrationError(f"host {self.agent.host.name} did not fail: "
                                 + "; ".join(errors))
        return {"host": self.agent.host.name, "frozen": frozen, "errors": errors,
                "total_ms": round((time.monotonic() - t0) * 1000, 1)}

    def host_revive(self, _p: dict[str, Any]) -> dict[str, Any]:
        left = [m["vm"] for m in recovery.frozen_vms(self.agent.memory_dir)]
        if left:
            raise StateError(f"host {self.agent.host.name} still holds frozen VM(s) "
                             f"{', '.join(left)}: recover them first")
        was = self.failed
        self.failed_marker.unlink(missing_ok=True)
        return {"host": self.agent.host.name, "was_failed": was}

    def recovery_exports(self, p: dict[str, Any]) -> dict[str, Any]:
        return self.exports().export(_vm(p))

    def recovery_release(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = _vm(p)
        self.exports().release(vm, delete=bool(p.get("delete", True)))
        return {"vm": vm, "released": True}

    def recovery_pull(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = _vm(p)
        source = p.get("source")
        if not isinstance(source, str):
            raise UsageError("recovery_pull needs params.source (the failed host's address)")
        if self.failed:
            raise StateError(f"host {self.agent.host.name} has failed; it cannot take VMs")
        with self._lock:
            if vm in self._pulling:
                raise StateError(f"a pull of {vm} is already running on "
                                 f"{self.agent.host.name}")
            self._pulling.add(vm)
        try:
            exports = rpc_tcp(source, "recovery_exports", {"vm": vm}, timeout=30.0)
            dest = recovery.recovering_dir(self.agent.memory_dir)

            def progress(done: int, total: int) -> None:
                self._progress[vm] = (done, total)

            ram = p.get("ram_path")
            target = Path(ram) if isinstance(ram, str) else None
            if target is not None and target.parent != self.agent.memory_dir:
                raise UsageError(f"ram_path {target} is not in {self.agent.host.name}'s memory")
            out = self._run_puller({"exports": exports, "dest": str(dest),
                                    "ram_path": str(target) if target else None}, progress)
            out["ram_path"] = str(target or recovery.VmFiles(dest, vm).ram)
            out["devstate_path"] = str(recovery.VmFiles(dest, vm).devstate)
            out["meta"] = exports["meta"]
            return out
        finally:
            with self._lock:
                self._pulling.discard(vm)
                self._progress.pop(vm, None)

    # -- pulls run in a process of their own (hvtools.migration.puller) -----------------------
    def _spawn_puller(self) -> subprocess.Popen[str]:
        with open(self.agent.state_dir / "puller.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "hvtools.migration.puller", self.agent.host.address],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                close_fds=True)

    def warm_puller(self) -> None:
        """Keep one puller ready, imports done and endpoint open, so a pull starts at once."""
        with self._lock:
            if self._spare is None or self._spare.poll() is not None:
                self._spare = self._spawn_puller()

    def _take_puller(self) -> subprocess.Popen[str]:
        with self._lock:
            proc, self._spare = self._spare, None
        if proc is None or proc.poll() is not None:
            proc = self._spawn_puller()
        threading.Thread(target=self.warm_puller, name="puller-spare", daemon=True).start()
        return proc

    def _run_puller(self, job: dict[str, Any],
                    progress: Callable[[int, int], None]) -> dict[str, Any]:
        proc = self._take_puller()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            ready = json.loads(proc.stdout.readline() or "{}")
            if "ready" not in ready:
                raise _error(ready.get("error"), "the pull process did not start")
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
            for line in proc.stdout:
                msg = json.loads(line)
                if "progress" in msg:
                    progress(*msg["progress"])
                elif "result" in msg:
                    result: dict[str, Any] = msg["result"]
                    return result
                elif "error" in msg:
                    raise _error(msg["error"], "the pull failed")
            code = proc.wait()
            raise MigrationError(f"the pull process ended without a result (exit {code}); "
                                 "the partial pull is kept for a resume")
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def frozen_list(self, _p: dict[str, Any]) -> list[dict[str, Any]]:
        return recovery.frozen_vms(self.agent.memory_dir)

    def capacity(self, _p: dict[str, Any]) -> dict[str, int]:
        return recovery.capacity(self.agent.memory_dir)

    def _ram_param(self, p: dict[str, Any]) -> Path:
        ram = p.get("ram_path")
        if not isinstance(ram, str) or Path(ram).parent != self.agent.memory_dir:
            raise UsageError(f"params.ram_path must be a file in {self.agent.host.name}'s "
                             "memory")
        return Path(ram)

    def recovery_prepare(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = _vm(p)
        resume = recovery.prepare_pull(recovery.recovering_dir(self.agent.memory_dir), vm,
                                       self._ram_param(p), int(p.get("created_ns", -1)))
        return {"vm": vm, "resume": resume}

    def recovery_park(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = _vm(p)
        recovery.park_pull(recovery.recovering_dir(self.agent.memory_dir), vm,
                           self._ram_param(p))
        return {"vm": vm, "parked": True}

    def recovery_finish(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = _vm(p)
        recovery.finish_pull(recovery.recovering_dir(self.agent.memory_dir), vm,
                             self._ram_param(p))
        return {"vm": vm, "finished": True}

    def recovery_progress(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = _vm(p)
        done, total = self._progress.get(vm, (0, 0))
        return {"vm": vm, "active": vm in self._pulling, "done": done, "total": total,
                "partial": recovery.pull_state(recovery.recovering_dir(self.agent.memory_dir),
                                               vm)}

    def recovery_abort(self, p: dict[str, Any]) -> dict[str, Any]:
        vm = _vm(p)
        if vm in self._pulling:
            raise StateError(f"a pull of {vm} is running; wait for it to end")
        recovery.abort_pull(recovery.recovering_dir(self.agent.memory_dir), vm)
        return {"vm": vm, "aborted": True}


def _error(err: Any, fallback: str) -> HvError:
    """The puller's error, as the hvtools class it named (the agents' own rule)."""
    if not isinstance(err, dict):
        return MigrationError(fallback)
    return remote_error("pull", "recovery_pull", str(err.get("type")),
                        str(err.get("message", fallback)))


def _vm(p: dict[str, Any]) -> str:
    vm = p.get("vm")
    if not isinstance(vm, str) or not vm:
        raise UsageError("params.vm (a VM name) is required")
    return vm


def register(agent: HostAgent) -> None:
    ops = HostOps(agent)
    for name in ("fabric_info", "host_fail", "host_revive", "frozen_list", "capacity",
                 "recovery_exports", "recovery_release", "recovery_prepare", "recovery_pull",
                 "recovery_park", "recovery_finish", "recovery_progress", "recovery_abort"):
        agent.add_method(name, getattr(ops, name))
    # Bring the NIC up now, in the background, so a failure later finds it ready.
    # A puller ready before the agent serves (its log file exists from the start).
    try:
        ops.warm_puller()
    except OSError as err:
        log.error("no spare puller: %s", err)

    def warm() -> None:
        try:
            ops.endpoint()
        except (HvError, OSError) as err:
            log.error("fabric endpoint not up: %s", err)

    threading.Thread(target=warm, name="fabric-warmup", daemon=True).start()
