"""`lab up`, `lab status`, `lab down`: build a lab from its spec, report on it, remove it.

The network, built with pyroute2 (rtnetlink(7)), leaves the root namespace untouched::

    netns hv-<lab>-sw:    br0 (bridge)  +  v-<host> (one veth end per host, enslaved to br0)
    netns hv-<lab>-<host>: eth0 (the other veth end, <address>/<prefix>)  +  lo

Every host then gets its agent (:mod:`hvtools.lab.agent`) and, with ``libvirt = true``, its own
libvirtd (:mod:`hvtools.lab.libvirtd`). `lab up` writes ``building.json`` before it creates
anything and ``lab.json`` when the lab works; a failure mid-way runs `lab down`, which works from
either record and the names alone, so it also cleans up after a crashed agent or a killed `up`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvtools.control.driver import check_socket_path, locked, tail_lines
from hvtools.errors import HostDownError, HvError, LabError, StateError, UsageError
from hvtools.lab.hosts import (
    HostHandle,
    Lab,
    cmdline_of,
    host_dir,
    lab_dir,
    lab_memory_root,
    labs_root,
    load_lab,
    netns_inode,
    netns_name,
    netns_path,
    pid_alive,
    popen_in_netns,
    read_record,
    run_in_netns,
    switch_netns,
)
from hvtools.lab.spec import HostSpec, LabSpec, lab_from_mapping

Progress = Callable[[str], None]
AGENT_START_TIMEOUT = 20.0
BRIDGE = "br0"
HOST_IFACE = "eth0"


def _quiet(_msg: str) -> None:
    pass


def _lock(lab: str) -> Path:
    return labs_root() / f".{lab}.lock"


# -- soft-RoCE ----------------------------------------------------------------------------------
def probe_rxe() -> str | None:
    """None when soft-RoCE can be used, else why not (one line).

    rxe needs the kernel's ``rdma_rxe`` module and iproute2's ``rdma`` tool
    (``rdma link add NAME type rxe netdev DEV``, rdma-link(8)).
    """
    if shutil.which("rdma") is None:
        return "iproute2's rdma tool is not installed"
    if not Path("/sys/module/rdma_rxe").exists():
        res = subprocess.run(["modprobe", "rdma_rxe"], capture_output=True, text=True)
        if res.returncode != 0:
            why = (res.stderr.strip().splitlines() or ["modprobe failed"])[-1]
            return f"the kernel has no soft-RoCE (modprobe rdma_rxe: {why})"
    return None


def _rxe_name(lab: str, host: str) -> str:
    # RDMA devices are shared across namespaces by default (rdma-system(8)): unique names.
    return f"rxe-{lab}-{host}"[:31]


# -- records ------------------------------------------------------------------------------------
@dataclass
class HostStatus:
    name: str
    address: str
    netns: str
    netns_exists: bool
    agent_up: bool
    agent_pid: int | None
    vms: list[str] = field(default_factory=list)
    libvirt_uri: str | None = None
    libvirt_up: bool | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "netns": self.netns,
                "netns_exists": self.netns_exists,
                "agent": "up" if self.agent_up else "down", "agent_pid": self.agent_pid,
                "vms": self.vms, "libvirt_uri": self.libvirt_uri, "libvirt_up": self.libvirt_up,
                "detail": self.detail}


@dataclass
class LabStatus:
    name: str
    up: bool
    link: str | None = None
    requested_link: str | None = None
    link_fallback: str | None = None
    subnet: str | None = None
    hosts: list[HostStatus] = field(default_factory=list)
    reachability: list[dict[str, Any]] = field(default_factory=list)
    already_up: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "up": self.up, "link": self.link,
                "requested_link": self.requested_link, "link_fallback": self.link_fallback,
                "subnet": self.subnet, "hosts": [h.to_json() for h in self.hosts],
                "reachability": self.reachability, "already_up": self.already_up}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# -- network ------------------------------------------------------------------------------------
def _build_network(spec: LabSpec, progress: Progress) -> None:
    from pyroute2 import NetNS, netns

    sw = switch_netns(spec.name)
    for name in [sw] + [netns_name(spec.name, h.name) for h in spec.hosts]:
        if netns_path(name).exists():
            raise LabError(f"network namespace {name} already exists (a leftover? "
                           f"hvtools lab down --lab {spec.name})")
    progress(f"creating switch namespace {sw}")
    netns.create(sw)
    with NetNS(sw) as ns:
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        ns.link("add", ifname=BRIDGE, kind="bridge")
        br = ns.link_lookup(ifname=BRIDGE)[0]
        ns.link("set", index=br, state="up")
    for h in spec.hosts:
        hn = netns_name(spec.name, h.name)
        progress(f"creating host {h.name}: namespace {hn}, {h.address}/{h.prefixlen}")
        netns.create(hn)
        with NetNS(sw) as ns:
            # The veth pair is born in the switch namespace with its peer placed in the host's.
            ns.link("add", ifname=f"v-{h.name}", kind="veth",
                    peer={"ifname": HOST_IFACE, "net_ns_fd": hn})
            v = ns.link_lookup(ifname=f"v-{h.name}")[0]
            ns.link("set", index=v, master=ns.link_lookup(ifname=BRIDGE)[0], state="up")
        with NetNS(hn) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
            e = ns.link_lookup(ifname=HOST_IFACE)[0]
            ns.addr("add", index=e, address=h.address, prefixlen=h.prefixlen)
            ns.link("set", index=e, state="up")


def _add_rxe(spec: LabSpec, progress: Progress) -> None:
    for h in spec.hosts:
        name = _rxe_name(spec.name, h.name)
        progress(f"{h.name}: soft-RoCE device {name} on {HOST_IFACE}")
        res = run_in_netns(netns_name(spec.name, h.name),
                           ["rdma", "link", "add", name, "type", "rxe", "netdev", HOST_IFACE])
        if res.returncode != 0:
            raise LabError(f"{h.name}: rdma link add {name} failed: "
                           f"{res.stderr.decode(errors='replace').strip()}")


# -- agents -------------------------------------------------------------------------------------
def _start_agent(spec: LabSpec, host: HostSpec) -> int:
    d = host_dir(spec.name, host.name)
    d.mkdir(parents=True, exist_ok=True)
    _write_json(d / "host.json", {"lab": spec.to_mapping(), "host": host.name})
    (d / "agent.sock").unlink(missing_ok=True)
    with open(d / "agent.log", "ab") as logf:
        proc = popen_in_netns(netns_name(spec.name, host.name),
                              [sys.executable, "-m", "hvtools.lab.agent", str(d)],
                              detach=True, stdout=logf, stderr=logf, cwd=d)
    (d / "agent.pid").write_text(f"{proc.pid}\n")
    handle = HostHandle(spec.name, host)
    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while True:
        if proc.poll() is not None:
            tail = tail_lines(d / "agent.log", 3)
            raise LabError(f"{host.name}: agent exited with status {proc.returncode}: "
                           f"{tail[-1] if tail else 'no output'} (log: {d / 'agent.log'})")
        try:
            handle.call("ping", timeout=2.0)
            return proc.pid
        except HostDownError:
            if time.monotonic() > deadline:
                raise LabError(f"{host.name}: agent did not answer within "
                               f"{AGENT_START_TIMEOUT:.0f}s (log: {d / 'agent.log'})") from None
            time.sleep(0.05)


def check_reachability(lab: Lab) -> list[dict[str, Any]]:
    """Each host's agent pings every other over TCP on the lab link."""
    out = []
    for a in lab.hosts:
        for b in lab.hosts:
            if a.name == b.name:
                continue
            try:
                r = a.call("probe_peer", address=b.address, timeout=15.0)
            except HvError as err:
                r = {"ok": False, "error": str(err)}
            out.append({"from": a.name, "to": b.name, "address": b.address, **r})
    return out


# -- up -----------------------------------------------------------------------------------------
def lab_up(spec: LabSpec, *, progress: Progress = _quiet) -> LabStatus:
    """Build the lab, or report it when it is already up (restarting agents that died).

    A failure mid-way removes whatever this call built and raises.
    """
    for h in spec.hosts:  # refused before anything exists
        check_socket_path(host_dir(spec.name, h.name) / "agent.sock")
        check_socket_path(host_dir(spec.name, h.name) / "run" / "libvirt" / "libvirt-sock-ro")
    labs_root().mkdir(parents=True, exist_ok=True)
    with locked(_lock(spec.name)):
        record = read_record(spec.name)
        if record is not None:
            return _converge(spec, record, progress)
        if (lab_dir(spec.name) / "building.json").exists() or any(
                netns_path(n).exists() for n in _netns_names(spec)):
            progress(f"cleaning up leftovers of an earlier lab {spec.name}")
            _teardown(spec.name, progress)
        try:
            return _build(spec, progress)
        except BaseException as err:
            progress(f"lab up failed ({err}); removing what it built")
            with contextlib.suppress(HvError):
                _teardown(spec.name, progress)
            raise


def _netns_names(spec: LabSpec) -> list[str]:
    return [switch_netns(spec.name)] + [netns_name(spec.name, h.name) for h in spec.hosts]


def _build(spec: LabSpec, progress: Progress) -> LabStatus:
    d = lab_dir(spec.name)
    d.mkdir(parents=True, exist_ok=True)
    _write_json(d / "building.json", {"spec": spec.to_mapping(), "started_at": time.time()})
    link, fallback = spec.link, None
    if spec.link == "rxe":
        fallback = probe_rxe()
        if fallback:
            link = "veth"
            progress(f"rxe: {fallback}; falling back to veth")
    _build_network(spec, progress)
    if link == "rxe":
        _add_rxe(spec, progress)
    for h in spec.hosts:
        memory = lab_memory_root(spec.name) / h.name
        memory.mkdir(parents=True, exist_ok=True)
        progress(f"{h.name}: starting agent")
        _start_agent(spec, h)
    record = {"spec": spec.to_mapping(), "link": link, "link_fallback": fallback,
              "created_at": time.time(), "libvirt": spec.libvirt}
    lab = Lab(spec, record)
    if spec.libvirt:
        from hvtools.lab.libvirtd import start_host_libvirt

        for host in lab.hosts:
            progress(f"{host.name}: starting libvirtd")
            start_host_libvirt(host, progress=progress)
    progress("checking reachability between hosts")
    reach = check_reachability(lab)
    bad = [r for r in reach if not r.get("ok")]
    if bad:
        r = bad[0]
        raise LabError(f"{r['from']} cannot reach {r['to']} at {r['address']}: "
                       f"{r.get('error', 'no answer')}")
    _write_json(d / "lab.json", record)
    (d / "building.json").unlink()
    status = lab_status(spec.name)
    status.reachability = reach
    return status


def _converge(spec: LabSpec, record: dict[str, Any], progress: Progress) -> LabStatus:
    try:
        built = lab_from_mapping(record["spec"])
    except (KeyError, TypeError, HvError) as err:
        raise StateError(f"lab {spec.name!r} has a damaged record ({err}); "
                         f"hvtools lab down --lab {spec.name}") from err
    if built != spec:
        raise UsageError(f"lab {spec.name!r} is already up with a different spec "
                         f"(hvtools lab down --lab {spec.name} first)")
    lab = Lab(built, record)
    for host in lab.hosts:
        if not netns_path(host.netns).exists():
            raise StateError(f"lab {spec.name!r} is damaged: namespace {host.netns} is gone "
                             f"(hvtools lab down --lab {spec.name}, then up)")
        if not host.up:
            progress(f"{host.name}: agent was down; restarting it")
            _stop_pid(host.agent_pid)
            _start_agent(built, host.spec)
    if built.libvirt:
        from hvtools.lab.libvirtd import host_libvirt_up, start_host_libvirt

        for host in lab.hosts:
            if not host_libvirt_up(host):
                progress(f"{host.name}: libvirtd was down; restarting it")
                start_host_libvirt(host, progress=progress)
    status = lab_status(spec.name)
    status.already_up = True
    status.reachability = check_reachability(lab)
    return status


# -- status -------------------------------------------------------------------------------------
def _vms_by_host(lab: str) -> dict[str, list[str]]:
    from hvtools.control.qemu_driver import QemuDriver

    out: dict[str, list[str]] = {}
    for vm in QemuDriver().list():
        if vm.lab == lab and vm.host and vm.state.active:
            out.setdefault(vm.host, []).append(vm.name)
    return out


def lab_status(name: str | None = None) -> LabStatus:
    """What is up: per host its namespace, address, agent (and pid), VMs and libvirtd."""
    try:
        lab = load_lab(name)
    except StateError:
        from hvtools.lab.hosts import resolve_lab_name

        return LabStatus(name=resolve_lab_name(name), up=False)
    vms = _vms_by_host(lab.name)
    hosts = []
    for h in lab.hosts:
        pid = h.agent_pid
        up = pid is not None and h.up
        detail = "" if up else ("agent process is gone" if pid is None
                                else "agent process runs but does not answer")
        hs = HostStatus(name=h.name, address=h.address, netns=h.netns,
                        netns_exists=netns_path(h.netns).exists(), agent_up=up,
                        agent_pid=pid, vms=sorted(vms.get(h.name, [])), detail=detail)
        if lab.spec.libvirt:
            from hvtools.lab.libvirtd import host_libvirt_up

            hs.libvirt_uri = h.libvirt_uri
            hs.libvirt_up = host_libvirt_up(h)
        hosts.append(hs)
    return LabStatus(name=lab.name, up=True, link=lab.link, requested_link=lab.spec.link,
                     link_fallback=lab.link_fallback, subnet=lab.spec.subnet, hosts=hosts)


# -- down ---------------------------------------------------------------------------------------
def _stop_pid(pid: int | None, timeout: float = 5.0) -> None:
    """SIGTERM, wait, then SIGKILL."""
    if pid is None or not pid_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


def pids_in_netns(netns: str) -> list[int]:
    """Every process whose network namespace is ``netns`` (compared by inode, /proc/PID/ns/net)."""
    ino = netns_inode(netns)
    if ino is None:
        return []
    me = os.getpid()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        with contextlib.suppress(OSError):
            if os.stat(entry / "ns" / "net").st_ino == ino:
                out.append(int(entry.name))
    return out


def _recorded_hosts(lab: str) -> list[str]:
    names: set[str] = set()
    for rec_name in ("lab.json", "building.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads((lab_dir(lab) / rec_name).read_text())
            names |= {str(h["name"]) for h in data["spec"]["host"]}
    d = lab_dir(lab)
    if d.is_dir():
        names |= {p.name for p in d.iterdir() if (p / "host.json").exists()}
    return sorted(names)


def _kill_lab_vms(lab: str, progress: Progress) -> list[str]:
    from hvtools.control.qemu_driver import QemuDriver

    drv = QemuDriver()
    killed = []
    for vm in drv.list():
        if vm.lab == lab and vm.host:
            progress(f"killing VM {vm.name} on {vm.host}")
            with contextlib.suppress(HvError):
                drv.kill(vm.name)
                killed.append(vm.name)
    return killed


def lab_down(name: str | None = None, *, progress: Progress = _quiet) -> dict[str, Any]:
    """Remove the lab: its VMs, agents, daemons, namespaces, links, state and memory dirs.

    Idempotent: a lab that is not up is a no-op. Returns what it removed.
    """
    from hvtools.lab.hosts import resolve_lab_name

    lab = resolve_lab_name(name)
    labs_root().mkdir(parents=True, exist_ok=True)
    with locked(_lock(lab)):
        removed = _teardown(lab, progress)
    _lock(lab).unlink(missing_ok=True)
    return removed


def _teardown(lab: str, progress: Progress) -> dict[str, Any]:
    hosts = _recorded_hosts(lab)
    removed: dict[str, Any] = {"lab": lab, "vms": [], "agents": [], "processes": [],
                               "netns": [], "dirs": []}
    problems: list[str] = []
    removed["vms"] = _kill_lab_vms(lab, progress)
    for h in hosts:
        d = host_dir(lab, h)
        try:
            pid = int((d / "agent.pid").read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and pid_alive(pid) and b"hvtools.lab.agent" in cmdline_of(pid):
            progress(f"{h}: stopping agent (pid {pid})")
            _stop_pid(pid)
            removed["agents"].append(pid)
        if (d / "run" / "libvirt").exists():
            from hvtools.lab.libvirtd import stop_host_libvirt

            try:
                stop_host_libvirt(lab, h, progress=progress)
            except HvError as err:
                problems.append(str(err))
    # Whatever still runs inside the lab's namespaces is the lab's: stray QEMUs, helpers.
    all_ns = [netns_name(lab, h) for h in hosts] + [switch_netns(lab)]
    for ns in all_ns:
        for pid in pids_in_netns(ns):
            progress(f"{ns}: stopping process {pid}")
            _stop_pid(pid)
            removed["processes"].append(pid)
    if shutil.which("rdma"):
        for h in hosts:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["rdma", "link", "delete", _rxe_name(lab, h)],
                               capture_output=True, timeout=10)
    from pyroute2 import netns

    for ns in all_ns:
        if netns_path(ns).exists():
            progress(f"removing namespace {ns}")
            try:
                netns.remove(ns)  # its veth ends (and the bridge) go with it
                removed["netns"].append(ns)
            except OSError as err:
                problems.append(f"cannot remove namespace {ns}: {err}")
    for d in (lab_memory_root(lab), lab_dir(lab)):
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
            removed["dirs"].append(str(d))
            if d.exists():
                problems.append(f"cannot remove {d}")
    if problems:
        raise LabError(f"lab {lab!r} teardown incomplete: {'; '.join(problems)}")
    return removed
